"""Seeded, stratified index picks: the validation split, the training subset and the test part.

The preprocessing is fitted on the whole "training part" (every training image not in the validation split), so
model selection on ``val`` stays honest; see :mod:`allconv_cli.data.preprocess` for why even a ``subset`` run fits it
on the whole part.
"""

from __future__ import annotations

import numpy as np

from allconv_cli.errors import AllconvError


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
