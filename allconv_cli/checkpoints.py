"""Checkpoints: what an exact resume needs from a :class:`~allconv_cli.engine.TrainState`, written atomically and read
back with every kind of damage turned into one clear error. Reading one needs no training loop (tracking does)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from allconv_cli.errors import AllconvError

if TYPE_CHECKING:
    from allconv_cli.engine import TrainState

CHECKPOINT_FORMAT = 1


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
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an allconv checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def checkpoint_of(state: TrainState, data_fingerprint: str) -> dict[str, Any]:
    """Everything an exact resume needs: weights, optimizer, lr schedule, the three RNG states, the run's history."""
    cuda = state.device.type == "cuda"
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
