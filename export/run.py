"""The export stage on a run directory: train/ -> export/ (ONNX, TFLite per precision, manifest).

Each artifact is run the way the device runs it (numpy pre-processing, the TFLite interpreter
found by edgeveil.device, XNNPACK on by default) on the whole test split, and compared with the
PyTorch head; the tail then classifies the artifact's features. manifest.json is written last:
its presence marks a finished export (an old one is removed before anything is replaced).
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeveil.device.interpreter import find_interpreter
from edgeveil.device.interpreter import run as run_model
from edgeveil.device.files import atomic_write_json, sha256_file
from edgeveil.device.manifest import ACCURACY_LOSS_WARNING, accuracy_warning  # noqa: F401 (export API)
from edgeveil.device.manifest import SCHEMA_VERSION, artifact_entry, sent_entry, tensor_entry, validate_manifest
from edgeveil.device.quant import dequantize, tensor_qparams
from edgeveil.device.noise import add_float_noise, add_quantized_noise, check_noise_spec, sent_qparams

from .clip import MODES as CLAMP_MODES
from .clip import clamp_bounds, clamped_head, find_clamps
from .convert import ONNX2TF_SUFFIXES, PRECISIONS, check_normalization, check_precisions, convert, onnx2tf_args
from .convert import TINY_SCALE, tflite_operators, tiny_scales
from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx
from .parity import match_layout, normalize_pixels, parity, prepare_input, quantized_range, read_output

__all__ = ["export_run"]

log = logging.getLogger(__name__)
_CHUNK = 64  # images per interpreter call batch (progress granularity)
_TORCH_BATCH = 256
_TOOLS = {"python": (), "numpy": ("numpy",), "torch": ("torch",), "onnx": ("onnx",), "onnx2tf": ("onnx2tf",),
          "onnxsim": ("onnxsim",), "tensorflow": ("tensorflow", "tensorflow-cpu"),
          "ai-edge-litert": ("ai-edge-litert",), "onnxruntime": ("onnxruntime",)}


class _TestSet(NamedTuple):
    """What every artifact is checked against."""

    x: np.ndarray  # float32 (N, H, W, C), normalized the device's way
    ref: np.ndarray  # float32 (N, *feature_shape), the PyTorch head on x
    y: np.ndarray  # int64 (N,) labels
    tail: object  # nn.Module, eval mode
    n_parity: int  # the first n_parity samples are compared element-wise
    float_accuracy: float  # the tail on ref, with the runtime noise added in float
    noise: dict | None  # the manifest's inference_noise: accuracies are measured as deployed, with it
    seed: int  # seeds the noise draws


def export_run(run_dir: Path, *, precisions=PRECISIONS, calibration_samples: int = 200,
               parity_samples: int = 256, clamp_outliers: str = "auto", progress: bool = True) -> dict:
    """Export the trained head of `run_dir` into run_dir/export/ and return the manifest.

    Calibration: the first `calibration_samples` of a seeded permutation of victim_train (x/255,
    NHWC). Parity: the first `parity_samples` test images; tail accuracy: the whole test split.
    clamp_outliers "auto" clamps activations whose rare outliers would take their whole int8 grid
    (export/clip.py; recorded in the manifest's `activation_clamps`), "none" exports the head as trained.
    """
    run_dir = Path(run_dir)
    precisions = check_precisions(precisions)
    _check_count("calibration_samples", calibration_samples)
    _check_count("parity_samples", parity_samples)
    if clamp_outliers not in CLAMP_MODES:
        raise ValueError(f"clamp_outliers must be one of {', '.join(CLAMP_MODES)}, got {clamp_outliers!r}")
    runtime = find_interpreter()  # before the long work: no interpreter, no export
    from edgeveil.training.runfile import load_run, load_splits

    loaded = load_run(run_dir)  # a garbled run directory raises naming the file: let it surface
    info, splits = loaded.info, load_splits(loaded.info)
    spec = _input_spec(info, run_dir)
    calib, calibration = _calibration(splits.victim_train, calibration_samples, int(info["seed"]), spec)
    if len(splits.test) == 0:
        raise ValueError(f"the test split of {run_dir} is empty: nothing to check the export against")
    clamps = None
    if clamp_outliers == "auto":
        normalized = (calib - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
        clamps = find_clamps(loaded.head, loaded.tail, normalized.transpose(0, 3, 1, 2))
        for c in clamp_bounds({"activation_clamps": clamps}):
            log.warning("activation %s clamped to [%.4g, %.4g]: its rare outliers would take its whole int8 grid "
                        "(export/clip.py)", c["module"] or "(head output)", c["low"], c["high"])
    head = clamped_head(loaded.head, {"activation_clamps": clamps})
    out = run_dir / "export"
    (out / "manifest.json").unlink(missing_ok=True)
    export_onnx(head, spec["chw"], out / "head.onnx")
    started = time.perf_counter()
    paths = convert(out / "head.onnx", calib, spec["mean"], spec["std"], out, precisions, progress=progress)
    seconds = time.perf_counter() - started
    x = normalize_pixels(splits.test.x, spec["mean"], spec["std"])
    ref = _torch_features(head, x)
    _check_feature_shape(info, ref, run_dir)
    noise = check_noise_spec(info.get("inference_noise"), f"{run_dir / 'train' / 'model.json'}: field inference_noise")
    seed = int(info["seed"])
    test = _TestSet(x, ref, splits.test.y, loaded.tail, min(parity_samples, len(x)),
                    _tail_accuracy(loaded.tail, add_float_noise(ref, noise, np.random.default_rng(seed))[0],
                                   splits.test.y), noise, seed)
    artifacts = _evaluate_all(runtime, paths, test, progress)
    _check_noise(noise, artifacts)
    manifest = _manifest(run_dir, info, noise, spec, calibration, artifacts, seconds, precisions,
                         _onnx_entry(out / "head.onnx", x[: test.n_parity], ref[: test.n_parity]), clamps)
    atomic_write_json(out / "manifest.json", validate_manifest(manifest, str(out / "manifest.json")))
    return manifest


# ------------------------------------------------------------------------------- inputs


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _input_spec(info: dict, run_dir: Path) -> dict:
    where = run_dir / "train" / "model.json"
    shape = info["input"]["shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{where}: field input.shape must be [C, H, W], got {shape!r}")
    try:
        mean, std = check_normalization(info["input"]["mean"], info["input"]["std"], shape[0])
    except ValueError as e:
        raise ValueError(f"{where}: field input.mean/input.std: {e}") from None
    return {"chw": tuple(shape), "mean": mean, "std": std}


def _calibration(images, count: int, seed: int, spec: dict) -> tuple[np.ndarray, dict]:
    """The first `count` images of a seeded permutation, as float32 x/255 NHWC, and its record."""
    used = min(count, len(images))
    if used < count:
        log.warning("victim_train has %d images; calibrating on all of them, not %d", used, count)
    idx = np.random.default_rng(seed).permutation(len(images))[:used]
    calib = images.x[idx].astype(np.float32) / np.float32(255.0)
    record = {"count": used, "split": "victim_train", "seed": seed,
              "selection": "first count of numpy.random.default_rng(seed).permutation(len(victim_train))",
              "layout": "NHWC", "pixel_scaling": "x/255", "mean": spec["mean"], "std": spec["std"],
              "sha256": hashlib.sha256(calib.tobytes()).hexdigest()}
    return calib, record


def _check_feature_shape(info: dict, ref: np.ndarray, run_dir: Path) -> None:
    recorded = info.get("feature_shape")
    if recorded is not None and tuple(recorded) != ref.shape[1:]:
        raise ValueError(f"{run_dir / 'train' / 'model.json'}: field feature_shape is {recorded}, "
                         f"but the head outputs {list(ref.shape[1:])}")


# ------------------------------------------------------------------------------- PyTorch side


def _torch_features(head, x_nhwc: np.ndarray) -> np.ndarray:
    """The float head on exactly the device's normalized input: float32 (N, *feature_shape)."""
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x_nhwc), _TORCH_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(x_nhwc[i : i + _TORCH_BATCH].transpose(0, 3, 1, 2)))
            outs.append(head(batch).float().numpy())
    return np.concatenate(outs)


