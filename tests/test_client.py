"""The device's HTTP client against a real loopback server: retries, no retries, timeouts, bounds."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from edgeveil.device import client as client_mod
from edgeveil.device import wire
from edgeveil.device.client import CloudClient, CloudError

KEY = bytes(range(32))
FAST = {"timeout": 2.0, "retries": 3, "backoff": 0.01, "max_backoff": 0.05}


class _Handler(BaseHTTPRequestHandler):
    """Replies as the server's current `behave(handler, n)` says; records every request."""

    def do_GET(self):
        self._handle(b"")

    def do_POST(self):
        self._handle(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 1 << 20)))

    def _handle(self, body: bytes):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.command, self.path, dict(self.headers), body))
            n = len(srv.requests)
        status, reply, headers = srv.behave(self, n)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that timed out on purpose leaves a broken pipe behind: expected, not printed."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.release = threading.Lock(), [], threading.Event()
    srv.behave = lambda h, n: (200, {"ok": True, "path": h.path}, {})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _frame() -> bytes:
    return wire.encode(np.arange(12, dtype=np.int8).reshape(1, 12), key=KEY, device_id="pi4-01",
                       model_id="00112233445566aa", scale=0.1, zero_point=0)


def test_ok_calls_send_the_right_requests(server):
    c = CloudClient(server.url + "/", **FAST)
    frame = _frame()
    assert c.infer(frame) == {"ok": True, "path": "/v1/infer"}
    assert c.health()["path"] == "/v1/health"
    assert c.models()["path"] == "/v1/models"
    (m1, p1, h1, b1), (m2, p2, _, b2), (m3, p3, _, _) = server.requests
    assert (m1, p1, b1) == ("POST", "/v1/infer", frame)
    assert h1["Content-Type"] == "application/octet-stream" and int(h1["Content-Length"]) == len(frame)
    assert (m2, p2, b2, m3, p3) == ("GET", "/v1/health", b"", "GET", "/v1/models")


def test_base_url_prefix_is_kept(server):
    assert CloudClient(server.url + "/edge/", **FAST).health()["path"] == "/edge/v1/health"


def test_503_twice_then_success_resends_the_same_bytes(server):
    server.behave = lambda h, n: (503, {"detail": "warming up"}, {}) if n <= 2 else (200, {"label": 3}, {})
    frame = _frame()
    assert CloudClient(server.url, **FAST).infer(frame) == {"label": 3}
    bodies = [r[3] for r in server.requests]
    assert len(bodies) == 3 and all(b == frame for b in bodies)
    ids = {wire.decode(b, {"pi4-01": KEY}).request_id for b in bodies}
    assert len(ids) == 1  # one request id: the server can tell it is one request


def test_429_is_retried_and_retry_after_honoured_up_to_max_backoff(server):
    server.behave = lambda h, n: (429, {"detail": "slow down"}, {"Retry-After": "30"}) if n == 1 \
        else (200, {"ok": 1}, {})
    t0 = time.monotonic()
    assert CloudClient(server.url, **FAST).health() == {"ok": 1}
    assert len(server.requests) == 2 and time.monotonic() - t0 < 2.0


def test_400_is_not_retried_and_carries_the_reason(server):
    server.behave = lambda h, n: (400, {"detail": "frame field 'tag': HMAC-SHA256 does not verify"}, {})
    with pytest.raises(CloudError) as info:
        CloudClient(server.url, **FAST).infer(_frame())
    err = info.value
    assert err.status == 400 and err.attempts == 1 and "HMAC" in err.reason and "HMAC" in str(err)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status, reply", [(404, {"detail": [{"msg": "no such route"}]}), (401, b"go away"),
                                           (301, b"")])
def test_other_client_errors_are_not_retried(server, status, reply):
    server.behave = lambda h, n: (status, reply, {"Location": "/elsewhere"})
    with pytest.raises(CloudError) as info:
        CloudClient(server.url, **FAST).models()
    assert info.value.status == status and len(server.requests) == 1
    assert status == 301 or ("no such route" if status == 404 else "go away") in info.value.reason


