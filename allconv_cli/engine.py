"""The training loop: the paper's protocol, whole dataset on the device, hooks for everything else.

This module knows nothing of MLflow, Optuna or the CLI. It trains one network on one :class:`~allconv_cli.data.Dataset`
and reports through :class:`Hooks` (epoch end, checkpoint written, should we stop?), so the same loop serves
``allconv train``, every search trial and ``allconv reproduce``. Batches are slices of tensors that already live on the
device (no DataLoader), so on a GPU a step is pure device work; bf16 autocast and channels_last are used on CUDA.
What is slow and not training (checkpoint files, their uploads, metric logging) runs on one writer thread
(:mod:`allconv_cli.background`), so the next epoch starts as soon as this one is evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli import models
from allconv_cli.background import BackgroundWriter
from allconv_cli.checkpoints import CheckpointError, CheckpointWriter, TrainState, load_checkpoint, restore
from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, Split, augment_batch, iterate_batches
from allconv_cli.errors import AllconvError
from allconv_cli.evaluation import (
    CollapseWatch,
    Evaluation,
    autocast,
    evaluate,
    evaluate_split,
    health_split,
    precision,
)
from allconv_cli.paper import error_percent

__all__ = [
    "CheckpointError",
    "Ending",
    "EpochMetrics",
    "HookList",
    "Hooks",
    "TrainResult",
    "TrainState",
    "attempt_seed",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "precision",
    "resolve_device",
    "setup",
    "steps_per_epoch",
    "train",
    "train_epoch",
]


@dataclass
class EpochMetrics:
    """What one epoch measured; ``None`` fields were not measured (no validation split, test not due)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    lr: float
    epoch_seconds: float
    images_per_second: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None
    alive_classes: int | None = None  # class channels not dead on the validation split (see evaluation.py)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Hooks:
    """Callbacks of the training loop. The defaults do nothing; override what you need.

    Threads: ``on_start``, ``on_batch_end``, ``on_epoch_end`` and ``should_stop`` run on the training thread, in
    that order each epoch, and sit on its critical path: they must return quickly (no store writes, no uploads).
    ``on_epoch_record`` and ``on_checkpoint`` run on the run's one writer thread
    (:class:`~allconv_cli.background.BackgroundWriter`), in epoch order (epoch N's record, then its checkpoints,
    then epoch N+1's); they may block (a store, an upload), and must not touch what the training thread uses. An
    exception in one of them ends the run: it is raised on the training thread at its next hand-over, or when
    :func:`train` returns. :func:`train` returns (or raises) only after every record handed over has run, Ctrl-C
    included, so the last checkpoint is complete and reported when the caller goes on.
    """

    def on_start(self, cfg: TrainConfig, model: nn.Module, start_epoch: int) -> None:
        """Called once before the first epoch (``start_epoch`` > 0 when resuming). Training thread."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        """Called after every finished epoch, before its checkpoint is handed over. Training thread: be quick."""

    def on_epoch_record(self, metrics: EpochMetrics) -> None:
        """The same epoch's metrics (a copy) to record somewhere slow (a metric store). Writer thread."""

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        """``path`` is complete: ``kind`` is ``last`` (written every epoch) or ``best`` (best validation accuracy
        so far). Writer thread; the next checkpoint is not written until this returns."""

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        """Return a status (a :class:`~allconv_cli.tracking.schema.Status` value, e.g. ``pruned``) to end training
        after this epoch, or None to go on. Training thread."""
        return None

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        """Called after every optimizer step, for progress bars; must be cheap and must not synchronise."""


class HookList(Hooks):
    """Several hooks called in order; the first non-None ``should_stop`` wins."""

    def __init__(self, hooks: Iterable[Hooks]) -> None:
        self.hooks = list(hooks)

    def on_start(self, cfg: TrainConfig, model: nn.Module, start_epoch: int) -> None:
        for hook in self.hooks:
            hook.on_start(cfg, model, start_epoch)

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        for hook in self.hooks:
            hook.on_epoch_end(metrics)

    def on_epoch_record(self, metrics: EpochMetrics) -> None:
        for hook in self.hooks:
            hook.on_epoch_record(metrics)

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        for hook in self.hooks:
            hook.on_checkpoint(path, kind, epoch)

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        return next((r for r in (h.should_stop(metrics) for h in self.hooks) if r), None)

    def on_batch_end(self, epoch: int, images_seen: int, images_total: int) -> None:
        for hook in self.hooks:
            hook.on_batch_end(epoch, images_seen, images_total)


@dataclass
class TrainResult:
    """How a run ended. ``status``: a :class:`~allconv_cli.tracking.schema.Status` value: finished, diverged,
    collapsed, interrupted, or what ``should_stop`` returned (``run_tracked`` turns it into the Status itself)."""

    status: str
    epochs_completed: int  # the epoch of the last checkpoint written
    model: nn.Module
    reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    images_per_second: float = 0.0
    seconds: float = 0.0
    seed: int | None = None  # of the model init, dropout and batch order (the data split is cfg.seed's)
    dead_classes: tuple[int, ...] | None = None  # class channels dead after the last epoch; None: not measured

    @property
    def test_error(self) -> float | None:
        return error_percent(self.test_accuracy)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("model", "history")}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; a CUDA device that is not there is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise AllconvError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AllconvError(f"device {name!r} requested but CUDA is not available here: use --device cpu")
    return device


