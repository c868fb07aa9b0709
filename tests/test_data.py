"""Tests for allconv_cli.data: sources, splits, the paper's GCN + ZCA preprocessing, batching and augmentation.

The preprocessing tests use the real CIFAR-10 arrays in ``shared/data/cifar10`` next to the repository (always
present, in CI too). Fitting ZCA costs ~10 s on a 2-core machine, so the real-data dataset is built once per module and
the tests that need the same fit read it from the on-disk cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from allconv_cli.data import (
    AUGMENTATIONS,
    CIFAR10_CLASSES,
    DATASETS,
    PREPROCESSINGS,
    DataConfig,
    Dataset,
    Split,
    augment_batch,
    iterate_batches,
    load_dataset,
    load_raw,
    make_fake,
    pick_test_indices,
    preprocess,
    preprocess_cache_dir,
    split_indices,
)
from allconv_cli.errors import AllconvError
from conftest import CIFAR_DIR


def _mean_sq_norm(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum(dim=(1, 2, 3)).mean())


# ------------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def zca_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def real(cifar10k: Path, zca_cache: Path) -> Dataset:
    """GCN + ZCA fitted on the 9,000-image training part (val_size 1,000), stored in the module's cache dir."""
    return load_dataset(DataConfig(data_dir=str(cifar10k), val_size=1000, cache_dir=str(zca_cache)))


def _labels(n_per_class: int, classes: int = 10, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_per_class))


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez(path, images=images, labels=labels)


# ------------------------------------------------------------------------------------------------------------- splits


@pytest.mark.unit
def test_split_indices_sizes_disjoint_stratified() -> None:
    labels = _labels(500)
    fit, train, val = split_indices(labels, val_size=1000, subset=2000, seed=3)
    assert (len(fit), len(train), len(val)) == (4000, 2000, 1000)
    assert np.intersect1d(fit, val).size == 0
    assert np.array_equal(np.union1d(fit, val), np.arange(5000))  # fit = everything not in val
    assert np.isin(train, fit).all()  # the subset is drawn from the training part only
    assert len(np.unique(train)) == 2000 and len(np.unique(val)) == 1000
    assert np.bincount(labels[val], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels[fit], minlength=10).tolist() == [400] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [200] * 10


@pytest.mark.unit
def test_split_indices_deterministic_and_seeded() -> None:
    labels = _labels(300)
    a = split_indices(labels, 600, 900, seed=0)
    b = split_indices(labels, 600, 900, seed=0)
    c = split_indices(labels, 600, 900, seed=1)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.unit
def test_split_indices_no_val_no_subset_and_uneven_classes() -> None:
    labels = _labels(50)
    fit, train, val = split_indices(labels, 0, None, seed=0)
    assert len(val) == 0 and np.array_equal(fit, np.arange(500)) and np.array_equal(train, fit)
    # uneven classes: each class gets its exact share rounded down or up, and the total is exact
    uneven = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [70, 20, 7, 3]))
    _, train, val = split_indices(uneven, 33, 17, seed=5)
    assert len(val) == 33 and len(train) == 17
    exact = np.array([70, 20, 7, 3]) * 33 / 100
    got = np.bincount(uneven[val], minlength=4)
    assert (got >= np.floor(exact)).all() and (got <= np.ceil(exact)).all()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("val_size", "subset", "shown"),
    [(-1, None, "val_size=-1"), (500, None, "val_size=500"), (100, 0, "subset=0"), (100, 5, "subset=5"),
     (100, 401, "subset=401"), (100, -3, "subset=-3")],
)
def test_split_indices_rejects_bad_sizes(val_size: int, subset: int | None, shown: str) -> None:
    with pytest.raises(AllconvError) as err:
        split_indices(_labels(50), val_size, subset, seed=0)
    message = str(err.value)
    assert shown in message and "\n" not in message
    if shown.startswith("subset"):
        assert "--subset between 10 " in message and " and 400 " in message
    else:
        assert "--val-size between 0 and 499" in message


