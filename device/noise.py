"""Inference-time noise, added after the head in the quantized domain the same way on every runtime.

numpy + stdlib only: the device runner adds it, and export, the attacks and the pipeline import it
to reproduce what the device sends.

Specs: {"kind": "gaussian", "sigma": std}, {"kind": "laplace", "sigma": scale b} (std = sqrt(2) b),
{"kind": "dropout", "p": probability} (a dropped feature becomes 0.0, i.e. the zero point). A
Gaussian or Laplace spec with "clip_norm" (and "clip_ord", 2 or 1) first scales each image's
dequantized features down to that L2 / L1 norm, as the noise defense did in training, then adds
the noise and requantizes: the (epsilon, delta) the export reports holds only with this clipping,
and rounding afterwards is post-processing.

Noise on integer codes (`add_quantized_noise`): dequantize, add the noise drawn in float feature
units, quantize again on the sent grid, round half away from zero. The sent grid comes from
`sent_qparams`, called once, by export, which writes it into each artifact's manifest entry
(field `sent`) for the device, the server and the attacks to read. For Gaussian or Laplace
noise of at least one output step it is the output tensor's range widened by 4 sigma (Gaussian)
or 9 b (Laplace) on both sides, so that the noise is not clipped where ReLU features sit (the
zero point is the dtype's minimum: the tensor's own grid would keep only the upward half of the
noise there, biasing what the tail trained on unbiased noise sees). Below one step the tensor's own grid is kept: rounding erases most of such noise
anyway, and the export and the report say so.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .quant import round_half_away

__all__ = ["NOISE_KINDS", "Noisy", "add_float_noise", "add_quantized_noise", "check_noise_spec",
           "clip_per_sample", "sent_qparams"]

NOISE_KINDS = ("gaussian", "laplace", "dropout")
# How far the sent grid reaches beyond the output tensor's range, in units of the spec's sigma:
# either kind then falls outside on one side with probability below 1e-4.
NOISE_MARGIN = {"gaussian": 4.0, "laplace": 9.0}


def check_noise_spec(spec, where: str = "inference_noise") -> dict | None:
    """None, or a valid noise spec (a copy); otherwise ValueError naming `where` and the field."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("kind") not in NOISE_KINDS:
        got = spec.get("kind") if isinstance(spec, dict) else spec
        raise ValueError(f"{where}.kind must be one of {', '.join(NOISE_KINDS)}, got {got!r}")
    key, upper = ("p", 1.0) if spec["kind"] == "dropout" else ("sigma", math.inf)
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= upper:
        allowed = "a number in [0, 1]" if key == "p" else "a finite number >= 0"
        raise ValueError(f"{where}.{key} must be {allowed} for kind {spec['kind']!r}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}.{key} must be finite, got {value!r}")
    clip = spec.get("clip_norm")
    if clip is not None:
        if spec["kind"] == "dropout":
            raise ValueError(f"{where}.clip_norm applies to gaussian and laplace noise, not to dropout")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
            raise ValueError(f"{where}.clip_norm must be a positive finite number or null, got {clip!r}")
        ord_ = spec.setdefault("clip_ord", 2 if spec["kind"] == "gaussian" else 1)
        if ord_ not in (1, 2) or isinstance(ord_, bool):
            raise ValueError(f"{where}.clip_ord must be 1 or 2, got {ord_!r}")
    return dict(spec)


