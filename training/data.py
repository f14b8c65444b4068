"""Datasets and the four data splits of an experiment.

`load_dataset(name)` gives `(train_pool, test_pool)` as uint8 `ImageSet`s;
`make_splits` carves, by seed, the victim's training set, the test set, the
attacker's auxiliary set (disjoint from the victim's), the attacker's few
labelled samples (balanced over classes, drawn from the auxiliary set) and the
auditor's evaluator set (disjoint from all of them: the data the identification
classifier is trained on).
`channel_stats` and `to_tensors` turn an `ImageSet` into normalized tensors.

Importing this module costs numpy only: torch, torchvision, scikit-learn and
PIL are imported by the functions that need them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASETS",
    "ImageSet",
    "Splits",
    "channel_stats",
    "default_image_size",
    "load_dataset",
    "make_splits",
    "to_tensors",
]

DATASETS: dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 digits, resized to 28x28 (1,797 images, 10 classes); nothing to download",
    "mnist": "MNIST handwritten digits, 28x28 gray, train 60,000 / test 10,000 (torchvision, --data-root)",
    "fashion-mnist": "Fashion-MNIST clothing, 28x28 gray, train 60,000 / test 10,000 (torchvision, --data-root)",
    "cifar10": "CIFAR-10, 32x32 RGB, 10 classes, train 50,000 / test 10,000 (torchvision, --data-root)",
    "cifar100": "CIFAR-100, 32x32 RGB, 100 classes, train 50,000 / test 10,000 (torchvision, --data-root)",
    "svhn": "SVHN house numbers, 32x32 RGB, labels 0..9, train 73,257 / test 26,032 (torchvision, --data-root)",
    "npz:PATH": "arrays x uint8 (N,H,W,C) and y int, optional class_names, as one pool; npz:TRAIN,TEST for two",
    "imagefolder:PATH": "class subfolders of images (sorted names are the classes), as one pool",
}

_DEFAULT_IMAGE_SIZE = {"digits": 28}
_TORCHVISION_NAMES = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")


# ---------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and labels.

    x: uint8 (N, H, W, C), C = 1 or 3; y: int64 (N,), indices into class_names.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        problems = _imageset_problems(self.x, self.y, self.class_names)
        if problems:
            raise ValueError("invalid ImageSet: " + "; ".join(problems))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"ImageSet(n={len(self)}, shape={self.x.shape[1:]}, classes={len(self.class_names)})"

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The samples at `idx` (integer indices, in that order), as copies."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.x[idx], self.y[idx], self.class_names)

    def sha256(self) -> str:
        """Hex digest over the shape, the x bytes and the y bytes (stable across runs and machines)."""
        h = hashlib.sha256()
        h.update(repr(tuple(int(s) for s in self.x.shape)).encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y, dtype="<i8").tobytes())
        return h.hexdigest()


def _imageset_problems(x, y, class_names) -> list[str]:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        return [f"x and y must be numpy arrays, got {type(x).__name__} and {type(y).__name__}"]
    problems = []
    if x.dtype != np.uint8:
        problems.append(f"x must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        problems.append(f"x must have shape (N, H, W, C) with C 1 or 3, got {x.shape}")
    if y.dtype != np.int64 or y.ndim != 1:
        problems.append(f"y must be int64 with shape (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        problems.append(f"x has {len(x)} images but y has {len(y)} labels")
    if not class_names:
        problems.append("class_names is empty")
    if y.size and y.dtype.kind in "iu" and (y.min() < 0 or y.max() >= len(class_names)):
        problems.append(f"labels must be in 0..{len(class_names) - 1}, got {y.min()}..{y.max()}")
    return problems


@dataclass(frozen=True, eq=False)
class Splits:
    """The four data splits of an experiment."""

    victim_train: ImageSet
    test: ImageSet
    aux: ImageSet  # attacker's auxiliary data, disjoint from victim_train
    labelled: ImageSet  # attacker's few labelled samples, balanced over classes, a subset of aux
    evaluator: ImageSet | None = None  # the auditor's labelled data, disjoint from all of the above

    def describe(self) -> dict:
        """{split: {"size": n, "sha256": hex}} for model.json."""
        names = ("victim_train", "test", "aux", "labelled") + (("evaluator",) if self.evaluator is not None else ())
        return {n: {"size": len(getattr(self, n)), "sha256": getattr(self, n).sha256()} for n in names}


# ---------------------------------------------------------------- loading


def default_image_size(name: str) -> int | None:
    """28 for `digits` (SSIM's 11x11 window does not fit 8x8), None (native size) for the others."""
    return _DEFAULT_IMAGE_SIZE.get(name)


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
) -> tuple[ImageSet | None, ImageSet]:
    """(train_pool, test_pool).

    train_pool is None when the source is one pool only (then make_splits carves
    all splits from it). `root` is the local folder for torchvision datasets
    (default $EDGEVEIL_DATA_ROOT or ~/.cache/edgeveil/datasets); torchvision
    downloads only when `download` is True. `image_size` resizes every image to
    image_size x image_size (PIL bilinear, uint8 kept).
    """
    from edgeveil.training import _datasets

    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        image_size = int(image_size)
    if name == "digits":
        return _datasets.load_digits(image_size or _DEFAULT_IMAGE_SIZE["digits"])
    if name in _TORCHVISION_NAMES:
        return _datasets.load_torchvision(name, root, download, image_size)
    if name.startswith("npz:") and len(name) > 4:
        return _datasets.load_npz(name[4:], image_size)
    if name.startswith("imagefolder:") and len(name) > 12:
        return _datasets.load_imagefolder(name[12:], image_size)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


