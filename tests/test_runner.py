"""The head runner against the real interpreter and the committed fixture (tests/fixtures/digits_tiny).

The fixture's expected codes were made by the export's own code path (make_fixture.py), not by the
runner, so these are differential tests. Noise statistics are checked against closed forms.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeveil.device.interpreter import InterpreterError, Runtime, find_interpreter
from edgeveil.device.files import sha256_file
from edgeveil.device.manifest import sent_entry
from edgeveil.device.quant import dequantize
from edgeveil.device.noise import add_float_noise, add_quantized_noise, sent_qparams
from edgeveil.device.runner import Features, HeadRunner

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"


@pytest.fixture(scope="module")
def expected() -> dict:
    with np.load(FIXTURE / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text())


def fixture_copy(tmp_path: Path, **manifest_changes) -> Path:
    """The fixture export with top-level manifest fields replaced; a new inference_noise gets the sent
    grid export would write for it (the tensor's own grid if the spec is invalid: the runner refuses it)."""
    out = tmp_path / "export"
    shutil.copytree(FIXTURE, out)
    doc = json.loads((out / "manifest.json").read_text())
    doc.update(manifest_changes)
    for entry in doc["artifacts"].values():
        entry["sent"] = _sent_as_export_writes(entry["outputs"][0], doc["inference_noise"])
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


def _sent_as_export_writes(out: dict, noise) -> dict:
    scale, zero_point = out["scale"], out["zero_point"]
    if scale is not None:
        info = np.iinfo(np.dtype(out["dtype"]))
        try:
            scale, zero_point = sent_qparams(scale, zero_point, int(info.min), int(info.max), noise)
        except ValueError:
            pass
    return sent_entry(scale, zero_point, noise)


def noise_on_grid(codes: np.ndarray, scale: float, zero_point: int, spec, rng):
    """add_quantized_noise on the grid export derives for (scale, zero_point) and spec."""
    info = np.iinfo(np.asarray(codes).dtype)
    sent = sent_qparams(scale, zero_point, int(info.min), int(info.max), spec)
    return add_quantized_noise(codes, scale, zero_point, spec, rng, sent)


def out_qparams(manifest: dict) -> tuple[float, int]:
    out = manifest["artifacts"]["int8"]["outputs"][0]
    return out["scale"], out["zero_point"]


# ------------------------------------------------------------------------------- features


@pytest.mark.parametrize("kernels, kwargs", [("ref", {"reference_kernels": True}), ("builtin", {"xnnpack": False}),
                                             ("xnnpack", {})])
def test_int8_features_equal_the_fixture(expected, manifest, kernels, kwargs):
    runner = HeadRunner(FIXTURE, "int8", **kwargs)
    feats = runner.run(expected["images"])
    made_by = json.loads(str(expected["info"]))
    same_runtime = (runner.runtime_name, runner.loaded.version) == (made_by["runtime"], made_by["runtime_version"])
    want = expected[f"codes_{kernels}"]
    if kernels == "ref" or same_runtime:
        np.testing.assert_array_equal(feats.values, want)
    else:  # optimized kernels of another runtime may round differently: within one step
        assert np.abs(feats.values.astype(int) - want).max() <= 1
    assert feats.values.dtype == np.int8 and feats.values.shape == (16, 8, 8, 8)
    assert (feats.scale, feats.zero_point) == out_qparams(manifest)
    assert feats.layout == "NHWC" and feats.noise is None
    assert runner.model_id == manifest["artifacts"]["int8"]["sha256"][:16] == manifest["model_id"]
    assert runner.xnnpack is (kernels == "xnnpack")


def test_reference_and_xnnpack_codes_differ_by_at_most_one_step(expected):
    """What the clean-environment check relies on when it compares the default kernels within 1 step."""
    diff = np.abs(expected["codes_xnnpack"].astype(int) - expected["codes_ref"])
    assert diff.max() <= 1


def test_preprocess_matches_the_exports_input_quantization(expected, manifest):
    runner = HeadRunner(FIXTURE, "int8")
    codes = runner.preprocess(expected["images"])
    np.testing.assert_array_equal(codes, expected["input_codes"])
    spec, inp = manifest["input_spec"], manifest["artifacts"]["int8"]["inputs"][0]
    norm = (expected["images"] / 255.0 - spec["mean"][0]) / spec["std"][0]
    err = np.abs((codes.astype(float) - inp["zero_point"]) * inp["scale"] - norm)
    low, high = (-128.5 - inp["zero_point"]) * inp["scale"], (127.5 - inp["zero_point"]) * inp["scale"]
    inside = (norm >= low) & (norm <= high)  # values outside the calibrated range saturate
    assert inside.mean() > 0.99
    assert err[inside].max() <= inp["scale"] / 2 * (1 + 1e-4)


def test_fp32_features_and_to_nchw(expected, manifest):
    feats = HeadRunner(FIXTURE, "fp32").run(expected["images"])
    assert feats.values.dtype == np.float32 and feats.scale is None and feats.zero_point is None
    np.testing.assert_array_equal(feats.values, expected["features_fp32"])
    nchw = feats.to_nchw()
    assert nchw.shape == (16, *manifest["feature_shape"])
    np.testing.assert_allclose(nchw, expected["features_torch"], atol=1e-4)


def test_int8_to_nchw_is_close_to_pytorch(expected, manifest):
    feats = HeadRunner(FIXTURE, "int8").run(expected["images"])
    nchw = feats.to_nchw()
    assert nchw.shape == (16, *manifest["feature_shape"]) and nchw.dtype == np.float32
    scale, zero_point = out_qparams(manifest)
    by_hand = (feats.values.astype(np.float32) - zero_point) * np.float32(scale)
    np.testing.assert_array_equal(feats.dequantized(), by_hand)
    steps = np.abs(nchw - expected["features_torch"]).max() / scale
    assert steps <= manifest["artifacts"]["int8"]["parity"]["max_err_steps"] + 1


def test_features_layouts():
    values = np.arange(24, dtype=np.int8).reshape(1, 2, 3, 4)
    nhwc = Features(values, 0.5, 1, "NHWC", None)
    assert nhwc.to_nchw().shape == (1, 4, 2, 3) and nhwc.to_nchw()[0, 3, 1, 2] == (23 - 1) * 0.5
    assert Features(values, 0.5, 1, "NCHW", None).to_nchw().shape == (1, 2, 3, 4)


def test_runtime_can_be_named_or_injected(expected):
    by_name = HeadRunner(FIXTURE, "int8", runtime="ai_edge_litert")
    injected = HeadRunner(FIXTURE, "int8", runtime=find_interpreter("ai_edge_litert"), num_threads=2)
    assert by_name.runtime_name == injected.runtime_name == "ai_edge_litert"
    images = expected["images"][:2]
    np.testing.assert_array_equal(by_name.run(images).values, injected.run(images).values)
    with pytest.raises(ValueError, match="unknown interpreter 'nope'"):
        HeadRunner(FIXTURE, "int8", runtime="nope")


# ------------------------------------------------------------------------------- refusals


def test_sha256_mismatch_is_refused_naming_file_and_both_hashes(tmp_path, manifest):
    out = fixture_copy(tmp_path)
    model = out / "head_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    want = manifest["artifacts"]["int8"]["sha256"]
    with pytest.raises(ValueError) as info:
        HeadRunner(out, "int8")
    message = str(info.value)
    assert str(model) in message and want in message and sha256_file(model) in message


def test_truncated_model_is_refused(tmp_path):
    out = fixture_copy(tmp_path)
    model = out / "head_int8.tflite"
    model.write_bytes(model.read_bytes()[:500])
    with pytest.raises(ValueError, match="head_int8.tflite does not match its manifest"):
        HeadRunner(out, "int8")
    # even with a manifest that vouches for the truncated file, the interpreter error names the file
    doc = json.loads((out / "manifest.json").read_text())
    doc["artifacts"]["int8"]["sha256"] = sha256_file(model)
    doc["artifacts"]["int8"]["model_id"] = sha256_file(model)[:16]
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InterpreterError, match=r"head_int8\.tflite.*cannot load"):
        HeadRunner(out, "int8")


