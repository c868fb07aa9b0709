"""How long an epoch, a run and a study will take here, measured before anything trains.

A guess table is wrong on the next machine (README timings were off 2.5-3x on another CPU), so the estimate times
the run's own step: :func:`allconv_cli.engine.setup` and a few :func:`~allconv_cli.engine.train_epoch` steps of the
real config on the chosen device, with bench's timer (:func:`allconv_cli.bench.time_steps`) after one warm-up step,
plus one evaluation batch; then scales by the data's sizes. On a CPU a step of the paper's networks takes seconds, so
it times as few steps as give a stable figure: about half a second's worth, at least two.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

import torch

from allconv_cli.bench import time_evaluation, time_steps
from allconv_cli.config import DataConfig, TrainConfig
from allconv_cli.data import Dataset, random_split, split_sizes
from allconv_cli.engine import resolve_device, setup, steps_per_epoch
from allconv_cli.evaluation import ALIVE_SAMPLE

DAY = 86_400.0
# Seconds of timed steps to aim for after the warm-up: every run pays them before it trains, and a median of five
# samples of fast steps is already within 2x; a slow step is timed at least twice whatever the budget.
STEP_BUDGET = 0.5
SAMPLE_SECONDS = 0.1  # steps per timed sample: as many as take this long (one where a step takes longer)
# sampled fields that change how long a trial takes (the estimate is the base config's)
TIME_FIELDS = ("model", "branch", "batch_size", "bn", "epochs", "subset", "val_size", "augment", "compile")
CIFAR_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}  # used only when no data was loaded


@dataclass(frozen=True)
class Sizes:
    """Images per split of a run's data: training (steps per epoch), validation (each epoch's pass), test (once)."""

    train: int
    val: int
    test: int

    @classmethod
    def nominal(cls, cfg: DataConfig) -> Sizes:
        """The sizes ``cfg`` asks for, without loading anything (a space that samples the data loads per trial)."""
        n_train, n_test = (cfg.fake_train_size, cfg.fake_test_size) if cfg.dataset == "fake" \
            else CIFAR_SIZES.get(cfg.dataset, (50_000, 10_000))
        return cls(cfg.subset or n_train - cfg.val_size, cfg.val_size, min(cfg.test_size or n_test, n_test))

    @classmethod
    def of(cls, data: Dataset) -> Sizes:
        return cls(*split_sizes(data))


@dataclass(frozen=True)
class Measurement:
    """What was timed on the device: seconds per training step (after the warm-up) and per evaluated image."""

    device: str  # the device and why it is the one: "cpu (this torch has no CUDA), 2 threads"
    on_cpu: bool
    step_seconds: float
    eval_image_seconds: float
    batch_size: int
    parallel_devices: int = 1  # GPUs that workers spread over (round-robin); 1 on a CPU (workers share its cores)


def describe_device(name: str) -> tuple[torch.device, str]:
    """The device a run with ``--device name`` uses, and in words why (no CUDA in this torch, none visible, which
    GPU)."""
    device = resolve_device(name)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        return device, f"{device} ({torch.cuda.get_device_name(index)}" + (f", {count} GPUs" if count > 1 else "") + ")"
    if name != "auto":
        why = f"--device {name}"
    elif torch.version.cuda is None:
        why = "this torch has no CUDA"
    else:
        why = "no CUDA GPU visible"
    return device, f"cpu ({why}), {torch.get_num_threads()} threads"


def measure(cfg: TrainConfig, num_classes: int = 10, budget: float = STEP_BUDGET) -> Measurement:
    """Time ``cfg``'s real training step on its device and one evaluation pass of one batch. After the warm-up
    (one step; ten on a GPU, where cudnn picks its kernels), samples of a few steps are timed until ``budget``
    seconds are spent (at least two samples); the median sample is the figure, so one burst of other load on a
    shared machine does not set it. Takes about ``budget`` seconds, or three steps where a step is slower."""
    device, words = describe_device(cfg.device)
    state = setup(cfg, num_classes, device, steps=1)
    time_steps(state, 10 if device.type == "cuda" else 1)
    first = time_steps(state, 1)
    chunk = max(1, int(SAMPLE_SECONDS / max(first, 1e-6)))
    samples, spent = [first], first
    while len(samples) < 2 or (spent < budget and len(samples) < 20):
        seconds = time_steps(state, chunk)
        samples.append(seconds / chunk)
        spent += seconds
    images = cfg.batch_size if device.type == "cpu" else 1000
    eval_seconds = time_evaluation(state.model, random_split(images, device, seed=1), cfg.amp, device)
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gpus = torch.cuda.device_count() if device.type == "cuda" and cfg.device in ("auto", "cuda") else 1
    return Measurement(words, device.type == "cpu", statistics.median(samples), eval_seconds / images,
                       cfg.batch_size, max(1, gpus))


def duration(seconds: float) -> str:
    """A span of time, short and rounded: 42 s, 4.5 min, 12 min, 5.2 h, 3.4 days, 116 days."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 10 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    days = seconds / DAY
    return f"{days:.1f} days" if days < 10 else f"{days:,.0f} days"


