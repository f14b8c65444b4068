"""Stage 3 from the host: benchmark every artifact, and stream the test set through the cloud service.

``stream_stage`` plays the board: raw test images go through the device runner (the real TFLite
artifact), each feature tensor is sent as a signed frame over HTTP, and the server's answer is
checked against the tail's prediction computed offline from the same features.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["bench_stage", "stream_stage", "DEVICE_ID"]

DEVICE_ID = "device-0"


def bench_stage(run_dir: Path, *, runs: int = 200, threads=(1, 2), progress: bool = True) -> dict:
    """Benchmark every exported artifact (each in a fresh process) into ``device/bench.json``."""
    from tqdm.auto import tqdm

    from edgeveil.device.bench import bench_export_dir
    from edgeveil.device.files import atomic_write_json

    run_dir = Path(run_dir)
    with tqdm(desc="bench", unit="setting", disable=not progress) as bar:
        def on_result(done, total, row):
            bar.total = total
            bar.update(done - bar.n)
            bar.set_postfix_str(f"{row['precision']} t{row['num_threads']} p50 {row['p50_us']:.0f} µs")

        result = bench_export_dir(run_dir / "export", runs=runs, threads=threads, xnnpack=(True, False),
                                  isolate=True, on_result=on_result)
    atomic_write_json(run_dir / "device" / "bench.json", result)
    return result


def _offline_classes(run, features_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        logits = run.tail(torch.from_numpy(np.ascontiguousarray(features_nchw)))
        probs = torch.softmax(logits, dim=1).numpy()
    return probs.argmax(1), probs


def stream_stage(run_dir: Path, base_url: str, key: bytes, *, precision: str = "int8", device_id: str = DEVICE_ID,
                 limit: int | None = None, progress: bool = True) -> dict:
    """Send the test split through the device runner and the cloud; write device/stream.json and sent.jsonl."""
    from tqdm.auto import tqdm

    from edgeveil.device import wire
    from edgeveil.device.client import CloudClient
    from edgeveil.device.files import atomic_write_json, atomic_write_jsonl
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    test = load_splits(run.info).test
    n = len(test) if limit is None else min(limit, len(test))
    runner = HeadRunner(run_dir / "export", precision)
    client = CloudClient(base_url)
    encoder = wire.FrameEncoder(key=key, device_id=device_id, model_id=runner.model_id)
    sent, served, offline, agree_p = [], [], [], 0.0
    for i in tqdm(range(n), desc=f"device -> cloud ({precision})", unit="frame", disable=not progress):
        feats = runner.run(test.x[i:i + 1])
        frame = encoder.encode(feats.values, scale=feats.scale, zero_point=feats.zero_point)
        reply = client.infer(frame)
        cls, probs = _offline_classes(run, feats.to_nchw())
        served.append(reply["class"])
        offline.append(int(cls[0]))
        agree_p = max(agree_p, float(np.abs(np.asarray(reply["probabilities"][0]) - probs[0]).max()))
        sent.append({"index": i, "request_id": reply["request_id"], "served_class": reply["class"],
                     "offline_class": int(cls[0]), "label": int(test.y[i])})
    served, offline = np.array(served), np.array(offline)
    summary = {"schema": "edgeveil.stream/1", "precision": precision, "model_id": runner.model_id,
               "runtime": f"{runner.runtime_name} (XNNPACK {'on' if runner.xnnpack else 'off'})",
               "server": base_url, "device_id": device_id, "sent": n,
               "agreement": float((served == offline).mean()) if n else 0.0,
               "max_probability_difference": agree_p,
               "served_accuracy": float((served == test.y[:n]).mean()) if n else 0.0,
               "noise": runner.noise_spec}
    atomic_write_jsonl(run_dir / "device" / "sent.jsonl", sent)
    atomic_write_json(run_dir / "device" / "stream.json", summary)
    return summary


def read_sent(run_dir: Path) -> dict[str, int]:
    """request id (hex) -> test-split index, as the device recorded it (ground truth for scoring only)."""
    from edgeveil.device.files import read_jsonl

    return {r["request_id"]: r["index"] for r in read_jsonl(Path(run_dir) / "device" / "sent.jsonl")}
