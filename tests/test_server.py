"""The cloud service over real HTTP on loopback: served predictions against offline ones, dedupe,
rejections (never a 5xx), the bounded frame store, startup errors."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import stat
import time
import urllib.parse

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_exported_run
from edgeveil.cloud_sim.server import Server, create_app, load_or_create_keys, serve_forever
from edgeveil.cloud_sim.store import features_dir, read_store
from edgeveil.device import wire
from edgeveil.device.client import CloudClient, CloudError
from edgeveil.device.runner import HeadRunner
from edgeveil.training.runfile import load_run, load_splits, read_model_info

DEV, KEY = "pi4-test", bytes(range(32))
CLIENT = {"timeout": 10.0, "retries": 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny digits run, exported to fp32 and int8."""
    return tiny_exported_run(tmp_path_factory, "serve", "[fp32,int8]")


@pytest.fixture(scope="module")
def served(run_dir):
    with Server(run_dir, keys={DEV: KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def split_test(run_dir):
    """The run's test split, rebuilt from model.json (sizes and hashes checked)."""
    return load_splits(read_model_info(run_dir)).test


@pytest.fixture(scope="module")
def int8(run_dir, split_test):
    """(runner, features of the first 8 test images) for the int8 head."""
    runner = HeadRunner(run_dir / "export", "int8")
    return runner, runner.run(split_test.x[:8])


def _copy_run(run_dir, dest):
    """train/ and export/ of the run, without the cloud's store: a fresh server state."""
    for part in ("train", "export"):
        shutil.copytree(run_dir / part, dest / part)
    return dest


def _with_noise(manifest: dict, spec: dict) -> dict:
    """The manifest as export writes it for inference noise `spec`: each artifact's sent grid derived for it."""
    from edgeveil.device.noise import sent_qparams

    manifest["inference_noise"] = spec
    for entry in manifest["artifacts"].values():
        out = entry["outputs"][0]
        scale, zero_point = out["scale"], out["zero_point"]
        if scale is not None:
            info = np.iinfo(np.dtype(out["dtype"]))
            scale, zero_point = sent_qparams(scale, zero_point, int(info.min), int(info.max), spec)
        entry["sent"] = {"scale": scale, "zero_point": zero_point, "noise": spec}
    return manifest


def _frame(runner, feats, i=0, n=1, **override) -> bytes:
    args = {"key": KEY, "device_id": DEV, "model_id": runner.model_id, "scale": feats.scale,
            "zero_point": feats.zero_point, **override}
    values = args.pop("values", feats.values[i:i + n])
    return wire.encode(values, **args)


def _tail_probabilities(tail, nchw: np.ndarray) -> np.ndarray:
    """Offline completion, one item at a time as the server does it."""
    with torch.no_grad():
        return np.concatenate([torch.softmax(tail(torch.from_numpy(nchw[i:i + 1])), dim=1).numpy()
                               for i in range(len(nchw))])


def _raw(base_url: str, method: str, body: bytes | None, content_type: str | None = "application/octet-stream",
         chunks: list[bytes] | None = None) -> tuple[int, dict]:
    """One request with http.client (any method, content type, or a chunked body): (status, JSON)."""
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        if chunks is None:
            conn.request(method, "/v1/infer", body=body, headers={"Content-Type": content_type} if content_type else {})
        else:
            conn.putrequest(method, "/v1/infer")
            conn.putheader("Content-Type", content_type)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for c in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(c), c))
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {"detail": data.decode("utf-8", "replace")}


def _rejected(client: CloudClient, frame: bytes) -> CloudError:
    with pytest.raises(CloudError) as info:
        client.infer(frame)
    return info.value


# ------------------------------------------------------------------------------- completion


def test_served_classes_equal_offline_on_the_whole_test_split(run_dir, served, split_test):
    test = split_test
    runner = HeadRunner(run_dir / "export", "int8")
    feats = runner.run(test.x)
    assert feats.values.dtype == np.int8 and len(feats.values) == len(test) >= 300
    offline = _tail_probabilities(load_run(run_dir).tail, feats.to_nchw())

    client, start = CloudClient(served.base_url, **CLIENT), time.perf_counter()
    replies = [client.infer(_frame(runner, feats, i)) for i in range(len(test))]
    elapsed = time.perf_counter() - start

    assert {(r["model_id"], r["precision"]) for r in replies} == {(runner.model_id, "int8")}
    classes = np.array([r["class"] for r in replies])
    assert np.array_equal(classes, np.array([r["classes"][0] for r in replies]))
    assert np.array_equal(classes, offline.argmax(axis=1)), "served classes differ from offline ones"
    assert len(np.unique(classes)) >= 2  # a model that answers one class would prove little
    np.testing.assert_allclose(np.array([r["probabilities"][0] for r in replies]), offline, rtol=0, atol=1e-5)
    assert elapsed < 60, f"{len(test)} requests took {elapsed:.1f} s"


