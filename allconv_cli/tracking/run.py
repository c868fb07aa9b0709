"""One tracked training run: load data, open (or reopen) an MLflow run, train through the engine, record the end.

``allconv train``, every search trial and ``allconv reproduce`` go through :func:`run_tracked`, so they log the
same params, metrics, checkpoints and model, resume the same way, and restart a collapsed run the same way (a
new seed per attempt, each attempt its own linked MLflow run).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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
from allconv_cli.tracking import store
from allconv_cli.tracking.model import log_models
from allconv_cli.tracking.schema import Artifact, Metric, Status, Tag


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

    ``resume_run_id`` continues that run from its last checkpoint; ``checkpoint_from_run`` starts a *new* run from
    another run's (a search trial retried after its worker died). An unreadable checkpoint raises, unless
    ``restart_on_bad_checkpoint``: then the problem is recorded and training starts from scratch.
    ``on_run_created`` gets the run id before training (a search trial records it in Optuna, so a retry after its
    worker dies finds the checkpoint). ``register`` names the registered model of a finished run's raw-image model.

    A collapsed run (dead ReLUs: it can never learn again) is followed by a new run, attempt 2, 3, ..., with a new
    init/dropout/batch-order seed (:func:`~allconv_cli.engine.attempt_seed`) and the same data split, ``tags`` and
    parent, linked both ways (``Tag.COLLAPSE_RETRY_OF`` / ``Tag.COLLAPSE_RETRIED_BY``), each tagged ``Tag.ATTEMPT``
    and ``Tag.INIT_SEED``; ``on_retry(collapsed, next_number, next_seed)`` is called before each restart, and
    ``on_run_created`` and ``hooks`` see every attempt. This loop is the one place that restarts a collapsed run.
    Each attempt's records (metrics, the last checkpoint and its upload) are complete when this returns or raises.
    """
    device = resolve_device(cfg.device)
    data = data if data is not None else prepare_data(cfg)
    with tempfile.TemporaryDirectory(prefix=store.CHECKPOINT_PREFIX) as downloads:  # removed however this ends
        first = _starting_point(cfg, resume_run_id or checkpoint_from_run, restart_on_bad_checkpoint, Path(downloads))
        start, attempts, retry_of = first, [], None
        while True:
            name = run_name if start.attempt == 1 or not run_name else f"{run_name}-attempt{start.attempt}"
            run_id = _open_run(cfg, data, device, start, experiment=experiment, parent_run_id=parent_run_id,
                               tags=tags, run_name=name, resume_run_id=resume_run_id, retry_of=retry_of,
                               checkpoint_from_run=checkpoint_from_run)
            if on_run_created is not None:
                on_run_created(run_id)
            result = _train_run(cfg, data, device, run_id, start, hooks=hooks, resumed=bool(resume_run_id),
                                checkpoint_every=checkpoint_every, log_model=log_model, register=register)
            attempts.append(Attempt(start.attempt, run_id, start.seed, result.status, result.reason))
            if result.status != Status.COLLAPSED or start.attempt > cfg.collapse_retries:
                break
            start, retry_of = _Start(attempt=start.attempt + 1, seed=attempt_seed(cfg.seed, start.attempt + 1)), run_id
            if on_retry is not None:
                on_retry(attempts[-1], start.attempt, start.seed)
            resume_run_id = checkpoint_from_run = None  # a restart starts from scratch, as a new run
    if result.status == Status.COLLAPSED and len(attempts) > 1:
        result.reason += f"; all {len(attempts)} attempts collapsed (seeds {', '.join(str(a.seed) for a in attempts)})"
    resumed_from_epoch = first.epoch if first.path is not None and len(attempts) == 1 else 0
    return RunOutcome(run_id, result, resumed_from_epoch=resumed_from_epoch, checkpoint_problem=first.problem,
                      attempts=tuple(attempts))


@dataclass(frozen=True)
class _Start:
    """Where a tracked run starts: a checkpoint (or none), why not when one was unusable, the attempt and seed."""

    path: Path | None = None
    epoch: int = 0
    problem: str = ""
    attempt: int = 1
    seed: int = 0


def _starting_point(cfg: TrainConfig, source_run: str | None, restart_on_bad_checkpoint: bool,
                    downloads: Path) -> _Start:
    """The checkpoint of ``source_run`` (and the attempt it was), or a fresh start; an unusable checkpoint raises
    unless ``restart_on_bad_checkpoint`` (then the problem is kept and training starts from scratch)."""
    if not source_run:
        return _Start(seed=cfg.seed)
    number, seed = _attempt_of(source_run, cfg.seed)
    try:
        path = store.download_checkpoint(source_run, "last", downloads)
        return _Start(path, load_checkpoint(path)["epoch"], attempt=number, seed=seed)
    except CheckpointError as exc:
        if not restart_on_bad_checkpoint:
            raise
        problem = str(exc)
    except Exception as exc:  # no checkpoint was uploaded yet: nothing to resume
        if not restart_on_bad_checkpoint:
            raise
        problem = f"no usable checkpoint in run {source_run}: {exc}"
    return _Start(problem=problem, attempt=number, seed=seed)


def _attempt_of(run_id: str, seed: int) -> tuple[int, int]:
    """The attempt number and seed a run was trained with (runs from before attempts existed: 1 and ``seed``)."""
    try:
        found = store.get_run(run_id).data.tags
        return int(found.get(Tag.ATTEMPT, 1)), int(found.get(Tag.INIT_SEED, seed))
    except Exception:  # an unreadable source run: the caller's checkpoint handling decides what happens
        return 1, seed


