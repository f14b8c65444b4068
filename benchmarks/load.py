"""The wire under load, under fuzzing and under replay, against a real `edgeveil serve` process.

1. Load: 32 devices (threads, each with its own key and CloudClient) x 500 requests each on loopback;
   answered, stored, stored twice, lost, p50/p99 latency, throughput. The store is read back and
   every frame re-verified, so "stored" and "lost" come from disk, not from the replies.
2. Fuzz: 10^5 mutated or random frames at `wire.decode`, and 10^4 over HTTP; the count of each
   outcome, crashes (any other exception, a 5xx or a dropped connection) and forgeries (a changed
   frame accepted).
3. Replays: a frame resent at once, after 4,200 other frames, after a kill -9 and restart; stale
   timestamps (1970, 2500, just outside and inside the tolerance); a reused id with other bytes.

    python benchmarks/load.py                 # the full run: writes benchmarks/results/load.{md,json}
    python benchmarks/load.py --quick         # 4 x 25 requests, 2,000 + 300 fuzzed frames: load_quick.*
    python benchmarks/load.py --run DIR       # use a trained and exported run (DIR/export has int8)
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from edgeveil.cloud_sim.store import default_keys_path, read_store
from edgeveil.device import wire
from edgeveil.device.client import CloudClient, CloudError
from edgeveil.device.files import atomic_write_bytes
from edgeveil.device.runner import HeadRunner
from edgeveil.training.runfile import load_splits, read_model_info

REPO = Path(__file__).resolve().parents[1]
# retry_s: the replay server's --retry-window (short, so the table shows a replay without a long wait);
# its --replay-tolerance is TOLERANCE_S. The load server keeps the defaults (300 s and 60 s).
FULL = {"devices": 32, "requests": 500, "fuzz_decoder": 100_000, "fuzz_http": 10_000, "replay_after": 4200,
        "retry_s": 5}
QUICK = {"devices": 4, "requests": 25, "fuzz_decoder": 2000, "fuzz_http": 300, "replay_after": 100, "retry_s": 2}
TOLERANCE_S = 300


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- setup


def prepare_run(runs: Path) -> Path:
    """A tiny digits run exported to int8 (trained once, then reused from `runs`)."""
    from edgeveil.pipeline.cli import main

    run = runs / "digits_tiny"
    if not (run / "export" / "manifest.json").is_file():
        log(f"training and exporting a tiny digits run into {run}")
        shutil.rmtree(run, ignore_errors=True)
        assert main(["--no-progress", "train", "--out", str(run), "--set", "model.width=tiny",
                     "--set", "train.epochs=2", "--set", "train.device=cpu"]) == 0
        assert main(["--no-progress", "export", str(run), "--set", "export.precisions=[int8]"]) == 0
    return run


def fresh_copy(run: Path, dest: Path, keys: dict[str, bytes]) -> Path:
    """train/ and export/ of `run` in `dest`, with these device keys and an empty store."""
    for part in ("train", "export"):
        shutil.copytree(run / part, dest / part)
    wire.write_key_file(default_keys_path(dest), keys)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`edgeveil serve RUN` in its own process on a loopback port; `restart(kill=True)` is kill -9."""

    def __init__(self, run: Path, log_path: Path, *options: str):
        self.run, self.log_path, self.options, self.port = run, log_path, options, free_port()
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> Serve:
        cmd = [sys.executable, "-m", "edgeveil.pipeline.cli", "serve", str(self.run), "--port", str(self.port),
               *self.options]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        probe = CloudClient(self.url, timeout=2.0, retries=1)
        for _ in range(1200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeveil serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                probe.health()
                return self
            except CloudError:
                time.sleep(0.1)
        raise RuntimeError(f"edgeveil serve did not answer within 120 s; see {self.log_path}")

    def stop(self, kill: bool = False) -> None:
        self.proc.kill() if kill else self.proc.terminate()
        self.proc.wait(timeout=60)

    def restart(self, kill: bool) -> None:
        self.stop(kill)
        self.start()


def device_features(run: Path):
    """(runner, int8 features of the whole test split)."""
    runner = HeadRunner(run / "export", "int8")
    return runner, runner.run(load_splits(read_model_info(run)).test.x)


def make_frame(runner, feats, i: int, dev: str, key: bytes, **override) -> bytes:
    return wire.encode(feats.values[i % len(feats.values)][None], key=key, device_id=dev, model_id=runner.model_id,
                       scale=feats.scale, zero_point=feats.zero_point, **override)


# ------------------------------------------------------------------------------- 1. load


def load_test(srv: Serve, runner, feats, keys: dict[str, bytes], requests: int) -> dict:
    """Every device sends `requests` frames back to back; latencies per answered request."""
    frames = {d: [make_frame(runner, feats, j, d, k) for j in range(requests)] for d, k in keys.items()}
    latencies, replies, failures, lock = [], Counter(), [], threading.Lock()

    def device(dev: str):
        client = CloudClient(srv.url, timeout=30.0, retries=8, backoff=0.05, max_backoff=1.0)
        for f in frames[dev]:
            t0 = time.perf_counter()
            try:
                reply = client.infer(f)
            except CloudError as e:
                with lock:
                    failures.append(f"{dev}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                replies["duplicate" if reply["duplicate"] else "new"] += 1

    threads = [threading.Thread(target=device, args=(d,)) for d in keys]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return summarize_load(srv, frames, keys, latencies, replies, failures, wall)


def summarize_load(srv, frames, keys, latencies, replies, failures, wall) -> dict:
    sent = Counter((d, wire.peek_header(f).request_id) for d, fs in frames.items() for f in fs)
    stored = Counter((f.device_id, f.request_id) for f in read_store(srv.run, keys))
    lat = np.array(latencies) * 1e3
    return {"devices": len(keys), "requests": sum(sent.values()), "answered": len(latencies),
            "duplicate_replies": replies["duplicate"], "failed": len(failures), "failures": failures[:10],
            "stored": sum(stored.values()), "stored_twice": sum(n > 1 for n in stored.values()),
            "lost": sum(1 for k in sent if k not in stored), "unexpected_stored": sum(1 for k in stored if k not in sent),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2), "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 1), "health": CloudClient(srv.url).health()}


# ------------------------------------------------------------------------------- 2. fuzz


def _mutations(rng: random.Random, bases: list[bytes], other_key: bytes) -> tuple[str, bytes]:
    """(kind, body): a random body, or a valid frame changed in one of several ways."""
    base = rng.choice(bases)
    kind = rng.choice(["random", "bit_flip", "byte_set", "header_bytes", "truncate", "extend", "splice", "resign"])
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(0, 400))
    if kind == "bit_flip":
        i = rng.randrange(len(base))
        return kind, base[:i] + bytes([base[i] ^ (1 << rng.randrange(8))]) + base[i + 1:]
    if kind == "byte_set":
        i = rng.randrange(len(base))
        return kind, base[:i] + bytes([(base[i] + rng.randrange(1, 256)) % 256]) + base[i + 1:]
    if kind == "header_bytes":  # several bytes of the first 118 (the fixed header and device id) rewritten
        b = bytearray(base)
        for i in rng.sample(range(min(118, len(b))), rng.randrange(1, 6)):
            b[i] = (b[i] + rng.randrange(1, 256)) % 256
        return kind, bytes(b)
    if kind == "truncate":
        return kind, base[:rng.randrange(len(base))]
    if kind == "extend":
        return kind, base + rng.randbytes(rng.randrange(1, 64))
    if kind == "splice":
        other, i = rng.choice(bases), rng.randrange(1, len(base))
        body = base[:i] + other[i:]
        return kind, body if body not in bases else body + b"\0"  # a cut in the common prefix changes nothing
    return kind, _resign(base, other_key)


def _resign(frame: bytes, key: bytes) -> bytes:
    """The frame's bytes under another key's tag: a forgery attempt without the device key."""
    body = frame[:-wire.TAG_SIZE]
    return body + hmac.new(key, body, hashlib.sha256).digest()


def fuzz_decoder(bases: list[bytes], keys: dict, model_ids: set, n: int, seed: int = 0) -> dict:
    rng, outcomes, kinds = random.Random(seed), Counter(), Counter()
    crashes, forgeries = [], 0
    originals = set(bases)
    for _ in range(n):
        kind, body = _mutations(rng, bases, bytes(32))
        kinds[kind] += 1
        try:
            wire.decode(body, keys, expected_model_ids=model_ids)
        except wire.FrameError as e:
            outcomes[f"FrameError {e.field}"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - a crash is what we count
            crashes.append(f"{kind}: {type(e).__name__}: {e}")
            continue
        outcomes["accepted"] += 1
        forgeries += body not in originals
    return {"frames": n, "outcomes": dict(outcomes.most_common()), "kinds": dict(sorted(kinds.items())),
            "crashes": len(crashes), "crash_examples": crashes[:5], "forgeries_accepted": forgeries}


def fuzz_http(srv: Serve, bases: list[bytes], n: int, workers: int = 4, seed: int = 1) -> dict:
    rng = random.Random(seed)
    bodies = [_mutations(rng, bases, bytes(32)) for _ in range(n)]
    originals, statuses, crashes, forgeries, lock = set(bases), Counter(), [], 0, threading.Lock()
    host, port = "127.0.0.1", srv.port

    def worker(part):
        nonlocal forgeries
        conn = http.client.HTTPConnection(host, port, timeout=30)
        for kind, body in part:
            try:
                conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                status = f"connection error {type(e).__name__}"
            with lock:
                statuses[str(status)] += 1
                if not isinstance(status, int) or status >= 500:
                    crashes.append(f"{kind}: {status}")
                forgeries += status == 200 and body not in originals
        conn.close()

    threads = [threading.Thread(target=worker, args=(bodies[w::workers],)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"frames": n, "statuses": dict(sorted(statuses.items())), "crashes": len(crashes),
            "crash_examples": crashes[:5], "forgeries_accepted": forgeries, "alive_after": _alive(srv)}


def _alive(srv: Serve) -> bool:
    try:
        return CloudClient(srv.url, retries=1).health()["status"] == "ok"
    except CloudError:
        return False


# ------------------------------------------------------------------------------- 3. replays


def _try(client: CloudClient, frame: bytes) -> tuple[int, str]:
    try:
        reply = client.infer(frame)
    except CloudError as e:
        return e.status, e.reason
    return 200, "answered, duplicate: " + str(reply["duplicate"]).lower()


def replay_table(srv: Serve, runner, feats, dev: str, key: bytes, others: int, retry_s: int) -> list[dict]:
    """What each replay attempt gets, and how many frames the store gained from it."""
    client, rows = CloudClient(srv.url, timeout=30.0, retries=1), []

    def row(case: str, frame: bytes):
        before = client.health()["stored"]
        status, reason = _try(client, frame)
        rows.append({"case": case, "status": status, "reason": reason, "stored_delta": client.health()["stored"] - before})
        log(f"replay: {case}: {status} {reason}")

    frame = make_frame(runner, feats, 0, dev, key)
    rid = wire.peek_header(frame).request_id
    row("a fresh frame", frame)
    row("the same bytes again at once (a client retry)", frame)
    first_sent = time.monotonic()
    for i in range(others):
        client.infer(make_frame(runner, feats, i + 1, dev, key))
    time.sleep(max(0.0, retry_s + 0.5 - (time.monotonic() - first_sent)))
    row(f"the same bytes after {others:,} other frames and > {retry_s} s", frame)
    row("its request id with other bytes", make_frame(runner, feats, 7, dev, key, request_id=rid))
    for case, ts in (("timestamp 1970-01-01", lambda now: 0), ("timestamp 2500-01-01", lambda now: 16_725_225_600 * 10**6),
                     (f"timestamp {TOLERANCE_S + 1} s old", lambda now: now - (TOLERANCE_S + 1) * 10**6),
                     (f"timestamp {TOLERANCE_S + 1} s ahead", lambda now: now + (TOLERANCE_S + 1) * 10**6),
                     (f"timestamp {TOLERANCE_S - 30} s old (inside)", lambda now: now - (TOLERANCE_S - 30) * 10**6)):
        row(case, make_frame(runner, feats, 3, dev, key, timestamp_us=ts(time.time_ns() // 1000)))
    srv.restart(kill=True)
    row("the first frame again after kill -9 and a restart", frame)
    row("its request id with other bytes, after the restart", make_frame(runner, feats, 9, dev, key, request_id=rid))
    return rows


# ------------------------------------------------------------------------------- report


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg())}


def render(report: dict) -> str:
    m, s, ld = report["machine"], report["settings"], report["load"]
    out = [f"# The wire under load, fuzzing and replay\n\nReproduce: `{report['command']}`\n",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}; load average "
           f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end (shared machine). Server: "
           "`edgeveil serve` in its own process (uvicorn, one worker, loopback); clients: one thread per device "
           "in this process, each with its own key and `CloudClient` (retries with backoff, same request id).\n",
           f"## Load: {s['devices']} devices x {s['requests']} requests (int8 frames, one image each)\n",
           "| devices | requests | answered | failed | stored | stored twice | lost | duplicate replies "
           "| p50 (ms) | p99 (ms) | throughput (req/s) |", "|" + "---|" * 11,
           f"| {ld['devices']} | {ld['requests']} | {ld['answered']} | {ld['failed']} | {ld['stored']} | "
           f"{ld['stored_twice']} | {ld['lost']} | {ld['duplicate_replies']} | {ld['p50_ms']} | {ld['p99_ms']} | "
           f"{ld['throughput_rps']} |\n",
           "Stored, stored twice and lost are counted from the store on disk (every frame re-verified), not from "
           "the replies. The server handles one frame at a time (tail inference, two fsyncs), so with 32 devices "
           "sending back to back the latency is mostly queueing: about devices / throughput.\n"]
    for name, title in (("fuzz_decoder", "at `wire.decode`"), ("fuzz_http", "over HTTP (`POST /v1/infer`)")):
        f = report[name]
        counts = f.get("outcomes") or f.get("statuses")
        out += [f"## Fuzz {title}: {f['frames']:,} frames\n", "| outcome | count |", "|---|---|",
                *[f"| {k} | {v:,} |" for k, v in counts.items()],
                f"| **crashes** | **{f['crashes']}** |", f"| **forgeries accepted** | **{f['forgeries_accepted']}** |",
                *([f"| frames the fuzz added to the store | {f['stored_by_fuzz']} |"] if "stored_by_fuzz" in f else []),
                ""]
    out += ["Mutations (seeded): random bytes, one bit flipped, one byte changed, 1-5 header bytes changed, "
            "truncated, extended, two frames spliced, re-signed under another key.\n",
            f"## Replays (server: `--replay-tolerance {TOLERANCE_S} --retry-window {s['retry_s']}`)\n",
            "| case | status | stored | reason |", "|---|---|---|---|",
            *[f"| {r['case']} | {r['status']} | +{r['stored_delta']} | {r['reason']} |" for r in report["replays"]]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 x 25 requests and fewer fuzzed frames: checks the script")
    ap.add_argument("--run", type=Path, help="a trained run exported to int8 (copied, never written)")
    ap.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs" / "load")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    command = " ".join(["python benchmarks/load.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"benchmark": "load", "quick": args.quick, "command": command, "machine": machine(), "settings": s}
    run = args.run or prepare_run(args.runs)
    runner, feats = device_features(run)
    keys = {f"dev-{i:02d}": wire.new_device_key() for i in range(s["devices"])}
    with tempfile.TemporaryDirectory(prefix="edgeveil_load_") as tmp:
        tmp = Path(tmp)
        srv = Serve(fresh_copy(run, tmp / "load", keys), tmp / "serve.log",
                    "--store-cap", str(s["devices"] * s["requests"] + 1000)).start()
        try:
            log(f"load: {s['devices']} devices x {s['requests']} requests")
            report["load"] = load_test(srv, runner, feats, keys, s["requests"])
            bases = [make_frame(runner, feats, i, d, k) for i, (d, k) in enumerate(list(keys.items())[:4])]
            log(f"fuzz: {s['fuzz_decoder']:,} frames at the decoder, {s['fuzz_http']:,} over HTTP")
            report["fuzz_decoder"] = fuzz_decoder(bases, keys, {runner.model_id}, s["fuzz_decoder"])
            stored = CloudClient(srv.url).health()["stored"]
            report["fuzz_http"] = fuzz_http(srv, bases, s["fuzz_http"])
            report["fuzz_http"]["stored_by_fuzz"] = CloudClient(srv.url).health()["stored"] - stored
        finally:
            srv.stop()
        dev, key = "replayer", wire.new_device_key()
        srv = Serve(fresh_copy(run, tmp / "replay", {dev: key}), tmp / "serve.log",
                    "--replay-tolerance", str(TOLERANCE_S), "--retry-window", str(s["retry_s"])).start()
        try:
            report["replays"] = replay_table(srv, runner, feats, dev, key, s["replay_after"], s["retry_s"])
        finally:
            srv.stop()
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    md = render(report)
    path = args.out / ("load_quick" if args.quick else "load")
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(path.with_suffix(".md"), md.encode())
    print(md)
    print(f"wrote {path}.json and {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