def test_fp32_frames_and_batches(run_dir, served, split_test):
    runner = HeadRunner(run_dir / "export", "fp32")
    feats = runner.run(split_test.x[:6])
    assert feats.scale is None and feats.values.dtype == np.float32
    offline = _tail_probabilities(load_run(run_dir).tail, feats.to_nchw())
    client = CloudClient(served.base_url, **CLIENT)

    one = client.infer(_frame(runner, feats, 0))
    assert one["precision"] == "fp32" and one["model_id"] == runner.model_id
    assert one["model_id"] != HeadRunner(run_dir / "export", "int8").model_id
    assert one["class"] == int(offline[0].argmax())

    batch = client.infer(_frame(runner, feats, 0, n=6))
    assert "class" not in batch and len(batch["probabilities"]) == 6
    assert batch["classes"] == offline.argmax(axis=1).tolist()
    np.testing.assert_allclose(batch["probabilities"], offline, rtol=0, atol=1e-5)


def test_a_repeated_request_gets_the_cached_reply_and_is_stored_once(run_dir, served, int8):
    runner, feats = int8
    client = CloudClient(served.base_url, **CLIENT)
    frame = _frame(runner, feats, 3)
    rid = wire.decode(frame, {DEV: KEY}).request_id.hex()
    before = client.health()

    first, second = client.infer(frame), client.infer(frame)
    after = client.health()
    assert second == {**first, "duplicate": True} and first["request_id"] == rid and not first["duplicate"]
    assert after["stored"] - before["stored"] == 1
    assert after["answered"] - before["answered"] == 1
    assert after["duplicates"] - before["duplicates"] == 1
    index = (features_dir(run_dir) / "index.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["request_id"] == rid for line in index) == 1

    other = _frame(runner, feats, 4, request_id=bytes.fromhex(rid))  # same id, other features
    err = _rejected(client, other)
    assert err.status == 409 and rid in err.reason


def test_health_and_models_describe_the_served_artifacts(run_dir, served):
    client = CloudClient(served.base_url, **CLIENT)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    want = {a["sha256"][:16]: a for a in manifest["artifacts"].values()}
    health = client.health()
    assert health["status"] == "ok" and sorted(health["model_ids"]) == sorted(want)
    assert health["uptime_s"] >= 0 and health["refused_store_full"] == 0
    models = {m["model_id"]: m for m in client.models()["models"]}
    assert sorted(models) == sorted(want)
    for mid, entry in want.items():
        out = entry["outputs"][0]
        got = models[mid]
        assert got["precision"] == entry["precision"] and got["num_classes"] == 10
        assert (got["output"]["shape"], got["output"]["dtype"]) == (out["shape"], out["dtype"])
        assert (got["output"]["scale"], got["output"]["zero_point"]) == (out["scale"], out["zero_point"])
        assert got["feature_shape"] == manifest["feature_shape"] and got["defense"]["name"] == "none"


# ------------------------------------------------------------------------------- rejections


def test_frames_the_server_must_refuse(served, int8):
    runner, feats = int8
    client = CloudClient(served.base_url, **CLIENT)
    good = _frame(runner, feats)
    q = feats.values[:1]
    cases = [  # (frame, status, words the reason must contain)
        (_frame(runner, feats, device_id="stranger"), 401, ["unknown device", "stranger"]),
        (_frame(runner, feats, key=bytes(32)), 401, ["tag"]),
        (_frame(runner, feats, model_id="0123456789abcdef"), 404, ["0123456789abcdef", runner.model_id]),
        (_frame(runner, feats, scale=feats.scale * 1.5), 422, ["scale", repr(feats.scale)]),
        (_frame(runner, feats, zero_point=feats.zero_point + 1), 422, ["zero point", str(feats.zero_point)]),
        (_frame(runner, feats, values=q[:, :7]), 422, ["shape", "(1, 7,"]),
        (_frame(runner, feats, values=q.astype(np.int16)), 422, ["int8", "int16"]),
        (_frame(runner, feats, values=q.astype(np.float32), scale=None, zero_point=None), 422, ["float32"]),
        (good[:-5], 400, ["length"]),
        (good + b"\0", 400, ["length"]),
        (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), 400, ["magic"]),
    ]
    for frame, status, words in cases:
        err = _rejected(client, frame)
        assert err.status == status, (status, err)
        assert all(w in err.reason for w in words), (words, err.reason)
        assert err.attempts == 1


