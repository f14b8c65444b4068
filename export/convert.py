"""ONNX -> TFLite with onnx2tf, calibrated on the caller's data, checked before anything is kept.

onnx2tf runs as a subprocess (its global TensorFlow state and chatty stdout stay out of our
process); its output goes to a log file. It converts into a temp folder inside `out_dir`, and the
final files are moved into place only when every requested model exists and passes the checks
(builtin operators only; the integer models fully integer), so a failure leaves no artifacts.

Calibration data must be given (`-cind`), otherwise onnx2tf downloads MS-COCO images and
calibrates with ImageNet statistics (research/edge_toolchain.md, section 0).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeveil.device.files import install_file
from edgeveil.device.manifest import PRECISIONS

from .errors import ExportError
from .onnx_export import load_onnx_checked, onnx_input

__all__ = [
    "PRECISIONS", "ONNX2TF_SUFFIXES", "convert", "onnx2tf_args", "check_precisions",
    "check_calibration", "check_normalization", "tflite_operators", "tflite_problems",
]

# our precision name -> suffix of the file onnx2tf writes
ONNX2TF_SUFFIXES = {
    "fp32": "float32", "fp16": "float16", "dynamic": "dynamic_range_quant",
    "int8": "full_integer_quant", "int16x8": "full_integer_quant_with_int16_act",
}
_INTEGER_IO = {"int8": "INT8", "int16x8": "INT16"}  # full-integer models: integer I/O, no float ops
_NEEDS_OIQT = {"dynamic", "int8", "int16x8"}
_TIMEOUT_S = 1800
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def convert(onnx_path: Path, calib: np.ndarray, mean, std, out_dir: Path,
            precisions=PRECISIONS, log=None, *, progress: bool = False) -> dict[str, Path]:
    """Convert an ONNX head to TFLite; returns {precision: out_dir / f"{stem}_{precision}.tflite"}.

    calib: float32 (N, H, W, C) raw pixels in 0..1; onnx2tf normalizes them with `mean` and `std`
    (one value per channel) exactly as the head's input was normalized in training.
    log: where onnx2tf's output goes (default out_dir / "onnx2tf.log"); kept on failure too.
    Everything is validated before onnx2tf starts.
    """
    onnx_path, out_dir = Path(onnx_path).resolve(), Path(out_dir).resolve()  # onnx2tf runs in its own cwd
    precisions = check_precisions(precisions)
    name, chw = onnx_input(load_onnx_checked(onnx_path), str(onnx_path))
    calib = check_calibration(calib, chw)
    mean, std = check_normalization(mean, std, chw[0])
    _require_onnx2tf()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log) if log is not None else out_dir / "onnx2tf.log"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "calibration.npy", calib)
        args = onnx2tf_args(onnx_path.resolve(), tmp / "out", tmp / "calibration.npy", name, mean, std,
                            precisions)
        expected = {p: tmp / "out" / f"{onnx_path.stem}_{ONNX2TF_SUFFIXES[p]}.tflite" for p in precisions}
        code = _run_onnx2tf(args, tmp, tmp / "onnx2tf.log", progress)
        install_file(tmp / "onnx2tf.log", log_path)
        _check_outputs(code, expected, onnx_path.name, log_path)
        return _install(expected, out_dir, onnx_path.stem)


def onnx2tf_args(onnx_path: Path, out_dir: Path, calib_path: Path, input_name: str, mean, std,
                 precisions=PRECISIONS) -> list[str]:
    """The onnx2tf command-line arguments `convert` uses (without the program name)."""
    args = ["-i", str(onnx_path), "-o", str(out_dir), "-qt", "per-channel",
            "-cind", input_name, str(calib_path), _nhwc_literal(mean), _nhwc_literal(std)]
    if _NEEDS_OIQT & set(precisions):
        args.append("-oiqt")
    if importlib.util.find_spec("onnxsim") is None:
        args.append("-nuo")  # onnx2tf would try the onnxsim CLI, log a traceback and go on without it
    return args


# ------------------------------------------------------------------------------- checks


def check_precisions(precisions) -> tuple[str, ...]:
    """The requested precisions in PRECISIONS order; unknown names are a ValueError."""
    precisions = tuple(precisions)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precisions must be a non-empty subset of {PRECISIONS}, got {precisions!r}")
    return tuple(p for p in PRECISIONS if p in precisions)


def check_calibration(calib, chw: tuple[int, int, int]) -> np.ndarray:
    """Calibration images as float32 (N, H, W, C) in 0..1, or a ValueError saying what is expected."""
    c, h, w = chw
    want = f"(N, H, W, C) = (N, {h}, {w}, {c})"
    if not isinstance(calib, np.ndarray):
        raise TypeError(f"calibration data must be a numpy array {want}, got {type(calib).__name__}")
    if calib.ndim != 4 or calib.shape[1:] != (h, w, c) or len(calib) == 0:
        hint = " (it looks NCHW: transpose to NHWC)" if calib.ndim == 4 and calib.shape[1:] == chw else ""
        raise ValueError(f"calibration data has shape {calib.shape}, expected {want} with N >= 1, "
                         f"float32 pixels in 0..1{hint}")
    if not np.issubdtype(calib.dtype, np.floating):
        raise ValueError(f"calibration data has dtype {calib.dtype}, expected float32 pixels in 0..1 "
                         "(divide uint8 images by 255)")
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    if not np.isfinite(calib).all():
        raise ValueError("calibration data contains NaN or infinity")
    lo, hi = float(calib.min()), float(calib.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"calibration data must be raw pixels in 0..1 (x/255, not normalized), "
                         f"got values in [{lo:.4g}, {hi:.4g}]")
    return calib


def check_normalization(mean, std, channels: int) -> tuple[list[float], list[float]]:
    """mean and std as lists of `channels` floats (std > 0)."""
    values = []
    for label, v in (("mean", mean), ("std", std)):
        arr = np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)
        if arr.size != channels or not np.isfinite(arr).all():
            raise ValueError(f"{label} must be {channels} finite value(s), one per channel, got {v!r}")
        values.append([float(x) for x in arr])
    if min(values[1]) <= 0:
        raise ValueError(f"std must be > 0 for every channel, got {std!r}")
    return values[0], values[1]


def _require_onnx2tf() -> None:
    for module in ("onnx2tf", "tensorflow"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed: pip install 'edgeveil[export]'")


# ------------------------------------------------------------------------------- onnx2tf


def _nhwc_literal(values: list[float]) -> str:
    """onnx2tf's -cind mean/std form: a nested list broadcast over NHWC, '[[[[m0,m1,m2]]]]'."""
    return "[[[[" + ",".join(repr(float(v)) for v in values) + "]]]]"


