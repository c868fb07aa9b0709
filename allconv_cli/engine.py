"""The training loop: the paper's protocol, whole dataset on the device, hooks for everything else.

This module knows nothing of MLflow, Optuna or the CLI. It trains one network on one :class:`~allconv_cli.data.Dataset`
and reports through :class:`Hooks` (epoch end, checkpoint written, should we stop?), so the same loop serves
``allconv train``, every search trial and ``allconv reproduce``. Batches are slices of tensors that already live on the
device (no DataLoader), so on a GPU a step is pure device work; bf16 autocast and channels_last are used on CUDA.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allconv_cli import models
from allconv_cli.checkpoints import CheckpointError, checkpoint_of, load_checkpoint, restore, save_checkpoint
from allconv_cli.config import TrainConfig
from allconv_cli.data import Dataset, Split, augment_batch, iterate_batches
from allconv_cli.errors import AllconvError
from allconv_cli.paper import error_percent

__all__ = [
    "CheckpointError",
    "EpochMetrics",
    "HookList",
    "Hooks",
    "TrainResult",
    "TrainState",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "output_is_constant",
    "resolve_device",
    "setup",
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

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Hooks:
    """Callbacks of the training loop. The defaults do nothing; override what you need."""

    def on_start(self, cfg: TrainConfig, model: nn.Module, start_epoch: int) -> None:
        """Called once before the first epoch (``start_epoch`` > 0 when resuming)."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        """Called after every finished epoch, before its checkpoint is reported."""

    def on_checkpoint(self, path: Path, kind: str, epoch: int) -> None:
        """``kind`` is ``last`` (written every epoch) or ``best`` (best validation accuracy so far)."""

    def should_stop(self, metrics: EpochMetrics) -> str | None:
        """Return a status (e.g. ``pruned``) to end training after this epoch, or None to go on."""
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
    """How a run ended. ``status``: finished, diverged, collapsed, interrupted, or what ``should_stop`` returned."""

    status: str
    epochs_completed: int
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


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, amp: bool = True, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split, in large batches without gradients (dropout off)."""
    was_training = model.training
    model.eval()
    device = split.x.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        with _autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = max(len(split), 1)
    return loss_sum.item() / n, correct.item() / n


@torch.no_grad()
def output_is_constant(model: nn.Module, split: Split, n: int = 256) -> bool:
    """True when the network gives every input the same logits: all ReLUs before the head are dead.

    Seen on an H100 with the paper's All-CNN-C (no BN, lr 0.05, Xavier init, ReLU on the class scores): after one
    epoch every logit was 0 for every image and the validation loss sat at exactly ln(10) for the remaining 265
    epochs. No gradient flows through a dead ReLU, so such a run can never recover and is stopped early.
    """
    was_training = model.training
    model.eval()
    logits = model(split.x[:n]).float()
    model.train(was_training)
    return bool((logits - logits[:1]).abs().max() <= 1e-6 * (1 + logits.abs().max()))


@dataclass
class TrainState:
    """What a run carries from epoch to epoch, made by :func:`setup`; :mod:`~allconv_cli.checkpoints` stores it."""

    cfg: TrainConfig
    device: torch.device
    model: models.AllConvNet
    step_model: nn.Module  # what the steps call: ``torch.compile(model)`` when cfg.compile, else ``model`` itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffling and augmentation, on ``device``
    epoch: int = 0  # epochs completed
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    constant_epochs: int = 0  # epochs in a row with the same output for every input (see output_is_constant)


def setup(cfg: TrainConfig, num_classes: int, device: torch.device, *, resume_from: Path | None = None) -> TrainState:
    """Seed, build the model on ``device`` (channels_last), its optimizer, lr schedule and batch-order generator;
    restore ``resume_from`` if given; compile last. Training and the benchmark start from the same state."""
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, num_classes).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestones(), gamma=cfg.lr_gamma)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    state = TrainState(cfg, device, model, model, optimizer, scheduler, generator)
    if resume_from is not None:
        restore(state, load_checkpoint(resume_from, map_location=device))
    if cfg.compile:
        state.step_model = torch.compile(model, mode=cfg.compile_mode)
    return state