@pytest.mark.unit
def test_test_part_is_stratified_seeded_and_apart_from_the_split() -> None:
    labels = _labels(100)
    assert np.array_equal(pick_test_indices(labels, None, seed=0), np.arange(1000))
    assert np.array_equal(pick_test_indices(labels, 1000, seed=0), np.arange(1000))
    part = pick_test_indices(labels, 300, seed=2)
    assert len(np.unique(part)) == 300 and np.array_equal(part, np.sort(part))
    assert np.bincount(labels[part], minlength=10).tolist() == [30] * 10
    assert np.array_equal(part, pick_test_indices(labels, 300, seed=2))
    assert not np.array_equal(part, pick_test_indices(labels, 300, seed=3))


@pytest.mark.unit
def test_test_size_leaves_train_and_val_alone_and_enters_the_fingerprint() -> None:
    base = DataConfig(dataset="fake", fake_train_size=400, fake_test_size=200, val_size=100, preprocess="none")
    full, part = load_dataset(base), load_dataset(dataclasses.replace(base, test_size=50))
    assert (len(full.test), len(part.test)) == (200, 50)
    assert torch.equal(full.train.x, part.train.x) and torch.equal(full.val.y, part.val.y)
    assert np.bincount(part.test.y.numpy(), minlength=10).tolist() == [5] * 10
    assert part.fingerprint != full.fingerprint


@pytest.mark.unit
@pytest.mark.parametrize("test_size", [0, 9, 201, -5])
def test_test_size_out_of_range_names_the_flag(test_size: int) -> None:
    with pytest.raises(AllconvError) as err:
        load_dataset(DataConfig(dataset="fake", fake_train_size=400, fake_test_size=200, val_size=100,
                                preprocess="none", test_size=test_size))
    message = str(err.value)
    assert f"test_size={test_size}" in message and "--test-size between 10 " in message and "\n" not in message


# ------------------------------------------------------------------------------------------------------- real CIFAR


