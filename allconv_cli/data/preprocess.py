"""The paper's preprocessing (Goodfellow et al. 2013, as Springenberg et al. 2015 use it): global contrast
normalisation, then ZCA whitening, fitted on the training part only, computed as pylearn2 computes it (tests check it
against a transcription of pylearn2's code); plus Coates' GCN variant, per-channel standardisation and none.

ZCA is fitted on the whole training part even when ``subset`` trains on fewer images (docs/protocol.md says why).
The fit costs ~15-30 s on a 2-core CPU (0.1 s on a GPU) and every search trial needs the same
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allconv_cli.config import DataConfig, check
from allconv_cli.errors import AllconvError
from allconv_cli.paper import ZCA_EPSILON

log = logging.getLogger(__name__)

INPUT_DIM = 32 * 32 * 3
ENV_CACHE_DIR = "ALLCONV_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/allconv"  # the fitted preprocessing goes to <cache dir>/preprocess


@dataclass(frozen=True)
class GcnParams:
    """The arguments of pylearn2's ``global_contrast_normalize`` (pylearn2/expr/preprocessing.py), per image:
    x <- (x - mean(x)) / (sqrt(sqrt_bias + spread) / scale), spread = sum(x^2) or var(x, ddof=1) if ``use_std``;
    a divisor below ``min_divisor`` is replaced by 1 (a uniform image stays all zeros)."""

    scale: float
    use_std: bool
    sqrt_bias: float
    min_divisor: float = 1e-8


# The GCN before ZCA, per --preprocess choice, on raw 0..255 pixels (3,072 values per image, CHW order).
# gcn-zca: the paper's data (Goodfellow et al. 2013's maxout CIFAR-10, pylearn2's make_cifar10_gcn_whitened.py):
#   CIFAR10(which_set, gcn=55.), i.e. global_contrast_normalize(X, scale=55.) with its other defaults: every image
#   centred and scaled to L2 norm 55 (per-pixel RMS 0.99).
# gcn-zca-coates: Coates, Lee & Ng (2011)'s variant (the one pylearn2's docstring names): (x - mean) / sqrt(10 + var);
#   a normal image leaves with per-pixel variance ~1 too, and near-uniform ones are not amplified to it.
GCN: dict[str, GcnParams] = {
    "gcn-zca": GcnParams(scale=55.0, use_std=False, sqrt_bias=0.0),
    "gcn-zca-coates": GcnParams(scale=1.0, use_std=True, sqrt_bias=10.0),
}
ZCA_KINDS: tuple[str, ...] = tuple(GCN)
# ZCA's epsilon is paper.ZCA_EPSILON (pylearn2's filter_bias 0.1): W = U diag(1/sqrt(s + eps)) U^T from the
# eigendecomposition of cov + eps I; docs/protocol.md gives what it does to CIFAR-10's eigenvalues, measured.
# Bump when the preprocessing maths change, so old cache entries and fingerprints are not reused.
# 1: gcn-zca was Coates' GCN (now gcn-zca-coates). 2: gcn-zca is pylearn2's gcn=55 GCN.
PREPROCESS_VERSION = 2

_ROWS_PER_CHUNK = 8192  # rows per matmul when fitting/applying: bounds the temporary memory to ~100 MB
_COV_BLOCK = 768  # column block for the symmetric covariance (only the upper block triangle is computed)


@dataclass(frozen=True)
class Preprocessor:
    """A fitted input transform from uint8 NHWC images to float32 NCHW network inputs.

    ``gcn-zca`` and ``gcn-zca-coates`` (:data:`ZCA_KINDS`): ``mean`` (3072,) and ``whitening`` (3072, 3072) act on
    images flattened in CHW order after that kind's GCN (:data:`GCN`). ``standardize``: ``mean`` and ``std`` (3,) per
    channel on the 0..1 scale. ``none``: x / 255.
    """

    kind: str
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    whitening: torch.Tensor | None = None
    epsilon: float | None = None

    def __post_init__(self) -> None:
        check("preprocess", self.kind)

    @classmethod
    def from_fields(cls, saved: dict[str, Any]) -> Preprocessor:
        """Rebuild one from its saved fields (a logged model's bundle holds them as plain tensors)."""
        return cls(**saved)

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
        if self.kind in GCN:
            assert self.mean is not None and self.whitening is not None
            dtype = _exact_dtype(dev)
            w, mean, params = self.whitening.to(dev, dtype), self.mean.to(dev, dtype), GCN[self.kind]
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = gcn(_to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev, dtype), params)
                flat_out[start : start + len(chunk)] = (chunk.sub_(mean) @ w).to("cpu", torch.float32)  # pylearn2's
        elif self.kind == "standardize":
            assert self.mean is not None and self.std is not None
            mean, std = self.mean.to(dev).view(1, 3, 1), self.std.to(dev).view(1, 3, 1)
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = _to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev).view(-1, 3, 1024) / 255.0
                flat_out[start : start + len(chunk)] = ((chunk - mean) / std).reshape(len(chunk), -1).cpu()
        else:  # none
            for start in range(0, n, _ROWS_PER_CHUNK):
                chunk = _to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev) / 255.0
                flat_out[start : start + len(chunk)] = chunk.cpu()
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


