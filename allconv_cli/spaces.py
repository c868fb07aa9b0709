"""Search spaces: YAML files that say which :class:`~allconv_cli.config.TrainConfig` fields a search samples, how.

A space is data, so a study is reproducible from the file alone (it is logged with the study), and every key is
checked (against TrainConfig's own ranges) before a study starts. ``--space NAME`` finds
``./search_spaces/NAME.yaml`` (the user's own) before the shipped package data; the format and the reasons are in
docs/design.md. The parsed space is :class:`~allconv_cli.space_model.SearchSpace`. Imports neither torch nor optuna.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import yaml

from allconv_cli import space_files
from allconv_cli.config import FIELD_NAMES, FIELD_TYPES, SAMPLEABLE
from allconv_cli.config import spec as field_spec
from allconv_cli.space_files import SpaceError
from allconv_cli.space_model import Dist, Param, SearchSpace, case_key

__all__ = ["Dist", "Param", "SearchSpace", "SpaceError", "case_key", "coerce", "load", "load_path", "parse"]

SAMPLERS = ("tpe", "random", "grid")
TOP_KEYS = ("description", "sampler", "fixed", "params")
DIST_TYPES = ("float", "int", "categorical")
DIST_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
DEPENDENT_KEYS = ("depends_on", "cases")

FIXABLE = FIELD_NAMES


def _collapse_whitespace(text: str) -> str:
    return " ".join(str(text).split())


def _base_type(name: str) -> tuple[str, bool]:
    """``("float", False)`` for ``float``, ``("int", True)`` for ``int | None``."""
    kind = FIELD_TYPES[name]
    optional = kind.endswith("| None")
    return kind.split(" |")[0].strip(), optional


def coerce(name: str, value: Any) -> Any:
    """``value`` as the type of TrainConfig field ``name``; raises ValueError with the reason.

    YAML 1.1 reads ``1e-4`` (no dot) as a string, so numeric strings are accepted for numeric fields.
    """
    base, optional = _base_type(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} is true or false, not {value!r}")
    if base == "int":
        if isinstance(value, bool):
            raise ValueError(f"{name} is an integer, not {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{name} is an integer, not {value!r}")
    if base == "float":
        if isinstance(value, bool):
            raise ValueError(f"{name} is a number, not {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name} is a number, not {value!r}")
    if base == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"{name} is a string, not {value!r}")
    if base.startswith("tuple"):
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ValueError(f"{name} is a list of integers, not {value!r}")
    raise ValueError(f"{name} cannot be set in a search space")


# --------------------------------------------------------------------------------------------------------------------
# loading (space_files finds the file: ./search_spaces first, then the shipped ones)


def load_path(path: Path) -> SearchSpace:
    """The space in the file ``path``, validated."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpaceError(f"cannot read search space file {path}: {exc.strerror}") from None
    return parse(text, source=str(path), name=path.stem)


def load(name_or_path: str) -> SearchSpace:
    """The space ``--space`` names: ``./search_spaces/NAME.yaml``, a shipped NAME, or a path to a .yaml file."""
    return load_path(space_files.resolve(name_or_path))


# --------------------------------------------------------------------------------------------------------------------
# parsing and validation


def _unknown_key_message(where: str, key: Any, allowed: tuple[str, ...] | list[str], what: str = "key") -> str:
    hint = difflib.get_close_matches(str(key), list(allowed), n=1)
    did_you_mean = f" (did you mean {hint[0]}?)" if hint else ""
    return f"{where}: unknown {what} {key!r}{did_you_mean}: allowed are {', '.join(allowed)}"


def parse(text: str, *, source: str = "<string>", name: str = "custom") -> SearchSpace:
    """Parse and validate a space; every problem is a one-line :class:`SpaceError` naming ``source`` and the key."""
    where = f"space {source}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpaceError(f"{where}: not valid YAML{at}: {_collapse_whitespace(problem)}") from None
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
        if key not in FIXABLE:
            raise SpaceError(_unknown_key_message(f"{where}: fixed", key, FIXABLE, "hyperparameter"))
        try:
            out[key] = coerce(key, value)
        except ValueError as exc:
            raise SpaceError(f"{where}: fixed.{key}: {exc}") from None
        _check_value(f"{where}: fixed.{key}", key, out[key])
    return out


def _check_value(where: str, name: str, value: Any) -> None:
    """Let the field's own range judge one value (lr > 0, dropout in [0, 1), a known optimizer, ...): the same check
    TrainConfig makes, so a space cannot hold a value that only fails once a trial builds its config."""
    message = field_spec(name).check(name, value)
    if message:
        raise SpaceError(f"{where}: {message}")


def _parse_param(where: str, name: str, spec: Any) -> Param:
    at = f"{where}: params.{name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{at}: give a mapping such as {{type: float, low: 0.01, high: 0.5}} "
                         f"or {{type: categorical, choices: [...]}}")
    if "depends_on" in spec or "cases" in spec:
        parent = spec.get("depends_on")
        if parent not in FIELD_TYPES or parent == name:
            others = [f for f in FIXABLE if f != name]
            raise SpaceError(_unknown_key_message(f"{at}.depends_on", parent, others, "hyperparameter"))
        cases = spec.get("cases")
        if not isinstance(cases, dict) or not cases:
            raise SpaceError(f"{at}: depends_on needs cases: a mapping of {parent} value -> distribution or value")
        base = {k: v for k, v in spec.items() if k not in DEPENDENT_KEYS}
        parsed: dict[str, Dist | Any] = {}
        for raw_key, case in cases.items():
            try:
                parent_value = coerce(parent, raw_key)
            except ValueError as exc:
                raise SpaceError(f"{at}.cases.{raw_key}: {exc}") from None
            _check_value(f"{at}.cases.{raw_key}", parent, parent_value)  # a case no config can reach
            key = case_key(parent_value)
            if isinstance(case, dict):
                parsed[key] = _parse_dist(f"{at}.cases.{raw_key}", name, {**base, **case})
            else:
                if base:
                    raise SpaceError(f"{at}.cases.{raw_key}: a plain value cannot be combined with "
                                     f"{', '.join(base)} (give a mapping, or drop them)")
                try:
                    parsed[key] = coerce(name, case)
                except ValueError as exc:
                    raise SpaceError(f"{at}.cases.{raw_key}: {exc}") from None
                _check_value(f"{at}.cases.{raw_key}", name, parsed[key])
        return Param(name=name, depends_on=parent, cases=parsed)
    return Param(name=name, dist=_parse_dist(at, name, spec))


def _number(at: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpaceError(f"{at}.{key}: {value!r} is not a number")
    try:
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
    base, _ = _base_type(name)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{at}.choices: give a non-empty list of values")
        try:
            values = tuple(coerce(name, c) for c in choices)
        except ValueError as exc:
            raise SpaceError(f"{at}.choices: {exc}") from None
        if len(set(map(case_key, values))) != len(values):
            raise SpaceError(f"{at}.choices: {choices} has duplicates")
        for value in values:
            _check_value(f"{at}.choices", name, value)
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