def train(
    cfg: TrainConfig,
    data: Dataset,
    *,
    device: torch.device,
    checkpoint_dir: Path,
    hooks: Hooks | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (already on ``device``); checkpoint every epoch; resume exactly from a checkpoint.

    The run is deterministic for a seed on CPU: model init and dropout draw from the global torch RNG seeded here,
    shuffling and augmentation from a dedicated generator, and all three states travel in the checkpoint.
    """
    hooks = hooks or Hooks()
    started = time.perf_counter()
    state = setup(cfg, data.num_classes, device, resume_from=resume_from)
    model = state.model
    hooks.on_start(cfg, model, state.epoch)

    status, reason, epoch = "finished", "", state.epoch
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            metrics = train_epoch(state, data.train, epoch, hooks)
            if not math.isfinite(metrics.train_loss):
                status, reason = "diverged", f"training loss became {metrics.train_loss} in epoch {epoch}"
                epoch -= 1
                break
            state.scheduler.step()
            constant = output_is_constant(model, data.val or data.train)
            state.constant_epochs = state.constant_epochs + 1 if constant else 0
            if data.val is not None:
                metrics.val_loss, metrics.val_accuracy = evaluate(model, data.val, amp=cfg.amp)
            if cfg.test_every and epoch % cfg.test_every == 0:
                metrics.test_loss, metrics.test_accuracy = evaluate(model, data.test, amp=cfg.amp)
            state.history.append(metrics.as_dict())
            best = state.best_val_accuracy
            improved = metrics.val_accuracy is not None and (best is None or metrics.val_accuracy > best)
            if improved:
                state.best_val_accuracy, state.best_epoch = metrics.val_accuracy, epoch
            state.epoch = epoch
            hooks.on_epoch_end(metrics)
            last = checkpoint_dir / "last.pt"
            save_checkpoint(last, checkpoint_of(state, data.fingerprint))
            hooks.on_checkpoint(last, "last", epoch)
            if improved:
                shutil.copyfile(last, checkpoint_dir / "best.pt")
                hooks.on_checkpoint(checkpoint_dir / "best.pt", "best", epoch)
            if cfg.collapse_patience and state.constant_epochs >= cfg.collapse_patience:
                status = "collapsed"
                reason = (
                    f"the network's output has been the same for every input for {state.constant_epochs} epochs "
                    f"(dead ReLUs; it cannot recover), stopped after epoch {epoch}"
                )
                break
            stop = hooks.should_stop(metrics)
            if stop:
                status, reason = stop, f"stopped by a hook after epoch {epoch}"
                break
    except KeyboardInterrupt:
        status, reason = "interrupted", f"interrupted during epoch {epoch}; the last checkpoint holds epoch {epoch - 1}"
        epoch -= 1

    history = state.history
    result = TrainResult(
        status=status,
        reason=reason,
        epochs_completed=epoch,
        model=model,
        history=history,
        best_val_accuracy=state.best_val_accuracy,
        best_epoch=state.best_epoch,
    )
    if history:
        result.val_accuracy = history[-1].get("val_accuracy")
        result.val_loss = history[-1].get("val_loss")
        speeds = [h["images_per_second"] for h in history[1:] or history]
        result.images_per_second = sum(speeds) / len(speeds)
    if status == "finished":
        result.test_loss, result.test_accuracy = evaluate(model, data.test, amp=cfg.amp)
    result.seconds = time.perf_counter() - started
    return result


def train_epoch(state: TrainState, split: Split, epoch: int, hooks: Hooks | None = None) -> EpochMetrics:
    """One pass over ``split`` (on ``state.device``) in shuffled batches of ``cfg.batch_size``, dropping the last
    partial batch when there is more than one: augmentation, forward, loss, backward, optimizer step. The lr
    schedule is the caller's (``state.scheduler.step()`` after the epoch)."""
    hooks = hooks or Hooks()
    cfg, model, optimizer, device = state.cfg, state.step_model, state.optimizer, state.device
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    drop_last = len(split) > cfg.batch_size
    total = len(split) // cfg.batch_size * cfg.batch_size if drop_last else len(split)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x, y in iterate_batches(split, cfg.batch_size, shuffle=True, generator=state.generator, drop_last=drop_last):
        x = augment_batch(x, cfg.augment, state.generator).contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
