"""The Optuna side of a study: the RDB storage (with heartbeats), sampler, pruner, and the study's identity.

The default storage is the SQLite file ``optuna.db`` in the working directory, next to MLflow's ``mlflow.db``, so a
search needs no setup; any SQLAlchemy URL (PostgreSQL for many hosts) works with ``--storage``. A study records
the space and base config it was created with, so resuming it with other ones (which would mix two experiments in
one study) is refused, and hosts started together agree on one identity.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from allconv_cli.config import EXECUTION_FIELDS, TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.search.budget import Excluded, takes_a_place
from allconv_cli.search.sampling import make_sampler
from allconv_cli.search.settings import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RETRY,
    PRUNERS,
    SearchSettings,
    first_line,
    safe_url,
)
from allconv_cli.spaces import SearchSpace
from allconv_cli.tracking.store import TAG

# the study's user attributes
PARENT_ATTR = f"{TAG}parent_run_id"
UID_ATTR = f"{TAG}study_uid"
SPACE_SHA_ATTR = f"{TAG}space_sha"  # written last: its presence means "identity complete"
SPACE_ATTR = f"{TAG}space"
BASE_ATTR = f"{TAG}base_config"


def _normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; we ship psycopg 3, so use it when psycopg2 is absent."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix) and importlib.util.find_spec("psycopg2") is None \
                and importlib.util.find_spec("psycopg") is not None:
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def check_storage_url(url: str) -> Any:
    """The parsed URL (a SQLAlchemy ``URL``) once its syntax, its driver and a SQLite file's folder are right; one
    AllconvError line otherwise. Connects to nothing and creates nothing."""
    import sqlalchemy

    shown = safe_url(url)
    fix = "use e.g. sqlite:///optuna.db or postgresql://user:password@host/dbname"
    try:
        parsed = sqlalchemy.engine.make_url(_normalise_url(url))
        parsed.get_dialect()  # an unknown scheme or a missing driver
    except Exception as exc:
        raise AllconvError(f"--storage {shown!r} is not a database URL ({first_line(exc)}): {fix}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).expanduser().parent
        if not folder.is_dir():
            raise AllconvError(f"cannot open the Optuna storage {shown}: folder {folder} does not exist")
    return parsed


def is_local_file(url: str) -> bool:
    """A SQLite file: opening the storage creates it (a server database is only connected to)."""
    parsed = check_storage_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")


def open_storage(url: str, *, heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
                 grace_period: int = DEFAULT_GRACE_PERIOD, max_retry: int = DEFAULT_MAX_RETRY) -> RDBStorage:
    """An RDB storage with heartbeats; any problem (bad URL, no driver, no server) is one AllconvError line."""
    import sqlalchemy

    shown = safe_url(url)
    fix = "use e.g. sqlite:///optuna.db or postgresql://user:password@host/dbname"
    parsed = check_storage_url(url)
    # several local workers write to one SQLite file; wait for the lock instead of failing after 5 s
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}} if parsed.get_backend_name() == "sqlite" else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: experimental, used knowingly
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
                raise AllconvError(f"cannot open the Optuna storage {shown}: {first_line(exc)[:300]}") from None
            time.sleep(0.5 + attempt)
        except Exception as exc:
            raise AllconvError(f"cannot open the Optuna storage {shown}: {first_line(exc)[:300]} ({fix})") from None
    raise AssertionError("unreachable")


def open_settings_storage(settings: SearchSettings) -> RDBStorage:
    """The storage of ``settings``, with its heartbeat options."""
    return open_storage(settings.storage_url, heartbeat_interval=settings.heartbeat_interval,
                        grace_period=settings.grace_period, max_retry=settings.max_retry)


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


def load_study(settings: SearchSettings, storage: RDBStorage) -> optuna.Study:
    """The existing study with its sampler and pruner (Optuna keeps neither in the storage)."""
    space = settings.space()
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=storage)
    except KeyError:
        raise AllconvError(f"no study {settings.study_name!r} in {safe_url(settings.storage_url)}: "
                           f"run the search without --summarize first") from None
    study.sampler = make_sampler(space, settings.seed)
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
    identity = {SPACE_ATTR: {"name": space.name, "source": space.source, "text": space.text},
                BASE_ATTR: comparable(settings.base_config, space)}
    if created:
        _write_identity(study, {**identity, UID_ATTR: os.urandom(8).hex()}, space.sha)
    attrs = wait_for_attr(study, SPACE_SHA_ATTR)
    if SPACE_SHA_ATTR not in attrs:  # the creator died before writing them: adopt the study
        attrs = _write_identity(study, {**identity, UID_ATTR: attrs.get(UID_ATTR) or os.urandom(8).hex()}, space.sha)
    if not created and not _trained_any(study) and (
            attrs.get(SPACE_SHA_ATTR) != space.sha or attrs.get(BASE_ATTR) != identity[BASE_ATTR]):
        # no trial yet, nothing to mix up: the command that fixes a mistake (say --val-size) takes the study over
        attrs = _write_identity(study, identity, space.sha)
    if attrs.get(SPACE_SHA_ATTR) != space.sha:
        old = attrs.get(SPACE_ATTR, {}).get("source", "another space")
        raise AllconvError(f"study {settings.study_name!r} was created with search space {old}, which differs from "
                           f"{space.source}: use the same --space, or another --study-name")
    old_base, new_base = attrs.get(BASE_ATTR, {}), identity[BASE_ATTR]
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
    return study, created


def _trained_any(study: optuna.Study) -> bool:
    """Has any trial of the study been trained (or is one being trained)? Repeats, user errors and surplus trials
    were not."""
    trials = study.get_trials(deepcopy=False)
    excluded = Excluded.of(trials)
    return any(takes_a_place(t, excluded) for t in trials)


def _write_identity(study: optuna.Study, attrs: dict[str, Any], sha: str) -> dict[str, Any]:
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr(SPACE_SHA_ATTR, sha)  # last: its presence means "identity complete"
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
