"""Where the raw CIFAR arrays come from: a folder of ``train*.npz`` + ``test.npz``, a torchvision root (downloaded
into when allowed), or the synthetic ``fake`` set. Every failure is one line naming the folder and the fix."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from allconv_cli.config import ENV_DATA_DIR, DataConfig
from allconv_cli.data.fake import make_fake
from allconv_cli.errors import AllconvError

log = logging.getLogger(__name__)

RawArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "fake": 10}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fake": "fake"}
IMAGE_SHAPE = (32, 32, 3)  # HWC, as stored
DEFAULT_DATA_DIR = "~/.cache/allconv/data"


def load_raw(cfg: DataConfig) -> RawArrays:
    """Return ``(x_train uint8 NHWC, y_train int64, x_test, y_test, class names)`` for ``cfg.dataset``.

    CIFAR comes from ``data_dir`` when it (or its ``cifar10``/``cifar100`` sub-folder) holds ``train*.npz`` +
    ``test.npz`` (arrays ``images`` uint8 (N, 32, 32, 3) and ``labels``), else from a torchvision root there, which
    torchvision downloads into when ``cfg.download`` is set.
    """
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


def _load_npz_dir(d: Path, dataset: str) -> RawArrays:
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


def _load_torchvision(root: Path, cfg: DataConfig, origin: str) -> RawArrays:
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

