"""Files, written once here for every stage: atomic writes, JSON with one NaN policy, sha256 of a file.

Standard library only (device is the ground floor every stage may import). A write goes to a temp
file in the same folder, is fsynced, then renamed over the target: readers see the old file or the
new one, never a torn one. JSON is written with NaN and infinity as null (they are not JSON), and
read back with one reader whose error names the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["append_jsonl", "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_jsonl", "install_file", "read_json", "read_jsonl", "sha256_file"]


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temp path next to `path` for a writer that wants a file name (matplotlib, torch.onnx);
    on success it is fsynced and renamed over `path`, on an error removed. The umask sets the mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes, *, private: bool = False) -> Path:
    """Write `data` to `path` atomically; `private` creates the file with mode 0600 (keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, *, indent: int | None = 2, sort_keys: bool = False, default=None,
                      private: bool = False) -> Path:
    """`obj` as JSON, atomically; NaN and infinity are written as null. `default` as in json.dumps."""
    text = json.dumps(_finite(obj), indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"), private=private)


def atomic_write_jsonl(path, records) -> Path:
    """Rewrite a whole JSON-lines file atomically (one compact object a line, NaN as null)."""
    lines = "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in records)
    return atomic_write_bytes(path, lines.encode("utf-8"))


def append_jsonl(path, record, *, sort_keys: bool = False) -> None:
    """Append one compact JSON line (NaN as null) and fsync it: an append-only log such as the
    cloud store's index. A crash can leave a torn last line; read_jsonl stops before it."""
    line = json.dumps(_finite(record), sort_keys=sort_keys, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _finite(obj):
    """A copy of `obj` with every non-finite float replaced by None (the JSON NaN policy)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_json(path):
    """The JSON document in `path`; ValueError naming the file if it is not JSON (a missing file
    raises FileNotFoundError, for the caller to say which stage writes it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_jsonl(path) -> list:
    """The records of a JSON-lines file, up to the first torn line ([] if the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def install_file(src, dst) -> Path:
    """Move a finished file into place atomically: fsync, then rename; across filesystems, copy to
    a temp file next to `dst` first."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _fsync(src)
    try:
        os.replace(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()
    return dst


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