@pytest.mark.cifar
def test_real_cifar_shapes_labels_and_names(real: Dataset) -> None:
    assert (len(real.train), len(real.val), len(real.test)) == (9000, 1000, 2000)
    for split in (real.train, real.val, real.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (3, 32, 32) and split.y.dtype == torch.int64
        assert torch.isfinite(split.x).all()
    assert real.num_classes == 10 and real.classes == list(CIFAR10_CLASSES)
    assert torch.bincount(real.val.y).tolist() == [100] * 10
    assert len(real.fingerprint) == 12


@pytest.mark.cifar
def test_zca_whitened_training_covariance(real: Dataset) -> None:
    """ZCA with regulariser eps makes the training covariance U diag(s / (s + eps)) U^T = I - eps W^2 exactly, i.e. the
    identity in every direction whose variance s is well above eps, and shrunk (never amplified) below it.

    Checked on the network inputs themselves (float32 outputs), against the fitted W: relative Frobenius error < 1e-3
    (measured ~2e-5); all eigenvalues <= 1; the 30 strongest directions (GCN variance > ~13, i.e. > 100 eps) within
    1 % of 1, and a few hundred directions above 0.9 (measured ~240 on 9k images, ~226 above 0.91 on 45k).
    """
    pre = real.preprocessor
    assert pre is not None and pre.kind == "gcn-zca" and pre.whitening is not None and pre.epsilon is not None
    w = pre.whitening.double()
    assert torch.allclose(w, w.T, atol=1e-6)
    z = real.train.x.reshape(len(real.train), -1)
    z = z - z.mean(0)
    cov = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
    for start in range(0, len(z), 4096):
        chunk = z[start : start + 4096]
        cov += (chunk.T @ chunk).double()
    cov /= len(z)
    expected = torch.eye(len(w), dtype=torch.float64) - pre.epsilon * (pre.whitening @ pre.whitening).double()
    rel = torch.linalg.matrix_norm(cov - expected) / torch.linalg.matrix_norm(expected)
    assert rel < 1e-3, f"whitened covariance is {rel:.2e} away from I - eps W^2"
    eig = torch.linalg.eigvalsh(cov.float()).flip(0)  # float32 is plenty for these bounds and twice as fast
    assert eig[0] <= 1.0 + 1e-3 and eig[-1] >= -1e-3
    assert eig[29] >= 0.99, f"30th whitened eigenvalue {eig[29]:.4f}"
    assert (eig >= 0.9).sum() >= 150


@pytest.mark.cifar
def test_val_and_test_on_training_scale(real: Dataset) -> None:
    train = _mean_sq_norm(real.train.x)
    assert 0.8 <= _mean_sq_norm(real.val.x) / train <= 1.25
    assert 0.8 <= _mean_sq_norm(real.test.x) / train <= 1.25


@pytest.mark.cifar
def test_subset_uses_fit_on_whole_training_part(real: Dataset, cifar10k: Path, zca_cache: Path) -> None:
    """With subset=2000 the whitening must still come from the 9,000-image training part. Fitted on the 2,000 alone,
    the 3072-dim covariance is badly estimated and unseen images come out ~1.7x larger at eps 0.1 (more at smaller
    eps), which the scale check below would catch."""
    cfg = DataConfig(data_dir=str(cifar10k), val_size=1000, subset=2000, cache_dir=str(zca_cache))
    sub = load_dataset(cfg)  # same training part as `real`: its fit comes from the cache
    assert len(sub.train) == 2000 and torch.bincount(sub.train.y).tolist() == [200] * 10
    assert sub.preprocessor is not None and real.preprocessor is not None
    assert torch.equal(sub.preprocessor.whitening, real.preprocessor.whitening)
    assert torch.equal(sub.val.x, real.val.x) and torch.equal(sub.test.x, real.test.x)
    train = _mean_sq_norm(sub.train.x)
    assert 0.8 <= _mean_sq_norm(sub.val.x) / train <= 1.25
    assert 0.8 <= _mean_sq_norm(sub.test.x) / train <= 1.25
    assert sub.fingerprint != real.fingerprint
    files = sorted((zca_cache / "preprocess").iterdir())  # one fit for both, and no temp files left behind
    assert len(files) == 1 and files[0].name.startswith("gcn-zca-") and files[0].suffix == ".npz"


def _with_noise_outside_training_part(d: Path, val_size: int) -> None:
    """Write to ``d`` the real train_1 with its validation images replaced by noise, and a noise test set."""
    with np.load(CIFAR_DIR / "train_1.npz") as z:
        x, y = z["images"].copy(), z["labels"]
    _, _, val_idx = split_indices(y.astype(np.int64), val_size, None, seed=0)
    rng = np.random.default_rng(0)
    x[val_idx] = rng.integers(0, 256, size=(len(val_idx), 32, 32, 3), dtype=np.uint8)
    _write_npz(d / "train_1.npz", x, y)
    _write_npz(d / "test.npz", rng.integers(0, 256, size=(500, 32, 32, 3), dtype=np.uint8), np.arange(500) % 10)


@pytest.mark.cifar
def test_zca_fitted_on_training_part_only(real: Dataset, zca_cache: Path, tmp_path: Path) -> None:
    """Replace every validation and test image by noise: the training inputs (so the transform) do not change.

    This reuses the module's cache, whose key hashes exactly the images handed to the fit: had the fit seen a
    validation or test image, the key would differ, the transform would be refitted with the noise, and the
    training inputs would move."""
    _with_noise_outside_training_part(tmp_path, 1000)
    other = load_dataset(DataConfig(data_dir=str(tmp_path), val_size=1000, cache_dir=str(zca_cache)))
    assert torch.equal(other.train.x, real.train.x)
    assert not torch.allclose(other.val.x, real.val.x)
    assert len(list((zca_cache / "preprocess").iterdir())) == 1


@pytest.mark.cifar
def test_standardize_fitted_on_training_part_only(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    for name in ("train_1.npz", "test.npz"):
        (tmp_path / "real" / name).symlink_to(CIFAR_DIR / name)
    (tmp_path / "noisy").mkdir()
    _with_noise_outside_training_part(tmp_path / "noisy", 1000)
    a = load_dataset(DataConfig(data_dir=str(tmp_path / "real"), val_size=1000, preprocess="standardize"))
    b = load_dataset(DataConfig(data_dir=str(tmp_path / "noisy"), val_size=1000, preprocess="standardize"))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.preprocessor.mean, b.preprocessor.mean)
    per_channel = a.train.x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)


