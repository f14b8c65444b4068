"""Board fit per exported head: MACs, parameters, TFLite Micro arena against the activation lower
bound, flash, which boards it fits, estimated latency per board, Vela's NPU estimates; and the
MLPerf Tiny ResNet-8 through the same estimator, against its published latencies.

Reads already exported runs (nothing in them is written: the target checks run with write=False).
`--defended DIR` trains and exports a CEM-defended vgg11_bn head into DIR first when it is not there.

    python benchmarks/targets.py --runs RUN [RUN ...] [--defended DIR] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from edgeveil.device.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEVEIL_SHARED_DATA", REPO.parent / "shared" / "datasets"))
CIFAR10 = f"npz:{SHARED / 'cifar10_train_jpeg.npz'},{SHARED / 'cifar10_test_jpeg.npz'}"
# The defended head: CEM (lambda 8, noise base) on the narrow vgg11_bn, a short stated budget.
DEFENDED = [f"data.name={CIFAR10}", "model.arch=vgg11_bn", "model.width=0.25", "defense.name=cem",
            "defense.strength=8", "data.victim_train=3000", "data.aux=1000", "data.test=1000", "train.epochs=3",
            "train.batch_size=128", "train.device=cpu"]
SAMPLES = 300


def machine() -> dict:
    import tflite_micro

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "tflite_micro": tflite_micro.__version__}


def ensure_defended(run_dir: Path) -> Path:
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage

    if not (run_dir / "export" / "manifest.json").is_file():
        cfg = load_config(None, DEFENDED)
        train_stage(cfg, run_dir, progress=True)
        export_stage(cfg, run_dir, progress=True)
    return run_dir


def head_row(run_dir: Path) -> dict:
    """Every board's fit for one run's int8 head (the target checks, nothing written)."""
    from edgeveil.export.targets import target_report

    info = json.loads((run_dir / "train" / "model.json").read_text())
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    budget = {"dataset": ",".join(Path(part).name for part in info["data"]["name"].split(",")),
              "victim_train": info["data"]["splits"]["victim_train"]["size"], "epochs": info["train"]["epochs_done"],
              "float_accuracy": metrics["float_test_accuracy"], "inference_noise": info.get("inference_noise")}
    started = time.perf_counter()
    section = target_report(run_dir / "export", "stm32h743", write=False, samples=SAMPLES)
    a = section["analysis"]
    return {"run": str(run_dir), "arch": info["arch"], "width": info["width"], "split": info["split"],
            "defense": info["defense"], "budget": budget, "input": info["input"]["shape"],
            "features": info["feature_shape"],
            "macs": a["graph"]["macs"], "parameters": a["graph"]["parameters"], "by_type": a["graph"]["by_type"],
            "model_bytes": a["model_bytes"], "arena": {k: a["arena"][k] for k in ("arena_bytes", "recommended_bytes",
                                                                                   "breakdown", "planner_overhead")},
            "lower_bound_bytes": a["graph"]["activation_lower_bound_bytes"], "kernels": a["kernels"],
            "vela": {acc: {k: v[k] for k in ("time_s", "cycles", "clock_hz", "sram_bytes", "flash_bytes", "cpu_ops",
                                             "config")} for acc, v in a["vela"].items()},
            "fit": section["fit"], "seconds": round(time.perf_counter() - started, 1)}


def resnet8(cache: Path) -> dict:
    """The estimator check, plus ResNet-8's own arena and Vela figures (edge_toolchain.md quotes both)."""
    from edgeveil.export.estimate import resnet8_check, resnet8_tflite
    from edgeveil.export.graph import read_graph, summarize
    from edgeveil.export.tflm import measure_arena
    from edgeveil.export.vela import vela_estimate

    path = resnet8_tflite(cache)
    arena = measure_arena(path)
    return {"check": resnet8_check(path), "bytes": path.stat().st_size,
            "lower_bound_bytes": summarize(read_graph(path))["activation_lower_bound_bytes"],
            "arena_bytes": arena["arena_bytes"], "head_bytes": arena["breakdown"]["head_bytes"],
            "vela_u55_128_ms": 1e3 * vela_estimate(path, "ethos-u55-128")["time_s"]}


