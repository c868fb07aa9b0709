"""One tracked training run: load data, open (or reopen) an MLflow run, train through the engine, record the end.

``allconv train``, every search trial and ``allconv reproduce`` go through :func:`run_tracked`, so they log the
same params, metrics, checkpoints and model, and resume the same way.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.entities import Metric, RunTag

from allconv_cli import tracking
from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, load_onto
from allconv_cli.engine import (
    CheckpointError,
    EpochMetrics,
    HookList,
    Hooks,
    TrainResult,
    load_checkpoint,
    resolve_device,
    train,
)
from allconv_cli.served_model import log_models
from allconv_cli.tracking import RUN_STATUS, TAG, client, retrying


@dataclass
class RunOutcome:
    run_id: str
    result: TrainResult
    resumed_from_epoch: int = 0
    checkpoint_problem: str = ""  # set when a resume checkpoint was unusable and the run restarted from scratch


def prepare_data(cfg: TrainConfig, device_name: str | None = None) -> Dataset:
    """Load, split and preprocess on the CPU, then move the whole dataset to the training device once."""
    return load_onto(cfg.data_config(), resolve_device(device_name or cfg.device))


def run_tracked(
    cfg: TrainConfig,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    checkpoint_from_run: str | None = None,
    restart_on_bad_checkpoint: bool = False,
    hooks: Sequence[Hooks] = (),
    data: Dataset | None = None,
    log_model: bool = True,
    register: str | None = None,
    checkpoint_every: int = 1,
    on_run_created: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Train ``cfg`` as an MLflow run.

    ``resume_run_id`` continues that run from its last checkpoint. ``checkpoint_from_run`` starts a *new* run from
    another run's last checkpoint (a search trial retried after its worker died). A checkpoint that cannot be read
    raises, unless ``restart_on_bad_checkpoint``: then the problem is recorded and training starts from scratch.
    ``on_run_created`` gets the run id as soon as the run exists, before training: a search trial records it in
    Optuna then, so a retry of a trial whose worker dies mid-training can find that run's checkpoint.
    ``register`` names the registered model the finished run's raw-image model is registered as.
    """
    device = resolve_device(cfg.device)
    source_run = resume_run_id or checkpoint_from_run
    resume_path, problem, start_epoch = None, "", 0
    if source_run:
        try:
            resume_path = tracking.download_checkpoint(source_run)
            start_epoch = load_checkpoint(resume_path)["epoch"]
        except CheckpointError as exc:
            if not restart_on_bad_checkpoint:
                raise
            resume_path, problem = None, str(exc)
        except Exception as exc:  # no checkpoint was uploaded yet: nothing to resume
            if not restart_on_bad_checkpoint:
                raise
            resume_path, problem = None, f"no usable checkpoint in run {source_run}: {exc}"
    data = data if data is not None else prepare_data(cfg)
    if resume_run_id:
        run_id = resume_run_id
        tracking.reopen_run(run_id)
    else:
        run_id = tracking.start_run(
            cfg,
            experiment=experiment,
            run_name=run_name,
            parent_run_id=parent_run_id,
            tags=tags,
            device=device,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            data_fingerprint=data.fingerprint,
        )
    if not resume_run_id:
        tracking.log_dataset(run_id, cfg, data.fingerprint, len(data.train), len(data.val) if data.val else 0,
                             len(data.test))
    if on_run_created is not None:
        on_run_created(run_id)
    if problem:
        tracking.client().set_tag(run_id, f"{tracking.TAG}checkpoint_problem", problem[:5000])
    if checkpoint_from_run:
        tracking.client().set_tag(run_id, f"{tracking.TAG}resumed_from_run", checkpoint_from_run)
    all_hooks = HookList([MlflowHooks(run_id, checkpoint_every), *hooks])
    with tempfile.TemporaryDirectory(prefix="allconv-ckpt-") as checkpoint_dir, \
            tracking.system_metrics(run_id, resume=bool(resume_run_id)):
        try:
            result = train(
                cfg,
                data,
                device=device,
                checkpoint_dir=Path(checkpoint_dir),
                hooks=all_hooks,
                resume_from=resume_path,
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                interrupted = isinstance(exc, KeyboardInterrupt)
                tracking.mark_failed(run_id, f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
            raise
        finish_run(run_id, result, cfg=cfg, data=data, log_model=log_model, register=register)
    return RunOutcome(run_id, result, resumed_from_epoch=start_epoch if resume_path else 0, checkpoint_problem=problem)


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


def finish_run(run_id: str, result: TrainResult, *, cfg: TrainConfig | None = None, data: Dataset | None = None,
               log_model: bool = True, register: str | None = None) -> None:
    """Record the outcome: final metrics, status and reason tags, the models, and the MLflow run status."""
    mlc = client()
    now = int(time.time() * 1000)
    final = {
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "test_error": result.test_error,
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
    if log_model and result.status == "finished" and cfg is not None and data is not None:
        log_models(run_id, cfg, result.model, data, register=register)
    retrying(mlc.set_terminated, run_id, RUN_STATUS.get(result.status, "FINISHED"))
