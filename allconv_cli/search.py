"""``allconv search``: Optuna studies whose every trial is a tracked MLflow run.

How it fits together, and why:

* **Storage.** An Optuna study lives in a relational database (``RDBStorage``): by default the SQLite file
  ``optuna.db`` in the working directory, next to MLflow's ``mlflow.db``, so a search needs no setup; any SQLAlchemy URL
  (PostgreSQL for many hosts) works with ``--storage``. RDB storage is also what gives heartbeats: every running trial
  writes one every ``heartbeat_interval`` seconds, and a trial silent for ``grace_period`` is failed by the next worker
  that looks and re-queued (``RetryHeartbeatStaleTrialCallback``) with its params and its MLflow run id, so the retry
  starts from the dead run's last checkpoint.
* **Counting.** ``--trials`` is the number of *finished* trials the study should hold: complete + pruned + failed,
  where a failed trial that was re-queued (worker lost, or Ctrl-C) does not count, its retry does. Running and waiting
  trials are reserved budget, so a worker only asks for a new trial while finished + running + waiting < target,
  under a per-host file lock; that makes the total exact for any number of workers on one host. Several hosts racing
  for the last slot are settled after the fact: the trial whose number comes after the target is told FAIL, marked
  ``allconv.surplus`` and not counted. Running the same command again resumes the study up to ``--trials``.
* **Workers.** ``--workers 1`` runs trials in this process (with a live per-epoch view). ``--workers N`` starts N
  ``python -m allconv_cli search --worker PLAN`` processes in their own sessions (so a terminal Ctrl-C reaches only the
  launcher, which forwards exactly one SIGINT to each), restarts one that dies, assigns GPUs round-robin, and polls the
  storage for the live view. Each worker loads the dataset once and reuses it for every trial.
* **MLflow.** One parent run per study, found again through the study's user attribute ``allconv.parent_run_id`` (and,
  failing that, by the tags ``allconv.study_uid`` + ``allconv.role=study``); the launcher creates it before any worker
  starts, and hosts started independently settle on the first id written to the study. One child run per trial,
  created through :func:`allconv_cli.tracked_run.run_tracked` (params, per-epoch metrics, checkpoints), tagged with the
  trial number and its final state. The study summary (best params, all trials as CSV, plots) goes to the parent.
* **Selection.** The objective is the validation accuracy after the last epoch (held out of the training set); each
  epoch's validation accuracy is reported for pruning. The test set is evaluated once at the end of a finished trial
  (by the engine) and only recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from allconv_cli import paper, spaces, tracking
from allconv_cli.config import EXECUTION_FIELDS, TrainConfig
from allconv_cli.data import DataConfig, Dataset, load_dataset
from allconv_cli.engine import EpochMetrics, Hooks, resolve_device
from allconv_cli.errors import AllconvError
from allconv_cli.paper import registry_name
from allconv_cli.spaces import SearchSpace
from allconv_cli.tracked_run import RunOutcome, run_tracked

# Heartbeats, retries and the sampler's options are experimental in Optuna; we rely on them knowingly.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
# We drive heartbeats ourselves around ask/tell (see _Heartbeat), which Optuna warns about on every ask().
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)
# MLflow draws a tqdm bar for every checkpoint a retried trial downloads; it would tear the live view.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TAG = tracking.TAG
PARENT_ATTR = f"{TAG}parent_run_id"
UID_ATTR = f"{TAG}study_uid"
SPACE_SHA_ATTR = f"{TAG}space_sha"
SPACE_ATTR = f"{TAG}space"
BASE_ATTR = f"{TAG}base_config"
SURPLUS_ATTR = f"{TAG}surplus"
REASON_INTERRUPTED = "interrupted"
PRUNERS = ("median", "hyperband", "none")
DEFAULT_STORAGE_FILE = "optuna.db"
DEFAULT_HEARTBEAT_INTERVAL = 20
DEFAULT_GRACE_PERIOD = 60
DEFAULT_MAX_RETRY = 3
# How a run executes rather than what it learns: may differ between the invocations (and hosts) of one study.
# SearchSettings.objective -> what the parent run's `objective` param says
OBJECTIVES = {
    "val_accuracy": "final validation accuracy (maximise)",
    "test_accuracy": "final test accuracy (maximise; the paper's protocol, selection on the test set)",
}


@dataclass
class SearchSettings:
    """Everything a worker needs, resolved once by the launcher and handed to worker processes as JSON."""

    study_name: str
    storage_url: str  # the full URL (a password too): never logged, only passed to workers in a 0600 file
    experiment: str
    space_source: str
    space_name: str
    space_text: str
    base_config: dict[str, Any]  # TrainConfig fields before sampling: defaults < space fixed < command line
    trials: int  # target number of finished trials in the study
    pruner: str = "median"
    seed: int = 0
    deadline: float | None = None  # time.time() after which no trial starts
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int = DEFAULT_GRACE_PERIOD
    max_retry: int = DEFAULT_MAX_RETRY
    workers: int = 1
    parent_run_id: str | None = None
    explicit: list[str] = field(default_factory=list)  # base fields given on the command line
    # Hooks for `allconv reproduce` (defaults keep `allconv search` as it was):
    run_tags: dict[str, str] = field(default_factory=dict)  # extra tags on the parent run and every trial run
    objective: str = "val_accuracy"  # or "test_accuracy": the paper's protocol, with no validation split
    wait_for_others: bool = True  # False: Worker.run returns "busy" instead of waiting on trials run elsewhere

    def space(self) -> SearchSpace:
        return spaces.parse(self.space_text, source=self.space_source, name=self.space_name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SearchSettings:
        return cls(**json.loads(text))


# --------------------------------------------------------------------------------------------------------------------
# names, storage, sampler, pruner


def default_study_name(model: str, branch: str, space_name: str) -> str:
    return f"{registry_name(model, branch)}-{space_name}"


def default_storage_url() -> str:
    return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE_FILE}"


def safe_url(url: str) -> str:
    """The URL without its password, for tags, messages and the terminal."""
    try:
        import sqlalchemy

        parsed = sqlalchemy.engine.make_url(url)
        return parsed.render_as_string(hide_password=True) if parsed.password else url  # user:***@host
    except Exception:  # not a URL at all: there is no password to hide in it
        return url


def _normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; we ship psycopg 3, so use it when psycopg2 is absent."""
    import importlib.util

    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def open_storage(url: str, *, heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
                 grace_period: int = DEFAULT_GRACE_PERIOD, max_retry: int = DEFAULT_MAX_RETRY) -> RDBStorage:
    """An RDB storage with heartbeats; any problem (bad URL, no driver, no server) is one AllconvError line."""
    import sqlalchemy

    shown = safe_url(url)
    fix = "use e.g. sqlite:///optuna.db or postgresql://user:password@host/dbname"
    try:
        parsed = sqlalchemy.engine.make_url(_normalise_url(url))
    except Exception as exc:
        raise AllconvError(f"--storage {shown!r} is not a database URL ({_one_line(exc)}): {fix}") from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        # several local workers write to one file; wait for the lock instead of failing after 5 s
        engine_kwargs = {"connect_args": {"timeout": 120}}
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            if not folder.is_dir():
                raise AllconvError(f"cannot open the Optuna storage {shown}: folder {folder} does not exist")
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats: experimental, used knowingly
    for attempt in range(5):
        try:
            return RDBStorage(
                parsed.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=max_retry, inherit_intermediate_values=True
                ),
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Hosts starting together on a new database all create Optuna's tables; the losers of that race see
            # "duplicate key" / "already exists". The tables are there now: try again.
            if attempt == 4:
                raise AllconvError(f"cannot open the Optuna storage {shown}: {_one_line(exc)[:300]}") from None
            time.sleep(0.5 + attempt)
        except Exception as exc:
            raise AllconvError(f"cannot open the Optuna storage {shown}: {_one_line(exc)[:300]} ({fix})") from None
    raise AssertionError("unreachable")


