"""The cloud service: completes inference on the features a device sends, and keeps them for the attacks.

    with Server(run_dir, keys={"pi4-01": key}) as srv:       # uvicorn on loopback, in a thread
        CloudClient(srv.base_url).infer(frame)             # (create_app(...) for any ASGI server)

POST /v1/infer  one wire frame (application/octet-stream) -> 200 {"request_id", "model_id", "precision",
                "classes": [B], "probabilities": [B][num_classes], "class" (B = 1), "duplicate"}. 400
                malformed frame, empty body, or a timestamp outside ±replay_tolerance s of the server's
                clock, 401 unknown device or bad tag, 404 unknown model id, 405 not POST, 409 a request
                id reused for another frame, or resent after retry_window s, 413 body over max_body, 415
                not octet-stream, 422 frame unlike the artifact's output (dtype, dims, scale, zero_point,
                non-finite values), 503 (Retry-After) the replay window or the frame store is full: a
                frame is answered only once it is durably stored.
GET /v1/health  {"status", "model_ids", "stored", "refused_store_full", "answered", "duplicates", "uptime_s"}
GET /v1/models  {"models": [{model_id, precision, output {shape, dtype, scale, zero_point, layout},
                feature_shape, arch, split, defense, num_classes}, ...]}
Errors are {"detail", "field"}. The same bytes again within retry_window s of their first arrival (a
client retrying after a lost reply) get 200 with "duplicate": true; they are not stored or counted as
answered again. Request ids are remembered across restarts (cloud_sim.replay).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeveil.device import wire
from edgeveil.device.files import sha256_file
from edgeveil.device.manifest import read_manifest
from edgeveil.training.runfile import load_run

from .replay import Full, Replayed, ReplayWindow, Seen, Stale
from .store import FrameStore, ReplyCache, StoreFull, default_keys_path, features_dir, load_or_create_keys

__all__ = ["create_app", "Server", "load_or_create_keys", "serve_forever", "default_keys_path"]

log = logging.getLogger(__name__)

_OCTET = "application/octet-stream"
STORE_FULL_RETRY_S = 30  # Retry-After when the store is full: someone has to make room first


class _Reject(Exception):
    """A request refused with an HTTP status; `field` names what was wrong."""

    def __init__(self, status: int, field: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.field, self.detail, self.headers = status, field, detail, headers


class _Artifact(NamedTuple):
    """What a served head sends: its output tensor, as the manifest records it."""
    model_id: str
    precision: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float | None
    zero_point: int | None
    layout: str


def _check_run_dir(run_dir: Path) -> None:
    """Every missing piece of a servable run directory, reported at once."""
    missing = [str(p) for p in (run_dir / "train" / "model.json", run_dir / "train" / "tail.pt",
                                run_dir / "export" / "manifest.json") if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot serve {run_dir}: missing {', '.join(missing)} "
                                f"(run `edgeveil train` and `edgeveil export` first)")


def _artifacts(manifest: dict, source: Path, feature_shape: list) -> dict[str, _Artifact]:
    """model id -> what its frames carry, checked against the tail's input (C, H, W) in its layout.
    Scale and zero point are the ones the device sends with, read from the entry's `sent` (export
    derived them: the output tensor's, widened when the inference noise is a step or more)."""
    served = {}
    for precision, entry in manifest["artifacts"].items():
        out, where = entry["outputs"][0], f"{source}: artifacts.{precision}"
        layout = entry.get("output_layout", "NHWC")
        if layout not in ("NHWC", "NCHW", "same"):
            raise ValueError(f"{where}.output_layout is {layout!r}, expected NHWC, NCHW or same")
        want = list(feature_shape[1:]) + list(feature_shape[:1]) if layout == "NHWC" else list(feature_shape)
        if list(out["shape"][1:]) != want:
            raise ValueError(f"{where}.outputs[0].shape is {out['shape']}, but the tail takes "
                             f"{feature_shape} (channels first) as {layout}: export and training disagree")
        try:
            dtype = np.dtype(out["dtype"])
        except TypeError as e:
            raise ValueError(f"{where}.outputs[0].dtype {out['dtype']!r} is not a dtype") from e
        sent = entry["sent"]
        served[entry["model_id"]] = _Artifact(entry["model_id"], precision, tuple(out["shape"]), dtype,
                                              sent["scale"], sent["zero_point"], layout)
    return served


