"""Search spaces: YAML files that say which :class:`~allconv_cli.config.TrainConfig` fields a search samples, and how.

A space is data, so a study is reproducible from the file alone (it is logged with the study), and every key is
checked against TrainConfig's own ranges before a study starts. Here: the parsed model (distributions, sampling,
size) and parsing with validation; where the files live: :mod:`allconv_cli.space_files`. Imports neither torch nor
optuna. The format: docs/design.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from allconv_cli.config import DATA_FIELDS, FIELD_NAMES, FIELD_TYPES, SAMPLEABLE, TrainConfig, coerce, field_type
from allconv_cli.config import spec as field_spec
from allconv_cli.errors import AllconvError
from allconv_cli.space_files import SpaceError, did_you_mean, resolve


def _product(sizes: Any) -> int | None:
    """The product of ``sizes``, None if one of them is None (countless)."""
    sizes = list(sizes)
    return None if None in sizes else math.prod(sizes)


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


SAMPLERS = ("tpe", "random", "grid")
TOP_KEYS = ("description", "sampler", "fixed", "params")
DIST_TYPES = ("float", "int", "categorical")
DIST_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
DEPENDENT_KEYS = ("depends_on", "cases")




def load_path(path: Path) -> SearchSpace:
    """The space in the file ``path``, validated."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpaceError(f"cannot read search space file {path}: {exc.strerror}") from None
    return parse(text, source=str(path), name=path.stem)


def load(name_or_path: str) -> SearchSpace:
    """The space ``--space`` names: ``./search_spaces/NAME.yaml``, a shipped NAME, or a path to a .yaml file."""
    return load_path(resolve(name_or_path))




def _unknown_key_message(where: str, key: Any, allowed: tuple[str, ...] | list[str], what: str = "key") -> str:
    return f"{where}: unknown {what} {key!r}{did_you_mean(str(key), list(allowed))}: allowed are {', '.join(allowed)}"


