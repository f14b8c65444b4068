"""Wire frames: the authenticated binary message a device sends to the cloud (numpy + stdlib only).

One frame carries one feature tensor from the head. Version 1, every integer little-endian:

| offset        | size   | field          | type  | decoder requires (else FrameError naming the field) |
|---------------|--------|----------------|-------|------------------------------------------------------|
| 0             | 4      | magic          | bytes | b"EVF1"                                              |
| 4             | 1      | version        | u8    | 1                                                    |
| 5             | 1      | flags          | u8    | bit 0 "quantized" set iff dtype is integer; 1-7 zero |
| 6             | 1      | dtype          | u8    | 1 int8, 2 uint8, 3 int16, 4 float16, 5 float32       |
| 7             | 1      | ndim           | u8    | 1..6                                                 |
| 8             | 2      | device_id len  | u16   | 1..64 (field "device_id")                            |
| 10            | 8      | model_id       | bytes | any; shown as 16 lowercase hex (head sha256 prefix)  |
| 18            | 16     | request_id     | bytes | any (the encoder uses uuid4 bytes)                   |
| 34            | 8      | timestamp_us   | u64   | any (informational, µs since the epoch)              |
| 42            | 8      | scale          | f64   | integer dtype: finite and > 0; float dtype: 0.0    |
| 50            | 4      | zero_point     | i32   | integer dtype: in the dtype's range; float dtype: 0  |
| 54            | n      | device_id      | ASCII | [A-Za-z0-9._-]                                       |
| 54+n          | 4*ndim | dims           | u32[] | each >= 1; <= max_elements, <= max_payload bytes     |
| 54+n+4*ndim   | 4      | payload_length | u32   | == prod(dims) * itemsize                             |
| H=58+n+4*ndim | L      | payload        | bytes | the tensor, C order, little-endian                   |
| H+L           | 32     | tag            | bytes | HMAC-SHA256 of bytes [0, H+L) under the device key   |

A frame is exactly H + L + 32 bytes ("length"). `decode` checks, in this order and before touching the
payload: length bounds, magic, version, every header field, payload_length and the exact length, that
the device is known, the tag (constant time), the model id; then it copies the payload into an array.

A device sending many frames keeps one `FrameEncoder` (key, device id and model id checked once; the
HMAC key schedule, the header bytes of each feature shape and the checked quantization parameters
cached): per frame it packs 36 bytes, hashes the header and the array's own buffer, and joins them,
one copy of the payload. `encode` is the one-shot form, the same bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import operator
import os
import re
import secrets
import struct
import time
from collections import namedtuple
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .files import atomic_write_json

from .quant import dequantize

__all__ = ["MAGIC", "VERSION", "MAX_ELEMENTS", "MAX_PAYLOAD", "MAX_NDIM", "MAX_DEVICE_ID", "TAG_SIZE",
           "MIN_FRAME", "DTYPES", "Frame", "FrameEncoder", "FrameError", "Header", "encode", "decode", "peek_header",
           "peek_device_id", "new_device_key", "read_key_file", "write_key_file"]

log = logging.getLogger(__name__)

MAGIC, VERSION = b"EVF1", 1
MAX_ELEMENTS, MAX_PAYLOAD = 16 * 1024 * 1024, 64 * 1024 * 1024
MAX_NDIM, MAX_DEVICE_ID, MIN_KEY, TAG_SIZE, FLAG_QUANTIZED = 6, 64, 16, 32, 0x01
DTYPES = {1: np.dtype("<i1"), 2: np.dtype("<u1"), 3: np.dtype("<i2"), 4: np.dtype("<f2"), 5: np.dtype("<f4")}
_CODES = {dt: code for code, dt in DTYPES.items()}
_QUANTIZED = {1, 2, 3}

_FIXED = struct.Struct("<4sBBBBH8s16sQdi")        # magic .. zero_point
_LEAD = struct.Struct("<4sBBBBH8s")                # magic .. model_id: fixed for one device, model and layout
_PER_FRAME = struct.Struct("<16sQdi")              # request_id .. zero_point
_CACHE_LIMIT = 64                                  # layouts / quantization parameters one encoder remembers
MIN_FRAME = _FIXED.size + 1 + 4 + 4 + 1 + TAG_SIZE  # 1-char id, one dim of one 1-byte element
_MAX_HEADER = _FIXED.size + MAX_DEVICE_ID + 4 * MAX_NDIM + 4
_DEVICE_ID = re.compile(rb"[A-Za-z0-9._-]{1,%d}" % MAX_DEVICE_ID)
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_Header = namedtuple("_Header", "code dims device_id model_id request_id timestamp_us scale zero_point "
                                "payload_at payload_len")


class FrameError(ValueError):
    """A frame was rejected; `field` names the offending field ("length", "magic", ..., "tag")."""

    def __init__(self, field: str, message: str):
        super().__init__(f"frame field {field!r}: {message}")
        self.field = field


class Header(NamedTuple):
    """The fixed header fields of a frame, read by `peek_header` before anything is verified."""
    version: int
    flags: int
    dtype_code: int
    ndim: int
    device_id: str
    model_id: str         # 16 lowercase hex
    request_id: bytes     # 16 bytes
    timestamp_us: int     # µs since the epoch, as the device wrote it


@dataclass(frozen=True, eq=False)
class Frame:
    """A verified frame. features: (d0, ..., dk) of the sent dtype; scale/zero_point None if float."""
    device_id: str
    model_id: str
    request_id: bytes
    features: np.ndarray
    scale: float | None
    zero_point: int | None
    timestamp_us: int

    def dequantized(self) -> np.ndarray:
        """The features as float32: (q - zero_point) * scale for integer frames."""
        if self.scale is None:
            return self.features.astype(np.float32)
        return dequantize(self.features, self.scale, self.zero_point)


class FrameEncoder:
    """Frames for one device key, device id and model id (checked once, here; ValueError if bad).

    encode(features, scale=, zero_point=, request_id=, timestamp_us=) -> frame bytes, exactly what
    `encode` makes. Threads may share one: the HMAC template is only ever copied, and a cache entry,
    once written, always holds the same value for its key.
    """

    def __init__(self, *, key: bytes, device_id: str, model_id: str):
        self._mac = hmac.new(_check_key(key), digestmod="sha256")  # the key schedule, copied per frame
        self._dev = _device_id_bytes(device_id)
        if not isinstance(model_id, str) or not _HEX16.fullmatch(model_id):
            raise ValueError(f"model_id must be 16 hex digits (the head's sha256 prefix), got {model_id!r}")
        self.device_id, self.model_id, self._mid = device_id, model_id, bytes.fromhex(model_id)
        self._layouts: dict = {}   # (dtype, shape) -> _Layout
        self._qparams: dict = {}   # (code, scale and zero point with their types) -> (scale, zero_point)

    def encode(self, features: np.ndarray, *, scale=None, zero_point=None, request_id: bytes | None = None,
               timestamp_us: int | None = None) -> bytes:
        """features: int8/uint8/int16 (with scale and zero_point) or float16/float32 array -> frame bytes."""
        arr = features if isinstance(features, np.ndarray) else np.asarray(features)
        layout = self._layouts.get((arr.dtype, arr.shape)) or self._new_layout(arr)
        qkey = (layout.code, type(scale), scale, type(zero_point), zero_point)
        try:
            qparams = self._qparams.get(qkey) or self._checked_qparams(qkey)
        except TypeError:  # an unhashable scale or zero point (a 0-d array): check it, remember nothing
            qparams = _encode_qparams(layout.code, scale, zero_point)
        if request_id is None:
            rid = _uuid4_bytes()
        elif isinstance(request_id, (bytes, bytearray)) and len(request_id) == 16:
            rid = bytes(request_id)
        else:
            raise ValueError(f"request_id must be 16 bytes, got {request_id!r}")
        ts = time.time_ns() // 1000 if timestamp_us is None else int(timestamp_us)
        if not 0 <= ts < 2**64:
            raise ValueError(f"timestamp_us must be a u64, got {ts}")
        payload = arr if arr.dtype == layout.dtype and arr.flags.c_contiguous else np.ascontiguousarray(
            arr, dtype=layout.dtype)
        head = b"".join((layout.lead, _PER_FRAME.pack(rid, ts, *qparams), layout.rest))
        mac = self._mac.copy()
        mac.update(head)
        mac.update(payload)  # the array's own buffer: no copy
        return b"".join((head, payload, mac.digest()))

    def _new_layout(self, arr: np.ndarray) -> _Layout:
        code = _CODES.get(arr.dtype.newbyteorder("<"))
        if code is None:
            raise ValueError(f"features dtype must be int8, uint8, int16, float16 or float32, got {arr.dtype}")
        if not 1 <= arr.ndim <= MAX_NDIM or not all(1 <= d < 2**32 for d in arr.shape) or arr.nbytes >= 2**32:
            raise ValueError(f"features must have 1..{MAX_NDIM} dims of 1..2**32-1 and < 4 GiB, got {arr.shape}")
        flags = FLAG_QUANTIZED if code in _QUANTIZED else 0
        lead = _LEAD.pack(MAGIC, VERSION, flags, code, arr.ndim, len(self._dev), self._mid)
        rest = b"".join((self._dev, struct.pack(f"<{arr.ndim}I", *arr.shape), struct.pack("<I", arr.nbytes)))
        layout = _Layout(code, DTYPES[code], lead, rest)
        _remember(self._layouts, (arr.dtype, arr.shape), layout)
        return layout

    def _checked_qparams(self, qkey: tuple) -> tuple[float, int]:
        code, _, scale, _, zero_point = qkey
        qparams = _encode_qparams(code, scale, zero_point)
        _remember(self._qparams, qkey, qparams)
        return qparams


class _Layout(NamedTuple):
    code: int
    dtype: np.dtype    # the little-endian dtype sent
    lead: bytes        # bytes [0, 18): magic .. model_id
    rest: bytes        # device_id, dims, payload_length


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


def _uuid4_bytes() -> bytes:
    """uuid.uuid4().bytes without building a UUID object: 16 random bytes, version 4, RFC 4122 variant."""
    rid = bytearray(os.urandom(16))
    rid[6] = (rid[6] & 0x0F) | 0x40
    rid[8] = (rid[8] & 0x3F) | 0x80
    return bytes(rid)


def encode(features: np.ndarray, *, key: bytes, device_id: str, model_id: str, scale=None,
           zero_point=None, request_id: bytes | None = None, timestamp_us: int | None = None) -> bytes:
    """features: int8/uint8/int16 (with scale and zero_point) or float16/float32 array -> frame bytes.
    One frame: the same bytes as `FrameEncoder(key=, device_id=, model_id=).encode(...)`; a device
    sending many keeps one FrameEncoder instead (pipeline.device_stage does)."""
    return FrameEncoder(key=key, device_id=device_id, model_id=model_id).encode(
        features, scale=scale, zero_point=zero_point, request_id=request_id, timestamp_us=timestamp_us)


def _encode_qparams(code: int, scale, zero_point) -> tuple[float, int]:
    quantized = code in _QUANTIZED
    if not quantized and scale is None and zero_point is None:
        return 0.0, 0
    if not quantized or scale is None or zero_point is None:
        raise ValueError(f"{DTYPES[code]} features take {'both' if quantized else 'no'} scale and zero_point")
    try:
        s, zp = float(scale), operator.index(zero_point)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"scale must be a float and zero_point an int: {e}") from e
    if problem := _qparams_problem(code, s, zp):
        raise ValueError(" ".join(problem))
    return s, zp


def _qparams_problem(code: int, scale: float, zp: int) -> tuple[str, str] | None:
    """(field, what is wrong) with a scale and zero point, or None; float dtypes carry 0 and 0."""
    if code not in _QUANTIZED:
        ok = scale == 0 and zp == 0
        return None if ok else (("scale", "zero_point")[scale == 0], f"must be 0 for {DTYPES[code]}")
    if not (math.isfinite(scale) and scale > 0):
        return "scale", f"must be finite and > 0, got {scale}"
    info = np.iinfo(DTYPES[code])
    if not info.min <= zp <= info.max:
        return "zero_point", f"must be in {info.min}..{info.max} for {DTYPES[code]}, got {zp}"
    return None


def _device_id_bytes(device_id: str) -> bytes:
    raw = device_id.encode("ascii", "replace") if isinstance(device_id, str) else b""
    if not _DEVICE_ID.fullmatch(raw):
        raise ValueError(f"device_id must be 1..{MAX_DEVICE_ID} chars of [A-Za-z0-9._-], got {device_id!r}")
    return raw


def peek_header(data: bytes) -> Header:
    """The header fields of a frame, read from at most its first 118 bytes. Nothing is verified
    yet (no tag, no bounds on dims): use it to route or to explain a rejection, never to trust.
    Raises FrameError("length") for a body too short to be a frame, and names magic, version or
    device_id when those are malformed."""
    view = _as_view(data)
    if len(view) < MIN_FRAME:
        raise FrameError("length", f"at least {MIN_FRAME} bytes expected, got {len(view)}")
    magic, version, flags, code, ndim, n, mid, rid, ts, _scale, _zp = _FIXED.unpack_from(view)
    _check_magic_version(magic, version)
    return Header(version, flags, code, ndim, _read_device_id(view, n), mid.hex(), bytes(rid), ts)


def peek_device_id(data: bytes) -> str:
    """The sender's device id (`peek_header(data).device_id`); nothing is verified yet."""
    return peek_header(data).device_id


