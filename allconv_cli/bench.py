"""Throughput benchmark: the engine's real training step and evaluation on synthetic on-device data.

It times :func:`allconv_cli.engine.train_epoch` itself (shuffle, slicing, augmentation, forward, backward,
optimizer step) on the state :func:`allconv_cli.engine.setup` makes for training, after a warm-up (cudnn autotuning,
torch.compile), synchronising the device around the clock.
``baseline`` times the loop most PyTorch code would write instead: a torchvision-style dataset of uint8 images
through PIL with ``ToTensor``/``Normalize`` transforms, a ``DataLoader``, NCHW float32 — so the ratio says what the
on-device pipeline and channels_last buy on this machine.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from allconv_cli.config import TrainConfig
from allconv_cli.data import Split, random_split
from allconv_cli.engine import TrainState, build_model, evaluate, resolve_device, setup, train_epoch


@dataclass
class BenchResult:
    device: str
    batch_size: int
    steps: int
    train_images_per_second: float
    eval_images_per_second: float
    ms_per_step: float
    peak_memory_mb: float
    compile: bool
    amp: bool
    baseline_images_per_second: float | None = None
    speedup_vs_baseline: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    cfg: TrainConfig,
    *,
    steps: int = 20,
    warmup: int = 3,
    eval_images: int = 5000,
    baseline: bool = False,
    baseline_workers: int = 0,
    rounds: int = 1,
    say: Callable[[str], None] = lambda text: None,
) -> BenchResult:
    """Time ``steps`` training steps of ``cfg``'s network (after ``warmup`` steps) and an evaluation pass.

    With ``rounds`` > 1 the timed steps (and the baseline, when asked) run that many times, alternating, and the
    best round of each counts: on a shared machine, best-of-N is the figure least disturbed by other load.
    ``say`` hears each stage as it starts (a slow CPU takes minutes: the user sees what is being timed).
    """
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = setup(cfg, 10, device, steps=steps)
    say(f"warm-up: {warmup} step{'s' * (warmup != 1)}")
    time_steps(state, warmup)
    seconds, baseline_ips = float("inf"), 0.0
    for round_ in range(1, max(1, rounds) + 1):
        say(f"round {round_}: {steps} training steps" if rounds > 1 else f"{steps} training steps")
        seconds = min(seconds, time_steps(state, steps))
        if baseline:
            say(f"baseline: {warmup} + {steps} steps through a DataLoader, PIL and ToTensor/Normalize")
            baseline_ips = max(baseline_ips, baseline_loop(cfg, steps=steps, warmup=warmup, workers=baseline_workers))
    say(f"evaluation: {eval_images:,} images")
    eval_seconds = time_evaluation(state.model, random_split(eval_images, device, seed=1), cfg.amp, device)
    result = BenchResult(
        device=str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        batch_size=cfg.batch_size,
        steps=steps,
        train_images_per_second=steps * cfg.batch_size / seconds,
        eval_images_per_second=eval_images / eval_seconds,
        ms_per_step=1000 * seconds / steps,
        peak_memory_mb=_peak_memory_mb(device),
        compile=cfg.compile,
        amp=cfg.amp and device.type == "cuda",
    )
    if baseline:
        result.baseline_images_per_second = baseline_ips
        result.speedup_vs_baseline = result.train_images_per_second / result.baseline_images_per_second
    return result


def time_steps(state: TrainState, n_steps: int) -> float:
    """Seconds of ``n_steps`` real training steps of ``state`` (:func:`~allconv_cli.engine.train_epoch` on random
    on-device data of the real shapes), the device synchronised around the clock. The one step timer: ``bench``
    and the time estimate (:mod:`allconv_cli.estimate`) both use it."""
    device = state.device
    train = random_split(n_steps * state.cfg.batch_size, device)
    _sync(device)
    start = time.perf_counter()
    train_epoch(state, train, 1)
    _sync(device)
    return time.perf_counter() - start


def time_evaluation(model: torch.nn.Module, split: Split, amp: bool, device: torch.device) -> float:
    """Seconds of one evaluation pass over ``split``, after one untimed pass (the eval shapes' warm-up)."""
    evaluate(model, split, amp=amp)
    _sync(device)
    start = time.perf_counter()
    evaluate(model, split, amp=amp)
    _sync(device)
    return time.perf_counter() - start


class _UInt8Images(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def baseline_loop(cfg: TrainConfig, *, steps: int, warmup: int, workers: int = 0) -> float:
    """Images/s of a plain PyTorch training loop: DataLoader + ToTensor/Normalize, NCHW, same model and batch."""
    from torchvision import transforms

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    n = (steps + warmup) * cfg.batch_size
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))]
    )
    loader = torch.utils.data.DataLoader(
        _UInt8Images(images, labels, transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    model.train()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)
