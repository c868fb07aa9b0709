"""MLflow tracking for training runs, as engine hooks.

The engine calls :class:`MlflowHooks`; nothing else in the package talks to MLflow during training. We use
``MlflowClient`` with explicit run ids rather than the fluent API's "active run", because a search process logs
many runs (parent and children) and several processes or hosts may log into the same experiment.

Store: MLflow's own default (``sqlite:///mlflow.db``, artifacts in ``./mlruns``) unless ``MLFLOW_TRACKING_URI``
says otherwise, so ``mlflow ui`` started in the same directory shows everything.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from allconv_cli import __version__, runtime
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.stores import DOCKER_HINT, check_tracking_store

T = TypeVar("T")
TAG = "allconv."  # prefix of our own tags
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui` in the folder of mlflow.db
# engine status -> MLflow run status
RUN_STATUS = {
    "finished": "FINISHED",
    "pruned": "FINISHED",
    "diverged": "FAILED",
    "collapsed": "FAILED",
    "interrupted": "KILLED",
}


def retrying(fn: Callable[..., T], *args: Any, budget: float | None = None, **kwargs: Any) -> T:
    """Call ``fn``, retrying transient failures (a tracking server restarting) with exponential back-off.

    The one retry layer: :func:`allconv_cli.runtime.configure` turns MLflow's own HTTP retries off, and the back-off
    here stops once it would exceed ``budget`` seconds (``$ALLCONV_TRACKING_RETRY_SECONDS``, default 120), so a
    call fails after at most that plus one request timeout. Unwritable storage fails at once.
    """
    limit = runtime.retry_budget() if budget is None else budget
    started, delay = time.monotonic(), 1.0
    while True:
        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                raise AllconvError(  # a full or read-only artifact location: retrying cannot help
                    f"cannot write {exc.filename or 'MLflow artifacts'}: {exc.strerror} (the MLflow artifact "
                    f"location must be writable and have free space; or set MLFLOW_TRACKING_URI; {DOCKER_HINT})"
                ) from exc
            if not _transient(exc):
                raise
            elapsed = time.monotonic() - started
            if elapsed + delay > limit:
                raise AllconvError(
                    f"the MLflow store {tracking_uri()} did not answer for {elapsed:.0f} s ({_first_line(exc)}): "
                    f"start it or set MLFLOW_TRACKING_URI; ${runtime.ENV_RETRY_SECONDS} sets how long to retry"
                ) from exc
            time.sleep(delay)
            delay *= 2


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# Local storage errors that no retry fixes: no space, quota, read-only file system, no permission.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _transient(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return True
    code = getattr(exc, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "") or "Connection" in str(exc)


def client() -> MlflowClient:
    return MlflowClient()


@functools.cache
def _check_store_once() -> None:
    """The store check of the CLI, also for library callers (a read-only working folder fails at once, not after
    MLflow's two minutes of retries); once per process."""
    check_tracking_store(write=True)


def experiment_id(name: str) -> str:
    """Get or create an experiment by name; safe when several processes create it at once. A new experiment is
    tagged as model training (``mlflow.experimentKind``), so MLflow's UI treats it as runs, not GenAI traces."""
    _check_store_once()
    mlc = client()
    found = retrying(mlc.get_experiment_by_name, name)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:
            retrying(mlc.set_experiment_tag, found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return retrying(mlc.create_experiment, name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:
        found = retrying(mlc.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


def ui_url(experiment: str, run_id: str | None = None) -> str:
    """The address that opens an experiment's training-runs view (or one run) in MLflow's UI: the tracking server
    itself when ``MLFLOW_TRACKING_URI`` is one, else what ``mlflow ui`` serves here by default.

    ``workflowType=machine_learning`` makes MLflow 3.17 land on the runs rather than its GenAI overview (and the
    browser remembers the switch)."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI
    page = f"#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


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
    all_tags = {
        **config_tags(cfg),
        f"{TAG}status": "running",
        f"{TAG}version": __version__,
        f"{TAG}torch": metadata.version("torch"),
    }
    if device is not None:
        all_tags[f"{TAG}device"] = str(device)
    if device_name:
        all_tags[f"{TAG}device_name"] = device_name
    if data_fingerprint:
        all_tags[f"{TAG}data_hash"] = data_fingerprint
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    mlc = client()
    run = retrying(mlc.create_run, experiment_id(experiment), tags=context_tags(all_tags), run_name=run_name)
    run_id = run.info.run_id
    log_params(run_id, cfg.to_params())
    return run_id


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




def mark_failed(run_id: str, reason: str, status: str = "FAILED") -> None:
    """For runs that end by an exception outside the engine (a crash, a lost worker)."""
    mlc = client()
    retrying(mlc.set_tag, run_id, f"{TAG}status", status.lower())
    retrying(mlc.set_tag, run_id, f"{TAG}reason", reason[:5000])
    retrying(mlc.set_terminated, run_id, status)


def download_checkpoint(run_id: str, kind: str = "last") -> Path:
    """Fetch ``checkpoints/{kind}.pt`` of a run into a temporary directory (works against remote servers too)."""
    target = tempfile.mkdtemp(prefix="allconv-resume-")
    try:
        return Path(retrying(client().download_artifacts, run_id, f"checkpoints/{kind}.pt", target))
    except MlflowException as exc:
        raise AllconvError(f"run {run_id} has no {kind} checkpoint to resume from ({exc.error_code})") from exc


def get_run(run_id: str) -> mlflow.entities.Run:
    try:
        return retrying(client().get_run, run_id)
    except MlflowException as exc:
        uri = mlflow.get_tracking_uri()
        raise AllconvError(f"no MLflow run {run_id!r} in {uri}: check the id or MLFLOW_TRACKING_URI") from exc


def reopen_run(run_id: str) -> None:
    """Mark a run as running again (resume), keeping its params, metrics and artifacts."""
    retrying(client().update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    retrying(client().set_tag, run_id, f"{TAG}status", "running")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def finished_epochs(run: mlflow.entities.Run) -> int | None:
    """The epochs of a run that already ended as finished (nothing is left to resume), else None."""
    if run.info.status == "FINISHED" and run.data.tags.get(f"{TAG}status", "") == "finished":
        return int(run.data.tags.get(f"{TAG}epochs_completed", "0") or 0)
    return None


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` over MLflow's context tags (``mlflow.user``, ``mlflow.source.name``/``type``, git), which
    ``MlflowClient.create_run`` would otherwise skip: the UI's User and Source columns fill in."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        resolved = resolve_tags()
    except Exception:  # a context provider failing (no git, odd environment) must not stop a run
        resolved = {}
    return {**resolved, **tags}


def log_dataset(run_id: str, cfg: TrainConfig, digest: str, n_train: int, n_val: int, n_test: int) -> None:
    """The training data as the run's dataset input (name, digest = the data hash, source, splits and
    preprocessing in its profile), so MLflow's Dataset column and lineage show what the run learned from."""
    import json

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
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` / ``..._SAMPLES_BEFORE_LOGGING`` override both.
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


def try_set_tags(run_id: str | None, tags: dict[str, str]) -> None:
    """:func:`set_tags`, best effort: for bookkeeping tags whose loss must not stop a study (no run: nothing)."""
    if run_id:
        with contextlib.suppress(Exception):
            set_tags(run_id, tags)


def config_tags(cfg: TrainConfig) -> dict[str, str]:
    """What a run trains and from which code: model, branch, network, dataset and the git commit, as run tags."""
    tags = {
        f"{TAG}model": cfg.model,
        f"{TAG}branch": cfg.branch,
        f"{TAG}network": cfg.registry_name,
        f"{TAG}dataset": cfg.dataset,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def create_run(experiment: str, tags: dict[str, str], run_name: str | None = None) -> str:
    """A new run in the experiment named ``experiment`` (created if needed) with ``tags`` over MLflow's context
    tags; returns its id."""
    run = retrying(client().create_run, experiment_id(experiment), tags=context_tags(tags), run_name=run_name)
    return run.info.run_id


def find_runs(experiment: str, filter_string: str, *, order_by: list[str] | None = None,
              max_results: int = 1000) -> list[mlflow.entities.Run]:
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


def experiment_name(run_id: str) -> str:
    """The name of the experiment a run lives in."""
    return retrying(client().get_experiment, get_run(run_id).info.experiment_id).name


def log_text(run_id: str, text: str, path: str) -> None:
    retrying(client().log_text, run_id, text, path)


def log_artifacts(run_id: str, folder: str, path: str | None = None) -> None:
    retrying(client().log_artifacts, run_id, folder, path)


def set_run_status(run_id: str, mlflow_status: str) -> None:
    """RUNNING reopens a run; FINISHED, FAILED or KILLED ends it."""
    if mlflow_status == "RUNNING":
        retrying(client().update_run, run_id, status="RUNNING")
    else:
        retrying(client().set_terminated, run_id, mlflow_status)


def delete_run(run_id: str) -> None:
    retrying(client().delete_run, run_id)
