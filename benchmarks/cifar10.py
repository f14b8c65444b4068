"""CIFAR-10 at real accuracy: the undefended victim and the papers' defenses, attacked on float and int8.

    python benchmarks/cifar10.py                          # everything; resumes wherever it stopped
    python benchmarks/cifar10.py --only none              # one model
    python benchmarks/cifar10.py --stage train            # train only (the long part: run it in the background)
    nice -n 5 python benchmarks/cifar10.py > cifar10.log 2>&1 &

The victims are configured in benchmarks/configs/cifar10.yaml (ResNet-18 width 0.25, split after
layer1, 45,000 training images with shifts and flips, 30 epochs of SGD); each defense adds its
strength below. Every stage resumes: training from its last epoch, the attacks from their last
finished (attack, precision). Results: benchmarks/results/cifar10.{md,json}, with the budget
(width, epochs, hours of training and of attacks) beside every number.

Progress is kept in benchmarks/state/ (checkpoints and the evaluator; commit it at the end of a
sitting, so the next one resumes): `git add benchmarks/state`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a long run has done so far lives in the checkout (benchmarks/state/), so that a fresh machine
# resumes it: the training checkpoints and the auditor's evaluator (the cache, unless EDGEVEIL_CACHE is set).
STATE = REPO / "benchmarks" / "state"
os.environ.setdefault("EDGEVEIL_CACHE", str(STATE / "cache"))
CONFIG = REPO / "benchmarks" / "configs" / "cifar10.yaml"
# The seed defenses at the strengths the MNIST and CIFAR-10 benchmarks use (edgeveil list defenses).
MODELS = {"none": [], "infoscissors": ["defense.strength=0.3"], "siftfunnel": ["defense.strength=2.0"],
          "cem": ["defense.strength=8.0"]}
ATTACKS = ["attack.names=[inverse,rmle,pmc]", "attack.precisions=[float,int8]",
           "attack.options.rmle.batch_size=250"]
# InfoScissors (Duan et al.), Table: CIFAR-10, ResNet-18, 40 labels; clean / completion / from scratch (%).
INFOSCISSORS_TABLE = {"clean": 77.20, "completion": 69.31, "scratch": 15.34}


def config(name: str, runs: Path):
    from edgeveil.pipeline.config import load_config

    extra = [f"defense.name={name}", *MODELS[name], *ATTACKS]
    if name != "none":
        extra.append(f"attack.baseline={runs / 'none'}")
    return load_config(CONFIG, extra)


def stage(name: str, runs: Path, which: str) -> dict | None:
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.stages import export_stage, train_stage

    cfg, run_dir = config(name, runs), runs / name
    t0 = time.perf_counter()
    metrics = train_stage(cfg, run_dir, progress=True)
    if which == "train":
        return None
    manifest_path = run_dir / "export" / "manifest.json"
    manifest = (json.loads(manifest_path.read_text()) if manifest_path.is_file()
                else export_stage(cfg, run_dir, progress=True))
    attacks = attack_stage(cfg, run_dir, progress=True)
    info = json.loads((run_dir / "train" / "model.json").read_text())
    return {"model": name, "strength": info["defense"]["strength"], "run_dir": str(run_dir),
            "budget": {"arch": info["arch"], "width": info["width"], "split": info["split"],
                       "victim_train": info["data"]["splits"]["victim_train"]["size"],
                       "epochs": info["train"]["epochs_done"], "train_hours": info["train"]["seconds"] / 3600,
                       "attack_hours": sum(r.get("seconds", 0) for e in attacks["attacks"].values()
                                           for r in e.get("precisions", {}).values()) / 3600},
            "float_accuracy": metrics["float_test_accuracy"],
            "int8_accuracy": manifest["artifacts"]["int8"]["tail_accuracy"],
            "evaluator": attacks["evaluator"], "attacks": attacks["attacks"], "verdict": attacks["verdict"],
            "seconds_this_call": time.perf_counter() - t0}


def _mean(rec: dict, attack: str, prec: str, metric: str) -> float | None:
    s = rec["attacks"].get(attack, {}).get("precisions", {}).get(prec, {}).get("summary", {}).get(metric)
    return None if s is None else s["mean"]


def markdown(records: list[dict]) -> str:
    from edgeveil.cloud_sim.verdict import outcome_word

    lines = ["# CIFAR-10 at real accuracy", "",
             f"Config: `{CONFIG.relative_to(REPO)}`; attacks on the same 1,000 test images, float and int8 "
             "features. SSIM: interior, 11×11 Gaussian window (scikit-image's convention). Identified: the "
             "auditor's evaluator (trained on the other 9,000 test images) on the reconstructions.", "",
             "| model | budget | float acc | int8 acc | attack | features | SSIM | identified | completion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        b = r["budget"]
        budget = (f"{b['arch']} w{b['width']} split {b['split']}, {b['victim_train']} images × {b['epochs']} "
                  f"epochs, {b['train_hours']:.2f} h train, {b['attack_hours']:.2f} h attacks")
        for attack in r["attacks"]:
            for prec in ("float", "int8"):
                cells = [_mean(r, attack, prec, m) for m in ("ssim", "identification", "accuracy")]
                lines.append(f"| {r['model']} {r['strength']:g} | {budget} | {r['float_accuracy']:.4f} | "
                             f"{r['int8_accuracy']:.4f} | {attack} | {prec} | "
                             + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += ["", "## Verdicts", ""]
    lines += [f"- **{r['model']}**: {outcome_word(r['verdict'])}. {r['verdict']['headline']}" for r in records]
    none = next((r for r in records if r["model"] == "none"), None)
    if none is not None and "pmc" in none["attacks"]:
        ours = {k: _mean(none, "pmc", "float", m) for k, m in
                (("clean", "clean_accuracy"), ("completion", "accuracy"), ("scratch", "scratch_accuracy"))}
        lines += ["", "## InfoScissors' completion table (CIFAR-10, 40 labels), undefended", "",
                  "| | clean | completion (PMC) | from scratch |", "|---|---|---|---|",
                  "| InfoScissors (published, %) | " + " | ".join(f"{v:.2f}" for v in INFOSCISSORS_TABLE.values()) + " |",
                  "| ours, float features (%) | " + " | ".join("-" if v is None else f"{100 * v:.2f}"
                                                              for v in ours.values()) + " |"]
        if None not in ours.values():
            lines.append("| gap (points) | " + " | ".join(f"{100 * ours[k] - INFOSCISSORS_TABLE[k]:+.2f}"
                                                        for k in INFOSCISSORS_TABLE) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=STATE / "cifar10",
                    help="run directories (default benchmarks/state/cifar10: committed between sessions, so "
                         "training resumes on a fresh machine)")
    ap.add_argument("--only", help=f"comma-separated, among {', '.join(MODELS)}")
    ap.add_argument("--stage", choices=["train", "all"], default="all")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"--only takes {', '.join(MODELS)}, got {', '.join(unknown)}")
    if "none" not in names and args.stage == "all" and not (args.runs / "none" / "cloud" / "attacks.json").is_file():
        names.insert(0, "none")  # the baseline every defended model is judged against
    records = [r for r in (stage(n, args.runs, args.stage) for n in names) if r is not None]
    if records:
        from edgeveil.device.files import atomic_write_json, atomic_write_text

        atomic_write_json(args.out / "cifar10.json", records, indent=1, default=str)
        atomic_write_text(args.out / "cifar10.md", markdown(records))
        print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
