"""The head runner: raw pixels -> the features a device sends (numpy + stdlib + one TFLite interpreter).

    runner = HeadRunner("runs/digits/export", "int8")
    feats = runner.run(images)          # images: uint8 (N, H, W, C), exactly as the dataset gives them
    feats.values                        # int8 codes (N, H', W', C'), NHWC as TFLite gives them
    feats.to_nchw()                     # float32 (N, C', H', W') for the PyTorch tail

Pre-processing repeats the export's own: x/255, (x - mean) / std per channel (float32), then, for
an integer input, quantization with the input tensor's scale and zero point and the manifest's
`quantization_rounding`. Inference-time noise (manifest field `inference_noise`) is not in the
graph: it is added here, after the head, in the quantized domain, the same way on every runtime.

Noise on integer codes (`add_quantized_noise`): dequantize, add the noise drawn in float feature
units, quantize again, round half away from zero. The grid the noisy codes are sent on is
`sent_qparams`: for Gaussian or Laplace noise of at least one output step it is the output
tensor's range widened by 4 sigma (Gaussian) or 9 b (Laplace) on both sides, so that the noise is
not clipped where ReLU features sit (the zero point is the dtype's minimum: the tensor's own grid
would keep only the upward half of the noise there, biasing what the tail trained on unbiased
noise sees). Below one step the tensor's own grid is kept: rounding erases most of such noise
anyway, and the export and the report say so. Frames carry the scale and zero point they were
quantized with, and the cloud checks them against `sent_qparams` of the manifest. Specs: {"kind": "gaussian", "sigma": std},
{"kind": "laplace", "sigma": scale b} (std = sqrt(2) b), {"kind": "dropout", "p": probability}
(a dropped feature becomes 0.0, i.e. the zero point). A Gaussian or Laplace spec with "clip_norm"
(and "clip_ord", 2 or 1) first scales each image's dequantized features down to that L2 / L1 norm,
as the noise defense did in training, then adds the noise and requantizes: the (epsilon, delta) the
export reports holds only with this clipping, and rounding afterwards is post-processing.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .interpreter import InterpreterError, Runtime, find_interpreter
from .interpreter import run as run_model
from .manifest import read_manifest
from .quant import ROUNDINGS, dequantize, quantize, round_half_away, tensor_qparams

__all__ = ["Features", "HeadRunner", "NOISE_KINDS", "Noisy", "add_quantized_noise", "add_float_noise",
           "check_noise_spec", "clip_per_sample", "sent_qparams"]

NOISE_KINDS = ("gaussian", "laplace", "dropout")
# How far the sent grid reaches beyond the output tensor's range, in units of the spec's sigma:
# either kind then falls outside on one side with probability below 1e-4.
NOISE_MARGIN = {"gaussian": 4.0, "laplace": 9.0}


@dataclass(frozen=True, eq=False)
class Features:
    """The head's output as the device sends it.

    values: int8/int16 codes (N, H', W', C') for integer artifacts, float32 for float ones, in
    `layout` ("NHWC" for 4-D heads converted by onnx2tf; "NCHW" or "same" otherwise).
    scale / zero_point: the output quantization (None for float artifacts).
    noise: the inference-time noise applied (see `add_quantized_noise`), or None.
    """

    values: np.ndarray
    scale: float | None
    zero_point: int | None
    layout: str = "NHWC"
    noise: dict | None = None

    def dequantized(self) -> np.ndarray:
        """float32, same shape and layout as `values`."""
        if self.scale is None:
            return np.asarray(self.values, dtype=np.float32)
        return dequantize(self.values, self.scale, self.zero_point)

    def to_nchw(self) -> np.ndarray:
        """Dequantized, as the PyTorch tail expects: (N, C', H', W') for NHWC values; else unchanged."""
        x = self.dequantized()
        if self.layout == "NHWC" and x.ndim == 4:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x


class HeadRunner:
    """One exported head artifact, checked against its manifest and loaded in a TFLite interpreter.

    export_dir: the run's export/ folder (manifest.json beside the .tflite files).
    precision: a key of the manifest's artifacts ("int8", "fp32", ...).
    runtime: None (find_interpreter()), a runtime name ("ai_edge_litert", "tflite_runtime",
    "tensorflow") or a Runtime. xnnpack=False selects the builtin kernels without the default
    delegate; reference_kernels=True the reference kernels (bit-exact across runtimes and TFLM).
    noise_seed: seeds the inference-time noise (None: fresh OS entropy, what a deployment wants).
    """

    def __init__(self, export_dir: str | Path, precision: str = "int8", *, runtime=None,
                 num_threads: int | None = None, xnnpack: bool = True, noise_seed: int | None = None,
                 reference_kernels: bool = False):
        self.export_dir = Path(export_dir)
        manifest_path = self.export_dir / "manifest.json"
        self.manifest = read_manifest(manifest_path)
        artifacts = self.manifest["artifacts"]
        if precision not in artifacts:
            raise ValueError(f"{manifest_path} has no artifact {precision!r}; it has {', '.join(artifacts)}")
        self.precision, self.entry = precision, artifacts[precision]
        self.model_id: str = self.entry["sha256"][:16]
        self.path = self.export_dir / self.entry["file"]
        self.noise_spec = check_noise_spec(self.manifest["inference_noise"],
                                           f"{manifest_path}: field inference_noise")
        self._spec = _input_spec(self.manifest["input_spec"], manifest_path)
        runtime = runtime if isinstance(runtime, Runtime) else find_interpreter(runtime)
        if xnnpack and self.entry.get("xnnpack_safe") is False:
            # Scales below 1e-6 (a dead layer): XNNPACK refuses such a model or aborts the process.
            warnings.warn(f"{self.path.name}: the manifest marks it unsafe for XNNPACK (tiny quantization "
                          "scales); running it with the builtin kernels", RuntimeWarning, stacklevel=2)
            xnnpack = False
        try:
            self.loaded = runtime.make(_verified_bytes(self.path, self.entry["sha256"]), num_threads=num_threads,
                                       xnnpack=xnnpack, reference_kernels=reference_kernels)
        except InterpreterError as e:
            raise InterpreterError(f"{self.path}: {e}") from e
        self.runtime_name: str = self.loaded.runtime
        self.xnnpack: bool | None = self.loaded.xnnpack
        self._inp, self._out = _check_io(self.loaded, self.entry, self.path)
        if self._spec["mean"].size != self.input_shape[-1]:
            raise ValueError(f"{manifest_path}: field input_spec.mean has {self._spec['mean'].size} values for "
                             f"a {self.input_shape[-1]}-channel input")
        self._rng = np.random.default_rng(noise_seed)

    def __repr__(self) -> str:
        return (f"HeadRunner({str(self.export_dir)!r}, {self.precision!r}, model_id={self.model_id}, "
                f"runtime={self.runtime_name} {self.loaded.version}, xnnpack={self.xnnpack})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self._inp["shape"][1:])

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) raw pixels -> the model input tensor's dtype, (N, H, W, C)."""
        _check_images(images, self.input_shape)
        x = images.astype(np.float32) / np.float32(255.0)
        x = (x - self._spec["mean"]) / self._spec["std"]
        scale, zero_point, dtype = tensor_qparams(self._inp)
        if scale is None:
            return np.ascontiguousarray(x, dtype=dtype)
        return quantize(x, scale, zero_point, dtype, rounding=self._spec["rounding"])

    def run(self, images: np.ndarray) -> Features:
        """Run the head on a batch (one image at a time), then add the manifest's noise."""
        codes = run_model(self.loaded, self.preprocess(images))
        scale, zero_point, _ = tensor_qparams(self._out)
        if scale is None:
            values, stats = add_float_noise(codes.astype(np.float32, copy=False), self.noise_spec, self._rng)
        else:
            values, scale, zero_point, stats = add_quantized_noise(codes, scale, zero_point, self.noise_spec,
                                                                   self._rng)
        return Features(values, scale, zero_point, self.entry.get("output_layout", "NHWC"), stats)


# ------------------------------------------------------------------------------- noise


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
                        rng: np.random.Generator) -> Noisy:
    """Add inference-time noise to integer codes (any shape) quantized with (scale, zero_point).

    Returns the noisy codes on the `sent_qparams` grid (same dtype), that grid, and stats: kind,
    sigma (float units, None for dropout), sigma_steps (sigma / the tensor's step), nominal_std
    (the distribution's std in float units), effective_std (std of what was really applied, in
    float units, rounding included), changed_fraction (features the noise moved by more than half
    a step of the sent grid: on the tensor's own grid, the codes that changed),
    clipped_fraction (noisy values outside the sent grid's range, clipped), widened (whether the
    grid was widened). `spec` None: codes and grid unchanged, stats None.
    """
    spec = check_noise_spec(spec)
    if spec is None:
        return Noisy(codes, scale, zero_point, None)
    codes = np.asarray(codes)
    info = np.iinfo(codes.dtype)
    out_scale, out_zp = sent_qparams(scale, zero_point, info.min, info.max, spec)
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


# ------------------------------------------------------------------------------- checks


def _verified_bytes(path: Path, expected: str) -> bytes:
    """The model file's bytes, refused unless their sha256 is the manifest's (loaded from these bytes)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"model file {path} cannot be read ({e.strerror or e})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"model file {path} does not match its manifest: sha256 expected {expected}, "
                         f"actual {actual} (the file was changed, truncated or replaced)")
    return data


def _input_spec(spec: dict, manifest_path: Path) -> dict:
    where = f"{manifest_path}: field input_spec"
    if spec["pixel_scaling"] != "x/255":
        raise ValueError(f"{where}.pixel_scaling is {spec['pixel_scaling']!r}; this runtime knows 'x/255'")
    rounding = spec.get("quantization_rounding", "reference")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{where}.quantization_rounding must be one of {ROUNDINGS}, got {rounding!r}")
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    if mean.ndim != 1 or mean.shape != std.shape or not np.all(std > 0):
        raise ValueError(f"{where}.mean/std must be lists of the same length with std > 0")
    return {"mean": mean, "std": std, "rounding": rounding}


def _check_io(loaded, entry: dict, path: Path) -> tuple[dict, dict]:
    """The interpreter's single input and output, which must be what the manifest says."""
    inputs, outputs = loaded.get_input_details(), loaded.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{path}: a head has one input and one output, this one {len(inputs)} and {len(outputs)}")
    pairs = (("inputs", inputs[0], entry["inputs"][0]), ("outputs", outputs[0], entry["outputs"][0]))
    for kind, detail, recorded in pairs:
        scale, zero_point, dtype = tensor_qparams(detail)
        got = ([int(d) for d in detail["shape"]], dtype.name, zero_point)
        want = (recorded["shape"], recorded["dtype"], recorded["zero_point"])
        same_scale = (scale is None) == (recorded["scale"] is None) and (
            scale is None or math.isclose(scale, recorded["scale"], rel_tol=1e-6))
        if got != want or not same_scale:
            raise ValueError(f"{path}: tensor {kind}[0] is {got + (scale,)} (shape, dtype, zero point, scale) "
                             f"but the manifest says {want + (recorded['scale'],)}")
    if len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][0] != 1:
        raise ValueError(f"{path}: expected a [1, H, W, C] image input, got {list(inputs[0]['shape'])}")
    return inputs[0], outputs[0]


def _check_images(images, hwc: tuple[int, int, int]) -> None:
    h, w, c = hwc
    want = f"uint8 images of shape (N, {h}, {w}, {c}) (NHWC raw pixels)"
    if not isinstance(images, np.ndarray):
        raise ValueError(f"expected {want}, got {type(images).__name__}")
    hint = ""
    if images.ndim == 4 and images.shape[1:] == (c, h, w) and (c, h, w) != hwc:
        hint = "; this looks NCHW: transpose it to NHWC"
    elif images.dtype != np.uint8:
        hint = "; pass raw pixels 0..255, the runner normalizes them itself"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != hwc:
        raise ValueError(f"expected {want}, got {images.dtype} {images.shape}{hint}")
