"""PyTorch head -> ONNX (opset 17, dynamic batch axis), checked and written atomically.

The batch axis is dynamic on purpose: onnx2tf downloads a sample image set when the ONNX input
is 4-D, 3-channel with a static batch <= 20 (research/edge_toolchain.md, section 0). The TFLite
files it makes are still static [1, ...] with shape_signature [-1, ...].
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from edgeveil.device.files import atomic_path

from .errors import ExportError

if TYPE_CHECKING:
    import onnx
    from torch import nn

__all__ = ["OPSET", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "load_onnx_checked", "onnx_input"]

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "features"


def export_onnx(head: "nn.Module", input_shape: tuple[int, int, int], path: Path) -> None:
    """Export `head` for inputs (N, C, H, W) = (N, *input_shape) to `path`, then check it.

    The head is exported in eval mode (its mode is restored afterwards). Raises ExportError
    naming the operator when torch cannot export it; `path` is only replaced by a checked model.
    """
    shape = _check_shape(input_shape)
    path = Path(path)
    with atomic_path(path) as tmp:  # umask permissions
        _torch_export(head, shape, tmp, path.name)
        _check_model(tmp, label=str(path))


def load_onnx_checked(path) -> "onnx.ModelProto":
    """Load an ONNX file and run the ONNX checker; ExportError names the file and the problem."""
    return _check_model(Path(path), label=str(path))


def onnx_input(model: "onnx.ModelProto", label: str = "the ONNX model") -> tuple[str, tuple[int, int, int]]:
    """(name, (C, H, W)) of the model's single image input, whose batch axis may be dynamic."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ExportError(f"{label} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                          "a head needs exactly one of each")
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(d.dim_value for d in dims[1:])
    if len(dims) != 4 or not all(v > 0 for v in chw):
        shape = [d.dim_value or d.dim_param or "?" for d in dims]
        raise ExportError(f"{label}: input {inputs[0].name!r} has shape {shape}, expected "
                          "(batch, C, H, W) with static C, H, W")
    return inputs[0].name, chw


# ------------------------------------------------------------------------------- helpers


def _check_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive ints, got {input_shape!r}")
    return shape


def _torch_export(head, shape: tuple[int, int, int], tmp: Path, name: str) -> None:
    import torch

    was_training = head.training
    head.eval()
    try:
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                head, (torch.zeros(1, *shape),), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as e:  # torch raises many types here (UnsupportedOperatorError, RuntimeError ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx could not export the head ({type(head).__name__}) to {name}: "
                          f"{first}") from e
    finally:
        head.train(was_training)


@contextlib.contextmanager
def _quiet_stdout():
    """Swallow what the exporter's C++ side prints on fd 1 (a whole IR graph on failure)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (embedded interpreters): nothing to silence
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _check_model(path: Path, label: str) -> "onnx.ModelProto":
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ExportError(f"{label}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ExportError(f"{label} is not a readable ONNX model (truncated or corrupted?): "
                          f"{type(e).__name__}: {e}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{label} fails the ONNX checker (truncated or corrupted?): {first}") from None
    if not model.graph.node:
        raise ExportError(f"{label} has an empty graph (truncated or corrupted?)")
    return model
