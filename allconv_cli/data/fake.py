"""``--dataset fake``: a synthetic, learnable stand-in with CIFAR's format, for tests and smoke runs without the real
data."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from allconv_cli.errors import AllconvError


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
