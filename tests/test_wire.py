"""Wire frames: the documented layout, round trips, every field tampered, bounds, and fuzzing."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgeveil.device import wire
from edgeveil.device.wire import FrameError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
DEV = "dev-1"
MID = "0123456789abcdef"
KEYS = {DEV: KEY}
RID = bytes(range(100, 116))
QPARAMS = {"int8": (0.0371, -5), "uint8": (0.5, 128), "int16": (1e-4, 0)}
DTYPE_CODES = {"int8": 1, "uint8": 2, "int16": 3, "float16": 4, "float32": 5}


def build(*, magic=b"EVF1", version=1, flags=None, dtype="int8", ndim=None, dev_len=None, model=MID,
          rid=RID, ts=123, scale=None, zp=None, dev=DEV, dims=(2, 3), plen=None, payload=None, key=KEY):
    """A frame packed straight from the table in wire's docstring, independent of wire.encode."""
    dt = np.dtype(dtype).newbyteorder("<")
    quantized = dtype in QPARAMS
    flags = (1 if quantized else 0) if flags is None else flags
    s, z = QPARAMS[dtype] if quantized else (0.0, 0)
    scale, zp = s if scale is None else scale, z if zp is None else zp
    dev_b = dev.encode() if isinstance(dev, str) else dev
    if payload is None:
        payload = (np.arange(int(np.prod(dims))) % 7).astype(dt).tobytes()
    body = (struct.pack("<4sBBBBH", magic, version, flags, DTYPE_CODES[dtype], len(dims) if ndim is None else ndim,
                        len(dev_b) if dev_len is None else dev_len)
            + bytes.fromhex(model) + rid + struct.pack("<Qdi", ts, scale, zp) + dev_b
            + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<I", len(payload) if plen is None else plen)
            + payload)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def field_of(data: bytes, **kw) -> str:
    with pytest.raises(FrameError) as info:
        wire.decode(data, KEYS, **kw)
    assert info.value.field in str(info.value)
    return info.value.field


def test_encoder_writes_exactly_the_documented_layout():
    x = (np.arange(6) % 7).astype(np.int8).reshape(2, 3)
    assert wire.encode(x, key=KEY, device_id=DEV, model_id=MID, scale=0.0371, zero_point=-5, request_id=RID,
                       timestamp_us=123) == build()
    f = wire.encode(np.zeros(3, np.float32), key=KEY, device_id=DEV, model_id=MID, request_id=RID, timestamp_us=123)
    assert f == build(dtype="float32", dims=(3,), payload=bytes(12))
    assert len(build()) == 54 + len(DEV) + 8 + 4 + 6 + 32


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3), (1, 4, 4, 8), (1, 2, 1, 3, 1, 2)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    if dtype in QPARAMS:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        scale, zp = QPARAMS[dtype]
    else:
        x, scale, zp = rng.standard_normal(shape).astype(dtype), None, None
    data = wire.encode(x, key=KEY, device_id=DEV, model_id=MID, scale=scale, zero_point=zp)
    assert wire.peek_device_id(data) == DEV
    f = wire.decode(data, KEYS, expected_model_ids={MID})
    assert f.features.dtype == x.dtype and f.features.shape == shape
    np.testing.assert_array_equal(f.features, x)
    assert (f.scale, f.zero_point, f.device_id, f.model_id) == (scale, zp, DEV, MID)
    assert len(f.request_id) == 16 and f.timestamp_us > 1_600_000_000 * 10**6
    assert f.features.flags.owndata and f.features.flags.writeable  # a copy, not a view of the frame


def test_big_endian_and_strided_inputs_go_out_little_endian():
    x = np.arange(24, dtype=">f4").reshape(2, 3, 4).transpose(2, 0, 1)
    f = wire.decode(wire.encode(x, key=KEY, device_id=DEV, model_id=MID), KEYS)
    assert f.features.dtype == np.float32
    np.testing.assert_array_equal(f.features, x)


def test_dequantized_matches_the_affine_rule():
    q = np.array([-128, -5, 0, 127], np.int8)
    f = wire.decode(wire.encode(q, key=KEY, device_id=DEV, model_id=MID, scale=0.5, zero_point=-5), KEYS)
    np.testing.assert_array_equal(f.dequantized(), [-61.5, 0.0, 2.5, 66.0])
    g = wire.decode(wire.encode(np.ones(2, np.float16), key=KEY, device_id=DEV, model_id=MID), KEYS)
    assert g.dequantized().dtype == np.float32