def test_noisy_frames_travel_on_the_widened_grid(run_dir, tmp_path, split_test):
    """With inference noise of a step or more the device requantizes onto a wider grid; the server
    expects exactly that grid from the manifest, and refuses the tensor's own scale."""
    run = _copy_run(run_dir, tmp_path / "run")
    path = run / "export" / "manifest.json"
    manifest = json.loads(path.read_text())
    out = manifest["artifacts"]["int8"]["outputs"][0]
    path.write_text(json.dumps(_with_noise(manifest, {"kind": "gaussian", "sigma": 3 * out["scale"]})))
    runner = HeadRunner(run / "export", "int8", noise_seed=0)
    feats = runner.run(split_test.x[:2])
    assert feats.scale > out["scale"] and feats.noise["widened"]
    with Server(run, keys={DEV: KEY}) as srv:
        client = CloudClient(srv.base_url, **CLIENT)
        assert client.infer(_frame(runner, feats))["precision"] == "int8"
        got = {m["precision"]: m["output"] for m in client.models()["models"]}["int8"]
        assert (got["scale"], got["zero_point"]) == (feats.scale, feats.zero_point)
        err = _rejected(client, _frame(runner, feats, scale=out["scale"], zero_point=out["zero_point"]))
    assert err.status == 422 and "scale" in err.reason and repr(feats.scale) in err.reason


def test_http_level_rejections(served, int8):
    runner, feats = int8
    frame = _frame(runner, feats)
    status, doc = _raw(served.base_url, "POST", b"")
    assert status == 400 and "empty body" in doc["detail"]
    status, doc = _raw(served.base_url, "GET", None)
    assert status == 405 and "POST" in doc["detail"]
    status, doc = _raw(served.base_url, "POST", frame, content_type="application/json")
    assert status == 415 and "application/octet-stream" in doc["detail"]
    status, doc = _raw(served.base_url, "POST", frame, content_type=None)
    assert status == 415
    status, doc = _raw(served.base_url, "POST", None, chunks=[frame[:100], frame[100:]])
    assert status == 200 and doc["request_id"] == wire.decode(frame, {DEV: KEY}).request_id.hex()


def test_bodies_over_max_body_get_413(run_dir, tmp_path, int8):
    runner, feats = int8
    frame = _frame(runner, feats)
    with Server(_copy_run(run_dir, tmp_path), keys={DEV: KEY}, max_body=len(frame) + 10) as srv:
        assert CloudClient(srv.base_url, **CLIENT).infer(frame)["precision"] == "int8"
        big = _frame(runner, feats, 0, n=2)
        err = _rejected(CloudClient(srv.base_url, **CLIENT), big)
        assert err.status == 413 and str(len(frame) + 10) in err.reason
        status, doc = _raw(srv.base_url, "POST", None, chunks=[big[:1000]] * 3)  # no Content-Length
        assert status == 413 and "exceeds" in doc["detail"]


_VALID = wire.encode(np.zeros((1, 14, 14, 8), np.int8), key=KEY, device_id=DEV, model_id="00" * 8,
                     scale=0.5, zero_point=-128)
_bodies = st.one_of(
    st.binary(max_size=3000),
    st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)).map(
        lambda t: _VALID[:t[0]] + bytes([_VALID[t[0]] ^ t[1]]) + _VALID[t[0] + 1:]),  # one byte flipped
    st.integers(0, len(_VALID) - 1).map(lambda n: _VALID[:n]),  # truncated
    st.binary(min_size=1, max_size=64).map(lambda tail: _VALID + tail),  # trailing garbage
    st.binary(max_size=200).map(lambda head: wire.MAGIC + bytes([1]) + head))  # a plausible start


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, content_type=st.sampled_from(["application/octet-stream", "application/octet-stream",
                                                   "text/plain", "application/json", None]))
def test_random_and_mutated_bodies_never_get_a_5xx(served, body, content_type):
    status, doc = _raw(served.base_url, "POST", body, content_type=content_type)
    assert 400 <= status < 500, (status, doc)
    assert doc.get("detail")


# ------------------------------------------------------------------------------- the store


