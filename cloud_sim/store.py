"""The cloud's frame store: every verified frame the device sent, kept as its raw bytes.

Layout (``runs/<name>/cloud/features/``)::

    00000000-<request_id hex>.evf   the frame exactly as received (HMAC tag included), written atomically
    index.jsonl                     one JSON object per stored frame, in arrival order:
                                    {"schema", "seq", "file", "request_id", "device_id", "model_id",
                                     "precision", "shape", "dtype", "sha256", "time", "timestamp_us"}
                                    appended and fsynced before the server answers: the record the
                                    replay window reloads its request ids from after a restart

Attacks call `read_store(run_dir, keys)`, which re-verifies each frame with the device keys, so
they work on exactly what the device sent. The store holds at most `cap` frames; once full, `add`
raises `StoreFull` and `refused` counts it: the server refuses the frame (503 with Retry-After)
rather than answer one it has not kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from edgeveil.device import wire
from edgeveil.device.files import append_jsonl, atomic_write_bytes

from .replay import Seen

__all__ = ["INDEX_SCHEMA", "FrameStore", "StoreFull", "ReplyCache", "features_dir", "read_store", "default_keys_path",
           "load_or_create_keys"]

log = logging.getLogger(__name__)

INDEX_SCHEMA = "edgeveil.frames/1"
_INDEX = "index.jsonl"


def features_dir(run_dir) -> Path:
    """Where a run keeps the frames its cloud received."""
    return Path(run_dir) / "cloud" / "features"


class StoreFull(RuntimeError):
    """The store already keeps `cap` frames; `field` names what the reply blames."""
    field = "store"


class FrameStore:
    """Append-only, bounded store of raw frames; thread safe. Resumes an existing index."""

    def __init__(self, folder: Path, cap: int):
        if not isinstance(cap, int) or cap < 0:
            raise ValueError(f"store_cap must be an int >= 0, got {cap!r}")
        self.folder, self.cap = Path(folder), cap
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = _read_index(self.folder)
        self.stored = len(entries)
        self._next_seq = max((e["seq"] for e in entries), default=-1) + 1
        self.refused = 0
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.stored >= self.cap

    def refuse_if_full(self) -> None:
        """StoreFull (and one more `refused`) when no frame can be kept: call it before work is spent."""
        with self._lock:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        if self.full:
            self.refused += 1
            raise StoreFull(f"the frame store is full: it keeps at most {self.cap} frames ({self.folder}); "
                            "move them away, or restart the server with a larger --store-cap")

    def add(self, data: bytes, frame: wire.Frame, precision: str) -> None:
        """Keep one verified frame durably (the index line is fsynced); StoreFull when it cannot."""
        with self._lock:
            self._refuse_if_full()
            seq, rid = self._next_seq, frame.request_id.hex()
            name = f"{seq:08d}-{rid}.evf"
            atomic_write_bytes(self.folder / name, data)
            entry = {"schema": INDEX_SCHEMA, "seq": seq, "file": name, "request_id": rid,
                     "device_id": frame.device_id, "model_id": frame.model_id, "precision": precision,
                     "shape": list(frame.features.shape), "dtype": str(frame.features.dtype),
                     "sha256": hashlib.sha256(data).hexdigest(), "time": round(time.time(), 6),
                     "timestamp_us": frame.timestamp_us}
            append_jsonl(self.folder / _INDEX, entry, sort_keys=True)  # fsynced: the line is the commit
            self._next_seq, self.stored = seq + 1, self.stored + 1

    def accepted(self) -> list[Seen]:
        """Every stored frame as the replay window remembers it (indexes without timestamp_us, from
        before it was recorded, use the arrival time)."""
        return [Seen(e["device_id"], bytes.fromhex(e["request_id"]), e["sha256"], float(e["time"]),
                     int(e.get("timestamp_us", e["time"] * 1e6))) for e in _read_index(self.folder)]


class ReplyCache:
    """Bounded LRU of replies keyed by (device_id, request_id), with the frame's sha256."""

    def __init__(self, cap: int):
        if not isinstance(cap, int) or cap < 1:
            raise ValueError(f"dedupe_cap must be an int >= 1, got {cap!r}")
        self.cap, self._items = cap, OrderedDict()

    def get(self, key: tuple[str, bytes]) -> tuple[str, dict] | None:
        """(frame sha256, reply) of an earlier request, or None."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, bytes], digest: str, reply: dict) -> None:
        self._items[key] = (digest, reply)
        self._items.move_to_end(key)
        while len(self._items) > self.cap:
            self._items.popitem(last=False)


def default_keys_path(run_dir) -> Path:
    """Where `serve` keeps the device keys of a run: cloud/keys.json (mode 0600)."""
    return Path(run_dir) / "cloud" / "keys.json"


def load_or_create_keys(path: Path, device_id: str = "device-0") -> dict[str, bytes]:
    """Read a key file, or create one (0600) with a fresh key for `device_id`."""
    path = Path(path)
    if path.exists():
        return wire.read_key_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {device_id: wire.new_device_key()}
    wire.write_key_file(path, keys)
    log.info("created device key file %s for %r", path, device_id)
    return keys


def read_store(run_dir, keys: Mapping[str, bytes]) -> list[wire.Frame]:
    """Every stored frame of a run, in arrival order, each re-verified (HMAC) with `keys`.

    Raises ValueError naming the file and the problem if a frame is missing, altered or does not
    match its index line. An empty or absent store gives [].
    """
    folder = features_dir(run_dir)
    frames = []
    for entry in _read_index(folder):
        path = folder / entry["file"]
        try:
            data = path.read_bytes()
            frame = wire.decode(data, keys, max_payload=max(len(data), 1))
        except OSError as e:
            raise ValueError(f"{path}: listed in {folder / _INDEX} but unreadable: {e}") from e
        except wire.FrameError as e:
            raise ValueError(f"{path}: does not verify: {e}") from e
        if frame.request_id.hex() != entry["request_id"] or frame.device_id != entry["device_id"]:
            raise ValueError(f"{path}: request_id/device_id differ from line seq={entry['seq']} of the index")
        frames.append(frame)
    return frames


def _read_index(folder: Path) -> list[dict]:
    path = folder / _INDEX
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            ok = entry.get("schema") == INDEX_SCHEMA and isinstance(entry.get("seq"), int)
        except (ValueError, AttributeError):
            ok = False
        if not ok or Path(str(entry.get("file", ""))).name != entry.get("file"):
            raise ValueError(f"{path}: line {n} is not a {INDEX_SCHEMA} entry")
        entries.append(entry)
    return entries