def _tail_accuracy(tail, features: np.ndarray, y: np.ndarray) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(features), _TORCH_BATCH):
            logits = tail(torch.from_numpy(np.ascontiguousarray(features[i : i + _TORCH_BATCH])))
            correct += int((logits.argmax(dim=1).numpy() == y[i : i + _TORCH_BATCH]).sum())
    return correct / len(features)


# ------------------------------------------------------------------------------- TFLite side


def _evaluate_all(runtime, paths: dict, test: _TestSet, progress: bool) -> dict:
    from tqdm.auto import tqdm

    results = {}
    with tqdm(total=len(paths), desc="artifacts", unit="model", disable=not progress) as bar:
        for precision, path in paths.items():
            bar.set_postfix_str(precision)
            results[precision] = _evaluate(runtime, precision, path, test, progress)
            bar.update(1)
    return results


def _evaluate(runtime, precision: str, path: Path, test: _TestSet, progress: bool) -> dict:
    """Run one artifact on the whole test split the device's way; its manifest entry."""
    tiny = tiny_scales(path)
    if tiny:
        log.warning("%s: %d tensor(s) have quantization scales below %g (all zero over the calibration set: "
                    "a dead layer or filter), e.g. %s scale %.3g. XNNPACK refuses or crashes on such models: "
                    "evaluated without it, and the manifest tells the device to run it without XNNPACK.",
                    precision, len(tiny), TINY_SCALE, tiny[0]["tensor"], tiny[0]["min_scale"])
    model = runtime.make(path, xnnpack=not tiny)
    inp, out = model.get_input_details()[0], model.get_output_details()[0]
    raw = _run_all(model, prepare_input(test.x, inp), f"{precision} on test", progress)
    features, layout = match_layout(read_output(raw, out), test.ref.shape[1:])
    sent = _sent_grid(out, test.noise)
    deployed, _ = match_layout(_runtime_noise(raw, out, sent, test), test.ref.shape[1:])
    accuracy = _tail_accuracy(test.tail, deployed, test.y)
    zero_share = _zero_point_share(raw, out)
    warning = accuracy_warning(precision, test.float_accuracy, accuracy, zero_share, tensor_qparams(out)[0])
    if warning:
        log.warning(warning)
    n = test.n_parity
    return artifact_entry(
        file=path.name, precision=precision, sha256=sha256_file(path), bytes=path.stat().st_size,
        inputs=[_tensor(inp)], outputs=[_tensor(out)], sent=sent, operators=tflite_operators(path),
        output_layout=layout,
        parity=parity(test.ref[:n], features[:n], tensor_qparams(out)[0], quantized_range(out)),
        tail_accuracy=accuracy, float_accuracy=test.float_accuracy,
        **({"tail_accuracy_without_noise": _tail_accuracy(test.tail, features, test.y)} if test.noise else {}),
        zero_point_share=zero_share, **({"warnings": [warning]} if warning else {}),
        interpreter={"name": model.runtime, "version": model.version, "resolver": model.resolver,
                     "xnnpack": model.xnnpack},
        **({"xnnpack_safe": False, "tiny_scales": tiny} if tiny else {}))


