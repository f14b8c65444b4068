"""Batch-1 latency of each head on the engines a board or a host would run it with, side by side.

Per architecture, and for an int8 "ceiling" model (2x conv3x3 28x28x256->256, ~925 M MACs, same toolchain):
int8 and fp32 TFLite on ai-edge-litert (XNNPACK on, 1 thread), int8 on tflite-runtime 2.14 (own numpy<2 venv,
`python -m edgeveil.device.cli bench`), PyTorch eager and onnxruntime fp32 (1 thread), ai-edge-litert int8 on
2 threads. Per head the engines run round-robin in each pass (order rotated between passes), so background
load hits them alike; we quote medians of per-pass medians and ratios to ai-edge-litert int8. Weights: a short
training run (latency does not depend on them). Reference: ../shared/research/anchor_measurements.md.

    python benchmarks/device_latency.py                       # all four; writes benchmarks/results/
    python benchmarks/device_latency.py --quick               # smallcnn + a reduced ceiling, 1 pass (< 3 min)
    python benchmarks/device_latency.py --only resnet18,vgg11_bn --reuse DIR   # DIR/<arch>/export/manifest.json
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeveil.device.bench import bench_model  # numpy and the interpreter shim only
from edgeveil.device.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEVEIL_SHARED_DATA", REPO.parent / "shared" / "datasets"))
MNIST = f"npz:{SHARED / 'mnist_test.npz'}"
CIFAR10 = f"npz:{SHARED / 'cifar10_train_jpeg.npz'},{SHARED / 'cifar10_test_jpeg.npz'}"
TFLRT_VENV = Path(os.environ.get("EDGEVEIL_TFLRT_VENV", Path.home() / ".cache/edgeveil/tflite-runtime-venv"))

# arch -> (dataset, model overrides): the same heads as benchmarks/export_parity.py.
CASES = {"smallcnn": (MNIST, ["model.width=full"]), "resnet18": (CIFAR10, ["model.split=1", "model.width=0.25"]),
         "mobilenetv2": (CIFAR10, ["model.width=0.5"]), "vgg11_bn": (CIFAR10, ["model.width=0.25"])}
# Latency does not depend on the weights, so a short run is enough (stated beside every number).
BUDGET = ["train.epochs=1", "data.victim_train=2000", "data.aux=200", "data.test=500", "train.batch_size=128"]
QUICK_BUDGET = ["train.epochs=1", "data.victim_train=500", "data.aux=100", "data.test=200", "train.batch_size=128"]
EXPORT = ["train.device=cpu", "export.precisions=[fp32, int8]", "export.parity_samples=64"]

# engine -> label; "int8" (ai-edge-litert, XNNPACK on, 1 thread) is the reference of every ratio.
ENGINES = {"int8": "ai-edge-litert int8 1t", "fp32": "ai-edge-litert fp32 1t", "tflrt_int8": "tflite-runtime int8 1t",
           "torch": "torch eager fp32 1t", "ort": "onnxruntime fp32 1t", "int8_2t": "ai-edge-litert int8 2t"}
RATIOS = {"torch": "torch/int8", "ort": "ort/int8", "tflrt_int8": "tflite-rt/int8", "fp32": "fp32/int8"}
# anchor_measurements.md: CEIL GMAC/s per engine, and the range of each ratio over heads A-D and CEIL.
ANCHOR = {"cpu": "Zen 4 with AVX-512 VNNI", "ceil": {"int8": 208.1, "int8_2t": 417.8, "fp32": 50.0, "tflrt_int8": 45.4},
          "ranges": {"torch": (4.15, 9.45), "ort": (1.67, 3.74), "tflrt_int8": (4.37, 20.91), "fp32": (1.56, 4.16),
                     "speedup_2t": (1.37, 2.01)}}
# Per measurement: warm-up runs, then at least `runs` timed runs lasting at least `min_seconds`.
Settings = namedtuple("Settings", "passes warmup runs min_seconds")
FULL, QUICK = Settings(3, 50, 200, 2.0), Settings(1, 10, 50, 0.25)
# module: the PyTorch head (eval mode); chw: its input shape; tflite: {precision: Path}; macs: analytic MACs.
Head = namedtuple("Head", "name module chw onnx tflite budget macs")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_arch(arch: str, runs: Path, quick: bool, reuse: Path | None) -> Head:
    """A trained, exported run of `arch`: a complete one under `reuse` (only read), else our own."""
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage
    from edgeveil.training.runfile import load_run

    run_dir = reuse / arch if reuse is not None else None
    if run_dir is None or not (run_dir / "export" / "manifest.json").is_file():
        dataset, overrides = CASES[arch]
        budget = QUICK_BUDGET if quick else BUDGET
        cfg = load_config(None, [f"data.name={dataset}", f"model.arch={arch}", *overrides, *budget, *EXPORT])
        run_dir = runs / (f"{arch}_quick" if quick else arch)
        if not (run_dir / "export" / "manifest.json").is_file():
            log(f"{arch}: training ({' '.join(budget)}), exporting fp32 + int8 into {run_dir}")
            train_stage(cfg, run_dir, progress=False)
            export_stage(cfg, run_dir, progress=False)
    artifacts = json.loads((run_dir / "export" / "manifest.json").read_text())["artifacts"]
    if not {"fp32", "int8"} <= set(artifacts):
        raise SystemExit(f"{run_dir}/export/manifest.json needs fp32 and int8 artifacts, has {list(artifacts)}")
    info, head, _ = load_run(run_dir)
    budget = {"run_dir": str(run_dir), "dataset": Path(info["data"]["name"].split(",")[0]).name,
              "victim_train": info["data"]["splits"]["victim_train"]["size"], "epochs": info["train"]["epochs_done"],
              "width": info["width"], "split": info["split"], "float_acc": artifacts["int8"].get("float_accuracy"),
              "int8_acc": artifacts["int8"].get("tail_accuracy")}
    tflite = {p: run_dir / "export" / artifacts[p]["file"] for p in ("fp32", "int8")}
    chw = tuple(info["input"]["shape"])
    return Head(arch, head, chw, run_dir / "export" / "head.onnx", tflite, budget, count_macs(head, chw))


def prepare_ceiling(runs: Path, channels: int, size: int) -> Head:
    """2x (conv3x3 -> BN -> ReLU), channels -> channels at size x size, random weights (seed 0), exported
    like a head: export_onnx, then convert with 32 U(0,1) calibration images, mean 0, std 1."""
    import torch
    from torch import nn

    from edgeveil.export.onnx_export import export_onnx

    convert = sys.modules["edgeveil.export.convert"].convert  # edgeveil.export.convert is also a function
    chw, out = (channels, size, size), runs / f"ceiling_{size}x{size}x{channels}"
    torch.manual_seed(0)
    module = nn.Sequential(*[m for _ in range(2) for m in (
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())]).eval()
    tflite = {p: out / f"head_{p}.tflite" for p in ("fp32", "int8")}
    if not all(p.is_file() for p in tflite.values()):
        log(f"ceiling: exporting 2x conv3x3 {size}x{size}x{channels} into {out}")
        export_onnx(module, chw, out / "head.onnx")
        calib = np.random.default_rng(1).random((32, size, size, channels), dtype=np.float32)
        convert(out / "head.onnx", calib, [0.0] * channels, [1.0] * channels, out, ("fp32", "int8"))
    budget = {"run_dir": str(out), "weights": "random (seed 0), not trained"}
    return Head("CEIL", module, chw, out / "head.onnx", tflite, budget, count_macs(module, chw))


def count_macs(module, chw: tuple) -> int:
    """Analytic MACs of a batch-1 forward: conv Cout*Hout*Wout*Cin/groups*k*k, linear out*in (forward hooks)."""
    import torch
    from torch import nn

    macs = []

    def hook(m, inputs, output):
        per_output = m.in_features if isinstance(m, nn.Linear) else \
            m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        macs.append(output[0].numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(torch.zeros(1, *chw))
    for h in handles:
        h.remove()
    return sum(macs)


def _time_calls(fn, s: Settings) -> dict:
    """Warm-up, then at least s.runs timed calls lasting at least s.min_seconds; GC paused while timing."""
    for _ in range(s.warmup):
        fn()
    clock, timed = time.perf_counter_ns, []
    gc.disable()
    try:
        deadline = clock() + int(s.min_seconds * 1e9)
        while len(timed) < s.runs or clock() < deadline:
            start = clock()
            fn()
            timed.append(clock() - start)
    finally:
        gc.enable()
    us = np.asarray(timed, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p90_us": float(np.percentile(us, 90)), "count": int(us.size),
            "min_us": float(us.min())}


def litert_engine(path: Path, threads: int):
    return lambda s: bench_model(path, runtime="ai_edge_litert", threads=threads, runs=s.runs, warmup=s.warmup,
                                 min_seconds=s.min_seconds)


def tflrt_engine(python: Path, path: Path):
    def run(s: Settings) -> dict:
        with tempfile.TemporaryDirectory(prefix="edgeveil-tflrt-") as tmp:
            cmd = [str(python), "-m", "edgeveil.device.cli", "bench", str(path), "--runtime", "tflite_runtime",
                   "--threads", "1", "--runs", str(s.runs), "--warmup", str(s.warmup),
                   "--min-seconds", str(s.min_seconds), "--json", f"{tmp}/bench.json", "--quiet"]
            if (done := subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)).returncode != 0:
                raise RuntimeError(f"tflite-runtime bench of {path} failed: {done.stderr.strip()[-1000:]}")
            return json.loads(Path(f"{tmp}/bench.json").read_text())
    return run


def torch_engine(head: Head):
    import torch

    torch.set_num_threads(1)
    x, call = torch.rand(1, *head.chw), torch.no_grad()(lambda: head.module(x))
    return lambda s: {**_time_calls(call, s), "runtime": {"name": "torch", "version": torch.__version__}}


def ort_engine(head: Head):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(head.onnx), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).random((1, *head.chw), dtype=np.float32)}
    return lambda s: {**_time_calls(lambda: sess.run(None, feed), s), "runtime": {"name": "onnxruntime",
                                                                              "version": ort.__version__}}


def engines_for(head: Head, tflrt_python: Path | None) -> dict:
    engines = {"int8": litert_engine(head.tflite["int8"], 1), "fp32": litert_engine(head.tflite["fp32"], 1),
               "tflrt_int8": tflrt_engine(tflrt_python, head.tflite["int8"]) if tflrt_python else None,
               "torch": torch_engine(head), "ort": ort_engine(head), "int8_2t": litert_engine(head.tflite["int8"], 2)}
    return {k: v for k, v in engines.items() if v is not None}


def tflite_runtime_python(venv: Path) -> Path:
    """The cached numpy<2 + tflite-runtime 2.14 venv (built once, like .ci/device_envs.sh does), holding
    this checkout's edgeveil installed --no-deps from a copy (reinstalled when device/*.py changes)."""
    py, stamp = venv / "bin" / "python", venv / "edgeveil-device.sha256"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if not list(venv.glob("lib/python*/site-packages/tflite_runtime")):  # also mends a half-built venv
        log(f"building the tflite-runtime venv in {venv} (once)")
        subprocess.run([shutil.which("python3.11") or sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(pip + ["numpy<2", "tflite-runtime==2.14.*"], check=True, capture_output=True, text=True)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((REPO / "device").glob("*.py")))).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        with tempfile.TemporaryDirectory(prefix="edgeveil-src-") as tmp:  # so the checkout gets no build/
            for name in ("pyproject.toml", "README.md", "training", "export", "device", "cloud_sim", "pipeline"):
                (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, Path(tmp, name))
            subprocess.run(pip + ["--no-deps", "--force-reinstall", tmp], check=True, capture_output=True, text=True)
        atomic_write_text(stamp, digest)
    return py


