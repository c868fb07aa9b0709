"""The Optuna side of a study: the RDB storage, the study and its identity, its sampler and pruner, re-queued trials.

The default storage is the SQLite file ``optuna.db`` next to MLflow's ``mlflow.db``; any SQLAlchemy URL (PostgreSQL
for many hosts) works with ``--storage``. Optuna coordinates the workers: its RDB heartbeats mark a lost worker's
trial stale and ``RetryHeartbeatStaleTrialCallback`` re-queues it with its params and its MLflow run id, so the
retry resumes from that run's last checkpoint. Two thin layers of ours, each with its reason in docs/design.md:
:class:`ResilientStorage` (a store outage shorter than the retry budget costs no trial) and the race-safe opening
of a new database by many processes at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, StorageInternalError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from allconv_cli import runtime
from allconv_cli.config import EXECUTION_FIELDS, TrainConfig
from allconv_cli.errors import AllconvError, StoreUnavailable, first_line
from allconv_cli.search.budget import Ledger, retry_history, retryable
from allconv_cli.search.distinct import make_sampler
from allconv_cli.search.plan import PRUNERS, SearchSettings
from allconv_cli.spaces import SearchSpace
from allconv_cli.stores import safe_url
from allconv_cli.tracking.schema import StudyAttr

T = TypeVar("T")
FIX = "use e.g. sqlite:///optuna.db or postgresql://user:password@host/dbname"


def is_transient(exc: BaseException) -> bool:
    """A database that is briefly unreachable or busy (a restart, a failover, a locked SQLite file): worth a retry.
    Optuna wraps driver errors in StorageInternalError; the cause tells."""
    cause = exc.__cause__ if isinstance(exc, StorageInternalError) else exc
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                              sqlalchemy.exc.DisconnectionError))


def _unreachable(exc: BaseException) -> bool:
    """The database server is not there (refused, timed out, starting up, shutting down, full), as opposed to
    answering and refusing the URL's user, password or database: a later start can succeed. libpq gives a failed
    connection no SQLSTATE; a server's own refusal comes as its ``FATAL:`` message."""
    if not is_transient(exc):
        return False
    cause = exc.__cause__ if isinstance(exc, StorageInternalError) else exc
    sqlstate = getattr(getattr(cause, "orig", None), "sqlstate", None)
    if sqlstate:
        return str(sqlstate).startswith(("08", "57P"))  # connection exception; operator intervention
    text = str(cause)
    return "FATAL:" not in text or any(busy in text for busy in _SERVER_BUSY)


_SERVER_BUSY = ("the database system is", "too many clients")  # ... starting up / shutting down / in recovery mode