def test_missing_model_file_is_named(tmp_path):
    out = fixture_copy(tmp_path)
    (out / "head_fp32.tflite").unlink()
    with pytest.raises(FileNotFoundError, match="head_fp32.tflite"):
        HeadRunner(out, "fp32")


def test_manifest_that_disagrees_with_the_model_is_refused(tmp_path):
    out = fixture_copy(tmp_path)
    doc = json.loads((out / "manifest.json").read_text())
    doc["artifacts"]["int8"]["outputs"][0]["scale"] *= 2
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"outputs\[0\].*the manifest says"):
        HeadRunner(out, "int8")


def test_normalization_for_the_wrong_number_of_channels_is_refused(tmp_path):
    out = fixture_copy(tmp_path)
    doc = json.loads((out / "manifest.json").read_text())
    doc["input_spec"].update(mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="input_spec.mean has 3 values for a 1-channel input"):
        HeadRunner(out, "int8")


def test_unknown_precision_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"no artifact 'int16x8'; it has fp32, int8"):
        HeadRunner(FIXTURE, "int16x8")


@pytest.mark.parametrize("make, needle", [
    (lambda im: im.astype(np.float32) / 255, "raw pixels 0..255"),
    (lambda im: np.ascontiguousarray(im.transpose(0, 3, 1, 2)), "looks NCHW"),
    (lambda im: np.zeros((2, 28, 28, 1), np.uint8), r"got uint8 \(2, 28, 28, 1\)"),
    (lambda im: im[0], r"got uint8 \(16, 16, 1\)"),
    (lambda im: im.tolist(), "got list"),
])
def test_wrong_images_name_what_was_expected(expected, make, needle):
    runner = HeadRunner(FIXTURE, "int8")
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 16, 16, 1\)") as info:
        runner.run(make(expected["images"]))
    assert info.match(needle)


