"""Datasets, splits, the paper's preprocessing, and on-device batching and augmentation.

Why it is built this way:

* CIFAR is tiny (60,000 x 3 x 32 x 32 float32 = 737 MB), so every split lives on the training device as one tensor and a
  batch is an index into it. A ``DataLoader`` with workers would cost more per step than the network does on a GPU.
* The paper (Springenberg et al., 2015) uses the preprocessing of Goodfellow et al. (2013, maxout): global contrast
  normalisation, then ZCA whitening. The whitening is fitted on the whole training part (the training images left
  after the validation split) and never on validation or test images, so model selection on ``val`` stays honest.
  It is fitted on the whole training part even when ``subset`` trains on fewer images: a 3072 x 3072 covariance from
  2,000 images is rank-deficient, and unseen inputs would come out larger than the training ones (1.7x the mean
  squared norm at the default eps, far more at smaller eps).
* Fitting ZCA on 45,000 images costs ~15-30 s on a 2-core CPU (0.1 s on a GPU, see ``load_dataset(device=...)``) and
  every trial of a hyper-parameter search needs the same one, so the fitted transform is cached on disk, keyed by the
  content of the images it was fitted on and its parameters.
* ``fake`` is a synthetic, learnable stand-in with CIFAR's format, for tests and smoke runs without the real data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from allconv_cli.config import AUGMENTATIONS, DATASETS, PREPROCESSINGS
from allconv_cli.errors import AllconvError

log = logging.getLogger(__name__)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fake": 10}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fake": "fake"}
IMAGE_SHAPE = (32, 32, 3)  # HWC, as stored
INPUT_DIM = 32 * 32 * 3

ENV_DATA_DIR = "ALLCONV_DATA_DIR"
ENV_CACHE_DIR = "ALLCONV_CACHE_DIR"
DEFAULT_DATA_DIR = "~/.cache/allconv/data"
DEFAULT_CACHE_DIR = "~/.cache/allconv"  # the fitted preprocessing goes to <cache dir>/preprocess

# Global contrast normalisation as pylearn2's GlobalContrastNormalization(subtract_mean=True, use_std=True,
# sqrt_bias=10, scale=1) on the 0..255 scale: x <- (x - mean(x)) / sqrt(10 + var(x)), per image, var with ddof=1 like
# pylearn2. A normal image leaves with per-pixel variance ~1, the same units as the maxout CIFAR-10 script's
# gcn=55 (every image scaled to L2 norm 55 = per-pixel RMS 0.99), so pylearn2's ZCA filter_bias carries over as is.
# The sqrt_bias keeps near-uniform images (var ~0) from having their noise amplified to unit variance.
GCN_SQRT_BIAS = 10.0
GCN_SCALE = 1.0
# pylearn2's ZCA(filter_bias=0.1), used by the maxout/All-CNN CIFAR-10 pipeline. Measured on the 45,000-image training
# part of CIFAR-10 after GCN: eigenvalues run from 473 down to 4e-5 (about the uint8 quantisation-noise level; the
# all-ones direction that GCN removes has ~0). The 763 above 0.1 hold 98.9 % of the variance and come out whitened
# (variance s/(s+eps) >= 0.5; >= 0.91 for the 226 above 1); the rest are damped instead of amplified. Validation and
# test inputs then have 1.03x the training inputs' mean squared norm (eps 1e-2: 1.06x, 1e-4: 1.14x, as a smaller eps
# whitens more of the poorly estimated tail and amplifies pixel noise).
DEFAULT_ZCA_EPSILON = 0.1
# Bump when the preprocessing maths change, so old cache entries and fingerprints are not reused.
PREPROCESS_VERSION = 1

_ROWS_PER_CHUNK = 8192  # rows per matmul when fitting/applying: bounds the temporary memory to ~100 MB
_COV_BLOCK = 768  # column block for the symmetric covariance (only the upper block triangle is computed)


@dataclass(frozen=True)
class DataConfig:
    """Everything that decides which images, in which split, preprocessed how (plus where to find and cache them)."""

    dataset: str = "cifar10"  # "cifar10" | "cifar100" | "fake"
    data_dir: str | None = None  # None -> env ALLCONV_DATA_DIR, else ~/.cache/allconv/data (torchvision download cache)
    subset: int | None = None  # stratified N-image part of the training part, for quick runs
    val_size: int = 5000  # held-out validation split from the training set (0 = no validation split)
    test_size: int | None = None  # stratified N-image part of the test set, for quick runs (None: all of it)
    preprocess: str = "gcn-zca"  # "gcn-zca" | "standardize" | "none"
    seed: int = 0
    fake_train_size: int = 10000  # sizes of the synthetic dataset (room for the default 5,000-image val split)
    fake_test_size: int = 1000
    zca_epsilon: float = DEFAULT_ZCA_EPSILON
    download: bool = True
    cache_dir: str | None = None  # None -> env ALLCONV_CACHE_DIR, else ~/.cache/allconv; files go to <dir>/preprocess
    use_cache: bool = True  # reuse/store the fitted gcn-zca transform on disk


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


@dataclass(frozen=True)
class Preprocessor:
    """A fitted input transform from uint8 NHWC images to float32 NCHW network inputs.

    ``gcn-zca``: ``mean`` (3072,) and ``whitening`` (3072, 3072) act on GCN-normalised images flattened in CHW order.
    ``standardize``: ``mean`` and ``std`` (3,) per channel on the 0..1 scale. ``none``: x / 255.
    """

    kind: str
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    whitening: torch.Tensor | None = None
    epsilon: float | None = None

    def apply(self, images: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """Transform uint8 (N, 32, 32, 3) images; the maths run on ``device`` (default CPU), the result is on the CPU.

        Chunked, so the float32 temporaries stay small whatever N is.
        """
        dev = torch.device(device) if device is not None else torch.device("cpu")
        n = len(images)
        out = torch.empty((n, 3, 32, 32), dtype=torch.float32)
        if n == 0:
            return out
        flat_out = out.view(n, -1)
        if self.kind == "gcn-zca":
            assert self.mean is not None and self.whitening is not None
            dtype = _exact_dtype(dev)
            w = self.whitening.to(dev, dtype)
            bias = -(self.mean.to(dev, dtype) @ w)  # (x - mean) @ W == x @ W - mean @ W, without a centred copy
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = gcn(_to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev, dtype))
                flat_out[start : start + len(chunk)] = torch.addmm(bias, chunk, w).to("cpu", torch.float32)
        elif self.kind == "standardize":
            assert self.mean is not None and self.std is not None
            mean, std = self.mean.to(dev).view(1, 3, 1), self.std.to(dev).view(1, 3, 1)
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = _to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev).view(-1, 3, 1024) / 255.0
                flat_out[start : start + len(chunk)] = ((chunk - mean) / std).reshape(len(chunk), -1).cpu()
        elif self.kind == "none":
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = _to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev) / 255.0
                flat_out[start : start + len(chunk)] = chunk.cpu()
        else:
            raise AllconvError(_unknown("preprocess", self.kind, PREPROCESSINGS, "--preprocess"))
        return out


# --------------------------------------------------------------------------------------------------------------------
# raw data


def load_raw(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Return ``(x_train uint8 NHWC, y_train int64, x_test, y_test, class names)`` for ``cfg.dataset``.

    CIFAR comes from ``data_dir`` when it (or its ``cifar10``/``cifar100`` sub-folder) holds ``train*.npz`` +
    ``test.npz`` (arrays ``images`` uint8 (N, 32, 32, 3) and ``labels``), else from a torchvision root there, which
    torchvision downloads into when ``cfg.download`` is set.
    """
    _check_choice("dataset", cfg.dataset, DATASETS, "--dataset")
    if cfg.dataset == "fake":
        return make_fake(cfg.fake_train_size, cfg.fake_test_size, cfg.seed)
    root, origin = resolve_data_dir(cfg)
    npz_dir = _find_npz_dir(root, cfg.dataset)
    if npz_dir is not None:
        return _load_npz_dir(npz_dir, cfg.dataset)
    return _load_torchvision(root, cfg, origin)