def _one_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split()) if text else type(exc).__name__


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its ``study.stop()`` after the last point: that only works inside ``optimize()`` (we
    ask and tell), and the study's end is decided by counting trials anyway (the target is capped at the grid)."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        return None


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    if space.sampler == "grid":
        return _GridSampler(space.grid(), seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # group=True: TPE models each conditional branch (lr.sgd vs lr.adam) on the trials that have it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """``median``: never in the first 5 trials (they set the bar) nor in the first 10% of epochs (noisy start)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epochs // 10)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 27), max_resource=epochs,
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise AllconvError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")


def _sampler_seed(seed: int, worker: int, existing: int) -> int:
    """Distinct per worker and per resume: a reseeded sampler would otherwise replay the first trials' params."""
    return (seed * 1_000_003 + worker * 10_007 + existing * 101) % (2**31 - 1)


def load_study(settings: SearchSettings, storage: RDBStorage, worker: int = 0) -> optuna.Study:
    """The existing study with this worker's sampler and the pruner (Optuna keeps neither in the storage)."""
    space = settings.space()
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=storage)
    except KeyError:
        raise AllconvError(f"no study {settings.study_name!r} in {safe_url(settings.storage_url)}: "
                           f"run the search without --summarize first") from None
    study.sampler = make_sampler(space, _sampler_seed(settings.seed, worker, len(study.get_trials(deepcopy=False))))
    study.pruner = make_pruner(settings.pruner, int(settings.base_config["epochs"]))
    return study


