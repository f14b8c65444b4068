"""The export stage: ONNX export, onnx2tf conversion, parity, the manifest, and the device shims.

Converter tests (marker `convert`) run the real onnx2tf and the real ai-edge-litert interpreter on
tiny heads, once per module. Nothing here needs the network: the 3-channel head is converted with
every proxy pointing at a closed port.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeveil.device import manifest as mf
from edgeveil.device.files import atomic_write_json, sha256_file
from edgeveil.device.interpreter import InterpreterError, Runtime, find_interpreter, run
from edgeveil.device.quant import dequantize, quantize, round_half_away, tensor_qparams
from edgeveil.export import ExportError, PRECISIONS, convert, export_onnx, load_onnx_checked, parity
from edgeveil.export.convert import tflite_operators, tflite_problems
from edgeveil.export.parity import match_layout, prepare_input, read_output

torch = pytest.importorskip("torch")
nn = torch.nn

BUILTINS = {"CONV_2D", "DEPTHWISE_CONV_2D", "PAD", "ADD", "MAX_POOL_2D", "QUANTIZE", "DEQUANTIZE"}
MEAN, STD = [0.5], [0.25]


# ------------------------------------------------------------------------------- helpers


def tiny_head(cin: int = 1, seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU x2 (cin -> 4 -> 8, second conv stride 2) with non-trivial BN statistics."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    for bn in (head[1], head[4]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias, 0.0, 0.1)
    head.train()
    with torch.no_grad():
        for _ in range(20):
            head((torch.rand(32, cin, 16, 16) - 0.5) / 0.25)
    return head.eval()


class OneOp(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = nn.Conv2d(1, 4, 3, padding=1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


def pixels(n: int, cin: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 16, 16, cin), dtype=np.float32)


def features(path: Path, x_norm: np.ndarray, feature_shape, **make) -> np.ndarray:
    """Run one artifact the device's way: quantize input, run, dequantize, back to NCHW."""
    model = find_interpreter().make(path, **make)
    inp, out = model.get_input_details()[0], model.get_output_details()[0]
    return match_layout(read_output(run(model, prepare_input(x_norm, inp)), out), feature_shape)[0]


def torch_features(head, x_norm: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(x_norm.transpose(0, 3, 1, 2)))).numpy()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _convert_head(folder: Path, cin: int, precisions=PRECISIONS) -> SimpleNamespace:
    head = tiny_head(cin)
    export_onnx(head, (cin, 16, 16), folder / "head.onnx")
    calib = pixels(64, cin, seed=1)
    started = time.perf_counter()
    paths = convert(folder / "head.onnx", calib, MEAN * cin, STD * cin, folder, precisions)
    x = (pixels(48, cin, seed=2) - 0.5) / 0.25  # a different seed from calibration
    return SimpleNamespace(head=head, paths=paths, dir=folder, seconds=time.perf_counter() - started,
                           x=x, ref=torch_features(head, x), calib=(calib - 0.5) / 0.25)


