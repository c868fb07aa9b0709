"""Datasets as train/val/test tensors on the training device, and the one function that puts them there.

What to load is a :class:`~allconv_cli.config.DataConfig` (declared in ``config.py`` with TrainConfig's defaults,
re-exported here), so the torch-free ground floor never imports this package.

CIFAR is tiny (60,000 x 3 x 32 x 32 float32 = 737 MB), so every split lives on the device as one tensor and a batch
is an index into it (:mod:`.batches`). Raw arrays come from :mod:`.sources` (or :mod:`.fake`), the splits from
:mod:`.splits`, the paper's GCN + ZCA preprocessing from :mod:`.preprocess`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from allconv_cli.config import AUGMENTATIONS, DATASETS, PREPROCESSINGS, DataConfig
from allconv_cli.data.batches import augment_batch, iterate_batches
from allconv_cli.data.fake import make_fake
from allconv_cli.data.preprocess import (
    PREPROCESS_VERSION,
    ZCA_KINDS,
    Preprocessor,
    fit_preprocessor,
    preprocess_cache_dir,
)
from allconv_cli.data.sources import CIFAR10_CLASSES, NUM_CLASSES, load_raw, resolve_data_dir
from allconv_cli.data.splits import pick_test_indices, split_indices

__all__ = [
    "AUGMENTATIONS",
    "CIFAR10_CLASSES",
    "DATASETS",
    "NUM_CLASSES",
    "PREPROCESSINGS",
    "DataCache",
    "DataConfig",
    "Dataset",
    "Preprocessor",
    "Split",
    "augment_batch",
    "iterate_batches",
    "load_dataset",
    "load_onto",
    "load_raw",
    "make_fake",
    "pick_test_indices",
    "preprocess_cache_dir",
    "random_split",
    "resolve_data_dir",
    "split_indices",
    "split_sizes",
]


@dataclass
class Split:
    """One split as two tensors: inputs float32 (N, 3, 32, 32) and labels int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str, channels_last: bool = False) -> Split:
        """The whole split on ``device`` as one tensor each (channels_last memory if asked, as the convs prefer)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return Split(self.x.to(device=device, memory_format=fmt), self.y.to(device))


@dataclass
class Dataset:
    """Train/val/test splits ready for the network, plus what the run should record about them."""

    train: Split
    val: Split | None
    test: Split
    num_classes: int
    classes: list[str]
    fingerprint: str  # short content hash of the raw arrays + the DataConfig fields that change the data
    preprocessor: Preprocessor | None = None  # the fitted transform, to preprocess new images the same way

    def to(self, device: torch.device | str, channels_last: bool = False) -> Dataset:
        """Every split on ``device`` once, before training, so no batch ever crosses the bus."""
        return Dataset(
            train=self.train.to(device, channels_last),
            val=self.val.to(device, channels_last) if self.val is not None else None,
            test=self.test.to(device, channels_last),
            num_classes=self.num_classes,
            classes=list(self.classes),
            fingerprint=self.fingerprint,
            preprocessor=self.preprocessor,
        )


def _fingerprint(cfg: DataConfig, arrays: tuple[np.ndarray, ...]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    fields = {"dataset": cfg.dataset, "subset": cfg.subset, "val_size": cfg.val_size, "test_size": cfg.test_size,
              "preprocess": cfg.preprocess, "seed": cfg.seed, "version": PREPROCESS_VERSION}
    if cfg.preprocess in ZCA_KINDS:
        fields["zca_epsilon"] = cfg.zca_epsilon
    if cfg.dataset == "fake":
        fields["fake"] = (cfg.fake_train_size, cfg.fake_test_size)
    h.update(repr(sorted(fields.items())).encode())
    return h.hexdigest()[:12]


def load_dataset(cfg: DataConfig, device: torch.device | str | None = None,
                 on_stage: Callable[[str], None] | None = None) -> Dataset:
    """Load, split and preprocess; returns CPU tensors (move them once with :meth:`Dataset.to`).

    ``device`` only says where to run the preprocessing maths (a GPU fits and applies ZCA in well under a second);
    the results are the same up to float rounding and come back to the CPU either way. ``on_stage`` hears each
    stage as it starts (loading, the GCN + ZCA fit or its cache, preprocessing): on a CPU they take a minute.
    """
    say = on_stage or (lambda text: None)
    say(describe_source(cfg))
    x_train, y_train, x_test, y_test, classes = load_raw(cfg)
    fit_idx, train_idx, val_idx = split_indices(y_train, cfg.val_size, cfg.subset, cfg.seed)
    test_idx = pick_test_indices(y_test, cfg.test_size, cfg.seed)
    pre = fit_preprocessor(cfg, x_train[fit_idx], device, on_stage=say)
    say(f"preprocessing {len(train_idx) + len(val_idx) + len(test_idx):,} images ({cfg.preprocess})")

    def make(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(pre.apply(images, device), torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)))

    return Dataset(
        train=make(x_train[train_idx], y_train[train_idx]),
        val=make(x_train[val_idx], y_train[val_idx]) if len(val_idx) else None,
        test=make(x_test[test_idx], y_test[test_idx]),
        num_classes=len(classes),
        classes=list(classes),
        fingerprint=_fingerprint(cfg, (x_train, y_train, x_test, y_test)),
        preprocessor=pre,
    )


def describe_source(cfg: DataConfig) -> str:
    """The loading stage in words: which dataset from where."""
    if cfg.dataset == "fake":
        return f"making the fake dataset ({cfg.fake_train_size:,} + {cfg.fake_test_size:,} images)"
    root, origin = resolve_data_dir(cfg)
    return f"loading {cfg.dataset.upper().replace('CIFAR', 'CIFAR-')} from {root} ({origin})"


def random_split(n: int, device: torch.device | str, *, num_classes: int = 10, seed: int = 0) -> Split:
    """``n`` standard-normal inputs with uniform random labels, on ``device`` channels_last: for timing, where the
    content does not matter and making images would cost more than what is timed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return Split(x, y).to(device, channels_last=True)


