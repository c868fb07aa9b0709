"""The one door to MLflow: runs, tags, metrics, artifacts and experiments, each call through :func:`retrying`.

Nothing outside ``allconv_cli.tracking`` talks to the MLflow client. We use ``MlflowClient`` with explicit run ids
rather than the fluent API's "active run", because a search process logs many runs (parent and children) and
several processes or hosts may log into the same experiment. Names of tags, metrics and states come from
:mod:`allconv_cli.tracking.schema`.

Store: ``$MLFLOW_TRACKING_URI``, else MLflow's own default (``sqlite:///mlflow.db``, artifacts in ``./mlruns``),
resolved once in :func:`allconv_cli.stores.tracking_uri`; it is shown only through ``stores.safe_url``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from allconv_cli import __version__, stores
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.tracking.retry import retrying, shown_uri
from allconv_cli.tracking.schema import EXPERIMENT_KIND, Artifact, MlflowTag, Status, Tag

DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui` in the folder of mlflow.db
CHECKPOINT_PREFIX = "allconv-resume-"


# --------------------------------------------------------------------------------------------------------------------
# the store


def tracking_uri() -> str:
    """The tracking URI (resolved in :func:`allconv_cli.stores.tracking_uri`); print :func:`shown_uri` instead."""
    return stores.tracking_uri()


def client() -> MlflowClient:
    """The MLflow client of :func:`tracking_uri`: for this door's functions (and tests that read a store).

    A process's first client of a new SQLite store creates its tables (MLflow's alembic migrations). Another process
    doing the same at that moment (a second run, `mlflow ui`) makes one of them fail, with whatever the interleaved
    migration step meets ("already exists", "duplicate column", alembic's version row moved, a batch copy's
    CircularDependencyError or missing index); the other finishes the tables: this one tries again, as Optuna's
    storage does on a new database (CI once saw `allconv train` die so). Ten tries, about 15 s at most."""
    uri = tracking_uri()
    for attempt in range(10):
        try:
            return MlflowClient(tracking_uri=uri)
        except Exception:
            if attempt == 9 or not uri.startswith("sqlite:"):
                raise
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------------------------
# experiments


def experiment_id(name: str) -> str:
    """Get or create an experiment by name; safe when several processes create it at once. A new experiment is
    tagged as model training (``mlflow.experimentKind``), so MLflow's UI treats it as runs, not GenAI traces."""
    stores.check_tracking_store(write=True)  # the CLI's check, for library callers too (once per process)
    mlc = client()
    found = retrying(mlc.get_experiment_by_name, name)
    if found is not None:
        if MlflowTag.EXPERIMENT_KIND not in found.tags:
            retrying(mlc.set_experiment_tag, found.experiment_id, MlflowTag.EXPERIMENT_KIND, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return retrying(mlc.create_experiment, name, tags={MlflowTag.EXPERIMENT_KIND: EXPERIMENT_KIND})
    except MlflowException:
        found = retrying(mlc.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


def experiment_name(run_id: str) -> str:
    """The name of the experiment a run lives in."""
    return retrying(client().get_experiment, get_run(run_id).info.experiment_id).name


def experiments() -> dict[str, str]:
    """Every active experiment of the store: name -> id (read-only: creates nothing)."""
    return {exp.name: exp.experiment_id for exp in _pages(client().search_experiments, max_results=1000)}


def all_runs(experiment_ids: list[str]) -> list[Run]:
    """Every active run of the experiments, all pages, each page read with retries."""
    return _pages(client().search_runs, experiment_ids, max_results=5000)


def _pages(search: Any, *args: Any, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        page = retrying(search, *args, page_token=token, **kwargs)
        items += list(page)
        token = page.token
        if not token:
            return items


def ui_url(experiment: str, run_id: str | None = None) -> str:
    """The address that opens an experiment's training-runs view (or one run) in MLflow's UI: the tracking server
    itself when ``MLFLOW_TRACKING_URI`` is one (without its credentials: the browser asks), else what ``mlflow ui``
    serves here by default.

    ``workflowType=machine_learning`` makes MLflow 3.17 land on the runs rather than its GenAI overview (and the
    browser remembers the switch)."""
    uri = tracking_uri()
    base = DEFAULT_UI
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        base = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="").geturl().rstrip("/")
    page = f"#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def run_uri(run_id: str, path: str) -> str:
    """The full ``runs:/<run id>/<path>`` address of an artifact, as MLflow's own tools take it."""
    return f"runs:/{run_id}/{path}"


# --------------------------------------------------------------------------------------------------------------------
# runs


@functools.cache
def git_commit() -> str | None:
    """The commit of the allconv checkout this code runs from, when there is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def config_tags(cfg: TrainConfig) -> dict[str, str]:
    """What a run trains and from which code: model, branch, network, dataset and the git commit, as run tags."""
    tags = {Tag.MODEL: cfg.model, Tag.BRANCH: cfg.branch, Tag.NETWORK: cfg.registry_name, Tag.DATASET: cfg.dataset}
    commit = git_commit()
    if commit:
        tags[MlflowTag.GIT_COMMIT] = commit
    return tags


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` over MLflow's context tags (``mlflow.user``, ``mlflow.source.name``/``type``, git), which
    ``MlflowClient.create_run`` would otherwise skip: the UI's User and Source columns fill in."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        resolved = resolve_tags()
    except Exception:  # a context provider failing (no git, odd environment) must not stop a run
        resolved = {}
    return {**resolved, **tags}


def create_run(experiment: str, tags: dict[str, str], run_name: str | None = None) -> str:
    """A new run in the experiment named ``experiment`` (created if needed) with ``tags`` over MLflow's context
    tags; returns its id."""
    run = retrying(client().create_run, experiment_id(experiment), tags=context_tags(tags), run_name=run_name)
    return run.info.run_id


def start_run(
    cfg: TrainConfig,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    device: Any = None,
    device_name: str | None = None,
    data_fingerprint: str | None = None,
) -> str:
    """Create a run holding every config value as a param and the tags the README promises; returns its id."""
    all_tags = {**config_tags(cfg), Tag.STATUS: Status.RUNNING.value, Tag.VERSION: __version__,
                Tag.TORCH: metadata.version("torch")}
    if device is not None:
        all_tags[Tag.DEVICE] = str(device)
    if device_name:
        all_tags[Tag.DEVICE_NAME] = device_name
    if data_fingerprint:
        all_tags[Tag.DATA_HASH] = data_fingerprint
    if parent_run_id:
        all_tags[MlflowTag.PARENT_RUN_ID] = parent_run_id
    all_tags.update(tags or {})
    run_id = create_run(experiment, all_tags, run_name)
    log_params(run_id, cfg.to_params())
    return run_id


def get_run(run_id: str) -> Run:
    try:
        return retrying(client().get_run, run_id)
    except MlflowException as exc:
        raise AllconvError(f"no MLflow run {run_id!r} in {shown_uri()}: check the id or MLFLOW_TRACKING_URI") from exc


def find_runs(experiment: str, filter_string: str, *, order_by: list[str] | None = None,
              max_results: int = 1000) -> list[Run]:
    """Runs of the experiment named ``experiment`` matching an MLflow filter string."""
    return retrying(client().search_runs, [experiment_id(experiment)], filter_string=filter_string,
                    order_by=order_by, max_results=max_results)


def run_alive(run_id: str | None) -> bool:
    """The run exists and is not deleted."""
    if not run_id:
        return False
    try:
        return get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def finished_epochs(run: Run) -> int | None:
    """The epochs of a run that already ended as finished (nothing is left to resume), else None."""
    if run.info.status == Status.FINISHED.mlflow and run.data.tags.get(Tag.STATUS, "") == Status.FINISHED:
        return int(run.data.tags.get(Tag.EPOCHS_COMPLETED, "0") or 0)
    return None


def reopen_run(run_id: str) -> None:
    """Mark a run as running again (resume), keeping its params, metrics and artifacts."""
    set_run_status(run_id, Status.RUNNING.mlflow)
    set_tags(run_id, {Tag.STATUS: Status.RUNNING.value})


def set_run_status(run_id: str, mlflow_status: str) -> None:
    """RUNNING reopens a run; FINISHED, FAILED or KILLED ends it."""
    if mlflow_status == "RUNNING":
        retrying(client().update_run, run_id, status="RUNNING")
    else:
        retrying(client().set_terminated, run_id, mlflow_status)


def mark_failed(run_id: str, reason: str, status: Status | str = Status.FAILED) -> None:
    """For runs that end by an exception outside the engine (a crash, a lost worker, Ctrl-C): the status tag, the
    reason and MLflow's run status. ``status``: a :class:`Status`, or MLflow's ``FAILED`` / ``KILLED``."""
    state = Status(_LEGACY_END.get(status, status))
    set_tags(run_id, {Tag.STATUS: state.value, Tag.REASON: reason})
    set_run_status(run_id, state.mlflow)


_LEGACY_END = {"FAILED": Status.FAILED, "KILLED": Status.INTERRUPTED}  # MLflow status names callers still pass


def delete_run(run_id: str) -> None:
    retrying(client().delete_run, run_id)


# --------------------------------------------------------------------------------------------------------------------
# params, metrics, tags, artifacts


def now_ms() -> int:
    return int(time.time() * 1000)


def log_params(run_id: str, params: dict[str, str]) -> None:
    """Params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6,000 characters."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retrying(client().log_batch, run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    """One batch call; ``None`` values are skipped."""
    now = now_ms()
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if batch:
        retrying(client().log_batch, run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    """One batch call; values cut to MLflow's 5,000 characters."""
    if tags:
        retrying(client().log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def try_set_tags(run_id: str | None, tags: dict[str, str]) -> None:
    """:func:`set_tags`, best effort: for bookkeeping tags whose loss must not stop a study (no run: nothing)."""
    if run_id:
        with contextlib.suppress(Exception):
            set_tags(run_id, tags)


def log_text(run_id: str, text: str, path: str) -> None:
    retrying(client().log_text, run_id, text, path)


def log_artifact(run_id: str, file: str | Path, path: str | None = None) -> None:
    retrying(client().log_artifact, run_id, str(file), path)


def log_artifacts(run_id: str, folder: str, path: str | None = None) -> None:
    retrying(client().log_artifacts, run_id, folder, path)


def download_checkpoint(run_id: str, kind: str, into: str | Path) -> Path:
    """Fetch ``checkpoints/{kind}.pt`` of a run (works against remote servers too) into the folder ``into``, which
    the caller owns and removes (or use :func:`checkpoint_file`, which does)."""
    Path(into).mkdir(parents=True, exist_ok=True)
    try:
        return Path(retrying(client().download_artifacts, run_id, f"{Artifact.CHECKPOINTS}/{kind}.pt", str(into)))
    except MlflowException as exc:
        raise AllconvError(f"run {run_id} has no {kind} checkpoint ({exc.error_code})") from exc


@contextlib.contextmanager
def checkpoint_file(run_id: str, kind: str = "last") -> Iterator[Path]:
    """``checkpoints/{kind}.pt`` of a run, downloaded into a temporary folder that is removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=CHECKPOINT_PREFIX) as folder:
        yield download_checkpoint(run_id, kind, folder)


def log_dataset(run_id: str, cfg: TrainConfig, digest: str, n_train: int, n_val: int, n_test: int) -> None:
    """The training data as the run's dataset input (name, digest = the data hash, source, splits and
    preprocessing in its profile), so MLflow's Dataset column and lineage show what the run learned from."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = {"dataset": cfg.dataset, "data_dir": cfg.data_dir} if cfg.dataset != "fake" else {"dataset": "fake"}
    profile = {"train": n_train, "validation": n_val, "test": n_test, "subset": cfg.subset, "val_size": cfg.val_size,
               "test_size": cfg.test_size, "seed": cfg.seed, "preprocess": cfg.preprocess}
    dataset = Dataset(name=f"{cfg.dataset}-{cfg.preprocess}", digest=digest, source_type="local",
                      source=json.dumps(source), profile=json.dumps(profile))
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])]
    try:
        retrying(client().log_inputs, run_id, datasets=inputs)
    except MlflowException as exc:
        # Runs starting together (a SLURM array) log a new dataset at once; MLflow's store checks, then inserts, and
        # the loser gets a unique-key error (dataset_pk). Its transaction rolled back; once more finds the dataset.
        if "unique" not in str(exc).lower():
            raise
        retrying(client().log_inputs, run_id, datasets=inputs)


@contextlib.contextmanager
def system_metrics(run_id: str, resume: bool = False) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU where present) sampled by MLflow's own monitor while the run trains.

    Every 10 s, averaged and logged once a minute (60 points for a 1-hour run); MLflow's
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` / ``..._SAMPLES_BEFORE_LOGGING`` override both. The monitor logs
    through MLflow's loggers, which :func:`allconv_cli.runtime.configure` sends to a file, not the terminal.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=6, resume_logging=resume)
        monitor.start()
    except Exception as exc:  # psutil missing or a monitor failing: the run itself must go on
        logging.getLogger(__name__).warning("system metrics are not recorded: %s", exc)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()