def _run_onnx2tf(args: list[str], cwd: Path, log_file: Path, progress: bool) -> int:
    cmd = [sys.executable, "-m", "onnx2tf", *args]
    with open(log_file, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait(proc, cwd / "out", "-oiqt" in args, progress)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return proc.returncode


def _wait(proc: subprocess.Popen, out: Path, quantized: bool, progress: bool) -> None:
    """Wait for onnx2tf, counting the files it has written as progress."""
    from tqdm.auto import tqdm

    total = 1 + (7 if quantized else 2)  # the SavedModel, then each .tflite variant
    deadline = time.monotonic() + _TIMEOUT_S
    with tqdm(total=total, desc="onnx2tf", unit="file", disable=not progress, leave=False) as bar:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise ExportError(f"onnx2tf did not finish within {_TIMEOUT_S} s")
            done = len(list(out.glob("*.tflite"))) + (out / "saved_model.pb").is_file()
            bar.update(min(done, total) - bar.n)
            time.sleep(0.2)
        bar.update(total - bar.n)


def _check_outputs(code: int, expected: dict[str, Path], onnx_name: str, log_path: Path) -> None:
    """ExportError unless onnx2tf succeeded and every requested model exists and passes the checks."""
    text = _ANSI.sub("", log_path.read_text(encoding="utf-8", errors="replace"))
    if code != 0:
        raise ExportError(f"onnx2tf could not convert {onnx_name} (exit code {code}){_diagnosis(text)}\n"
                          f"{_excerpt(text, log_path)}")
    problems = [f"{p}: onnx2tf did not write it{_diagnosis(text)}" for p, f in expected.items() if not f.is_file()]
    problems += [f"{p}: {msg}" for p, f in expected.items() if f.is_file() for msg in tflite_problems(f, p)]
    if problems:
        raise ExportError(f"onnx2tf converted {onnx_name}, but not to models the device can run:\n  "
                          + "\n  ".join(problems) + f"\n(full log: {log_path})")


def _diagnosis(text: str) -> str:
    """The op or node at fault and the last exception, as found in onnx2tf's log."""
    found = [f"op(s) with no TFLite builtin or Flex kernel: {m}" for m in re.findall(r"Custom ops: (.+)", text)]
    first_error = re.search(r"^ERROR:", text, re.M)
    if first_error:
        nodes = re.findall(r"onnx_op_type:\s*(\S+)\s+onnx_op_name:\s*(\S+)", text[: first_error.start()])
        if nodes:
            found.append("failed at ONNX node {1} ({0})".format(*nodes[-1]))
    found += [f"{m} failed" for m in re.findall(r"^(?:WARNING:\s*)?(.*?) tflite output failed", text, re.M)]
    errors = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, re.M)
    if errors:
        found.append("{}: {}".format(*errors[-1])[:300])
    return (": " + "; ".join(dict.fromkeys(found))) if found else ""


