"""What a device pays per image beyond the interpreter: raw invoke against the project's per-image path.

For each head (the four of benchmarks/device_latency.py, same training budget and export, plus a wider
ResNet-18 head above 10 M MACs), `edgeveil.device.bench.bench_path` times, on one interpreter
(ai-edge-litert, XNNPACK, 1 thread) in interleaved iterations:
raw (set_tensor + invoke + get_tensor on the already pre-processed input), path (HeadRunner.run on uint8
pixels), encode (FrameEncoder.encode of its features) and whole (run + encode on one clock). Several passes,
heads in rotated order; we quote medians of the per-pass medians and the median of the per-pass ratios.
Beside it, in each pass, the path as it was before (device/ of commit 958cc1f, loaded from git into a
scratch package: HeadRunner.run + wire.encode), interleaved with raw the same way.
Goals (issue #14): path/raw <= 1.15; encode <= 15 us for a 6 KB frame; whole/raw <= 1.4 on smallcnn and
<= 1.1 on heads of 10 M MACs or more.

    python benchmarks/device_path.py            # all heads, 3 passes x 2000 iterations; writes benchmarks/results/
    python benchmarks/device_path.py --quick    # smallcnn, 1 pass x 300 (checks the script)
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_latency as latency  # noqa: E402  (the same heads, budgets and machine description)

from edgeveil.device.bench import bench_path  # noqa: E402
from edgeveil.device.files import atomic_write_json, atomic_write_text  # noqa: E402

ARCHS = ["smallcnn", "resnet18", "mobilenetv2", "vgg11_bn"]
# A head past 10 M MACs for the 1.1x goal: ResNet-18's stem and first stage at width 0.5 (resnet18 above is 0.25).
WIDE = ("resnet18_w0.5", latency.CIFAR10, ["model.arch=resnet18", "model.split=1", "model.width=0.5"])
FULL, QUICK = {"passes": 3, "runs": 2000, "warmup": 100}, {"passes": 1, "runs": 300, "warmup": 20}
BEFORE = "958cc1f"  # the last commit with the arithmetic pre-processing and the one-shot encode (issue #14)
GOALS = {"path/raw": 1.15, "encode_us_6kb": 15.0, "whole/raw small": 1.4, "whole/raw 10M": 1.1}


def prepare_wide(runs: Path, quick: bool) -> tuple[str, Path, int]:
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage
    from edgeveil.training.runfile import load_run

    name, dataset, overrides = WIDE
    run_dir = runs / (f"{name}_quick" if quick else name)
    if not (run_dir / "export" / "manifest.json").is_file():
        budget = latency.QUICK_BUDGET if quick else latency.BUDGET
        cfg = load_config(None, [f"data.name={dataset}", *overrides, *budget, *latency.EXPORT])
        latency.log(f"{name}: training ({' '.join(budget)}), exporting fp32 + int8 into {run_dir}")
        train_stage(cfg, run_dir, progress=False)
        export_stage(cfg, run_dir, progress=False)
    info, head, _ = load_run(run_dir)
    return name, run_dir / "export", latency.count_macs(head, tuple(info["input"]["shape"]))


def prepare(archs: list[str], runs: Path, quick: bool, wide: bool) -> list[tuple[str, Path, int]]:
    heads = []
    for arch in archs:
        h = latency.prepare_arch(arch, runs, quick, None)
        heads.append((arch, h.tflite["int8"].parent, h.macs))
    return heads + ([prepare_wide(runs, quick)] if wide else [])


def load_before(scratch: Path):
    """edgeveil.device as of BEFORE, imported as `edgeveil_before` from `scratch` (None if git cannot)."""
    pkg = scratch / "edgeveil_before"
    pkg.mkdir()
    for name in ("__init__", "runner", "wire", "interpreter", "manifest", "noise", "quant", "files"):
        done = subprocess.run(["git", "-C", str(latency.REPO), "show", f"{BEFORE}:device/{name}.py"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            latency.log(f"no 'before' column: git show {BEFORE}:device/{name}.py failed: {done.stderr.strip()}")
            return None
        (pkg / f"{name}.py").write_text(done.stdout)
    sys.path.insert(0, str(scratch))
    return importlib.import_module("edgeveil_before.runner"), importlib.import_module("edgeveil_before.wire")


def time_before(before, export_dir: Path, s: dict, seed: int) -> dict:
    """raw against the old HeadRunner.run + wire.encode, interleaved as bench_path does: p50 in us per stage."""
    old_runner, old_wire = before
    runner = old_runner.HeadRunner(export_dir, "int8", num_threads=1, noise_seed=seed)
    pool = np.random.default_rng(seed).integers(0, 256, (16, 1, *runner.input_shape), dtype=np.uint8)
    inputs = [runner.preprocess(im) for im in pool]
    interp = runner.loaded.interpreter
    index, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    key, clock, times = old_wire.new_device_key(), time.perf_counter_ns, {"raw": [], "path": [], "whole": []}

    def raw(x):
        start = clock()
        interp.set_tensor(index, x)
        interp.invoke()
        interp.get_tensor(out)
        return clock() - start

    def path(image):
        start = clock()
        feats = runner.run(image)
        ran = clock()
        old_wire.encode(feats.values, key=key, device_id="bench", model_id=runner.model_id, scale=feats.scale,
                        zero_point=feats.zero_point)
        return ran - start, clock() - start

    for i in range(s["warmup"]):
        raw(inputs[i % 16])
        path(pool[i % 16])
    gc.disable()
    try:
        for i in range(s["runs"]):
            if i % 2:
                times["raw"].append(raw(inputs[i % 16]))
            ran, whole = path(pool[i % 16])
            if not i % 2:
                times["raw"].append(raw(inputs[i % 16]))
            times["path"].append(ran)
            times["whole"].append(whole)
    finally:
        gc.enable()
    return {k: float(np.percentile(np.asarray(v) / 1e3, 50)) for k, v in times.items()}


def measure(heads: list, s: dict, before) -> dict:
    """{head: [bench_path result per pass]}; heads in a rotated order each pass; with `before`, each result
    also carries "before": the old path timed right after, in the same pass."""
    samples = {name: [] for name, _, _ in heads}
    for p in range(s["passes"]):
        for name, export_dir, _ in heads[p % len(heads):] + heads[:p % len(heads)]:
            r = bench_path(export_dir, "int8", runs=s["runs"], warmup=s["warmup"], threads=1, seed=p)
            if before is not None:
                r["before"] = time_before(before, export_dir, s, seed=p)
            samples[name].append(r)
            st = r["stages"]
            latency.log(f"pass {p + 1}/{s['passes']} {name:13s} raw {st['raw']['p50_us']:7.1f}  path "
                        f"{st['path']['p50_us']:7.1f}  encode {st['encode']['p50_us']:5.1f}  whole "
                        f"{st['whole']['p50_us']:7.1f} us  ({r['ratios']['path/raw']:.2f}x, "
                        f"{r['ratios']['whole/raw']:.2f}x)"
                        + (f"; before: raw {r['before']['raw']:7.1f} whole {r['before']['whole']:7.1f} us"
                           if "before" in r else ""))
    return samples


def summarize(name: str, macs: int, results: list[dict]) -> dict:
    med = lambda xs: float(np.median(xs))  # noqa: E731
    stages = {st: {"p50_us": med([r["stages"][st]["p50_us"] for r in results]),
                   "p90_us": med([r["stages"][st]["p90_us"] for r in results]),
                   "pass_p50_us": [r["stages"][st]["p50_us"] for r in results]} for st in results[0]["stages"]}
    ratios = {k: med([r["ratios"][k] for r in results]) for k in results[0]["ratios"]}
    first = results[0]
    before = None
    if all("before" in r for r in results):
        before = {k: med([r["before"][k] for r in results]) for k in ("raw", "path", "whole")}
        before.update({f"{k}/raw": med([r["before"][k] / r["before"]["raw"] for r in results])
                       for k in ("path", "whole")})
    return {"before": before, "head": name, "macs": macs, "input": first["input"], "features": first["features"],
            "frame_bytes": first["frame_bytes"], "runtime": "{name} {version}".format(**first["runtime"]),
            "xnnpack": first["xnnpack"], "iterations": [r["stages"]["raw"]["count"] for r in results],
            "stages": stages, "ratios": ratios, "pass_ratios": {k: [r["ratios"][k] for r in results] for k in ratios},
            "model": first["model"]}


def verdicts(row: dict) -> dict:
    whole_goal = GOALS["whole/raw 10M"] if row["macs"] >= 10e6 else (
        GOALS["whole/raw small"] if row["head"] == "smallcnn" else None)
    out = {"path/raw": row["ratios"]["path/raw"] <= GOALS["path/raw"]}
    if whole_goal is not None:
        out[f"whole/raw <= {whole_goal}"] = row["ratios"]["whole/raw"] <= whole_goal
    if 5500 <= row["frame_bytes"] <= 7000:  # "a 6 KB frame"
        out["encode <= 15 us"] = row["stages"]["encode"]["p50_us"] <= GOALS["encode_us_6kb"]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| head | MACs (M) | input | features -> frame | raw p50 / p90 (us) | path p50 (us) | encode p50 (us) "
             "| whole p50 (us) | path/raw | whole/raw | before: path/raw, whole/raw | goals |", "|---" * 12 + "|"]
    for r in rows:
        st, feat = r["stages"], r["features"]
        goals = ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in r["verdicts"].items())
        b = r["before"]
        before = "-" if b is None else f"{b['path/raw']:.2f}, {b['whole/raw']:.2f} ({b['whole']:.1f} us)"
        lines.append(f"| {r['head']} | {r['macs'] / 1e6:.2f} | {'x'.join(map(str, r['input']['shape'][1:]))} "
                     f"{r['input']['dtype']} | {'x'.join(map(str, feat['shape'][1:]))} {feat['dtype']} -> "
                     f"{r['frame_bytes']} B | {st['raw']['p50_us']:.1f} / {st['raw']['p90_us']:.1f} | "
                     f"{st['path']['p50_us']:.1f} | {st['encode']['p50_us']:.1f} | {st['whole']['p50_us']:.1f} | "
                     f"{r['ratios']['path/raw']:.2f} | {r['ratios']['whole/raw']:.2f} | {before} | {goals} |")
    return "\n".join(lines)


def pass_table(rows: list[dict]) -> str:
    lines = ["| head | per-pass raw p50 (us) | per-pass path/raw | per-pass whole/raw | per-pass encode p50 (us) |",
             "|---" * 5 + "|"]
    for r in rows:
        fmt = lambda xs, d=1: ", ".join(f"{x:.{d}f}" for x in xs)  # noqa: E731
        lines.append(f"| {r['head']} | {fmt(r['stages']['raw']['pass_p50_us'])} | "
                     f"{fmt(r['pass_ratios']['path/raw'], 2)} | {fmt(r['pass_ratios']['whole/raw'], 2)} | "
                     f"{fmt(r['stages']['encode']['pass_p50_us'])} |")
    return "\n".join(lines)


def write_report(report: dict, rows: list[dict], path: Path) -> str:
    m, s = report["machine"], report["settings"]
    r18 = next((r for r in rows if r["head"] == "resnet18"), None)
    notes = [f"resnet18's head (width 0.25, split 1) is {r18['macs'] / 1e6:.2f} M MACs, just under 10 M, so the 1.1x "
             "goal does not apply to it (its whole/raw reads {:.2f}); the goal is checked on resnet18_w0.5, the same "
             "head at width 0.5.".format(r18["ratios"]["whole/raw"]) if r18 else None,
             "The 6 KB frame of the encode goal is smallcnn's (int8 14x14x32 features, 6272 payload bytes).",
             f"Load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end on {m['cores']} "
             "cores: other jobs (a long training run, other benchmarks) shared the CPU; interleaving lets them hit "
             "raw and path alike, but the medians of both are slower than on an idle machine."]
    md = (f"# Per-image device path against raw invoke\n\nReproduce: `{report['command']}`\n\n"
          f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['platform']}, Python {m['python']}; "
          f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. Versions: "
          f"{json.dumps({k: v for k, v in m['versions'].items() if k in ('ai-edge-litert', 'numpy')})}.\n\n"
          f"Settings: {s['passes']} passes x {s['runs']} interleaved iterations per head (after {s['warmup']} "
          "warm-up), heads rotated between passes; engine ai-edge-litert int8, XNNPACK on, 1 thread; inputs 16 "
          "seeded random uint8 images in turn. raw = set_tensor + invoke + get_tensor on the pre-processed input; "
          "path = HeadRunner.run on the uint8 pixels (table pre-processing, invoke, Features); encode = "
          "FrameEncoder.encode of those features (HMAC-SHA256); whole = path + encode on one clock. Each "
          "iteration times raw and path back to back, alternating which goes first. Columns are medians of "
          "per-pass medians; ratios are medians of per-pass ratios of medians. Goals (issue #14): path/raw <= "
          "1.15; encode <= 15 us per 6 KB frame; whole/raw <= 1.4 on smallcnn, <= 1.1 on heads of 10 M MACs "
          "or more. The before column: the same measurement of HeadRunner.run + wire.encode as of commit "
          f"{BEFORE} (table-free pre-processing, interpreter.run, a one-shot encode), raw timed again beside it, "
          f"medians of per-pass ratios and of the per-pass whole p50.\n\n{table(rows)}\n\n"
          f"Per pass:\n\n{pass_table(rows)}\n\nNotes:\n\n"
          + "\n".join(f"- {n}" for n in notes if n) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path.with_suffix(".json"), report)
    atomic_write_text(path.with_suffix(".md"), md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallcnn only, 1 pass x 300 iterations")
    ap.add_argument("--runs", type=Path, default=latency.REPO / "benchmarks" / "runs" / "device_latency",
                    help="where the trained heads live (shared with device_latency.py)")
    ap.add_argument("--out", type=Path, default=latency.REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    command = " ".join(["python benchmarks/device_path.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"benchmark": "device_path", "quick": args.quick, "command": command, "machine": latency.machine(),
              "settings": settings, "goals": GOALS}
    heads = prepare(["smallcnn"] if args.quick else ARCHS, args.runs, args.quick, wide=not args.quick)
    with tempfile.TemporaryDirectory(prefix="edgeveil-before-") as scratch:
        samples = measure(heads, settings, load_before(Path(scratch)))
    rows = [summarize(name, macs, samples[name]) for name, _, macs in heads]
    for row in rows:
        row["verdicts"] = verdicts(row)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["results"] = rows
    path = args.out / ("device_path_quick" if args.quick else "device_path")
    print(write_report(report, rows, path))
    print(f"\nwrote {path}.json and {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