NAN, INF = float("nan"), float("inf")
TAMPERS = {  # name: (build() overrides, the fields the decoder may name)
    "magic": ({"magic": b"EVF2"}, {"magic"}),
    "version 0": ({"version": 0}, {"version"}),
    "version 2": ({"version": 2}, {"version"}),
    "flags reserved bit": ({"flags": 3}, {"flags"}),
    "flags quantized bit cleared": ({"flags": 0}, {"flags"}),
    "ndim 0": ({"ndim": 0}, {"ndim"}),
    "ndim 7": ({"ndim": 7}, {"ndim"}),
    "ndim 1": ({"ndim": 1}, {"payload_length"}),
    "device id length 0": ({"dev_len": 0}, {"device_id"}),
    "device id length 65": ({"dev_len": 65}, {"device_id"}),
    "device id length short": ({"dev_len": 4}, {"dims", "payload_length", "length"}),
    "device id bad char": ({"dev": "dev/1"}, {"device_id"}),
    "device id not ascii": ({"dev": b"dev\xff1"}, {"device_id"}),
    "device id unknown": ({"dev": "dev-2"}, {"device_id"}),
    "model id": ({"model": "0123456789abcdee"}, {"tag"}),
    "request id": ({"rid": bytes(16)}, {"tag"}),
    "timestamp": ({"ts": 2**64 - 1}, {"tag"}),
    "scale nan": ({"scale": NAN}, {"scale"}),
    "scale inf": ({"scale": INF}, {"scale"}),
    "scale zero": ({"scale": 0.0}, {"scale"}),
    "scale negative": ({"scale": -0.5}, {"scale"}),
    "scale other": ({"scale": 0.5}, {"tag"}),
    "zero point out of int8": ({"zp": 128}, {"zero_point"}),
    "zero point other": ({"zp": 3}, {"tag"}),
    "float scale nonzero": ({"dtype": "float32", "scale": 1.0}, {"scale"}),
    "float zero point nonzero": ({"dtype": "float32", "zp": 1}, {"zero_point"}),
    "float flags quantized": ({"dtype": "float32", "flags": 1}, {"flags"}),
    "dim zero": ({"dims": (2, 0), "payload": b""}, {"dims"}),
    "dim larger": ({"dims": (2, 4), "payload": bytes(6)}, {"payload_length"}),
    "payload_length": ({"plen": 7}, {"payload_length"}),
    "payload": ({"payload": bytes(6)}, {"tag"}),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_each_header_field_tampered_is_rejected_by_name(name):
    overrides, fields = TAMPERS[name]
    forged = build(**overrides)[:-32] + build()[-32:]  # changed in transit, the device's tag kept
    assert field_of(forged) in fields
    if fields != {"tag"}:  # out of range: rejected even when the device itself signed it
        assert field_of(build(**overrides)) in fields


@pytest.mark.parametrize("code, fields", [(0, {"dtype"}), (6, {"dtype"}), (255, {"dtype"}), (2, {"zero_point"}),
                                          (3, {"payload_length"}), (4, {"flags"}), (5, {"flags"})])
def test_dtype_tampered(code, fields):
    data = bytearray(build())
    data[6] = code
    assert field_of(bytes(data)) in fields


def test_every_single_byte_change_is_rejected():
    good = build()
    for pos in range(len(good)):
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[pos] ^= xor
            with pytest.raises(FrameError):
                wire.decode(bytes(bad), KEYS)


def test_wrong_key_unknown_device_and_model_mismatch():
    data = build()
    assert field_of(build(key=OTHER_KEY)) == "tag"
    assert wire.decode(data, lambda d: KEY if d == DEV else None).device_id == DEV
    with pytest.raises(FrameError, match="unknown device") as info:
        wire.decode(data, {"someone-else": KEY})
    assert info.value.field == "device_id"
    assert field_of(data, expected_model_ids=["fedcba9876543210"]) == "model_id"
    assert wire.decode(data, KEYS, expected_model_ids=[MID.upper()]).model_id == MID
    with pytest.raises(TypeError):
        wire.decode(data, KEYS, expected_model_ids=MID)


def test_truncated_and_extended_frames():
    data = build()
    for n in range(len(data)):
        assert field_of(data[:n]) == "length"
    for extra in (b"\0", b"x" * 31, bytes(1000)):
        assert field_of(data + extra) == "length"
    assert field_of(data[:-1] + b"\0\0") == "length"


def test_size_bounds_apply_before_anything_is_allocated():
    huge = build(dims=(2**31,) * 6, payload=b"")
    tracemalloc.start()
    try:
        assert field_of(huge) == "dims"
        assert field_of(build(dims=(2**32 - 1,) * 6, payload=b""), max_elements=2**300, max_payload=2**300) \
            == "payload_length"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert field_of(build(dims=(4, 4)), max_elements=15) == "dims"
    assert field_of(build(dims=(4, 4)), max_payload=15) in {"length", "dims"}
    assert field_of(build(dtype="float32", dims=(4, 4)), max_payload=63) == "dims"
    assert field_of(build(dtype="uint8", dims=(100,)), max_payload=10) == "length"
    assert field_of(b"EVF1\x01" + bytes(wire.MAX_PAYLOAD + 200)) == "length"
    big = build(dtype="uint8", dims=(wire.MAX_ELEMENTS + 1,), payload=bytes(wire.MAX_ELEMENTS + 1))
    assert field_of(big) == "dims"
    assert wire.decode(big, KEYS, max_elements=wire.MAX_ELEMENTS + 1).features.size == wire.MAX_ELEMENTS + 1
    with pytest.raises(ValueError):
        wire.decode(build(), KEYS, max_payload=0)


def test_keys_must_be_long_enough():
    with pytest.raises(ValueError, match="16 bytes"):
        wire.encode(np.ones(2, np.float32), key=b"short", device_id=DEV, model_id=MID)
    with pytest.raises(ValueError, match="16 bytes") as info:
        wire.decode(build(), {DEV: b"x" * 15})
    assert not isinstance(info.value, FrameError)
    assert len(wire.new_device_key()) == 32 and wire.new_device_key() != wire.new_device_key()


@pytest.mark.parametrize("kwargs", [
    {"device_id": ""}, {"device_id": "a" * 65}, {"device_id": "dev 1"}, {"device_id": "dév"},
    {"model_id": "0123"}, {"model_id": "0123456789abcdeg"}, {"features": np.ones(3)},
    {"features": np.ones(3, bool)}, {"features": np.float32(1)}, {"features": np.ones((1,) * 7, np.float32)},
    {"features": np.ones((2, 0), np.float32)}, {"features": np.ones(2, np.int8)},
    {"features": np.ones(2, np.int8), "scale": 0.1}, {"scale": 0.1, "zero_point": 0},
    {"features": np.ones(2, np.int8), "scale": 0.0, "zero_point": 0},
    {"features": np.ones(2, np.int8), "scale": float("nan"), "zero_point": 0},
    {"features": np.ones(2, np.int8), "scale": 0.1, "zero_point": 128},
    {"features": np.ones(2, np.int8), "scale": 0.1, "zero_point": 1.5},
    {"request_id": b"short"}, {"request_id": 16}, {"timestamp_us": -1},
])
def test_encode_rejects_bad_arguments(kwargs):
    args = {"features": np.ones(2, np.float32), "key": KEY, "device_id": DEV, "model_id": MID, **kwargs}
    with pytest.raises(ValueError):
        wire.encode(args.pop("features"), **args)


def test_peek_reads_only_the_header():
    data = build()
    assert wire.peek_device_id(data[:wire.MIN_FRAME]) == DEV
    assert wire.peek_device_id(memoryview(data)) == DEV
    for bad in (b"", b"EVF1", b"XXXX" + data[4:], data[:8] + b"\x00\x00" + data[10:]):
        with pytest.raises(FrameError):
            wire.peek_device_id(bad)


def test_peek_header_reads_the_documented_fields_without_verifying():
    data = build(ts=1_700_000_000_123_456, key=OTHER_KEY)  # a tag no key here verifies
    h = wire.peek_header(data[:wire.MIN_FRAME])
    assert h == wire.Header(1, 1, DTYPE_CODES["int8"], 2, DEV, MID, RID, 1_700_000_000_123_456)
    assert wire.peek_header(build(dtype="float32", dims=(1, 2, 2), model="ff" * 8)).model_id == "ff" * 8
    cases = [(b"", "length"), (data[:wire.MIN_FRAME - 1], "length"), (b"XXXX" + data[4:], "magic"),
             (data[:4] + b"\x02" + data[5:], "version"), (data[:8] + b"\x00\x00" + data[10:], "device_id"),
             (data[:8] + b"\x41\x00" + data[10:], "device_id")]
    for bad, field in cases:
        with pytest.raises(FrameError) as info:
            wire.peek_header(bad)
        assert info.value.field == field, (bad[:12], info.value)
    with pytest.raises(TypeError):
        wire.peek_header("EVF1")


def test_key_file_round_trip_is_private_and_atomic(tmp_path):
    path = tmp_path / "keys.json"
    keys = {"pi4-01": wire.new_device_key(), "nano.2": wire.new_device_key()}
    wire.write_key_file(path, keys)
    wire.write_key_file(path, keys)  # replaces in place
    assert wire.read_key_file(path) == keys
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == {d: k.hex() for d, k in keys.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]
    with pytest.raises(ValueError):
        wire.write_key_file(path, {"bad id": KEY})
    assert wire.read_key_file(path) == keys  # a failed write leaves the old file
    for text in ("not json", "[]", '{"a": "zz"}', '{"a": "00ff"}', '{"bad id": "%s"}' % KEY.hex(), '{"a": 5}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="keys.json"):
            wire.read_key_file(path)


def test_wire_and_client_import_only_numpy_and_stdlib():
    code = ("import sys\n"
            "for m in ('torch', 'tensorflow', 'requests', 'httpx', 'pydantic'): sys.modules[m] = None\n"
            "import edgeveil.device.wire, edgeveil.device.client\n"
            "bad = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'numpy', 'edgeveil'}\n"
            "bad = {m for m in bad if not m.startswith('_') and sys.modules.get(m) is not None}\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- properties

def _decode_any(data: bytes) -> None:
    """Decode with a key for every device id, so random input reaches the tag check."""
    wire.decode(data, lambda device_id: KEY)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=400).map(lambda b: b"EVF1\x01" + b)))