@pytest.mark.parametrize("noise, field", [
    ({"kind": "uniform", "sigma": 0.1}, "inference_noise.kind"),
    ({"kind": "gaussian", "sigma": -1}, "inference_noise.sigma"),
    ({"kind": "laplace"}, "inference_noise.sigma"),
    ({"kind": "dropout", "p": 1.5}, "inference_noise.p"),
])
def test_bad_noise_spec_is_refused_at_load(tmp_path, noise, field):
    with pytest.raises(ValueError, match=rf"manifest.json: field {field}"):
        HeadRunner(fixture_copy(tmp_path, inference_noise=noise), "int8")


# ------------------------------------------------------------------------------- noise


def noisy_runner(tmp_path, manifest, steps: float, kind: str = "gaussian", seed: int | None = 0) -> HeadRunner:
    scale, _ = out_qparams(manifest)
    return HeadRunner(fixture_copy(tmp_path, inference_noise={"kind": kind, "sigma": steps * scale}), "int8",
                      noise_seed=seed, reference_kernels=True)


def test_noise_far_below_one_step_is_erased_by_rounding(tmp_path, expected, manifest):
    scale, zero_point = out_qparams(manifest)
    feats = noisy_runner(tmp_path, manifest, 0.1).run(expected["images"])
    assert feats.noise["changed_fraction"] < 0.01
    assert feats.noise["sigma_steps"] == pytest.approx(0.1)
    assert feats.noise["effective_std"] < 0.1 * feats.noise["sigma"]
    assert (feats.scale, feats.zero_point, feats.noise["widened"]) == (scale, zero_point, False)  # own grid
    assert np.mean(feats.values != expected["codes_ref"]) < 0.01


