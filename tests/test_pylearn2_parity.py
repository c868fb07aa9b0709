"""``--preprocess gcn-zca`` computes what pylearn2 computed for the paper's data, checked on real CIFAR-10 images.

The paper trains on Goodfellow et al. (2013)'s CIFAR-10, made by pylearn2's ``make_cifar10_gcn_whitened.py``:
``CIFAR10(which_set, gcn=55.)`` (``global_contrast_normalize(X, scale=55.)`` on the raw 0..255 pixels, 3,072 values
per image in CHW order), then ``ZCA()`` (``filter_bias=0.1``) fitted on the training images and applied to the test
images. The two functions below transcribe pylearn2's code (``pylearn2/expr/preprocessing.py`` and
``pylearn2/datasets/preprocessing.py``, class ``ZCA``: ``fit`` and ``apply``) in float64 NumPy; ours runs in float32
on the CPU (float64 on GPUs). Measured on 2,000 training and 500 test images: outputs agree to 2.2e-5 absolute on
values up to 7.7 (2.9e-6 of the largest value; per image, relative L2 difference <= 4e-6), W to 4.3e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allconv_cli.data import DataConfig, preprocess
from conftest import CIFAR_DIR

N_TRAIN, N_TEST = 2000, 500


def pylearn2_global_contrast_normalize(X: np.ndarray, scale: float = 1., subtract_mean: bool = True,
                                       use_std: bool = False, sqrt_bias: float = 0., min_divisor: float = 1e-8
                                       ) -> np.ndarray:
    """pylearn2.expr.preprocessing.global_contrast_normalize, line for line."""
    assert X.ndim == 2
    scale = float(scale)
    mean = X.mean(axis=1)
    X = X - mean[:, np.newaxis] if subtract_mean else X.copy()
    if use_std:
        normalizers = np.sqrt(sqrt_bias + X.var(axis=1, ddof=1)) / scale
    else:
        normalizers = np.sqrt(sqrt_bias + (X ** 2).sum(axis=1)) / scale
    normalizers[normalizers < min_divisor] = 1.
    X /= normalizers[:, np.newaxis]
    return X


class Pylearn2ZCA:
    """pylearn2.datasets.preprocessing.ZCA with its defaults (n_components=None, n_drop_components=None,
    filter_bias=0.1): ``fit`` and the maths of ``apply``."""

    def __init__(self, filter_bias: float = 0.1) -> None:
        self.filter_bias = filter_bias

    def fit(self, X: np.ndarray) -> None:
        X = X.copy()
        self.mean_ = np.mean(X, axis=0)
        X -= self.mean_
        covariance = X.T.dot(X) / X.shape[0] + self.filter_bias * np.identity(X.shape[1])
        eigs, eigv = np.linalg.eigh(covariance)
        assert not np.isnan(eigs).any() and not np.isnan(eigv).any() and eigs.min() > 0
        self.P_ = np.dot(eigv * (1.0 / np.sqrt(eigs)), eigv.T)

    def apply(self, X: np.ndarray) -> np.ndarray:
        return np.dot(X - self.mean_, self.P_)


def _design_matrix(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float64 (N, 3072) in CHW order, as pylearn2's CIFAR10 reads the CIFAR batches."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float64)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    with np.load(CIFAR_DIR / "train_1.npz") as z:
        train = z["images"][:N_TRAIN]
    with np.load(CIFAR_DIR / "test.npz") as z:
        test = z["images"][:N_TEST]
    return train, test


@pytest.mark.cifar
def test_gcn_zca_default_is_pylearn2(images: tuple[np.ndarray, np.ndarray]) -> None:
    train, test = images
    reference = Pylearn2ZCA()
    reference.fit(pylearn2_global_contrast_normalize(_design_matrix(train), scale=55.))
    expected = reference.apply(pylearn2_global_contrast_normalize(_design_matrix(test), scale=55.))

    cfg = DataConfig(use_cache=False)  # the defaults: --preprocess gcn-zca, --zca-epsilon 0.1
    assert (cfg.preprocess, cfg.zca_epsilon) == ("gcn-zca", 0.1)
    ours = preprocess.fit_preprocessor(cfg, train)
    got = ours.apply(test).reshape(N_TEST, -1).double().numpy()

    assert ours.mean is not None and ours.whitening is not None
    np.testing.assert_allclose(ours.mean.double().numpy(), reference.mean_, rtol=0, atol=1e-6)  # measured 1.7e-8
    np.testing.assert_allclose(ours.whitening.double().numpy(), reference.P_, rtol=0, atol=5e-5)  # measured 3.7e-6
    assert np.abs(expected).max() > 5  # whitened pixels of real images: values of several units
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)  # measured 2.2e-5
    per_image = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert per_image.max() < 4e-5, f"per-image relative difference {per_image.max():.2e}"  # measured 4e-6


@pytest.mark.cifar
@pytest.mark.parametrize(("kind", "pylearn2_args"), [
    ("gcn-zca", {"scale": 55.}),  # make_cifar10_gcn_whitened.py: CIFAR10(gcn=55.)
    ("gcn-zca-coates", {"use_std": True, "sqrt_bias": 10.}),  # Coates et al. 2011, as pylearn2's docstring names it
])
def test_gcn_matches_pylearn2(images: tuple[np.ndarray, np.ndarray], kind: str,
                              pylearn2_args: dict[str, object]) -> None:
    raw = np.concatenate(images)
    raw[0] = 128  # a uniform image: pylearn2 leaves it all zeros (its divisor 0 is below min_divisor, replaced by 1)
    expected = pylearn2_global_contrast_normalize(_design_matrix(raw), **pylearn2_args)
    got = preprocess.gcn(torch.from_numpy(_design_matrix(raw)).float(), preprocess.GCN[kind]).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)  # float32 against float64: measured 8.7e-7
    assert not got[0].any()
    if kind == "gcn-zca":
        np.testing.assert_allclose(np.linalg.norm(got[1:], axis=1), 55.0, rtol=1e-5)
