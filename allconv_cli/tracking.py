"""MLflow tracking for training runs, as engine hooks.

The engine calls :class:`MlflowHooks`; nothing else in the package talks to MLflow during training. We use
``MlflowClient`` with explicit run ids rather than the fluent API's "active run", because a search process logs
many runs (parent and children) and several processes or hosts may log into the same experiment.

Store: MLflow's own default (``sqlite:///mlflow.db``, artifacts in ``./mlruns``) unless ``MLFLOW_TRACKING_URI``
says otherwise, so ``mlflow ui`` started in the same directory shows everything.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from allconv_cli import __version__
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError

T = TypeVar("T")
TAG = "allconv."  # prefix of our own tags
# engine status -> MLflow run status
RUN_STATUS = {
    "finished": "FINISHED",
    "pruned": "FINISHED",
    "diverged": "FAILED",
    "collapsed": "FAILED",
    "interrupted": "KILLED",
}


def retrying(fn: Callable[..., T], *args: Any, attempts: int = 6, delay: float = 2.0, **kwargs: Any) -> T:
    """Call ``fn``, retrying transient failures (a tracking server restarting) with exponential back-off.

    MLflow's HTTP client retries some status codes itself; this also covers refused connections while the server
    is down, so a finished epoch's metrics are not lost to a restart.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                raise AllconvError(  # a full or read-only artifact location: retrying cannot help
                    f"cannot write {exc.filename or 'MLflow artifacts'}: {exc.strerror} (the MLflow artifact "
                    "location must be writable and have free space; or set MLFLOW_TRACKING_URI to another store)"
                ) from exc
            if attempt == attempts - 1 or not _transient(exc):
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


# Local storage errors that no retry fixes: no space, quota, read-only file system, no permission.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _transient(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return True
    code = getattr(exc, "error_code", "")
    return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "") or "Connection" in str(exc)


def client() -> MlflowClient:
    return MlflowClient()


def check_local_store() -> None:
    """MLflow's SQLite store in a folder this user cannot write (a read-only or foreign-owned Docker mount): MLflow
    would retry for minutes and end in a traceback, so say it at once."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        folder = Path(uri.removeprefix("sqlite:///").split("?")[0]).absolute().parent
        if not os.access(folder, os.W_OK):
            raise AllconvError(f"cannot write MLflow's store {uri}: {folder} is read-only or not writable by this "
                               "user; run in a writable folder (Docker: mount it read-write, owned by the container's "
                               "user or with --user \"$(id -u):$(id -g)\"), or set MLFLOW_TRACKING_URI")


def experiment_id(name: str) -> str:
    """Get or create an experiment by name; safe when several processes create it at once."""
    check_local_store()
    mlc = client()
    found = retrying(mlc.get_experiment_by_name, name)
    if found is not None:
        return found.experiment_id
    try:
        return retrying(mlc.create_experiment, name)
    except MlflowException:
        found = retrying(mlc.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


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
        f"{TAG}model": cfg.model,
        f"{TAG}branch": cfg.branch,
        f"{TAG}network": cfg.registry_name,
        f"{TAG}dataset": cfg.dataset,
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
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    check_local_store()
    mlc = client()
    run = retrying(mlc.create_run, experiment_id(experiment), tags=all_tags, run_name=run_name)
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