def test_two_step_noise_is_sent_on_a_widened_grid_and_keeps_both_halves_at_the_zero_point(tmp_path, expected,
                                                                                            manifest):
    """ReLU zeros sit at the dtype's minimum: on the tensor's own grid the negative half of the noise
    would be clipped there (a bias the tail never trained with). The device widens the grid instead."""
    scale, zero_point = out_qparams(manifest)
    feats = noisy_runner(tmp_path, manifest, 2.0).run(expected["images"])
    stats, ref = feats.noise, expected["codes_ref"]
    at_zero = ref == zero_point  # about half the codes
    wide = (255 * scale + 2 * 4 * 2 * scale) / 255  # the range plus 4 sigma on each side, over 255 steps
    assert feats.scale == pytest.approx(wide, rel=1e-12) and stats["widened"]
    assert feats.zero_point == -128 + round(8 * scale / wide)  # 0.0 sits 4 sigma above the new minimum
    delta = feats.dequantized().astype(np.float64) - dequantize(ref, scale, zero_point)
    sigma = 2 * scale
    print(f"2-step noise: {at_zero.mean():.1%} at the zero point; there mean {delta[at_zero].mean() / sigma:+.3f} "
          f"sigma, std {delta[at_zero].std() / sigma:.3f} sigma; clipped {stats['clipped_fraction']:.2%}")
    assert 0.3 < at_zero.mean() < 0.7
    assert stats["clipped_fraction"] < 1e-3
    assert abs(delta[at_zero].mean()) < 0.03 * sigma  # unbiased: the clipped version is +0.38 sigma
    expected_std = math.sqrt(sigma ** 2 + wide ** 2 / 12)  # the noise plus rounding on the sent grid
    assert delta[at_zero].std() == pytest.approx(expected_std, rel=0.03)
    assert np.std(delta) == pytest.approx(expected_std, rel=0.03)
    assert stats["effective_std"] == pytest.approx(np.std(delta), rel=1e-5)
    assert stats["changed_fraction"] == pytest.approx(math.erfc(0.5 * wide / sigma / math.sqrt(2)), abs=0.02)


def test_noise_on_the_widened_grid_reaches_the_float_tail_as_in_float(tmp_path, expected, manifest):
    """What the cloud dequantizes is the clean features plus the nominal noise, not a rectified copy."""
    scale, zero_point = out_qparams(manifest)
    clean = dequantize(expected["codes_ref"], scale, zero_point)
    feats = noisy_runner(tmp_path, manifest, 20.0, seed=5).run(expected["images"])
    delta = feats.dequantized().astype(np.float64) - clean
    assert abs(delta.mean()) < 0.03 * 20 * scale and delta.std() == pytest.approx(20 * scale, rel=0.03)


def test_sent_qparams():
    assert sent_qparams(0.5, -128, -128, 127, None) == (0.5, -128)
    assert sent_qparams(0.5, -128, -128, 127, {"kind": "dropout", "p": 0.5}) == (0.5, -128)
    assert sent_qparams(0.5, -128, -128, 127, {"kind": "gaussian", "sigma": 0.49}) == (0.5, -128)  # below a step
    scale, zp = sent_qparams(0.5, -128, -128, 127, {"kind": "gaussian", "sigma": 1.0})
    assert scale == pytest.approx((127.5 + 8) / 255) and zp == -128 + round(4 / scale)
    scale, zp = sent_qparams(0.5, 0, -128, 127, {"kind": "laplace", "sigma": 1.0})
    assert scale == pytest.approx((127.5 + 18) / 255) and zp == round(-128 + 73 / scale)
    scale, zp = sent_qparams(1e-4, 0, -32768, 32767, {"kind": "gaussian", "sigma": 1.0})  # int16
    assert (zp - -32768) * scale == pytest.approx(32768e-4 + 4, abs=scale)
    with pytest.raises(ValueError, match="sigma"):
        sent_qparams(0.5, 0, -128, 127, {"kind": "gaussian", "sigma": -1})


