"""Checkpoints: the :class:`TrainState` a run carries from epoch to epoch, what an exact resume needs of it, written
atomically off the training thread and read back with every kind of damage turned into one clear error.

Reading one needs no training loop (tracking does), so this module imports nothing of the engine; the engine
imports it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from allconv_cli.background import BackgroundWriter
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError

CHECKPOINT_FORMAT = 2  # 2: the lr schedule steps per optimizer step (1 stepped per epoch: not resumable exactly)


@dataclass
class TrainState:
    """What a run carries from epoch to epoch, made by :func:`allconv_cli.engine.setup`; a checkpoint stores it."""

    cfg: TrainConfig
    device: torch.device
    model: nn.Module
    step_model: nn.Module  # what the steps call: ``torch.compile(model)`` when cfg.compile, else ``model`` itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped after every optimizer step
    generator: torch.Generator  # shuffling and augmentation, on ``device``
    epoch: int = 0  # epochs completed
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    constant_epochs: int = 0  # epochs in a row that were dead (evaluation.CollapseWatch keeps the count)
    seed: int = 0  # of the init, dropout and batch order (cfg.seed unless a retry after a collapse chose another)


class CheckpointError(AllconvError):
    """A checkpoint that cannot be read back (truncated, corrupted, or from another format)."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a crash mid-write never leaves a half checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint, turning any corruption into a :class:`CheckpointError` that names the file."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist: start without --resume") from exc
    except Exception as exc:  # zip/unpickling errors come in many types
        raise CheckpointError(
            f"checkpoint {path} is corrupted or unreadable ({type(exc).__name__}): delete it or start from scratch"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an allconv checkpoint (format {CHECKPOINT_FORMAT})")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')} (an older allconv, whose lr "
                              f"schedule stepped per epoch); this allconv reads format {CHECKPOINT_FORMAT}: start "
                              "from scratch")
    return state


class CheckpointWriter:
    """Each epoch's ``last.pt`` (and ``best.pt`` when the epoch improved), written on a :class:`BackgroundWriter`.

    :meth:`save` takes a copy of the state on the training thread and hands the write over; on the writer thread
    the file is written atomically, then ``on_written(path, kind, epoch)`` is called (the hooks' ``on_checkpoint``:
    an upload). :attr:`epoch` is the epoch of ``last.pt`` on disk (read it once the writer is flushed).
    """

    def __init__(self, directory: Path, data_fingerprint: str, writer: BackgroundWriter,
                 on_written: Callable[[Path, str, int], None], epoch: int = 0) -> None:
        self.directory, self.data_fingerprint, self.writer = directory, data_fingerprint, writer
        self.on_written = on_written
        self.epoch = epoch

    def save(self, state: TrainState, best: bool) -> None:
        self.writer.submit(self._write, checkpoint_of(state, self.data_fingerprint), state.epoch, best)

    def _write(self, checkpoint: dict[str, Any], epoch: int, best: bool) -> None:
        last = self.directory / "last.pt"
        save_checkpoint(last, checkpoint)
        self.epoch = epoch
        self.on_written(last, "last", epoch)
        if best:
            copy_checkpoint(last, self.directory / "best.pt")
            self.on_written(self.directory / "best.pt", "best", epoch)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy atomically (temp file + rename), as :func:`save_checkpoint` writes."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def checkpoint_of(state: TrainState, data_fingerprint: str) -> dict[str, Any]:
    """Everything an exact resume needs: weights, optimizer, lr schedule, the three RNG states, the run's history.

    A copy (tensors cloned on their device, no host sync): it is written on another thread while the next steps
    change the live parameters and optimizer buffers in place. On the CPU the copy runs on one thread: it is
    memory-bound, and waking the intra-op pool for each of ~80 small tensors cost ~100 ms on a busy 2-core machine
    (3 ms on one thread)."""
    cuda = state.device.type == "cuda"
    with contextlib.nullcontext() if cuda else _one_cpu_thread():
        return copy.deepcopy(_checkpoint_dict(state, data_fingerprint, cuda))


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _checkpoint_dict(state: TrainState, data_fingerprint: str, cuda: bool) -> dict[str, Any]:
    """The live state as a checkpoint: views of the tensors the run goes on changing (:func:`checkpoint_of` copies)."""
    return {
        "epoch": state.epoch,
        "config": state.cfg.to_dict(),
        "device_type": state.device.type,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(state.device) if cuda else None,
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "data_fingerprint": data_fingerprint,
        "constant_epochs": state.constant_epochs,
        "seed": state.seed,
    }


def restore(state: TrainState, checkpoint: dict[str, Any]) -> None:
    """Continue ``state`` (fresh from :func:`~allconv_cli.engine.setup`) from a :func:`checkpoint_of` dict."""
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["torch_rng"].cpu())
    if checkpoint.get("device_type") == state.device.type:
        state.generator.set_state(checkpoint["generator"].cpu())
    else:  # another device type: shuffles differ from here on, everything else is exact
        state.generator.manual_seed(checkpoint.get("seed", state.seed) + checkpoint["epoch"])
    if state.device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(checkpoint["cuda_rng"].cpu(), state.device)
    state.epoch, state.best_val_accuracy = checkpoint["epoch"], checkpoint["best_val_accuracy"]
    state.best_epoch = checkpoint["best_epoch"]
    state.history = list(checkpoint["history"])
    state.constant_epochs = checkpoint.get("constant_epochs", 0)
    state.seed = checkpoint.get("seed", state.seed)
