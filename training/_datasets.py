"""Dataset readers behind `edgeveil.training.data.load_dataset`.

Each reader returns `(train_pool, test_pool)` as `ImageSet`s, with `train_pool`
None for sources that are a single pool. torch, torchvision, scikit-learn and
PIL are imported inside the functions that use them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeveil.training.data import ImageSet

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# name -> (torchvision class name, folder under root that holds the files)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "svhn": ("SVHN", "."),
}


def default_data_root() -> Path:
    """Where torchvision datasets live when no root is given: $EDGEVEIL_DATA_ROOT or ~/.cache/edgeveil/datasets."""
    env = os.environ.get("EDGEVEIL_DATA_ROOT")
    return Path(env) if env else Path.home() / ".cache" / "edgeveil" / "datasets"


def _import(module: str, extra: str = "train"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed to load this dataset: pip install 'edgeveil[{extra}]'"
        ) from e


# ---------------------------------------------------------------- resizing


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images (N, H, W, C) to (N, size, size, C) with PIL bilinear."""
    if size < 1:
        raise ValueError(f"image_size must be a positive integer, got {size}")
    if x.shape[1:3] == (size, size):
        return x
    image_mod = _import("PIL.Image")
    out = np.empty((len(x), size, size, x.shape[3]), dtype=np.uint8)
    for i, img in enumerate(x):
        pil = image_mod.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), image_mod.BILINEAR)).reshape(size, size, -1)
    return out


def _finish(x, y, class_names, image_size: int | None) -> ImageSet:
    if image_size is not None:
        x = resize(x, image_size)
    return ImageSet(x, np.asarray(y, dtype=np.int64), tuple(class_names))


# ---------------------------------------------------------------- digits


def load_digits(image_size: int) -> tuple[None, ImageSet]:
    """scikit-learn's bundled 8x8 digits, 0..16 scaled to 0..255, as one pool."""
    datasets = _import("sklearn.datasets")
    bunch = datasets.load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    names = tuple(str(int(t)) for t in bunch.target_names)
    return None, _finish(x, bunch.target, names, image_size)


# ---------------------------------------------------------------- torchvision


def _missing_message(name: str, folder: Path) -> str:
    return (
        f"dataset {name!r} not found in {folder}. Point --data-root DIR at a folder that "
        f"already holds it, or pass --set data.download=true to let torchvision download it."
    )


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    cls_name, _ = _TORCHVISION[name]
    datasets = _import("torchvision.datasets")
    cls = getattr(datasets, cls_name)
    if name == "svhn":
        return cls(str(root), split="train" if train else "test", download=download)
    return cls(str(root), train=train, download=download)


def _torchvision_arrays(name: str, ds) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    if name == "svhn":  # (N, C, H, W), labels already mapped 10 -> 0 by torchvision
        return data.transpose(0, 2, 3, 1), np.asarray(ds.labels), tuple(str(i) for i in range(10))
    if data.ndim == 3:  # MNIST family: (N, H, W)
        data = data[..., None]
    targets = ds.targets.numpy() if hasattr(ds.targets, "numpy") else np.asarray(ds.targets)
    return data, targets, tuple(ds.classes)


def load_torchvision(
    name: str, root: str | Path | None, download: bool, image_size: int | None
) -> tuple[ImageSet, ImageSet]:
    """A torchvision dataset's train and test sets from a local root."""
    root = Path(root).expanduser() if root is not None else default_data_root()
    folder = (root / _TORCHVISION[name][1]).resolve()
    pools = []
    for train in (True, False):
        try:
            ds = _torchvision_split(name, root, train, download)
        except RuntimeError as e:
            if "not found" not in str(e).lower():
                raise
            raise FileNotFoundError(_missing_message(name, folder)) from e
        x, y, names = _torchvision_arrays(name, ds)
        pools.append(_finish(np.ascontiguousarray(x, dtype=np.uint8), y, names, image_size))
    return pools[0], pools[1]


# ---------------------------------------------------------------- npz


