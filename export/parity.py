"""Parity of a converted head against PyTorch, and the numpy steps that feed an artifact.

The steps are the device's: pixels x (uint8, NHWC) -> (x/255 - mean)/std in float32 -> quantized
with the input tensor's scale and zero point for an integer model -> the model -> dequantized
with the output tensor's scale and zero point -> back to PyTorch's layout for comparison.
"""
from __future__ import annotations

import numpy as np

from edgeveil.device.quant import dequantize, quantize, tensor_qparams

__all__ = ["parity", "quantized_range", "normalize_pixels", "prepare_input", "read_output", "match_layout"]


def parity(reference: np.ndarray, got: np.ndarray, out_scale: float | None,
           out_range: tuple[float, float] | None = None) -> dict:
    """How far `got` is from `reference` (same shape, first axis = samples).

    max_abs_err, mean_abs_err: over all elements. cosine: of the two arrays flattened;
    cosine_min: the worst per-sample cosine. rel_l2: ||got - ref|| / ||ref||. max_err_steps and
    mean_err_steps: the errors in units of the quantized output's scale (None for float models).
    With `out_range` (what the quantized output can represent, see `quantized_range`), also
    saturated (reference values outside it: the calibration never saw them) and
    max_err_steps_unsaturated (the max error over the other elements).
    """
    ref, out = np.asarray(reference, np.float64), np.asarray(got, np.float64)
    if ref.shape != out.shape or ref.size == 0:
        raise ValueError(f"parity needs two non-empty arrays of the same shape, got {ref.shape} and {out.shape}")
    bad = int((~np.isfinite(out)).sum()) + int((~np.isfinite(ref)).sum())
    if bad:
        raise ValueError(f"parity: {bad} non-finite values (NaN or infinity) in the outputs")
    if out_scale is not None and not out_scale > 0:
        raise ValueError(f"out_scale must be > 0 or None, got {out_scale!r}")
    err = np.abs(out - ref)
    max_abs, mean_abs = float(err.max()), float(err.mean())
    ref_norm = float(np.linalg.norm(ref))
    result = {
        "max_abs_err": max_abs,
        "mean_abs_err": mean_abs,
        "cosine": _cosine(ref.reshape(1, -1), out.reshape(1, -1))[0],
        "cosine_min": min(_cosine(ref.reshape(len(ref), -1), out.reshape(len(out), -1))),
        "rel_l2": float(np.linalg.norm(out - ref)) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else None),
        "max_err_steps": None if out_scale is None else max_abs / out_scale,
        "mean_err_steps": None if out_scale is None else mean_abs / out_scale,
        "n": int(len(ref)),
    }
    if out_range is not None and out_scale is not None:
        inside = (ref >= out_range[0] - out_scale / 2) & (ref <= out_range[1] + out_scale / 2)
        result["saturated"] = int((~inside).sum())
        result["max_err_steps_unsaturated"] = float(err[inside].max()) / out_scale if inside.any() else None
    return result


def quantized_range(detail: dict) -> tuple[float, float] | None:
    """The float range an integer tensor can represent, or None for a float tensor."""
    scale, zero_point, dtype = tensor_qparams(detail)
    if scale is None:
        return None
    info = np.iinfo(dtype)
    return (info.min - zero_point) * scale, (info.max - zero_point) * scale


def _cosine(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Row-wise cosine; two zero rows count as identical (1.0), one zero row as unrelated (0.0)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    result = []
    for dot, x, y in zip(dots, na, nb):
        result.append(float(dot / (x * y)) if x > 0 and y > 0 else (1.0 if x == y == 0 else 0.0))
    return result


def normalize_pixels(x: np.ndarray, mean, std) -> np.ndarray:
    """x: uint8 (N, H, W, C) -> float32 (N, H, W, C) = (x/255 - mean)/std, per channel."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"pixels must be uint8 (N, H, W, C), got {x.dtype} with shape {x.shape}")
    mean32, std32 = np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)
    if mean32.size != x.shape[-1] or std32.size != x.shape[-1]:
        raise ValueError(f"mean and std need {x.shape[-1]} values, got {mean32.size} and {std32.size}")
    return (x.astype(np.float32) / np.float32(255.0) - mean32) / std32


def prepare_input(x: np.ndarray, detail: dict, rounding: str = "reference") -> np.ndarray:
    """Normalized float input -> what the model's input tensor takes (quantized if it is integer)."""
    scale, zero_point, dtype = tensor_qparams(detail)
    if scale is None:
        return np.ascontiguousarray(x, dtype=dtype)
    return quantize(x, scale, zero_point, dtype, rounding=rounding)


def read_output(y: np.ndarray, detail: dict) -> np.ndarray:
    """The model's output -> float32 features (dequantized if it is integer)."""
    scale, zero_point, _ = tensor_qparams(detail)
    return y.astype(np.float32) if scale is None else dequantize(y, scale, zero_point)


def match_layout(y: np.ndarray, feature_shape) -> tuple[np.ndarray, str]:
    """Bring TFLite features (N, ...) to PyTorch's `feature_shape` (C, H, W or flat).

    onnx2tf turns 4-D outputs into NHWC; detected by shape. When C == H == W the shape cannot
    tell, and onnx2tf's NHWC convention is assumed (parity would expose a wrong guess).
    Returns the array and the layout found: "NHWC", "NCHW" or "same".
    """
    feature_shape = tuple(int(d) for d in feature_shape)
    if len(feature_shape) == 3 and y.ndim == 4:
        c, h, w = feature_shape
        if y.shape[1:] == (h, w, c):
            return np.ascontiguousarray(y.transpose(0, 3, 1, 2)), "NHWC"
        if y.shape[1:] == feature_shape:
            return y, "NCHW"
    elif y.shape[1:] == feature_shape:
        return y, "same"
    raise ValueError(f"TFLite output has shape {y.shape[1:]} per sample, which matches neither PyTorch's "
                     f"feature shape {feature_shape} nor its NHWC form")
