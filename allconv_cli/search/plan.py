"""What a study session is asked to do, decided once before anything is created, and handed to worker processes.

Torch-, Optuna- and MLflow-free: the CLI imports the pruner names and heartbeat defaults from here for ``--help``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allconv_cli import config, paper
from allconv_cli.errors import AllconvError

if TYPE_CHECKING:
    from allconv_cli.spaces import SearchSpace

PRUNERS = ("median", "hyperband", "none")
DEFAULT_PRUNER = "median"
DEFAULT_STORAGE_FILE = "optuna.db"
DEFAULT_HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats
DEFAULT_GRACE_PERIOD = 60  # seconds without a heartbeat after which a trial is retried
DEFAULT_MAX_RETRY = 3  # retries of a trial whose worker was lost
# SearchSettings.objective -> what the parent run's `objective` param says
OBJECTIVES = {
    "val_accuracy": "final validation accuracy (maximise)",
    "test_accuracy": "final test accuracy (maximise; the paper's protocol, selection on the test set)",
}


@dataclass(frozen=True)
class SearchSettings:
    """One study's plan: which space, which base config, how many trials, how to run them. Never changed."""

    study_name: str
    storage_url: str  # the full URL (a password too): never logged, only passed to workers in a 0600 file
    experiment: str  # where a new parent run goes (an existing one keeps its experiment)
    space_source: str
    space_name: str
    space_text: str
    base_config: dict[str, Any]  # TrainConfig fields before sampling: defaults < space fixed < command line
    trials: int  # target number of finished trials in the study
    pruner: str = DEFAULT_PRUNER
    seed: int = 0
    timeout: float | None = None  # seconds after the trials start in which new trials may start
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = DEFAULT_MAX_RETRY
    workers: int = 1
    run_tags: dict[str, str] = field(default_factory=dict)  # extra tags on the parent run and every trial run
    objective: str = "val_accuracy"  # or "test_accuracy": the paper's protocol, with no validation split
    wait_for_others: bool = True  # False: a worker returns "busy" instead of waiting on trials run elsewhere

    def space(self) -> SearchSpace:
        from allconv_cli import spaces

        return spaces.parse(self.space_text, source=self.space_source, name=self.space_name)


@dataclass(frozen=True)
class StudyRun:
    """What a session settled on once the study was open: its MLflow parent run, the experiment that run lives in
    (its children go there too), and the time after which no trial starts. Worker processes get it as JSON."""

    settings: SearchSettings
    parent_run_id: str
    experiment: str
    deadline: float | None = None  # time.time() after which no trial starts

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StudyRun:
        data = json.loads(text)
        return cls(**{**data, "settings": SearchSettings(**data["settings"])})


# --------------------------------------------------------------------------------------------------------------------
# names


def default_study_name(model: str, branch: str, space_name: str) -> str:
    return f"{paper.registry_name(model, branch)}-{space_name}"


def default_storage_url() -> str:
    return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"


def heartbeat_settings(interval: int | None = None, grace_period: int | None = None) -> dict[str, int]:
    """The heartbeat fields of :class:`SearchSettings`, defaults filled in; the grace period stays longer than one
    interval, or trials that are alive would be declared lost."""
    interval = interval or DEFAULT_HEARTBEAT_INTERVAL
    return {"heartbeat_interval": interval, "grace_period": max(grace_period or DEFAULT_GRACE_PERIOD, interval + 1)}


# --------------------------------------------------------------------------------------------------------------------
# the plan of `allconv search`


def parse_sets(overrides: Sequence[str]) -> dict[str, Any]:
    """``--set key=value``: the value is read as YAML (numbers, true/false, lists), then typed by the field."""
    import yaml


    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise AllconvError(f"--set {item!r}: write KEY=VALUE, e.g. --set lr_gamma=0.2")
        if key not in config.FIELD_NAMES:
            allowed = ", ".join(config.FIELD_NAMES)
            raise AllconvError(f"--set {item!r}: unknown hyperparameter {key!r}: allowed are {allowed}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
            out[key] = config.coerce(key, value)
        except (yaml.YAMLError, ValueError) as exc:
            raise AllconvError(f"--set {item!r}: {' '.join(str(exc).split())}") from None
    return out


def plan_search(space_name: str, options: dict[str, Any], given: Collection[str], overrides: Sequence[str], *,
                trials: int, storage_url: str | None, study_name: str | None, **settings: Any,
                ) -> tuple[SearchSettings, list[str]]:
    """The settings of ``allconv search`` from its option values, and the notes to print about them.

    The base config is TrainConfig's defaults < the space's fixed values < options given on the command line (or in
    the environment, as named in ``given``) < ``--set``. Every user error is raised here, before anything exists.
    ``settings`` are further :class:`SearchSettings` fields (experiment, pruner, workers, timeout, heartbeats).
    """
    from allconv_cli import spaces

    space = spaces.load(space_name)
    cli_values = {k: v for k, v in options.items() if k in config.FIELD_NAMES}
    explicit = {k for k in cli_values if k in given}
    sets = parse_sets(overrides)
    base = {**cli_values, **space.fixed, **{k: cli_values[k] for k in explicit}, **sets}
    notes = []
    for key in sorted((explicit | set(sets)) & set(space.params)):
        notes.append(f"{_flag(key, key in sets)} is ignored: the space {space.name} samples {key}")
    for key in sorted((explicit | set(sets)) & set(space.fixed)):
        if base[key] != space.fixed[key]:
            notes.append(f"{_flag(key, key in sets)} overrides the space's fixed {key}={space.fixed[key]!r}")
    base = config.TrainConfig(**base).to_dict()
    space.check_base(base)
    if base["val_size"] <= 0 and "val_size" not in space.params:
        raise AllconvError("a search selects on the validation split: pass --val-size > 0 (use --retrain-best to "
                           "train the winner on train+validation afterwards)")
    size = space.size(base)  # trials never repeat each other's values: more than this cannot run
    if size is not None and trials > size:
        if "trials" in given:
            what = "grid" if space.sampler == "grid" else "space"
            unit = ("point" if space.sampler == "grid" else "distinct configuration") + ("s" if size != 1 else "")
            notes.append(f"the {what} of {space.name} has {size} {unit}: the study runs {size} trials")
        trials = size
    settings.update(heartbeat_settings(settings.pop("heartbeat_interval", None), settings.pop("grace_period", None)))
    plan = SearchSettings(
        study_name=study_name or default_study_name(base["model"], base["branch"], space.name),
        storage_url=storage_url or default_storage_url(), space_source=space.source, space_name=space.name,
        space_text=space.text, base_config=base, trials=trials, seed=int(base["seed"]), **settings,
    )
    return plan, notes


def _flag(key: str, from_set: bool) -> str:
    return f"--set {key}" if from_set else config.option_flag(key)