def measure(heads: list[Head], engines: dict, s: Settings) -> dict:
    """{head: {engine: [one result per pass]}}: per head, engines round-robin, order rotated each pass."""
    samples = {h.name: {e: [] for e in engines[h.name]} for h in heads}
    for p in range(s.passes):
        for h in heads:
            order = list(engines[h.name])
            for e in order[p % len(order):] + order[: p % len(order)]:
                r = engines[h.name][e](s)
                samples[h.name][e].append(r)
                log(f"pass {p + 1}/{s.passes} {h.name:11s} {ENGINES[e]:23s} p50 {r['p50_us']:9.1f} us  "
                    f"p90 {r['p90_us']:9.1f} us  ({r['count']} runs)")
    return samples


def summarize(head: Head, samples: dict, ceiling_gmacs: float) -> dict:
    res = {}
    for e, rs in samples.items():
        p50s = [r["p50_us"] for r in rs]
        res[e] = {"p50_us": float(np.median(p50s)), "p90_us": float(np.median([r["p90_us"] for r in rs])),
                  "pass_p50_us": p50s, "spread": (max(p50s) - min(p50s)) / float(np.median(p50s)),
                  "runs_per_pass": [r["count"] for r in rs], "xnnpack": rs[0].get("xnnpack"),
                  "min_us": min(r["min_us"] for r in rs),
                  "runtime": "{name} {version}".format(**rs[0]["runtime"])}
    ref = res["int8"]["p50_us"]
    gmacs = head.macs / (ref * 1e3)
    return {"head": head.name, "macs": head.macs, "input_chw": list(head.chw), "budget": head.budget,
            "engines": res, "gmacs": gmacs, "pct_ceiling": 100 * gmacs / ceiling_gmacs,
            "ratios": {e: res[e]["p50_us"] / ref for e in RATIOS if e in res},
            "speedup_2t": ref / res["int8_2t"]["p50_us"]}