def decode(data: bytes, keys: Mapping[str, bytes] | Callable[[str], bytes | None], *,
           max_payload: int = MAX_PAYLOAD, max_elements: int = MAX_ELEMENTS,
           expected_model_ids: Collection[str] | None = None) -> Frame:
    """Verify and parse a frame. keys: device id -> key (a mapping, or a function returning None
    for an unknown device). Raises FrameError naming the field; ValueError for a bad argument."""
    if not (isinstance(max_payload, int) and isinstance(max_elements, int)) or min(max_payload, max_elements) < 1:
        raise ValueError(f"max_payload, max_elements must be positive ints, got {max_payload}, {max_elements}")
    if isinstance(expected_model_ids, str):
        raise TypeError("expected_model_ids must be a collection of model ids, not one string")
    view = _as_view(data)
    h = _parse_header(view, max_payload, max_elements)
    key = keys.get(h.device_id) if isinstance(keys, Mapping) else keys(h.device_id)
    if key is None:
        raise FrameError("device_id", f"unknown device {h.device_id!r}")
    key = _check_key(key)
    body_end = h.payload_at + h.payload_len
    tag = hmac.new(key, view[:body_end], hashlib.sha256).digest()
    if not hmac.compare_digest(tag, view[body_end:]):
        raise FrameError("tag", f"HMAC-SHA256 does not verify under the key of {h.device_id!r}")
    if expected_model_ids is not None and h.model_id not in {m.lower() for m in expected_model_ids}:
        raise FrameError("model_id", f"expected one of {sorted(expected_model_ids)}, got {h.model_id}")
    dt = DTYPES[h.code]
    arr = np.frombuffer(view, dtype=dt, count=h.payload_len // dt.itemsize, offset=h.payload_at)
    features = arr.reshape(h.dims).astype(dt.newbyteorder("="))  # a native-order copy
    return Frame(h.device_id, h.model_id, h.request_id, features, h.scale, h.zero_point, h.timestamp_us)


def _as_view(data) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"a frame is bytes, bytearray or memoryview, got {type(data).__name__}")
    return memoryview(data).cast("B")


