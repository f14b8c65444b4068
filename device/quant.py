"""Affine (scale, zero point) quantization exactly as the TFLite runtime does it, in numpy.

    q = clamp(round(x / scale) + zero_point, qmin, qmax)        x = (q - zero_point) * scale

Rounding: TFLite's own QUANTIZE kernels do not agree on exact ties (x / scale = k + 0.5), measured
with ai-edge-litert 2.3 on x86 (``tests/test_export.py`` repeats the measurement):

* ``rounding="reference"`` (default): float32 ``x / scale``, ties **away from zero**
  (``TfLiteRound`` = ``std::round``). Matches the reference kernels (OpResolverType.BUILTIN_REF);
  TFLite Micro's QUANTIZE calls the same reference function (by reading, not measured here).
* ``rounding="optimized"``: float32 ``x * (1 / scale)``, ties **to even**. Matches the optimized
  builtin kernels and the XNNPACK delegate (the default interpreter).

``np.round`` alone matches neither (it rounds half to even but after a division). The two modes
differ by one step on ties only; the device quantizes its own input, so either is a valid choice
as long as it is recorded.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ROUNDINGS", "quantize", "dequantize", "tensor_qparams", "round_half_away"]

ROUNDINGS = ("reference", "optimized")

_INT_DTYPES = (np.int8, np.uint8, np.int16, np.int32)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's ``round``), keeping the float dtype."""
    return np.sign(v) * np.floor(np.abs(v) + v.dtype.type(0.5))


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype, rounding: str = "reference") -> np.ndarray:
    """x: float array (any shape) -> integer array of `dtype`, saturating at the dtype's range.

    rounding: "reference" (TFLite reference kernels, TFLite Micro) or "optimized" (TFLite
    optimized kernels, XNNPACK); see the module docstring.
    """
    dtype = _check_int_dtype(dtype)
    _check_scale(scale)
    x = np.asarray(x, dtype=np.float32)
    info = np.iinfo(dtype)
    if rounding == "reference":
        r = round_half_away(x / np.float32(scale))
    elif rounding == "optimized":
        r = np.rint(x * (np.float32(1.0) / np.float32(scale)))
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    q = r.astype(np.int64) + int(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """q: integer array (any shape) -> float32 array, (q - zero_point) * scale."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"dequantize expects an integer array, got dtype {q.dtype}")
    _check_scale(scale)
    return ((q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale))


def tensor_qparams(detail: dict) -> tuple[float | None, int | None, np.dtype]:
    """(scale, zero_point, dtype) of one interpreter tensor detail (``get_input_details()[i]``).

    Float tensors give ``(None, None, float32)``. Per-channel tensors (several scales) are refused:
    model inputs and outputs are per-tensor in every TFLite model we make.
    """
    dtype = np.dtype(detail["dtype"])
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64).reshape(-1)
    zeros = np.asarray(params.get("zero_points", []), dtype=np.int64).reshape(-1)
    if scales.size == 0:
        scale, zero = detail.get("quantization", (0.0, 0))
        scales, zeros = np.array([scale], np.float64), np.array([zero], np.int64)
    if scales.size > 1:
        raise ValueError(f"tensor {detail.get('name')!r} is quantized per channel ({scales.size} scales); "
                         "expected one scale for a model input or output")
    if not np.issubdtype(dtype, np.integer) or scales[0] == 0:
        return None, None, dtype
    return float(scales[0]), int(zeros[0]), dtype


def _check_int_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.type not in _INT_DTYPES:
        raise TypeError(f"quantize needs an integer dtype (int8, uint8, int16, int32), got {dtype}")
    return dtype


def _check_scale(scale) -> None:
    if scale is None or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