def parse(text: str, *, source: str = "<string>", name: str = "custom") -> SearchSpace:
    """Parse and validate a space; every problem is a one-line :class:`SpaceError` naming ``source`` and the key."""
    where = f"space {source}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpaceError(f"{where}: not valid YAML{at}: {' '.join(str(problem).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: the file must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpaceError(_unknown_key_message(where, key, TOP_KEYS))
    description = data.get("description") or ""
    if not isinstance(description, str) or "\n" in description.strip():
        raise SpaceError(f"{where}: description must be one line of text")
    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpaceError(f"{where}: sampler {sampler!r} is not allowed: use one of {', '.join(SAMPLERS)}")
    fixed = _parse_fixed(where, data.get("fixed") or {})
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise SpaceError(f"{where}: params must be a mapping of hyperparameter -> distribution")
    params: dict[str, Param] = {}
    for pname, spec in raw_params.items():
        if pname not in SAMPLEABLE:
            what = "hyperparameter" if pname not in FIELD_TYPES else "hyperparameter to sample"
            raise SpaceError(_unknown_key_message(f"{where}: params", pname, SAMPLEABLE, what))
        if pname in fixed:
            raise SpaceError(f"{where}: {pname} is both fixed and sampled: keep one of fixed.{pname}, params.{pname}")
        params[pname] = _parse_param(where, pname, spec)
    _check_dependencies(where, params, sampler)
    # parents before dependents (a parent is never itself dependent, see _check_dependencies)
    ordered = {n: p for n, p in params.items() if p.dist is not None}
    ordered.update({n: p for n, p in params.items() if p.dist is None})
    space = SearchSpace(name=name, source=source, text=text, description=description.strip(), sampler=sampler,
                        fixed=fixed, params=ordered)
    return space


def _parse_fixed(where: str, fixed: Any) -> dict[str, Any]:
    if not isinstance(fixed, dict):
        raise SpaceError(f"{where}: fixed must be a mapping of hyperparameter -> value")
    out: dict[str, Any] = {}
    for key, value in fixed.items():
        if key not in FIELD_NAMES:
            raise SpaceError(_unknown_key_message(f"{where}: fixed", key, FIELD_NAMES, "hyperparameter"))
        out[key] = _value(f"{where}: fixed.{key}", key, value)
    return out


def _check_value(where: str, name: str, value: Any) -> None:
    """Let the field's own range judge one value (lr > 0, dropout in [0, 1), a known optimizer, ...): the same check
    TrainConfig makes, so a space cannot hold a value that only fails once a trial builds its config."""
    message = field_spec(name).check(name, value)
    if message:
        raise SpaceError(f"{where}: {message}")


def _value(where: str, name: str, raw: Any) -> Any:
    """``raw`` as field ``name``'s type, and allowed by its range; one SpaceError line naming ``where`` otherwise."""
    try:
        value = coerce(name, raw)
    except ValueError as exc:
        raise SpaceError(f"{where}: {exc}") from None
    _check_value(where, name, value)
    return value


def _parse_param(where: str, name: str, spec: Any) -> Param:
    at = f"{where}: params.{name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{at}: give a mapping such as {{type: float, low: 0.01, high: 0.5}} "
                         f"or {{type: categorical, choices: [...]}}")
    if "depends_on" in spec or "cases" in spec:
        parent = spec.get("depends_on")
        if parent not in FIELD_TYPES or parent == name:
            others = [f for f in FIELD_NAMES if f != name]
            raise SpaceError(_unknown_key_message(f"{at}.depends_on", parent, others, "hyperparameter"))
        cases = spec.get("cases")
        if not isinstance(cases, dict) or not cases:
            raise SpaceError(f"{at}: depends_on needs cases: a mapping of {parent} value -> distribution or value")
        base = {k: v for k, v in spec.items() if k not in DEPENDENT_KEYS}
        parsed: dict[str, Dist | Any] = {}
        for raw_key, case in cases.items():
            where_case = f"{at}.cases.{raw_key}"
            key = case_key(_value(where_case, parent, raw_key))  # a case no config can reach is refused
            if isinstance(case, dict):
                parsed[key] = _parse_dist(where_case, name, {**base, **case})
            elif base:
                raise SpaceError(f"{where_case}: a plain value cannot be combined with {', '.join(base)} (give a "
                                 "mapping, or drop them)")
            else:
                parsed[key] = _value(where_case, name, case)
        return Param(name=name, depends_on=parent, cases=parsed)
    return Param(name=name, dist=_parse_dist(at, name, spec))


def _number(at: str, key: str, value: Any) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise SpaceError(f"{at}.{key}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise SpaceError(f"{at}.{key}: {value!r} is not a finite number")
    return number


def _parse_dist(at: str, name: str, spec: dict[str, Any]) -> Dist:
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in DIST_TYPES:
        raise SpaceError(f"{at}.type: {kind!r} is not allowed: use one of {', '.join(DIST_TYPES)}")
    for key in spec:
        if key not in DIST_KEYS[kind]:
            raise SpaceError(_unknown_key_message(f"{at} ({kind})", key, DIST_KEYS[kind]))
    base = field_type(name)[0].__name__
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{at}.choices: give a non-empty list of values")
        values = tuple(_value(f"{at}.choices", name, c) for c in choices)
        if len(set(map(case_key, values))) != len(values):
            raise SpaceError(f"{at}.choices: {choices} has duplicates")
        return Dist("categorical", choices=values)
    if base != kind:
        allowed = "categorical" if base not in ("int", "float") else f"{base} or categorical"
        raise SpaceError(f"{at}.type: {name} is {FIELD_TYPES[name]}, so type {kind} is not allowed: use {allowed}")
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{at}: {kind} needs low and high")
    low, high = _number(at, "low", spec["low"]), _number(at, "high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{at}.log: {log!r} is not true or false")
    step = _number(at, "step", spec["step"]) if spec.get("step") is not None else None
    if kind == "int":
        if not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
            raise SpaceError(f"{at}: int low, high and step must be whole numbers")
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    if low >= high:
        raise SpaceError(f"{at}: low {spec['low']} >= high {spec['high']}: low must be < high")
    if log and low <= 0:
        raise SpaceError(f"{at}.low: {spec['low']} with log: true: a log range needs low > 0")
    if step is not None and step <= 0:
        raise SpaceError(f"{at}.step: {spec['step']}: step must be > 0")
    if step is not None and log:
        raise SpaceError(f"{at}: step cannot be combined with log: true (Optuna does not support it)")
    for key, value in (("low", low), ("high", high)):
        _check_value(f"{at}.{key}", name, value)
    return Dist(kind, low=low, high=high, log=log, step=step)


def _check_dependencies(where: str, params: dict[str, Param], sampler: str) -> None:
    for p in params.values():
        if p.depends_on is None:
            if sampler == "grid" and p.dist is not None and p.dist.kind != "categorical":
                raise SpaceError(f"{where}: params.{p.name}: a grid needs every parameter as "
                                 f"{{type: categorical, choices: [...]}}, not type {p.dist.kind}")
            continue
        parent = params.get(p.depends_on)
        if parent is not None:
            if parent.dist is None or parent.dist.kind != "categorical":
                raise SpaceError(f"{where}: params.{p.name}.depends_on: {p.depends_on} must be a categorical "
                                 f"parameter (or not sampled), so that each of its values has a case")
            choices = [case_key(c) for c in parent.dist.choices]
            missing = [c for c in choices if c not in p.cases]
            extra = [c for c in p.cases if c not in choices]
            if missing:
                raise SpaceError(f"{where}: params.{p.name}.cases: no case for {p.depends_on}="
                                 f"{', '.join(missing)}: give one case per choice ({', '.join(choices)})")
            if extra:
                raise SpaceError(f"{where}: params.{p.name}.cases: {', '.join(extra)} is not a choice of "
                                 f"{p.depends_on}: the choices are {', '.join(choices)}")
        if sampler == "grid" and any(isinstance(c, Dist) for c in p.cases.values()):
            raise SpaceError(f"{where}: params.{p.name}: in a grid, dependent parameters can only have plain "
                             f"values per case (a grid is one fixed set of points)")