def test_random_bytes_never_verify(data):
    with pytest.raises(FrameError):
        _decode_any(data)
    try:
        wire.peek_device_id(data)
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(flags=st.integers(0, 255), code=st.integers(0, 7), ndim=st.integers(0, 7), n=st.integers(0, 70),
       scale=st.floats(allow_nan=True, allow_infinity=True), zp=st.integers(-2**31, 2**31 - 1),
       dims=st.lists(st.sampled_from([0, 1, 2, 3, 255, 2**16, 2**31, 2**32 - 1]), max_size=7),
       plen=st.integers(0, 2**32 - 1), tail=st.binary(max_size=200))
def test_random_headers_never_crash_the_decoder(flags, code, ndim, n, scale, zp, dims, plen, tail):
    head = struct.pack("<4sBBBBH8s16sQdi", b"EVF1", 1, flags, code, ndim, n, bytes(8), RID, 0, scale, zp)
    data = head + b"d" * n + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<I", plen) + tail
    with pytest.raises(FrameError):
        _decode_any(data)


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("replace"), st.integers(0, 10_000), st.integers(0, 255)),
)


def _mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, pos, *arg in ops:
        pos = pos % (len(out) + 1)
        if op == "flip" and pos < len(out):
            out[pos] ^= 1 << arg[0]
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = arg[0]
        elif op == "replace" and pos < len(out):
            out[pos] = arg[0]
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(base=st.sampled_from([build(), build(dtype="float32", dims=(1, 2, 2)), build(dtype="int16", dims=(5,))]),
       ops=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_frames_never_decode(base, ops):
    bad = _mutate(base, ops)
    assume(bad != base)
    with pytest.raises(FrameError):
        _decode_any(bad)


_DTYPES = st.sampled_from([np.int8, np.uint8, np.int16, np.float16, np.float32, np.dtype(">f4"), np.dtype(">i2")])


@settings(max_examples=300, deadline=None)
@given(x=_DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=6, max_side=5))),
       rid=st.binary(min_size=16, max_size=16), ts=st.integers(0, 2**64 - 1),
       scale=st.floats(min_value=1e-30, max_value=1e30), zp=st.integers(-128, 127))
def test_random_arrays_round_trip_exactly(x, rid, ts, scale, zp):
    quantized = np.issubdtype(x.dtype, np.integer)
    zp = min(max(zp, int(np.iinfo(x.dtype).min)), int(np.iinfo(x.dtype).max)) if quantized else None
    data = wire.encode(x, key=KEY, device_id=DEV, model_id=MID, scale=scale if quantized else None,
                       zero_point=zp, request_id=rid, timestamp_us=ts)
    f = wire.decode(data, KEYS)
    assert f.features.shape == x.shape and f.features.dtype == x.dtype.newbyteorder("=")
    assert f.features.tobytes() == x.astype(x.dtype.newbyteorder("=")).tobytes()  # bit-exact, NaNs included
    assert (f.request_id, f.timestamp_us, f.zero_point) == (rid, ts, zp)
    assert f.scale == (scale if quantized else None)