def _sent_grid(detail: dict, noise: dict | None) -> dict:
    """The grid the device sends this output on (the manifest entry's `sent`): derived here, once;
    the device, the server and the attacks read it from the manifest."""
    scale, zero_point, dtype = tensor_qparams(detail)
    if scale is not None:
        info = np.iinfo(dtype)
        scale, zero_point = sent_qparams(scale, zero_point, int(info.min), int(info.max), noise)
    return sent_entry(scale, zero_point, noise)


def _runtime_noise(raw: np.ndarray, detail: dict, sent: dict, test: _TestSet) -> np.ndarray:
    """The raw output with the device's inference noise, as the runner adds it, as float32 features
    (dequantized on the grid the device sends; parity stays noiseless)."""
    if test.noise is None:
        return read_output(raw, detail)
    rng = np.random.default_rng(test.seed)
    scale, zero_point, _ = tensor_qparams(detail)
    if scale is None:
        return add_float_noise(raw, test.noise, rng)[0]
    noisy = add_quantized_noise(raw, scale, zero_point, test.noise, rng, (sent["scale"], sent["zero_point"]))
    return dequantize(noisy.codes, noisy.scale, noisy.zero_point)


def _zero_point_share(raw: np.ndarray, detail: dict) -> float | None:
    """Share of output codes at the dtype's minimum (ReLU zeros), where noise loses its lower half."""
    if not np.issubdtype(raw.dtype, np.integer):
        return None
    return float((raw == np.iinfo(raw.dtype).min).mean())


