"""The device's HTTP client for the cloud service (standard library only: http.client).

    client = CloudClient("http://127.0.0.1:8000")
    reply = client.infer(wire.encode(q, key=key, device_id="pi4-01", model_id=mid, scale=s, zero_point=z))

Every call has a timeout (`timeout` seconds per socket operation: connect, send, each read).
A call makes at most `retries` attempts in all; it retries, with exponential backoff and jitter,
only when a retry can help: connection errors, timeouts, HTTP 429 and 5xx (a `Retry-After` in
seconds is honoured up to `max_backoff`). Any other status (4xx, and 3xx: redirects are not
followed) raises `CloudError` at once, carrying the server's JSON "detail". Replies must be a JSON
object of at most `MAX_RESPONSE` bytes.

Idempotency. A frame is never sent twice as two requests: a retry re-sends the very same bytes,
so the same request id (inside the frame, under its HMAC). A timeout can hide a reply the server
already computed, so **the server must treat a repeated request id from the same device as the
same request and return the reply it cached for it**, not run or count the inference again. The
edgeveil server does so for `retry_window` seconds after the frame's first arrival (the reply carries
"duplicate": true), also across its own restart; a retry later than that is refused as a replay (409).
Backoff (`backoff` doubling per failure, capped at `max_backoff`, jittered) and `retries` bound how
long a device keeps trying: keep their total under the server's retry window.
"""
from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.parse

__all__ = ["CloudClient", "CloudError", "MAX_RESPONSE"]

log = logging.getLogger(__name__)

MAX_RESPONSE = 16 * 1024 * 1024
_USER_AGENT = "edgeveil-device/1"


class CloudError(RuntimeError):
    """A call failed. status: the last HTTP status (None if no reply); reason: the server's
    "detail" (or the HTTP reason phrase); attempts: how many requests were made."""

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None,
                 attempts: int = 0):
        super().__init__(message)
        self.status, self.reason, self.attempts = status, reason, attempts


class _Retryable(Exception):
    """One attempt failed in a way a retry may fix."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class CloudClient:
    """Talks to the cloud service at `base_url` ("http://host:port[/prefix]")."""

    def __init__(self, base_url: str, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.2,
                 max_backoff: float = 2.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"base_url must look like http://host:port[/prefix], got {base_url!r}")
        if parts.scheme == "https" and not hasattr(http.client, "HTTPSConnection"):
            raise ValueError("base_url is https but this Python has no ssl module")
        if not (timeout > 0 and isinstance(retries, int) and retries >= 1 and 0 <= backoff <= max_backoff):
            raise ValueError(f"need timeout > 0, retries >= 1, 0 <= backoff <= max_backoff; got timeout="
                             f"{timeout}, retries={retries}, backoff={backoff}, max_backoff={max_backoff}")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port  # .port raises ValueError if malformed
        self._prefix = parts.path.rstrip("/")
        self.timeout, self.retries = float(timeout), retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)

    def infer(self, frame: bytes) -> dict:
        """POST a wire frame to /v1/infer; returns the server's JSON reply."""
        if not isinstance(frame, (bytes, bytearray, memoryview)) or len(frame) == 0:
            raise TypeError(f"frame must be non-empty bytes (from wire.encode), got {type(frame).__name__}")
        return self._call("POST", "/v1/infer", bytes(frame))  # one immutable copy, re-sent as is

    def health(self) -> dict:
        """GET /v1/health."""
        return self._call("GET", "/v1/health")

    def models(self) -> dict:
        """GET /v1/models."""
        return self._call("GET", "/v1/models")

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict:
        last: _Retryable | None = None
        for attempt in range(1, self.retries + 1):
            if last is not None:
                time.sleep(self._delay(attempt - 1, last.retry_after))
            try:
                return self._attempt(method, path, body, attempt)
            except _Retryable as e:
                last = e
                log.warning("%s %s attempt %d/%d failed: %s", method, path, attempt, self.retries, e)
        raise CloudError(f"{method} {self.base_url}{path} failed after {self.retries} attempt(s); "
                         f"last error: {last}", status=last.status, reason=last.reason, attempts=self.retries)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter in [50%, 100%], at least Retry-After, at most max_backoff."""
        delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        return min(self.max_backoff, max(delay, retry_after or 0.0))

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _attempt(self, method: str, path: str, body: bytes | None, attempt: int) -> dict:
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        conn = self._connection()
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            if resp.length is not None and resp.length > MAX_RESPONSE:
                raise CloudError(f"{method} {path}: reply of {resp.length} bytes exceeds {MAX_RESPONSE}",
                                 status=resp.status, attempts=attempt)
            declared = resp.length
            data = resp.read(MAX_RESPONSE + 1)
            if declared is not None and len(data) < declared:  # read(amt) returns what came, no error
                raise http.client.IncompleteRead(data, declared - len(data))
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, cut short, bad status line
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE:
            raise CloudError(f"{method} {path}: reply exceeds {MAX_RESPONSE} bytes", status=resp.status,
                             attempts=attempt)
        return self._interpret(method, path, resp, data, attempt)

    def _interpret(self, method: str, path: str, resp: http.client.HTTPResponse, data: bytes,
                   attempt: int) -> dict:
        status = resp.status
        if 200 <= status < 300:
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise CloudError(f"{method} {path}: HTTP {status} reply is not JSON: {e}", status=status,
                                 attempts=attempt) from e
            if not isinstance(doc, dict):
                raise CloudError(f"{method} {path}: expected a JSON object, got {type(doc).__name__}",
                                 status=status, attempts=attempt)
            return doc
        reason = _detail(data) or resp.reason
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status}: {reason}", status, reason, _retry_after(resp))
        raise CloudError(f"{method} {self.base_url}{path} rejected: HTTP {status}: {reason}", status=status,
                         reason=reason, attempts=attempt)


def _detail(data: bytes) -> str | None:
    """The server's explanation: FastAPI's {"detail": ...}, else the start of the body as text."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        text = data[:300].decode("utf-8", "replace").strip()
        return text or None
    if isinstance(doc, dict) and "detail" in doc:
        detail = doc["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:1000]
    return None


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored)."""
    try:
        value = float(resp.getheader("Retry-After", ""))
    except ValueError:
        return None
    return value if 0 <= value < 3600 else None