def test_quantized_noise_closed_forms_on_many_codes():
    rng = np.random.default_rng(1)
    mid = np.zeros(200_000, np.int8)
    noisy = noise_on_grid(mid, 0.5, 0, {"kind": "gaussian", "sigma": 1.0}, rng)  # 2 steps: widened
    stats, s = noisy.stats, noisy.scale
    assert noisy.zero_point == 0 and s == pytest.approx(135.5 / 255)  # 0.0 stays a code: rounding as before
    assert stats["effective_std"] == pytest.approx(s * math.sqrt((1.0 / s) ** 2 + 1 / 12), rel=0.01)
    assert stats["clipped_fraction"] == 0
    assert stats["changed_fraction"] == pytest.approx(math.erfc(0.5 * s / math.sqrt(2)), abs=0.005)
    floor = np.full(200_000, -128, np.int8)
    out = noise_on_grid(floor, 0.5, -128, {"kind": "gaussian", "sigma": 1.0}, rng)
    applied = dequantize(out.codes, out.scale, out.zero_point)
    assert abs(applied.mean()) < 0.01 and out.stats["clipped_fraction"] < 1e-4  # was 0.40 on the own grid
    noisy = noise_on_grid(mid, 0.5, 0, {"kind": "laplace", "sigma": 1.0}, rng)
    s = noisy.scale
    assert noisy.stats["nominal_std"] == pytest.approx(math.sqrt(2))
    assert noisy.stats["effective_std"] == pytest.approx(s * math.sqrt(2 / s ** 2 + 1 / 12), rel=0.02)
    tiny, _, _, stats = noise_on_grid(mid, 0.5, 0, {"kind": "gaussian", "sigma": 0.05}, rng)  # 0.1 step
    assert stats["changed_fraction"] < 1e-4 and not stats["widened"]
    assert np.count_nonzero(tiny) == round(stats["changed_fraction"] * mid.size)
    same = noise_on_grid(mid, 0.5, 0, None, rng)
    assert same.codes is mid and same.stats is None and (same.scale, same.zero_point) == (0.5, 0)


def _norms(x: np.ndarray, ord: int) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float64)
    return np.abs(flat).sum(axis=1) if ord == 1 else np.sqrt((flat ** 2).sum(axis=1))


@pytest.mark.parametrize("kind, ord", [("gaussian", 2), ("laplace", 1)])
def test_clip_norm_bounds_each_images_features_before_the_noise(tmp_path, expected, manifest, kind, ord):
    """The (epsilon, delta) needs every release clipped to clip_norm before noise, on the device too."""
    scale, zero_point = out_qparams(manifest)
    ref = dequantize(expected["codes_ref"], scale, zero_point)
    clip = float(np.median(_norms(ref, ord))) / 2  # half the images must be scaled down
    spec = {"kind": kind, "sigma": 0.0, "clip_norm": clip}
    out = fixture_copy(tmp_path, inference_noise=spec)
    feats = HeadRunner(out, "int8", noise_seed=0, reference_kernels=True).run(expected["images"])
    norms = _norms(feats.dequantized(), ord)
    n_elems = ref[0].size
    rounding = 0.5 * scale * (n_elems if ord == 1 else math.sqrt(n_elems))  # at most half a step per element
    assert np.all(norms <= clip + rounding)
    inside = _norms(ref, ord) <= clip
    assert np.array_equal(feats.values[inside], expected["codes_ref"][inside])  # already inside: unchanged
    assert np.all(norms[~inside] < _norms(ref, ord)[~inside])
    assert feats.noise["scaled_down_fraction"] == pytest.approx(np.mean(~inside))
    assert feats.noise["clip_norm"] == clip and feats.noise["clip_ord"] == ord
    # The same clipping on float features, with the noise on top.
    f32, stats = add_float_noise(ref, {"kind": kind, "sigma": 0.01, "clip_norm": clip}, np.random.default_rng(0))
    clipped = ref * np.minimum(1, clip / _norms(ref, ord))[:, None, None, None]
    assert np.std(f32 - clipped) == pytest.approx(0.01 * (1 if kind == "gaussian" else math.sqrt(2)), rel=0.05)
    assert stats["effective_std"] == pytest.approx(np.std(f32 - clipped), rel=1e-3)


