"""The cloud's replay window: which verified frames are fresh, which are retries, which are replays.

A frame whose tag verified is admitted by `ReplayWindow.check` only if

- its timestamp is within ±`tolerance_s` of the server's clock, else `Stale` (the reason states the
  tolerance and the skew);
- its (device_id, request_id) was not seen before. A seen id with the same bytes (sha256) within
  `retry_s` of its first arrival is a client retrying after a lost reply: `check` returns the earlier
  `Seen` record, and the server answers 200 without storing it again. Other bytes under a seen id, or
  the same bytes later than `retry_s`, raise `Replayed`.

An id is remembered until max(its timestamp + tolerance, first seen + retry window): after that its
own timestamp gets it refused, so forgetting it is safe. The window holds at most `max_ids` live ids;
beyond that `Full` (the server answers 503 with Retry-After, and the client backs off).

Ids survive a restart. The frame store's index already records every stored frame (device id, request
id, sha256, arrival time, timestamp), so the server hands those to `restore` and nothing is stored
twice. The edgeveil server answers a frame only once it is stored, so it never needs more; for a
caller that admits frames it does not store, `remember(..., durable=True)` appends them to
``replay.jsonl`` and fsyncs before the reply, and `restore` reads that log back and rewrites it with
only the ids still live.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from edgeveil.device.files import append_jsonl, atomic_write_bytes

__all__ = ["LOG_SCHEMA", "Seen", "ReplayError", "Stale", "Replayed", "Full", "ReplayWindow"]

log = logging.getLogger(__name__)

LOG_SCHEMA = "edgeveil.replay/1"


class Seen(NamedTuple):
    """One admitted frame: who sent it, its id and sha256, when it arrived (s) and what it says (µs)."""
    device_id: str
    request_id: bytes
    sha256: str
    seen_s: float
    timestamp_us: int


class ReplayError(ValueError):
    """A frame the replay window refuses; `field` names what was wrong."""
    field = "request_id"


class Stale(ReplayError):
    """The frame's timestamp is outside the tolerance."""
    field = "timestamp"


class Replayed(ReplayError):
    """The request id was already used: for other bytes, or longer ago than the retry window."""


class Full(ReplayError):
    """The window already remembers `max_ids` live ids."""


class ReplayWindow:
    """Timestamp tolerance and remembered request ids (not thread safe: the server holds its lock)."""

    def __init__(self, log_path, *, tolerance_s: float = 300.0, retry_s: float = 60.0,
                 max_ids: int = 1_000_000, clock: Callable[[], float] = time.time):
        if not (isinstance(tolerance_s, (int, float)) and math.isfinite(tolerance_s) and tolerance_s > 0):
            raise ValueError(f"replay tolerance must be a finite number of seconds > 0, got {tolerance_s!r}")
        if not (isinstance(retry_s, (int, float)) and 0 <= retry_s <= tolerance_s):
            raise ValueError(f"retry window must be 0..{tolerance_s} s (the tolerance: a later retry is "
                             f"stale anyway), got {retry_s!r}")
        if not isinstance(max_ids, int) or max_ids < 1:
            raise ValueError(f"max_ids must be an int >= 1, got {max_ids!r}")
        self.log_path, self.tolerance_s, self.retry_s = Path(log_path), float(tolerance_s), float(retry_s)
        self.max_ids, self.clock = max_ids, clock
        self._ids: dict[tuple[str, bytes], Seen] = {}
        self._expiry: list[tuple[float, str, bytes]] = []  # a heap of (expires, device_id, request_id)

    def __len__(self) -> int:
        return len(self._ids)

    def restore(self, stored: Iterable[Seen]) -> int:
        """Remember the store's frames and the logged ones that are still live; compact the log.
        Returns how many ids are live."""
        logged = _read_log(self.log_path)
        for seen in (*stored, *logged):
            self._add(seen)
        self._prune(self.clock())
        live = [s for s in logged if self._ids.get((s.device_id, s.request_id)) == s]
        if logged or self.log_path.exists():
            atomic_write_bytes(self.log_path, b"".join(_line(s) for s in live))
        return len(self._ids)

    def check(self, device_id: str, request_id: bytes, sha256: str, timestamp_us: int) -> Seen | None:
        """None for a fresh frame; the earlier `Seen` for a retry of the same bytes. Raises Stale,
        Replayed or Full."""
        now = self.clock()
        self._prune(now)
        skew = timestamp_us / 1e6 - now
        if abs(skew) > self.tolerance_s:
            raise Stale(f"timestamp is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the server's "
                        f"clock (skew {skew:+.0f} s); the tolerance is ±{self.tolerance_s:g} s")
        seen = self._ids.get((device_id, request_id))
        if seen is None:
            if len(self._ids) >= self.max_ids:
                raise Full(f"the replay window already remembers {self.max_ids} request ids; retry later")
            return None
        rid = request_id.hex()
        if seen.sha256 != sha256:
            raise Replayed(f"request id {rid} of {device_id!r} was already used for a different frame")
        age = now - seen.seen_s
        if age > self.retry_s:
            raise Replayed(f"request id {rid} of {device_id!r} is a replay: first seen {age:.0f} s ago, "
                           f"after the retry window of {self.retry_s:g} s")
        return seen

    def remember(self, seen: Seen, *, durable: bool) -> None:
        """Remember an admitted frame; `durable` appends it to the log and fsyncs (for frames the
        store did not keep; the store's index is the record of the others)."""
        if durable:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.log_path, _record(seen), sort_keys=True)
        self._add(seen)

    def _add(self, seen: Seen) -> None:
        key = (seen.device_id, seen.request_id)
        expires = max(seen.timestamp_us / 1e6 + self.tolerance_s, seen.seen_s + self.retry_s)
        self._ids[key] = seen
        heapq.heappush(self._expiry, (expires, *key))

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            expires, *key = heapq.heappop(self._expiry)
            seen = self._ids.get(tuple(key))
            if seen is not None and max(seen.timestamp_us / 1e6 + self.tolerance_s,
                                        seen.seen_s + self.retry_s) == expires:
                del self._ids[tuple(key)]


def _record(seen: Seen) -> dict:
    return {"schema": LOG_SCHEMA, "device_id": seen.device_id, "request_id": seen.request_id.hex(),
            "sha256": seen.sha256, "seen": seen.seen_s, "timestamp_us": seen.timestamp_us}


def _line(seen: Seen) -> bytes:
    return (json.dumps(_record(seen), sort_keys=True) + "\n").encode("ascii")


def _read_log(path: Path) -> list[Seen]:
    """The logged ids; a torn last line (a crash mid-append, never acknowledged) is skipped."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            if d.get("schema") != LOG_SCHEMA:
                raise ValueError(f"schema is not {LOG_SCHEMA}")
            out.append(Seen(str(d["device_id"]), bytes.fromhex(d["request_id"]), str(d["sha256"]),
                            float(d["seen"]), int(d["timestamp_us"])))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if n == len(lines):  # no newline after it: the append never finished
                log.warning("%s: ignoring a torn last line (%s)", path, e)
                continue
            raise ValueError(f"{path}: line {n} is not a {LOG_SCHEMA} entry: {e}") from e
    return out