def create_or_load_study(settings: SearchSettings, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it (the same command resumes it); returns ``(study, created_here)``.

    Exactly one process creates a study (the storage's unique name decides), and only it writes the study's identity
    (uid, space, base config); processes that lose the race wait for those, so hosts started together agree.
    Resuming with another space or other training options is refused: it would mix two experiments in one study.
    """
    space = settings.space()
    kwargs = {"sampler": make_sampler(space, settings.seed),
              "pruner": make_pruner(settings.pruner, int(settings.base_config["epochs"]))}
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="maximize", **kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=settings.study_name, storage=storage, **kwargs)
        created = False
    if study.direction != optuna.study.StudyDirection.MAXIMIZE or len(study.directions) != 1:
        raise AllconvError(f"study {settings.study_name!r} in {safe_url(settings.storage_url)} is not a maximised "
                           f"single-objective study (not an allconv study?): pick another --study-name")
    if created:
        study.set_user_attr(SPACE_ATTR, {"name": space.name, "source": space.source, "text": space.text})
        study.set_user_attr(BASE_ATTR, _comparable(settings.base_config, space))
        study.set_user_attr(UID_ATTR, os.urandom(8).hex())
        study.set_user_attr(SPACE_SHA_ATTR, space.sha)  # last: its presence means "identity complete"
    attrs = _wait_for_attr(study, SPACE_SHA_ATTR)
    if SPACE_SHA_ATTR not in attrs:  # the creator died before writing them: adopt the study
        study.set_user_attr(SPACE_ATTR, {"name": space.name, "source": space.source, "text": space.text})
        study.set_user_attr(BASE_ATTR, _comparable(settings.base_config, space))
        study.set_user_attr(UID_ATTR, attrs.get(UID_ATTR) or os.urandom(8).hex())
        study.set_user_attr(SPACE_SHA_ATTR, space.sha)
        attrs = study.user_attrs
    if not created and not study.get_trials(deepcopy=False) and (
            attrs.get(SPACE_SHA_ATTR) != space.sha or attrs.get(BASE_ATTR) != _comparable(settings.base_config, space)):
        # no trial yet, nothing to mix up: the command that fixes a mistake (say --val-size) takes the study over
        study.set_user_attr(SPACE_ATTR, {"name": space.name, "source": space.source, "text": space.text})
        study.set_user_attr(BASE_ATTR, _comparable(settings.base_config, space))
        study.set_user_attr(SPACE_SHA_ATTR, space.sha)
        attrs = study.user_attrs
    if attrs.get(SPACE_SHA_ATTR) != space.sha:
        old = attrs.get(SPACE_ATTR, {}).get("source", "another space")
        raise AllconvError(f"study {settings.study_name!r} was created with search space {old}, which differs from "
                           f"{space.source}: use the same --space, or another --study-name")
    old_base = attrs.get(BASE_ATTR, {})
    new_base = _comparable(settings.base_config, space)
    # a field the stored config lacks was added to TrainConfig later: at its default it changes nothing
    defaults = TrainConfig().to_dict()
    changed = sorted(
        k for k in set(old_base) | set(new_base) if old_base.get(k, defaults.get(k)) != new_base.get(k, defaults.get(k))
    )
    if changed:
        was = ", ".join(f"{k}={old_base.get(k)!r}" for k in changed)
        now = ", ".join(f"{k}={new_base.get(k)!r}" for k in changed)
        raise AllconvError(f"study {settings.study_name!r} was started with {was}; this command has {now}: rerun "
                           f"with the study's options or pick another --study-name")
    study.sampler = make_sampler(space, _sampler_seed(settings.seed, 0, len(study.get_trials(deepcopy=False))))
    return study, created


def _comparable(base: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The base-config values that change what a trial learns (so resuming with others would mix experiments)."""
    return {k: v for k, v in base.items() if k not in EXECUTION_FIELDS and k not in space.params}


def _wait_for_attr(study: optuna.Study, key: str, seconds: float = 60.0) -> dict[str, Any]:
    """The study's user attrs once ``key`` is there (written by the creating process), or after ``seconds``."""
    end = time.time() + seconds
    attrs = study.user_attrs
    while key not in attrs and time.time() < end:
        time.sleep(0.5)
        attrs = study.user_attrs
    return attrs


# --------------------------------------------------------------------------------------------------------------------
# counting trials


@dataclass
class Counts:
    finished: int = 0  # complete + pruned + failed, not counting failed trials that were re-queued
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    best_value: float | None = None
    best_number: int | None = None

    @property
    def reserved(self) -> int:
        return self.finished + self.running + self.waiting


def superseded(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that were re-queued (their retry carries them in ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def duplicate_retries(trials: Sequence[FrozenTrial]) -> set[int]:
    """Retries of a trial that already has a retry with a lower number (two hosts re-queued the same Ctrl-C'd trial
    at once): only the first one counts, a worker that pops a duplicate marks it surplus."""
    first: dict[int, int] = {}
    dups = set()
    for t in sorted(trials, key=lambda t: t.number):
        history = t.system_attrs.get("retry_history")
        if history:
            if history[-1] in first:
                dups.add(t.number)
            else:
                first[history[-1]] = t.number
    return dups


def _excluded(trials: Sequence[FrozenTrial]) -> tuple[set[int], set[int]]:
    return superseded(trials), duplicate_retries(trials)


def _counted(t: FrozenTrial, excluded: tuple[set[int], set[int]]) -> bool:
    """Does ``t`` take a place among the study's ``--trials``? Not when surplus, a duplicate retry, or a failed trial
    whose retry takes its place."""
    gone, dups = excluded
    if t.user_attrs.get(SURPLUS_ATTR) or t.number in dups:
        return False
    return not (t.state == TrialState.FAIL and t.number in gone)


def count_trials(trials: Sequence[FrozenTrial]) -> Counts:
    excluded = _excluded(trials)
    c = Counts()
    for t in trials:
        if not _counted(t, excluded):
            continue
        if t.state == TrialState.COMPLETE:
            c.complete += 1
            if t.value is not None and (c.best_value is None or t.value > c.best_value):
                c.best_value, c.best_number = t.value, t.number
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
    c.finished = c.complete + c.pruned + c.failed
    return c


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue trials failed by Ctrl-C (as the heartbeat callback does for lost workers): same params, same MLflow
    run id to resume from, and ``retry_history`` so the failed one stops counting."""
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    requeued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.user_attrs.get("reason") != REASON_INTERRUPTED or t.number in gone:
            continue
        system_attrs = {"failed_trial": t.number, **t.system_attrs}
        system_attrs["retry_history"] = [*t.system_attrs.get("retry_history", ()), t.number]
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=t.params, distributions=t.distributions,
            user_attrs={k: v for k, v in t.user_attrs.items() if k != "reason"}, system_attrs=system_attrs,
            intermediate_values=dict(t.intermediate_values),
        ))
        requeued.append(t.number)
    return requeued


@contextlib.contextmanager
def host_lock(settings: SearchSettings) -> Iterator[None]:
    """Serialise 'count, then ask' among the workers of this host, which makes the trial total exact."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the surplus check after asking still keeps the count right
        yield
        return
    import hashlib

    key = hashlib.sha256(f"{settings.storage_url}\0{settings.study_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"allconv-search-{key}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------------
# data


class DataCache:
    """The dataset of the last config, on its device: loaded once per worker, reused by every trial that needs it."""

    def __init__(self) -> None:
        self.key: tuple[DataConfig, Any] | None = None
        self.data: Dataset | None = None

    def get(self, cfg: TrainConfig) -> Dataset:
        key = (cfg.data_config(), resolve_device(cfg.device))
        if key != self.key or self.data is None:
            self.data = None  # free the old one first
            self.data = load_dataset(key[0]).to(key[1], channels_last=True)
            self.key = key
        return self.data


# --------------------------------------------------------------------------------------------------------------------
# MLflow parent run


def _run_alive(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        run = tracking.retrying(tracking.client().get_run, run_id)
    except Exception:
        return False
    return run.info.lifecycle_stage == "active"


def ensure_parent_run(study: optuna.Study, settings: SearchSettings, space: SearchSpace, creator: bool = True) -> str:
    """The study's one parent run: the one recorded on the study, else the one tagged for it, else a new one.

    The process that created the study creates the parent (before any worker of it starts); processes that only
    loaded the study wait for its id. If the recorded run is gone (deleted), racing processes each write one and
    re-read: the last write wins and the losers delete theirs.
    """
    stored = study.user_attrs.get(PARENT_ATTR)
    if stored is None and not creator:
        stored = _wait_for_attr(study, PARENT_ATTR).get(PARENT_ATTR)
    if _run_alive(stored):
        return stored
    mlc = tracking.client()
    exp_id = tracking.experiment_id(settings.experiment)
    uid = study.user_attrs.get(UID_ATTR, "")
    found = tracking.retrying(
        mlc.search_runs, [exp_id],
        filter_string=f"tags.`{TAG}study_uid` = '{uid}' and tags.`{TAG}role` = 'study'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    created = not found
    run_id = found[0].info.run_id if found else _create_parent(exp_id, study, settings, space)
    study.set_user_attr(PARENT_ATTR, run_id)
    if not creator or stored is not None:
        time.sleep(0.5)  # others may be writing theirs right now: settle on the last write
    winner = study.user_attrs.get(PARENT_ATTR, run_id)
    if created and winner != run_id:
        with contextlib.suppress(Exception):
            mlc.delete_run(run_id)
    return winner


def _create_parent(exp_id: str, study: optuna.Study, settings: SearchSettings, space: SearchSpace) -> str:
    from mlflow.entities import Param

    base = settings.base_config
    model, branch = str(base["model"]).upper(), str(base["branch"])
    tags = {
        f"{TAG}role": "study",
        f"{TAG}study_name": settings.study_name,
        f"{TAG}study_uid": study.user_attrs.get(UID_ATTR, ""),
        f"{TAG}storage": safe_url(settings.storage_url),
        f"{TAG}space": space.name,
        f"{TAG}space_sha": space.sha,
        f"{TAG}sampler": space.sampler,
        f"{TAG}pruner": settings.pruner,
        f"{TAG}model": model,
        f"{TAG}branch": branch,
        f"{TAG}network": registry_name(model, branch),
        f"{TAG}dataset": str(base["dataset"]),
        "mlflow.note.content": f"Optuna study {settings.study_name}: {space.description or space.source}",
        **settings.run_tags,
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    mlc = tracking.client()
    run = tracking.retrying(mlc.create_run, exp_id, tags=tags, run_name=settings.study_name)
    run_id = run.info.run_id
    fixed = TrainConfig(**base).to_params()
    params = [Param(k, v[:6000]) for k, v in fixed.items() if k not in space.params]
    params.append(Param("objective", OBJECTIVES[settings.objective]))
    for i in range(0, len(params), 100):
        tracking.retrying(mlc.log_batch, run_id, params=params[i : i + 100])
    tracking.retrying(mlc.log_text, run_id, space.text, "space.yaml")
    entry = paper.TABLE3.get((model, branch))
    if entry is not None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        tracking.retrying(mlc.log_batch, run_id, metrics=[
            Metric("paper_test_error", entry.error, now, 0), Metric("paper_2020_test_error", entry.error_2020, now, 0),
        ])
    return run_id


def _set_tags(run_id: str | None, tags: dict[str, str]) -> None:
    if not run_id:
        return
    from mlflow.entities import RunTag

    with contextlib.suppress(Exception):
        tracking.retrying(tracking.client().log_batch, run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])


# --------------------------------------------------------------------------------------------------------------------
# live view


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class SearchView(Hooks):
    """A study bar (done / running / pruned / failed, best so far) and, in-process, the running trial's epochs."""

    def __init__(self, console: Console, study_name: str, target: int, trials: Sequence[FrozenTrial]) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=console,
        )
        self.study_task = self.progress.add_task(f"study {study_name}", total=target, stats="")
        self.trial_task: Any = None
        self.reported = {t.number for t in trials if t.state.is_finished()}
        self.update(trials)

    def __enter__(self) -> SearchView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, trials: Sequence[FrozenTrial]) -> Counts:
        c = count_trials(trials)
        best = "-" if c.best_value is None else f"{100 * c.best_value:.2f}% (trial {c.best_number})"
        stats = f"running {c.running}  pruned {c.pruned}  failed {c.failed}  best val {best}"
        self.progress.update(self.study_task, completed=min(c.finished, self.progress.tasks[0].total or 0),
                             stats=stats)
        gone = superseded(trials)
        for t in sorted(trials, key=lambda t: t.number):
            if t.state.is_finished() and t.number not in self.reported:
                self.reported.add(t.number)
                self.progress.console.print(trial_line(t, retried=t.number in gone), highlight=False)
        return c

    def start_trial(self, number: int, epochs: int) -> None:
        if self.trial_task is None:
            self.trial_task = self.progress.add_task(f"  trial {number}", total=epochs, stats="")
        else:
            self.progress.reset(self.trial_task, total=epochs, description=f"  trial {number}", stats="")

    def on_start(self, cfg: TrainConfig, model: object, start_epoch: int) -> None:
        if self.trial_task is not None:
            self.progress.update(self.trial_task, total=cfg.epochs, completed=start_epoch,
                                 stats="resumed" if start_epoch else "")

    def on_epoch_end(self, m: EpochMetrics) -> None:
        if self.trial_task is not None:
            val = "-" if m.val_accuracy is None else f"{100 * m.val_accuracy:.2f}%"
            self.progress.update(self.trial_task, completed=m.epoch,
                                 stats=f"loss {m.train_loss:.3f}  val {val}  {m.images_per_second:,.0f} img/s")


def trial_line(t: FrozenTrial, retried: bool = False) -> str:
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(
        t.state, t.state.name.lower())
    value = "" if t.value is None else f"val {100 * t.value:6.2f}%  "
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    reason = t.user_attrs.get("reason", "") or ("worker lost" if t.state == TrialState.FAIL else "")
    if retried:
        reason = f"{reason}; re-queued" if reason else "re-queued"
    return f"trial {t.number:>3} {state:<8} {value}{params}" + (f"  ({reason})" if reason else "")


# --------------------------------------------------------------------------------------------------------------------
# a worker: ask, train, tell


class _Heartbeat:
    """Records the trial's heartbeat now and every ``interval`` s, from a thread (as Optuna's optimize() does)."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> _Heartbeat:
        with contextlib.suppress(Exception):
            self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class _TrialHooks(Hooks):
    """Report each epoch's validation accuracy to Optuna and stop the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        if metrics.val_accuracy is not None:
            self.trial.report(metrics.val_accuracy, metrics.epoch)

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        if metrics.val_accuracy is not None and self.trial.should_prune():
            return "pruned"
        return None


class Worker:
    """One trial at a time until the study holds ``settings.trials`` finished trials (or the deadline passes)."""

    def __init__(self, settings: SearchSettings, study: optuna.Study, storage: RDBStorage, console: Console,
                 view: SearchView | None = None, data: DataCache | None = None) -> None:
        self.settings = settings
        self.study = study
        self.storage = storage
        self.console = console
        self.view = view
        self.space = settings.space()
        self.base = dict(settings.base_config)
        self.data = data if data is not None else DataCache()
        self.poll = max(0.5, min(2.0, settings.heartbeat_interval / 2))
        self.who = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> str:
        """Returns ``done``, ``timeout``, ``interrupted``, or ``busy`` (``wait_for_others=False``, all trials taken)."""
        try:
            if not self.space.varies_data:
                self.data.get(TrainConfig(**self.base))  # data errors surface before any trial is created
            waited = False
            while True:
                if self.settings.deadline is not None and time.time() >= self.settings.deadline:
                    return "timeout"
                optuna.storages.fail_stale_trials(self.study)
                trial = self._next_trial()
                if trial == "done":
                    return "done"
                if trial is None:
                    if not self.settings.wait_for_others:
                        return "busy"
                    if not waited and self.view is not None:
                        self.console.print("waiting for trials still running elsewhere (a lost worker's trial is "
                                           f"retried {self.settings.grace_period} s after its last heartbeat)")
                    waited = True
                    time.sleep(self.poll)
                    continue
                waited = False
                status = self._run_trial(trial)
                if self.view is not None:
                    self.view.update(self.study.get_trials(deepcopy=False))
                if status == "interrupted":
                    return "interrupted"
        except KeyboardInterrupt:
            return "interrupted"

    def _next_trial(self) -> optuna.Trial | str | None:
        target = self.settings.trials
        with host_lock(self.settings):
            c = count_trials(self.study.get_trials(deepcopy=False))
            if c.waiting == 0 and c.reserved >= target:
                return "done" if c.running == 0 else None
            with warnings.catch_warnings():  # "heartbeat is meant for optimize()": we beat ourselves
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(trial._trial_id)  # a RUNNING trial always has a heartbeat row
        trials = self.study.get_trials(deepcopy=False)
        mine = next(t for t in trials if t.number == trial.number)
        excluded = _excluded(trials)
        reason = ""
        if trial.number in excluded[1]:
            reason = "surplus: a duplicate retry (another process re-queued the same trial)"
        elif not mine.system_attrs.get("retry_history"):
            ahead = sum(1 for t in trials if t.number < trial.number and _counted(t, excluded))
            if ahead >= target:  # another host took the last slot at the same moment
                reason = f"surplus: the study already had {ahead} trials when this one was created"
        if reason:
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr("reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        return trial

    def _run_trial(self, trial: optuna.Trial) -> str:
        """Train one trial as an MLflow child run and tell Optuna how it ended; returns the trial's state."""
        run: dict[str, str] = {}
        try:
            with _Heartbeat(self.storage, trial._trial_id, self.settings.heartbeat_interval):
                return self._train_trial(trial, run)
        except KeyboardInterrupt:
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=REASON_INTERRUPTED)
            return "interrupted"
        except AllconvError as exc:  # a user error (data, config): every further trial would fail the same way
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=str(exc))
            raise
        except Exception as exc:  # this trial's problem (e.g. out of memory): record it, the study goes on
            reason = f"{type(exc).__name__}: {_one_line(exc)}"
            self._finish(trial, run.get("id"), TrialState.FAIL, reason=reason)
            self.console.print(f"trial {trial.number} failed: {reason}", highlight=False)
            return "failed"

    def _train_trial(self, trial: optuna.Trial, run: dict[str, str]) -> str:
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        history = list(frozen.system_attrs.get("retry_history", ()))
        retry_of = history[0] if history else None
        previous_run = frozen.user_attrs.get("mlflow_run_id") if history else None
        trial.set_user_attr("worker", self.who)
        if history:
            trial.set_user_attr("retry_of", retry_of)
            trial.set_user_attr("reason", "")
        values = self.space.sample(trial, self.base)
        cfg = TrainConfig(**{**self.base, **values})
        data = self.data.get(cfg)
        tags = {
            f"{TAG}role": "trial",
            f"{TAG}study_name": self.settings.study_name,
            f"{TAG}study_uid": self.study.user_attrs.get(UID_ATTR, ""),
            f"{TAG}trial_number": str(trial.number),
            f"{TAG}trial_state": "running",
            f"{TAG}sampled": json.dumps(trial.params),
            f"{TAG}worker": self.who,
            **self.settings.run_tags,
        }
        if retry_of is not None:
            tags[f"{TAG}retry_of"] = str(retry_of)

        def created(run_id: str) -> None:
            run["id"] = run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            if previous_run:
                _close_lost_run(previous_run, run_id, trial.number)

        if self.view is not None:
            self.view.start_trial(trial.number, cfg.epochs)
        hooks: list[Hooks] = [_TrialHooks(trial)] + ([self.view] if self.view is not None else [])
        outcome = run_tracked(
            cfg, experiment=self.settings.experiment, run_name=f"trial-{trial.number:03d}",
            parent_run_id=self.settings.parent_run_id, tags=tags, checkpoint_from_run=previous_run,
            restart_on_bad_checkpoint=True, hooks=hooks, data=data, log_model=False, on_run_created=created,
        )
        if outcome.resumed_from_epoch:
            _set_tags(outcome.run_id, {f"{TAG}resumed_from_epoch": str(outcome.resumed_from_epoch)})
        result = outcome.result
        if result.status == "finished":
            value = result.test_accuracy if self.settings.objective == "test_accuracy" else result.val_accuracy
            if value is None or not math.isfinite(value):
                what = "test" if self.settings.objective == "test_accuracy" else "validation"
                return self._finish(trial, outcome.run_id, TrialState.FAIL, reason=f"no {what} accuracy")
            return self._finish(trial, outcome.run_id, TrialState.COMPLETE, value=value)
        if result.status == "pruned":
            reason = f"pruned by the {self.settings.pruner} pruner after epoch {result.epochs_completed}"
            return self._finish(trial, outcome.run_id, TrialState.PRUNED, reason=reason)
        if result.status in ("diverged", "collapsed"):  # NaN loss, or dead ReLUs (constant output)
            # pruned, not failed: TPE then learns that this region is bad instead of ignoring the trial
            reason = f"{result.status}: {result.reason}"
            return self._finish(trial, outcome.run_id, TrialState.PRUNED, reason=reason)
        if result.status == "interrupted":
            self._finish(trial, outcome.run_id, TrialState.FAIL, reason=REASON_INTERRUPTED)
            return "interrupted"
        return self._finish(trial, outcome.run_id, TrialState.FAIL, reason=f"{result.status}: {result.reason}")

    def _finish(self, trial: optuna.Trial, run_id: str | None, state: TrialState, *, value: float | None = None,
                reason: str = "") -> str:
        """Tell Optuna, then mirror the state on the MLflow run. A trial already failed by another worker (its
        heartbeat went stale while it still ran) keeps that state; its retry owns the result."""
        with contextlib.suppress(Exception):
            trial.set_user_attr("reason", reason)
        with contextlib.suppress(Exception):
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value, skip_if_finished=True)
            else:
                self.study.tell(trial, state=state, skip_if_finished=True)
        stored = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if stored.state.is_finished() and stored.state != state:
            state = stored.state
            reason = "declared lost (no heartbeat within the grace period) while still running; a retry replaces it"
        elif not stored.state.is_finished():  # the storage refused the result: it stays RUNNING until it goes stale
            state, reason = TrialState.FAIL, "its result could not be written to the Optuna storage"
        name = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(state, "failed")
        tags = {f"{TAG}trial_state": name}
        if reason and reason != REASON_INTERRUPTED:  # the engine's own reason says more (which epoch)
            tags[f"{TAG}reason"] = reason
        _set_tags(run_id, tags)
        return name


def _close_lost_run(lost_run: str, new_run: str, trial_number: int) -> None:
    """The run of a dead worker is still RUNNING in MLflow: mark it failed and point to its retry."""
    with contextlib.suppress(Exception):
        run = tracking.retrying(tracking.client().get_run, lost_run)
        if run.info.status == "RUNNING":
            tracking.mark_failed(lost_run, f"worker lost; retried as trial {trial_number} in run {new_run}")
            _set_tags(lost_run, {f"{TAG}trial_state": "failed"})
        _set_tags(lost_run, {f"{TAG}retried_as": new_run})


# --------------------------------------------------------------------------------------------------------------------
# launching


def run_search(settings: SearchSettings, study: optuna.Study, storage: RDBStorage, console: Console,
               data: DataCache | None = None) -> str:
    """Run trials until the study is done; returns ``done``, ``timeout`` or ``interrupted``."""
    view = SearchView(console, settings.study_name, settings.trials, study.get_trials(deepcopy=False))
    with view:
        if settings.workers <= 1:
            return Worker(settings, study, storage, console, view, data).run()
        return _run_worker_processes(settings, study, view, console)


def _gpu_assignment(settings: SearchSettings) -> list[str | None]:
    """CUDA devices round-robin over the workers (None: leave CUDA_VISIBLE_DEVICES alone)."""
    if str(settings.base_config.get("device", "auto")) not in ("auto", "cuda"):
        return [None] * settings.workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if not devices:
        return [None] * settings.workers
    return [devices[i % len(devices)] for i in range(settings.workers)]


def _run_worker_processes(settings: SearchSettings, study: optuna.Study, view: SearchView, console: Console) -> str:
    folder = Path(tempfile.mkdtemp(prefix="allconv-search-"))
    plan = folder / "plan.json"
    plan.touch(mode=0o600)
    plan.write_text(settings.to_json())
    gpus = _gpu_assignment(settings)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus[i] is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        elif "OMP_NUM_THREADS" not in env:  # CPU workers: share the cores instead of each taking all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.workers))
        log = open(folder / f"worker-{i}.log", "ab")  # noqa: SIM115 (the child owns it; closed when we exit)
        cmd = [sys.executable, "-m", "allconv_cli", "search", "--worker", str(plan), "--worker-index", str(i)]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    procs = {i: spawn(i) for i in range(settings.workers)}
    restarts_left, errors, interrupted = settings.workers, [], False
    try:
        while procs:
            time.sleep(1.0)
            c = view.update(study.get_trials(deepcopy=False))
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del procs[i]
                if code in (0, 130):
                    continue
                log = folder / f"worker-{i}.log"
                if code == 2:
                    errors.append(_last_line(log))
                    continue
                done = c.waiting == 0 and c.reserved >= settings.trials and c.running == 0
                late = settings.deadline is not None and time.time() >= settings.deadline
                console.print(f"worker {i} (pid {proc.pid}) exited with {code}; log: {log}", highlight=False)
                if restarts_left > 0 and not done and not late and not errors:
                    restarts_left -= 1
                    procs[i] = spawn(i)
                    console.print(f"restarted worker {i} (pid {procs[i].pid})", highlight=False)
    except KeyboardInterrupt:
        interrupted = True
        console.print("Interrupted: checkpointing the running trials...")
        for proc in procs.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
        _wait_all(list(procs.values()), view, study)
    view.update(study.get_trials(deepcopy=False))
    if errors:
        raise AllconvError(errors[0].removeprefix("Error: "))
    if restarts_left == settings.workers:  # nothing went wrong: the logs are not needed
        shutil.rmtree(folder, ignore_errors=True)
    if interrupted:
        return "interrupted"
    c = count_trials(study.get_trials(deepcopy=False))
    return "done" if c.finished >= settings.trials else "timeout"


def _wait_all(procs: list[subprocess.Popen[bytes]], view: SearchView, study: optuna.Study,
              timeout: float = 300.0) -> None:
    end = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.time() < end:
            time.sleep(0.5)
            view.update(study.get_trials(deepcopy=False))
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.kill()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"a worker failed (no log at {path})"
    return lines[-1] if lines else f"a worker failed (empty log {path})"


def run_worker_process(plan_path: str, index: int) -> int:
    """Entry point of ``allconv search --worker PLAN``: one worker process of a ``--workers N`` search."""
    # The launcher forwards Ctrl-C as SIGINT; a launcher started in the background (SIGINT ignored) must not pass
    # that on to its workers, or they could never be interrupted cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = SearchSettings.from_json(Path(plan_path).read_text())
    storage = open_storage(settings.storage_url, heartbeat_interval=settings.heartbeat_interval,
                           grace_period=settings.grace_period, max_retry=settings.max_retry)
    study = load_study(settings, storage, worker=index + 1)
    console = Console(width=160)
    status = Worker(settings, study, storage, console).run()
    console.print(f"worker {index} (pid {os.getpid()}): {status}")
    return 130 if status == "interrupted" else 0


def preload_data(settings: SearchSettings, cache: DataCache | None = None) -> None:
    """Load the data in the launcher before the study is touched: a data error (no CIFAR there, --val-size too
    large) is reported before a study or a parent run exists, and the ZCA fit lands in its disk cache once instead
    of N workers fitting it at the same time. With ``cache`` (in-process trials) the loaded data is kept for them."""
    space = settings.space()
    if not space.varies_data:
        cfg = TrainConfig(**settings.base_config)
        if cache is not None:
            cache.get(cfg)
        else:
            load_dataset(cfg.data_config())


def open_parent(run_id: str) -> None:
    mlc = tracking.client()
    with contextlib.suppress(Exception):
        tracking.retrying(mlc.update_run, run_id, status="RUNNING")
    _set_tags(run_id, {f"{TAG}study_state": "running"})


def close_parent(run_id: str, status: str, settings: SearchSettings) -> None:
    state = {"done": "complete", "timeout": "incomplete", "interrupted": "interrupted"}.get(status, status)
    _set_tags(run_id, {f"{TAG}study_state": state, f"{TAG}target_trials": str(settings.trials)})
    with contextlib.suppress(Exception):
        tracking.retrying(tracking.client().set_terminated, run_id, "KILLED" if status == "interrupted" else "FINISHED")


# --------------------------------------------------------------------------------------------------------------------
# the summary on the parent run


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_config(trial: FrozenTrial) -> TrainConfig | None:
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return None
    try:
        return TrainConfig.from_params(tracking.retrying(tracking.client().get_run, run_id).data.params)
    except Exception:
        return None


def summarize(study: optuna.Study, settings: SearchSettings, console: Console) -> dict[str, Any]:
    """Best params (JSON + tags), metrics, every trial as CSV and the plots, logged to the parent run."""
    from mlflow.entities import Metric, RunTag

    parent = settings.parent_run_id
    space = settings.space()
    trials = study.get_trials(deepcopy=False)
    c = count_trials(trials)
    best = best_trial(study)
    summary: dict[str, Any] = {
        "study_name": settings.study_name, "storage": safe_url(settings.storage_url), "space": space.name,
        "target_trials": settings.trials, "finished": c.finished, "complete": c.complete, "pruned": c.pruned,
        "failed": c.failed, "running": c.running, "parent_run_id": parent, "best": None,
    }
    mlc = tracking.client()
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(getattr(c, k)), now, c.finished) for k in ("complete", "pruned", "failed")]
    metrics = [Metric(f"n_{m.key}", m.value, m.timestamp, m.step) for m in metrics]
    tags: list[RunTag] = []
    if best is not None:
        cfg = best_config(best)
        config = {k: getattr(cfg, k) for k in space.params} if cfg is not None else dict(best.params)
        run_id = best.user_attrs.get("mlflow_run_id")
        test_acc = None
        if run_id:
            with contextlib.suppress(Exception):
                test_acc = tracking.retrying(mlc.get_run, run_id).data.metrics.get("test_accuracy")
        summary["best"] = {"trial": best.number, "val_accuracy": best.value, "test_accuracy": test_acc,
                           "params": dict(best.params), "config": config, "mlflow_run_id": run_id}
        metrics.append(Metric("best_val_accuracy", float(best.value), now, c.finished))
        if test_acc is not None:
            metrics.append(Metric("best_trial_test_accuracy", float(test_acc), now, c.finished))
            metrics.append(Metric("best_trial_test_error", 100.0 * (1.0 - float(test_acc)), now, c.finished))
        tags += [RunTag(f"{TAG}best_trial", str(best.number)), RunTag(f"{TAG}best_run_id", str(run_id))]
        tags += [RunTag(f"best.{k}", str(v)[:5000]) for k, v in config.items()]
    if parent:
        tracking.retrying(mlc.log_batch, parent, metrics=metrics, tags=tags)
        with tempfile.TemporaryDirectory(prefix="allconv-summary-") as tmp:
            folder = Path(tmp)
            (folder / "best_params.json").write_text(json.dumps(summary, indent=2, default=str))
            with contextlib.suppress(Exception):
                study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "datetime_start",
                                              "datetime_complete", "duration")).to_csv(folder / "trials.csv",
                                                                                      index=False)
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna's plot/importance chatter about small studies
                    notes = _plots(study, folder)
            finally:
                optuna.logging.set_verbosity(verbosity)
            for note in notes:
                console.print(f"note: {note}", highlight=False)
            tracking.retrying(mlc.log_artifacts, parent, str(folder), "summary")
    return summary


