"""The replay window: stale timestamps, reused request ids, retries, ids remembered across restarts,
and a real `edgeveil serve` process killed -9 mid-stream that ends with every frame stored once."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_exported_run
from edgeveil.cloud_sim.replay import Full, Replayed, ReplayWindow, Seen, Stale
from edgeveil.cloud_sim.server import Server
from edgeveil.cloud_sim.store import default_keys_path, features_dir, read_store
from edgeveil.device import wire
from edgeveil.device.client import CloudClient, CloudError
from edgeveil.device.runner import HeadRunner
from edgeveil.training.runfile import load_splits, read_model_info

REPO = Path(__file__).resolve().parents[1]

DEV, KEY = "pi4-replay", bytes(range(7, 39))
CLIENT = {"timeout": 10.0, "retries": 1}
NOW = 1_800_000_000.0  # the fake clock of the unit tests (2027)


class Clock:
    """A clock the unit tests move by hand."""

    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _seen(rid: int, digest: str = "aa", seen_s: float = NOW, ts_s: float = NOW) -> Seen:
    return Seen(DEV, bytes([rid]) * 16, digest, seen_s, int(ts_s * 1e6))


# ------------------------------------------------------------------------------- the window alone


def test_timestamps_outside_the_tolerance_are_stale(tmp_path):
    window = ReplayWindow(tmp_path / "r.jsonl", tolerance_s=300, clock=Clock())
    for ts_s in (NOW - 300, NOW + 300, NOW - 1, NOW + 299.9):
        assert window.check(DEV, b"\1" * 16, "aa", int(ts_s * 1e6)) is None
    for ts_s, words in ((0, ["behind", "±300 s", "-1800000000 s"]), (16_725_225_600, ["ahead", "+14925225600 s"]),
                        (NOW - 300.5, ["skew -300 s", "±300 s"]), (NOW + 301, ["ahead", "+301 s"])):
        with pytest.raises(Stale) as info:
            window.check(DEV, b"\1" * 16, "aa", int(ts_s * 1e6))
        assert all(w in str(info.value) for w in words), (words, str(info.value))
        assert info.value.field == "timestamp"


def test_a_seen_id_is_a_retry_then_a_replay_and_other_bytes_never_pass(tmp_path):
    clock = Clock()
    window = ReplayWindow(tmp_path / "r.jsonl", tolerance_s=300, retry_s=60, clock=clock)
    first = _seen(1)
    assert window.check(DEV, first.request_id, "aa", first.timestamp_us) is None
    window.remember(first, durable=False)
    clock.t += 60
    assert window.check(DEV, first.request_id, "aa", first.timestamp_us) == first
    with pytest.raises(Replayed, match="different frame"):
        window.check(DEV, first.request_id, "bb", first.timestamp_us)
    assert window.check("other-device", first.request_id, "bb", first.timestamp_us) is None
    clock.t += 1
    with pytest.raises(Replayed, match=r"first seen 61 s ago, after the retry window of 60 s"):
        window.check(DEV, first.request_id, "aa", first.timestamp_us)
    clock.t = NOW + 300.5  # the id is forgotten only once its own timestamp is stale
    assert len(window) == 1
    with pytest.raises(Stale):
        window.check(DEV, first.request_id, "aa", first.timestamp_us)
    assert len(window) == 0


def test_an_id_is_remembered_while_its_timestamp_is_acceptable(tmp_path):
    """A frame stamped 250 s ahead is remembered until 300 s past its timestamp, not its arrival."""
    clock = Clock()
    window = ReplayWindow(tmp_path / "r.jsonl", tolerance_s=300, retry_s=10, clock=clock)
    ahead = _seen(2, ts_s=NOW + 250)
    window.remember(ahead, durable=False)
    clock.t = NOW + 549
    with pytest.raises(Replayed, match="replay"):
        window.check(DEV, ahead.request_id, "aa", ahead.timestamp_us)


def test_ids_survive_a_restart_from_the_store_and_the_log(tmp_path):
    path, clock = tmp_path / "replay.jsonl", Clock()
    window = ReplayWindow(path, clock=clock)
    window.restore([])
    window.remember(_seen(3), durable=True)
    window.remember(_seen(4, seen_s=NOW - 400, ts_s=NOW - 400), durable=True)  # already expired
    window.remember(_seen(5), durable=False)  # in the store's index, not in the log
    assert len(path.read_text().splitlines()) == 2

    again = ReplayWindow(path, retry_s=0, clock=clock)
    assert again.restore([_seen(5)]) == 2
    for rid in (3, 5):
        with pytest.raises(Replayed):
            again.check(DEV, bytes([rid]) * 16, "bb", int(NOW * 1e6))
    assert [json.loads(x)["request_id"] for x in path.read_text().splitlines()] == ["03" * 16]  # compacted


def test_a_torn_last_line_is_skipped_and_a_bad_one_named(tmp_path):
    path = tmp_path / "replay.jsonl"
    window = ReplayWindow(path, clock=Clock())
    window.remember(_seen(6), durable=True)
    good = path.read_bytes()
    path.write_bytes(good + good[:40])  # killed mid-append: never acknowledged
    assert ReplayWindow(path, clock=Clock()).restore([]) == 1
    path.write_bytes(b"{not json}\n" + good)
    with pytest.raises(ValueError, match=r"replay\.jsonl: line 1 is not a edgeveil\.replay/1 entry"):
        ReplayWindow(path, clock=Clock()).restore([])


def test_the_window_is_bounded_and_validates_its_options(tmp_path):
    window = ReplayWindow(tmp_path / "r.jsonl", max_ids=2, clock=Clock())
    window.remember(_seen(7), durable=False)
    window.remember(_seen(8), durable=False)
    with pytest.raises(Full, match="2 request ids"):
        window.check(DEV, b"\x09" * 16, "aa", int(NOW * 1e6))
    for bad in ({"tolerance_s": 0}, {"tolerance_s": float("inf")}, {"retry_s": -1}, {"retry_s": 301},
                {"max_ids": 0}):
        with pytest.raises(ValueError):
            ReplayWindow(tmp_path / "r.jsonl", **bad)


# ------------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny digits run, exported to int8."""
    return tiny_exported_run(tmp_path_factory, "replay", "[int8]")