def load_onto(cfg: DataConfig, device: torch.device | str, on_stage: Callable[[str], None] | None = None) -> Dataset:
    """The one way a run gets its data: load, split and preprocess (the ZCA fit on ``device`` too), then move the
    whole dataset there once, channels_last. Training, search trials, retraining and the benchmark all use it.
    ``on_stage`` hears each stage as it starts."""
    device = torch.device(device)
    data = load_dataset(cfg, device=device, on_stage=on_stage)
    if device.type != "cpu" and on_stage is not None:
        on_stage(f"moving the data to {device}")
    return data.to(device, channels_last=True)



class DataCache:
    """The last dataset loaded, on its device: a process that trains many runs on the same data (a search worker,
    ``allconv reproduce``) loads and preprocesses it once."""

    def __init__(self) -> None:
        self.key: tuple[DataConfig, torch.device] | None = None
        self.data: Dataset | None = None
        self.checked: dict[DataConfig, tuple[int, int, int]] = {}  # config -> its (train, val, test) sizes

    def get(self, cfg: DataConfig, device: torch.device | str, on_stage: Callable[[str], None] | None = None
            ) -> Dataset:
        key = (cfg, torch.device(device))
        if key != self.key or self.data is None:
            self.data = None  # free the old one first
            self.data, self.key = load_onto(cfg, key[1], on_stage), key
            self.checked[cfg] = split_sizes(self.data)
        return self.data

    def check(self, cfg: DataConfig, on_stage: Callable[[str], None] | None = None) -> None:
        """Load ``cfg``'s data once on the CPU and drop it: data errors surface, the ZCA fit lands in its disk cache
        (so worker processes do not all fit it at once), and no device memory stays taken."""
        if cfg not in self.checked:
            self.checked[cfg] = split_sizes(load_onto(cfg, "cpu", on_stage))

    def sizes(self, cfg: DataConfig) -> tuple[int, int, int] | None:
        """(train, val, test) images of ``cfg``'s data, once it was loaded or checked here."""
        return self.checked.get(cfg)


def split_sizes(data: Dataset) -> tuple[int, int, int]:
    """(train, val, test) images: what an epoch, its evaluation pass and the final test cost scale with."""
    return len(data.train), len(data.val) if data.val is not None else 0, len(data.test)
