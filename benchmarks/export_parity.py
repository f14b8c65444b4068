"""Export parity per architecture: artifact sizes, conversion time, parity and accuracy per precision.

Trains each architecture on its dataset with a stated budget, exports every precision, and reads the
manifest back. Prints a table (the budget beside every number) and writes JSON and Markdown.

    python benchmarks/export_parity.py                       # all four, writes benchmarks/results/
    python benchmarks/export_parity.py --only smallcnn --quick
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
MNIST = f"npz:{SHARED / 'mnist_test.npz'}"
CIFAR10 = f"npz:{SHARED / 'cifar10_train_jpeg.npz'},{SHARED / 'cifar10_test_jpeg.npz'}"

# arch -> (dataset, overrides): the training budget, stated with every number it produced.
CASES = {
    "smallcnn": (MNIST, ["model.width=full", "train.epochs=10"]),
    "resnet18": (CIFAR10, ["model.split=1", "model.width=0.25", "data.victim_train=10000", "data.aux=2000",
                           "data.test=2000", "train.epochs=8", "train.batch_size=128"]),
    # Depthwise convolutions train slowly on CPU: a smaller budget, stated beside its numbers.
    "mobilenetv2": (CIFAR10, ["model.width=0.25", "data.victim_train=4000", "data.aux=2000", "data.test=2000",
                              "train.epochs=4", "train.batch_size=128"]),
    "vgg11_bn": (CIFAR10, ["model.width=0.25", "data.victim_train=4000", "data.aux=2000", "data.test=2000",
                           "train.epochs=4", "train.batch_size=128"]),
}
QUICK = ["train.epochs=1", "data.victim_train=1000", "data.aux=200", "data.test=500"]


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_case(arch: str, out: Path, quick: bool) -> dict:
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage

    dataset, overrides = CASES[arch]
    overrides = [f"data.name={dataset}", f"model.arch={arch}", *overrides, *(QUICK if quick else [])]
    cfg = load_config(None, overrides)
    run_dir = out / arch
    metrics = train_stage(cfg, run_dir, progress=True)  # a finished run directory is reused as it is
    t1 = time.perf_counter()
    manifest = export_stage(cfg, run_dir, progress=True)
    t2 = time.perf_counter()
    info = json.loads((run_dir / "train" / "model.json").read_text())
    budget = {"dataset": dataset.split("/")[-1] if "," not in dataset else "cifar10 (shared JPEG npz)",
              "victim_train": info["data"]["splits"]["victim_train"]["size"],
              "test": info["data"]["splits"]["test"]["size"], "epochs": info["train"]["epochs_done"],
              "width": info["width"], "split": info["split"],
              "train_seconds": round(info["train"]["seconds"], 1)}  # as recorded, also for a reused run
    artifacts = {}
    for precision, a in manifest["artifacts"].items():
        p = a["parity"]
        artifacts[precision] = {"bytes": a["bytes"], "tail_accuracy": a["tail_accuracy"],
                                "cosine": p["cosine"], "max_abs_err": p["max_abs_err"],
                                "mean_abs_err": p["mean_abs_err"], "mean_err_steps": p.get("mean_err_steps"),
                                "max_err_steps": p.get("max_err_steps"),
                                "max_err_steps_unsaturated": p.get("max_err_steps_unsaturated"),
                                "saturated": p.get("saturated"), "operators": a["operators"]}
    return {"arch": arch, "budget": budget, "feature_shape": info["feature_shape"],
            "float_accuracy": metrics["float_test_accuracy"], "onnx_bytes": manifest["onnx"]["bytes"],
            "convert_seconds": manifest["converter"]["seconds"], "export_seconds": round(t2 - t1, 1),
            "artifacts": artifacts}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    lines = ["| arch | budget | float acc | precision | bytes | tail acc | cosine | max abs err | "
             "mean steps | max steps (unsat.) | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["budget"]
        budget = (f"{b['dataset']}, {b['victim_train']} train / {b['test']} test, {b['epochs']} ep, "
                  f"width {b['width']}, split {b['split']}, {b['train_seconds']} s")
        for i, (prec, a) in enumerate(r["artifacts"].items()):
            steps = f"{_fmt(a['max_err_steps'], '.2f')} ({_fmt(a['max_err_steps_unsaturated'], '.2f')})"
            lines.append(f"| {r['arch'] if i == 0 else ''} | {budget if i == 0 else ''} | "
                         f"{r['float_accuracy']:.4f} | {prec} | {a['bytes']:,} | {a['tail_accuracy']:.4f} | "
                         f"{a['cosine']:.6f} | {a['max_abs_err']:.3g} | "
                         f"{_fmt(a['mean_err_steps'], '.2f')} | {steps} | "
                         f"{r['convert_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated architectures (default: all)")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 1,000 images: checks the script, not the numbers")
    ap.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs" / "export_parity")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    archs = args.only.split(",") if args.only else list(CASES)
    unknown = [a for a in archs if a not in CASES]
    if unknown:
        ap.error(f"unknown architecture(s) {unknown}; known: {', '.join(CASES)}")
    results = []
    for arch in archs:
        print(f"== {arch}", flush=True)
        results.append(run_case(arch, args.runs, args.quick))
        print(table(results[-1:]), flush=True)
    report = {"benchmark": "export_parity", "quick": args.quick, "machine": machine(), "results": results}
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"export_parity{suffix}.json", report)
    md = (f"# Export parity\n\nReproduce: `python benchmarks/export_parity.py{' --quick' if args.quick else ''}`\n\n"
          f"Machine: {json.dumps(report['machine'])}. Parity on 256 held-out test images through ai-edge-litert "
          "(XNNPACK on); tail accuracy on the whole test split fed each artifact's dequantized features. "
          "'steps' are errors in units of the artifact's output quantization scale (int16 steps for int16x8); "
          "'unsat.' excludes reference values outside the calibrated output range.\n\n" + table(results) + "\n")
    atomic_write_text(args.out / f"export_parity{suffix}.md", md)
    print(f"\nwrote {args.out / f'export_parity{suffix}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