@dataclass(frozen=True)
class Estimate:
    """An epoch, a run (``epochs`` epochs and the final test pass) and ``runs`` runs over ``parallel`` devices."""

    measured: Measurement
    sizes: Sizes
    epochs: int
    test_every: int = 0
    runs: int = 1  # 1: ``allconv train``; a study: its trials still to run
    workers: int = 1
    at_most: bool = False  # a pruner may stop trials early
    varies: tuple[str, ...] = ()  # sampled fields that change a trial's time

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.sizes.train, self.measured.batch_size)

    @property
    def parallel(self) -> int:
        """Trials at once: workers spread over the GPUs; on a CPU they share its cores, so one at a time's speed."""
        return 1 if self.measured.on_cpu else max(1, min(self.workers, self.measured.parallel_devices))

    @property
    def eval_seconds(self) -> float:
        """The epoch's one evaluation pass (validation, or the first training images), and the test when due."""
        per_epoch = self.sizes.val or min(ALIVE_SAMPLE, self.sizes.train)
        tests = self.sizes.test / self.test_every if self.test_every else 0
        return (per_epoch + tests) * self.measured.eval_image_seconds

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.measured.step_seconds + self.eval_seconds

    @property
    def run_seconds(self) -> float:
        return self.epochs * self.epoch_seconds + self.sizes.test * self.measured.eval_image_seconds

    @property
    def total_seconds(self) -> float:
        return self.runs * self.run_seconds / self.parallel

    def too_slow(self) -> bool:
        """More than a day on a CPU: the line says how to make it practical."""
        return self.measured.on_cpu and self.total_seconds > DAY

    def line(self, study: bool = True) -> str:
        """One line: the device and why, what was measured, epoch, run (trial) and the whole study."""
        m = self.measured
        what = "trial" if study else "run"
        text = (f"Estimate on {m.device}: {m.step_seconds:.3g} s per step of {m.batch_size} measured, so one epoch "
                f"~{duration(self.epoch_seconds)} ({self.steps_per_epoch:,} steps + evaluation), one {what} "
                f"~{duration(self.run_seconds)} ({self.epochs} epochs)")
        if study:
            spread = f", {self.parallel} in parallel" if self.parallel > 1 else ""
            text += (f", the study {'at most ' if self.at_most else ''}~{duration(self.total_seconds)} "
                     f"({self.runs} trial{'s' * (self.runs != 1)} to run{spread}")
            if self.at_most:
                text += "; the pruner may stop trials early"
            if self.varies:
                text += f"; the space samples {', '.join(self.varies)}, which change a trial's time"
            text += ")"
        return text + (f". {self.advice(study)}" if self.too_slow() else "")

    def advice(self, study: bool = True) -> str:
        """What makes a CPU run practical, with the figure for a smaller variant on the same measured step and, a
        study, how many of its trials fit in a day."""
        small = replace(self, sizes=Sizes(min(self.sizes.train, 5000), min(self.sizes.val, 5000), self.sizes.test),
                        epochs=min(self.epochs, 20), runs=1)
        text = (f"Over a day on a CPU: use a GPU, or do less: with --subset 5000 --epochs 20 one "
                f"{'trial' if study else 'run'} takes ~{duration(small.run_seconds)} here")
        if study:
            fit = int(DAY // small.run_seconds)
            text += f", so --trials {fit} fit in a day" if fit >= 1 else ", still over a day a trial"
        return text + "; or a smaller --model"