# ------------------------------------------------------------------------------- tables


def _name(r: dict) -> str:
    d = r["defense"]
    return f"{r['arch']} ({d['name']} {d['strength']:g})" if d["name"] != "none" else r["arch"]


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def _fits(fit: list[dict]) -> str:
    no = [f["board"] for f in fit if not f["fits"]]
    return "all" if not no else "all but " + ", ".join(no)


def heads_list(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        b, noise = r["budget"], r["budget"]["inference_noise"]
        extra = (f"; inference noise {noise} is added by the device runtime after the head, not in the graph"
                 if noise else "")
        lines.append(f"- {_name(r)}: width {r['width']}, split {r['split']}; trained on {b['victim_train']:,} images "
                     f"of {b['dataset']} for {b['epochs']} epochs (float test accuracy {b['float_accuracy']:.3f})"
                     f"{extra}. `{r['run']}`")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = ["| head | input -> features | MACs | params | int8 bytes | arena (measured) | head / tail | "
             "activation lower bound | planner over bound | flash needed | fits |", "|" + "---|" * 11]
    for r in rows:
        a, b = r["arena"], r["arena"]["breakdown"]
        fits = _fits(r["fit"])
        flash = next(f for f in r["fit"] if f["board"] == "stm32h743")["flash"]["needed"]
        lines.append(f"| {_name(r)} | {r['input']} -> {r['features']} | {r['macs']:,} | {r['parameters']:,} | "
                     f"{r['model_bytes']:,} | {a['arena_bytes']:,} | {b['head_bytes']:,} / {b['tail_bytes']:,} | "
                     f"{r['lower_bound_bytes']:,} | {_pct(a['planner_overhead']['overhead'])} | {flash:,} | {fits} |")
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    boards = [f["board"] for f in rows[0]["fit"] if not f["latency"] or "npu_ms" not in f["latency"]]
    lines = ["| head | " + " | ".join(boards) + " | Vela U55-128 | Vela U65-256 |", "|" + "---|" * (len(boards) + 3)]
    for r in rows:
        cells = []
        for f in r["fit"]:
            if f["board"] in boards:
                lat = f["latency"]
                cells.append(f"{_ms(lat['low_ms'])}-{_ms(lat['high_ms'])}" if lat else "-")
        vela = [f"{_ms(1e3 * r['vela'][acc]['time_s'])} ({r['vela'][acc]['sram_bytes']:,} B SRAM)"
                for acc in ("ethos-u55-128", "ethos-u65-256")]
        lines.append(f"| {_name(r)} | " + " | ".join(cells + vela) + " |")
    caveats: dict[str, list[str]] = {}
    for r in rows:
        for caveat in dict.fromkeys(c for f in r["fit"] for c in (f["latency"] or {}).get("caveats", [])):
            caveats.setdefault(caveat, []).append(_name(r))
    return "\n".join(lines + [""] + [f"- {', '.join(heads)}: {c}" for c, heads in caveats.items()])


def kernels_table(rows: list[dict]) -> str:
    lines = ["| head | inputs | TFLM vs reference kernels | TFLM vs XNNPACK: max steps | "
             "share of values differing |", "|---|---|---|---|---|"]
    for r in rows:
        k = r["kernels"]
        ref = "bit-exact" if k["tflm_vs_reference"]["bit_exact"] else f"max {k['tflm_vs_reference']['max_diff_steps']}"
        lines.append(f"| {_name(r)} | {k['n']} | {ref} | {k['tflm_vs_xnnpack']['max_diff_steps']} | "
                     f"{100 * k['tflm_vs_xnnpack']['share_differ']:.2f}% |")
    return "\n".join(lines)


def resnet8_table(r8: dict) -> str:
    c = r8["check"]
    lines = [f"ResNet-8 rebuilt (random weights, full int8, {r8['bytes']:,} B): {c['macs']:,} MACs "
             f"({c['mac_ratio']:.5f} x the published 12.5 M); TFLM arena {r8['arena_bytes']:,} B (planned activations "
             f"{r8['head_bytes']:,} B, lower bound {r8['lower_bound_bytes']:,} B); Vela U55-128 "
             f"{r8['vela_u55_128_ms']:.3f} ms.", "",
             "| board | core @ clock | submission | published ms | estimated ms | inside |",
             "|---|---|---|---|---|---|"]
    for row in c["rows"]:
        est = f"{row['low_ms']:.1f}-{row['high_ms']:.1f} ({row['engine']})" if row["engine"] else "no engine"
        inside = {True: "yes", False: "**no**", None: "-"}[row.get("inside")]
        lines.append(f"| {row['board']} | {row['core']} @ {row['clock_hz'] / 1e6:g} MHz | {row['submission']} | "
                     f"{row['published_ms']} | {est} | {inside} |")
    return "\n".join(lines)


def markdown(report: dict, command: str) -> str:
    rows = report["results"]
    overs = [r for r in rows if r["arena"]["planner_overhead"]["note"]]
    notes = "".join(f"\n- {_name(r)}: {r['arena']['planner_overhead']['note']}." for r in overs)
    return (f"# Board fit and estimated latency per head\n\nReproduce: `{command}`\n\n"
            f"Machine: {json.dumps(report['machine'])}. Every latency is **estimated** (MACs x published cycles "
            "per MAC at the board clock, `edgeveil.export.estimate`; Vela's performance model for the NPUs), "
            "never measured. Arena: the smallest TFLite Micro arena (bisection, 64-bit host build) in which the "
            f"head allocates and runs one real test image; `fits` judges it with a 10% margin against each board's "
            "largest RAM block and judges flash as model bytes + the high TFLite Micro runtime estimate "
            "(193 KiB). Kernels compared on the first "
            f"{SAMPLES} test images of each run. Memory and latency depend on the architecture, not on how well "
            f"a head was trained.\n\n{heads_list(rows)}\n\n## Memory and fit\n\n{memory_table(rows)}\n{notes}\n\n"
            f"## Estimated latency (ms, low-high)\n\n{latency_table(rows)}\n\n"
            f"## TFLite Micro against LiteRT\n\n{kernels_table(rows)}\n\n"
            f"## Estimator check: MLPerf Tiny ResNet-8\n\n{resnet8_table(report['resnet8'])}\n\n"
            "The ranges were derived from these same rows (lowest tuned engine and TFLM + CMSIS-NN per core), so "
            "the rows at the ends fall on the ends by construction; the check confirms the MAC count and the "
            "arithmetic, and shows where the other engines sit inside the ranges.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="exported run directories")
    ap.add_argument("--defended", type=Path, help="a CEM-defended run (trained and exported here if missing)")
    ap.add_argument("--cache", type=Path, default=None, help="ResNet-8 cache folder (default ~/.cache/edgeveil)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    runs = [*args.runs, *([ensure_defended(args.defended)] if args.defended else [])]
    missing = [str(r) for r in runs if not (r / "export" / "manifest.json").is_file()]
    if missing:
        ap.error(f"not exported (no export/manifest.json): {', '.join(missing)}")
    results = []
    for run in runs:
        print(f"== {run}", flush=True)
        results.append(head_row(run))
        print(memory_table(results[-1:]), flush=True)
    report = {"benchmark": "targets", "machine": machine(), "results": results, "resnet8": resnet8(args.cache)}
    command = " ".join(["python benchmarks/targets.py", "--runs", *map(str, args.runs),
                        *(["--defended", str(args.defended)] if args.defended else [])])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "targets.json", report)
    text = markdown(report, command)
    atomic_write_text(args.out / "targets.md", text)
    print("\n" + text)
    print(f"wrote {args.out / 'targets.json'} and {args.out / 'targets.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