def _plots(study: optuna.Study, folder: Path) -> list[str]:
    """PNG plots with matplotlib (no plotly); returns notes for the plots that were skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def save(name: str, draw: Any) -> None:
        try:
            ax = draw()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
        except Exception as exc:
            notes.append(f"{name} skipped: {_one_line(exc)}")
        finally:
            plt.close("all")

    save("optimization_history.png", lambda: ovm.plot_optimization_history(study, target_name="val accuracy"))
    save("intermediate_values.png", lambda: ovm.plot_intermediate_values(study))
    note = ""
    if len(complete) < 2:
        note = f"parameter importances need at least 2 complete trials (the study has {len(complete)})"
    elif not study.best_trial.params:
        note = "parameter importances: the space samples no parameter"
    else:
        try:
            importances = optuna.importance.get_param_importances(study)
        except Exception as exc:
            importances, note = {}, f"parameter importances could not be computed: {_one_line(exc)}"
        if importances:
            fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(importances)))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names], color="tab:blue")
            ax.set_xlabel("importance for val accuracy (PED-ANOVA, normalised)")
            ax.set_title(f"Parameter importances ({len(complete)} complete trials)")
            fig.tight_layout()
            fig.savefig(folder / "param_importances.png", dpi=110)
            plt.close(fig)
            (folder / "param_importances.json").write_text(json.dumps(importances, indent=2))
        elif not note:
            note = "parameter importances: no parameter varies across the complete trials"
    if note:
        (folder / "param_importances.txt").write_text(note + "\n")
        notes.append(note)
    return notes


def summary_table(summary: dict[str, Any], settings: SearchSettings) -> Table:
    table = Table(title=f"allconv search: {settings.study_name}", show_header=False)
    rows = [
        ("storage", summary["storage"]),
        ("space", f"{summary['space']} ({settings.space_source})"),
        ("trials", f"{summary['finished']} of {summary['target_trials']} finished: {summary['complete']} complete, "
                   f"{summary['pruned']} pruned, {summary['failed']} failed"
                   + (f", {summary['running']} still running" if summary["running"] else "")),
    ]
    best = summary.get("best")
    if best:
        test = best["test_accuracy"]
        rows += [
            ("best trial", f"{best['trial']} (run {best['mlflow_run_id']})"),
            ("best val accuracy", f"{100 * best['val_accuracy']:.2f}%"),
            ("its test error", "-" if test is None else f"{100 * (1 - test):.2f}% (recorded, never used to select)"),
            ("best config", "  ".join(f"{k}={_fmt(v)}" for k, v in best["config"].items()) or "-"),
        ]
    entry = paper.TABLE3.get((str(settings.base_config["model"]).upper(), str(settings.base_config["branch"])))
    if entry is not None:
        rows.append(("paper test error", f"{entry.error:.2f}% ({entry.display_name}, full CIFAR-10, 350 epochs)"))
    rows.append(("MLflow parent run", str(summary["parent_run_id"])))
    for key, value in rows:
        table.add_row(key, value)
    return table


# --------------------------------------------------------------------------------------------------------------------
# retraining the winner


def retrain_best(study: optuna.Study, settings: SearchSettings, console: Console,
                 final_epochs: int | None = None) -> RunOutcome | None:
    """Train the best trial's config on train + validation (val_size=0) for the full schedule; test once."""
    from allconv_cli.progress import RichProgress

    best = best_trial(study)
    if best is None:
        raise AllconvError(f"study {settings.study_name!r} has no complete trial yet: nothing to retrain")
    cfg = best_config(best)
    if cfg is None:
        raise AllconvError(f"the best trial {best.number} has no readable MLflow run: cannot rebuild its config")
    device = settings.base_config.get("device", cfg.device)
    cfg = dataclasses.replace(cfg, val_size=0, epochs=final_epochs or cfg.epochs, device=device)
    parent = settings.parent_run_id
    mlc = tracking.client()
    done = tracking.retrying(
        mlc.search_runs, [tracking.experiment_id(settings.experiment)],
        filter_string=(f"tags.`{TAG}study_uid` = '{study.user_attrs.get(UID_ATTR, '')}' and tags.`{TAG}role` = 'final'"
                       f" and tags.`{TAG}best_trial` = '{best.number}' and attributes.status = 'FINISHED'"
                       f" and params.epochs = '{cfg.epochs}'"),
        max_results=1,
    )
    if done:
        console.print(f"The best trial {best.number} was already retrained in run {done[0].info.run_id}.")
        return None
    tags = {f"{TAG}role": "final", f"{TAG}study_name": settings.study_name,
            f"{TAG}study_uid": study.user_attrs.get(UID_ATTR, ""), f"{TAG}best_trial": str(best.number),
            f"{TAG}source_run": str(best.user_attrs.get("mlflow_run_id"))}
    data = load_dataset(cfg.data_config()).to(resolve_device(cfg.device), channels_last=True)
    console.print(f"Retraining trial {best.number}'s config on train+validation for {cfg.epochs} epochs")
    with RichProgress(console, f"final (trial {best.number})") as progress:
        outcome = run_tracked(cfg, experiment=settings.experiment, run_name="final-best", parent_run_id=parent,
                              tags=tags, hooks=[progress], data=data, log_model=True)
    result = outcome.result
    if parent:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = []
        if result.test_accuracy is not None:
            metrics = [Metric("final_test_accuracy", result.test_accuracy, now, 0),
                       Metric("final_test_error", 100.0 * (1.0 - result.test_accuracy), now, 0)]
        tracking.retrying(mlc.log_batch, parent, metrics=metrics, tags=[RunTag(f"{TAG}final_run_id", outcome.run_id)])
    return outcome