def with_retries(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args)``, retried with back-off while the database is transiently unavailable, for at most the store
    retry budget (``$ALLCONV_TRACKING_RETRY_SECONDS``, shared with MLflow's)."""
    started, delay = time.monotonic(), 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() - started + delay > runtime.retry_budget():
                raise
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return with_retries(method, self, *args, **kwargs)

    return call


class ResilientStorage(RDBStorage):
    """Optuna's RDB storage whose reads and idempotent writes outlive a short database outage.

    Without it a PostgreSQL restart in the middle of a trial fails the trial (``trial.report`` raises
    StorageInternalError), and a failed heartbeat write ends Optuna's heartbeat thread for good, so a live trial is
    later declared lost. Creating a trial is not retried: a lost acknowledgement could leave a second one behind.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(Exception):  # the heartbeat thread beats again after its interval
            super().record_heartbeat(trial_id)


for _name in ("_get_trials", "get_trial", "get_all_studies", "get_study_id_from_name", "get_study_name_from_id",
              "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "_get_best_trial_id",
              "_get_stale_trial_ids", "get_trial_id_from_study_id_trial_number", "set_study_user_attr",
              "set_study_system_attr", "set_trial_user_attr", "set_trial_system_attr", "_set_trial_param",
              "set_trial_intermediate_value", "set_trial_state_values"):
    setattr(ResilientStorage, _name, _retried(_name))


def _normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; we ship psycopg 3, so use it when psycopg2 is absent."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def check_storage_url(url: str) -> sqlalchemy.engine.URL:
    """The parsed URL once its syntax, driver and a SQLite file's folder are right; connects to nothing."""
    shown = safe_url(url)
    try:
        parsed = sqlalchemy.engine.make_url(_normalise_url(url))
        parsed.get_dialect()  # an unknown scheme or a missing driver
    except Exception as exc:
        raise AllconvError(f"--storage {shown!r} is not a database URL ({first_line(exc)}): {FIX}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).expanduser().parent
        if not folder.is_dir():
            raise AllconvError(f"cannot open the Optuna storage {shown}: folder {folder} does not exist")
    return parsed


def is_local_file(url: str) -> bool:
    """A SQLite file: opening the storage creates it (a server database is only connected to)."""
    parsed = check_storage_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")


def open_storage(settings: SearchSettings) -> RDBStorage:
    """The study's storage, with heartbeats; any problem (bad URL, no driver, no server) is one AllconvError line.

    Processes started at once on a new database all create Optuna's tables; the losers see "already exists" or a
    duplicate key (PostgreSQL: IntegrityError/ProgrammingError; SQLite: OperationalError). The tables are there
    then: they try again. An unreachable server is reported at once, as an outage (exit 75), a refused login or
    an unknown database as the user's error (exit 2)."""
    parsed = check_storage_url(settings.storage_url)
    sqlite = parsed.get_backend_name() == "sqlite"
    # several workers share a SQLite file: wait for its lock; a server connection is checked before each use
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(10):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: experimental, used knowingly
                return ResilientStorage(
                    parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs,
                    heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=settings.max_retry, inherit_intermediate_values=True))
        except Exception as exc:
            racing = isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) or (
                sqlite and isinstance(exc, (sqlalchemy.exc.OperationalError, StorageInternalError)))
            if not sqlite and _unreachable(exc):
                raise StoreUnavailable(f"cannot open the Optuna storage {safe_url(settings.storage_url)}: "
                                       f"{first_line(exc)[:300]} (start the database, check the URL, or try "
                                       "again once it is up)") from None
            if not racing or attempt == 9:
                raise AllconvError(f"cannot open the Optuna storage {safe_url(settings.storage_url)}: "
                                   f"{first_line(exc)[:300]} ({FIX})") from None
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


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


def _study_kwargs(settings: SearchSettings) -> dict[str, Any]:
    return {"sampler": make_sampler(settings.space(), settings.seed),
            "pruner": make_pruner(settings.pruner, int(settings.base_config["epochs"]))}


def load_study(settings: SearchSettings, storage: RDBStorage) -> optuna.Study:
    """The existing study with its sampler and pruner (Optuna keeps neither in the storage)."""
    try:
        return optuna.load_study(study_name=settings.study_name, storage=storage, **_study_kwargs(settings))
    except KeyError:
        raise AllconvError(f"no study {settings.study_name!r} in {safe_url(settings.storage_url)}: "
                           f"run the search without --summarize first") from None