def test_persistent_500_gives_up_after_retries(server):
    server.behave = lambda h, n: (500, {"detail": "tail crashed"}, {})
    with pytest.raises(CloudError, match="after 4 attempt") as info:
        CloudClient(server.url, **{**FAST, "retries": 4}).infer(_frame())
    assert info.value.status == 500 and info.value.reason == "tail crashed" and info.value.attempts == 4
    assert len(server.requests) == 4


def test_timeout_is_retried_then_reported(server):
    def slow(h, n):
        server.release.wait(2.0)
        return 200, {"late": True}, {}
    server.behave = slow
    c = CloudClient(server.url, timeout=0.2, retries=3, backoff=0.01, max_backoff=0.02)
    t0 = time.monotonic()
    with pytest.raises(CloudError, match="after 3 attempt.*(timed out|Timeout)") as info:
        c.infer(_frame())
    elapsed = time.monotonic() - t0
    assert 0.6 <= elapsed < 2.0 and info.value.status is None and info.value.attempts == 3
    deadline = time.monotonic() + 2.0
    while len(server.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.requests) == 3 and len({r[3] for r in server.requests}) == 1


def test_connection_refused_names_the_attempts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(CloudError, match="after 2 attempt.*Connection") as info:
        CloudClient(f"http://127.0.0.1:{port}", timeout=1.0, retries=2, backoff=0.01).health()
    assert info.value.attempts == 2 and info.value.status is None and time.monotonic() - t0 < 3.0


def test_oversized_and_malformed_replies_are_refused(server):
    server.behave = lambda h, n: (200, b"", {"Content-Length": str(client_mod.MAX_RESPONSE + 1)})
    with pytest.raises(CloudError, match="exceeds"):
        CloudClient(server.url, **FAST).health()
    for reply in (b"not json", b"[1, 2]", b"[" * 100_000):
        server.behave = lambda h, n, r=reply: (200, r, {})
        with pytest.raises(CloudError, match="JSON"):
            CloudClient(server.url, **FAST).health()


def test_a_reply_cut_short_is_retried_not_parsed(server):
    """A server killed while it writes its reply leaves fewer bytes than its Content-Length: that
    attempt failed (the same request id is sent again and the server answers it as a retry)."""
    server.behave = lambda h, n: (200, b'{"label": ', {"Content-Length": "40"}) if n == 1 else (200, {"label": 3}, {})
    frame = _frame()
    assert CloudClient(server.url, **FAST).infer(frame) == {"label": 3}
    assert [r[3] for r in server.requests] == [frame, frame]
    server.behave = lambda h, n: (200, b"", {"Content-Length": "40"})
    with pytest.raises(CloudError, match="IncompleteRead") as info:
        CloudClient(server.url, **FAST).health()
    assert info.value.attempts == FAST["retries"]


def test_backoff_grows_with_jitter_and_is_capped():
    c = CloudClient("http://127.0.0.1:1", backoff=0.1, max_backoff=1.0)
    for failures, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [c._delay(failures, None) for _ in range(200)]
        assert base * 0.5 <= min(delays) and max(delays) <= base and max(delays) > min(delays)
    assert c._delay(1, 0.7) >= 0.7 and c._delay(1, 30.0) == 1.0


@pytest.mark.parametrize("url, kwargs", [("ftp://host/", {}), ("127.0.0.1:80", {}), ("http://h/?q=1", {}),
                                         ("http://h", {"retries": 0}), ("http://h", {"timeout": 0}),
                                         ("http://h", {"backoff": 3.0, "max_backoff": 1.0})])
def test_bad_settings_are_refused(url, kwargs):
    with pytest.raises(ValueError):
        CloudClient(url, **kwargs)


def test_infer_wants_bytes():
    with pytest.raises(TypeError):
        CloudClient("http://127.0.0.1:1").infer("a frame")


def test_client_imports_only_the_standard_library():
    code = ("import sys\n"
            "import edgeveil.device.client\n"
            "assert 'numpy' not in sys.modules or 'edgeveil.device.wire' in sys.modules\n"
            "bad = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'numpy', 'edgeveil'}\n"
            "assert not {m for m in bad if not m.startswith('_')}, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
