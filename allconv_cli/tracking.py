"""MLflow tracking for training runs, as engine hooks.

The engine calls :class:`MlflowHooks`; nothing else in the package talks to MLflow during training. We use
``MlflowClient`` with explicit run ids rather than the fluent API's "active run", because a search process logs
many runs (parent and children) and several processes or hosts may log into the same experiment.

Store: MLflow's own default (``sqlite:///mlflow.db``, artifacts in ``./mlruns``) unless ``MLFLOW_TRACKING_URI``
says otherwise, so ``mlflow ui`` started in the same directory shows everything.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from allconv_cli import __version__
from allconv_cli.config import TrainConfig
from allconv_cli.engine import EpochMetrics, Hooks, TrainResult
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


def experiment_id(name: str) -> str:
    """Get or create an experiment by name; safe when several processes create it at once."""
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
    device: torch.device | None = None,
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
        f"{TAG}torch": torch.__version__,
    }
    if device is not None:
        all_tags[f"{TAG}device"] = str(device)
        if device.type == "cuda":
            all_tags[f"{TAG}device_name"] = torch.cuda.get_device_name(device)
    if data_fingerprint:
        all_tags[f"{TAG}data_hash"] = data_fingerprint
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    mlc = client()
    run = retrying(mlc.create_run, experiment_id(experiment), tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in cfg.to_params().items()]
    for i in range(0, len(params), 100):
        retrying(mlc.log_batch, run_id, params=params[i : i + 100])
    return run_id


class MlflowHooks(Hooks):
    """Logs each epoch's metrics in one batch call and uploads the rolling ``last`` and ``best`` checkpoints."""

    def __init__(self, run_id: str, checkpoint_every: int = 1) -> None:
        self.run_id = run_id
        self.checkpoint_every = max(1, checkpoint_every)
        self.client = client()

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, metrics.epoch) for k, v in metrics.as_dict().items() if k != "epoch"]
        retrying(self.client.log_batch, self.run_id, metrics=batch)

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        if kind == "last" and epoch % self.checkpoint_every:
            return
        retrying(self.client.log_artifact, self.run_id, str(path), "checkpoints")
        retrying(self.client.set_tag, self.run_id, f"{TAG}checkpoint_{kind}_epoch", str(epoch))


def finish_run(run_id: str, result: TrainResult, *, log_model: bool = True) -> None:
    """Record the outcome: final metrics, status and reason tags, the model, and the MLflow run status."""
    mlc = client()
    now = int(time.time() * 1000)
    final = {
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "test_error": None if result.test_accuracy is None else 100.0 * (1.0 - result.test_accuracy),
        "final_val_accuracy": result.val_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "mean_images_per_second": result.images_per_second,
        "total_seconds": result.seconds,
    }
    metrics = [Metric(k, float(v), now, result.epochs_completed) for k, v in final.items() if v is not None]
    tags = [RunTag(f"{TAG}status", result.status), RunTag(f"{TAG}epochs_completed", str(result.epochs_completed))]
    if result.reason:
        tags.append(RunTag(f"{TAG}reason", result.reason[:5000]))
    retrying(mlc.log_batch, run_id, metrics=metrics, tags=tags)
    if log_model and result.status == "finished":
        log_pytorch_model(run_id, result.model)
    retrying(mlc.set_terminated, run_id, RUN_STATUS.get(result.status, "FINISHED"))


def mark_failed(run_id: str, reason: str, status: str = "FAILED") -> None:
    """For runs that end by an exception outside the engine (a crash, a lost worker)."""
    mlc = client()
    retrying(mlc.set_tag, run_id, f"{TAG}status", status.lower())
    retrying(mlc.set_tag, run_id, f"{TAG}reason", reason[:5000])
    retrying(mlc.set_terminated, run_id, status)


def log_pytorch_model(run_id: str, model: torch.nn.Module) -> None:
    """The final model via ``mlflow.pytorch.log_model``, reloadable with ``mlflow.pytorch.load_model``.

    Pickle serialisation returns the real ``AllConvNet`` (trainable, inspectable); the input example gives the
    model a signature. Requirements are given explicitly: MLflow's inference would import-scan the environment.
    """
    cpu_model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    example = torch.zeros(1, 3, 32, 32).numpy()
    # MLflow warns about pickle on every call; the choice is deliberate (see the docstring).
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(
            cpu_model,
            name="model",
            input_example=example,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"allconv=={__version__}"],
        )


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