def create_or_load_study(settings: SearchSettings, storage: RDBStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it (the same command resumes it); returns ``(study, created_here)``.

    Exactly one process creates a study (the storage's unique name decides), and only it writes the study's identity
    (uid, space, base config); processes that lose the race wait for it, so hosts started together agree. Resuming
    with another space or other training options is refused: it would mix two experiments in one study.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="maximize",
                                    **_study_kwargs(settings))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(study_name=settings.study_name, storage=storage,
                                           **_study_kwargs(settings)), False
    if study.direction != optuna.study.StudyDirection.MAXIMIZE or len(study.directions) != 1:
        raise AllconvError(f"study {settings.study_name!r} in {safe_url(settings.storage_url)} is not a maximised "
                           f"single-objective study (not an allconv study?): pick another --study-name")
    if created:  # optuna-dashboard and trials_dataframe() then name the objective
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names([settings.objective])
    check_identity(study, settings, created)
    return study, created


def check_identity(study: optuna.Study, settings: SearchSettings, created: bool) -> None:
    """Write the study's identity (its creator; or anyone while no trial was trained) or refuse a different one."""
    space = settings.space()
    identity = {StudyAttr.SPACE: {"name": space.name, "source": space.source, "text": space.text},
                StudyAttr.BASE_CONFIG: comparable(settings.base_config, space)}
    if created:
        _write_identity(study, {**identity, StudyAttr.STUDY_UID: os.urandom(8).hex()}, space.sha)
    attrs = wait_for_attr(study, StudyAttr.SPACE_SHA)
    if StudyAttr.SPACE_SHA not in attrs:  # the creator died before writing them: adopt the study
        uid = attrs.get(StudyAttr.STUDY_UID) or os.urandom(8).hex()
        attrs = _write_identity(study, {**identity, StudyAttr.STUDY_UID: uid}, space.sha)
    trials = study.get_trials(deepcopy=False)
    trained = any(Ledger.of(trials).holds_a_place(t) for t in trials)
    if not created and not trained and (attrs.get(StudyAttr.SPACE_SHA) != space.sha
                                        or attrs.get(StudyAttr.BASE_CONFIG) != identity[StudyAttr.BASE_CONFIG]):
        # no trial yet, nothing to mix up: the command that fixes a mistake (say --val-size) takes the study over
        attrs = _write_identity(study, identity, space.sha)
    if attrs.get(StudyAttr.SPACE_SHA) != space.sha:
        old = attrs.get(StudyAttr.SPACE, {}).get("source", "another space")
        raise AllconvError(f"study {settings.study_name!r} was created with search space {old}, which differs from "
                           f"{space.source}: use the same --space, or another --study-name")
    old_base, new_base = attrs.get(StudyAttr.BASE_CONFIG, {}), identity[StudyAttr.BASE_CONFIG]
    defaults = TrainConfig().to_dict()  # a field added to TrainConfig later changes nothing at its default
    changed = sorted(k for k in set(old_base) | set(new_base)
                     if old_base.get(k, defaults.get(k)) != new_base.get(k, defaults.get(k)))
    if changed:
        was = ", ".join(f"{k}={old_base.get(k)!r}" for k in changed)
        now = ", ".join(f"{k}={new_base.get(k)!r}" for k in changed)
        raise AllconvError(f"study {settings.study_name!r} was started with {was}; this command has {now}: rerun "
                           f"with the study's options or pick another --study-name")


def _write_identity(study: optuna.Study, attrs: dict[str, Any], sha: str) -> dict[str, Any]:
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr(StudyAttr.SPACE_SHA, sha)  # last: its presence means "identity complete"
    return study.user_attrs


def comparable(base: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The base-config values that change what a trial learns (so resuming with others would mix experiments)."""
    return {k: v for k, v in base.items() if k not in EXECUTION_FIELDS and k not in space.params}


def wait_for_attr(study: optuna.Study, key: str, seconds: float = 60.0) -> dict[str, Any]:
    """The study's user attrs once ``key`` is there (written by the creating process), or after ``seconds``."""
    end = time.time() + seconds
    attrs = study.user_attrs
    while key not in attrs and time.time() < end:
        time.sleep(0.5)
        attrs = study.user_attrs
    return attrs


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial`` again as a new WAITING trial with its params, user attrs (its MLflow run, so the retry resumes
    from that run's last checkpoint) and reports: what Optuna's callback does for a lost worker's trial."""
    RetryHeartbeatStaleTrialCallback(max_retry=None, inherit_intermediate_values=True)(study, trial)


def requeue_stopped(study: optuna.Study) -> list[int]:
    """Re-queue every failed trial that was stopped, not failed by its training (Ctrl-C, a stop signal, a store
    outage) and has no retry yet; returns their numbers. Two processes doing this at once may queue a trial twice:
    the budget counts the first retry only and a worker that gets the second one skips it."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retry_history(t)}
    stopped = [t for t in trials if retryable(t) and t.number not in retried]
    for t in stopped:
        requeue(study, t)
    return [t.number for t in stopped]


def current_state(study: optuna.Study, number: int) -> TrialState:
    """The stored state of trial ``number``."""
    return next(t.state for t in study.get_trials(deepcopy=False) if t.number == number)