def attempt_seed(seed: int, attempt: int) -> int:
    """The model-init, dropout and batch-order seed of attempt ``attempt`` (1, 2, ...) of a run seeded ``seed``.

    Attempt 1 uses ``seed`` itself (so a run is what it always was); a retry after a collapse gets a new, fixed
    32-bit seed derived from both. The data split always stays ``seed``'s: only the network's luck changes.
    """
    if attempt <= 1:
        return seed
    digest = hashlib.sha256(f"allconv-attempt:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def build_model(cfg: TrainConfig, num_classes: int) -> models.AllConvNet:
    return models.build(
        cfg.model,
        cfg.branch,
        num_classes=num_classes,
        bn=cfg.bn,
        dropout_input=cfg.dropout_input,
        dropout_hidden=cfg.dropout_hidden,
        init=cfg.init,
        init_std=cfg.init_std,
        head_relu=cfg.head_relu,
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The paper's SGD is *classic* momentum (timm calls it ``momentum``; timm's ``sgd`` is Nesterov).

    Weight decay applies to every parameter, as in the paper's Caffe-era setup (no bias/BN exclusion).
    """
    params = model.parameters()
    fast = {"fused": True} if device.type == "cuda" else {}  # one kernel per step instead of one per tensor
    if cfg.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.optimizer == "nesterov",
            **fast,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``n_images``: full batches only, unless one partial batch is all there is."""
    return n_images // batch_size if n_images > batch_size else int(n_images > 0)


def setup(cfg: TrainConfig, num_classes: int, device: torch.device, *, steps: int, resume_from: Path | None = None,
          seed: int | None = None) -> TrainState:
    """Seed (``seed``, default ``cfg.seed``), build the model on ``device`` (channels_last), its optimizer, the lr
    schedule over ``steps`` optimizer steps per epoch (stepped per step: :meth:`TrainConfig.lr_milestone_steps`)
    and the batch-order generator; restore ``resume_from`` if given; compile last. Training and the benchmark start
    from the same state."""
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, num_classes).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestone_steps(steps), gamma=cfg.lr_gamma)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    state = TrainState(cfg, device, model, model, optimizer, scheduler, generator, seed=seed)
    if resume_from is not None:
        restore(state, load_checkpoint(resume_from, map_location=device))
    if cfg.compile:
        state.step_model = torch.compile(model, mode=cfg.compile_mode)
    return state


@dataclass(frozen=True)
class Ending:
    """Why the epochs stopped: a :class:`~allconv_cli.tracking.schema.Status` value (the engine may not import the
    schema, tests/test_layout.py: ``TrainResult.status`` is turned into a Status by the tracked run) and why."""

    status: str
    reason: str = ""


