"""Every attack on float and int8 features of the same test images, undefended and with
infoscissors, siftfunnel and cem at one strength, with the verdict and each attack's running time.

    python benchmarks/attacks.py                          # MNIST on a local Ray, writes benchmarks/results/
                                                          # (runs in benchmarks/state/attacks: it resumes)
    python benchmarks/attacks.py --address HOST:PORT      # the same sweep on a Ray cluster
    python benchmarks/attacks.py --quick                  # tiny budgets: checks the script, not the numbers
    edgeveil sweep --config benchmarks/configs/attacks_cifar10.yaml --out benchmarks/state/attacks/cifar10 \
        --address HOST:PORT                               # CIFAR-10 at real accuracy, on a cluster
    python benchmarks/attacks.py --datasets mnist,cifar10 --tables-only   # tables from the sweeps' folders

The grid and every budget are a sweep file per dataset, benchmarks/configs/attacks_<dataset>.yaml:
the victims (configs/mnist.yaml, the same as defenses.py's; configs/cifar10.yaml, cifar10.py's
real-accuracy victims), the four models, each attack's options and `ka`'s auxiliary data. This script
runs it through `edgeveil sweep`'s machinery (each model one run directory under --runs/<dataset>;
rerunning resumes every finished stage and every finished (attack, precision)), then builds the
tables from the run directories. The defended models are judged against the undefended one
(attack.baseline). Published numbers from research/algorithms.md section 10 are put beside ours.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _grid  # noqa: E402
import defenses  # noqa: E402  (the budget line and the machine description)

from edgeveil.device.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json  # noqa: E402

REPO = _grid.REPO
# The sweep's run directories are committed (benchmarks/state/attacks/<dataset>), so a later sitting or
# another machine resumes them and --tables-only rebuilds the tables from them.
STATE = REPO / "benchmarks" / "state" / "attacks"
DATASETS = {"mnist": _grid.CONFIGS / "attacks_mnist.yaml", "cifar10": _grid.CONFIGS / "attacks_cifar10.yaml"}
ATTACKS = ("inverse", "rmle", "ka", "shadow", "pmc", "mine")
# --quick: defenses.py's tiny training budget, and each attack's shortest run
QUICK = [*defenses.QUICK, "attack.rmle.steps=5", "attack.shadow.shadow_epochs=1", "attack.shadow.steps=5",
         "attack.ka.epochs=1", "attack.ka.aux_size=100", "attack.pmc.steps=4", "attack.pmc.scratch_steps=4",
         "attack.mine.epochs=1", "attack.mine.batch_size=16"]
# research/algorithms.md section 10: (row, what, published, where ours is measured)
PUBLISHED = [
    ("7/8", "He et al. 2019 rMLE SSIM, shallow split (MNIST ReLU2; CIFAR-10 ReLU22)",
     {"mnist": 0.5998, "cifar10": 0.6940}, ("rmle", "ssim", "float")),
    ("10", "He et al. 2019 inverse network, same distribution, SSIM (CIFAR-10 ReLU22)",
     {"cifar10": 0.6802}, ("inverse", "ssim", "float")),
    ("1", "InfoScissors: clean accuracy, no defense (CIFAR-10, ResNet-18)", {"cifar10": 0.7720},
     ("pmc", "clean_accuracy", "float")),
    ("2", "InfoScissors: PMC accuracy, 40 labels", {"cifar10": 0.6931}, ("pmc", "accuracy", "float")),
    ("3", "InfoScissors: trained from scratch, 40 labels", {"cifar10": 0.1534},
     ("pmc", "scratch_accuracy", "float")),
]


def record(ds: str, cell: dict) -> dict:
    """One finished cell of the sweep (a model and every attack on it), read from its run directory."""
    run_dir = cell["run_dir"]
    out = read_json(run_dir / "cloud" / "attacks.json")
    info = read_json(run_dir / "train" / "model.json")
    # Attacks resume from stored records: their own seconds are what they cost.
    seconds = sum(r["seconds"] for a in out["attacks"].values() for r in a["precisions"].values())
    return {"dataset": ds, "defense": info["defense"]["name"], "strength": info["defense"]["strength"],
            "run_dir": str(run_dir), "attack_seconds": round(seconds, 1), "targets": out["targets"]["n"],
            "options": cell["config"]["attack"]["options"],
            "attacks": {n: {"threat_model": a["threat_model"], "options": a["options"],
                            "precisions": {p: {"summary": r["summary"], "seconds": r["seconds"]}
                                           for p, r in a["precisions"].items()},
                            "differences": a.get("differences", {})} for n, a in out["attacks"].items()},
            "verdict": out["verdict"]}


def sweep_records(datasets: list[str], runs: Path, args) -> tuple[list[dict], dict]:
    """Run (or, with --tables-only, read) each dataset's sweep; its finished cells, and the failed ones."""
    records, failed = [], {}
    for ds in datasets:
        plan = _grid.sweep_plan(ds, DATASETS[ds], runs / ds, args, QUICK if args.quick else [])
        records += [record(ds, cell) for cell in _grid.done_cells(plan)]
        failed.update(_grid.failed_cells(plan))
    return records, failed


