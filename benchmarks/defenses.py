"""Every defense at three strengths: float and int8 accuracy, the inverse attack's interior SSIM and
identification on float and int8 features, the verdict, and training cost, each against `none`
trained the same way on the same data.

    python benchmarks/defenses.py                         # MNIST, writes benchmarks/results/
    python benchmarks/defenses.py --datasets cifar10      # the short CIFAR-10 budget (real accuracy: cifar10.py)
    python benchmarks/defenses.py --quick                 # checks the script, not the numbers

Each (dataset, defense, strength) is one run directory under --runs: train, export (int8), then the
`inverse` attack on float and int8 features of the same test images, judged against `none` (its
`attack.baseline`): the verdict needs the attack to prove its power on `none` first. A finished run
is read back, so an interrupted sweep resumes. The budget (images, epochs, width, attack epochs) is printed beside
every number. Epoch time is the median over the run's epochs; its ratio to `none` is measured on the
same machine in the same sweep (other load on the machine shows up in both).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import io
import time
from pathlib import Path

from edgeveil.device.files import atomic_write_bytes, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEVEIL_SHARED_DATA", REPO.parent / "shared" / "datasets"))
DATASETS = {
    "mnist": (f"npz:{SHARED / 'mnist_test.npz'}",
              ["model.arch=smallcnn", "model.width=full", "data.victim_train=6000", "data.aux=2000",
               "data.test=1000", "train.epochs=3", "train.batch_size=64"]),
    "cifar10": (f"npz:{SHARED / 'cifar10_train_jpeg.npz'},{SHARED / 'cifar10_test_jpeg.npz'}",
                ["model.arch=resnet18", "model.split=1", "model.width=0.25", "data.victim_train=2000",
                 "data.aux=1000", "data.test=300", "train.epochs=2", "train.batch_size=64",
                 "attack.inverse.epochs=8"]),
}
# defense -> three strengths (its main coefficient; see `edgeveil list defenses`), low to high.
GRID = {
    "noise": [0.25, 1.0, 4.0],          # Gaussian sigma in feature units
    "dropout": [0.2, 0.5, 0.8],         # drop probability
    "nopeek": [0.3, 1.0, 3.0],          # dCor weight alpha
    "mid": [0.01, 0.1, 1.0],            # KL weight lambda
    "adversarial": [0.1, 0.3, 1.0],     # alpha against the jointly trained decoder
    "infoscissors": [0.1, 0.3, 0.8],    # lambda_d (lambda_l at its default 0.1; their sum must stay < 1)
    "siftfunnel": [0.5, 2.0, 8.0],      # beta, the dCor weight (the loss on the dataset's own head)
    "cem": [4.0, 8.0, 16.0],            # lambda on top of noise (its default base strength)
}
ATTACK = ["attack.names=[inverse]", "attack.precisions=[float,int8]", "attack.inverse.epochs=10",
          "attack.inverse.restarts=2", "attack.inverse.width=32"]
QUICK = ["train.epochs=1", "data.victim_train=300", "data.aux=200", "data.test=100", "data.evaluator=400",
         "attack.inverse.epochs=1", "attack.inverse.restarts=1", "attack.inverse.width=8"]
PAPER_DEFENSES = ("infoscissors", "siftfunnel", "cem")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cases(datasets: list[str], only: list[str] | None) -> list[tuple[str, str, float]]:
    out = []
    for ds in datasets:
        out.append((ds, "none", 0.0))
        for defense, strengths in GRID.items():
            if only is None or defense in only:
                out += [(ds, defense, s) for s in strengths]
    return out


def run_case(ds: str, defense: str, strength: float, runs: Path, quick: bool) -> dict:
    """Train, export int8 and attack one (dataset, defense, strength); its row (read back if done)."""
    run_dir = runs / ds / f"{defense}_{strength:g}"
    done = run_dir / "bench_row.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if "identification" in row:  # rows from before the evaluator are measured again
            return row
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage

    data, overrides = DATASETS[ds]
    baseline = [] if defense == "none" else [f"attack.baseline={runs / ds / 'none_0'}"]
    cfg = load_config(None, [*ATTACK, f"data.name={data}", *overrides, f"defense.name={defense}",
                             f"defense.strength={strength}", "export.precisions=[int8]", *baseline,
                             "export.calibration_samples=200", *(QUICK if quick else [])])
    t0 = time.perf_counter()
    metrics = train_stage(cfg, run_dir, progress=True)
    t1 = time.perf_counter()
    manifest = export_stage(cfg, run_dir, progress=True)
    t2 = time.perf_counter()
    attacks = attack_stage(cfg, run_dir, ["inverse"], progress=True)
    ev = attacks.get("evaluator") or {}
    t3 = time.perf_counter()
    info = json.loads((run_dir / "train" / "model.json").read_text())
    history = [json.loads(line) for line in (run_dir / "train" / "history.jsonl").read_text().splitlines()]
    int8 = manifest["artifacts"]["int8"]
    inv = attacks["attacks"]["inverse"]
    row = {
        "dataset": ds, "defense": defense, "strength": strength,
        "budget": {"victim_train": info["data"]["splits"]["victim_train"]["size"],
                   "aux": info["data"]["splits"]["aux"]["size"], "test": info["data"]["splits"]["test"]["size"],
                   "epochs": info["train"]["epochs_done"], "arch": info["arch"], "width": info["width"],
                   "split": info["split"], "attack": inv["options"]},
        "float_accuracy": metrics["float_test_accuracy"], "int8_accuracy": int8["tail_accuracy"],
        "epoch_seconds": statistics.median(h["seconds"] for h in history),
        "ssim": {p: r["summary"]["ssim"] for p, r in inv["precisions"].items()},
        "identification": {p: r["summary"].get("identification") for p, r in inv["precisions"].items()},
        "evaluator_on_originals": (ev.get("on_originals") or {}).get("identification"),
        "outcome": attacks["verdict"].get("outcome"), "headline": attacks["verdict"].get("headline"),
        "psnr": {p: r["summary"]["psnr"] for p, r in inv["precisions"].items()},
        "ssim_int8_minus_float": inv["differences"]["ssim"]["int8"],
        "noise_after_rounding": int8.get("noise_after_rounding"),
        "xnnpack_safe": int8.get("xnnpack_safe", True),
        "seconds": {"train": round(t1 - t0, 1), "export": round(t2 - t1, 1), "attack": round(t3 - t2, 1)},
        "targets": attacks["targets"]["n"],
    }
    atomic_write_json(done, row)  # the resume marker: never half-written
    return row


def step_time_ratios(ds: str, defenses: list[str], steps: int, repeats: int, quick: bool) -> dict:
    """defense -> median time of `steps` training steps over `none`'s, interleaved with each other.

    Round-robin over the defenses `repeats` times, on the dataset's architecture and batch size,
    each at its middle strength: load on the machine hits all of them alike, so the ratios to
    `none` hold even when the absolute times do not.
    """
    import tempfile

    import numpy as np

    from edgeveil.pipeline.config import load_config
    from edgeveil.training import archs, defenses as registry
    from edgeveil.training.data import channel_stats, load_dataset, to_tensors
    from edgeveil.training.trainer import Trainer, TrainSettings

    data, overrides = DATASETS[ds]
    cfg = load_config(None, [f"data.name={data}", *overrides, *(QUICK if quick else [])])
    train, test = load_dataset(cfg.data.name)
    source = train if train is not None else test
    pool = source.subset(np.arange(min(steps * cfg.train.batch_size, len(source))))
    x, y = to_tensors(pool, *channel_stats(pool))
    times: dict[str, list[float]] = {d: [] for d in defenses}
    for _ in range(repeats):
        for name in defenses:
            strength = GRID[name][1] if name in GRID else 0.0
            model = archs.create(cfg.model.arch, in_channels=x.shape[1], image_size=x.shape[2], num_classes=10,
                                 split=cfg.model.split, width=cfg.model.width)
            defense = registry.create(name, strength)
            defense.setup(model.head, model.tail, tuple(x.shape[1:]), model.feature_shape, 10)
            settings = TrainSettings(epochs=1, batch_size=cfg.train.batch_size, lr=cfg.train.lr, device="cpu",
                                     seed=0, max_steps_per_epoch=steps)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                Trainer(model.head, model.tail, defense, settings, tmp).fit((x, y), (x[:8], y[:8]), progress=False)
                times[name].append(time.perf_counter() - t0)
    medians = {d: statistics.median(t) for d, t in times.items()}
    return {d: m / medians["none"] for d, m in medians.items()}


def _ci(s: dict | None) -> str:
    return "-" if not s else f"{s['mean']:.3f} ({s['ci95'][0]:.3f}–{s['ci95'][1]:.3f})"


def compare(rows: list[dict], timing: dict) -> list[dict]:
    """Each row with its dataset's `none`: accuracy loss (points), SSIM cut (share), epoch-time ratio
    (from the interleaved `timing`, dataset -> defense -> ratio to none, when measured)."""
    none = {r["dataset"]: r for r in rows if r["defense"] == "none"}
    out = []
    for r in rows:
        base = none.get(r["dataset"])
        if base is None:
            continue
        cut = {p: 1 - r["ssim"][p]["mean"] / base["ssim"][p]["mean"] for p in r["ssim"]}
        out.append({**r, "int8_points_lost": 100 * (base["int8_accuracy"] - r["int8_accuracy"]),
                    "float_points_lost": 100 * (base["float_accuracy"] - r["float_accuracy"]),
                    "ssim_cut": cut, "epoch_time_ratio": r["epoch_seconds"] / base["epoch_seconds"],
                    "step_time_ratio": timing.get(r["dataset"], {}).get(r["defense"]),
                    "meets_target": r["defense"] != "none" and cut["int8"] >= 0.5
                    and 100 * (base["int8_accuracy"] - r["int8_accuracy"]) <= 3.0})
    return out


def budget_line(ds: str, rows: list[dict]) -> str:
    b = next(r["budget"] for r in rows if r["dataset"] == ds)
    a = b["attack"]
    return (f"**{ds}**: {b['arch']} width {b['width']} split {b['split']}, {b['victim_train']} training images × "
            f"{b['epochs']} epochs per defense, {b['test']} test images (attack targets), {b['aux']} attacker "
            f"auxiliary images; `inverse` {a['depth']} decoder width {a['width']}, {a['epochs']} epochs × "
            f"{a['restarts']} restarts, the best on held-out auxiliary data kept.")


def table(rows: list[dict]) -> str:
    lines = ["| defense | strength | float acc | int8 acc | int8 pts lost | SSIM float | SSIM int8 | "
             "int8 − float SSIM | SSIM cut int8 | identified float | identified int8 | verdict | "
             "epoch × none (sweep) | steps × none (interleaved) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["ssim_int8_minus_float"]
        notes = []
        if r["noise_after_rounding"] and r["noise_after_rounding"].get("below_one_step"):
            notes.append(f"noise {r['noise_after_rounding']['sigma_steps']:.2f} steps: rounding erases it")
        if not r["xnnpack_safe"]:
            notes.append("dead layer: no XNNPACK")
        if r["meets_target"]:
            notes.append("**≥50% cut, ≤3 pts**")
        lines.append(f"| {r['defense']} | {r['strength']:g} | {r['float_accuracy']:.4f} | {r['int8_accuracy']:.4f} | "
                     f"{r['int8_points_lost']:+.2f} | {_ci(r['ssim']['float'])} | {_ci(r['ssim']['int8'])} | "
                     f"{d['mean']:+.3f} ({d['ci95'][0]:+.3f}–{d['ci95'][1]:+.3f}) | "
                     f"{100 * r['ssim_cut']['int8']:.0f}% | {_ci(r['identification']['float'])} | "
                     f"{_ci(r['identification']['int8'])} | {r['outcome']} | {r['epoch_time_ratio']:.2f} | "
                     f"{'-' if r['step_time_ratio'] is None else format(r['step_time_ratio'], '.2f')} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines)


def _evaluator_line(rows: list[dict]) -> str:
    got = [(r["dataset"], r["evaluator_on_originals"]) for r in rows if r["defense"] == "none"
           and r.get("evaluator_on_originals")]
    return "; ".join(f"on {ds} it identifies {e['mean']:.1%} of the original targets" for ds, e in got) + "."


def verdict_line(rows: list[dict]) -> str:
    mnist = [r for r in rows if r["dataset"] == "mnist" and r["defense"] in PAPER_DEFENSES]
    if not mnist:
        return "MNIST was not run: no check of the 50% SSIM cut."
    hits = [r for r in mnist if r["meets_target"]]
    if hits:
        return "On MNIST, " + "; ".join(
            f"`{r['defense']}` at {r['strength']:g} cuts int8 SSIM by {100 * r['ssim_cut']['int8']:.0f}% "
            f"losing {r['int8_points_lost']:.2f} points of int8 accuracy" for r in hits) + "."
    best = max(mnist, key=lambda r: r["ssim_cut"]["int8"] if r["int8_points_lost"] <= 3 else -1)
    return (f"On MNIST no run of {', '.join(PAPER_DEFENSES)} cut int8 SSIM by 50% within 3 points of int8 "
            f"accuracy; the best within 3 points was `{best['defense']}` at {best['strength']:g}: "
            f"{100 * best['ssim_cut']['int8']:.0f}% cut, {best['int8_points_lost']:.2f} points lost.")


def plot(rows: list[dict], path: Path) -> bool:
    """Accuracy against int8 and float SSIM per dataset, one marker per defense."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    markers = dict(zip(["none", *GRID], "o^vs<>PDX*"))
    for ax, ds in zip(axes[0], datasets):
        for defense in dict.fromkeys(r["defense"] for r in rows if r["dataset"] == ds):
            rs = sorted((r for r in rows if r["dataset"] == ds and r["defense"] == defense), key=lambda r: r["strength"])
            for prec, fill in (("int8", "full"), ("float", "none")):
                ax.plot([r["ssim"][prec]["mean"] for r in rs], [r[f"{prec}_accuracy"] for r in rs],
                        marker=markers.get(defense, "o"), fillstyle=fill, linestyle="-" if prec == "int8" else ":",
                        label=defense if prec == "int8" else None, color=f"C{list(markers).index(defense) % 10}")
        ax.set_xlabel("inverse-attack SSIM (filled, solid: int8; hollow, dotted: float)")
        ax.set_ylabel("test accuracy")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist", help="comma-separated: mnist, cifar10 (a short budget; "
                    "benchmarks/cifar10.py trains CIFAR-10 victims to real accuracy)")
    ap.add_argument("--only", help="comma-separated defenses (default: all); none always runs")
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script, not the numbers")
    ap.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs" / "defenses")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--timing-steps", type=int, default=30, help="training steps per interleaved timing round")
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="keep the interleaved timing already in --runs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--note", help="how the results were produced (processes, threads, load), printed on top")
    args = ap.parse_args(argv)
    datasets = args.datasets.split(",")
    only = args.only.split(",") if args.only else None
    bad = [d for d in datasets if d not in DATASETS] + [d for d in only or [] if d not in GRID]
    if bad:
        ap.error(f"unknown dataset(s) or defense(s) {bad}; datasets: {', '.join(DATASETS)}; defenses: {', '.join(GRID)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = args.runs.with_name(args.runs.name + "_quick") if args.quick else args.runs
    todo = cases(datasets, only)
    rows = []
    for i, (ds, defense, strength) in enumerate(todo, 1):
        print(f"== [{i}/{len(todo)}] {ds} {defense} {strength:g}", flush=True)
        rows.append(run_case(ds, defense, strength, runs, args.quick))
    # Rows of datasets not run this time (earlier sweeps) stay in the results.
    for path in sorted(runs.glob("*/*/bench_row.json")):
        row = json.loads(path.read_text())
        if not any(r["dataset"] == row["dataset"] and r["defense"] == row["defense"]
                   and r["strength"] == row["strength"] for r in rows):
            rows.append(row)
    timing_path = runs / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for ds in [] if args.no_timing else datasets:
        names = ["none", *(d for d in GRID if only is None or d in only)]
        print(f"== interleaved timing on {ds}: {len(names)} defenses × {args.timing_repeats} rounds of "
              f"{args.timing_steps} steps", flush=True)
        ratios = step_time_ratios(ds, names, 2 if args.quick else args.timing_steps, args.timing_repeats, args.quick)
        timing[ds] = {**timing.get(ds, {}), **ratios}
        atomic_write_json(timing_path, timing)
    rows = compare(rows, timing)
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "defenses", "quick": args.quick, "machine": machine(), "grid": GRID, "rows": rows}
    atomic_write_json(args.out / f"defenses{suffix}.json", report)
    png = args.out / f"defenses{suffix}.png"
    has_plot = plot(rows, png)
    order = {d: i for i, d in enumerate(["none", *GRID])}
    parts = ["# Defenses: accuracy, what the inverse attack recovers on float and int8 features, the verdict, "
             "training cost\n",
             f"Reproduce: `python benchmarks/defenses.py{' --quick' if args.quick else ''}`\n",
             *([f"This run: {args.note}\n"] if args.note else []),
             f"Machine: {json.dumps(report['machine'])}. Other jobs shared the 2 cores during the sweep, so the "
             "epoch times of the sweep (median epoch of each run, divided by `none`'s) carry that load. The "
             "interleaved column is the training cost to read: every defense at its middle strength timed for "
             "the same number of steps, round-robin with `none`, median of the rounds.\n",
             "Means with 95% bootstrap intervals over the attack targets. 'SSIM cut int8' is 1 − SSIM(defense) / "
             "SSIM(none) on int8 features; 'int8 pts lost' is none's int8 accuracy minus the defense's, in points. "
             "SSIM: 11×11 Gaussian window (σ 1.5), data range 1, averaged over the valid interior (the "
             "scikit-image and papers' convention), on the reconstructions as saved (uint8). 'Identified' is "
             "the share of reconstructions the auditor's evaluator (a classifier of another architecture, "
             "trained on images disjoint from the victim's and the attacker's) labels as the original's "
             "class; " + _evaluator_line(rows) + " The verdict is the product's own (README, 'Verdict'): "
             "the attack must first prove its power on `none` (identification ≥ 80% of the evaluator's "
             "accuracy on the originals), then the defense must beat `none` in float and still on int8. "
             "int8 accuracy and int8 "
             "features include the runtime noise of `noise` and `cem` as the device adds it: noise of a step or "
             "more is requantized onto the output range widened by 4σ (device.noise.sent_qparams), not clipped "
             "at the ReLU zero point.\n",
             verdict_line(rows) + "\n"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = sorted((r for r in rows if r["dataset"] == ds), key=lambda r: (order[r["defense"]], r["strength"]))
        parts += [f"## {ds}\n", budget_line(ds, ds_rows) + "\n", table(ds_rows) + "\n"]
    if has_plot:
        parts.append(f"![accuracy against inverse SSIM]({png.name})\n")
    atomic_write_text(args.out / f"defenses{suffix}.md", "\n".join(parts))
    print("\n".join(parts))
    print(f"wrote {args.out / f'defenses{suffix}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