def train(
    cfg: TrainConfig,
    data: Dataset,
    *,
    device: torch.device,
    checkpoint_dir: Path,
    hooks: Hooks | None = None,
    resume_from: Path | None = None,
    seed: int | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (already on ``device``); checkpoint every epoch; resume exactly from a checkpoint.

    Each epoch: train, evaluate (one pass: :func:`~allconv_cli.evaluation.evaluate_split`), record, hand the
    records and the checkpoint to the writer thread, then the stop checks (divergence before, collapse
    (:class:`~allconv_cli.evaluation.CollapseWatch`) and the hooks after). Returns once every record has been
    written, Ctrl-C included (then ``interrupted``, resumable from the last checkpoint).

    The run is deterministic for a seed on CPU: model init and dropout draw from the global torch RNG seeded here
    with ``seed`` (default ``cfg.seed``; :func:`attempt_seed` for a retry), shuffling and augmentation from a
    dedicated generator, and all three states travel in the checkpoint.
    """
    hooks = hooks or Hooks()
    started = time.perf_counter()
    state = setup(cfg, data.num_classes, device, steps=steps_per_epoch(len(data.train), cfg.batch_size),
                  resume_from=resume_from, seed=seed)
    hooks.on_start(cfg, state.model, state.epoch)
    watch, ending = CollapseWatch(cfg, data.num_classes), None
    with BackgroundWriter() as writer:
        saver = CheckpointWriter(checkpoint_dir, data.fingerprint, writer, hooks.on_checkpoint, state.epoch)
        try:
            for epoch in range(state.epoch + 1, cfg.epochs + 1):
                metrics = train_epoch(state, data.train, epoch, hooks)
                if ending := diverged(metrics):
                    break
                evaluation = evaluate_epoch(state, data, metrics)
                best = record_epoch(state, metrics)
                collapse = watch.observe(state, evaluation)  # counted before the checkpoint, which keeps the count
                hooks.on_epoch_end(metrics)
                writer.submit(hooks.on_epoch_record, dataclasses.replace(metrics))
                saver.save(state, best=best)
                if ending := stop_reason(collapse, hooks, metrics):
                    break
        except KeyboardInterrupt:
            ending = Ending("interrupted")
    return result_of(state, ending or Ending("finished"), data, watch.dead_classes, saver.epoch, started)


def evaluate_epoch(state: TrainState, data: Dataset, metrics: EpochMetrics) -> Evaluation:
    """The epoch's one evaluation pass (on validation, else on the first training images: :func:`health_split`),
    written into ``metrics``; plus the test split when ``--test-every`` is due."""
    cfg = state.cfg
    evaluation = evaluate_split(state.model, health_split(data.val, data.train), amp=cfg.amp, head_relu=cfg.head_relu)
    if data.val is not None:
        metrics.val_loss, metrics.val_accuracy = evaluation.loss, evaluation.accuracy
    metrics.alive_classes = data.num_classes - len(evaluation.dead_classes)
    if cfg.test_every and metrics.epoch % cfg.test_every == 0:
        metrics.test_loss, metrics.test_accuracy = evaluate(state.model, data.test, amp=cfg.amp)
    return evaluation


def record_epoch(state: TrainState, metrics: EpochMetrics) -> bool:
    """Append the epoch to the history, mark it done and keep the best; True when it is the best so far."""
    state.history.append(metrics.as_dict())
    state.epoch = metrics.epoch
    best = state.best_val_accuracy
    improved = metrics.val_accuracy is not None and (best is None or metrics.val_accuracy > best)
    if improved:
        state.best_val_accuracy, state.best_epoch = metrics.val_accuracy, metrics.epoch
    return improved


def diverged(metrics: EpochMetrics) -> Ending | None:
    """A training loss that is NaN or infinite ends the run (the epoch is not recorded)."""
    if math.isfinite(metrics.train_loss):
        return None
    return Ending("diverged", f"training loss became {metrics.train_loss} in epoch {metrics.epoch}")


def stop_reason(collapse: str | None, hooks: Hooks, metrics: EpochMetrics) -> Ending | None:
    """A collapse (:class:`CollapseWatch`'s reason) first, then a hook's ``should_stop`` (e.g. the pruner); None: go
    on."""
    if collapse:
        return Ending("collapsed", collapse)
    stop = hooks.should_stop(metrics)
    return Ending(stop, f"stopped by a hook after epoch {metrics.epoch}") if stop else None


def result_of(state: TrainState, ending: Ending, data: Dataset, dead: tuple[int, ...] | None, completed: int,
              started: float) -> TrainResult:
    """The run's result; ``completed`` is the epoch of the last checkpoint on disk (the writer is flushed). A
    finished run is tested once."""
    if ending.status == "interrupted":
        ending = Ending(ending.status, f"interrupted during epoch {completed + 1}; the last checkpoint holds epoch "
                                       f"{completed}")
    history = [h for h in state.history if h["epoch"] <= completed]
    result = TrainResult(status=ending.status, reason=ending.reason, epochs_completed=completed, model=state.model,
                         history=history, best_val_accuracy=state.best_val_accuracy, best_epoch=state.best_epoch,
                         seed=state.seed, dead_classes=dead)
    if history:
        result.val_accuracy = history[-1].get("val_accuracy")
        result.val_loss = history[-1].get("val_loss")
        speeds = [h["images_per_second"] for h in history[1:] or history]
        result.images_per_second = sum(speeds) / len(speeds)
    if ending.status == "finished":
        result.test_loss, result.test_accuracy = evaluate(state.model, data.test, amp=state.cfg.amp)
    result.seconds = time.perf_counter() - started
    return result


def train_epoch(state: TrainState, split: Split, epoch: int, hooks: Hooks | None = None) -> EpochMetrics:
    """One pass over ``split`` (on ``state.device``) in shuffled batches of ``cfg.batch_size``, dropping the last
    partial batch when there is more than one (:func:`steps_per_epoch`): augmentation, forward, loss, backward,
    optimizer step, lr schedule step. ``lr`` in the metrics is the lr the epoch started with."""
    hooks = hooks or Hooks()
    cfg, model, optimizer, device = state.cfg, state.step_model, state.optimizer, state.device
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    drop_last = len(split) > cfg.batch_size
    total = steps_per_epoch(len(split), cfg.batch_size) * cfg.batch_size if drop_last else len(split)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x, y in iterate_batches(split, cfg.batch_size, shuffle=True, generator=state.generator, drop_last=drop_last):
        x = augment_batch(x, cfg.augment, state.generator).contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        hooks.on_batch_end(epoch, seen, total)
    train_loss = loss_sum.item() / max(seen, 1)  # .item() synchronises, so the clock below is honest
    seconds = time.perf_counter() - start
    return EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        train_accuracy=correct.item() / max(seen, 1),
        lr=lr,
        epoch_seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else 0.0,
    )