class _Service:
    """Verifies, completes and stores frames; `handle` is thread safe (one request at a time)."""

    def __init__(self, run_dir: Path, keys: Mapping[str, bytes], max_body: int, store_cap: int,
                 dedupe_cap: int, device: str, replay_tolerance: float, retry_window: float):
        import torch

        if not isinstance(keys, Mapping) or not keys:
            raise ValueError("keys must map at least one device id to its key")
        if not isinstance(max_body, int) or max_body < wire.MIN_FRAME:
            raise ValueError(f"max_body must be an int >= {wire.MIN_FRAME}, got {max_body!r}")
        _check_run_dir(run_dir)
        mpath = run_dir / "export" / "manifest.json"
        self.manifest = read_manifest(mpath)
        self.info, _head, self.tail = load_run(run_dir, device=device)
        recorded = self.manifest["source"].get("model_json_sha256")
        if recorded and recorded != sha256_file(run_dir / "train" / "model.json"):
            raise ValueError(f"{mpath}: field source.model_json_sha256 does not match "
                             f"{run_dir / 'train' / 'model.json'}: the export comes from another model")
        self.artifacts = _artifacts(self.manifest, mpath, self.info["feature_shape"])
        self.keys, self.max_body, self.device, self.torch = keys, max_body, device, torch
        self.store = FrameStore(features_dir(run_dir), store_cap)
        self.cache = ReplyCache(dedupe_cap)
        self.replay = ReplayWindow(self.store.folder / "replay.jsonl", tolerance_s=replay_tolerance,
                                   retry_s=retry_window)
        self.replay.restore(self.store.accepted())
        self.answered = self.duplicates = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def handle(self, body: bytes) -> dict:
        frame = self._decode(body)
        key, digest = (frame.device_id, frame.request_id), hashlib.sha256(body).hexdigest()
        with self._lock:
            if self._admit(frame, digest) is not None:  # the same bytes again, within the retry window
                self.duplicates += 1
                cached = self.cache.get(key)  # gone after a restart: the tail answers again, nothing is kept
                reply = cached[1] if cached else self._complete(frame, self.artifacts[frame.model_id])
                return {**reply, "duplicate": True}
            art = self.artifacts[frame.model_id]
            _check_matches(frame, art)
            self._refuse_if_store_full()
            reply = {**self._complete(frame, art), "duplicate": False}
            self.store.add(body, frame, art.precision)  # durable before the reply leaves
            seen = Seen(frame.device_id, frame.request_id, digest, self.replay.clock(), frame.timestamp_us)
            self.replay.remember(seen, durable=False)  # the store's index is its record
            self.cache.put(key, digest, reply)
            self.answered += 1
            return reply

    def _refuse_if_store_full(self) -> None:
        """503 before the tail runs: a frame the cloud cannot keep is not answered (DESIGN: never
        acknowledge a frame not durably stored); the client backs off and retries."""
        try:
            self.store.refuse_if_full()
        except StoreFull as e:
            raise _Reject(503, e.field, str(e), {"Retry-After": str(STORE_FULL_RETRY_S)}) from e

    def _admit(self, frame: wire.Frame, digest: str) -> Seen | None:
        """The replay window's answer (None: a fresh frame), its refusals as HTTP statuses."""
        try:
            return self.replay.check(frame.device_id, frame.request_id, digest, frame.timestamp_us)
        except Stale as e:
            raise _Reject(400, e.field, str(e)) from e
        except Full as e:
            raise _Reject(503, e.field, str(e), {"Retry-After": "1"}) from e
        except Replayed as e:
            raise _Reject(409, e.field, str(e)) from e

    def _decode(self, body: bytes) -> wire.Frame:
        unknown = []

        def key_of(device_id: str) -> bytes | None:
            key = self.keys.get(device_id)
            if key is None:
                unknown.append(device_id)
            return key

        try:
            return wire.decode(body, key_of, max_payload=self.max_body, expected_model_ids=self.artifacts)
        except wire.FrameError as e:
            auth = {"WWW-Authenticate": 'EVF1-HMAC realm="edgeveil"'}
            if unknown:
                raise _Reject(401, "device_id", f"unknown device {unknown[0]!r}: no key for it", auth) from e
            if e.field == "tag":
                raise _Reject(401, "tag", f"authentication failed: {e}", auth) from e
            if e.field == "model_id":
                got = wire.peek_header(body).model_id
                served = ", ".join(f"{m} ({a.precision})" for m, a in self.artifacts.items())
                raise _Reject(404, "model_id", f"unknown model id {got}; this server serves {served}") from e
            raise _Reject(400, e.field, f"malformed frame: {e}") from e

    def _complete(self, frame: wire.Frame, art: _Artifact) -> dict:
        torch = self.torch
        x = torch.from_numpy(frame.dequantized())
        if art.layout == "NHWC":  # channels last -> first: (B, H, W, C) -> (B, C, H, W)
            x = x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        with torch.inference_mode():
            logits = self.tail(x.contiguous().to(self.device))
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        if not np.isfinite(probs).all():
            raise _Reject(422, "payload", "the tail's output is not finite for these features")
        classes = [int(c) for c in probs.argmax(axis=1)]
        reply = {"request_id": frame.request_id.hex(), "model_id": art.model_id, "precision": art.precision,
                 "classes": classes, "probabilities": probs.astype(float).tolist()}
        if len(classes) == 1:
            reply["class"] = classes[0]
        return reply

    def health(self) -> dict:
        return {"status": "ok", "model_ids": list(self.artifacts), "stored": self.store.stored,
                "refused_store_full": self.store.refused, "answered": self.answered, "duplicates": self.duplicates,
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def models(self) -> dict:
        info = self.info
        return {"models": [{"model_id": a.model_id, "precision": a.precision,
                            "output": {"shape": list(a.shape), "dtype": a.dtype.name, "scale": a.scale,
                                       "zero_point": a.zero_point, "layout": a.layout},
                            "feature_shape": info["feature_shape"], "arch": info["arch"],
                            "split": info.get("split"), "defense": info["defense"],
                            "num_classes": info["num_classes"]} for a in self.artifacts.values()]}


def _check_matches(frame: wire.Frame, art: _Artifact) -> None:
    """422 unless the frame is what this artifact outputs: dtype, (B >= 1, *rest), scale, zero point."""
    q, name = frame.features, f"artifact {art.model_id} ({art.precision})"
    if q.dtype != art.dtype:
        raise _Reject(422, "dtype", f"{name} sends {art.dtype.name}, got {q.dtype.name}")
    if q.ndim != len(art.shape) or q.shape[1:] != art.shape[1:]:
        want = ("B",) + art.shape[1:]
        raise _Reject(422, "dims", f"{name} sends shape {want} ({art.layout}, B >= 1), got {q.shape}")
    if art.scale is not None:
        if not math.isclose(frame.scale, art.scale, rel_tol=1e-6):
            raise _Reject(422, "scale", f"{name} sends scale {art.scale!r} (manifest), got {frame.scale!r}")
        if frame.zero_point != art.zero_point:
            raise _Reject(422, "zero_point", f"{name} sends zero point {art.zero_point} (manifest), "
                                             f"got {frame.zero_point}")
    elif not np.isfinite(q).all():
        raise _Reject(422, "payload", f"{name}: features contain NaN or infinity")


def create_app(run_dir: Path, *, keys: Mapping[str, bytes], max_body: int = 8 << 20, store_cap: int = 10_000,
               dedupe_cap: int = 4096, device: str = "cpu", replay_tolerance: float = 300.0,
               retry_window: float = 60.0):
    """The FastAPI app serving one run directory (see the module docstring). Raises at once,
    naming the file, if the run has no trained model or no export. replay_tolerance: the accepted
    timestamp skew in seconds (±); retry_window: how long after its first arrival the same frame
    counts as a retry (200, "duplicate") rather than a replay (409)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    service = _Service(Path(run_dir), keys, max_body, store_cap, dedupe_cap, device, replay_tolerance,
                       retry_window)
    app = FastAPI(title="edgeveil cloud", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(_Reject)
    async def _rejected(request, exc: _Reject):
        log.info("%s %s rejected %d: %s", request.method, request.url.path, exc.status, exc.detail)
        return JSONResponse({"detail": exc.detail, "field": exc.field}, exc.status, headers=exc.headers)

    @app.exception_handler(405)
    async def _not_allowed(request, exc):
        return JSONResponse({"detail": f"{request.method} is not allowed on {request.url.path}; "
                                       f"allowed: {exc.headers.get('Allow', 'POST')}", "field": "method"},
                            405, headers=exc.headers)

    @app.exception_handler(ValueError)  # FrameError is a ValueError: bad input is never a 5xx
    async def _bad_value(request, exc: ValueError):
        log.warning("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"bad request: {exc}", "field": getattr(exc, "field", None)}, 400)

    async def infer(request):  # a plain Starlette route: the body is read by hand, bounded
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != _OCTET:
            raise _Reject(415, "content-type", f"Content-Type must be {_OCTET}, got {ctype or 'none'!r}")
        body = await _read_bounded(request, service.max_body)
        if not body:
            raise _Reject(400, "length", "empty body: expected one wire frame")
        return JSONResponse(await run_in_threadpool(service.handle, body))

    app.add_route("/v1/infer", infer, methods=["POST"])
    app.add_api_route("/v1/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    return app


async def _read_bounded(request, max_body: int) -> bytes:
    """The body, refused with 413 as soon as Content-Length or the bytes received exceed max_body."""
    declared = request.headers.get("content-length", "")  # uvicorn refuses a malformed one itself
    if declared.isdigit() and int(declared) > max_body:
        raise _Reject(413, "length", f"body of {int(declared)} bytes exceeds the limit of {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _Reject(413, "length", f"body exceeds the limit of {max_body} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_host(host: str, allow_remote: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"refusing to serve on {host!r}: not a loopback address. The service has no TLS "
                         "and keeps every frame it receives; pass allow_remote=True (--allow-remote) to expose it")


class Server:
    """uvicorn serving `create_app(run_dir, ...)` in a background thread; a context manager."""

    def __init__(self, run_dir, *, host: str = "127.0.0.1", port: int = 0, keys: Mapping[str, bytes] | None = None,
                 allow_remote: bool = False, **app_options):
        _check_host(host, allow_remote)
        self.host, self.port = host, port
        self.keys = load_or_create_keys(default_keys_path(run_dir)) if keys is None else keys
        self.app = create_app(run_dir, keys=self.keys, **app_options)
        self.base_url: str | None = None
        self._server = self._thread = self._sock = None

    def start(self, timeout: float = 10.0) -> Server:
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("server already started")
        family, kind, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        self._sock = socket.socket(family, kind, proto)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(addr)
        host, port = self._sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"edgeveil-cloud:{port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cloud server did not start on {host}:{port} within {timeout} s")
            time.sleep(0.01)
        self.base_url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
        log.info("cloud service at %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server.force_exit = True  # only matters if connections kept it alive
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(run_dir, host: str = "127.0.0.1", port: int = 8000, keys_path=None, *,
                  allow_remote: bool = False, **opts) -> None:
    """`edgeveil serve DIR`: serve in the foreground until interrupted (uvicorn handles the signals)."""
    import uvicorn

    _check_host(host, allow_remote)
    keys_path = Path(keys_path) if keys_path is not None else default_keys_path(run_dir)
    keys = load_or_create_keys(keys_path)
    app = create_app(run_dir, keys=keys, **opts)
    log.info("serving %s on http://%s:%d for devices %s (keys: %s)", run_dir, host, port, sorted(keys), keys_path)
    uvicorn.run(app, host=host, port=port, log_level="info")
