"""Every stage in order for one config: train, export, bench, serve + stream, attack, report."""
from __future__ import annotations

import time
from pathlib import Path

__all__ = ["run_all"]


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[edgeveil] {msg}")


def _attack_summary(entry: dict) -> str:
    """The headline figure per precision: SSIM and identification for reconstructions, else the first metric."""
    if entry.get("error") or entry.get("skipped"):
        return entry.get("error") or f"skipped: {entry['skipped']}"
    parts = []
    for prec, r in entry["precisions"].items():
        s = r["summary"]
        keys = [k for k in ("ssim", "ssim_luma", "identification") if k in s] or list(s)[:1]
        parts.append(f"{prec} " + " ".join(f"{k} {s[k]['mean']:.3f}" for k in keys))
    return ", ".join(parts)


def run_all(cfg, out: Path, *, progress: bool = True, bench_runs: int = 100) -> dict:
    """Run the whole path into ``out``; returns the paths and headline numbers."""
    from edgeveil.cloud_sim.server import Server
    from edgeveil.cloud_sim.verdict import outcome_word
    from edgeveil.cloud_sim.store import default_keys_path, load_or_create_keys

    from .attack_stage import attack_stage
    from .device_stage import DEVICE_ID, bench_stage, stream_stage
    from .report import write_report
    from .stages import export_stage, preflight, train_stage

    out, t0 = Path(out), time.perf_counter()
    for line in preflight(cfg):  # invalid attack options fail here, before anything trains
        _say(f"preflight: {line}")
    _say(f"1/6 train {cfg.model.arch} on {cfg.data.name} (defense {cfg.defense.name})")
    metrics = train_stage(cfg, out, progress=progress)
    _say(f"    float test accuracy {metrics['float_test_accuracy']:.4f}")
    _say("2/6 export the head: ONNX -> TFLite " + ", ".join(cfg.export.precisions))
    export_stage(cfg, out, progress=progress)
    _say("3/6 benchmark every artifact on this machine")
    bench_stage(out, runs=bench_runs, progress=progress)
    keys = load_or_create_keys(default_keys_path(out), DEVICE_ID)
    with Server(out, keys=keys) as server:
        _say(f"4/6 cloud service on {server.base_url}; the device streams the test set through HTTP")
        stream = stream_stage(out, server.base_url, keys[DEVICE_ID], progress=progress)
    _say(f"    served class == offline tail prediction for {stream['agreement']:.2%} of {stream['sent']} frames")
    _say(f"5/6 attack the received features: {', '.join(cfg.attack.names)}")
    attacks = attack_stage(cfg, out, progress=progress)
    for name, a in attacks["attacks"].items():
        _say(f"    {name}: {_attack_summary(a)}")
    _say(f"    verdict: {outcome_word(attacks['verdict'])}: {attacks['verdict']['headline']}")
    md, html = write_report(out)
    _say(f"6/6 report: {html} (and {md.name}); {time.perf_counter() - t0:.0f} s in all")
    return {"report": str(html), "metrics": metrics, "stream": stream, "attacks": attacks}
