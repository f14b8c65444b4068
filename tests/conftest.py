"""Shared test helpers: where the real datasets live, and a quick digits run."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _torch_optimizers_before_tensorflow() -> None:
    """With torch 2.14 and TensorFlow 2.21 in one process, the first torch optimizer (it imports
    triton) segfaults once TensorFlow is loaded; the other order is fine. Tests keep TensorFlow
    in subprocesses; this makes a stray in-process import harmless too."""
    try:
        import torch
    except ImportError:
        return
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


_torch_optimizers_before_tensorflow()


@pytest.fixture(autouse=True, scope="session")
def _evaluator_cache(tmp_path_factory):
    """The auditor's evaluators of this test session live in a temporary cache, not the user's:
    each distinct evaluator split is trained once per session."""
    old = os.environ.get("EDGEVEIL_CACHE")
    os.environ["EDGEVEIL_CACHE"] = str(tmp_path_factory.mktemp("edgeveil_cache"))
    yield
    if old is None:
        os.environ.pop("EDGEVEIL_CACHE", None)
    else:
        os.environ["EDGEVEIL_CACHE"] = old


def shared_datasets() -> Path:
    """../shared/datasets beside the checkout (EDGEVEIL_SHARED_DATA overrides)."""
    env = os.environ.get("EDGEVEIL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "datasets"


@pytest.fixture
def shared_data() -> Path:
    path = shared_datasets()
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path} (set EDGEVEIL_SHARED_DATA)")
    return path


def digits_28():
    """scikit-learn's digits resized to 28x28: images (N, 1, 28, 28) float32 in [0, 1], labels (N,) int64."""
    from PIL import Image
    from sklearn import datasets

    data = datasets.load_digits()
    x = np.stack([np.asarray(Image.fromarray(i).resize((28, 28), Image.BILINEAR))
                  for i in data.images.astype(np.float32) / 16])
    return np.clip(x, 0, 1)[:, None].astype(np.float32), data.target.astype(np.int64)


# A digits run that trains in seconds: tiny width, two epochs.
QUICK = ["model.width=tiny", "train.epochs=4", "train.batch_size=32", "train.device=cpu"]


def tiny_exported_run(tmp_path_factory, name: str, precisions: str) -> Path:
    """A tiny digits run, trained two epochs on CPU by the real CLI and exported (~30-60 s)."""
    from edgeveil.pipeline.cli import main

    d = tmp_path_factory.mktemp(name) / "run"
    train = ["--no-progress", "train", "--out", str(d), "--set", "model.width=tiny",
             "--set", "train.epochs=2", "--set", "train.device=cpu"]
    assert main(train) == 0
    assert main(["--no-progress", "export", str(d), "--set", f"export.precisions={precisions}"]) == 0
    return d


def one_torch_thread():
    """Generator for a fixture: torch on one thread for the fixture's scope, then as it was."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordedQuery:
    """The real query path of a float victim (uint8 pixels, the PyTorch head, no normalization)
    that also keeps every batch of images it was sent."""

    def __init__(self, head):
        from edgeveil.pipeline.attack_stage import _FloatQuery

        self.query, self.sent = _FloatQuery(head, [0.0], [1.0], None, seed=0), []

    def __call__(self, images):
        self.sent.append(images.copy())
        return self.query(images)


def rewrite_channel0(run: Path, affine) -> None:
    """Channel 0 of a trained head's output rewritten through its last BatchNorm, whose (weight, bias)
    for that channel become affine(weight, bias); the tail is made to ignore it (its first
    convolution's weights on channel 0 zeroed); model.json's sha256s follow."""
    import json

    import torch

    from edgeveil.device.files import sha256_file

    info = json.loads((run / "train" / "model.json").read_text())
    for name in ("head.pt", "tail.pt"):
        path = run / "train" / name
        state = torch.load(path, weights_only=True)
        if name == "head.pt":
            bias = sorted(k for k in state if k.endswith("bn.bias"))[-1]
            weight = bias.replace("bias", "weight")
            state[weight][0], state[bias][0] = affine(float(state[weight][0]), float(state[bias][0]))
        else:
            first_conv = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
            state[first_conv][:, 0] = 0.0
        torch.save(state, path)
        info["files"][name] = sha256_file(path)
    (run / "train" / "model.json").write_text(json.dumps(info))