def table(rows: list[dict]) -> str:
    lines = ["| head | MACs (M) | int8 p50 / p90 (us) | GMAC/s | % ceiling | " + " | ".join(RATIOS.values())
             + " | 2-thread speed-up | int8 pass spread |", "|---" * (7 + len(RATIOS)) + "|"]
    for r in rows:
        i8 = r["engines"]["int8"]
        lines.append(f"| {r['head']} | {r['macs'] / 1e6:.2f} | {i8['p50_us']:.1f} / {i8['p90_us']:.1f} | "
                     f"{r['gmacs']:.1f} | {r['pct_ceiling']:.0f}% | "
                     + " | ".join(f"{r['ratios'][e]:.2f}" if e in r["ratios"] else "-" for e in RATIOS)
                     + f" | {r['speedup_2t']:.2f} | {100 * i8['spread']:.1f}% |")
    return "\n".join(lines)


def pass_table(rows: list[dict]) -> str:
    lines = ["| head | engine | p50 (us) | p90 (us) | per-pass p50 (us) | spread |", "|---" * 6 + "|"]
    for r in rows:
        for e, v in r["engines"].items():
            lines.append(f"| {r['head']} | {ENGINES[e]} | {v['p50_us']:.1f} | {v['p90_us']:.1f} | "
                         + ", ".join(f"{x:.1f}" for x in v["pass_p50_us"]) + f" | {100 * v['spread']:.1f}% |")
    return "\n".join(lines)


