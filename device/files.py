"""Atomic file writes for the device and cloud sides: a temp file in the same folder, fsync, rename.

(training/_io.py holds the same few lines for the training stage, which may not import device.)
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes"]


def atomic_write_bytes(path, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a torn one.

    ``private`` creates the file with mode 0600 (keys); otherwise the umask applies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
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