@pytest.fixture(scope="module")
def int8(run_dir):
    """(runner, int8 features of the whole test split)."""
    runner = HeadRunner(run_dir / "export", "int8")
    return runner, runner.run(load_splits(read_model_info(run_dir)).test.x)


def _copy_run(run_dir, dest):
    for part in ("train", "export"):
        shutil.copytree(run_dir / part, dest / part)
    return dest


def _frame(runner, feats, i=0, **override) -> bytes:
    args = {"key": KEY, "device_id": DEV, "model_id": runner.model_id, "scale": feats.scale,
            "zero_point": feats.zero_point, **override}
    return wire.encode(feats.values[i % len(feats.values)][None], **args)


def _status(client: CloudClient, frame: bytes) -> tuple[int, str]:
    try:
        reply = client.infer(frame)
    except CloudError as e:
        return e.status, e.reason
    return 200, "duplicate" if reply["duplicate"] else "new"


def test_stale_frames_and_replays_over_http(run_dir, tmp_path, int8):
    runner, feats = int8
    run = _copy_run(run_dir, tmp_path / "run")
    now_us = time.time_ns() // 1000
    with Server(run, keys={DEV: KEY}, replay_tolerance=300, retry_window=1.0) as srv:
        client = CloudClient(srv.base_url, **CLIENT)
        for ts in (0, 16_725_225_600 * 10**6, now_us - 400 * 10**6, now_us + 400 * 10**6):
            status, reason = _status(client, _frame(runner, feats, timestamp_us=ts))
            assert status == 400 and "±300 s" in reason and "skew" in reason, (ts, status, reason)
        frame = _frame(runner, feats, 1, timestamp_us=now_us - 200 * 10**6)
        rid = wire.peek_header(frame).request_id
        assert _status(client, frame) == (200, "new")
        assert _status(client, frame) == (200, "duplicate")
        status, reason = _status(client, _frame(runner, feats, 2, request_id=rid))
        assert status == 409 and "different frame" in reason and rid.hex() in reason
        time.sleep(1.5)  # past the retry window: the same bytes are now a replay
        status, reason = _status(client, frame)
        assert status == 409 and "retry window of 1 s" in reason
        health = client.health()
    assert (health["stored"], health["answered"], health["duplicates"]) == (1, 1, 1)
    assert [f.request_id for f in read_store(run, {DEV: KEY})] == [rid]


def test_request_ids_are_remembered_across_a_restart(run_dir, tmp_path, int8):
    store_cap = 10
    runner, feats = int8
    run = _copy_run(run_dir, tmp_path / "run")
    frames = [_frame(runner, feats, i) for i in range(3)]
    with Server(run, keys={DEV: KEY}, store_cap=store_cap) as srv:
        first = [CloudClient(srv.base_url, **CLIENT).infer(f) for f in frames]
    with Server(run, keys={DEV: KEY}, store_cap=store_cap) as srv:
        client = CloudClient(srv.base_url, **CLIENT)
        again = client.infer(frames[0])  # a retry whose first reply was lost: answered again, kept once
        assert again == {**first[0], "duplicate": True}
        status, reason = _status(client, _frame(runner, feats, 5, request_id=wire.peek_header(frames[1]).request_id))
        assert status == 409 and "different frame" in reason
        health = client.health()
    assert (health["answered"], health["duplicates"]) == (0, 1)
    assert len(read_store(run, {DEV: KEY})) == 3
    assert not (features_dir(run) / "replay.jsonl").exists()  # stored frames are remembered through the index