@pytest.fixture(scope="module")
def gray(tmp_path_factory) -> SimpleNamespace:
    return _convert_head(tmp_path_factory.mktemp("gray"), cin=1)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> SimpleNamespace:
    """A 3-channel head, converted with the network unusable (onnx2tf's download uses requests)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.setenv(var, "http://127.0.0.1:9")
        for var in ("NO_PROXY", "no_proxy"):
            mp.delenv(var, raising=False)
        return _convert_head(tmp_path_factory.mktemp("rgb"), cin=3, precisions=("fp32", "int8"))


@pytest.fixture(scope="module")
def tf_models(tmp_path_factory) -> Path:
    """TFLite models made by TensorFlow's own converter, in a subprocess: a float-I/O int8
    QUANTIZE -> MAX_POOL_2D -> DEQUANTIZE probe, a Flex-op model and a custom-op model."""
    out = tmp_path_factory.mktemp("tf_models")
    script = textwrap.dedent('''
        import sys, numpy as np, tensorflow as tf
        out = sys.argv[1]
        def save(fn, spec, name, setup):
            f = tf.function(fn, input_signature=[spec])
            c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
            setup(c)
            open(f"{out}/{name}.tflite", "wb").write(c.convert())
        def rep():
            for i in range(8):
                yield [np.random.default_rng(i).uniform(-1, 1, (1, 64, 64, 1)).astype(np.float32)]
        def int8(c):
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            c.representative_dataset = rep
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        def flex(c):
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        def custom(c):
            c.allow_custom_ops = True
        save(lambda x: tf.nn.max_pool2d(x, 1, 1, "VALID"), tf.TensorSpec([1, 64, 64, 1]), "probe", int8)
        save(tf.linalg.det, tf.TensorSpec([1, 4, 4]), "flex", flex)
        save(tf.math.asin, tf.TensorSpec([1, 4]), "custom", custom)
    ''')
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# ------------------------------------------------------------------------------- conversion


@pytest.mark.convert
def test_convert_writes_every_precision_and_nothing_else(gray):
    assert set(gray.paths) == set(PRECISIONS)
    for precision, path in gray.paths.items():
        assert path == gray.dir / f"head_{precision}.tflite" and path.stat().st_size > 0
    assert (gray.dir / "onnx2tf.log").is_file()
    assert leftovers(gray.dir) == []  # the temp conversion folder is gone
    assert gray.seconds < 120


@pytest.mark.convert
def test_fp32_matches_pytorch(gray):
    got = features(gray.paths["fp32"], gray.x, gray.ref.shape[1:])
    result = parity(gray.ref, got, None)
    assert result["max_abs_err"] < 1e-4 and result["max_err_steps"] is None
    assert result["cosine"] > 0.999999


@pytest.mark.convert
def test_int8_is_within_a_few_output_steps(gray):
    """On the calibration images no tensor leaves its calibrated range: a few steps at most.
    Held-out images may exceed a hidden layer's range (the first conv's, for this head), which
    clips there; they are held to cosine and mean error."""
    from edgeveil.export.parity import quantized_range

    out = find_interpreter().make(gray.paths["int8"]).get_output_details()[0]
    scale, out_range = tensor_qparams(out)[0], quantized_range(out)
    ref = torch_features(gray.head, gray.calib)
    seen = parity(ref, features(gray.paths["int8"], gray.calib, ref.shape[1:]), scale, out_range)
    assert seen["max_err_steps"] <= 4.0 and seen["saturated"] == 0, seen
    held_out = parity(gray.ref, features(gray.paths["int8"], gray.x, gray.ref.shape[1:]), scale, out_range)
    assert held_out["cosine"] > 0.99 and held_out["mean_err_steps"] < 1.0, held_out


@pytest.mark.convert
def test_int8_model_has_int8_io_and_per_channel_weights(gray):
    model = find_interpreter().make(gray.paths["int8"])
    (inp,), (out,) = model.get_input_details(), model.get_output_details()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert list(inp["shape"]) == [1, 16, 16, 1] and list(out["shape"]) == [1, 8, 8, 8]
    filters = [t for t in model.get_tensor_details() if t["dtype"] == np.int8 and len(t["shape"]) == 4
               and t["index"] not in (inp["index"], out["index"]) and t["shape"][0] in (4, 8)
               and len(t["quantization_parameters"]["scales"]) > 1]
    assert len(filters) == 2  # both conv weights: one scale per output channel
    assert all(len(t["quantization_parameters"]["scales"]) == t["shape"][0] for t in filters)
    i16 = find_interpreter().make(gray.paths["int16x8"])
    assert i16.get_input_details()[0]["dtype"] == np.int16 and i16.get_output_details()[0]["dtype"] == np.int16


@pytest.mark.convert
def test_calibration_mean_and_std_reach_onnx2tf(gray):
    """Calibration pixels in 0..1 normalized with mean 0.5, std 0.25 span [-2, 2]: scale ~ 4/255."""
    scale, zero_point, _ = tensor_qparams(find_interpreter().make(gray.paths["int8"]).get_input_details()[0])
    assert scale == pytest.approx(4 / 255, rel=0.02)
    assert abs(zero_point) <= 2


@pytest.mark.convert
def test_every_artifact_uses_builtin_operators_only(gray):
    for precision, path in gray.paths.items():
        ops = tflite_operators(path)
        assert "CONV_2D" in ops and set(ops) <= BUILTINS, (precision, ops)
        assert tflite_problems(path, precision) == []


@pytest.mark.convert
def test_three_channel_head_converts_offline_with_our_calibration(rgb):
    assert set(rgb.paths) == {"fp32", "int8"}
    assert not list(rgb.dir.glob("head_fp16*")) and leftovers(rgb.dir) == []
    log = (rgb.dir / "onnx2tf.log").read_text()
    assert "calibration_image_sample_data" not in log and "-cind" in log.splitlines()[0]
    got = features(rgb.paths["int8"], rgb.x, rgb.ref.shape[1:])
    assert parity(rgb.ref, got, None)["cosine"] > 0.99
    scale, _, _ = tensor_qparams(find_interpreter().make(rgb.paths["int8"]).get_input_details()[0])
    assert scale == pytest.approx(4 / 255, rel=0.02)  # our mean/std, not ImageNet's


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("keep", [0.5, 0.9, -3])
def test_truncated_onnx_is_refused_naming_the_file(tmp_path, keep):
    good = tmp_path / "good.onnx"
    export_onnx(tiny_head(), (1, 16, 16), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    with pytest.raises(ExportError, match="bad.onnx") as info:
        load_onnx_checked(bad)
    assert "truncated or corrupted" in str(info.value)
    with pytest.raises(ExportError, match="bad.onnx"):
        convert(bad, pixels(4, 1, 0), MEAN, STD, tmp_path / "out")
    assert not (tmp_path / "out" / "onnx2tf.log").exists()
    assert load_onnx_checked(good).graph.input[0].name == "input"


def test_export_onnx_is_dynamic_batch_and_atomic(tmp_path):
    path = tmp_path / "head.onnx"
    export_onnx(tiny_head(), (1, 16, 16), path)
    dims = load_onnx_checked(path).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 16, 16]
    assert load_onnx_checked(path).graph.output[0].name == "features"
    assert leftovers(tmp_path) == [] and path.stat().st_mode & 0o777 == 0o666 & ~_umask()


@pytest.mark.parametrize("calib, message", [
    (np.zeros((8, 1, 16, 16), np.float32), r"expected \(N, H, W, C\) = \(N, 16, 16, 1\).*looks NCHW"),
    (np.zeros((8, 16, 16, 3), np.float32), r"has shape \(8, 16, 16, 3\), expected .* \(N, 16, 16, 1\)"),
    (np.zeros((8, 16, 16), np.float32), r"expected \(N, H, W, C\) = \(N, 16, 16, 1\)"),
    (np.full((8, 16, 16, 1), 255, np.uint8), "dtype uint8"),
    (np.full((8, 16, 16, 1), 3.0, np.float32), r"0\.\.1"),
    (np.full((8, 16, 16, 1), np.nan, np.float32), "NaN"),
])
def test_bad_calibration_is_refused_before_onnx2tf_starts(tmp_path, monkeypatch, calib, message):
    export_onnx(tiny_head(), (1, 16, 16), tmp_path / "head.onnx")

    def no_popen(*args, **kwargs):
        raise AssertionError("onnx2tf was started")

    # the package's `convert` attribute is the function, so reach the module through sys.modules
    monkeypatch.setattr(sys.modules["edgeveil.export.convert"].subprocess, "Popen", no_popen)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "head.onnx", calib, MEAN, STD, tmp_path / "out")
    with pytest.raises(ValueError, match="one per channel"):
        convert(tmp_path / "head.onnx", pixels(4, 1, 0), [0.5, 0.5], STD, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_op_torch_cannot_export_is_named(tmp_path):
    with pytest.raises(ExportError, match="aten::cumprod"):
        export_onnx(OneOp(lambda y: y.cumprod(1)).eval(), (1, 16, 16), tmp_path / "head.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.convert
def test_op_with_no_tflite_kernel_is_named_and_leaves_no_artifacts(tmp_path):
    export_onnx(OneOp(lambda y: torch.asin(torch.tanh(y))).eval(), (1, 16, 16), tmp_path / "head.onnx")
    with pytest.raises(ExportError, match=r"onnx2tf could not convert head\.onnx.*Asin") as info:
        convert(tmp_path / "head.onnx", pixels(16, 1, 0), MEAN, STD, tmp_path)
    assert "last lines of" in str(info.value) and 'File "' not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.onnx", "onnx2tf.log"]


@pytest.mark.convert
def test_int8_model_with_a_float_op_is_refused(tmp_path):
    """onnx2tf converts fmod (FLOOR_MOD) but cannot quantize it: every problem is listed."""
    export_onnx(OneOp(lambda y: torch.fmod(y, 0.3)).eval(), (1, 16, 16), tmp_path / "head.onnx")
    with pytest.raises(ExportError) as info:
        convert(tmp_path / "head.onnx", pixels(16, 1, 0), MEAN, STD, tmp_path, ("fp32", "int8", "int16x8"))
    message = str(info.value)
    assert "int8: not fully integer: FLOOR_MOD" in message
    assert "int16x8: onnx2tf did not write it" in message
    assert not list(tmp_path.glob("*.tflite"))


@pytest.mark.convert
def test_flex_and_custom_ops_are_named(tf_models):
    assert tflite_operators(tf_models / "flex.tflite") == ["FlexMatrixDeterminant"]
    assert any("FlexMatrixDeterminant is not a TFLite builtin" in p
               for p in tflite_problems(tf_models / "flex.tflite", "fp32"))
    assert any(p.startswith("Asin is not a TFLite builtin") for p in tflite_problems(tf_models / "custom.tflite", "fp32"))
    with pytest.raises(InterpreterError, match="flex.tflite"):
        find_interpreter().make(tf_models / "flex.tflite")


def test_not_a_tflite_file_is_refused(tmp_path):
    (tmp_path / "x.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(ExportError, match="x.tflite"):
        tflite_operators(tmp_path / "x.tflite")


# ------------------------------------------------------------------------------- quantization


def test_quantize_round_trip_and_saturation():
    x = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)
    scale, zero_point = 2.0 / 255, -1
    q = quantize(x, scale, zero_point, np.int8)
    assert q.dtype == np.int8
    assert np.abs(dequantize(q, scale, zero_point) - x).max() <= scale / 2 + 1e-7
    assert quantize(np.array([-50.0, 50.0]), scale, zero_point, np.int8).tolist() == [-128, 127]
    assert quantize(np.array([1.0]), 1 / 1000, 0, np.int16).tolist() == [1000]
    with pytest.raises(ValueError, match="scale"):
        quantize(x, 0.0, 0, np.int8)
    with pytest.raises(TypeError, match="integer dtype"):
        quantize(x, scale, 0, np.float32)


def test_rounding_modes_differ_only_on_ties():
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    assert round_half_away(ties).tolist() == [1, 2, 3, -1, -2]
    assert quantize(ties, 1.0, 0, np.int8).tolist() == [1, 2, 3, -1, -2]
    assert quantize(ties, 1.0, 0, np.int8, rounding="optimized").tolist() == [0, 2, 2, 0, -2]
    with pytest.raises(ValueError, match="rounding"):
        quantize(ties, 1.0, 0, np.int8, rounding="nearest")


@pytest.mark.convert
@pytest.mark.parametrize("make, rounding", [
    ({"reference_kernels": True}, "reference"),
    ({"xnnpack": False}, "optimized"),
    ({}, "optimized"),
])
def test_quantize_matches_the_interpreters_quantize_op(tf_models, make, rounding):
    """Values on and next to x/scale = k + 0.5, through QUANTIZE -> MAX_POOL -> DEQUANTIZE."""
    model = find_interpreter().make(tf_models / "probe.tflite", **make)
    assert model.xnnpack == (make == {})
    quant_out = model._get_ops_details()[0]["outputs"][0]
    scale, zero_point = model._get_tensor_details(quant_out, 0)["quantization"]
    rng = np.random.default_rng(1)
    k = rng.integers(-140, 140, 4096).astype(np.float32)
    jitter = rng.integers(-3, 4, 4096).astype(np.float32) * np.float32(2**-20)
    x = ((k + np.float32(0.5) + jitter) * np.float32(scale)).astype(np.float32)
    model.set_tensor(model.get_input_details()[0]["index"], x.reshape(1, 64, 64, 1))
    model.invoke()
    y = model.get_tensor(model.get_output_details()[0]["index"]).reshape(-1)
    got = np.round(y.astype(np.float64) / np.float32(scale)).astype(np.int64) + zero_point
    ties = (x / np.float32(scale)) % 1 == 0.5
    assert ties.sum() > 1000  # the check can tell the rounding modes apart
    other = {"reference": "optimized", "optimized": "reference"}[rounding]
    np.testing.assert_array_equal(quantize(x, scale, zero_point, np.int8, rounding=rounding), got)
    assert (quantize(x, scale, zero_point, np.int8, rounding=other) != got).sum() > 100


def test_tensor_qparams_reads_interpreter_details():
    detail = {"name": "t", "dtype": np.int8, "quantization": (0.5, -3),
              "quantization_parameters": {"scales": np.array([0.5], np.float32),
                                          "zero_points": np.array([-3]), "quantized_dimension": 0}}
    assert tensor_qparams(detail) == (0.5, -3, np.dtype(np.int8))
    flt = {"name": "f", "dtype": np.float32, "quantization": (0.0, 0),
           "quantization_parameters": {"scales": np.array([]), "zero_points": np.array([])}}
    assert tensor_qparams(flt) == (None, None, np.dtype(np.float32))
    per_channel = dict(detail, quantization_parameters={"scales": np.ones(4), "zero_points": np.zeros(4)})
    with pytest.raises(ValueError, match="per channel"):
        tensor_qparams(per_channel)


# ------------------------------------------------------------------------------- parity


def test_parity_numbers():
    ref = np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32)
    same = parity(ref, ref.copy(), None)
    assert same["max_abs_err"] == 0 and same["cosine"] == pytest.approx(1.0) and same["rel_l2"] == 0
    off = ref.copy()
    off[0, 0, 0, 0] += 0.3
    result = parity(ref, off, 0.1, out_range=(-100.0, 100.0))
    assert result["max_abs_err"] == pytest.approx(0.3, abs=1e-6)
    assert result["max_err_steps"] == pytest.approx(3.0, abs=1e-4)
    assert result["saturated"] == 0 and result["n"] == 4
    assert parity(ref, np.clip(ref, -1, 1), 0.01, out_range=(-1.0, 1.0))["max_err_steps_unsaturated"] == 0
    with pytest.raises(ValueError, match="same shape"):
        parity(ref, ref[:2], None)


def test_match_layout():
    nchw = np.arange(2 * 8 * 4 * 5, dtype=np.float32).reshape(2, 8, 4, 5)
    back, layout = match_layout(np.ascontiguousarray(nchw.transpose(0, 2, 3, 1)), (8, 4, 5))
    assert layout == "NHWC" and np.array_equal(back, nchw)
    assert match_layout(nchw, (8, 4, 5))[1] == "NCHW"
    assert match_layout(np.zeros((2, 10)), (10,))[1] == "same"
    with pytest.raises(ValueError, match="feature shape"):
        match_layout(nchw, (3, 4, 5))


# ------------------------------------------------------------------------------- interpreter shim


@pytest.mark.convert
def test_interpreter_shim_reports_xnnpack(gray):
    runtime = find_interpreter()
    assert runtime.name == "ai_edge_litert" and runtime.version[0].isdigit()
    for precision in ("fp32", "int8"):
        assert runtime.make(gray.paths[precision]).xnnpack is True
        off = runtime.make(gray.paths[precision], xnnpack=False)
        assert off.xnnpack is False and off.resolver == "builtin_without_default_delegates"
        ref = runtime.make(gray.paths[precision].read_bytes(), reference_kernels=True, num_threads=1)
        assert ref.xnnpack is False and ref.resolver == "builtin_ref"
    assert runtime.make(gray.paths["int16x8"]).xnnpack is False  # XNNPACK has no int16x8 kernels


@pytest.mark.convert
def test_run_checks_shape_and_dtype(gray):
    model = find_interpreter().make(gray.paths["int8"])
    with pytest.raises(ValueError, match=r"dtype float32, expected int8.*quantize"):
        run(model, np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 16, 16, 3\), expected \(N, 16, 16, 1\)"):
        run(model, np.zeros((2, 16, 16, 3), np.int8))
    assert run(model, np.zeros((3, 16, 16, 1), np.int8)).shape == (3, 8, 8, 8)


@pytest.mark.convert
def test_an_injected_interpreter_class_is_used(gray):
    from ai_edge_litert.interpreter import Interpreter

    class Counting(Interpreter):
        calls = 0

        def invoke(self):
            type(self).calls += 1
            return super().invoke()

    runtime = Runtime.custom(Counting, name="counting")
    model = runtime.make(gray.paths["fp32"], xnnpack=False)
    assert model.runtime == "counting" and model.xnnpack is False
    run(model, np.zeros((5, 16, 16, 1), np.float32))
    assert Counting.calls == 5


@pytest.mark.convert
def test_tensorflow_lite_fallback(gray):
    """The last runtime in the list, in a subprocess so TensorFlow stays out of this one."""
    code = textwrap.dedent(f'''
        import numpy as np
        from edgeveil.device.interpreter import find_interpreter, run
        rt = find_interpreter("tensorflow")
        flags = [rt.make({str(gray.paths["int8"])!r}, **kw).xnnpack
                 for kw in ({{}}, {{"xnnpack": False}}, {{"reference_kernels": True}})]
        out = run(rt.make({str(gray.paths["int8"])!r}), np.zeros((2, 16, 16, 1), np.int8))
        print(rt.name, flags, out.shape)
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "tensorflow [True, False, False] (2, 8, 8, 8)", done.stderr[-2000:]


def test_find_interpreter_errors():
    with pytest.raises(ValueError, match="unknown interpreter 'tvm'"):
        find_interpreter("tvm")
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"edgeveil\[device\]"):
            find_interpreter("tflite_runtime")


def test_device_and_export_imports_stay_light():
    code = ("import sys, edgeveil.device.interpreter, edgeveil.device.quant, edgeveil.device.manifest, "
            "edgeveil.export; heavy = [m for m in ('torch', 'tensorflow', 'onnx', 'onnx2tf', "
            "'ai_edge_litert') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------------- manifest


def _tensor(dtype="int8", scale=0.1, zero_point=0):
    return mf.tensor_entry("x", [1, 16, 16, 1], dtype, scale, zero_point)


def _manifest() -> dict:
    entry = mf.artifact_entry(file="head_int8.tflite", precision="int8", sha256="a" * 64, bytes=100,
                              inputs=[_tensor()], outputs=[_tensor()], sent=mf.sent_entry(0.1, 0, None),
                              operators=["CONV_2D"])
    spec = {"shape": [1, 16, 16, 1], "layout": "NHWC", "dtype": "uint8", "pixel_scaling": "x/255",
            "mean": [0.5], "std": [0.25]}
    return {"schema": mf.SCHEMA_VERSION, "model_id": "a" * 16, "source": {}, "tools": {}, "onnx": {},
            "converter": {}, "calibration": {}, "input_spec": spec, "inference_noise": None,
            "artifacts": {"int8": entry}}


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("model_id"), "field model_id is missing"),
    (lambda m: m.update(schema="edgeveil.manifest/0"), "field schema is 'edgeveil.manifest/0'"),
    (lambda m: m.update(schema="edgeveil.manifest/1"),
     r"field schema is 'edgeveil.manifest/1', this edgeveil reads 'edgeveil.manifest/2': re-run `edgeveil export"),
    (lambda m: m["artifacts"]["int8"].update(model_id="b" * 16), "field artifacts.int8.model_id must be the first 16"),
    (lambda m: m["artifacts"]["int8"].pop("sent"), "field artifacts.int8.sent is missing"),
    (lambda m: m["artifacts"]["int8"]["sent"].update(zero_point=None), "field artifacts.int8.sent.zero_point"),
    (lambda m: m.update(inference_noise={"kind": "gaussian", "sigma": 0.2}),
     r"field artifacts.int8.sent.noise is None, but inference_noise is .*re-run `edgeveil export"),
    (lambda m: m["artifacts"]["int8"].pop("outputs"), "field artifacts.int8.outputs is missing"),
    (lambda m: m["artifacts"]["int8"].update(sha256="xyz"), "field artifacts.int8.sha256"),
    (lambda m: m["artifacts"]["int8"].update(file="../x.tflite"), "field artifacts.int8.file"),
    (lambda m: m["artifacts"]["int8"]["inputs"][0].pop("scale"), r"field artifacts.int8.inputs\[0\].scale"),
    (lambda m: m["artifacts"]["int8"].update(bytes="100"), "field artifacts.int8.bytes must be a integer"),
    (lambda m: m["input_spec"].pop("mean"), "field input_spec.mean is missing"),
    (lambda m: m.pop("inference_noise"), "field inference_noise is missing"),
])
def test_read_manifest_names_the_file_and_field(tmp_path, edit, field):
    path = tmp_path / "manifest.json"
    good = _manifest()
    atomic_write_json(path, good)
    assert mf.read_manifest(path) == good
    bad = json.loads(path.read_text())
    edit(bad)
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=field) as info:
        mf.read_manifest(path)
    assert str(path) in str(info.value)


def test_manifest_files(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        mf.read_manifest(path)
    with pytest.raises(ValueError, match="not found"):
        mf.read_manifest(tmp_path / "missing.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------- export_run


def _trained_run(root: Path) -> Path:
    """A real run directory (the training stage's own writer), with a quickly fitted tail."""
    runfile = pytest.importorskip("edgeveil.training.runfile")
    from edgeveil.training.data import to_tensors

    info = {"arch": "smallcnn", "split": 2, "width": "tiny", "arch_options": {}, "num_classes": 10,
            "input": {"shape": [1, 28, 28], "mean": [0.3], "std": [0.32]},
            "defense": {"name": "none", "strength": 0.0, "options": {}},
            "inference_noise": {"kind": "gaussian", "sigma": 0.1}, "seed": 0,
            "data": {"name": "digits", "root": None, "download": False, "image_size": 28,
                     "sizes": {"victim_train": None, "aux": None, "test_size": None, "labelled": 40}}}
    torch.manual_seed(0)  # before the weights are drawn: the fixture must not depend on the tests run before it
    model = runfile.build_models(info)
    x, y = to_tensors(runfile.load_splits(info).victim_train, [0.3], [0.32])
    params = list(model.head.parameters()) + list(model.tail.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    model.head.train(), model.tail.train()
    for step in range(150):
        idx = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(model.tail(model.head(x[idx])), y[idx])
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    model.head.eval(), model.tail.eval()
    with torch.no_grad():
        info["feature_shape"] = list(model.head(x[:1]).shape[1:])
    runfile.save_trained(root / "train", info, model.head, model.tail)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    from edgeveil.export import export_run

    run_dir = _trained_run(tmp_path_factory.mktemp("runs") / "digits")
    return run_dir, export_run(run_dir, precisions=("fp32", "int8"), calibration_samples=100,
                               parity_samples=64, progress=False)


@pytest.mark.convert
def test_export_run_writes_the_manifest(exported):
    run_dir, manifest = exported
    out = run_dir / "export"
    assert mf.read_manifest(out / "manifest.json") == manifest
    assert sorted(p.name for p in out.iterdir()) == ["head.onnx", "head_fp32.tflite", "head_int8.tflite",
                                                     "manifest.json", "onnx2tf.log"]
    assert manifest["model_id"] == sha256_file(out / "head_int8.tflite")[:16]
    assert manifest["source"]["head_pt_sha256"] == sha256_file(run_dir / "train" / "head.pt")
    assert manifest["onnx"]["sha256"] == sha256_file(out / "head.onnx")
    assert manifest["inference_noise"] == {"kind": "gaussian", "sigma": 0.1}
    assert manifest["input_spec"]["shape"] == [1, 28, 28, 1] and manifest["input_spec"]["mean"] == [0.3]
    assert manifest["calibration"]["count"] == 100 and manifest["calibration"]["layout"] == "NHWC"
    assert manifest["converter"]["command"][0] == "onnx2tf" and "-cind" in manifest["converter"]["command"]
    assert manifest["tools"]["onnx2tf"] and manifest["tools"]["ai-edge-litert"]
    assert mf.artifact_path(out / "manifest.json", "int8", manifest) == out / "head_int8.tflite"
    tampered = json.loads(json.dumps(manifest))
    tampered["artifacts"]["int8"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="artifacts.int8.sha256"):
        mf.artifact_path(out / "manifest.json", "int8", tampered)


@pytest.mark.convert
def test_export_run_artifacts_match_pytorch(exported):
    _, manifest = exported
    fp32, int8 = manifest["artifacts"]["fp32"], manifest["artifacts"]["int8"]
    assert fp32["parity"]["max_abs_err"] < 1e-4 and fp32["parity"]["n"] == 64
    assert int8["parity"]["cosine"] > 0.99 and int8["parity"]["max_err_steps"] < 10
    assert int8["inputs"][0]["dtype"] == "int8" and int8["outputs"][0]["scale"] > 0
    assert set(int8["operators"]) <= BUILTINS and int8["output_layout"] == "NHWC"
    assert int8["float_accuracy"] > 0.5  # the quickly fitted tail learned something
    # Same seed, but the fp32 artifact's noise is drawn in NHWC and PyTorch's in NCHW: two independent
    # draws of sigma 0.1, which move a few of the 359 test images across the boundary.
    assert fp32["tail_accuracy"] == pytest.approx(fp32["float_accuracy"], abs=0.02)
    assert int8["tail_accuracy"] == pytest.approx(int8["float_accuracy"], abs=0.05)
    assert int8["interpreter"]["xnnpack"] is True


@pytest.mark.convert
def test_device_and_server_use_the_sent_grid_the_manifest_records(exported, tmp_path):
    """Export derives the grid noisy codes travel on, once, into the manifest; the device sends its
    codes on it and the server dequantizes received frames with it, and both agree."""
    import shutil

    from edgeveil.cloud_sim.server import Server
    from edgeveil.cloud_sim.store import read_store
    from edgeveil.device import wire
    from edgeveil.device.client import CloudClient, CloudError
    from edgeveil.device.interpreter import run as run_model
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits

    run_dir, manifest = exported
    entry = manifest["artifacts"]["int8"]
    sent, out = entry["sent"], entry["outputs"][0]
    assert sent["noise"] == manifest["inference_noise"] and entry["model_id"] == manifest["model_id"]
    assert sent["scale"] > out["scale"]  # sigma 0.1 is more than an output step: the grid is widened
    run = tmp_path / "run"
    for part in ("train", "export"):
        shutil.copytree(run_dir / part, run / part)

    runner = HeadRunner(run / "export", "int8", noise_seed=0)
    images = load_splits(load_run(run).info).test.x[:8]
    feats = runner.run(images)
    assert runner.model_id == entry["model_id"]
    assert (feats.scale, feats.zero_point) == (sent["scale"], sent["zero_point"])
    clean = dequantize(run_model(runner.loaded, runner.preprocess(images)), out["scale"], out["zero_point"])
    noise = feats.dequantized().astype(np.float64) - clean  # the codes read on the sent grid: clean + noise
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(np.hypot(0.1, sent["scale"] / 12 ** 0.5),
                                                                      rel=0.05)

    key = bytes(range(32))
    with Server(run, keys={"dev": key}) as srv:
        client = CloudClient(srv.base_url, timeout=10.0, retries=1)
        models = {m["precision"]: m["output"] for m in client.models()["models"]}
        assert (models["int8"]["scale"], models["int8"]["zero_point"]) == (sent["scale"], sent["zero_point"])
        replies = [client.infer(wire.encode(feats.values[i:i + 1], key=key, device_id="dev",
                                            model_id=runner.model_id, scale=feats.scale,
                                            zero_point=feats.zero_point)) for i in range(len(images))]
        with pytest.raises(CloudError) as own_grid:  # the tensor's own grid is not what this device sends
            client.infer(wire.encode(feats.values[:1], key=key, device_id="dev", model_id=runner.model_id,
                                     scale=out["scale"], zero_point=out["zero_point"]))
    assert own_grid.value.status == 422 and "scale" in own_grid.value.reason
    received = np.concatenate([f.dequantized() for f in read_store(run, {"dev": key})])
    np.testing.assert_array_equal(received, feats.dequantized())  # what the server completes on
    with torch.no_grad():
        offline = torch.softmax(load_run(run).tail(torch.from_numpy(feats.to_nchw())), dim=1).numpy()
    np.testing.assert_allclose([r["probabilities"][0] for r in replies], offline, rtol=0, atol=1e-5)


@pytest.mark.convert
@pytest.mark.parametrize("damage, error, name", [
    (lambda t: (t / "model.json").write_text("{garbled"), ValueError, "model.json"),
    (lambda t: (t / "head.pt").write_bytes((t / "head.pt").read_bytes()[:100]), ValueError, "head.pt"),
    (lambda t: (t / "head.pt").unlink(), FileNotFoundError, "head.pt"),
])
def test_export_run_refuses_a_damaged_run(exported, tmp_path, damage, error, name):
    import shutil

    from edgeveil.export import export_run

    run_dir = tmp_path / "copy"
    shutil.copytree(exported[0] / "train", run_dir / "train")
    damage(run_dir / "train")
    with pytest.raises(error, match=name):
        export_run(run_dir, progress=False)
    assert not (run_dir / "export").exists()


def test_an_artifact_that_costs_the_tail_accuracy_is_flagged_in_the_manifest_and_the_report(tmp_path):
    from edgeveil.export.run import ACCURACY_LOSS_WARNING, accuracy_warning
    from edgeveil.pipeline.report import _section_export

    assert accuracy_warning("int8", 0.842, 0.842 - ACCURACY_LOSS_WARNING + 0.001, 0.5, 0.1) is None
    assert accuracy_warning("int8", None, 0.2, None, None) is None  # no float accuracy to compare with
    warning = accuracy_warning("int8", 0.842, 0.220, 0.983, 1.98)
    assert "0.220 against 0.842" in warning and "62.2 points lost" in warning and "98.3%" in warning
    # the report shows what the manifest carries (this manifest: CIFAR-10 siftfunnel, committed state)
    source = Path(__file__).resolve().parents[1] / "benchmarks" / "state" / "cifar10" / "siftfunnel" / "export" / "manifest.json"
    if not source.is_file():
        pytest.skip("the committed CIFAR-10 state has no siftfunnel export")
    manifest = json.loads(source.read_text())
    manifest["artifacts"]["int8"]["warnings"] = [warning]
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    assert f"**Warning:** {warning}" in "\n".join(_section_export(tmp_path))
    # this head's export clamped the outliers of its residual branch (export/clip.py): the report names them
    assert "**Activations clamped**" in "\n".join(_section_export(tmp_path))
    assert "layer1.1.conv2.bn to [" in "\n".join(_section_export(tmp_path))
    # and the sweep report, over a folder holding that run
    from edgeveil.pipeline.sweep import write_sweep_report

    run = tmp_path / "sweep" / "siftfunnel"
    (run / "train").mkdir(parents=True)
    for name in ("config.yaml", "train/model.json", "train/metrics.json"):
        (run / name).write_bytes((source.parents[1] / name).read_bytes())
    shutil.copytree(tmp_path / "export", run / "export")
    md, _ = write_sweep_report(tmp_path / "sweep")
    assert f"**Warning, siftfunnel:** {warning}" in md.read_text()
    assert "**Activations clamped, siftfunnel:** layer1.1.conv2.bn to [" in md.read_text()