def budgets_line(ds_records: list[dict]) -> str:
    """Each attack's options as the sweep file set them, and ka's auxiliary data."""
    opts = ds_records[0]["options"]
    ka = opts.get("ka", {}).get("aux_dataset")
    return ("Attack budgets: " + "; ".join(f"{n} {json.dumps({k: v for k, v in o.items() if k != 'aux_dataset'})}"
                                           for n, o in opts.items())
            + (f"; ka auxiliary data: {ka.split('/')[-1]}" if ka else "") + ".")


def _ci(s: dict | None, spec=".3f") -> str:
    if s is None:
        return "-"
    return f"{s['mean']:{spec}} ({s['ci95'][0]:{spec}}–{s['ci95'][1]:{spec}})"


# attack -> the metrics shown (the first is its leakage metric); a metric a run did not score is left out
# (luminance SSIM exists for colour images only)
_RECONSTRUCTION = ("ssim", "ssim_luma", "psnr", "identification")
SHOWN = {"inverse": _RECONSTRUCTION, "rmle": _RECONSTRUCTION, "ka": _RECONSTRUCTION, "shadow": _RECONSTRUCTION,
         "pmc": ("accuracy", "scratch_accuracy", "clean_accuracy"), "mine": ("mi",)}


def _summary(rec: dict | None, attack: str, metric: str, prec: str = "float") -> dict | None:
    """{"mean", "ci95", ...} of one attack's metric on one precision's features, or None."""
    if rec is None:
        return None
    return rec["attacks"].get(attack, {}).get("precisions", {}).get(prec, {}).get("summary", {}).get(metric)


def _undefended(records: list[dict], ds: str) -> dict | None:
    return next((r for r in records if r["dataset"] == ds and r["defense"] == "none"), None)