def _excerpt(text: str, log_path: Path, n: int = 8) -> str:
    """The log's last lines without Python traceback frames."""
    lines, skip = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith('File "'):
            skip = True  # the frame line and the source line after it
            continue
        if skip or not stripped or set(stripped) <= set("^~ ") or stripped.startswith("Traceback"):
            skip = False
            continue
        lines.append(line.rstrip()[:240])
    return f"last lines of {log_path}:\n    " + "\n    ".join(lines[-n:])


def _install(expected: dict[str, Path], out_dir: Path, stem: str) -> dict[str, Path]:
    return {precision: install_file(src, out_dir / f"{stem}_{precision}.tflite") for precision, src in expected.items()}


# ------------------------------------------------------------------------------- .tflite files


def tflite_operators(path) -> list[str]:
    """Operator names of a .tflite model in order of first use: 'CONV_2D', or a custom code ('FlexAsin')."""
    schema, model = _read_tflite(path)
    codes = [name for name, _ in _op_codes(schema, model)]
    names = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            names.append(codes[graph.Operators(i).OpcodeIndex()])
    return list(dict.fromkeys(names))


def tflite_problems(path, precision: str) -> list[str]:
    """Why the device could not run this model as `precision` (empty when it can)."""
    schema, model = _read_tflite(path)
    codes = _op_codes(schema, model)
    problems = [f"{name} is not a TFLite builtin op (Flex/custom ops need TensorFlow or a custom kernel)"
                for name, builtin in dict.fromkeys(codes) if not builtin]
    if model.SubgraphsLength() != 1:
        problems.append(f"has {model.SubgraphsLength()} subgraphs (control flow); expected 1")
    if precision in _INTEGER_IO:
        problems += _integer_problems(schema, model, [n for n, _ in codes], _INTEGER_IO[precision])
    return problems


TINY_SCALE = 1e-6


def tiny_scales(path, threshold: float = TINY_SCALE) -> list[dict]:
    """int8/int16 tensors whose quantization scale is below `threshold` (or zero).

    Such a scale means the tensor was (almost) all zero over the calibration set: a dead layer or
    filter. ai-edge-litert 2.3's XNNPACK refuses these models or aborts the process, so the export
    evaluates them without XNNPACK and the manifest tells the device to do the same.
    Returns [{"tensor", "dtype", "min_scale", "channels_below"}], one per offending tensor.
    """
    schema, model = _read_tflite(path)
    small = {schema.TensorType.INT8: "int8", schema.TensorType.INT16: "int16"}
    found = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            q = tensor.Quantization()
            if tensor.Type() not in small or q is None or q.ScaleLength() == 0:
                continue
            scales = q.ScaleAsNumpy()
            below = int((scales < threshold).sum())
            if below:
                found.append({"tensor": tensor.Name().decode(), "dtype": small[tensor.Type()],
                              "min_scale": float(scales.min()), "channels_below": below})
    return found


def _integer_problems(schema, model, codes: list[str], io_type: str) -> list[str]:
    graph, types = model.Subgraphs(0), {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
    problems = []
    for kind, count, get in (("input", graph.InputsLength(), graph.Inputs),
                             ("output", graph.OutputsLength(), graph.Outputs)):
        for j in range(count):
            tensor = graph.Tensors(get(j))
            got = types.get(tensor.Type(), str(tensor.Type()))
            if got != io_type:
                problems.append(f"model {kind} {tensor.Name().decode()!r} is {got}, expected {io_type}")
    float_ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        name = codes[op.OpcodeIndex()]
        tensors = [op.Inputs(k) for k in range(op.InputsLength())] + [op.Outputs(k) for k in range(op.OutputsLength())]
        if name not in ("QUANTIZE", "DEQUANTIZE") and any(
                t >= 0 and graph.Tensors(t).Type() == schema.TensorType.FLOAT32 for t in tensors):
            float_ops.append(name)
    if float_ops:
        problems.append(f"not fully integer: {', '.join(dict.fromkeys(float_ops))} run(s) in float32 "
                        "(onnx2tf could not quantize it)")
    return problems


def _read_tflite(path):
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    buf = Path(path).read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ExportError(f"{path} is not a .tflite model (no TFL3 file identifier)")
    return schema, schema.Model.GetRootAs(buf, 0)


def _op_codes(schema, model) -> list[tuple[str, bool]]:
    """(name, is_builtin) per operator code; custom ops are named by their custom code."""
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == schema.BuiltinOperator.CUSTOM:
            custom = oc.CustomCode()
            codes.append((custom.decode() if custom else "CUSTOM", False))
        else:
            codes.append((builtin.get(code, f"BUILTIN_{code}"), True))
    return codes
