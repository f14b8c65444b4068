"""edgeveil-device on an arm64 userland under qemu-user: does an ARM board send the same codes as this machine?

No board needed. Debian bookworm's arm64 python3.11 is extracted into a sysroot and run with
`qemu-aarch64 -L SYSROOT`; the aarch64 wheels are installed into a folder on its PYTHONPATH:
`edgeveil[device]` and nothing else (numpy and ai-edge-litert resolve to their newest aarch64 cp311
wheels), and, in a second folder, tflite-runtime with numpy<2 and edgeveil without dependencies.
On a run's int8 head, over its test images, the same worker code runs the device runner here (x86)
and under emulation, with reference kernels and with XNNPACK, and the features are compared in
quantization steps; `edgeveil-device bench` runs on both sides. Emulated time is not a board's
time: those latencies only show that the benchmark runs, and are labelled so.

    python benchmarks/arm64_device.py --prepare                # as root: qemu-user, the sysroot, the wheels
    python benchmarks/arm64_device.py --run runs/demo/none     # writes benchmarks/results/arm64_device.{md,json}
    python benchmarks/arm64_device.py --run DIR --limit 50 --runs 20 --out /tmp/arm64   # quick

The prepared userland (benchmarks/arm64_userland.py) lives in $EDGEVEIL_ARM64 (default
~/.cache/edgeveil/arm64, or --arm64-dir): sysroot/, debs/, site-litert/, site-tflrt/, prepared.json.
Each --run first puts this checkout's edgeveil into the sites (no download). Nothing is written into
the checkout except the results.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeveil.device.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from edgeveil.device.manifest import read_manifest

from arm64_userland import (DEFAULT_DIR, REPO, Userland, arm64_python_version, log, pip_list, prepare,
                            qemu_version, refresh_edgeveil, sh)

SCHEMA = "edgeveil.arm64_device/1"
HEAVY = ("torch", "torchvision", "tensorflow", "tf_keras", "onnx", "onnxruntime")
KERNELS = ("reference", "xnnpack")


# ------------------------------------------------------------------------------- the worker (both sides)


def worker(export_dir: str, images_npz: str, out_npz: str, kernels: str, runtime: str) -> None:
    """Run the int8 head over the images with one runtime and kernel choice; write codes and facts."""
    import importlib.util

    import edgeveil.device
    from edgeveil.device.runner import HeadRunner

    images = np.load(images_npz)["images"]
    runner = HeadRunner(export_dir, "int8", runtime=runtime, num_threads=1, noise_seed=0,
                        reference_kernels=kernels == "reference", xnnpack=kernels == "xnnpack")
    feats = runner.run(images)
    atomic_write_bytes(out_npz, _npz(codes=feats.values, inputs=runner.preprocess(images)))
    facts = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
             "runtime": runner.runtime_name, "version": runner.loaded.version, "resolver": runner.loaded.resolver,
             "xnnpack": runner.xnnpack, "kernels": kernels, "model_id": runner.model_id,
             "scale": feats.scale, "zero_point": feats.zero_point, "images": len(images),
             "edgeveil_from": str(Path(edgeveil.device.__file__).parent),
             "heavy_loaded": [m for m in HEAVY if m in sys.modules],
             "heavy_installed": [m for m in HEAVY if importlib.util.find_spec(m) is not None]}
    atomic_write_json(out_npz + ".json", facts)


# ------------------------------------------------------------------------------- the run


def sides(u: Userland) -> list[dict]:
    """Where the head runs: this machine, and each prepared aarch64 site under qemu."""
    found = [{"label": f"{platform.machine()} host", "arch": "host", "runtime": "ai_edge_litert",
              "cmd": [sys.executable], "env": dict(os.environ),
              "bench": [sys.executable, "-m", "edgeveil.device.cli"]}]
    for runtime in u.sites:
        if u.ready(runtime):
            found.append({"label": f"aarch64 qemu ({runtime})", "arch": "aarch64", "runtime": runtime,
                          "cmd": u.command(), "env": u.env(runtime),
                          "bench": u.command(u.sites[runtime] / "bin" / "edgeveil-device")})
    return found


def load_test_images(run_dir: Path, limit: int | None) -> np.ndarray:
    """The run's test split, uint8 (N, H, W, C), rebuilt from model.json (host side: needs torch)."""
    from edgeveil.training.runfile import load_splits, read_model_info

    x = load_splits(read_model_info(run_dir)).test.x
    return np.ascontiguousarray(x[:limit] if limit else x)


def run_features(side: dict, export_dir: Path, images_npz: Path, work: Path) -> dict:
    """Per kernel choice: the worker's codes and facts."""
    out = {}
    for kernels in KERNELS:
        target = work / f"{side['arch']}-{side['runtime']}-{kernels}.npz"
        cmd = [*side["cmd"], Path(__file__).resolve(), "--worker", export_dir, images_npz, target, kernels,
               side["runtime"]]
        log(f"{side['label']}: runner, {kernels} kernels")
        sh(cmd, env=side["env"], cwd=work)
        with np.load(target) as z:
            out[kernels] = {"codes": z["codes"], "inputs": z["inputs"], "facts": read_json(Path(f"{target}.json"))}
    return out