def header(rows: list[dict]) -> str:
    parts = []
    for e, label in ENGINES.items():
        found = [r["engines"][e] for r in rows if e in r["engines"]]
        xnn = "/".join(sorted({"yes" if v["xnnpack"] else "no" for v in found if v["xnnpack"] is not None}))
        parts.append(f"{label} = {found[0]['runtime']}" + (f" (XNNPACK active: {xnn})" if xnn else "") if found
                     else f"{label}: not measured")
    return "Engines, batch 1: " + "; ".join(parts) + ". Ratios: median / median of ai-edge-litert int8 1t."


def budgets(rows: list[dict]) -> str:
    out = []
    for r in rows:
        b = r["budget"]
        desc = b.get("weights") or (f"{b['dataset']}, {b['victim_train']} train images, {b['epochs']} epoch(s), "
                                   f"width {b['width']}, split {b['split']}; test accuracy float "
                                   f"{b['float_acc']:.3f}, int8 {b['int8_acc']:.3f}")
        out.append(f"- {r['head']} (input {'x'.join(map(str, r['input_chw']))}): {desc}; run {b['run_dir']}")
    return "\n".join(out)


def sanity(rows: list[dict], quick: bool, mach: dict) -> list[str]:
    """Our numbers against anchor_measurements.md, computed from the results."""
    notes = [f"CPU: {mach['cpu']} (family {mach['family']}, model {mach['model']}), int8-relevant ISA: "
             f"{', '.join(mach['isa']) or 'none'}; anchor machine: {ANCHOR['cpu']}. Load average "
             f"{mach['loadavg_start'][0]:.1f} at start, {mach['loadavg_end'][0]:.1f} at end on {mach['cores']} cores."
             + ("" if {"avx512_vnni", "avx_vnni"} & set(mach["isa"]) else " No VNNI here: XNNPACK int8 lacks its "
                "dot-product kernels, so int8 GMAC/s and the fp32/int8 ratios should fall below the anchor's.")]
    if (load := max(mach["loadavg_start"][0], mach["loadavg_end"][0])) > mach["cores"] - 0.5:
        notes.append(f"Load average {load:.1f} on {mach['cores']} cores: other jobs shared the CPU. That slows runs "
                     "longer than a scheduler slice (the ceiling: tens of ms) more than short ones, so the ceiling "
                     "reads low and % of ceiling high, and it eats the 2-thread gain.")
    ceil = next(r for r in rows if r["head"] == "CEIL")
    for e, anchor in ANCHOR["ceil"].items():
        if e in ceil["engines"]:
            g, best = (ceil["macs"] / (ceil["engines"][e][k] * 1e3) for k in ("p50_us", "min_us"))
            notes.append(f"Ceiling{' (reduced for --quick)' if quick else ''}, {ENGINES[e]}: {g:.1f} GMAC/s "
                         f"(fastest run: {best:.1f}) = {100 * g / anchor:.0f}% of the anchor's {anchor}")
    for key, label in (*RATIOS.items(), ("speedup_2t", "2-thread speed-up")):
        vals = [r["speedup_2t"] if key == "speedup_2t" else r["ratios"].get(key) for r in rows]
        vals, (lo, hi) = [v for v in vals if v is not None], ANCHOR["ranges"][key]
        if vals:
            inside = sum(lo / 1.25 <= v <= hi * 1.25 for v in vals)
            notes.append(f"{label}: {min(vals):.2f}-{max(vals):.2f}x over {len(vals)} rows; anchor {lo}-{hi}x; "
                         f"{inside}/{len(vals)} rows inside the anchor range widened by 25%")
    tfl = [r["engines"]["tflrt_int8"]["xnnpack"] for r in rows if "tflrt_int8" in r["engines"]]
    if tfl:
        notes.append(f"tflite-runtime int8: XNNPACK active on {sum(bool(x) for x in tfl)}/{len(tfl)} models "
                     "(anchor: never for int8)")
    spreads = [(v["spread"], r["head"], e) for r in rows for e, v in r["engines"].items() if len(v["pass_p50_us"]) > 1]
    if spreads:
        spread, head, e = max(spreads)
        notes.append(f"Largest spread of per-pass medians: {100 * spread:.1f}% ({head}, {ENGINES[e]}); "
                     "anchor: about 5% for the TFLite engines with nothing else running")
    return notes


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    info = dict(reversed([[x.strip() for x in line.split(":", 1)] for line in lines if ":" in line]))  # first CPU
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in
           info.get("flags", "").split()]
    versions = {d: next((x.version for x in metadata.distributions(name=d)), None)
                for d in ("torch", "onnxruntime", "ai-edge-litert", "onnx", "onnx2tf", "tensorflow", "numpy")}
    return {"cpu": info.get("model name", platform.processor()), "family": info.get("cpu family"),
            "model": info.get("model"), "isa": isa, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg()), "versions": versions}