def _npz_key(arrays, key: str, path: Path) -> np.ndarray:
    if key not in arrays.files:
        raise ValueError(f"{path}: key {key!r} is missing (keys present: {sorted(arrays.files)})")
    try:
        return arrays[key]
    except ValueError as e:  # object arrays refuse to load without pickle
        raise ValueError(f"{path}: key {key!r} is an object array; expected a plain numeric or string array") from e


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path, allow_pickle=False) as arrays:
        x = _npz_key(arrays, "x", path)
        y = _npz_key(arrays, "y", path)
        names = _npz_key(arrays, "class_names", path) if "class_names" in arrays.files else None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
        raise ValueError(
            f"{path}: key 'x' is {x.dtype} with shape {x.shape}; expected uint8 (N, H, W, C) with C 1 or 3"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: key 'y' is {y.dtype} with shape {y.shape}; expected integers (N,)")
    if names is not None and (names.ndim != 1 or names.dtype.kind not in "US"):
        raise ValueError(f"{path}: key 'class_names' is {names.dtype} with shape {names.shape}; expected strings (K,)")
    return x, y.astype(np.int64), None if names is None else tuple(str(n) for n in names)


def _common_names(parts, paths) -> tuple[str, ...]:
    given = [(names, p) for (_, _, names), p in zip(parts, paths) if names is not None]
    if len(given) == 2 and given[0][0] != given[1][0]:
        raise ValueError(f"class_names differ between {given[0][1]} and {given[1][1]}")
    if given:
        return given[0][0]
    top = max((int(y.max()) for _, y, _ in parts if len(y)), default=-1)
    return tuple(str(i) for i in range(top + 1))


def load_npz(spec: str, image_size: int | None) -> tuple[ImageSet | None, ImageSet]:
    """`PATH` (one pool) or `TRAIN_PATH,TEST_PATH` (train and test pools)."""
    paths = [Path(p.strip()).expanduser() for p in spec.split(",")]
    if len(paths) > 2 or not all(str(p) for p in paths):
        raise ValueError(f"npz: expects PATH or TRAIN_PATH,TEST_PATH, got {spec!r}")
    parts = [_read_npz(p) for p in paths]
    names = _common_names(parts, paths)
    sets = [_finish(x, y, names, image_size) for x, y, _ in parts]
    return (None, sets[0]) if len(sets) == 1 else (sets[0], sets[1])


# ---------------------------------------------------------------- imagefolder


def _image_files(root: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"imagefolder {root} has no class subfolders")
    files = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"imagefolder class folder {folder} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    return files, tuple(d.name for d in classes)


def _open_images(files) -> list:
    image_mod = _import("PIL.Image")
    images = []
    for path, _ in files:
        with image_mod.open(path) as img:
            img.load()
            images.append(img.copy())
    return images


def _check_sizes(root: Path, files, images) -> None:
    (w, h), first = images[0].size, files[0][0]
    for (path, _), img in zip(files, images):
        if img.size != (w, h):
            raise ValueError(
                f"imagefolder {root}: images differ in size ({first.relative_to(root)} is {w}x{h}, "
                f"{path.relative_to(root)} is {img.size[0]}x{img.size[1]}); pass image_size to resize them"
            )


def _pil_to_array(img, mode: str, image_size: int | None) -> np.ndarray:
    img = img.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        image_mod = _import("PIL.Image")
        img = img.resize((image_size, image_size), image_mod.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def load_imagefolder(path: str, image_size: int | None) -> tuple[None, ImageSet]:
    """Class subfolders of images (sorted folder names are the classes) as one pool.

    Grayscale (C=1) when every image is mode L, otherwise RGB (C=3).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder not found: {root}")
    files, names = _image_files(root)
    images = _open_images(files)
    if image_size is None:
        _check_sizes(root, files, images)
    mode = "L" if all(img.mode == "L" for img in images) else "RGB"
    x = np.stack([_pil_to_array(img, mode, image_size) for img in images])
    y = np.array([label for _, label in files], dtype=np.int64)
    return None, ImageSet(x, y, names)
