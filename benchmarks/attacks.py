"""Every attack on float and int8 features of the same test images, undefended and with
infoscissors, siftfunnel and cem at one strength, with the verdict and each attack's running time.

    python benchmarks/attacks.py                      # MNIST and CIFAR-10, writes benchmarks/results/
    python benchmarks/attacks.py --datasets mnist
    python benchmarks/attacks.py --quick              # checks the script, not the numbers

The models are the ones benchmarks/defenses.py trains (same run directories, same budgets: a
finished one is reused, a missing one is trained). Every (attack, precision) result is kept in the
run's cloud/attacks/, so an interrupted sweep resumes. The defended runs are judged against the
undefended one (attack.baseline). Published numbers from research/algorithms.md section 10 are
put beside ours at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defenses as sweep  # noqa: E402  (the same datasets, grid, budgets and run directories)

REPO = sweep.REPO
MODELS = ("none", "infoscissors", "siftfunnel", "cem")  # each at the middle of its defenses.GRID strengths
ATTACKS = ("inverse", "rmle", "ka", "shadow", "pmc", "mine")
# Attack budgets (the inverse one is defenses.py's, so its results are reused); printed with the numbers.
OPTIONS = {
    "rmle": {"steps": 300, "restarts": 1, "batch_size": 128},
    "shadow": {"shadow_epochs": 10, "steps": 300, "restarts": 1},
    "ka": {"epochs": 10, "restarts": 2, "width": 32, "aux_size": 2000},
    "pmc": {"steps": 500, "scratch_steps": 300},
    "mine": {"epochs": 30},
}
KA_AUX = {"mnist": f"npz:{sweep.SHARED / 'cifar10_test_jpeg.npz'}",   # photographs, turned grey
          "cifar10": f"npz:{sweep.SHARED / 'mnist_test.npz'}"}        # digits, turned RGB
QUICK = {"rmle": {"steps": 5}, "shadow": {"shadow_epochs": 1, "steps": 5}, "ka": {"epochs": 1, "aux_size": 100},
         "pmc": {"steps": 4, "scratch_steps": 4}, "mine": {"epochs": 1, "batch_size": 16}}
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


def attack_run(ds: str, defense: str, runs: Path, quick: bool) -> dict:
    """All attacks on one trained model (trained and exported first if missing); its record."""
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.config import load_config

    strength = 0.0 if defense == "none" else sweep.GRID[defense][1]
    sweep.run_case(ds, defense, strength, runs, quick)  # reused when done
    run_dir = runs / ds / f"{defense}_{strength:g}"
    sets = [f"attack.names=[{','.join(ATTACKS)}]", "attack.precisions=[float,int8]",
            f"attack.ka.aux_dataset={KA_AUX[ds]}"]
    for name, opts in OPTIONS.items():
        sets += [f"attack.{name}.{k}={v}" for k, v in {**opts, **(QUICK.get(name, {}) if quick else {})}.items()]
    if defense != "none":
        sets.append(f"attack.baseline={runs / ds / 'none_0'}")
    cfg = load_config(run_dir / "config.yaml", sets)
    t0 = time.perf_counter()
    out = attack_stage(cfg, run_dir, list(ATTACKS), progress=True)
    return {"dataset": ds, "defense": defense, "strength": strength, "run_dir": str(run_dir),
            "seconds": round(time.perf_counter() - t0, 1), "targets": out["targets"]["n"],
            "attacks": {n: {"threat_model": a["threat_model"], "options": a["options"],
                            "precisions": {p: {"summary": r["summary"], "seconds": r["seconds"]}
                                           for p, r in a["precisions"].items()},
                            "differences": a.get("differences", {})} for n, a in out["attacks"].items()},
            "verdict": out["verdict"]}


def _ci(s: dict | None, spec=".3f") -> str:
    if s is None:
        return "-"
    return f"{s['mean']:{spec}} ({s['ci95'][0]:{spec}}–{s['ci95'][1]:{spec}})"


# attack -> the metrics shown (the first is its leakage metric)
SHOWN = {"inverse": ("ssim", "psnr"), "rmle": ("ssim", "psnr"), "ka": ("ssim", "psnr"), "shadow": ("ssim", "psnr"),
         "pmc": ("accuracy", "scratch_accuracy", "clean_accuracy"), "mine": ("mi",)}


def table(records: list[dict]) -> str:
    lines = ["| model | attack | metric | float | int8 | int8 − float | seconds (float / int8) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        label = "none" if r["defense"] == "none" else f"{r['defense']} {r['strength']:g}"
        for name, a in r["attacks"].items():
            for metric in SHOWN.get(name, ()):
                f, i = (a["precisions"].get(p, {}).get("summary", {}).get(metric) for p in ("float", "int8"))
                d = a["differences"].get(metric, {}).get("int8")
                spec = ".2f" if metric in ("psnr",) else ".3f"
                diff = "-" if d is None else f"{d['mean']:+.3f} ({d['ci95'][0]:+.3f}–{d['ci95'][1]:+.3f})"
                secs = " / ".join(f"{a['precisions'][p]['seconds']:.0f}" for p in ("float", "int8")
                                  if p in a["precisions"])
                lines.append(f"| {label} | {name} | {metric} | {_ci(f, spec)} | {_ci(i, spec)} | {diff} | {secs} |")
    return "\n".join(lines)


def verdicts(records: list[dict]) -> str:
    word = {True: "survives", False: "does NOT survive", None: "not judged"}
    return "\n".join(f"- **{r['dataset']} / {r['defense']}**: {word[r['verdict']['survives']]}. "
                     f"{r['verdict']['headline']}" for r in records)


def published(records: list[dict]) -> str:
    lines = ["| row | published | value | ours (dataset, model none, float features) | note |", "|---|---|---|---|---|"]
    for row, what, values, (attack, metric, prec) in PUBLISHED:
        for ds, value in values.items():
            rec = next((r for r in records if r["dataset"] == ds and r["defense"] == "none"), None)
            s = None if rec is None else rec["attacks"].get(attack, {}).get("precisions", {}).get(prec, {}).get(
                "summary", {}).get(metric)
            ours = "not run" if s is None else f"{s['mean']:.4f} ({ds})"
            note = "" if s is None else f"{s['mean'] - value:+.4f} against the paper"
            lines.append(f"| {row} | {what} | {value} | {ours} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the numbers")
    ap.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "runs" / "defenses",
                    help="the defenses benchmark's run directories (shared with it)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    datasets = args.datasets.split(",")
    bad = [d for d in datasets if d not in sweep.DATASETS]
    if bad:
        ap.error(f"unknown dataset(s) {bad}; known: {', '.join(sweep.DATASETS)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    runs = args.runs.with_name(args.runs.name + "_quick") if args.quick else args.runs
    records = []
    for ds in datasets:
        for defense in MODELS:  # none first: the others are judged against it
            print(f"== {ds} {defense}", flush=True)
            records.append(attack_run(ds, defense, runs, args.quick))
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "attacks", "quick": args.quick, "machine": sweep.machine(), "options": OPTIONS,
              "ka_aux": KA_AUX, "records": records}
    (args.out / f"attacks{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    parts = ["# Attacks on float and int8 features, and the verdict\n",
             f"Reproduce: `python benchmarks/attacks.py{' --quick' if args.quick else ''}`\n",
             f"Machine: {json.dumps(report['machine'])}. Models: trained by benchmarks/defenses.py with its budgets "
             "(below). Attack budgets: " + "; ".join(f"{n} {json.dumps(o)}" for n, o in OPTIONS.items()) +
             "; ka auxiliary data: " + "; ".join(f"{d}: {p.split('/')[-1]}" for d, p in KA_AUX.items()) +
             ". Means with 95% bootstrap intervals over the attacked test images; MI in nats.\n",
             "## Verdicts\n", verdicts(records) + "\n"]
    for ds in datasets:
        ds_records = [r for r in records if r["dataset"] == ds]
        row = json.loads((Path(ds_records[0]["run_dir"]) / "bench_row.json").read_text())
        parts += [f"## {ds}\n", sweep.budget_line(ds, [row]) + "\n", table(ds_records) + "\n"]
    parts += ["## Against the published numbers\n", published(records) + "\n"]
    (args.out / f"attacks{suffix}.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
