"""The fast per-image path against the path it replaced: bit for bit, on real heads.

The pre-processing reference below is HeadRunner.preprocess as it was before the pixel table (commit
958cc1f), written out here so that a change to the runner cannot change it; the frame reference is
test_wire.build, packed from the documented layout independently of wire.encode; the invoke reference is
interpreter.run, the loop the runner used before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_exported_run
from test_runner import FIXTURE, fixture_copy
from test_wire import build

from edgeveil.device import wire
from edgeveil.device.interpreter import run as invoke_each
from edgeveil.device.noise import add_float_noise, add_quantized_noise
from edgeveil.device.quant import quantize, tensor_qparams
from edgeveil.device.runner import HeadRunner, normalize_pixels, pixel_table, table_lookup

KEY, DEV = bytes(range(40, 72)), "dev-1"

# Normalisation and input quantization as real exports wrote them into manifest.json (input_spec and
# artifacts.<p>.inputs[0]): benchmarks/device_latency.py's heads, exported with edgeveil on this machine.
MNIST = {"mean": [0.1317219462785114], "std": [0.30970368363373446],  # smallcnn, mnist_test.npz
         "int8": (0.01266232505440712, -94)}
CIFAR10 = {"mean": [0.49051698835784313, 0.48011134918811277, 0.44513750382965683],  # vgg11_bn, CIFAR-10
           "std": [0.24539776158656978, 0.2433474476174623, 0.26122419020208476],
           "int8": (0.016216743737459183, -5)}


def old_preprocess(images, mean, std, qparams, rounding):
    """HeadRunner.preprocess before the pixel table, step by step."""
    scale, zero_point, dtype = qparams
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if scale is None:
        return np.ascontiguousarray(x, dtype=dtype)
    return quantize(x, scale, zero_point, dtype, rounding=rounding)


def every_pixel_value(channels: int, copies: int = 1) -> np.ndarray:
    """uint8 (copies, 16, 16, C): every value 0..255 once in each channel of each image, in a different
    order per channel (so a lookup that mixed channels up would show)."""
    per_channel = [np.roll(np.arange(256, dtype=np.uint8), 37 * c) for c in range(channels)]
    image = np.stack(per_channel, axis=-1).reshape(1, 16, 16, channels)
    return np.repeat(image, copies, axis=0)


def input_variants(spec: dict) -> list[tuple]:
    """(qparams, rounding): the real int8 input, a float input, and int16 / uint8 inputs on the grids an
    exporter would choose for the same normalised range (symmetric for int16, asymmetric for uint8)."""
    mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
    low, high = float(np.min(-mean / std)), float(np.max((1 - mean) / std))
    u8_scale = (high - low) / 255
    grids = [(*spec["int8"], np.dtype(np.int8)), (None, None, np.dtype(np.float32)),
             (max(-low, high) / 32767, 0, np.dtype(np.int16)), (u8_scale, round(-low / u8_scale), np.dtype(np.uint8))]
    return [(g, r) for g in grids for r in ("reference", "optimized")]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------- the pixel table


@pytest.mark.parametrize("name, spec", [("mnist", MNIST), ("cifar10", CIFAR10)])
def test_pixel_table_equals_the_old_arithmetic_on_every_value_of_every_channel(name, spec):
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    images = every_pixel_value(len(mean), copies=2)
    for qparams, rounding in input_variants(spec):
        want = old_preprocess(images, spec["mean"], spec["std"], qparams, rounding)
        table = pixel_table(mean, std, qparams, rounding)
        assert table.shape == (len(mean), 256) and table.dtype == qparams[2]
        got = table_lookup(table, images.shape[1:])(images)
        assert same_bits(got, want), (name, qparams, rounding)
        assert same_bits(normalize_pixels(images, mean, std, qparams, rounding), want)
        # and the table itself, value by value: row c, column v
        for c in range(len(mean)):
            column = old_preprocess(np.arange(256, dtype=np.uint8)[:, None], spec["mean"][c:c + 1],
                                    spec["std"][c:c + 1], qparams, rounding)[:, 0]
            assert same_bits(table[c], column)


def test_the_two_roundings_really_differ_somewhere_so_the_table_must_follow_the_manifest():
    """Otherwise the test above could not tell a table built with the wrong rounding."""
    mean, std = np.float32([0.5]), np.float32([0.5])
    ties = (None, None, np.dtype(np.int8))
    grid = (2 / 255, 0, np.dtype(np.int8))  # x = (v/255 - 0.5) / 0.5 = (2v - 255) / 255: every odd step a tie
    ref, opt = pixel_table(mean, std, grid, "reference"), pixel_table(mean, std, grid, "optimized")
    assert np.any(ref != opt)
    assert same_bits(pixel_table(mean, std, ties, "reference"), pixel_table(mean, std, ties, "optimized"))


def test_runner_preprocess_equals_the_old_arithmetic_on_the_committed_head():
    doc = json.loads((FIXTURE / "manifest.json").read_text())
    spec, images = doc["input_spec"], every_pixel_value(1, copies=3)
    for precision in ("int8", "fp32"):
        runner = HeadRunner(FIXTURE, precision)
        want = old_preprocess(images, spec["mean"], spec["std"], tensor_qparams(runner._inp),
                              spec["quantization_rounding"])
        got = runner.preprocess(images)
        assert same_bits(got, want) and got.flags.writeable


# ------------------------------------------------------------------------------- features and frames


def old_run(runner: HeadRunner, images: np.ndarray, rng: np.random.Generator):
    """HeadRunner.run before this change: preprocess, interpreter.run, then the manifest's noise."""
    spec = runner.manifest["input_spec"]
    x = old_preprocess(images, spec["mean"], spec["std"], tensor_qparams(runner._inp),
                       spec.get("quantization_rounding", "reference"))
    codes = invoke_each(runner.loaded, x)
    scale, zero_point, _ = tensor_qparams(runner._out)
    if scale is None:
        values, stats = add_float_noise(codes.astype(np.float32, copy=False), runner.noise_spec, rng)
        return values, None, None, stats
    return add_quantized_noise(codes, scale, zero_point, runner.noise_spec, rng, runner.sent)