def run_bench(side: dict, model: Path, runs: int, work: Path) -> list[dict]:
    """`edgeveil-device bench` with XNNPACK on and off (seeded random inputs, 1 thread)."""
    rows = []
    for xnnpack in (True, False):
        target = work / f"bench-{side['arch']}-{side['runtime']}-{int(xnnpack)}.json"
        cmd = [*side["bench"], "bench", model, "--runs", runs, "--warmup", 10, "--threads", 1,
               "--runtime", side["runtime"], "--json", target, "--quiet", *([] if xnnpack else ["--no-xnnpack"])]
        log(f"{side['label']}: edgeveil-device bench, XNNPACK {'on' if xnnpack else 'off'}")
        sh(cmd, env=side["env"], cwd=work)
        r = read_json(target)
        rows.append({"side": side["label"], "emulated": side["arch"] == "aarch64",
                     "runtime": f"{r['runtime']['name']} {r['runtime']['version']}", "xnnpack": r["xnnpack"],
                     "xnnpack_requested": r["xnnpack_requested"], "count": r["count"],
                     "p50_us": r["p50_us"], "p90_us": r["p90_us"], "init_us": r["init_us"],
                     "machine": r["machine"]["machine"]})
    return rows


def steps(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two int8 code arrays are apart, in quantization steps."""
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {a.shape} and {b.shape}")
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {"values": int(d.size), "max_steps": int(d.max()), "differ": int((d > 0).sum()),
            "differ_share": float((d > 0).mean()), "mean_steps": float(d.mean())}


def comparisons(results: dict) -> list[dict]:
    """arm64 against the host: same kernels (reference must be bit-exact), and XNNPACK against reference."""
    host = results["host/ai_edge_litert"]
    rows = []
    for key, arm in results.items():
        if not key.startswith("aarch64/"):
            continue
        pairs = [("reference", "reference"), ("xnnpack", "xnnpack"), ("xnnpack", "reference")]
        if not arm["xnnpack"]["facts"]["xnnpack"]:  # XNNPACK inactive there (tflite-runtime int8)
            pairs.remove(("xnnpack", "xnnpack"))
        for arm_k, host_k in pairs:
            a, h = arm[arm_k], host[host_k]
            if (a["facts"]["scale"], a["facts"]["zero_point"]) != (h["facts"]["scale"], h["facts"]["zero_point"]):
                raise ValueError(f"{key} {arm_k} sends on another grid than the host: the runs are not comparable")
            rows.append({"arm64": _label(a["facts"]), "host": _label(h["facts"]),
                         "inputs_identical": bool(np.array_equal(a["inputs"], h["inputs"])),
                         **steps(a["codes"], h["codes"])})
    return rows


def _label(facts: dict) -> str:
    kernels = "reference kernels" if facts["kernels"] == "reference" else (
        "XNNPACK" if facts["xnnpack"] else "default (XNNPACK inactive)")
    return f"{facts['runtime']} {facts['version']}, {kernels}"


def run(u: Userland, run_dir: Path, limit: int | None, runs: int, out: Path) -> dict:
    problems = u.missing()
    if problems:
        raise SystemExit("arm64 userland not ready:\n  - " + "\n  - ".join(problems))
    export_dir = (run_dir / "export").resolve()
    manifest = read_manifest(export_dir / "manifest.json")
    if "int8" not in manifest["artifacts"]:
        raise SystemExit(f"{export_dir / 'manifest.json'} has no int8 artifact; export with int8 in export.precisions")
    model = export_dir / manifest["artifacts"]["int8"]["file"]
    refresh_edgeveil(u)
    with tempfile.TemporaryDirectory(prefix="edgeveil-arm64-") as tmp:
        work = Path(tmp)
        images = load_test_images(run_dir, limit)
        atomic_write_bytes(work / "images.npz", _npz(images=images))
        found, results, bench = sides(u), {}, []
        for side in found:
            results[f"{side['arch']}/{side['runtime']}"] = run_features(side, export_dir, work / "images.npz", work)
            bench += run_bench(side, model, runs, work)
    doc = {"schema": SCHEMA, "run_dir": str(run_dir), "model_id": manifest["model_id"], "head": _head(run_dir),
           "model_file": model.name, "images": len(images),
           "setup": _setup(u), "sides": {k: {kk: v["facts"] for kk, v in r.items()} for k, r in results.items()},
           "feature_shape": list(results["host/ai_edge_litert"]["reference"]["codes"].shape),
           "comparisons": comparisons(results), "bench": bench, "bench_runs": runs}
    _write(doc, out)
    return doc


def _head(run_dir: Path) -> dict:
    from edgeveil.training.runfile import read_model_info

    info = read_model_info(run_dir)
    return {"dataset": info["data"]["name"], "arch": info["arch"], "split": info["split"], "width": info["width"],
            "defense": info["defense"]["name"], "strength": info["defense"]["strength"], "seed": info["seed"]}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _setup(u: Userland) -> dict:
    prepared = u.base / "prepared.json"
    info = read_json(prepared) if prepared.is_file() else {}
    return {"host": {"machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                     "platform": platform.platform()},
            "qemu": qemu_version(), "sysroot_python": arm64_python_version(u), "arm64_dir": str(u.base),
            "sites": info.get("sites") or {n: pip_list(s) for n, s in u.sites.items() if s.is_dir()},
            "tflite_runtime_wheel": info.get("tflite_runtime_wheel")}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ------------------------------------------------------------------------------- the report


def markdown(doc: dict) -> str:
    s = doc["setup"]
    lines = [f"# edgeveil-device on arm64 under qemu-user: `{doc['run_dir']}` (model {doc['model_id']})", "",
             f"Host: {s['host']['processor']} ({s['host']['cpus']} cpus), {s['host']['platform']}. "
             f"Emulator: {s['qemu']}. arm64 userland: Debian bookworm python {s['sysroot_python']}.", "",
             f"Head: {_head_line(doc['head'])}, `{doc['model_file']}`. Features: its int8 codes over "
             f"{doc['images']} test images of the run, shape {tuple(doc['feature_shape'])}, through the device "
             "runner (one thread), the same worker code on both sides; distances in quantization steps "
             "(int8 codes).", "",
             "| arm64 (qemu) | x86 host | input codes identical | values | max steps | values that differ |",
             "|---|---|---|---:|---:|---:|"]
    for c in doc["comparisons"]:
        lines.append(f"| {c['arm64']} | {c['host']} | {'yes' if c['inputs_identical'] else 'NO'} | {c['values']} "
                     f"| {c['max_steps']} | {c['differ']} ({c['differ_share']:.2%}) |")
    lines += ["", "Installed in the aarch64 sites (pip --target, aarch64 cp311 wheels):", ""]
    for name, pkgs in s["sites"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(pkgs.items())))
    lines.append(f"- tflite-runtime aarch64 cp311 wheel: {_tflrt_line(s['tflite_runtime_wheel'])}")
    heavy = {k: (f["reference"]["heavy_loaded"], f["reference"]["heavy_installed"])
             for k, f in doc["sides"].items() if k.startswith("aarch64/")}
    for k, (loaded, installed) in heavy.items():
        lines.append(f"- {k}: heavy modules installed: {', '.join(installed) or 'none'}; "
                     f"loaded by the runner: {', '.join(loaded) or 'none'}")
    lines += ["", f"`edgeveil-device bench` on the int8 head ({doc['bench_runs']} runs, 1 thread, seeded random input). "
              "**The aarch64 rows are emulated (qemu-user TCG on the x86 host): not a board's latency**; "
              "they show only that the benchmark runs there.", "",
              "| side | runtime | XNNPACK | p50 us | p90 us | init us | runs |", "|---|---|---|---:|---:|---:|---:|"]
    for b in doc["bench"]:
        side = b["side"] + (" (emulated)" if b["emulated"] else "")
        xnn = {True: "on", False: "off", None: "?"}[b["xnnpack"]]
        if b["xnnpack"] != b["xnnpack_requested"]:
            xnn += " (asked on)" if b["xnnpack_requested"] else " (asked off)"
        lines.append(f"| {side} | {b['runtime']} | {xnn} | {b['p50_us']:.0f} | {b['p90_us']:.0f} "
                     f"| {b['init_us']:.0f} | {b['count']} |")
    return "\n".join(lines) + "\n"


def _head_line(head: dict) -> str:
    defense = "no defense" if head["defense"] == "none" else f"{head['defense']} {head['strength']:g}"
    return (f"{head['dataset']}, {head['arch']} (width {head['width']}, split {head['split']}), {defense}, "
            f"seed {head['seed']}")


def _tflrt_line(info: dict | None) -> str:
    if not info:
        return "not checked (run --prepare)"
    return f"yes, {info['wheel']}" if info["exists"] else f"none ({info['reason']})"


def _write(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "arm64_device.json", doc)
    atomic_write_text(out / "arm64_device.md", markdown(doc))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])  # on either side, by the same code
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="install qemu-user, the arm64 sysroot and the wheels")
    p.add_argument("--run", type=Path, metavar="DIR", help="a run directory with an exported int8 head")
    p.add_argument("--arm64-dir", type=Path, default=DEFAULT_DIR, help=f"the prepared userland (default {DEFAULT_DIR})")
    p.add_argument("--limit", type=int, default=None, help="use only the first N test images")
    p.add_argument("--runs", type=int, default=200, help="timed runs per edgeveil-device bench (default 200)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the md and json go")
    args = p.parse_args(argv)
    if not (args.prepare or args.run):
        p.error("give --prepare, --run DIR or both")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    u = Userland(args.arm64_dir)
    if args.prepare:
        info = prepare(u)
        print(json.dumps({k: info[k] for k in ("qemu", "sysroot_python", "sites", "tflite_runtime_wheel")}, indent=1))
    if args.run:
        if not (args.run / "export" / "manifest.json").is_file():
            p.error(f"{args.run / 'export' / 'manifest.json'} does not exist: give an exported run directory")
        print(markdown(run(u, args.run, args.limit, args.runs, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
