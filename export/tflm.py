"""TFLite Micro on the host: the exact minimum tensor arena, and bit-exactness against LiteRT.

tflite-micro's Python package wraps the real TFLM C++ interpreter with its reference kernels,
built for the 64-bit host: `Interpreter.from_bytes(model, arena_size=N)` allocates every tensor
in one N-byte arena and raises RuntimeError when it does not fit. That makes the arena a
measurement, not a guess: `measure_arena` searches for the smallest N at which the interpreter
allocates AND invokes on a real input. Host arenas are a little larger than on a 32-bit MCU
(pointers and structs in the persistent tail), so a margin is added for the recommendation.

The package exposes no arena counters to Python; its RecordingMicroAllocator prints a breakdown
(total, head = planned activations, tail = persistent structs, and per-kind buckets) to the C
stderr from `print_allocations()`. It is captured at the file-descriptor level and parsed.
TFLM's failure messages go to the same place; they tell an arena shortfall ("Failed to allocate
...") from a model TFLM cannot run (a kernel refusing in Prepare), which is raised at once.

`compare_kernels` runs the same integer inputs through TFLM, LiteRT's reference kernels
(BUILTIN_REF) and LiteRT's default path (XNNPACK), and counts differing output codes: TFLM and
the reference kernels share their arithmetic and agree bit for bit, while XNNPACK rounds some
requantizations differently (the anchor heads differed by up to 5 steps; research notes §5).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeveil.device.interpreter import find_interpreter
from edgeveil.device.interpreter import run as run_model

from .carray import NotFullInteger, check_full_integer, float_parts
from .convert import _read_tflite
from .errors import ExportError

__all__ = ["measure_arena", "check_arena", "compare_kernels", "tflm_outputs", "tflm_version"]

_ALIGN = 16  # bytes: TFLM aligns every buffer to 16; the search gallops in these steps
_DEFAULT_MAX = 64 << 20
_HOST_NOTE = "measured on a 64-bit host build; 32-bit MCUs use somewhat less for pointers/structs"
_INSTALL = "pip install 'edgeveil[mcu]' (tflite-micro)"
# TFLM's own words for "the arena is too small" (read from the library's format strings).
_ARENA_SHORT = re.compile(r"(?i)(failed|unable) to allocate|bytes required|missing: \d+")
_TOTALS = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")
_BUCKET = re.compile(r"'([^']+)' used (\d+) bytes with alignment overhead \(requested (\d+) bytes for (\d+) ")


def tflm_version() -> str:
    """'tflite-micro <version>' of the installed Python runtime."""
    import tflite_micro

    return f"tflite-micro {tflite_micro.__version__}"


def measure_arena(tflite_path, *, margin: float = 0.1, inputs=None, max_bytes: int = _DEFAULT_MAX) -> dict:
    """The smallest TFLite Micro arena (bytes) in which the model allocates and invokes.

    inputs: None (zeros of the input tensor) or an array (N, H, W, C) in the input tensor's dtype
    (int8 for an int8 head); the first sample is invoked at every probe. The search starts from
    what the RecordingMicroAllocator reports at `max_bytes`, gallops in 16-byte steps to bracket
    the boundary, then bisects to the byte. It relies on more room never hurting (TFLM's allocators
    only compare what they need with what is left); the minimum is re-checked once at the end.
    Returns {"arena_bytes", "recommended_bytes" (ceil to 16 of arena * (1 + margin)), "margin",
    "breakdown" (the recording at the minimum), "host_bits", "note", "interpreter",
    "bisection_steps" (arena sizes tried, max_bytes included), "seconds" (the search's wall time)}.
    """
    _check_number("margin", margin, 0.0, 10.0)
    _check_size("max_bytes", max_bytes, minimum=1)
    runtime, (data, detail) = _tflm(), _tflm_model(tflite_path)
    if inputs is None:
        sample = np.zeros(detail["shape"], dtype=detail["dtype"])
    else:
        sample = _check_batch(inputs, detail, "inputs")[:1]
    started = time.perf_counter()
    first, log = _attempt(runtime, data, max_bytes, sample)
    if first is None:
        _raise_unrunnable(tflite_path, log, max_bytes)
    probe = _Probe(runtime, data, sample, tflite_path)
    arena = _smallest(probe, _recording(first)["total_bytes"], max_bytes)
    interp, _ = _attempt(runtime, data, arena, sample)
    if interp is None:  # the search's monotonicity assumption failed: say so rather than report it
        raise ExportError(f"TFLite Micro allocated {tflite_path} in {arena} bytes once but not again")
    return {"arena_bytes": arena, "recommended_bytes": _ceil_to(arena * (1 + margin), _ALIGN),
            "margin": margin, "breakdown": _recording(interp), "host_bits": 64 if sys.maxsize > 2**32 else 32,
            "note": _HOST_NOTE, "interpreter": tflm_version(), "bisection_steps": probe.steps + 1,
            "seconds": round(time.perf_counter() - started, 3)}


def check_arena(tflite_path, arena_bytes: int) -> dict:
    """Does the model run in an arena of `arena_bytes`? Measured with `measure_arena` (no margin).

    Returns {"fits", "arena_bytes", "required_bytes", "shortfall_bytes", "recommended_bytes"}.
    """
    _check_size("arena_bytes", arena_bytes, minimum=0)
    measured = measure_arena(tflite_path)
    required = measured["arena_bytes"]
    return {"fits": arena_bytes >= required, "arena_bytes": arena_bytes, "required_bytes": required,
            "shortfall_bytes": max(0, required - arena_bytes), "recommended_bytes": measured["recommended_bytes"]}


def compare_kernels(tflite_path, inputs_int8, *, progress: bool = False) -> dict:
    """Run the same integer inputs (N, H, W, C) through TFLite Micro, LiteRT's reference kernels and
    LiteRT's default kernels (XNNPACK), and compare the output codes.

    The model must be full-integer (int8 or int16x8): steps are output quantization steps.
    Returns {"n", "tflm_vs_reference": {"bit_exact", "max_diff_steps", "share_differ"},
    "tflm_vs_xnnpack": {"max_diff_steps", "share_differ", "mean_abs_diff_steps"}, "message",
    "interpreters": {"tflm", "litert", "xnnpack_active"}}; share_differ is the fraction of output
    values (all samples, all elements) whose codes differ.
    """
    check_full_integer(tflite_path)
    runtime, (data, detail) = _tflm(), _tflm_model(tflite_path)
    x = _check_batch(inputs_int8, detail, "inputs_int8")
    interp, log = _attempt(runtime, data, _DEFAULT_MAX, x[:1])
    if interp is None:
        _raise_unrunnable(tflite_path, log, _DEFAULT_MAX)
    tflm_out = _run_tflm(interp, x, progress)
    litert = find_interpreter()
    reference = run_model(litert.make(tflite_path, reference_kernels=True), x)
    default = litert.make(tflite_path)
    xnnpack = run_model(default, x)
    vs_ref, vs_xnn = _diff(tflm_out, reference), _diff(tflm_out, xnnpack)
    steps = vs_ref["max_diff_steps"]
    result = {"n": len(x),
              "tflm_vs_reference": {"bit_exact": steps == 0, "max_diff_steps": steps,
                                    "share_differ": vs_ref["share_differ"]},
              "tflm_vs_xnnpack": vs_xnn,
              "interpreters": {"tflm": tflm_version(), "litert": f"{litert.name} {litert.version}",
                               "xnnpack_active": default.xnnpack}}
    result["message"] = _kernels_message(result)
    return result


def tflm_outputs(tflite_path, inputs, *, arena_bytes: int = _DEFAULT_MAX) -> np.ndarray:
    """TFLite Micro's output codes for `inputs` (N, H, W, C) in the input dtype, in an arena of
    `arena_bytes` (e.g. a measured minimum: the outputs a board with exactly that arena computes)."""
    _check_size("arena_bytes", arena_bytes, minimum=1)
    runtime, (data, detail) = _tflm(), _tflm_model(tflite_path)
    x = _check_batch(inputs, detail, "inputs")
    interp, log = _attempt(runtime, data, arena_bytes, x[:1])
    if interp is None:
        _raise_unrunnable(tflite_path, log, arena_bytes)
    return _run_tflm(interp, x, progress=False)


# ------------------------------------------------------------------------------- the model


def _tflm():
    try:
        from tflite_micro import runtime
    except ImportError as e:
        raise ImportError(f"TFLite Micro's Python runtime is not installed: {_INSTALL}") from e
    return runtime


def _tflm_model(tflite_path) -> tuple[bytes, dict]:
    """The model's bytes and its input {"shape", "dtype"}; refused with the reason when TFLite
    Micro cannot run it at all."""
    path = Path(tflite_path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    parts = float_parts(path)  # also refuses a file that is not a .tflite model
    if parts.kind in ("fp16", "dynamic-range"):
        raise NotFullInteger(
            f"TFLite Micro cannot run {path}: {parts.describe()}. TFLite Micro has no fp16-weight or "
            "hybrid (dynamic-range) kernels (tflite-micro#757, #2543): use the int8 export, "
            "head_int8.tflite (or int16x8; fp32 runs too, on an MCU with room for float)")
    schema, model = _read_tflite(path)
    graph = model.Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        raise ValueError(f"{path} has {graph.InputsLength()} inputs and {graph.OutputsLength()} outputs; "
                         "TFLite Micro checks take single-input, single-output heads")
    tensor = graph.Tensors(graph.Inputs(0))
    type_name = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}[tensor.Type()]
    return path.read_bytes(), {"shape": tuple(int(d) for d in tensor.ShapeAsNumpy()),
                               "dtype": np.dtype(type_name.lower())}


def _check_batch(x, detail: dict, name: str) -> np.ndarray:
    """x: (N, *input_shape[1:]) in exactly the input dtype, N >= 1."""
    shape, dtype = detail["shape"], detail["dtype"]
    want = f"(N, {', '.join(str(d) for d in shape[1:])}) {dtype}"
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array {want}, got {type(x).__name__}")
    if x.ndim != len(shape) or x.shape[1:] != shape[1:] or len(x) == 0:
        raise ValueError(f"{name} has shape {x.shape}, expected {want}")
    if x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype} (quantize with the input tensor's "
                         "scale and zero point first, as the device does)")
    return np.ascontiguousarray(x)


# ------------------------------------------------------------------------------- probing


class _Probe:
    """works(size): does the model allocate and invoke in `size` bytes? Counts the attempts."""

    def __init__(self, runtime, data: bytes, sample: np.ndarray, where):
        self.runtime, self.data, self.sample, self.where = runtime, data, sample, where
        self.steps = 0

    def __call__(self, size: int) -> bool:
        self.steps += 1
        interp, log = _attempt(self.runtime, self.data, size, self.sample)
        if interp is None and not _ARENA_SHORT.search(log):
            _raise_unrunnable(self.where, log, size)
        return interp is not None


def _attempt(runtime, data: bytes, size: int, sample: np.ndarray):
    """(interpreter after invoking it on `sample` (1, H, W, C), or None on failure; what TFLM printed)."""
    with _native_stderr() as log:
        try:
            interp = runtime.Interpreter.from_bytes(data, arena_size=size)
            interp.set_input(sample, 0)
            interp.invoke()
        except RuntimeError:
            interp = None
    return interp, log[0]


def _smallest(works, guess: int, hi: int) -> int:
    """Smallest size in 1..hi with works(size), given works(hi). Gallops from `guess` in doubling
    16-byte steps to bracket the boundary, then bisects; an empty arena is taken to fail."""
    lo, step, guess = 0, _ALIGN, min(max(guess, 1), hi)
    if works(guess):
        hi = guess
        while hi - step > lo:
            if not works(hi - step):
                lo = hi - step
                break
            hi, step = hi - step, step * 2
    else:
        lo = guess
        while lo + step < hi:
            if works(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def _raise_unrunnable(where, log: str, size: int):
    if _ARENA_SHORT.search(log):
        raise ValueError(f"TFLite Micro could not fit {where} in {size} bytes (max_bytes); TFLM said: "
                         f"{_last_lines(log).rstrip('.')}. Raise max_bytes")
    raise ExportError(f"TFLite Micro cannot run {where}: {_last_lines(log) or 'no message'}")


def _last_lines(log: str, n: int = 4) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(lines[-n:])


@contextlib.contextmanager
def _native_stderr():
    """Collect what C++ code writes to file descriptor 2 (TFLM's MicroPrintf) inside the block.

    Yields a list that holds the text once the block ends. Process-wide while it lasts: other
    threads' stderr output lands in the capture too.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", errors="replace"))


def _recording(interp) -> dict:
    """The RecordingMicroAllocator's report after an invoke, parsed: bytes of the arena's parts."""
    with _native_stderr() as log:
        interp.print_allocations()
    text = log[0]
    totals = {part: int(n) for part, n in _TOTALS.findall(text)}
    if set(totals) != {"total", "head", "tail"}:
        raise ExportError(f"unexpected TFLite Micro allocation report: {_last_lines(text) or 'empty'}")
    buckets = {name: {"used_bytes": int(used), "requested_bytes": int(req), "count": int(n)}
               for name, used, req, n in _BUCKET.findall(text)}
    return {"total_bytes": totals["total"], "head_bytes": totals["head"], "tail_bytes": totals["tail"],
            "buckets": buckets,
            "source": "tflite-micro RecordingMicroAllocator (Interpreter.print_allocations), at the minimum arena",
            "parts": "head: activation buffers laid out by the greedy memory planner; tail: persistent "
                     "structs (eval tensors, node/registration structs, op data, quantization params)"}


# ------------------------------------------------------------------------------- kernels


def _run_tflm(interp, x: np.ndarray, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    outs = []
    for i in tqdm(range(len(x)), desc="TFLite Micro", unit="img", disable=not progress):
        interp.set_input(x[i : i + 1], 0)
        interp.invoke()
        outs.append(interp.get_output(0)[0].copy())
    return np.stack(outs)


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return {"max_diff_steps": int(d.max()), "share_differ": float((d > 0).mean()),
            "mean_abs_diff_steps": float(d.mean())}


def _kernels_message(r: dict) -> str:
    n, ref, xnn = r["n"], r["tflm_vs_reference"], r["tflm_vs_xnnpack"]
    if ref["bit_exact"]:
        first = f"TFLite Micro matched LiteRT's reference kernels bit for bit on all {n} inputs"
    else:
        first = (f"TFLite Micro differed from LiteRT's reference kernels by up to {ref['max_diff_steps']} "
                 f"step(s) on {100 * ref['share_differ']:.2f}% of output values over {n} inputs (they "
                 f"should agree bit for bit: compare the tflite-micro and ai-edge-litert versions)")
    if xnn["max_diff_steps"] == 0:
        return f"{first}, and LiteRT's default kernels (XNNPACK) matched too."
    return (f"{first}; LiteRT's default kernels (XNNPACK, what a Linux board runs) differ from TFLite Micro "
            f"by up to {xnn['max_diff_steps']} output step(s) on {100 * xnn['share_differ']:.2f}% of output "
            "values. An MCU will not reproduce the Linux board's features bit for bit: the cloud receives "
            "slightly different codes from the two for the same image.")


# ------------------------------------------------------------------------------- checks


def _check_number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in {low}..{high}, got {value!r}")


def _check_size(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (bytes), got {value!r}")


def _ceil_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