@pytest.mark.cifar
def test_preprocess_none_is_pixels_over_255(cifar10k: Path) -> None:
    none = load_dataset(DataConfig(data_dir=str(cifar10k), val_size=0, preprocess="none", subset=100))
    with np.load(CIFAR_DIR / "test.npz") as z:
        raw = z["images"][:5]
    assert torch.equal(none.test.x[:5], torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255.0)
    assert none.val is None and len(none.train) == 100


@pytest.mark.unit
def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALLCONV_CACHE_DIR", str(tmp_path / "env"))
    assert preprocess_cache_dir(DataConfig()) == tmp_path / "env" / "preprocess"
    assert preprocess_cache_dir(DataConfig(cache_dir=str(tmp_path / "flag"))) == tmp_path / "flag" / "preprocess"
    assert preprocess_cache_dir(DataConfig(use_cache=False)) is None
    monkeypatch.delenv("ALLCONV_CACHE_DIR")
    assert preprocess_cache_dir(DataConfig()) == Path("~/.cache/allconv/preprocess").expanduser()


@pytest.mark.cifar
def test_cache_rejects_torn_or_foreign_files(real: Dataset, zca_cache: Path, tmp_path: Path) -> None:
    """A cache file is used only when whole and made for this key; anything else means refit (and rewrite)."""
    (path,) = (zca_cache / "preprocess").iterdir()
    key = path.stem.removeprefix("gcn-zca-")
    eps = real.preprocessor.epsilon
    loaded = preprocess.load_cached(path, key, eps)
    assert loaded is not None and torch.equal(loaded.whitening, real.preprocessor.whitening)
    assert preprocess.load_cached(path, "0" * 32, eps) is None
    torn = tmp_path / path.name
    torn.write_bytes(path.read_bytes()[: 1 << 20])
    assert preprocess.load_cached(torn, key, eps) is None
    preprocess.save_cached(torn, key, loaded)  # atomic rewrite over the torn file
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    assert torch.equal(preprocess.load_cached(torn, key, eps).mean, real.preprocessor.mean)


