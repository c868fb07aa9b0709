"""A search space as data: its distributions, the values a trial draws from it, and what it can give at most.

Parsed and checked by :mod:`allconv_cli.spaces`, sampled by search workers; imports neither torch nor optuna.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from allconv_cli.config import DATA_FIELDS, TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.space_files import SpaceError


def _product(sizes: Any) -> int | None:
    """The product of ``sizes``, None if one of them is None (countless)."""
    total = 1
    for size in sizes:
        if size is None:
            return None
        total *= size
    return total


def case_key(value: Any) -> str:
    """The string a ``cases:`` entry is matched by (YAML keys and config values normalised the same way)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class Dist:
    """One Optuna distribution: ``float``/``int`` with low, high, log, step, or ``categorical`` with choices."""

    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        """The values a trial can get that are most likely to be out of range: each choice, or a range's ends."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def size(self) -> int | None:
        """Distinct values (None: a float range without a step)."""
        if self.kind == "categorical":
            return len(self.choices)
        if self.kind == "int":
            return len(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        return math.floor((self.high - self.low) / self.step + 1e-9) + 1

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log, step=self.step)


@dataclass(frozen=True)
class Param:
    """A sampled field: one distribution, or one case (distribution or constant) per value of ``depends_on``."""

    name: str
    dist: Dist | None = None
    depends_on: str | None = None
    cases: dict[str, Dist | Any] = field(default_factory=dict)  # case_key(parent value) -> Dist or constant


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str  # the file it was read from
    text: str  # the file's content, logged with the study
    description: str = ""
    sampler: str = "tpe"
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)  # in sampling order: parents before dependents

    @property
    def sha(self) -> str:
        """Identifies the space's meaning (not its comments or layout), to refuse resuming with another space."""
        canon = {"sampler": self.sampler, "fixed": self.fixed, "params": {
            n: {"dist": dataclasses.asdict(p.dist) if p.dist else None, "depends_on": p.depends_on,
                "cases": {k: dataclasses.asdict(c) if isinstance(c, Dist) else c for k, c in p.cases.items()}}
            for n, p in self.params.items()}}
        return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def varies_data(self) -> bool:
        return any(name in DATA_FIELDS for name in self.params)

    def grid(self) -> dict[str, list[Any]]:
        """The grid's axes: every independent parameter's choices."""
        return {name: list(p.dist.choices) for name, p in self.params.items() if p.dist is not None}

    def grid_size(self) -> int | None:
        """Number of grid points (None unless the sampler is grid)."""
        if self.sampler != "grid":
            return None
        return math.prod(len(choices) for choices in self.grid().values())

    def check_base(self, base: dict[str, Any], origin: str = "the command line") -> None:
        """Every dependent parameter whose parent is not sampled must have a case for the parent's actual value; and
        every sampled extreme (a range's ends, each choice, each case), one parameter at a time, must make a valid
        config with ``base``: what no single field's range sees (milestones after a sampled number of epochs) fails
        here, before a study exists, not in a trial."""
        for p in self.params.values():
            if p.depends_on and p.depends_on not in self.params:
                key = case_key(base.get(p.depends_on))
                if key not in p.cases:
                    raise SpaceError(
                        f"space {self.source}: params.{p.name} depends on {p.depends_on}, which is {key} here "
                        f"(from {origin}), but has cases only for {', '.join(p.cases)}"
                    )
        for values in self._extremes(base):
            try:
                TrainConfig(**{**base, **values})
            except AllconvError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise SpaceError(f"space {self.source}: the sampled {shown} with the other values from {origin}: "
                                 f"{exc}") from None

    def _extremes(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        """Value sets to try with ``base``: each extreme of each parameter (with its parent's value, for a case)."""
        out: list[dict[str, Any]] = []
        for p in self.params.values():
            if p.dist is not None:
                out += [{p.name: v} for v in p.dist.extremes()]
                continue
            assert p.depends_on is not None
            parent = self.params.get(p.depends_on)
            if parent is not None and parent.dist is not None:  # each choice of the sampled parent, with its case
                reachable = {case_key(c): {p.depends_on: c} for c in parent.dist.choices}
            else:  # the parent's value comes from the base config
                reachable = {case_key(base.get(p.depends_on)): {}}
            for key, parent_value in reachable.items():
                case = p.cases.get(key)
                for v in case.extremes() if isinstance(case, Dist) else [case]:
                    out.append({**parent_value, p.name: v})
        return out

    def size(self, base: dict[str, Any]) -> int | None:
        """How many distinct configurations the space gives with ``base`` (None: countless, a float range; or a space
        that samples nothing, whose trials all train the fixed config, on purpose)."""
        if not self.params:
            return None
        sizes: dict[str, int | None] = {n: p.dist.size() for n, p in self.params.items() if p.dist is not None}
        dependents: dict[str, list[Param]] = {}
        for p in self.params.values():
            if p.depends_on is not None:
                dependents.setdefault(p.depends_on, []).append(p)

        def case_size(p: Param, key: str) -> int | None:
            case = p.cases.get(key)
            return case.size() if isinstance(case, Dist) else 1

        for parent, deps in dependents.items():
            if parent in self.params:  # a sampled categorical: each choice brings its own cases
                choices = self.params[parent].dist.choices  # type: ignore[union-attr]
                per_choice = [_product(case_size(d, case_key(c)) for d in deps) for c in choices]
                sizes[parent] = None if None in per_choice else sum(per_choice)  # type: ignore[arg-type]
            else:
                key = case_key(base.get(parent))
                sizes[f"{parent}->"] = _product(case_size(d, key) for d in deps)
        return _product(sizes.values())

    def sample(self, trial: Any, base: dict[str, Any]) -> dict[str, Any]:
        """Draw this trial's values (``trial`` is an Optuna trial); ``base`` supplies parents that are not sampled."""
        values: dict[str, Any] = {}
        for p in self.params.values():
            if p.dist is not None:
                values[p.name] = p.dist.suggest(trial, p.name)
                continue
            assert p.depends_on is not None
            parent = values[p.depends_on] if p.depends_on in values else base.get(p.depends_on)
            key = case_key(parent)
            if key not in p.cases:
                raise SpaceError(f"space {self.source}: params.{p.name} has no case for {p.depends_on}={key}")
            case = p.cases[key]
            values[p.name] = case.suggest(trial, f"{p.name}.{key}") if isinstance(case, Dist) else case
        return values