def clip_per_sample(values: np.ndarray, max_norm: float, ord: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Scale each sample (first axis) down to L`ord` norm <= max_norm, as the noise defense does in training.

    Returns (float64 values, (N,) bool: which samples were scaled down). The norm is over all of a
    sample's elements, so the layout (NHWC or NCHW) does not matter.
    """
    x = np.asarray(values, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    norms = np.abs(flat).sum(axis=1) if ord == 1 else np.sqrt((flat * flat).sum(axis=1))
    factor = np.minimum(1.0, max_norm / np.maximum(norms, 1e-300))
    return (flat * factor[:, None]).reshape(x.shape), factor < 1.0


def sent_qparams(scale: float, zero_point: int, qmin: int, qmax: int, spec: dict | None) -> tuple[float, int]:
    """(scale, zero point) of the codes the device sends for an output tensor quantized with
    (scale, zero_point) over [qmin, qmax], given the inference noise `spec`.

    The tensor's own unless the noise is Gaussian or Laplace with sigma >= one step: then the
    tensor's float range widened by NOISE_MARGIN sigma on both sides, over the same codes.
    """
    spec = check_noise_spec(spec)
    scale, zero_point = float(scale), int(zero_point)
    if spec is None or spec["kind"] == "dropout" or spec["sigma"] < scale:
        return scale, zero_point
    margin = NOISE_MARGIN[spec["kind"]] * spec["sigma"]
    low, high = (qmin - zero_point) * scale - margin, (qmax - zero_point) * scale + margin
    wide = (high - low) / (qmax - qmin)
    return wide, int(np.clip(qmin + round_half_away(np.float64(-low / wide)), qmin, qmax))


class Noisy(NamedTuple):
    """Codes with the inference noise added, the grid they are on, and what the noise became."""
    codes: np.ndarray
    scale: float
    zero_point: int
    stats: dict | None


def add_quantized_noise(codes: np.ndarray, scale: float, zero_point: int, spec: dict | None,
                        rng: np.random.Generator, sent: tuple[float, int]) -> Noisy:
    """Add inference-time noise to integer codes (any shape) quantized with (scale, zero_point).

    sent: (scale, zero point) of the grid the noisy codes are sent on, as export derived it with
    `sent_qparams` and wrote it into the artifact's manifest entry (field `sent`); dropout keeps
    the tensor's own grid. Returns the noisy codes on that grid (same dtype), the grid, and stats:
    kind, sigma (float units, None for dropout), sigma_steps (sigma / the tensor's step),
    nominal_std (the distribution's std in float units), effective_std (std of what was really
    applied, in float units, rounding included), changed_fraction (features the noise moved by more
    than half a step of the sent grid: on the tensor's own grid, the codes that changed),
    clipped_fraction (noisy values outside the sent grid's range, clipped), widened (whether the
    grid was widened). `spec` None: codes and grid unchanged, stats None.
    """
    spec = check_noise_spec(spec)
    if spec is None:
        return Noisy(codes, scale, zero_point, None)
    codes = np.asarray(codes)
    info = np.iinfo(codes.dtype)
    out_scale, out_zp = float(sent[0]), int(sent[1])
    if spec["kind"] == "dropout" and (out_scale, out_zp) != (float(scale), int(zero_point)):
        raise ValueError(f"dropout keeps the tensor's grid ({scale}, {zero_point}), but the sent grid is {sent}")
    values = (codes.astype(np.float64) - zero_point) * float(scale)  # float64: unmoved codes apply exactly 0
    scaled = None
    if spec.get("clip_norm") is not None:  # clip the dequantized features, then noise, then requantize
        values, scaled = clip_per_sample(values, spec["clip_norm"], spec["clip_ord"])
    if spec["kind"] == "dropout":
        noisy = np.where(rng.random(codes.shape) < spec["p"], codes.dtype.type(zero_point), codes)
        clipped = np.zeros(codes.shape, dtype=bool)
    else:
        rounded = round_half_away((values + _draw(spec, codes.shape, rng)) / out_scale + out_zp)
        clipped = (rounded < info.min) | (rounded > info.max)
        noisy = np.clip(rounded, info.min, info.max).astype(codes.dtype)
    applied = (noisy.astype(np.float64) - out_zp) * out_scale - values
    # Requantizing on another grid moves a value by less than half a step: "changed" means more than that.
    stats = _stats(spec, scale, applied, np.abs(applied) > 0.5 * out_scale, clipped, scaled)
    stats["widened"] = out_scale != float(scale)
    return Noisy(noisy, out_scale, out_zp, stats)


def add_float_noise(values: np.ndarray, spec: dict | None,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict | None]:
    """The same noise on float features (no rounding, no clipping); returns (float32 values, stats)."""
    spec = check_noise_spec(spec)
    values = np.asarray(values, dtype=np.float32)
    if spec is None:
        return values, None
    scaled = None
    base = values.astype(np.float64)
    if spec.get("clip_norm") is not None:
        base, scaled = clip_per_sample(base, spec["clip_norm"], spec["clip_ord"])
    if spec["kind"] == "dropout":
        noisy = np.where(rng.random(values.shape) < spec["p"], np.float32(0.0), values)
    else:
        noisy = (base + _draw(spec, values.shape, rng)).astype(np.float32)
    applied = noisy.astype(np.float64) - base
    return noisy, _stats(spec, None, applied, noisy != values, np.zeros(values.shape, dtype=bool), scaled)


def _draw(spec: dict, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if spec["kind"] == "gaussian":
        return rng.normal(0.0, spec["sigma"], shape)
    return rng.laplace(0.0, spec["sigma"], shape)


def _stats(spec: dict, scale: float | None, applied: np.ndarray, changed: np.ndarray, clipped: np.ndarray,
           scaled: np.ndarray | None = None) -> dict:
    sigma = spec.get("sigma")
    nominal = {"gaussian": sigma, "laplace": None if sigma is None else math.sqrt(2.0) * sigma}.get(spec["kind"])
    stats = {"kind": spec["kind"], "sigma": sigma,
             "sigma_steps": None if sigma is None or scale is None else sigma / float(scale),
             "nominal_std": nominal,
             "effective_std": float(applied.std()) if applied.size else 0.0,
             "changed_fraction": float(changed.mean()) if changed.size else 0.0,
             "clipped_fraction": float(clipped.mean()) if clipped.size else 0.0}
    if spec["kind"] == "dropout":
        stats["p"] = spec["p"]
    if scaled is not None:
        stats.update(clip_norm=spec["clip_norm"], clip_ord=spec["clip_ord"],
                     scaled_down_fraction=float(scaled.mean()) if scaled.size else 0.0)
    return stats


