"""The head runner: raw pixels -> the features a device sends (numpy + stdlib + one TFLite interpreter).

    runner = HeadRunner("runs/digits/export", "int8")
    feats = runner.run(images)          # images: uint8 (N, H, W, C), exactly as the dataset gives them
    feats.values                        # int8 codes (N, H', W', C'), NHWC as TFLite gives them
    feats.to_nchw()                     # float32 (N, C', H', W') for the PyTorch tail

Pre-processing repeats the export's own: x/255, (x - mean) / std per channel (float32), then, for
an integer input, quantization with the input tensor's scale and zero point and the manifest's
`quantization_rounding`. Every step is elementwise and a uint8 pixel has 256 values, so the runner
applies that arithmetic once, to 0..255 for each channel, and then looks pixels up in the table:
bit for bit the same tensor, a few microseconds per image instead of tens (`pixel_table`).
Inference-time noise (manifest field `inference_noise`) is not in the graph: it is added here, after
the head, in the quantized domain, the same way on every runtime.

The noise itself (specs, kinds, clipping) lives in device/noise.py. The grid the noisy codes are
sent on is the one export derived and wrote into the artifact's manifest entry (field `sent`),
read here, never recomputed; frames carry that scale and zero point, and the cloud checks them
against the same field.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .interpreter import InterpreterError, Runtime, find_interpreter
from .interpreter import run as run_model
from .manifest import read_manifest
from .noise import add_float_noise, add_quantized_noise, check_noise_spec
from .quant import ROUNDINGS, dequantize, quantize, tensor_qparams

__all__ = ["Features", "HeadRunner", "normalize_pixels", "pixel_table", "table_lookup"]


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
        self.model_id: str = self.entry["model_id"]
        self.sent: tuple = (self.entry["sent"]["scale"], self.entry["sent"]["zero_point"])  # export derived it
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
        self._prepare_fast_path()

    def _prepare_fast_path(self) -> None:
        """What run() needs per image, derived once: the pixel table, tensor indices, bound methods."""
        spec = self._spec
        self._hwc = self.input_shape
        self._table = pixel_table(spec["mean"], spec["std"], tensor_qparams(self._inp), spec["rounding"])
        self._lookup = table_lookup(self._table, self._hwc)
        self._out_scale, self._out_zero_point, _ = tensor_qparams(self._out)
        self._layout = self.entry.get("output_layout", "NHWC")
        self._in_index, self._out_index = self._inp["index"], self._out["index"]
        interp = self.loaded.interpreter
        self._set_tensor, self._invoke, self._get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor

    def __repr__(self) -> str:
        return (f"HeadRunner({str(self.export_dir)!r}, {self.precision!r}, model_id={self.model_id}, "
                f"runtime={self.runtime_name} {self.loaded.version}, xnnpack={self.xnnpack})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self._inp["shape"][1:])

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) raw pixels -> the model input tensor's dtype, (N, H, W, C): a table lookup
        equal, bit for bit, to `normalize_pixels` with this artifact's manifest and input tensor."""
        _check_images(images, self._hwc)
        x = self._lookup(images)
        return x if x.flags.writeable else x.copy()

    def run(self, images: np.ndarray) -> Features:
        """Run the head on a batch (one image at a time), then add the manifest's noise."""
        _check_images(images, self._hwc)
        x = self._lookup(images)
        if len(x) == 1:  # the per-frame path: get_tensor already returns a fresh (1, ...) copy
            self._set_tensor(self._in_index, x)
            self._invoke()
            codes = self._get_tensor(self._out_index)
        else:  # a batch: its checks are paid once for all images
            codes = run_model(self.loaded, x)
        return self._with_noise(codes)

    def _with_noise(self, codes: np.ndarray) -> Features:
        scale, zero_point, stats = self._out_scale, self._out_zero_point, None
        if scale is None:
            values = codes.astype(np.float32, copy=False)
            if self.noise_spec is not None:
                values, stats = add_float_noise(values, self.noise_spec, self._rng)
        elif self.noise_spec is None:
            values = codes
        else:
            values, scale, zero_point, stats = add_quantized_noise(codes, scale, zero_point, self.noise_spec,
                                                                   self._rng, self.sent)
        return Features(values, scale, zero_point, self._layout, stats)


# ------------------------------------------------------------------------------- pre-processing


def normalize_pixels(images: np.ndarray, mean: np.ndarray, std: np.ndarray, qparams: tuple,
                     rounding: str = "reference") -> np.ndarray:
    """uint8 pixels (..., C) -> the model input, the export's arithmetic: x/255, then (x - mean) / std
    in float32 (mean, std: float32 (C,)), then quantized with qparams = (scale, zero_point, dtype)
    and `rounding`; scale None (a float input) gives x in `dtype`. Every step is elementwise."""
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    x = (x - mean) / std
    scale, zero_point, dtype = qparams
    if scale is None:
        return np.ascontiguousarray(x, dtype=dtype)
    return quantize(x, scale, zero_point, dtype, rounding=rounding)


def pixel_table(mean: np.ndarray, std: np.ndarray, qparams: tuple, rounding: str = "reference") -> np.ndarray:
    """(C, 256) in the input dtype: row c, column v is `normalize_pixels` of pixel value v in channel c.
    Looking pixels up here equals normalize_pixels bit for bit (the same elementwise float32 steps)."""
    pixels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, len(mean)))
    return np.ascontiguousarray(normalize_pixels(pixels, mean, std, qparams, rounding).T)


def table_lookup(table: np.ndarray, hwc: tuple[int, int, int]):
    """A function uint8 (N, H, W, C) -> table[c, pixel], same shape (possibly read-only); hwc: one image's shape."""
    channels, dtype = table.shape[0], table.dtype
    if channels != hwc[-1]:
        raise ValueError(f"a table of {channels} channels cannot look up {hwc[-1]}-channel images")
    if channels == 1 and dtype.itemsize == 1:  # bytes.translate: one C loop, no index array
        translation = table[0].tobytes()
        return lambda images: np.frombuffer(images.tobytes().translate(translation), dtype).reshape(images.shape)
    if channels == 1:
        return table[0].take
    flat = table.reshape(-1)  # channel c's row starts at 256 * c
    # Offsets of the image's full shape: numpy then adds one contiguous run, not N*H*W runs of C.
    offsets = np.ascontiguousarray(np.broadcast_to(np.arange(channels, dtype=np.intp) * 256, hwc))

    def lookup(images: np.ndarray) -> np.ndarray:
        index = images.astype(np.intp)
        index += offsets
        return flat.take(index)

    return lookup


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
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == hwc:
        return  # the per-frame case, before any message is built
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