# ---------------------------------------------------------------- splits


def _fraction(n: int, frac: float) -> int:
    return int(round(n * frac))


def _check_sizes(pool: int, what: str, **sizes: int) -> None:
    bad = [f"{k}={v}" for k, v in sizes.items() if v < 0]
    if bad:
        raise ValueError(f"split sizes must be >= 0, got {', '.join(bad)}")
    if sum(sizes.values()) > pool:
        parts = " + ".join(f"{k} {v}" for k, v in sizes.items())
        total = f" = {sum(sizes.values())}" if len(sizes) > 1 else ""
        raise ValueError(f"{parts}{total} exceeds the {what} of {pool} images")


def _split_two_pools(train, test, rng, victim_train, aux, test_size, evaluator):
    """The test and evaluator sets come from the test pool (default: half each), the rest from the train pool."""
    n = len(train)
    if victim_train is None:
        victim_train = _fraction(n, 0.8) if aux is None else min(_fraction(n, 0.8), max(n - aux, 0))
    if aux is None:
        aux = max(n - victim_train, 0)
    _check_sizes(n, "train pool", victim_train=victim_train, aux=aux)
    m = len(test)
    if test_size is None:
        test_size = m - evaluator if evaluator is not None else m - m // 2
    if evaluator is None:
        evaluator = max(m - test_size, 0)
    _check_sizes(m, "test pool", test_size=test_size, evaluator=evaluator)
    test_order = rng.permutation(m)
    order = rng.permutation(n)
    return (train.subset(order[:victim_train]), test.subset(test_order[:test_size]),
            train.subset(order[victim_train : victim_train + aux]),
            test.subset(test_order[test_size : test_size + evaluator]))


def _split_one_pool(pool, rng, victim_train, aux, test_size, evaluator):
    """test, aux and evaluator default to 20% each, victim_train to the rest; given sizes are kept."""
    n = len(pool)
    test_size = _fraction(n, 0.2) if test_size is None else test_size
    aux = _fraction(n, 0.2) if aux is None else aux
    if evaluator is None:
        evaluator = _fraction(n, 0.2) if victim_train is None else max(n - test_size - aux - victim_train, 0)
    victim_train = max(n - test_size - aux - evaluator, 0) if victim_train is None else victim_train
    _check_sizes(n, "pool", test_size=test_size, aux=aux, victim_train=victim_train, evaluator=evaluator)
    order = rng.permutation(n)
    cuts = np.cumsum([test_size, aux, victim_train, evaluator])
    test, aux_idx, victim = order[: cuts[0]], order[cuts[0] : cuts[1]], order[cuts[1] : cuts[2]]
    return pool.subset(victim), pool.subset(test), pool.subset(aux_idx), pool.subset(order[cuts[2] : cuts[3]])