def _check_noise(spec: dict | None, artifacts: dict) -> None:
    """Record, per quantized artifact, what the noise becomes after rounding on the grid the device
    sends it on (the entry's `sent`); warn when it is below one output step (rounding erases most of it:
    the float evaluation would overstate it)."""
    if not spec or spec.get("kind") not in ("gaussian", "laplace"):
        return
    from edgeveil.training.defenses.noise import effective_noise_after_rounding

    for precision, entry in artifacts.items():
        out = entry["outputs"][0]
        if not out.get("scale") or entry.get("zero_point_share") is None:
            continue
        scale, sent_scale = float(out["scale"]), entry["sent"]["scale"]
        widened = sent_scale != scale
        # On a widened grid nothing sits at the range's end, so no noise is clipped there.
        eff = effective_noise_after_rounding(float(spec["sigma"]), sent_scale, spec["kind"],
                                             0.0 if widened else entry["zero_point_share"])
        eff.update(sigma_steps=float(spec["sigma"]) / scale, below_one_step=float(spec["sigma"]) < scale,
                   widened=widened)
        entry["noise_after_rounding"] = eff
        if eff["below_one_step"]:
            log.warning("%s: inference noise sigma %.4g is %.2f output steps (step %.4g): rounding erases most of "
                        "it; only %.1f%% of codes change and the effective std is %.4g (%.0f%% of nominal). "
                        "Raise the noise or expect int8 to leak like no defense.", precision, spec["sigma"],
                        eff["sigma_steps"], scale, 100 * eff["changed_fraction"], eff["effective_std"],
                        100 * eff["effective_ratio"])


def _run_all(model, xin: np.ndarray, desc: str, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    outs = []
    with tqdm(total=len(xin), desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for i in range(0, len(xin), _CHUNK):
            outs.append(run_model(model, xin[i : i + _CHUNK]))
            bar.update(len(outs[-1]))
    return np.concatenate(outs)


def _tensor(detail: dict) -> dict:
    scale, zero_point, dtype = tensor_qparams(detail)
    return tensor_entry(detail["name"], detail["shape"], dtype.name, scale, zero_point)


def _onnx_entry(path: Path, x_nhwc: np.ndarray, ref: np.ndarray) -> dict:
    """head.onnx's record, with its parity under onnxruntime (None when onnxruntime is missing)."""
    entry = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "opset": OPSET,
             "input": INPUT_NAME, "output": OUTPUT_NAME, "dynamic_batch": True, "parity": None}
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: head.onnx is not checked against PyTorch")
        return entry
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})[0]
    entry["parity"] = parity(ref, got, None)
    return entry


# ------------------------------------------------------------------------------- manifest


def _manifest(run_dir: Path, info: dict, noise: dict | None, spec: dict, calibration: dict, artifacts: dict,
              seconds: float, precisions: tuple, onnx_entry: dict, clamps: dict | None) -> dict:
    id_from = "int8" if "int8" in artifacts else next(iter(artifacts))
    c, h, w = spec["chw"]
    command = ["onnx2tf", *onnx2tf_args(Path("head.onnx"), Path("<tmp>/out"), Path("<tmp>/calibration.npy"),
                                        INPUT_NAME, spec["mean"], spec["std"], precisions)]
    return {
        "schema": SCHEMA_VERSION,
        "model_id": artifacts[id_from]["model_id"],
        "model_id_from": id_from,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": _source(run_dir, info),
        "tools": _tool_versions(),
        "onnx": onnx_entry,
        "converter": {"tool": "onnx2tf", "command": command, "quantization": "per-channel",
                      "seconds": round(seconds, 2), "log": "onnx2tf.log",
                      "files": {p: f"head_{ONNX2TF_SUFFIXES[p]}.tflite" for p in precisions}},
        "calibration": calibration,
        "input_spec": {"shape": [1, h, w, c], "layout": "NHWC", "dtype": "uint8", "pixel_scaling": "x/255",
                       "mean": spec["mean"], "std": spec["std"], "normalization": "(x/255 - mean) / std",
                       "quantization_rounding": "reference"},
        "feature_shape": list(info["feature_shape"]),
        "evaluation": {"test_split": "test", "parity_samples": next(iter(artifacts.values()))["parity"]["n"],
                       "interpreter_defaults": "XNNPACK on, default threads"},
        "inference_noise": noise,
        "activation_clamps": clamps,
        "artifacts": artifacts,
    }


def _source(run_dir: Path, info: dict) -> dict:
    train = run_dir / "train"
    return {"run": run_dir.name, "arch": info["arch"], "split": info["split"], "width": info.get("width"),
            "defense": info["defense"], "num_classes": info["num_classes"],
            "model_json_sha256": sha256_file(train / "model.json"),
            "head_pt_sha256": sha256_file(train / "head.pt")}


def _tool_versions() -> dict:
    versions = {}
    for tool, dists in _TOOLS.items():
        versions[tool] = platform.python_version() if tool == "python" else _dist_version(dists)
    return versions


def _dist_version(dists: tuple[str, ...]) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
