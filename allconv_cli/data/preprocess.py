"""The paper's preprocessing (Goodfellow et al. 2013, as Springenberg et al. 2015 use it): global contrast
normalisation, then ZCA whitening, fitted on the training part only; plus per-channel standardisation and none.

ZCA is fitted on the whole training part even when ``subset`` trains on fewer images: a 3072 x 3072 covariance from
2,000 images is rank-deficient and unseen inputs would come out larger than the training ones (1.7x the mean squared
norm at the default eps). The fit costs ~15-30 s on a 2-core CPU (0.1 s on a GPU) and every search trial needs the same
one, so it is cached on disk, keyed by the content of the images it was fitted on and its parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from allconv_cli.config import PREPROCESSINGS
from allconv_cli.data.choices import check_choice, unknown_choice_message
from allconv_cli.errors import AllconvError

if TYPE_CHECKING:
    from allconv_cli.data import DataConfig

log = logging.getLogger(__name__)

INPUT_DIM = 32 * 32 * 3
ENV_CACHE_DIR = "ALLCONV_CACHE_DIR"
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
            raise AllconvError(unknown_choice_message("preprocess", self.kind, PREPROCESSINGS, "--preprocess"))
        return out

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


def load_cached(path: Path, key: str, epsilon: float) -> Preprocessor | None:
    """The fit cached at ``path`` if the file is whole, finite and made for ``key``; else None (the caller refits)."""
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


def save_cached(path: Path, key: str, pre: Preprocessor) -> None:
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
    check_choice("preprocess", cfg.preprocess, PREPROCESSINGS, "--preprocess")
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
    pre = load_cached(path, key, cfg.zca_epsilon)
    if pre is not None:
        log.info("using the cached ZCA fit %s", path)
        return pre
    pre = fit_zca(fit_images, cfg.zca_epsilon, device)
    save_cached(path, key, pre)
    return pre