def _balanced_indices(y: np.ndarray, n_classes: int, count: int, rng, class_names) -> np.ndarray:
    """`count` indices into y, count // n_classes per class, the remainder to the first classes."""
    per_class = [count // n_classes + (1 if c < count % n_classes else 0) for c in range(n_classes)]
    chosen, short = [], []
    for c, k in enumerate(per_class):
        members = np.flatnonzero(y == c)
        if len(members) < k:
            short.append(f"{class_names[c]!r} has {len(members)}, needs {k}")
        chosen.append(rng.permutation(members)[:k])
    if short:
        raise ValueError(f"the aux set has too few samples for {count} balanced labelled samples: {'; '.join(short)}")
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def make_splits(
    train: ImageSet | None,
    test: ImageSet,
    *,
    seed: int,
    victim_train: int | None = None,
    aux: int | None = None,
    test_size: int | None = None,
    labelled: int = 40,
    evaluator: int | None = None,
) -> Splits:
    """Carve the five splits, deterministically by seed.

    With a train pool: test and evaluator are disjoint random subsets of the test
    pool (default: half each; a given size leaves the rest to the other);
    victim_train (default 80%) and aux (default the rest) are disjoint random
    subsets of the train pool. With one pool (train None): shuffle it and carve
    test, aux and evaluator (default 20% each; with victim_train given, evaluator
    defaults to what is left) and victim_train (default the rest).
    labelled: that many samples of aux, balanced over classes. evaluator: the
    auditor's labelled data for the identification classifier, disjoint from
    every other split.
    """
    if labelled < 0:
        raise ValueError(f"labelled must be >= 0, got {labelled}")
    rng = np.random.default_rng(seed)
    if train is None:
        victim, test_set, aux_set, eval_set = _split_one_pool(test, rng, victim_train, aux, test_size, evaluator)
    else:
        if train.class_names != test.class_names:
            raise ValueError(f"train and test pools have different class_names: {train.class_names} vs {test.class_names}")
        victim, test_set, aux_set, eval_set = _split_two_pools(train, test, rng, victim_train, aux, test_size,
                                                               evaluator)
    idx = _balanced_indices(aux_set.y, len(aux_set.class_names), labelled, rng, aux_set.class_names)
    return Splits(victim_train=victim, test=test_set, aux=aux_set, labelled=aux_set.subset(idx),
                  evaluator=eval_set)


# ---------------------------------------------------------------- tensors


def channel_stats(images: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of x/255, from exact per-channel value histograms."""
    if len(images) == 0:
        raise ValueError("channel_stats needs at least one image, got an empty ImageSet")
    values = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(images.x.shape[-1]):
        counts = np.bincount(images.x[..., c].ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ values)
        var = float(p @ (values - mean) ** 2)
        means.append(mean / 255.0)
        stds.append(float(np.sqrt(var)) / 255.0)
    return means, stds


def to_tensors(images: ImageSet, mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float32 (N, C, H, W) = (x/255 - mean)/std; y: int64 (N,)."""
    import torch

    channels = images.x.shape[-1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if len(mean_t) != channels or len(std_t) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean_t)} and {len(std_t)}")
    if not bool((std_t > 0).all()):
        raise ValueError(f"std must be > 0 for every channel, got {std_t.tolist()}")
    x = torch.from_numpy(np.ascontiguousarray(images.x)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    x = ((x - mean_t.to(x.device).view(1, -1, 1, 1)) / std_t.to(x.device).view(1, -1, 1, 1)).contiguous()
    return x, torch.from_numpy(images.y.copy()).to(device)
