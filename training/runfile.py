"""The training stage's side of the run directory: ``train/model.json``, ``head.pt``, ``tail.pt``.

``model.json`` describes the trained split model completely enough to rebuild it, to rebuild the
exact data splits (their sizes and sha256 are checked), and to feed the head the way it was
trained (input shape and per-channel normalization).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from edgeveil.device.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file

__all__ = ["MODEL_SCHEMA", "LoadedRun", "save_trained", "read_model_info", "load_run", "load_splits"]

MODEL_SCHEMA = "edgeveil.model/1"
_REQUIRED = ("arch", "split", "width", "num_classes", "input", "feature_shape", "defense", "data", "seed")


class LoadedRun(NamedTuple):
    info: dict
    head: "object"  # nn.Module in eval mode
    tail: "object"


def atomic_torch_save(path: Path, obj) -> None:
    """torch.save into memory, then device.files' atomic write (a kill never leaves a torn checkpoint)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_trained(train_dir: Path, info: dict, head, tail) -> None:
    """Write head.pt and tail.pt, then model.json last (its presence marks a finished stage)."""
    train_dir = Path(train_dir)
    atomic_torch_save(train_dir / "head.pt", head.state_dict())
    atomic_torch_save(train_dir / "tail.pt", tail.state_dict())
    info = {"schema": MODEL_SCHEMA, **info,
            "files": {n: sha256_file(train_dir / n) for n in ("head.pt", "tail.pt")}}
    atomic_write_json(train_dir / "model.json", info)


def read_model_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "train" / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a trained run directory? "
                                f"(run `edgeveil train --out {run_dir}` first)")
    info = read_json(path)
    if not isinstance(info, dict) or info.get("schema") != MODEL_SCHEMA:
        got = info.get("schema") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: field schema is {got!r}, expected {MODEL_SCHEMA!r}")
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise ValueError(f"{path} is missing field(s) {', '.join(missing)}")
    for key in ("shape", "mean", "std"):
        if key not in info["input"]:
            raise ValueError(f"{path} is missing field input.{key}")
    return info


def build_models(info: dict):
    from . import archs

    c, h, w = info["input"]["shape"]
    return archs.create(info["arch"], in_channels=c, image_size=h, num_classes=info["num_classes"],
                        split=info["split"], width=info["width"], **info.get("arch_options", {}))


def load_run(run_dir: Path, device: str = "cpu") -> LoadedRun:
    """Rebuild the trained head and tail from a run directory (weights_only loading)."""
    import torch

    info = read_model_info(run_dir)
    train_dir = Path(run_dir) / "train"
    model = build_models(info)
    for name, module in (("head.pt", model.head), ("tail.pt", model.tail)):
        path = train_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; the run directory is incomplete")
        expected = info.get("files", {}).get(name)
        if expected and sha256_file(path) != expected:
            raise ValueError(f"{path} does not match the sha256 recorded in model.json (field files.{name}); "
                             "the file was changed or corrupted")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            module.load_state_dict(state)
        except Exception as e:
            raise ValueError(f"{path} cannot be loaded as a {info['arch']} state dict: {e}") from None
        module.to(device).eval()
    return LoadedRun(info, model.head, model.tail)


def load_splits(info: dict):
    """Rebuild the data splits recorded in model.json and check their sizes and hashes."""
    from .data import load_dataset, make_splits

    d = info["data"]
    train, test = load_dataset(d["name"], d.get("root"), download=d.get("download", False),
                               image_size=d.get("image_size"))
    splits = make_splits(train, test, seed=info["seed"], **d["sizes"])
    got = splits.describe()
    for part, rec in d.get("splits", {}).items():
        if got.get(part) != rec:
            raise ValueError(f"data split {part} of {d['name']} no longer matches model.json "
                             f"(recorded {rec}, rebuilt {got.get(part)}): the dataset changed")
    return splits
