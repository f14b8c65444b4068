"""Every defense at three strengths: float and int8 accuracy, the inverse attack's interior SSIM and
identification on float and int8 features, the verdict, and training cost, each against `none`
trained the same way on the same data.

    python benchmarks/defenses.py                          # MNIST on a local Ray, writes benchmarks/results/
    python benchmarks/defenses.py --address HOST:PORT      # the same sweep on a Ray cluster
    python benchmarks/defenses.py --quick --only cem       # tiny budgets: checks the script, not the numbers
    edgeveil sweep --config benchmarks/configs/defenses_mnist.yaml --out benchmarks/runs/defenses/mnist
    python benchmarks/defenses.py --tables-only            # ... then the tables from that sweep's folder

The grid and its budgets are a sweep file per dataset, benchmarks/configs/defenses_<dataset>.yaml
(the victims in configs/mnist.yaml; `cifar10` starts from configs/cifar10.yaml, the real-accuracy
victims of cifar10.py, 25 cells of ~2 h each: meant for a cluster). This script runs it through
`edgeveil sweep`'s machinery: each (defense, strength) is one run directory under --runs/<dataset>,
trained, exported to int8, then attacked by `inverse` on float and int8 features of the same test
images and judged against `none` (its `attack.baseline`); rerunning resumes what finished. Then it
builds the tables from the run directories, with the budget (images, epochs, width, attack epochs)
printed beside every number. Epoch time is the median over a run's epochs, divided by `none`'s from
the same sweep; the interleaved step-time ratio is measured here, on this machine, after the sweep.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grid  # noqa: E402

from edgeveil.device.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json  # noqa: E402

REPO = _grid.REPO
DATASETS = {"mnist": _grid.CONFIGS / "defenses_mnist.yaml", "cifar10": _grid.CONFIGS / "defenses_cifar10.yaml"}
# --quick: on top of the sweep file's budgets
QUICK = ["train.epochs=1", "data.victim_train=300", "data.aux=200", "data.test=100", "data.evaluator=400",
         "attack.inverse.epochs=1", "attack.inverse.restarts=1", "attack.inverse.width=8"]
PAPER_DEFENSES = ("infoscissors", "siftfunnel", "cem")


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def budget(run_dir: Path) -> dict:
    """What one run was trained and attacked with, from its own files."""
    info = read_json(run_dir / "train" / "model.json")
    attacks = read_json(run_dir / "cloud" / "attacks.json")
    splits = info["data"]["splits"]
    return {"victim_train": splits["victim_train"]["size"], "aux": splits["aux"]["size"],
            "test": splits["test"]["size"], "epochs": info["train"]["epochs_done"], "arch": info["arch"],
            "width": info["width"], "split": info["split"], "attack": attacks["attacks"]["inverse"]["options"]}


def row(ds: str, cell: dict) -> dict:
    """One finished cell of the sweep as a table row, read from its run directory."""
    run_dir = cell["run_dir"]
    metrics = read_json(run_dir / "train" / "metrics.json")
    manifest = read_json(run_dir / "export" / "manifest.json")
    attacks = read_json(run_dir / "cloud" / "attacks.json")
    info = read_json(run_dir / "train" / "model.json")
    history = [json.loads(line) for line in (run_dir / "train" / "history.jsonl").read_text().splitlines()]
    ev = attacks.get("evaluator") or {}
    int8 = manifest["artifacts"]["int8"]
    inv = attacks["attacks"]["inverse"]
    return {
        "dataset": ds, "defense": info["defense"]["name"], "strength": info["defense"]["strength"],
        "run_dir": str(run_dir), "budget": budget(run_dir),
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
        "seconds": cell["seconds"],  # per stage, when it ran in the sweep's last invocation
        "targets": attacks["targets"]["n"],
    }


def step_time_ratios(cfg, strengths: dict[str, float], steps: int, repeats: int) -> dict:
    """defense -> median time of `steps` training steps over `none`'s, interleaved with each other.

    Round-robin over the defenses (`strengths`: name -> the strength to time, `none` among them)
    `repeats` times, on the architecture and batch size of `cfg` (the sweep's `none` cell): load on
    the machine hits all of them alike, so the ratios to `none` hold even when the absolute times do not.
    """
    import tempfile

    import numpy as np

    from edgeveil.training import archs, defenses as registry
    from edgeveil.training.data import channel_stats, load_dataset, to_tensors
    from edgeveil.training.trainer import Trainer, TrainSettings

    train, test = load_dataset(cfg.data.name)
    source = train if train is not None else test
    pool = source.subset(np.arange(min(steps * cfg.train.batch_size, len(source))))
    x, y = to_tensors(pool, *channel_stats(pool))
    times: dict[str, list[float]] = {d: [] for d in strengths}
    for _ in range(repeats):
        for name, strength in strengths.items():
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
    markers = dict(zip(dict.fromkeys(["none", *(r["defense"] for r in rows)]), "o^vs<>PDX*"))
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


def sweep_rows(datasets: list[str], runs: Path, quick: bool, only: list[str] | None, args) -> tuple[list, dict]:
    """Run (or, with --tables-only, read) each dataset's sweep; its finished cells as rows, and the
    failed cells with their errors."""
    rows, failed = [], {}
    for ds in datasets:
        plan = _grid.sweep_plan(ds, DATASETS[ds], runs / ds, args, QUICK if quick else [], only)
        rows += [row(ds, cell) for cell in _grid.done_cells(plan)]
        failed.update(_grid.failed_cells(plan))
    return rows, failed


def interleaved_timing(ds: str, runs: Path, quick: bool, only: list[str] | None, args) -> dict:
    """Each defense at its middle strength against `none`, on the sweep's `none` cell's config."""
    from edgeveil.pipeline.config import from_dict

    spec = _grid.derive(DATASETS[ds], QUICK if quick else [], only)
    strengths = {"none": 0.0, **{d: s[len(s) // 2] for d, s in _grid.grid_defenses(spec).items()}}
    plan = _grid.read_plan(runs / ds)
    cfg = from_dict(next(c["config"] for c in plan["cells"] if c["baseline"] is None))
    print(f"== interleaved timing on {ds}: {len(strengths)} defenses × {args.timing_repeats} rounds of "
          f"{args.timing_steps} steps", flush=True)
    return step_time_ratios(cfg, strengths, 2 if quick else args.timing_steps, args.timing_repeats)


def markdown(rows: list[dict], failed: dict, report: dict, args, png: Path | None) -> str:
    reproduce = "python benchmarks/defenses.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    parts = ["# Defenses: accuracy, what the inverse attack recovers on float and int8 features, the verdict, "
             "training cost\n",
             f"Reproduce: `{reproduce}` (a local Ray; `--address HOST:PORT` for a cluster). The grid: "
             + ", ".join(f"`{DATASETS[ds].relative_to(REPO)}`" for ds in dict.fromkeys(r["dataset"] for r in rows))
             + ", run by `edgeveil sweep`.\n",
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
    if failed:
        parts += ["Failed cells (retried once by the sweep, then left out of the tables): "
                  + "; ".join(f"{n}: {e}" for n, e in failed.items()) + "\n"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        ds_rows = [r for r in rows if r["dataset"] == ds]
        parts += [f"## {ds}\n", budget_line(ds, ds_rows) + "\n", table(ds_rows) + "\n"]
    if png is not None:
        parts.append(f"![accuracy against inverse SSIM]({png.name})\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist", help="comma-separated: mnist, cifar10 (benchmarks/configs/"
                    "defenses_<dataset>.yaml; cifar10 is real-accuracy training: a cluster's job)")
    ap.add_argument("--only", help="comma-separated defenses (default: all); none always runs")
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the script, not the numbers")
    _grid.add_sweep_arguments(ap, REPO / "benchmarks" / "runs" / "defenses")
    ap.add_argument("--threads", type=int, help="torch threads of the interleaved timing (default: torch's choice)")
    ap.add_argument("--timing-steps", type=int, default=30, help="training steps per interleaved timing round")
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true", help="keep the interleaved timing already in --runs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--note", help="how the results were produced (processes, threads, load), printed on top")
    args = ap.parse_args(argv)
    datasets = args.datasets.split(",")
    only = args.only.split(",") if args.only else None
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        ap.error(f"unknown dataset(s) {bad}; known: {', '.join(DATASETS)}")
    try:
        for ds in datasets:
            _grid.derive(DATASETS[ds], only=only)
    except ValueError as e:
        ap.error(str(e))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = (args.runs.with_name(args.runs.name + "_quick") if args.quick else args.runs).resolve()
    out = args.out.resolve()
    _grid.at_repo_root()
    rows, failed = sweep_rows(datasets, runs, args.quick, only, args)
    # Rows of datasets not run this time (earlier sweeps in --runs) stay in the results.
    for ds in DATASETS:
        if ds not in datasets and (runs / ds / "sweep.json").is_file():
            rows += [row(ds, cell) for cell in _grid.done_cells(_grid.read_plan(runs / ds))]
    if not any(r["defense"] == "none" for r in rows):
        print("no finished baseline: nothing to compare; failed cells: " + json.dumps(failed), file=sys.stderr)
        return 1
    timing_path = runs / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for ds in [] if args.no_timing or args.tables_only else datasets:
        timing[ds] = {**timing.get(ds, {}), **interleaved_timing(ds, runs, args.quick, only, args)}
        atomic_write_json(timing_path, timing)
    rows = compare(rows, timing)
    suffix = "_quick" if args.quick else ""
    report = {"benchmark": "defenses", "quick": args.quick, "machine": machine(),
              "sweeps": {ds: str(DATASETS[ds].relative_to(REPO)) for ds in dict.fromkeys(r["dataset"] for r in rows)},
              "failed": failed, "rows": rows}
    atomic_write_json(out / f"defenses{suffix}.json", report)
    png = out / f"defenses{suffix}.png"
    md = markdown(rows, failed, report, args, png if plot(rows, png) else None)
    atomic_write_text(out / f"defenses{suffix}.md", md)
    print(md)
    print(f"wrote {out / f'defenses{suffix}.md'} and .json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