def gcn(x: torch.Tensor, params: GcnParams) -> torch.Tensor:
    """pylearn2's ``global_contrast_normalize`` (subtract_mean=True) of flattened 0..255 images, per row (see
    :class:`GcnParams`); a new tensor of ``x``'s dtype."""
    x = x - x.mean(dim=1, keepdim=True)
    # use_std: the variance with ddof=1, as pylearn2 (MATLAB's var, as Coates' code); else the squared L2 norm
    spread = x.var(dim=1, keepdim=True, correction=1) if params.use_std else x.square().sum(dim=1, keepdim=True)
    normalizers = torch.sqrt(params.sqrt_bias + spread) / params.scale
    normalizers = torch.where(normalizers < params.min_divisor, torch.ones_like(normalizers), normalizers)
    return x.div_(normalizers)


def fit_zca(images: np.ndarray, epsilon: float, device: torch.device | str | None = None, kind: str = "gcn-zca"
            ) -> Preprocessor:
    """Fit ``kind``'s GCN + ZCA on uint8 NHWC ``images`` exactly as pylearn2's ``ZCA(filter_bias=epsilon).fit``:
    mean-centre, cov = X^T X / N, (s, U) = eigh(cov + eps I), W = U diag(1 / sqrt(s)) U^T; applied as (x - mean) W.

    The covariance is accumulated over row chunks with exact float32 matmuls (float64 on GPUs, see
    :func:`_exact_dtype`) summed in float64, computing only the upper block triangle as it is symmetric; the
    eigendecomposition is float64. Returns the float32 mean and W, which is what is applied and cached, so a fresh fit
    and a cached one give the same inputs.
    """
    params = GCN[kind]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    n = len(images)
    if n < 2:
        raise AllconvError(f"cannot fit ZCA on {n} image(s): use a larger training set or --preprocess standardize")
    d = INPUT_DIM
    started = time.perf_counter()
    dtype = _exact_dtype(dev)
    x = torch.empty((n, d), dtype=dtype, device=dev)
    for start in range(0, n, _ROWS_PER_CHUNK):
        x[start : start + _ROWS_PER_CHUNK] = gcn(_to_float_chw(images[start : start + _ROWS_PER_CHUNK], dev, dtype),
                                                 params)
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
    cov.diagonal().add_(epsilon)  # pylearn2 adds filter_bias * I before the eigendecomposition
    s, u = torch.linalg.eigh(cov)
    if not s[0] > 0:  # pylearn2 asserts the same; cov is positive semi-definite, so only eps <= 0 gets here
        raise AllconvError(f"zca_epsilon={epsilon}: the regularised covariance is not positive definite; use eps > 0")
    w = (u * torch.rsqrt(s)) @ u.T
    log.info("fitted %s on %d images in %.1f s (eigenvalues of cov + eps I %.3g..%.3g)", kind, n,
             time.perf_counter() - started, s[0].item(), s[-1].item())
    return Preprocessor(kind, mean=mean64.float().cpu(), whitening=w.float().cpu(), epsilon=float(epsilon))


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


def _zca_cache_key(fit_images: np.ndarray, epsilon: float, kind: str = "gcn-zca") -> str:
    """Depends on exactly what the fit depends on: the fitted images' bytes (in order) and the parameters."""
    h = hashlib.sha256()
    h.update(f"{kind} v{PREPROCESS_VERSION} gcn={GCN[kind]} eps={epsilon!r} n={len(fit_images)}".encode())
    h.update(memoryview(np.ascontiguousarray(fit_images)).cast("B"))
    return h.hexdigest()[:32]


def load_cached(path: Path, key: str, epsilon: float, kind: str = "gcn-zca") -> Preprocessor | None:
    """The ``kind`` fit cached at ``path`` if the file is whole, finite and made for ``key`` (which hashes the kind
    and its parameters); else None (the caller refits)."""
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
    return Preprocessor(kind, mean=torch.from_numpy(mean), whitening=torch.from_numpy(w), epsilon=epsilon)


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


def fit_preprocessor(cfg: DataConfig, fit_images: np.ndarray, device: torch.device | str | None = None,
                     on_stage: Callable[[str], None] | None = None) -> Preprocessor:
    """The ``cfg.preprocess`` transform fitted on ``fit_images`` (the training part), from the cache when possible.
    ``on_stage`` hears whether the GCN + ZCA fit is loaded from the cache or fitted (seconds on a CPU)."""
    say = on_stage or (lambda text: None)
    if cfg.preprocess == "none":
        return Preprocessor("none")
    if cfg.preprocess == "standardize":
        return fit_standardize(fit_images)
    if not (cfg.zca_epsilon > 0 and np.isfinite(cfg.zca_epsilon)):
        raise AllconvError(f"zca_epsilon={cfg.zca_epsilon}: must be > 0 (default {ZCA_EPSILON})")
    fitting = f"fitting {cfg.preprocess} (GCN + ZCA) on {len(fit_images):,} images"
    cache = preprocess_cache_dir(cfg)
    if cache is None:
        say(fitting)
        return fit_zca(fit_images, cfg.zca_epsilon, device, cfg.preprocess)
    key = _zca_cache_key(fit_images, cfg.zca_epsilon, cfg.preprocess)
    path = cache / f"{cfg.preprocess}-{key}.npz"
    if path.is_file():
        say(f"loading the cached {cfg.preprocess} (GCN + ZCA) fit from {cache}")
    pre = load_cached(path, key, cfg.zca_epsilon, cfg.preprocess)
    if pre is not None:
        log.info("using the cached %s fit %s", cfg.preprocess, path)
        return pre
    say(f"{fitting}, to be cached in {cache}")
    pre = fit_zca(fit_images, cfg.zca_epsilon, device, cfg.preprocess)
    save_cached(path, key, pre)
    return pre