def _check_magic_version(magic: bytes, version: int) -> None:
    if magic != MAGIC:
        raise FrameError("magic", f"expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise FrameError("version", f"expected {VERSION}, got {version}")


def _read_device_id(view: memoryview, n: int) -> str:
    raw = bytes(view[_FIXED.size:_FIXED.size + n]) if n <= MAX_DEVICE_ID else b""
    if not 1 <= n <= MAX_DEVICE_ID or len(raw) != n or not _DEVICE_ID.fullmatch(raw):
        raise FrameError("device_id", f"expected 1..{MAX_DEVICE_ID} chars of [A-Za-z0-9._-], length {n}")
    return raw.decode("ascii")


def _parse_header(view: memoryview, max_payload: int, max_elements: int) -> _Header:
    max_frame = _MAX_HEADER + max_payload + TAG_SIZE
    if not MIN_FRAME <= len(view) <= max_frame:
        raise FrameError("length", f"{MIN_FRAME}..{max_frame} bytes expected, got {len(view)}")
    magic, version, flags, code, ndim, n, mid, rid, ts, scale, zp = _FIXED.unpack_from(view)
    _check_magic_version(magic, version)
    if code not in DTYPES:
        raise FrameError("dtype", f"expected a code in {sorted(DTYPES)}, got {code}")
    if flags != (FLAG_QUANTIZED if code in _QUANTIZED else 0):
        raise FrameError("flags", f"expected bit 0 (quantized) = {int(code in _QUANTIZED)} and no other bit "
                                  f"for {DTYPES[code]}, got {flags:#04x}")
    if not 1 <= ndim <= MAX_NDIM:
        raise FrameError("ndim", f"expected 1..{MAX_NDIM}, got {ndim}")
    device_id = _read_device_id(view, n)
    if problem := _qparams_problem(code, scale, zp):
        raise FrameError(*problem)
    at = _FIXED.size + n
    if len(view) < at + 4 * ndim + 4 + TAG_SIZE:
        raise FrameError("length", f"too short for a {ndim}-d header, got {len(view)} bytes")
    dims = struct.unpack_from(f"<{ndim}I", view, at)
    itemsize = DTYPES[code].itemsize
    if min(dims) < 1 or math.prod(dims) > max_elements or math.prod(dims) * itemsize > max_payload:
        raise FrameError("dims", f"each >= 1, at most {max_elements} elements and {max_payload} bytes "
                                 f"expected, got {list(dims)}")
    (payload_len,) = struct.unpack_from("<I", view, at + 4 * ndim)
    if payload_len != math.prod(dims) * itemsize:
        raise FrameError("payload_length", f"expected prod{dims} * {itemsize}, got {payload_len}")
    payload_at = at + 4 * ndim + 4
    if len(view) != payload_at + payload_len + TAG_SIZE:
        raise FrameError("length", f"expected {payload_at + payload_len + TAG_SIZE} bytes, got {len(view)}")
    qparams = (scale, zp) if code in _QUANTIZED else (None, None)
    return _Header(code, dims, device_id, mid.hex(), bytes(rid), ts, *qparams, payload_at, payload_len)


def _check_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY:
        raise ValueError(f"a device key must be at least {MIN_KEY} bytes")
    return bytes(key)


def new_device_key() -> bytes:
    """A fresh random 32-byte per-device key."""
    return secrets.token_bytes(32)


def write_key_file(path: str | os.PathLike, keys: Mapping[str, bytes]) -> None:
    """Write {device_id: hex key} as JSON, mode 0600, atomically (temp file, then os.replace)."""
    doc = {_device_id_bytes(d).decode(): _check_key(k).hex() for d, k in keys.items()}
    atomic_write_json(path, doc, sort_keys=True, private=True)


def read_key_file(path: str | os.PathLike) -> dict[str, bytes]:
    """Read a key file written by `write_key_file`; ValueError names the file and the entry."""
    path = os.fspath(path)
    if os.name == "posix" and os.stat(path).st_mode & 0o077:
        log.warning("key file %s is readable by group or others; chmod 600 it", path)
    try:
        with open(path, encoding="ascii") as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON key file: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected an object {{device_id: hex key}}")
    try:
        return {_device_id_bytes(d).decode(): _check_key(bytes.fromhex(k) if isinstance(k, str) else None)
                for d, k in doc.items()}
    except ValueError as e:
        raise ValueError(f"{path}: bad entry: {e}") from e