def old_frame(values, scale, zero_point, model_id, rid, ts) -> bytes:
    dtype = np.dtype(values.dtype).name
    return build(dtype=dtype, dims=values.shape, payload=values.tobytes(), scale=0.0 if scale is None else scale,
                 zp=0 if zero_point is None else zero_point, model=model_id, rid=rid, ts=ts, dev=DEV, key=KEY)


def check_same_as_old_path(export_dir: Path, precision: str, images: np.ndarray, seed: int = 3) -> None:
    """Fast runner + FrameEncoder against the old path, one image at a time and as a batch, same noise seed."""
    fast = HeadRunner(export_dir, precision, noise_seed=seed)
    old = HeadRunner(export_dir, precision)  # its interpreter serves the old path
    encoder = wire.FrameEncoder(key=KEY, device_id=DEV, model_id=fast.model_id)
    rng = np.random.default_rng(seed)
    for i in range(len(images)):
        feats = fast.run(images[i:i + 1])
        values, scale, zero_point, stats = old_run(old, images[i:i + 1], rng)
        assert same_bits(feats.values, values) and (feats.scale, feats.zero_point) == (scale, zero_point)
        assert feats.noise == stats
        rid, ts = os.urandom(16), 1_700_000_000_000_000 + i
        frame = encoder.encode(feats.values, scale=feats.scale, zero_point=feats.zero_point, request_id=rid,
                               timestamp_us=ts)
        assert frame == old_frame(values, scale, zero_point, fast.model_id, rid, ts)
    batch = HeadRunner(export_dir, precision, noise_seed=seed + 1).run(images)
    values, scale, zero_point, stats = old_run(old, images, np.random.default_rng(seed + 1))
    assert same_bits(batch.values, values) and batch.noise == stats and (batch.scale, batch.zero_point) == (
        scale, zero_point)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("noise", [None, {"kind": "gaussian", "sigma": 0.2}, {"kind": "dropout", "p": 0.3}],
                         ids=["no-noise", "gaussian", "dropout"])