def table(records: list[dict]) -> str:
    lines = ["| model | attack | metric | float | int8 | int8 − float | seconds (float / int8) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        label = "none" if r["defense"] == "none" else f"{r['defense']} {r['strength']:g}"
        for name, a in r["attacks"].items():
            for metric in SHOWN.get(name, ()):
                f, i = (_summary(r, name, metric, p) for p in ("float", "int8"))
                if f is None and i is None:
                    continue
                d = a["differences"].get(metric, {}).get("int8")
                spec = ".2f" if metric in ("psnr",) else ".3f"
                diff = "-" if d is None else f"{d['mean']:+.3f} ({d['ci95'][0]:+.3f}–{d['ci95'][1]:+.3f})"
                secs = " / ".join(f"{a['precisions'][p]['seconds']:.0f}" for p in ("float", "int8")
                                  if p in a["precisions"])
                lines.append(f"| {label} | {name} | {metric} | {_ci(f, spec)} | {_ci(i, spec)} | {diff} | {secs} |")
    return "\n".join(lines)


def verdicts(records: list[dict]) -> str:
    from edgeveil.cloud_sim.verdict import outcome_word

    return "\n".join(f"- **{r['dataset']} / {r['defense']}**: {outcome_word(r['verdict'])}. "
                     f"{r['verdict']['headline']}" for r in records)


def published(records: list[dict]) -> str:
    lines = ["| row | published | value | ours (dataset, model none, float features) | note |", "|---|---|---|---|---|"]
    for row, what, values, (attack, metric, prec) in PUBLISHED:
        for ds, value in values.items():
            s = _summary(_undefended(records, ds), attack, metric, prec)
            ours = "not run" if s is None else f"{s['mean']:.4f} ({ds})"
            note = "" if s is None else f"{s['mean'] - value:+.4f} against the paper"
            lines.append(f"| {row} | {what} | {value} | {ours} | {note} |")
    return "\n".join(lines)


def _mean(records: list[dict], ds: str, attack: str, metric: str) -> float | None:
    """The undefended model's mean on float features, or None."""
    s = _summary(_undefended(records, ds), attack, metric)
    return None if s is None else s["mean"]


def closeness(records: list[dict]) -> str:
    """How close the reproduction came, in words computed from the numbers (undefended, float)."""
    out = []
    theirs = {"mnist": (0.5998, "LeNet, ReLU2"), "cifar10": (0.6940, "ReLU22, 128×16×16 after one pooling")}
    for ds, (paper, where) in theirs.items():
        ours, rec = _mean(records, ds, "rmle", "ssim"), _undefended(records, ds)
        if ours is None:
            continue
        run = Path(rec["run_dir"])
        shape = json.loads((run / "export" / "manifest.json").read_text())["feature_shape"]
        size = json.loads((run / "train" / "model.json").read_text())["input"]["shape"][-1]
        out.append(f"- rMLE on {ds}: SSIM {ours:.3f} against He et al.'s {paper:.4f} ({where}): {ours - paper:+.3f}. "
                   f"Our head sends {'×'.join(map(str, shape))} features, at {shape[-1] / size:.0%} of the input's "
                   "resolution.")
    ours = _mean(records, "cifar10", "inverse", "ssim")
    if ours is not None:
        out.append(f"- Inverse network on cifar10 (same distribution): SSIM {ours:.3f} against He et al.'s 0.6802 "
                   f"({ours - 0.6802:+.3f}).")
    for ds in ("cifar10", "mnist"):
        clean, pmc, scratch = (_mean(records, ds, "pmc", m) for m in ("clean_accuracy", "accuracy", "scratch_accuracy"))
        if None in (clean, pmc, scratch):
            continue
        ours = f"{100 * clean:.2f} / {100 * pmc:.2f} / {100 * scratch:.2f} %"
        if ds == "cifar10":
            out.append(f"- InfoScissors' completion table (cifar10, 40 labels): published clean / completion / from "
                       f"scratch 77.20 / 69.31 / 15.34 %; ours {ours}. Our victim is a narrower ResNet-18 (budget "
                       f"above), so compare the shape too: completion reaches {100 * pmc / clean:.0f} % of clean "
                       f"accuracy (published {100 * 69.31 / 77.20:.0f} %), from scratch {100 * scratch / clean:.0f} % "
                       f"(published {100 * 15.34 / 77.20:.0f} %).")
        else:
            out.append(f"- The same on {ds} (no published row): clean / completion / from scratch {ours}.")
    return "\n".join(out)


INVERSIONS = ("inverse", "rmle", "ka", "shadow")
GRID_IMAGES = 8


def plot_scores(records: list[dict], path: Path) -> bool:
    """One panel per (dataset, attack): each model's leakage metric, float and int8 bars side by
    side with their 95% intervals. False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    attacks = [a for a in ATTACKS if any(a in r["attacks"] for r in records)]
    fig = Figure(figsize=(3.0 * len(attacks), 2.8 * len(datasets)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(datasets), len(attacks), squeeze=False)
    for i, ds in enumerate(datasets):
        rows = [r for r in records if r["dataset"] == ds]
        for j, name in enumerate(attacks):
            ax, metric = axes[i][j], SHOWN[name][0]
            for k, prec in enumerate(("float", "int8")):
                means, errs = [], [[], []]
                for r in rows:
                    s = _summary(r, name, metric, prec)
                    m = float("nan") if s is None else s["mean"]
                    means.append(m)
                    errs[0].append(0 if s is None else m - s["ci95"][0])
                    errs[1].append(0 if s is None else s["ci95"][1] - m)
                xs = [x + (k - 0.5) * 0.38 for x in range(len(rows))]
                ax.bar(xs, means, width=0.38, yerr=errs, capsize=2, label=prec,
                       color=("tab:blue", "tab:orange")[k])
            ax.set_xticks(range(len(rows)), [r["defense"] for r in rows], rotation=30, fontsize=7)
            ax.set_title(f"{ds}: {name} {metric}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    _save(fig, path)
    return True


def reconstruction_grid(ds_records: list[dict], path: Path) -> bool:
    """The first GRID_IMAGES attacked test images, then one row per (model, inversion attack) from
    the int8 features the cloud received. False when nothing was reconstructed."""
    from edgeveil.cloud_sim.grid import save_grid
    from edgeveil.training.runfile import load_splits, read_model_info

    first = Path(ds_records[0]["run_dir"])
    idx = json.loads((first / "cloud" / "attacks.json").read_text())["targets"]["indices"][:GRID_IMAGES]
    test = load_splits(read_model_info(first)).test
    originals = test.x[idx].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    rows = {}
    for r in ds_records:
        folder = Path(r["run_dir"]) / "cloud" / "attacks"
        targets = json.loads((folder.parent / "attacks.json").read_text())["targets"]["indices"]
        if targets[:GRID_IMAGES] != idx:  # every model attacked the same test images, in the same order
            raise ValueError(f"{folder}: attacked other test images than {first}")
        for name in INVERSIONS:
            npz = folder / f"{name}.int8.npz"
            if npz.is_file():
                with np.load(npz, allow_pickle=False) as z:
                    rows[f"{r['defense']} {name}"] = z["reconstructions"][:GRID_IMAGES].astype(np.float32) / 255.0
    if not rows:
        return False
    save_grid(originals, rows, path, n=GRID_IMAGES,
              title=f"{ds_records[0]['dataset']}: reconstructions from int8 features, per model and attack")
    return True


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> int:
    from edgeveil.cloud_sim.attacks.rmle import RmleAttack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist", help="comma-separated: mnist, cifar10 (benchmarks/configs/"
                    "attacks_<dataset>.yaml; cifar10 trains cifar10.py's real-accuracy victims: a cluster's job)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the numbers")
    _grid.add_sweep_arguments(ap, STATE)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--note", help="how the results were produced (processes, threads, load), printed on top")
    args = ap.parse_args(argv)
    datasets = args.datasets.split(",")
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        ap.error(f"unknown dataset(s) {bad}; known: {', '.join(DATASETS)}")
    if args.quick:  # never into the committed state: a folder of its own, beside --runs or under benchmarks/runs
        runs = (REPO / "benchmarks" / "runs" / "attacks_quick" if args.runs == STATE
                else args.runs.with_name(args.runs.name + "_quick")).resolve()
    else:
        runs = args.runs.resolve()
    out = args.out.resolve()
    _grid.at_repo_root()
    records, failed = sweep_records(datasets, runs, args)
    datasets = [ds for ds in datasets if any(r["dataset"] == ds for r in records)]
    if not datasets:
        print("no finished cells; failed: " + json.dumps(failed), file=sys.stderr)
        return 1
    suffix = "_quick" if args.quick else ""
    report = {"benchmark": "attacks", "quick": args.quick, "machine": defenses.machine(),
              "sweeps": {ds: str(DATASETS[ds].relative_to(REPO)) for ds in datasets}, "failed": failed,
              "records": records}
    atomic_write_json(out / f"attacks{suffix}.json", report)
    reproduce = "python benchmarks/attacks.py" + (" --quick" if args.quick else "") + (
        "" if args.datasets == "mnist" else f" --datasets {args.datasets}")
    parts = ["# Attacks on float and int8 features, and the verdict\n",
             f"Reproduce: `{reproduce}` (a local Ray; `--address HOST:PORT` for a cluster). The grids: "
             + ", ".join(f"`{DATASETS[ds].relative_to(REPO)}`" for ds in datasets) + ", run by `edgeveil sweep`.\n",
             *([f"This run: {args.note}\n"] if args.note else []),
             f"Machine: {json.dumps(report['machine'])}. Models and attack budgets: per dataset, below. "
             f"rmle and shadow average over {RmleAttack.OPTIONS['noise_draws']} runtime-noise draws per step "
             "against a noisy victim (cem). Means with 95% bootstrap intervals over the attacked test images; "
             "MI in nats.\n",
             "## Verdicts\n", verdicts(records) + "\n"]
    if failed:
        parts += ["Failed cells (retried once by the sweep, then left out): "
                  + "; ".join(f"{n}: {e}" for n, e in failed.items()) + "\n"]
    if plot_scores(records, out / f"attacks{suffix}.png"):
        parts += [f"![every attack's score per model, float and int8](attacks{suffix}.png)\n"]
    for ds in datasets:
        ds_records = [r for r in records if r["dataset"] == ds]
        model = {"dataset": ds, "budget": defenses.budget(Path(ds_records[0]["run_dir"]))}
        parts += [f"## {ds}\n", defenses.budget_line(ds, [model]) + " " + budgets_line(ds_records) + "\n",
                  table(ds_records) + "\n"]
        grid = out / f"attacks_{ds}{suffix}.png"
        if reconstruction_grid(ds_records, grid):
            parts += [f"![{ds} reconstructions from int8 features]({grid.name})\n"]
    parts += ["## Against the published numbers\n", published(records) + "\n", closeness(records) + "\n"]
    if "cifar10" not in datasets:
        parts += ["CIFAR-10 at real accuracy (the undefended victim at 87% and the papers' defenses, attacked by inverse, "
                  "rmle and pmc, with the papers' claim per defense): [cifar10.md](cifar10.md), from "
                  "`benchmarks/cifar10.py`.\n"]
    atomic_write_text(out / f"attacks{suffix}.md", "\n".join(parts))
    print("\n".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