def test_clip_norm_without_noise_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="clip_norm applies to gaussian and laplace"):
        HeadRunner(fixture_copy(tmp_path, inference_noise={"kind": "dropout", "p": 0.1, "clip_norm": 1.0}), "int8")
    with pytest.raises(ValueError, match="clip_norm must be a positive"):
        HeadRunner(fixture_copy(tmp_path / "b", inference_noise={"kind": "gaussian", "sigma": 0.1, "clip_norm": -1}),
                   "int8")


def test_dropout_sets_codes_to_the_zero_point(expected, manifest):
    scale, zero_point = out_qparams(manifest)
    codes = np.tile(expected["codes_ref"], (8, 1, 1, 1))
    rng = np.random.default_rng(0)
    out, sent_scale, sent_zp, stats = noise_on_grid(codes, scale, zero_point, {"kind": "dropout", "p": 0.3}, rng)
    assert (sent_scale, sent_zp) == (scale, zero_point)  # dropout keeps the grid
    moved = out != codes
    assert np.all(out[moved] == zero_point)
    assert stats["changed_fraction"] == pytest.approx(0.3 * np.mean(codes != zero_point), abs=0.01)
    assert stats["p"] == 0.3 and stats["sigma"] is None and stats["clipped_fraction"] == 0


def test_float_noise_is_added_directly(tmp_path, expected):
    out = fixture_copy(tmp_path, inference_noise={"kind": "gaussian", "sigma": 0.05})
    feats = HeadRunner(out, "fp32", noise_seed=3).run(expected["images"])
    delta = feats.values.astype(float) - expected["features_fp32"]
    assert feats.noise["sigma_steps"] is None and feats.noise["clipped_fraction"] == 0
    assert feats.noise["effective_std"] == pytest.approx(0.05, rel=0.05) == np.std(delta)
    rng = np.random.default_rng(0)
    values, stats = add_float_noise(np.ones(10, np.float32), {"kind": "dropout", "p": 1.0}, rng)
    assert np.all(values == 0) and stats["changed_fraction"] == 1


def test_same_noise_seed_gives_the_same_features(tmp_path, expected, manifest):
    images = expected["images"]
    a = noisy_runner(tmp_path / "a", manifest, 2.0, seed=11).run(images)
    b = noisy_runner(tmp_path / "b", manifest, 2.0, seed=11).run(images)
    c = noisy_runner(tmp_path / "c", manifest, 2.0, seed=12).run(images)
    assert np.array_equal(a.values, b.values) and a.noise == b.noise
    assert not np.array_equal(a.values, c.values)
    unseeded = noisy_runner(tmp_path / "d", manifest, 2.0, seed=None)
    assert not np.array_equal(unseeded.run(images).values, unseeded.run(images).values)  # fresh noise per call


def test_an_interpreter_without_resolver_types_still_runs_with_xnnpack(expected):
    real = find_interpreter("ai_edge_litert")
    bare = Runtime("bare", "0", real.interpreter_cls, None)
    runner = HeadRunner(FIXTURE, "int8", runtime=bare)
    assert runner.runtime_name == "bare"
    assert np.abs(runner.run(expected["images"]).values.astype(int) - expected["codes_ref"]).max() <= 1
    with pytest.raises(ValueError, match="cannot turn XNNPACK off"):
        HeadRunner(FIXTURE, "int8", runtime=bare, xnnpack=False)


def test_an_artifact_marked_unsafe_for_xnnpack_runs_without_it(tmp_path, expected):
    out = fixture_copy(tmp_path)
    doc = json.loads((out / "manifest.json").read_text())
    doc["artifacts"]["int8"]["xnnpack_safe"] = False
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.warns(RuntimeWarning, match="unsafe for XNNPACK"):
        runner = HeadRunner(out, "int8")
    assert runner.xnnpack is False
    assert np.array_equal(runner.run(expected["images"]).values, expected["codes_ref"])