# ------------------------------------------------------------------------------- kill -9 mid-stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(run, port: int, log_file) -> subprocess.Popen:
    """`edgeveil serve` as its own process; returns once /v1/health answers."""
    cmd = [sys.executable, "-m", "edgeveil.pipeline.cli", "serve", str(run), "--port", str(port),
           "--replay-tolerance", "600", "--retry-window", "300"]
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file)
    probe = CloudClient(f"http://127.0.0.1:{port}", timeout=2.0, retries=1)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"edgeveil serve exited with {proc.returncode}; see {log_file.name}")
        try:
            probe.health()
            return proc
        except CloudError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"edgeveil serve did not answer on port {port}; see {log_file.name}")


def _wait_for(replies: list, count: int, streamer: threading.Thread) -> None:
    while len(replies) < count and streamer.is_alive():
        time.sleep(0.005)


@pytest.mark.slow
def test_a_server_killed_mid_stream_stores_every_frame_exactly_once(run_dir, tmp_path, int8):
    runner, feats = int8
    run = _copy_run(run_dir, tmp_path / "run")
    wire.write_key_file(default_keys_path(run), {DEV: KEY})
    frames = [_frame(runner, feats, i) for i in range(1000)]
    port, replies, failures, killed_at = _free_port(), [], [], []

    def stream():
        client = CloudClient(f"http://127.0.0.1:{port}", timeout=10.0, retries=500, backoff=0.05, max_backoff=1.0)
        try:
            for f in frames:
                replies.append(client.infer(f))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            failures.append(e)

    with open(tmp_path / "server.log", "ab") as log_file:
        proc = _start_server(run, port, log_file)
        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            for kill_at in (300, 700):
                _wait_for(replies, kill_at, streamer)
                killed_at.append(len(replies))
                proc.kill()  # SIGKILL: no shutdown, no flush, whatever request is in flight
                proc.wait()
                proc = _start_server(run, port, log_file)
            streamer.join()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert not failures and len(replies) == 1000, failures
    assert all(n < 1000 for n in killed_at), f"the stream was over before the kill: {killed_at}"
    sent = [wire.decode(f, {DEV: KEY}) for f in frames]
    assert [r["request_id"] for r in replies] == [f.request_id.hex() for f in sent]
    stored = read_store(run, {DEV: KEY})
    assert [s.request_id for s in stored] == [f.request_id for f in sent]  # all, once each, in order
    assert all(np.array_equal(s.features, f.features) for s, f in zip(stored, sent))
    index = [json.loads(x) for x in (features_dir(run) / "index.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in index] == list(range(1000))


# ------------------------------------------------------------------------------- the load benchmark


@pytest.mark.slow
def test_load_benchmark_quick(run_dir, tmp_path):
    """benchmarks/load.py --quick on this module's run (17 s alone, 26 s beside other suites: slow): nothing lost or stored twice, no crash
    and no forgery under fuzzing, and the replay table's statuses."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load.py"), "--quick", "--run", str(run_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "| devices | requests | answered |" in done.stdout and "## Replays" in done.stdout
    report = json.loads((out / "load_quick.json").read_text())
    load = report["load"]
    assert (load["requests"], load["answered"], load["stored"]) == (100, 100, 100)
    assert (load["lost"], load["stored_twice"], load["failed"], load["unexpected_stored"]) == (0, 0, 0, 0)
    assert 0 < load["p50_ms"] <= load["p99_ms"] and load["throughput_rps"] > 0
    for name in ("fuzz_decoder", "fuzz_http"):
        assert report[name]["crashes"] == 0 and report[name]["forgeries_accepted"] == 0, report[name]
    assert sum(report["fuzz_decoder"]["outcomes"].values()) == 2000
    assert "200" not in report["fuzz_http"]["statuses"] and report["fuzz_http"]["stored_by_fuzz"] == 0
    assert report["fuzz_http"]["alive_after"]
    got = [(r["status"], r["stored_delta"]) for r in report["replays"]]
    assert got == [(200, 1), (200, 0), (409, 0), (409, 0), (400, 0), (400, 0), (400, 0), (400, 0), (200, 1),
                   (409, 0), (409, 0)], report["replays"]
    assert not (out / "load.json").exists()  # --quick never overwrites the full results