def test_committed_head_gives_the_old_features_and_frames(tmp_path, precision, noise):
    images = np.concatenate([every_pixel_value(1, copies=2),
                             np.load(FIXTURE / "expected.npz")["images"][:6]])
    check_same_as_old_path(fixture_copy(tmp_path, inference_noise=noise), precision, images)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny digits run trained and exported by the real CLI: int8, int16x8 (int16 input) and fp32."""
    return tiny_exported_run(tmp_path_factory, "path", "[fp32,int8,int16x8]")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int16x8", "fp32"])
def test_exported_head_gives_the_old_features_and_frames(tiny_run, precision):
    from edgeveil.training.runfile import load_splits, read_model_info

    test = load_splits(read_model_info(tiny_run)).test
    shape = HeadRunner(tiny_run / "export", precision).input_shape
    images = np.concatenate([test.x[:12], every_pixel_value(1, copies=1).reshape(1, *shape)
                             if shape == (16, 16, 1) else test.x[12:13]])
    check_same_as_old_path(tiny_run / "export", precision, images)


# ------------------------------------------------------------------------------- FrameEncoder


def test_frame_encoder_caches_never_mix_shapes_dtypes_or_quantization():
    encoder = wire.FrameEncoder(key=KEY, device_id=DEV, model_id="0123456789abcdef")
    rid, ts = bytes(16), 7
    rng = np.random.default_rng(0)
    cases = [(rng.integers(-128, 128, (1, 4, 4, 8)).astype(np.int8), 0.05, -3),
             (rng.integers(-128, 128, (1, 8, 4, 4)).astype(np.int8), 0.05, -3),
             (rng.integers(-128, 128, (1, 4, 4, 8)).astype(np.int8), 0.07, 2),
             (rng.integers(0, 256, (1, 4, 4, 8)).astype(np.uint8), 0.05, 3),
             (rng.standard_normal((1, 4, 4, 8)).astype(">f4"), None, None),
             (rng.standard_normal((1, 4, 8, 4)).astype(np.float32).transpose(0, 1, 3, 2), None, None)]
    for values, scale, zero_point in cases * 2:  # twice: the second round comes from the caches
        frame = encoder.encode(values, scale=scale, zero_point=zero_point, request_id=rid, timestamp_us=ts)
        name = values.dtype.newbyteorder("=").name
        payload = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
        assert frame == build(dtype=name, dims=values.shape, payload=payload, scale=scale or 0.0,
                              zp=zero_point or 0, rid=rid, ts=ts, key=KEY)


def test_frame_encoder_still_checks_every_frame_after_caching():
    encoder = wire.FrameEncoder(key=KEY, device_id=DEV, model_id="0123456789abcdef")
    x = np.ones((1, 3), np.int8)
    encoder.encode(x, scale=0.1, zero_point=1)
    for bad in ({"scale": 0.1, "zero_point": 1.0}, {"scale": 0.1, "zero_point": 1.5},
                {"scale": 0.1, "zero_point": 128}, {"scale": float("nan"), "zero_point": 1},
                {"scale": 0.1, "zero_point": 1, "request_id": b"short"},
                {"scale": 0.1, "zero_point": 1, "timestamp_us": -1}):
        with pytest.raises(ValueError):
            encoder.encode(x, **bad)
    with pytest.raises(ValueError, match="features dtype"):
        encoder.encode(np.ones((1, 3)), scale=0.1, zero_point=1)
    assert encoder.encode(x, scale=np.float64(0.1), zero_point=np.int8(1)) != b""  # numpy scalars are fine
    assert encoder.encode(x, scale=np.array(0.1), zero_point=1) != b""             # unhashable, still checked


@pytest.mark.parametrize("kwargs, needle", [({"key": b"short"}, "16 bytes"), ({"device_id": "dev 1"}, "device_id"),
                                            ({"model_id": "xyz"}, "model_id")])
def test_frame_encoder_refuses_a_bad_device_at_construction(kwargs, needle):
    args = {"key": KEY, "device_id": DEV, "model_id": "0123456789abcdef", **kwargs}
    with pytest.raises(ValueError, match=needle):
        wire.FrameEncoder(**args)
    with pytest.raises(ValueError, match=needle):  # and the one-shot form, every time (nothing cached)
        wire.encode(np.ones(2, np.float32), **args)


def test_generated_request_ids_are_uuid4_and_fresh():
    import uuid

    encoder = wire.FrameEncoder(key=KEY, device_id=DEV, model_id="0123456789abcdef")
    rids = {wire.peek_header(encoder.encode(np.ones(2, np.float32))).request_id for _ in range(200)}
    assert len(rids) == 200
    assert all(uuid.UUID(bytes=r).version == 4 and uuid.UUID(bytes=r).variant == uuid.RFC_4122 for r in rids)