def resolve_data_dir(cfg: DataConfig) -> tuple[Path, str]:
    """Where to look for CIFAR, and who said so (``--data-dir``, ``$ALLCONV_DATA_DIR`` or the default cache)."""
    if cfg.data_dir:
        return Path(cfg.data_dir).expanduser(), "--data-dir"
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser(), f"${ENV_DATA_DIR}"
    return Path(DEFAULT_DATA_DIR).expanduser(), "default"


def _find_npz_dir(root: Path, dataset: str) -> Path | None:
    for candidate in (root, root / dataset):
        if candidate.is_dir() and any(candidate.glob("*.npz")):
            return candidate
    return None


def _natural_key(path: Path) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _npz_layout_hint() -> str:
    return "expected train*.npz files and test.npz, each with arrays `images` uint8 (N, 32, 32, 3) and `labels` (N,)"


def _read_npz(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise AllconvError(f"{path} has no array {', '.join(missing)} (it has {', '.join(z.files) or 'none'}): "
                                   f"{_npz_layout_hint()}")
            images, labels = z["images"], z["labels"]
    except AllconvError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise AllconvError(f"{path} is not a readable .npz file ({exc}): {_npz_layout_hint()}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise AllconvError(f"{path}: `images` is {images.dtype} {images.shape}, {_npz_layout_hint()}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise AllconvError(f"{path}: `labels` is {labels.dtype} {labels.shape} for {len(images)} images, "
                           f"{_npz_layout_hint()}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise AllconvError(f"{path}: labels run {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}")
    return images, labels.astype(np.int64)


def _load_npz_dir(d: Path, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    num_classes = NUM_CLASSES[dataset]
    train_files = sorted(d.glob("train*.npz"), key=_natural_key)
    test_file = d / "test.npz"
    if not train_files or not test_file.is_file():
        found = ", ".join(sorted(p.name for p in d.glob("*.npz")))
        raise AllconvError(f"{d} has .npz files ({found}) but not the layout {_PRETTY[dataset]} needs: "
                           f"{_npz_layout_hint()}")
    parts = [_read_npz(p, num_classes) for p in train_files]
    x_train = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y_train = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    x_test, y_test = _read_npz(test_file, num_classes)
    present = len(np.unique(y_train))
    if present != num_classes:
        raise AllconvError(f"{d} holds {present} classes in its training files but {_PRETTY[dataset]} has "
                           f"{num_classes}: pass the --dataset that matches the folder (or a folder with every class)")
    return x_train, y_train, x_test, y_test, _class_names(d, dataset)


def _class_names(d: Path, dataset: str) -> list[str]:
    """``classes.txt`` (one name a line) if the folder has one, else the CIFAR-10 names or the label numbers."""
    n = NUM_CLASSES[dataset]
    names_file = d / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) == n:
            return names
        log.warning("ignoring %s: %d names for %d classes", names_file, len(names), n)
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(n)]


def _load_torchvision(root: Path, cfg: DataConfig, origin: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray, list[str]]:
    pretty = _PRETTY[cfg.dataset]
    fix = ("pass --data-dir pointing to a torchvision root or a folder of train*.npz/test.npz, "
           "or use --dataset fake")
    if origin != "default" and not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise AllconvError(f"{origin} {root} {what}: {fix}")
    if origin == "default" and cfg.download:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AllconvError(f"cannot create the download folder {root} ({exc.strerror}): {fix}") from None
    try:
        import torchvision  # lazy: slow to import and only needed here

        cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        # torchvision prints progress bars and "Files already downloaded" lines; the CLI's output is its own.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
    except Exception as exc:  # any failure here means "no usable data"; the message says what to do
        how = "could not be downloaded (no network?)" if cfg.download else "downloading is off"
        raise AllconvError(f"{pretty} not found in {root} and {how} [{type(exc).__name__}]: {fix}") from None
    x_train, x_test = np.ascontiguousarray(train.data, dtype=np.uint8), np.ascontiguousarray(test.data, dtype=np.uint8)
    y_train, y_test = np.asarray(train.targets, dtype=np.int64), np.asarray(test.targets, dtype=np.int64)
    return x_train, y_train, x_test, y_test, list(train.classes)


def make_fake(train_size: int, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                   list[str]]:
    """A synthetic 10-class CIFAR look-alike that a network can learn, deterministic by ``seed``.

    Each class has a smooth random prototype (an 8x8x3 random grid upsampled bicubically, plus a faint class colour).
    An image is its class prototype shifted by up to 4 pixels, over a smooth random background of similar strength,
    with random contrast and brightness and pixel noise. Classes overlap in pixel space (nearest class mean gets ~85 %,
    a ridge-regression linear model ~96 %), so there is something to learn, and the structure is translation-invariant,
    which convolutions pick up. Train and test draw from independent streams spawned from the seed, so the training
    images do not change with ``test_size``.
    """
    for name, value in (("fake_train_size", train_size), ("fake_test_size", test_size)):
        if value < 10:
            raise AllconvError(f"{name}={value}: the fake dataset needs at least 10 images (one per class)")
    proto_seq, train_seq, test_seq = np.random.SeedSequence([seed, 0xA11C0]).spawn(3)
    prng = np.random.default_rng(proto_seq)
    shift = 4
    size = 32 + 2 * shift

    def smooth(rng: np.random.Generator, n: int, grid: int, out: int) -> np.ndarray:
        """(n, out, out, 3) smooth random fields with unit std per field."""
        noise = torch.from_numpy(rng.standard_normal((n, 3, grid, grid)))
        field = F.interpolate(noise, size=(out, out), mode="bicubic", align_corners=False).numpy()
        field = field / field.std(axis=(1, 2, 3), keepdims=True)
        return field.transpose(0, 2, 3, 1).astype(np.float32)

    protos = smooth(prng, 10, 8, size) * 40.0 + prng.normal(0.0, 5.0, size=(10, 1, 1, 3)).astype(np.float32)

    def sample(n: int, seq: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        y = rng.permutation(np.arange(n) % 10)
        oy, ox = rng.integers(0, 2 * shift + 1, size=(2, n))
        rows = (oy[:, None] + np.arange(32))[:, :, None]
        cols = (ox[:, None] + np.arange(32))[:, None, :]
        crops = protos[y[:, None, None], rows, cols]  # (n, 32, 32, 3)
        background = smooth(rng, n, 4, 32) * 50.0
        contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
        brightness = rng.normal(0.0, 15.0, size=(n, 1, 1, 1)).astype(np.float32)
        noise = rng.normal(0.0, 50.0, size=crops.shape).astype(np.float32)
        x = np.clip(np.rint(128.0 + brightness + contrast * (crops + background) + noise), 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    x_train, y_train = sample(train_size, train_seq)
    x_test, y_test = sample(test_size, test_seq)
    return x_train, y_train, x_test, y_test, [f"class{i}" for i in range(10)]


# --------------------------------------------------------------------------------------------------------------------
# splits


def _stratified_pick(pool: np.ndarray, pool_labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` indices from ``pool`` keeping each class's share: floor of the exact share per class, then the remaining
    picks go to the classes with the largest remainders (ties in random order), so divisible shares are exact."""
    classes, counts = np.unique(pool_labels, return_counts=True)
    n = len(pool)
    alloc = counts * k // n
    remainder = counts * k % n
    left = k - int(alloc.sum())
    if left:
        order = np.lexsort((rng.random(len(classes)), -remainder))
        alloc[order[:left]] += 1
    picked = [rng.choice(pool[pool_labels == c], size=int(a), replace=False)
              for c, a in zip(classes, alloc, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def split_indices(labels: np.ndarray, val_size: int, subset: int | None, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                                            np.ndarray]:
    """``(fit_idx, train_idx, val_idx)`` into the training set, all sorted, disjoint where they must be.

    ``val_idx``: a stratified, seeded draw of ``val_size`` images. ``fit_idx``: every other training image (the
    "training part" the preprocessing is fitted on). ``train_idx``: ``fit_idx``, or a stratified seeded ``subset`` of
    it. One numpy Generator seeded by ``seed`` makes the draws, so a seed always gives the same split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    n = len(labels)
    if not 0 <= val_size < n:
        raise AllconvError(f"val_size={val_size} is out of range: pass --val-size between 0 and {n - 1} "
                           f"(the training set has {n} images)")
    rng = np.random.default_rng(seed)
    everything = np.arange(n, dtype=np.int64)
    val_idx = _stratified_pick(everything, labels, val_size, rng) if val_size else np.zeros(0, dtype=np.int64)
    fit_mask = np.ones(n, dtype=bool)
    fit_mask[val_idx] = False
    fit_idx = everything[fit_mask]
    if subset is not None:
        left = f"the training images left after the {val_size}-image validation split"
        _check_part_size("subset", subset, labels[fit_idx], left, "train on all of them")
    if subset is None or subset == len(fit_idx):
        return fit_idx, fit_idx.copy(), val_idx
    return fit_idx, _stratified_pick(fit_idx, labels[fit_idx], subset, rng), val_idx


def pick_test_indices(labels: np.ndarray, test_size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the test images to evaluate on: all of them, or a stratified seeded ``test_size`` part.

    A quick run on a subset spends most of its time evaluating the 10,000 test images (a CPU evaluates strided-A at
    ~1,000 img/s), so ``--test-size`` shrinks that too. The draw has its own random stream (``seed`` plus a fixed
    tag), so it never changes the train/validation split of the same seed.
    """
    labels = np.asarray(labels)
    everything = np.arange(len(labels), dtype=np.int64)
    if test_size is not None:
        _check_part_size("test_size", test_size, labels, "the whole test set", "test on all of it")
    if test_size is None or test_size == len(labels):
        return everything
    return _stratified_pick(everything, labels, test_size, np.random.default_rng((seed, _TEST_STREAM)))


_TEST_STREAM = 0x7E57  # tags the test-part draw's random stream, apart from the train/validation split's


def _check_part_size(name: str, size: int, labels: np.ndarray, whole: str, without: str) -> None:
    """A stratified part (``--subset``, ``--test-size``) needs one image per class and at most the ``whole`` pool."""
    low, high = len(np.unique(labels)), len(labels)
    if not low <= size <= high:
        raise AllconvError(f"{name}={size} is out of range: pass --{name.replace('_', '-')} between {low} (one image "
                           f"per class) and {high} ({whole}), or leave it out to {without}")


# --------------------------------------------------------------------------------------------------------------------
# preprocessing


def _exact_dtype(device: torch.device) -> torch.dtype:
    """The dtype for ZCA's matmuls: the small eigen-directions need full IEEE precision.

    GPUs may run float32 matmuls as TF32 (10-bit mantissa) when the training code enables it for speed, so they get
    float64 (never downgraded, and cheap at these sizes). CPU float32 matmuls are exact unless oneDNN was allowed bf16
    or TF32 (``torch.set_float32_matmul_precision("medium")``), in which case float64 is used there too. Reading the
    backend-specific setting, instead of toggling global precision flags, cannot clash with the legacy/new TF32 APIs.
    """
    if device.type != "cpu":
        return torch.float64
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return torch.float32 if getattr(matmul, "fp32_precision", "none") in ("none", "ieee") else torch.float64


def _to_float_chw(images: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> (N, 3072) flattened in CHW order (the network's layout), on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).reshape(len(images), -1).to(dtype)


def gcn(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation of flattened 0..255 images, per row: (x - mean) / sqrt(10 + var) (see above)."""
    x = x - x.mean(dim=1, keepdim=True)
    return x * (GCN_SCALE / torch.sqrt(GCN_SQRT_BIAS + x.var(dim=1, keepdim=True, correction=1)))


def fit_zca(images: np.ndarray, epsilon: float, device: torch.device | str | None = None) -> Preprocessor:
    """Fit GCN + ZCA on uint8 NHWC ``images``: W = U diag(1 / sqrt(s + eps)) U^T of their covariance.

    The covariance (biased, like pylearn2) is accumulated over row chunks with exact float32 matmuls (float64 on GPUs,
    see :func:`_exact_dtype`) summed in float64, computing only the upper block triangle as it is symmetric; the
    eigendecomposition is float64. Returns the float32 mean and W, which is what is applied and cached, so a fresh fit
    and a cached one give the same inputs.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    n = len(images)
    if n < 2:
        raise AllconvError(f"cannot fit ZCA on {n} image(s): use a larger training set or --preprocess standardize")
    d = INPUT_DIM
    started = time.perf_counter()
    dtype = _exact_dtype(dev)
    x = torch.empty((n, d), dtype=dtype, device=dev)
    for start in range(0, n, _ROWS_PER_CHUNK):
        x[start : start + _ROWS_PER_CHUNK] = gcn(_to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev, dtype))
    mean64 = x.sum(0, dtype=torch.float64) / n
    mean = mean64.to(dtype)
    cov = torch.zeros((d, d), dtype=torch.float64, device=dev)
    for start in range(0, n, _ROWS_PER_CHUNK):
        c = x[start : start + _ROWS_PER_CHUNK] - mean
        for b in range(0, d, _COV_BLOCK):
            cov[b : b + _COV_BLOCK, b:] += (c[:, b : b + _COV_BLOCK].T @ c[:, b:]).double()
    del x, c
    # centring on the rounded mean leaves a rank-one bias n * delta delta^T (~1e-8 per entry in float32); remove it
    delta = mean64 - mean.double()
    cov = torch.triu(cov) + torch.triu(cov, 1).T
    cov = cov / n - torch.outer(delta, delta)
    s, u = torch.linalg.eigh(cov)
    s = s.clamp_min(0.0)  # the direction GCN removes (all ones) has variance 0 and may come out as -1e-9
    w = (u * torch.rsqrt(s + epsilon)) @ u.T
    log.info("fitted ZCA on %d images in %.1f s (eigenvalues %.3g..%.3g)", n, time.perf_counter() - started,
             s[0].item(), s[-1].item())
    return Preprocessor("gcn-zca", mean=mean64.float().cpu(), whitening=w.float().cpu(), epsilon=float(epsilon))


def fit_standardize(images: np.ndarray) -> Preprocessor:
    """Per-channel mean and std on the 0..1 scale (float64 sums, so 45,000 images lose no precision)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).view(-1, 3)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(x), 1 << 20):
        part = x[start : start + (1 << 20)].double() / 255.0
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    count = max(len(x), 1)
    mean = total / count
    std = torch.sqrt((total_sq / count - mean * mean).clamp_min(1e-12))
    return Preprocessor("standardize", mean=mean.float(), std=std.float())


def preprocess_cache_dir(cfg: DataConfig) -> Path | None:
    """``<cache dir>/preprocess``: ``cfg.cache_dir``, else ``$ALLCONV_CACHE_DIR``, else ~/.cache/allconv; None = off."""
    if not cfg.use_cache:
        return None
    root = cfg.cache_dir or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / "preprocess"


def _zca_cache_key(fit_images: np.ndarray, epsilon: float) -> str:
    """Depends on exactly what the fit depends on: the fitted images' bytes (in order) and the parameters."""
    h = hashlib.sha256()
    h.update(f"gcn-zca v{PREPROCESS_VERSION} gcn={GCN_SQRT_BIAS},{GCN_SCALE} eps={epsilon!r} n={len(fit_images)}"
             .encode())
    h.update(memoryview(np.ascontiguousarray(fit_images)).cast("B"))
    return h.hexdigest()[:32]


def _load_cached(path: Path, key: str, epsilon: float) -> Preprocessor | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            mean, w = z["mean"], z["whitening"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # absent, half-written by a crashed writer, or from another version: refit
    if mean.shape != (INPUT_DIM,) or w.shape != (INPUT_DIM, INPUT_DIM) or mean.dtype != np.float32 \
            or w.dtype != np.float32 or not (np.isfinite(mean).all() and np.isfinite(w).all()):
        return None
    return Preprocessor("gcn-zca", mean=torch.from_numpy(mean), whitening=torch.from_numpy(w), epsilon=epsilon)


def _save_cached(path: Path, key: str, pre: Preprocessor) -> None:
    """Atomic: write a temporary file in the same folder, then ``os.replace`` it, so readers in other processes see
    the old file, no file, or the whole new one; concurrent writers of the same key write identical content."""
    assert pre.mean is not None and pre.whitening is not None
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), mean=pre.mean.numpy(), whitening=pre.whitening.numpy())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:  # the cache is only an optimisation: a read-only or full disk must not stop training
        log.warning("could not cache the fitted preprocessing in %s: %s", path.parent, exc)
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def fit_preprocessor(cfg: DataConfig, fit_images: np.ndarray, device: torch.device | str | None = None
                     ) -> Preprocessor:
    """The ``cfg.preprocess`` transform fitted on ``fit_images`` (the training part), from the cache when possible."""
    _check_choice("preprocess", cfg.preprocess, PREPROCESSINGS, "--preprocess")
    if cfg.preprocess == "none":
        return Preprocessor("none")
    if cfg.preprocess == "standardize":
        return fit_standardize(fit_images)
    if not (cfg.zca_epsilon > 0 and np.isfinite(cfg.zca_epsilon)):
        raise AllconvError(f"zca_epsilon={cfg.zca_epsilon}: must be > 0 (default {DEFAULT_ZCA_EPSILON})")
    cache = preprocess_cache_dir(cfg)
    if cache is None:
        return fit_zca(fit_images, cfg.zca_epsilon, device)
    key = _zca_cache_key(fit_images, cfg.zca_epsilon)
    path = cache / f"gcn-zca-{key}.npz"
    pre = _load_cached(path, key, cfg.zca_epsilon)
    if pre is not None:
        log.info("using the cached ZCA fit %s", path)
        return pre
    pre = fit_zca(fit_images, cfg.zca_epsilon, device)
    _save_cached(path, key, pre)
    return pre


# --------------------------------------------------------------------------------------------------------------------
# the whole pipeline


def _check_choice(name: str, value: str, allowed: tuple[str, ...], flag: str) -> None:
    if value not in allowed:
        raise AllconvError(_unknown(name, value, allowed, flag))


def _unknown(name: str, value: str, allowed: tuple[str, ...], flag: str) -> str:
    return f"unknown {name} {value!r}: pass {flag} with one of {', '.join(allowed)}"


def _fingerprint(cfg: DataConfig, arrays: tuple[np.ndarray, ...]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    fields = {"dataset": cfg.dataset, "subset": cfg.subset, "val_size": cfg.val_size, "preprocess": cfg.preprocess,
              "seed": cfg.seed, "version": PREPROCESS_VERSION}
    if cfg.preprocess == "gcn-zca":
        fields["zca_epsilon"] = cfg.zca_epsilon
    if cfg.dataset == "fake":
        fields["fake"] = (cfg.fake_train_size, cfg.fake_test_size)
    if cfg.test_size is not None:  # only when set, so runs on the whole test set keep their earlier fingerprints
        fields["test_size"] = cfg.test_size
    h.update(repr(sorted(fields.items())).encode())
    return h.hexdigest()[:12]


def load_dataset(cfg: DataConfig, device: torch.device | str | None = None) -> Dataset:
    """Load, split and preprocess; returns CPU tensors (move them once with :meth:`Dataset.to`).

    ``device`` only says where to run the preprocessing maths (a GPU fits and applies ZCA in well under a second);
    the results are the same up to float rounding and come back to the CPU either way.
    """
    _check_choice("dataset", cfg.dataset, DATASETS, "--dataset")
    _check_choice("preprocess", cfg.preprocess, PREPROCESSINGS, "--preprocess")
    x_train, y_train, x_test, y_test, classes = load_raw(cfg)
    fit_idx, train_idx, val_idx = split_indices(y_train, cfg.val_size, cfg.subset, cfg.seed)
    test_idx = pick_test_indices(y_test, cfg.test_size, cfg.seed)
    pre = fit_preprocessor(cfg, x_train[fit_idx], device)

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


# --------------------------------------------------------------------------------------------------------------------
# batches and augmentation


def load_onto(cfg: DataConfig, device: torch.device | str) -> Dataset:
    """The one way a run gets its data: load, split and preprocess (the ZCA fit on ``device`` too), then move the
    whole dataset there once, channels_last. Training, search trials, retraining and the benchmark all use it."""
    device = torch.device(device)
    return load_dataset(cfg, device=device).to(device, channels_last=True)


def iterate_batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``split`` indexed straight out of its on-device tensors.

    With ``shuffle`` the order is ``torch.randperm`` drawn on the split's device from ``generator`` (which must live on
    that device), so a seeded generator replays the same order. Without it, batches are views in order.
    """
    if batch_size < 1:
        raise AllconvError(f"batch_size={batch_size}: use a batch size >= 1")
    return _batches(split, batch_size, shuffle, generator, drop_last)


def _batches(split: Split, batch_size: int, shuffle: bool, generator: torch.Generator | None,
             drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    stop = n - n % batch_size if drop_last else n
    if not shuffle:
        for start in range(0, stop, batch_size):
            yield split.x[start : start + batch_size], split.y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator, device=split.y.device)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]  # advanced indexing keeps channels_last (index_select would not)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Per-sample random augmentation on ``x``'s device, one gather for the whole batch.

    ``none``: ``x`` itself. ``flip-translate``: mirror each image horizontally with p=0.5 and shift it by a uniform
    random (dy, dx) in [-pad, pad]^2, filling with zeros (the mean image, after the zero-mean preprocessing), as the
    paper's "translations and horizontal flips". Random numbers come from ``generator`` (on ``x``'s device).
    """
    if mode == "none":
        return x
    if mode != "flip-translate":
        raise AllconvError(_unknown("augmentation", mode, AUGMENTATIONS, "--augment"))
    if pad < 0:
        raise AllconvError(f"pad={pad}: the translation range must be >= 0 pixels")
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    wp = w + 2 * pad
    rows = offsets[0][:, None] + torch.arange(h, device=dev)  # (n, h): rows of the zero-padded image
    ar = torch.arange(w, device=dev)
    cols = offsets[1][:, None] + torch.where(flip[:, None], w - 1 - ar, ar)  # (n, w): mirrored when flipped
    flat_idx = (rows[:, :, None] * wp + cols[:, None, :]).view(n, h * w)  # where each output pixel comes from
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    # One torch.gather over the flattened pixels (fast on every device, unlike broadcast 4-D advanced indexing), done
    # in whichever memory layout x has, so a channels_last batch stays channels_last without extra copies.
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        src = padded.permute(0, 2, 3, 1).reshape(n, -1, c)  # NHWC, contiguous for a channels_last x
        out = torch.gather(src, 1, flat_idx[:, :, None].expand(n, h * w, c))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    src = padded.reshape(n, c, -1)
    out = torch.gather(src, 2, flat_idx[:, None, :].expand(n, c, h * w))
    return out.view(n, c, h, w)
