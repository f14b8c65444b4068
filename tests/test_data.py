"""edgeveil.training.data: loaders on small data, splits, stats and tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeveil.training.data import (
    DATASETS,
    ImageSet,
    Splits,
    channel_stats,
    default_image_size,
    load_dataset,
    make_splits,
    to_tensors,
)

SHARED = Path(
    os.environ.get("EDGEVEIL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets"
)
# class counts of the official MNIST t10k labels (PROVENANCE.md)
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------- helpers


def random_set(seed: int, n: int, size: int = 6, channels: int = 3, classes: int = 4) -> ImageSet:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    return ImageSet(x, y, tuple(f"c{i}" for i in range(classes)))


def indexed_pool(n: int, classes: int = 4, offset: int = 0) -> ImageSet:
    """Image i carries i + offset in its first two bytes, so a split's source indices can be read back."""
    ids = np.arange(n) + offset
    x = np.zeros((n, 4, 4, 1), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = ids % 256, ids // 256
    return ImageSet(x, (np.arange(n) % classes).astype(np.int64), tuple(str(c) for c in range(classes)))


def ids(images: ImageSet) -> np.ndarray:
    return images.x[:, 0, 0, 0].astype(np.int64) + 256 * images.x[:, 0, 1, 0].astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx-ubyte format of the MNIST files: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = (images, labels)
    return arrays


# ---------------------------------------------------------------- ImageSet


def test_imageset_rejects_bad_arrays_naming_the_problem():
    good = random_set(0, 8)
    with pytest.raises(ValueError, match="x must be uint8, got float32"):
        ImageSet(good.x.astype(np.float32), good.y, good.class_names)
    with pytest.raises(ValueError, match=r"shape \(N, H, W, C\)"):
        ImageSet(good.x[..., 0], good.y, good.class_names)
    with pytest.raises(ValueError, match="y must be int64"):
        ImageSet(good.x, good.y.astype(np.int32), good.class_names)
    with pytest.raises(ValueError, match="8 images but y has 7 labels"):
        ImageSet(good.x, good.y[:7], good.class_names)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1, got 0\.\.3"):
        ImageSet(good.x, good.y, ("a", "b"))


def test_sha256_is_stable_and_sees_pixels_labels_and_shape():
    a, b = random_set(1, 10), random_set(1, 10)
    assert a.sha256() == b.sha256() and len(a.sha256()) == 64
    x = a.x.copy()
    x[3, 2, 1, 0] ^= 1
    assert ImageSet(x, a.y, a.class_names).sha256() != a.sha256()
    y = a.y.copy()
    y[0] = 3
    assert ImageSet(a.x, y, a.class_names).sha256() != a.sha256()
    same_bytes = ImageSet(a.x.reshape(10, 12, 3, 3), a.y, a.class_names)
    assert same_bytes.sha256() != a.sha256()


def test_subset_takes_rows_in_order():
    images = indexed_pool(20)
    part = images.subset(np.array([5, 2, 17]))
    assert ids(part).tolist() == [5, 2, 17]
    assert part.y.tolist() == [1, 2, 1] and len(part) == 3


# ---------------------------------------------------------------- loaders


def test_digits_is_one_pool_of_1797_images_at_28x28():
    train, pool = load_dataset("digits")
    assert train is None
    assert pool.x.shape == (1797, 28, 28, 1) and pool.x.dtype == np.uint8
    assert sorted(set(pool.y.tolist())) == list(range(10))
    assert pool.class_names == tuple(str(i) for i in range(10))
    assert default_image_size("digits") == 28 and default_image_size("cifar10") is None


def test_digits_native_size_matches_scikit_learn_scaled_to_255():
    from sklearn.datasets import load_digits

    _, pool = load_dataset("digits", image_size=8)
    bunch = load_digits()
    np.testing.assert_array_equal(pool.x[..., 0], np.rint(bunch.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(pool.y, bunch.target)
    assert pool.x.max() == 255


def test_npz_single_pool_round_trips(tmp_path):
    images = random_set(2, 30, size=5, channels=1, classes=3)
    path = tmp_path / "pool.npz"
    np.savez_compressed(path, x=images.x, y=images.y, class_names=np.array(["ant", "bee", "cat"]))
    train, pool = load_dataset(f"npz:{path}")
    assert train is None
    np.testing.assert_array_equal(pool.x, images.x)
    np.testing.assert_array_equal(pool.y, images.y)
    assert pool.class_names == ("ant", "bee", "cat")


def test_npz_train_test_pair_shares_class_names(tmp_path):
    train_set, test_set = random_set(3, 20, classes=5), random_set(4, 7, classes=3)
    np.savez(tmp_path / "tr.npz", x=train_set.x, y=train_set.y.astype(np.int32))
    np.savez(tmp_path / "te.npz", x=test_set.x, y=test_set.y)
    train, test = load_dataset(f"npz:{tmp_path / 'tr.npz'},{tmp_path / 'te.npz'}", image_size=9)
    assert train.x.shape == (20, 9, 9, 3) and test.x.shape == (7, 9, 9, 3)
    assert train.y.dtype == np.int64 and train.y.tolist() == train_set.y.tolist()
    assert train.class_names == test.class_names == ("0", "1", "2", "3", "4")


def test_npz_errors_name_the_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 1), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"key 'x' is float32 .*expected uint8 \(N, H, W, C\)"):
        load_dataset(f"npz:{tmp_path / 'float.npz'}")
    np.savez(tmp_path / "noy.npz", x=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match="key 'y' is missing"):
        load_dataset(f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "fy.npz", x=np.zeros((2, 4, 4, 1), np.uint8), y=np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="key 'y' is float64"):
        load_dataset(f"npz:{tmp_path / 'fy.npz'}")


def write_png(path: Path, array: np.ndarray, mode: str) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_imagefolder_grayscale_reads_pixels_and_classes(tmp_path):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(5, 7, 6), dtype=np.uint8)
    for i, name in enumerate(["cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png", "dog/c.png"]):
        write_png(tmp_path / name, pixels[i], "L")
    train, pool = load_dataset(f"imagefolder:{tmp_path}")
    assert train is None and pool.class_names == ("cat", "dog")
    assert pool.x.shape == (5, 7, 6, 1)
    np.testing.assert_array_equal(pool.x[..., 0], pixels)
    assert pool.y.tolist() == [0, 0, 1, 1, 1]


