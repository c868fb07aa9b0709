"""One tracked training run: load data, open (or reopen) an MLflow run, train through the engine, record the end.

``allconv train``, every search trial and ``allconv reproduce`` go through :func:`run_tracked`, so they log the
same params, metrics, checkpoints and model, resume the same way, and restart a collapsed run the same way (a
new seed per attempt, each attempt its own linked MLflow run).
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

from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, load_onto
from allconv_cli.engine import (
    CheckpointError,
    EpochMetrics,
    HookList,
    Hooks,
    TrainResult,
    attempt_seed,
    load_checkpoint,
    precision,
    resolve_device,
    train,
)
from allconv_cli.served_model import log_models
from allconv_cli.tracking import store
from allconv_cli.tracking.store import RUN_STATUS, TAG, client, retrying


@dataclass(frozen=True)
class Attempt:
    """One MLflow run of a tracked run: the first, or a restart after the attempt before it collapsed."""

    number: int  # 1 for the first
    run_id: str
    seed: int  # of the init, dropout and batch order (engine.attempt_seed); the data split is cfg.seed's
    status: str
    reason: str = ""


@dataclass
class RunOutcome:
    """How a tracked run ended: ``run_id`` and ``result`` are its last attempt's (the one a trial or report uses)."""

    run_id: str
    result: TrainResult
    resumed_from_epoch: int = 0
    checkpoint_problem: str = ""  # set when a resume checkpoint was unusable and the run restarted from scratch
    attempts: tuple[Attempt, ...] = ()


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
    on_retry: Callable[[Attempt, int, int], None] | None = None,
) -> RunOutcome:
    """Train ``cfg`` as an MLflow run; restart it as a new run when it collapses, up to ``cfg.collapse_retries`` times.

    ``resume_run_id`` continues that run from its last checkpoint. ``checkpoint_from_run`` starts a *new* run from
    another run's last checkpoint (a search trial retried after its worker died). A checkpoint that cannot be read
    raises, unless ``restart_on_bad_checkpoint``: then the problem is recorded and training starts from scratch.
    ``on_run_created`` gets the run id as soon as the run exists, before training: a search trial records it in
    Optuna then, so a retry of a trial whose worker dies mid-training can find that run's checkpoint.
    ``register`` names the registered model the finished run's raw-image model is registered as.

    A collapsed run (dead ReLUs: it can never learn again) is followed by a new run, attempt 2, 3, ..., with a new
    init/dropout/batch-order seed (:func:`~allconv_cli.engine.attempt_seed`) and the same data split, the same
    ``tags`` and parent, linked both ways (``allconv.collapse_retry_of`` / ``allconv.collapse_retried_by``); every
    run carries ``allconv.attempt`` and ``allconv.init_seed``. ``on_retry(collapsed, next_number, next_seed)`` is
    called before each restart. ``on_run_created`` and ``hooks`` see every attempt.
    """
    device = resolve_device(cfg.device)
    source_run = resume_run_id or checkpoint_from_run
    resume_path, problem, start_epoch = None, "", 0
    number, seed = 1, cfg.seed
    if source_run:
        number, seed = _attempt_of(source_run, cfg.seed)
        try:
            resume_path = store.download_checkpoint(source_run)
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
    resumed_from, first_problem = resume_path, problem
    attempts: list[Attempt] = []
    retry_of: str | None = None
    while True:
        run_id = _open_run(cfg, data, device, experiment=experiment, parent_run_id=parent_run_id, tags=tags,
                           run_name=run_name if number == 1 or not run_name else f"{run_name}-attempt{number}",
                           resume_run_id=resume_run_id, attempt=number, seed=seed, retry_of=retry_of)
        if on_run_created is not None:
            on_run_created(run_id)
        if problem:
            store.client().set_tag(run_id, f"{store.TAG}checkpoint_problem", problem[:5000])
        if checkpoint_from_run:
            store.client().set_tag(run_id, f"{store.TAG}resumed_from_run", checkpoint_from_run)
        result = _train_run(cfg, data, device, run_id, hooks=hooks, resume_path=resume_path, seed=seed,
                            resumed=bool(resume_run_id), checkpoint_every=checkpoint_every, log_model=log_model,
                            register=register)
        attempts.append(Attempt(number, run_id, seed, result.status, result.reason))
        if result.status != "collapsed" or number > cfg.collapse_retries:
            break
        number, seed, retry_of = number + 1, attempt_seed(cfg.seed, number + 1), run_id
        if on_retry is not None:
            on_retry(attempts[-1], number, seed)
        resume_run_id = checkpoint_from_run = None  # a restart starts from scratch, as a new run
        resume_path, problem = None, ""
    if result.status == "collapsed" and len(attempts) > 1:
        seeds = ", ".join(str(a.seed) for a in attempts)
        result.reason = f"{result.reason}; all {len(attempts)} attempts collapsed (seeds {seeds})"
    resumed_from_epoch = start_epoch if resumed_from is not None and len(attempts) == 1 else 0
    return RunOutcome(run_id, result, resumed_from_epoch=resumed_from_epoch, checkpoint_problem=first_problem,
                      attempts=tuple(attempts))