@pytest.mark.unit
def test_gcn_variants_are_keyed_apart_and_rebuild_from_their_fields(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GCN variant has its own cache file and data fingerprint, and comes back from the cache as itself; rebuilt
    from its fields (as a logged model's bundle does) it computes the same. (The eigendecomposition is replaced by an
    identity W: only the keying is tested.)"""
    assert PREPROCESSINGS[:2] == ("gcn-zca", "gcn-zca-coates") == preprocess.ZCA_KINDS
    assert preprocess.GCN["gcn-zca"] == preprocess.GcnParams(scale=55.0, use_std=False, sqrt_bias=0.0)
    fitted = []

    def identity_fit(images: np.ndarray, epsilon: float, device: object = None, kind: str = "gcn-zca"
                     ) -> preprocess.Preprocessor:
        fitted.append(kind)
        return preprocess.Preprocessor(kind, mean=torch.zeros(3072), whitening=torch.eye(3072), epsilon=epsilon)

    monkeypatch.setattr(preprocess, "fit_zca", identity_fit)
    fake = DataConfig(dataset="fake", fake_train_size=300, fake_test_size=100, val_size=100, cache_dir=str(tmp_path))
    prints = set()
    for _ in range(2):  # the second round reads both fits from the cache
        for kind in preprocess.ZCA_KINDS:
            data = load_dataset(dataclasses.replace(fake, preprocess=kind))
            assert data.preprocessor.kind == kind
            prints.add(data.fingerprint)
    assert fitted == ["gcn-zca", "gcn-zca-coates"] and len(prints) == 2
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "preprocess").iterdir())
    assert names == ["gcn-zca", "gcn-zca-coates"]

    w, mean, raw = torch.eye(3072), torch.zeros(3072), make_fake(10, 10, 0)[0]
    current = preprocess.Preprocessor("gcn-zca", mean=mean, whitening=w, epsilon=0.1)
    again = preprocess.Preprocessor.from_fields({f.name: getattr(current, f.name) for f in dataclasses.fields(current)})
    coates = preprocess.Preprocessor("gcn-zca-coates", mean=mean, whitening=w, epsilon=0.1)
    assert again.kind == "gcn-zca" and torch.equal(again.apply(raw), current.apply(raw))
    assert not torch.allclose(coates.apply(raw), again.apply(raw))
    with pytest.raises(AllconvError, match="preprocess='pca'"):
        preprocess.Preprocessor("pca")


# ---------------------------------------------------------------------------------------------------------- fake data


@pytest.mark.unit
def test_fake_sizes_and_determinism() -> None:
    cfg = DataConfig(dataset="fake", fake_train_size=600, fake_test_size=150, seed=4)
    x, y, xt, yt, classes = load_raw(cfg)
    assert x.shape == (600, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (150, 32, 32, 3)
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [60] * 10 and len(classes) == 10
    again = load_raw(cfg)
    assert np.array_equal(x, again[0]) and np.array_equal(yt, again[3])
    other = load_raw(DataConfig(dataset="fake", fake_train_size=600, fake_test_size=150, seed=5))
    assert not np.array_equal(x, other[0])
    bigger_test = load_raw(DataConfig(dataset="fake", fake_train_size=600, fake_test_size=300, seed=4))
    assert np.array_equal(x, bigger_test[0])  # the training images do not depend on the test size


@pytest.mark.unit
def test_fake_is_learnable() -> None:
    """Nearest class mean on standardised pixels: far above the 10 % chance level (measured ~81 %), not trivial."""
    ds = load_dataset(DataConfig(dataset="fake", fake_train_size=2000, fake_test_size=500, val_size=200,
                                 preprocess="standardize"))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1800, 200, 500)
    x = ds.train.x.reshape(len(ds.train), -1)
    means = torch.stack([x[ds.train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(ds.test.x.reshape(len(ds.test), -1), means).argmin(1)
    accuracy = (pred == ds.test.y).float().mean().item()
    assert 0.5 < accuracy < 0.99


@pytest.mark.unit
def test_fake_defaults_leave_room_for_the_default_val_split() -> None:
    """`--dataset fake` must work with every other option at its default (val_size 5,000)."""
    fit, train, val = split_indices(make_fake(DataConfig.fake_train_size, 10, 0)[1], 5000, None, 0)
    assert len(val) == 5000 and len(train) == len(fit) == DataConfig.fake_train_size - 5000
    with pytest.raises(AllconvError, match="val_size=5000"):
        load_dataset(DataConfig(dataset="fake", fake_train_size=2000, fake_test_size=10))


# --------------------------------------------------------------------------------------------------- errors, sources


@pytest.mark.unit
def test_unknown_choices_list_the_allowed_values() -> None:
    with pytest.raises(AllconvError) as err:
        load_dataset(DataConfig(dataset="mnist"))
    assert "'mnist'" in str(err.value) and all(d in str(err.value) for d in DATASETS)
    with pytest.raises(AllconvError) as err:
        load_dataset(DataConfig(dataset="fake", preprocess="pca", val_size=100))
    assert "'pca'" in str(err.value) and all(p in str(err.value) for p in PREPROCESSINGS)
    with pytest.raises(AllconvError, match="'jitter'"):
        augment_batch(torch.zeros(1, 3, 32, 32), "jitter")
    assert AUGMENTATIONS == ("none", "flip-translate")


@pytest.mark.unit
def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(AllconvError, match=str(missing)) as err:
        load_raw(DataConfig(data_dir=str(missing)))
    assert "does not exist" in str(err.value) and "--dataset fake" in str(err.value)


@pytest.mark.cifar
def test_env_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALLCONV_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(AllconvError, match="ALLCONV_DATA_DIR"):
        load_raw(DataConfig())
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "train_1.npz").symlink_to(CIFAR_DIR / "train_1.npz")
    (tmp_path / "cifar10" / "test.npz").symlink_to(CIFAR_DIR / "test.npz")
    monkeypatch.setenv("ALLCONV_DATA_DIR", str(tmp_path))  # a parent folder with a cifar10/ sub-folder works too
    x, y, _, yt, _ = load_raw(DataConfig())
    assert x.shape == (10000, 32, 32, 3) and yt.shape == (10000,) and y.dtype == np.int64


@pytest.mark.unit
def test_empty_dir_without_download(tmp_path: Path) -> None:
    with pytest.raises(AllconvError) as err:
        load_raw(DataConfig(data_dir=str(tmp_path), download=False))
    message = str(err.value)
    assert "CIFAR-10 not found in" in message and str(tmp_path) in message and "--data-dir" in message
    assert "\n" not in message


def _tiny(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 32, 32, 3), np.uint8), np.arange(n) % 10


@pytest.mark.unit
def test_npz_dir_without_test_file(tmp_path: Path) -> None:
    _write_npz(tmp_path / "train_1.npz", *_tiny())
    with pytest.raises(AllconvError, match=r"test\.npz") as err:
        load_raw(DataConfig(data_dir=str(tmp_path)))
    assert str(tmp_path) in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("arrays", "shown"),
    [
        ({"images": _tiny()[0]}, "labels"),
        ({"x": _tiny()[0], "y": _tiny()[1]}, "images"),
        ({"images": np.zeros((20, 3, 32, 32), np.uint8), "labels": _tiny()[1]}, "(20, 3, 32, 32)"),
        ({"images": np.zeros((20, 32, 32, 3), np.float32), "labels": _tiny()[1]}, "float32"),
        ({"images": _tiny()[0], "labels": np.arange(19) % 10}, "(19,)"),
        ({"images": _tiny()[0], "labels": np.arange(20) % 10 + 5}, "5..14"),
    ],
)
def test_npz_bad_arrays_name_the_file(tmp_path: Path, arrays: dict[str, np.ndarray], shown: str) -> None:
    np.savez(tmp_path / "train_1.npz", **arrays)
    _write_npz(tmp_path / "test.npz", *_tiny())
    with pytest.raises(AllconvError) as err:
        load_raw(DataConfig(data_dir=str(tmp_path)))
    assert "train_1.npz" in str(err.value) and shown in str(err.value)


@pytest.mark.unit
def test_npz_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "train_1.npz").write_bytes(b"not a zip")
    _write_npz(tmp_path / "test.npz", *_tiny())
    with pytest.raises(AllconvError, match=r"train_1\.npz"):
        load_raw(DataConfig(data_dir=str(tmp_path)))


@pytest.mark.unit
def test_npz_dataset_mismatch_and_cifar100_names(tmp_path: Path) -> None:
    for i in (1, 2):
        _write_npz(tmp_path / f"train_{i}.npz", *_tiny())
    _write_npz(tmp_path / "test.npz", *_tiny())
    with pytest.raises(AllconvError, match="holds 10 classes"):
        load_raw(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))
    x, _, _, _, classes = load_raw(DataConfig(data_dir=str(tmp_path)))
    assert len(x) == 40 and classes == list(CIFAR10_CLASSES)
    hundred = tmp_path / "c100"
    hundred.mkdir()
    _write_npz(hundred / "train.npz", np.zeros((200, 32, 32, 3), np.uint8), np.arange(200, dtype=np.uint8) % 100)
    _write_npz(hundred / "test.npz", np.zeros((100, 32, 32, 3), np.uint8), np.arange(100, dtype=np.int32))
    _, y100, _, _, names = load_raw(DataConfig(dataset="cifar100", data_dir=str(hundred)))
    assert names == [str(i) for i in range(100)] and y100.dtype == np.int64
    (hundred / "classes.txt").write_text("\n".join(f"name{i}" for i in range(100)))
    assert load_raw(DataConfig(dataset="cifar100", data_dir=str(hundred)))[4][7] == "name7"


@pytest.mark.unit
def test_fingerprint_tracks_data_changing_fields() -> None:
    base = DataConfig(dataset="fake", fake_train_size=200, fake_test_size=50, val_size=50, preprocess="none")
    fp = load_dataset(base).fingerprint
    assert load_dataset(base).fingerprint == fp
    assert load_dataset(dataclasses.replace(base, download=False, cache_dir="/x")).fingerprint == fp
    for change in ({"seed": 1}, {"val_size": 20}, {"subset": 100}, {"preprocess": "standardize"}):
        assert load_dataset(dataclasses.replace(base, **change)).fingerprint != fp, change


# ---------------------------------------------------------------------------------------------- batches, augmentation


def _split(n: int = 103) -> Split:
    return Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous(),
                 torch.arange(n))


@pytest.mark.unit
def test_iterate_batches_covers_each_index_once_in_seeded_order() -> None:
    split = _split()
    batches = list(iterate_batches(split, 10, shuffle=True, generator=torch.Generator().manual_seed(7)))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(103)) and order.tolist() != list(range(103))
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0], y.float())  # images stay with their labels
    again = torch.cat([y for _, y in iterate_batches(split, 10, shuffle=True,
                                                        generator=torch.Generator().manual_seed(7))])
    other = torch.cat([y for _, y in iterate_batches(split, 10, shuffle=True,
                                                        generator=torch.Generator().manual_seed(8))])
    assert torch.equal(order, again) and not torch.equal(order, other)


@pytest.mark.unit
def test_iterate_batches_in_order_and_drop_last() -> None:
    split = _split()
    plain = torch.cat([y for _, y in iterate_batches(split, 25, shuffle=False)])
    assert plain.tolist() == list(range(103))
    dropped = list(iterate_batches(split, 25, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(y) for _, y in dropped] == [25] * 4
    assert len(set(torch.cat([y for _, y in dropped]).tolist())) == 100
    assert [len(y) for _, y in iterate_batches(split, 200, shuffle=False, drop_last=True)] == []
    with pytest.raises(AllconvError, match="batch_size=0"):
        iterate_batches(split, 0, shuffle=False)


@pytest.mark.unit
def test_split_to_channels_last_survives_batching() -> None:
    split = _split(20).to("cpu", channels_last=True)
    assert split.x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iterate_batches(split, 8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    out = augment_batch(x, "flip-translate", torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    ds = Dataset(train=split, val=None, test=split, num_classes=10, classes=list("abcdefghij"), fingerprint="f")
    moved = ds.to("cpu", channels_last=False)
    assert moved.val is None and moved.train.x.is_contiguous() and torch.equal(moved.train.x, split.x)


@pytest.mark.unit
def test_augment_none_is_identity_and_flip_translate_is_seeded() -> None:
    x = torch.randn(64, 3, 32, 32)
    assert augment_batch(x, "none") is x
    a = augment_batch(x, "flip-translate", torch.Generator().manual_seed(1))
    b = augment_batch(x, "flip-translate", torch.Generator().manual_seed(1))
    c = augment_batch(x, "flip-translate", torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


@pytest.mark.unit
def test_flip_only_with_zero_pad() -> None:
    x = torch.randn(200, 3, 32, 32)
    out = augment_batch(x, "flip-translate", torch.Generator().manual_seed(0), pad=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 60 < int(mirrored.sum()) < 140  # p = 0.5


@pytest.mark.unit
def test_translation_is_a_zero_filled_shift_within_pad() -> None:
    """Every output is its input, maybe mirrored, shifted by some (dy, dx) in [-pad, pad]^2 with zeros shifted in; over
    a batch the shifts cover the whole range."""
    pad = 3
    x = torch.rand(300, 3, 32, 32) + 1.0  # strictly positive, so zero fill is visible
    out = augment_batch(x, "flip-translate", torch.Generator().manual_seed(0), pad=pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(len(x)):
        found = None
        for flip in (False, True):
            src = padded[i].flip(2) if flip else padded[i]
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    if torch.equal(src[:, dy : dy + 32, dx : dx + 32], out[i]):
                        found = (flip, dy - pad, dx - pad)
        assert found is not None, f"image {i} is not a flipped/shifted copy"
        seen.add(found[1:])
    assert seen == {(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)}