def test_imagefolder_mixed_modes_become_rgb_and_sizes_must_match(tmp_path):
    write_png(tmp_path / "a" / "1.png", np.full((8, 8), 200, np.uint8), "L")
    write_png(tmp_path / "b" / "1.png", np.zeros((8, 10, 3), np.uint8), "RGB")
    with pytest.raises(ValueError, match=r"differ in size .*8x8.*10x8.*image_size"):
        load_dataset(f"imagefolder:{tmp_path}")
    _, pool = load_dataset(f"imagefolder:{tmp_path}", image_size=4)
    assert pool.x.shape == (2, 4, 4, 3)
    assert (pool.x[0] == 200).all() and (pool.x[1] == 0).all()


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_dataset(f"imagefolder:{tmp_path / 'nothere'}")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*digits.*cifar10.*npz:PATH"):
        load_dataset("imagenet")
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"} <= set(DATASETS)


@pytest.mark.skipif(not (SHARED / "mnist_test.npz").is_file(), reason=f"shared datasets not found at {SHARED}")
def test_real_mnist_test_npz():
    train, pool = load_dataset(f"npz:{SHARED / 'mnist_test.npz'}")
    assert train is None
    assert pool.x.shape == (10000, 28, 28, 1) and pool.x.dtype == np.uint8
    assert np.bincount(pool.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    splits = make_splits(None, pool, seed=0, labelled=40)
    assert [len(splits.test), len(splits.aux), len(splits.evaluator), len(splits.victim_train)] == [2000] * 3 + [4000]


def test_torchvision_mnist_reads_raw_idx_files(tmp_path):
    pytest.importorskip("torchvision")
    arrays = fake_mnist(tmp_path, n_train=12, n_test=5)
    train, test = load_dataset("mnist", root=tmp_path)
    assert train.x.shape == (12, 28, 28, 1) and test.x.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(train.x[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(test.y, arrays["t10k"][1].astype(np.int64))
    assert len(train.class_names) == 10
    resized, _ = load_dataset("mnist", root=tmp_path, image_size=32)
    assert resized.x.shape == (12, 32, 32, 1)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_torchvision_dataset_says_where_and_how(tmp_path, name, folder):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert repr(name) in message and str((tmp_path / folder).resolve()) in message
    assert "--data-root" in message and "--set data.download=true" in message
    assert not any(tmp_path.iterdir()), "download=False must not create files"


# ---------------------------------------------------------------- splits


def test_two_pool_splits_are_disjoint_with_default_sizes():
    train, test = indexed_pool(100), indexed_pool(30, offset=1000)
    splits = make_splits(train, test, seed=0, labelled=8)
    assert isinstance(splits, Splits)
    assert len(splits.victim_train) == 80 and len(splits.aux) == 20
    assert len(splits.test) == 15 and len(splits.evaluator) == 15  # the test pool, halved
    victim, aux = set(ids(splits.victim_train)), set(ids(splits.aux))
    assert not victim & aux and victim | aux == set(range(100))
    test, evaluator = set(ids(splits.test)), set(ids(splits.evaluator))
    assert not test & evaluator and test | evaluator == set(range(1000, 1030))
    assert set(ids(splits.labelled)) <= aux


def test_two_pool_explicit_sizes_and_test_subsample():
    splits = make_splits(indexed_pool(100), indexed_pool(30, offset=1000), seed=1,
                         victim_train=50, aux=10, test_size=12, labelled=4)
    assert [len(splits.victim_train), len(splits.aux), len(splits.test)] == [50, 10, 12]
    assert len(set(ids(splits.test))) == 12 and set(ids(splits.test)) <= set(range(1000, 1030))
    assert not set(ids(splits.victim_train)) & set(ids(splits.aux))
    # the evaluator gets the rest of the test pool, or what it asks for
    assert set(ids(splits.evaluator)) == set(range(1000, 1030)) - set(ids(splits.test))
    few = make_splits(indexed_pool(100), indexed_pool(30, offset=1000), seed=1, test_size=12, evaluator=5,
                      victim_train=50, aux=10, labelled=4)
    assert len(few.evaluator) == 5 and not set(ids(few.evaluator)) & set(ids(few.test))
    assert ids(few.test).tolist() == ids(splits.test).tolist()  # the targets do not move


def test_one_pool_splits_carve_four_disjoint_sets():
    splits = make_splits(None, indexed_pool(200), seed=3, labelled=12)
    parts = [set(ids(s)) for s in (splits.test, splits.aux, splits.victim_train, splits.evaluator)]
    assert [len(p) for p in parts] == [40, 40, 80, 40]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    # with victim_train given, the evaluator takes what is left, and the other splits do not move
    given = make_splits(None, indexed_pool(200), seed=3, labelled=12, victim_train=100)
    assert len(given.evaluator) == 20 and ids(given.test).tolist() == ids(splits.test).tolist()
    assert set(ids(splits.labelled)) <= parts[1]


def test_splits_are_deterministic_by_seed():
    pool = indexed_pool(400)
    a = make_splits(None, pool, seed=7).describe()
    b = make_splits(None, pool, seed=7).describe()
    c = make_splits(None, pool, seed=8).describe()
    assert a == b
    assert set(a) == {"victim_train", "test", "aux", "labelled", "evaluator"} and a["aux"]["size"] == 80
    assert a["labelled"]["size"] == 40
    assert all(a[k]["sha256"] != c[k]["sha256"] for k in a)


def test_labelled_is_balanced_with_remainder_to_first_classes():
    splits = make_splits(None, indexed_pool(400, classes=4), seed=0, labelled=14)
    assert np.bincount(splits.labelled.y, minlength=4).tolist() == [4, 4, 3, 3]
    assert len(set(ids(splits.labelled))) == 14


def test_labelled_needs_enough_of_every_class():
    y = np.zeros(100, np.int64)
    y[:3] = 1  # class "1" is rare
    pool = ImageSet(indexed_pool(100).x, y, ("0", "1"))
    with pytest.raises(ValueError, match=r"too few .*'1' has \d, needs 10"):
        make_splits(pool, pool, seed=0, aux=50, labelled=20)


def test_sizes_that_do_not_fit_name_the_numbers():
    with pytest.raises(ValueError, match=r"victim_train 90 \+ aux 20 = 110 exceeds the train pool of 100"):
        make_splits(indexed_pool(100), indexed_pool(10), seed=0, victim_train=90, aux=20)
    with pytest.raises(ValueError, match=r"test_size 20 \+ aux 20 \+ victim_train 70 \+ evaluator 0 = 110 exceeds "
                                         r"the pool of 100"):
        make_splits(None, indexed_pool(100), seed=0, victim_train=70)
    with pytest.raises(ValueError, match=r"test_size 11 \+ evaluator 0 = 11 exceeds the test pool of 10 images"):
        make_splits(indexed_pool(100), indexed_pool(10), seed=0, test_size=11)


# ---------------------------------------------------------------- stats and tensors


def test_channel_stats_match_float64_numpy():
    images = random_set(9, 5000, size=5, channels=3)  
    mean, std = channel_stats(images)
    x = images.x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    assert len(mean) == 3 and all(isinstance(v, float) for v in mean + std)


def test_to_tensors_normalizes_per_channel():
    torch = pytest.importorskip("torch")
    images = random_set(10, 6, size=4, channels=3)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    x, y = to_tensors(images, mean, std)
    assert x.shape == (6, 3, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (images.x.transpose(0, 3, 1, 2) / 255.0 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    assert y.tolist() == images.y.tolist()
    with pytest.raises(ValueError, match="need 3 values"):
        to_tensors(images, [0.5], [0.5])


def test_importing_data_does_not_import_heavy_libraries():
    code = (
        "import sys, edgeveil.training.data\n"
        "heavy = [m for m in ('torch', 'torchvision', 'sklearn', 'PIL', 'tensorflow') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
