"""TFLite Micro through its real Python runtime: the arena search against the runtime itself, bit-exactness
against LiteRT's reference kernels on real digits, and the models TFLM cannot run."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tflm_runtime = pytest.importorskip("tflite_micro").runtime

from edgeveil.device.interpreter import find_interpreter  # noqa: E402
from edgeveil.device.runner import HeadRunner  # noqa: E402
from edgeveil.export.carray import NotFullInteger, float_parts  # noqa: E402
from edgeveil.export.tflm import check_arena, compare_kernels, measure_arena  # noqa: E402
from edgeveil.training.data import load_dataset  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"
INT8, FP32 = FIXTURE / "head_int8.tflite", FIXTURE / "head_fp32.tflite"
N_IMAGES = 300


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """uint8 (300, 16, 16, 1): the bundled digits at the fixture's size, raw pixels as the dataset gives them."""
    _, pool = load_dataset("digits", image_size=16)
    return pool.x[:N_IMAGES]


@pytest.fixture(scope="module")
def codes(digits) -> np.ndarray:
    """int8 (300, 16, 16, 1): the digits quantized the device's way (the manifest's normalization and rounding)."""
    return HeadRunner(FIXTURE, "int8").preprocess(digits)


def runs_in(model: Path, arena: int, x: np.ndarray) -> bool:
    """The runtime itself, not our wrapper: does the model allocate and invoke in `arena` bytes?"""
    try:
        interp = tflm_runtime.Interpreter.from_file(str(model), arena_size=arena)
        interp.set_input(x, 0)
        interp.invoke()
    except RuntimeError:
        return False
    return True


def largest_live_pair(model: Path) -> int:
    """Bytes of the non-constant inputs plus outputs of the hungriest op: no arena can hold less.
    Non-constant = the graph input or produced by an op (reference kernels keep every op visible)."""
    interp = find_interpreter().make(model, reference_kernels=True)
    ops = interp._get_ops_details()
    live = {i for op in ops for i in op["outputs"]} | {d["index"] for d in interp.get_input_details()}
    size = {t["index"]: int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize for t in interp.get_tensor_details()}
    return max(sum(size[i] for i in set(op["inputs"]) | set(op["outputs"]) if i in live) for op in ops)


# ------------------------------------------------------------------------------- arena


def test_measured_arena_is_the_exact_minimum(codes):
    result = measure_arena(INT8, inputs=codes[:4])
    arena = result["arena_bytes"]
    assert runs_in(INT8, arena, codes[:1])
    assert not runs_in(INT8, arena - 1, codes[:1]) and not runs_in(INT8, arena - 16, codes[:1])
    assert result["recommended_bytes"] == 16 * math.ceil(arena * 1.1 / 16) and result["margin"] == 0.1
    parts = result["breakdown"]
    assert parts["head_bytes"] + parts["tail_bytes"] == parts["total_bytes"]
    assert abs(parts["total_bytes"] - arena) < 16
    assert parts["head_bytes"] >= largest_live_pair(INT8)
    assert sum(b["used_bytes"] for b in parts["buckets"].values()) <= parts["tail_bytes"]
    assert result["host_bits"] == 64 and "32-bit" in result["note"]
    assert result["interpreter"].startswith("tflite-micro ") and 1 <= result["bisection_steps"] <= 40


def test_default_input_gives_the_same_arena(codes):
    assert measure_arena(INT8)["arena_bytes"] == measure_arena(INT8, inputs=codes[:1], margin=0.0)["arena_bytes"]


def test_float32_head_runs_in_tflm_and_needs_more_arena():
    """TFLM runs pure float32 models; their activations take four times the bytes of int8 ones."""
    fp32, int8 = measure_arena(FP32), measure_arena(INT8)
    assert fp32["breakdown"]["head_bytes"] == 4 * int8["breakdown"]["head_bytes"]
    assert fp32["arena_bytes"] > int8["arena_bytes"]


def test_check_arena_reports_the_shortfall():
    required = measure_arena(INT8)["arena_bytes"]
    short = check_arena(INT8, required - 100)
    assert short["fits"] is False and short["shortfall_bytes"] == 100
    assert short["required_bytes"] == required and short["arena_bytes"] == required - 100
    assert not runs_in(INT8, required - 100, np.zeros((1, 16, 16, 1), np.int8))
    enough = check_arena(INT8, required)
    assert enough["fits"] is True and enough["shortfall_bytes"] == 0