def _open_run(cfg: TrainConfig, data: Dataset, device: torch.device, start: _Start, *, experiment: str,
              parent_run_id: str | None, tags: dict[str, str] | None, run_name: str | None,
              resume_run_id: str | None, retry_of: str | None, checkpoint_from_run: str | None) -> str:
    """Reopen ``resume_run_id``, or create a run (with its dataset input) for this attempt; returns its id."""
    attempt_tags = {Tag.PRECISION: precision(device, cfg.amp)}
    if start.problem:
        attempt_tags[Tag.CHECKPOINT_PROBLEM] = start.problem[:5000]
    if checkpoint_from_run:
        attempt_tags[Tag.RESUMED_FROM_RUN] = checkpoint_from_run
        if start.path is not None:  # recorded with the run's first tags, not after it (a write that could be lost)
            attempt_tags[Tag.RESUMED_FROM_EPOCH] = str(start.epoch)
    if resume_run_id:
        store.reopen_run(resume_run_id)
        store.set_tags(resume_run_id, attempt_tags)
        return resume_run_id
    attempt_tags |= {Tag.ATTEMPT: str(start.attempt), Tag.INIT_SEED: str(start.seed)}
    if retry_of:
        attempt_tags[Tag.COLLAPSE_RETRY_OF] = retry_of
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
        store.set_tags(retry_of, {Tag.COLLAPSE_RETRIED_BY: run_id})
    return run_id


def _train_run(cfg: TrainConfig, data: Dataset, device: torch.device, run_id: str, start: _Start, *,
               hooks: Sequence[Hooks], resumed: bool, checkpoint_every: int, log_model: bool,
               register: str | None) -> TrainResult:
    """Train one attempt into ``run_id`` and record how it ended (an exception marks the run failed or killed).

    ``engine.train`` returns or raises only once its writer thread has written and uploaded every record."""
    all_hooks = HookList([MlflowHooks(run_id, checkpoint_every), *hooks])
    with tempfile.TemporaryDirectory(prefix="allconv-ckpt-") as checkpoint_dir, \
            store.system_metrics(run_id, resume=resumed):
        try:
            result = train(cfg, data, device=device, checkpoint_dir=Path(checkpoint_dir), hooks=all_hooks,
                           resume_from=start.path, seed=start.seed)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                status = Status.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else Status.FAILED
                store.mark_failed(run_id, f"{type(exc).__name__}: {exc}", status.mlflow)
            raise
        result.status = Status(result.status)
        finish_run(run_id, result, cfg=cfg, data=data, log_model=log_model, register=register)
    return result


class MlflowHooks(Hooks):
    """Logs each epoch's metrics in one batch call and uploads the rolling ``last`` and ``best`` checkpoints.

    Both run on the engine's writer thread (``on_epoch_record``, ``on_checkpoint``): the training thread never waits
    on the store. An upload that fails after :func:`~allconv_cli.tracking.store.retrying`'s budget raises there and
    ends the run on the training thread.
    """

    def __init__(self, run_id: str, checkpoint_every: int = 1) -> None:
        self.run_id = run_id
        self.checkpoint_every = max(1, checkpoint_every)

    def on_epoch_record(self, metrics: EpochMetrics) -> None:
        store.log_metrics(self.run_id, {k: v for k, v in metrics.as_dict().items() if k != "epoch"},
                          step=metrics.epoch)

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        if kind == "last" and epoch % self.checkpoint_every:
            return
        store.log_artifact(self.run_id, str(path), Artifact.CHECKPOINTS)
        store.set_tags(self.run_id, {Tag.CHECKPOINT_LAST_EPOCH if kind == "last" else Tag.CHECKPOINT_BEST_EPOCH:
                                     str(epoch)})


def finish_run(run_id: str, result: TrainResult, *, cfg: TrainConfig | None = None, data: Dataset | None = None,
               log_model: bool = True, register: str | None = None) -> None:
    """Record the outcome: final metrics, status and reason tags, the models, and the MLflow run status."""
    status = Status(result.status)
    store.log_metrics(run_id, {
        Metric.TEST_ACCURACY: result.test_accuracy,
        Metric.TEST_LOSS: result.test_loss,
        Metric.TEST_ERROR: result.test_error,
        Metric.FINAL_VAL_ACCURACY: result.val_accuracy,
        Metric.BEST_VAL_ACCURACY: result.best_val_accuracy,
        Metric.MEAN_IMAGES_PER_SECOND: result.images_per_second,
        Metric.TOTAL_SECONDS: result.seconds,
    }, step=result.epochs_completed)
    tags = {Tag.STATUS: status.value, Tag.EPOCHS_COMPLETED: str(result.epochs_completed)}
    if result.dead_classes:  # a partly (or wholly) dead head: these classes had no positive score on validation
        tags[Tag.DEAD_CLASSES] = ",".join(map(str, result.dead_classes))
    if result.reason:
        tags[Tag.REASON] = result.reason
    store.set_tags(run_id, tags)
    if log_model and status == Status.FINISHED and cfg is not None and data is not None:
        log_models(run_id, cfg, result.model, data, register=register)
    store.set_run_status(run_id, status.mlflow)