def test_a_full_store_refuses_frames_instead_of_answering_frames_it_did_not_keep(run_dir, tmp_path, int8):
    """DESIGN: the cloud never acknowledges a frame it has not durably stored. Past the cap it says
    503 with Retry-After, naming the store, and the client backs off; nothing is answered or kept."""
    from edgeveil.device.client import CloudError

    runner, feats = int8
    run = _copy_run(run_dir, tmp_path / "run")
    frames = [_frame(runner, feats, i) for i in range(5)]
    with Server(run, keys={DEV: KEY}, store_cap=3) as srv:
        client = CloudClient(srv.base_url, **CLIENT)
        replies = [client.infer(f) for f in frames[:3]]
        attempts = 0
        for f in frames[3:]:
            with pytest.raises(CloudError) as info:
                client.infer(f)
            assert info.value.status == 503 and "frame store is full" in info.value.reason
            assert "at most 3 frames" in info.value.reason and "--store-cap" in info.value.reason
            attempts += info.value.attempts
        health = client.health()
    assert [r["precision"] for r in replies] == ["int8"] * 3
    assert (health["stored"], health["answered"]) == (3, 3)
    assert health["refused_store_full"] == attempts >= 2  # every attempt was refused, none answered
    # refused frames were not remembered: with room again (a larger cap), the same bytes are accepted
    with Server(run, keys={DEV: KEY}, store_cap=5) as srv:
        late = CloudClient(srv.base_url, **CLIENT).infer(frames[3])
    assert late["duplicate"] is False and len(read_store(run, {DEV: KEY})) == 4

    stored = read_store(run, {DEV: KEY})[:3]
    sent = [wire.decode(f, {DEV: KEY}) for f in frames[:3]]
    assert [s.request_id for s in stored] == [f.request_id for f in sent]
    for s, f in zip(stored, sent):
        assert (s.device_id, s.model_id, s.scale, s.zero_point) == (DEV, runner.model_id, feats.scale, feats.zero_point)
        assert np.array_equal(s.features, f.features)
    names = sorted(p.name for p in features_dir(run).glob("*.evf"))
    assert len(names) == 4 and names[0].startswith("00000000-")
    with pytest.raises(ValueError, match="does not verify"):
        read_store(run, {DEV: bytes(32)})


def test_a_restarted_server_resumes_the_store(run_dir, tmp_path, int8):
    runner, feats = int8
    run = _copy_run(run_dir, tmp_path / "run")
    for i, cap in ((0, 10), (1, 10), (2, 2)):
        with Server(run, keys={DEV: KEY}, store_cap=cap) as srv:
            if len(read_store(run, {DEV: KEY})) < cap:
                CloudClient(srv.base_url, **CLIENT).infer(_frame(runner, feats, i))
            else:
                assert _raw(srv.base_url, "POST", _frame(runner, feats, i))[0] == 503
    assert len(read_store(run, {DEV: KEY})) == 2  # the third server found its cap already reached
    assert [json.loads(x)["seq"] for x in (features_dir(run) / "index.jsonl").read_text().splitlines()] == [0, 1]


# ------------------------------------------------------------------------------- startup


def test_startup_names_what_is_missing(run_dir, tmp_path):
    no_export = tmp_path / "no_export"
    shutil.copytree(run_dir / "train", no_export / "train")
    with pytest.raises(FileNotFoundError, match=r"export/manifest\.json"):
        create_app(no_export, keys={DEV: KEY})
    no_model = _copy_run(run_dir, tmp_path / "no_model")
    (no_model / "train" / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"train/model\.json") as info:
        Server(no_model, keys={DEV: KEY})
    assert "manifest" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="model.json.*tail.pt.*manifest.json"):
        create_app(tmp_path / "nothing_here", keys={DEV: KEY})


def test_refuses_a_non_loopback_host_and_empty_keys(run_dir, tmp_path):
    for call in (lambda: Server(run_dir, host="0.0.0.0", keys={DEV: KEY}),
                 lambda: serve_forever(tmp_path / "missing", host="192.0.2.1")):
        with pytest.raises(ValueError, match="loopback"):
            call()
    with pytest.raises(ValueError, match="at least one device"):
        create_app(run_dir, keys={})


def test_load_or_create_keys_writes_a_private_key_file(tmp_path):
    path = tmp_path / "cloud" / "keys.json"
    keys = load_or_create_keys(path, "board-7")
    assert list(keys) == ["board-7"] and len(keys["board-7"]) == 32
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_keys(path, "ignored") == keys