def write_report(report: dict, rows: list[dict], path: Path) -> str:
    m = report["machine"]
    md = (f"# Device latency (batch 1)\n\nReproduce: `{report['command']}`\n\n"
          f"Machine: {m['cpu']} (family {m['family']}, model {m['model']}; {', '.join(m['isa'])}), {m['cores']} "
          f"cores, {m['platform']}, Python {m['python']}; load average {m['loadavg_start'][0]:.2f} at start, "
          f"{m['loadavg_end'][0]:.2f} at end. Versions: {json.dumps(m['versions'])}.\n\n"
          f"Settings: {json.dumps(report['settings'])}; per head, engines round-robin within each pass, order "
          "rotated between passes; p50/p90 are medians of the per-pass p50/p90.\n\n"
          f"{header(rows)}\n\n{table(rows)}\n\nWeights / training budget:\n\n{budgets(rows)}\n\n"
          f"Per-pass medians:\n\n{pass_table(rows)}\n\nSanity check against anchor_measurements.md:\n\n"
          + "\n".join(f"- {n}" for n in report["sanity"]) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path.with_suffix(".json"), report)
    atomic_write_text(path.with_suffix(".md"), md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated architectures (default: all; --quick: smallcnn)")
    ap.add_argument("--quick", action="store_true", help="1 pass, few runs, a reduced ceiling: checks the script")
    ap.add_argument("--reuse", type=Path, help="use complete runs (<arch>/export/manifest.json) from here, read only")
    ap.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs" / "device_latency")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    archs = args.only.split(",") if args.only else (["smallcnn"] if args.quick else list(CASES))
    if unknown := [a for a in archs if a not in CASES]:
        ap.error(f"unknown architecture(s) {unknown}; known: {', '.join(CASES)}")
    settings, started = QUICK if args.quick else FULL, time.perf_counter()
    command = " ".join(["python benchmarks/device_latency.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"benchmark": "device_latency", "quick": args.quick, "command": command, "machine": machine(),
              "settings": settings._asdict(), "engines": ENGINES, "tflite_runtime_skipped": None}
    heads = [prepare_arch(a, args.runs, args.quick, args.reuse) for a in archs]
    heads.append(prepare_ceiling(args.runs, *((128, 14) if args.quick else (256, 28))))
    tflrt, prepared = None, time.perf_counter()
    try:
        tflrt = tflite_runtime_python(TFLRT_VENV)
    except (OSError, subprocess.CalledProcessError) as e:  # e.g. no access to the package registry
        report["tflite_runtime_skipped"] = f"{e} {getattr(e, 'stderr', None) or ''}".strip()[-1500:]
        log(f"tflite-runtime engine skipped: {e}")
    venv_done = time.perf_counter()
    samples = measure(heads, {h.name: engines_for(h, tflrt) for h in heads}, settings)
    ceiling = heads[-1].macs / (float(np.median([r["p50_us"] for r in samples["CEIL"]["int8"]])) * 1e3)
    rows = [summarize(h, samples[h.name], ceiling) for h in heads]
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = {"prepare": round(prepared - started, 1), "tflite_runtime_venv": round(venv_done - prepared, 1),
                         "measure": round(time.perf_counter() - venv_done, 1)}
    report.update(sanity=sanity(rows, args.quick, report["machine"]), results=rows)
    path = args.out / ("device_latency_quick" if args.quick else "device_latency")
    print(write_report(report, rows, path))
    print(f"\nseconds: {report['seconds']}; wrote {path}.json and {path}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