def test_max_bytes_too_small_is_named():
    with pytest.raises(ValueError, match=r"could not fit .*head_int8.tflite in 1000 bytes.*Raise max_bytes"):
        measure_arena(INT8, max_bytes=1000)


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": -0.1}, "margin must be a number in 0.0..10.0"),
    ({"max_bytes": 0}, "max_bytes must be an int >= 1"),
    ({"inputs": np.zeros((1, 16, 16, 1), np.float32)}, "inputs has dtype float32, expected int8"),
    ({"inputs": np.zeros((1, 28, 28, 1), np.int8)}, r"inputs has shape \(1, 28, 28, 1\), expected \(N, 16, 16, 1\)"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_arena(INT8, **kwargs)


# ------------------------------------------------------------------------------- kernels


def test_tflm_is_bit_exact_with_reference_kernels_on_real_digits(digits, codes):
    result = compare_kernels(INT8, codes)
    assert result["n"] == N_IMAGES
    assert result["tflm_vs_reference"] == {"bit_exact": True, "max_diff_steps": 0, "share_differ": 0.0}
    # TFLM equals the reference kernels, so its gap to XNNPACK is the reference-to-XNNPACK gap,
    # measured here through the device's own runner.
    ref = HeadRunner(FIXTURE, "int8", reference_kernels=True).run(digits).values.astype(int)
    xnn = HeadRunner(FIXTURE, "int8").run(digits).values.astype(int)
    gap = np.abs(ref - xnn)
    got = result["tflm_vs_xnnpack"]
    assert got["max_diff_steps"] == gap.max() and got["share_differ"] == pytest.approx((gap > 0).mean())
    assert got["mean_abs_diff_steps"] == pytest.approx(gap.mean())
    assert result["interpreters"]["xnnpack_active"] is True
    if gap.max() > 0:
        assert "will not reproduce the Linux board's features bit for bit" in result["message"]
        assert f"up to {gap.max()} output step" in result["message"]
    else:
        assert "matched too" in result["message"]


def test_compare_kernels_refuses_float_models_and_wrong_inputs(codes):
    with pytest.raises(NotFullInteger, match="fp32"):
        compare_kernels(FP32, codes.astype(np.float32))
    with pytest.raises(ValueError, match="inputs_int8 has dtype float32, expected int8"):
        compare_kernels(INT8, codes.astype(np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        compare_kernels(INT8, codes.tolist())


# ------------------------------------------------------------------------------- models TFLM cannot run


@pytest.fixture(scope="module")
def tf_float_models(tmp_path_factory) -> Path:
    """fp16-weight and dynamic-range models from TensorFlow's own converter (a conv with 1,152 weights,
    above the converter's 1,024-element threshold for quantizing weights), in a subprocess."""
    out = tmp_path_factory.mktemp("tf_float_models")
    script = textwrap.dedent('''
        import sys, numpy as np, tensorflow as tf
        out = sys.argv[1]
        w = tf.constant(np.random.default_rng(0).normal(0, 0.1, (3, 3, 4, 32)).astype(np.float32))
        f = tf.function(lambda x: tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME")),
                        input_signature=[tf.TensorSpec([1, 16, 16, 4], tf.float32)])
        for name in ("fp16", "dynamic"):
            c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
            c.optimizations = [tf.lite.Optimize.DEFAULT]
            if name == "fp16":
                c.target_spec.supported_types = [tf.float16]
            open(f"{out}/{name}.tflite", "wb").write(c.convert())
    ''')
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("fp16", "fp16"), ("dynamic", "dynamic-range")])
def test_fp16_and_dynamic_models_are_refused_because_tflm_cannot_run_them(tf_float_models, name, kind):
    model = tf_float_models / f"{name}.tflite"
    assert float_parts(model).kind == kind
    assert not runs_in(model, 64 << 20, np.zeros((1, 16, 16, 4), np.float32))  # the runtime itself refuses
    with pytest.raises(NotFullInteger, match=f"TFLite Micro cannot run .*{name}.tflite: {kind}") as err:
        measure_arena(model)
    assert "head_int8.tflite" in str(err.value)
    with pytest.raises(NotFullInteger, match=kind):
        compare_kernels(model, np.zeros((1, 16, 16, 4), np.int8))