def _attempt_of(run_id: str, seed: int) -> tuple[int, int]:
    """The attempt number and seed a run was trained with (runs from before attempts existed: 1 and ``seed``)."""
    try:
        found = store.get_run(run_id).data.tags
        return int(found.get(f"{TAG}attempt", 1)), int(found.get(f"{TAG}init_seed", seed))
    except Exception:  # an unreadable source run: the caller's checkpoint handling decides what happens
        return 1, seed


def _open_run(cfg: TrainConfig, data: Dataset, device: torch.device, *, experiment: str, parent_run_id: str | None,
              tags: dict[str, str] | None, run_name: str | None, resume_run_id: str | None, attempt: int, seed: int,
              retry_of: str | None) -> str:
    """Reopen ``resume_run_id``, or create a run (with its dataset input) for this attempt; returns its id."""
    attempt_tags = {f"{TAG}precision": precision(device, cfg.amp)}
    if resume_run_id:
        store.reopen_run(resume_run_id)
        store.set_tags(resume_run_id, attempt_tags)
        return resume_run_id
    attempt_tags |= {f"{TAG}attempt": str(attempt), f"{TAG}init_seed": str(seed)}
    if retry_of:
        attempt_tags[f"{TAG}collapse_retry_of"] = retry_of
    run_id = store.start_run(
        cfg,
        experiment=experiment,
        run_name=run_name,
        parent_run_id=parent_run_id,
        tags={**(tags or {}), **attempt_tags},
        device=device,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        data_fingerprint=data.fingerprint,
    )
    store.log_dataset(run_id, cfg, data.fingerprint, len(data.train), len(data.val) if data.val else 0,
                         len(data.test))
    if retry_of:
        store.set_tags(retry_of, {f"{TAG}collapse_retried_by": run_id})
    return run_id


def _train_run(cfg: TrainConfig, data: Dataset, device: torch.device, run_id: str, *, hooks: Sequence[Hooks],
               resume_path: Path | None, seed: int, resumed: bool, checkpoint_every: int, log_model: bool,
               register: str | None) -> TrainResult:
    """Train one attempt into ``run_id`` and record how it ended (an exception marks the run failed or killed)."""
    all_hooks = HookList([MlflowHooks(run_id, checkpoint_every), *hooks])
    with tempfile.TemporaryDirectory(prefix="allconv-ckpt-") as checkpoint_dir, \
            store.system_metrics(run_id, resume=resumed):
        try:
            result = train(cfg, data, device=device, checkpoint_dir=Path(checkpoint_dir), hooks=all_hooks,
                           resume_from=resume_path, seed=seed)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                interrupted = isinstance(exc, KeyboardInterrupt)
                store.mark_failed(run_id, f"{type(exc).__name__}: {exc}", "KILLED" if interrupted else "FAILED")
            raise
        finish_run(run_id, result, cfg=cfg, data=data, log_model=log_model, register=register)
    return result


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
    if result.dead_classes:  # a partly (or wholly) dead head: these classes had no positive score on validation
        tags.append(RunTag(f"{TAG}dead_classes", ",".join(map(str, result.dead_classes))))
    if result.reason:
        tags.append(RunTag(f"{TAG}reason", result.reason[:5000]))
    retrying(mlc.log_batch, run_id, metrics=metrics, tags=tags)
    if log_model and result.status == "finished" and cfg is not None and data is not None:
        log_models(run_id, cfg, result.model, data, register=register)
    retrying(mlc.set_terminated, run_id, RUN_STATUS.get(result.status, "FINISHED"))
