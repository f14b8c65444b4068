"""Do the attacks' default budgets prove their power on an undefended model? Interior SSIM and
identification of `inverse` and `rmle` at their default options, against the evaluator on the originals.

    python benchmarks/power.py --run RUN_DIR --label mnist     # RUN_DIR: a trained, exported `none` run

The run's train/ is copied into --work (the run itself is not touched) and exported there, its
attack options reset to the defaults, and the attacks run on float and int8 features. A rerun resumes:
finished (attack, precision) pairs are read back. Results: benchmarks/results/power_<label>.{md,json}.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a trained and exported undefended run directory")
    ap.add_argument("--label", required=True, help="names the results file, e.g. mnist")
    ap.add_argument("--attacks", default="inverse,rmle")
    ap.add_argument("--work", type=Path, help="where the copy is attacked (default: RUN_DIR.power)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from edgeveil.device.files import atomic_write_json, atomic_write_text, read_json
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.config import from_dict
    from edgeveil.export.targets import current_manifest
    from edgeveil.pipeline.stages import export_stage, read_run_config

    names = args.attacks.split(",")
    work = args.work or args.run.with_name(args.run.name + ".power")
    if not (work / "train").is_dir():
        shutil.copytree(args.run / "train", work / "train")
    shutil.copy(args.run / "config.yaml", work / "config.yaml")
    run_cfg = read_run_config(work)
    if current_manifest(work, run_cfg.export.precisions, run_cfg.export.calibration_samples,
                        run_cfg.export.clamp_outliers) is None:
        export_stage(run_cfg, work, progress=True)  # exported here, by this version of edgeveil
    cfg = run_cfg.to_dict()
    if cfg["defense"]["name"] != "none":
        ap.error(f"--run must be an undefended run (defense none), got {cfg['defense']['name']}")
    cfg["attack"].update(names=names, options={}, precisions=["float", "int8"], baseline=None)
    t0 = time.perf_counter()
    out = attack_stage(from_dict(cfg), work, progress=True)
    info, metrics = read_json(work / "train" / "model.json"), read_json(work / "train" / "metrics.json")
    ev = out["evaluator"]
    on_originals = ev["on_originals"]["identification"]["mean"]
    power = out["verdict"].get("power", {})
    rows = []
    for name in names:
        entry = out["attacks"][name]
        for prec, r in entry.get("precisions", {}).items():
            s = r["summary"]
            ident = s.get("identification", {}).get("mean")
            rows.append({"attack": name, "features": prec, "ssim": s["ssim"]["mean"], "psnr": s["psnr"]["mean"],
                         "identification": ident, "share_of_originals": None if ident is None else ident / on_originals,
                         "options": entry["options"]})
    budget = (f"{info['arch']} width {info['width']} split {info['split']}, "
              f"{info['data']['splits']['victim_train']['size']} training images × {info['train']['epochs_done']} epochs, "
              f"float test accuracy {metrics['float_test_accuracy']:.4f}; {out['targets']['n']} targets, "
              f"{out['aux']['n']} attacker auxiliary images; evaluator trained on {ev['trained_on']} images")
    lines = [f"# Attack power at the default budgets: {args.label}", "",
             f"Reproduce: `python benchmarks/power.py --run RUN --label {args.label}` (RUN: the `none` run of "
             "benchmarks/defenses.py). The attacks at their default options, on the undefended model.", "",
             f"Victim: {budget}. The evaluator identifies {on_originals:.3f} of the original targets; an attack "
             f"proves its power when it identifies at least {cfg['attack']['power']:.0%} of that.", "",
             "| attack | features | options | interior SSIM | PSNR | identified | share of the evaluator on originals | power |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k} {v}" for k, v in r["options"].items() if k in ("epochs", "restarts", "width", "depth",
                                                                            "steps", "batch_size", "lr"))
        proven = r["share_of_originals"] is not None and r["share_of_originals"] >= cfg["attack"]["power"]
        lines.append(f"| {r['attack']} | {r['features']} | {opts} | {r['ssim']:.3f} | {r['psnr']:.1f} dB | "
                     + ("-" if r["identification"] is None else f"{r['identification']:.3f}")
                     + " | " + ("-" if r["share_of_originals"] is None else f"{r['share_of_originals']:.0%}")
                     + f" | {'proven' if proven else 'too weak to certify'} |")
    lines += ["", f"Attack time this call: {(time.perf_counter() - t0) / 60:.1f} min (finished pairs are read back)."]
    atomic_write_json(args.out / f"power_{args.label}.json", {"budget": budget, "evaluator": ev, "rows": rows,
                                                             "verdict_power": power})
    atomic_write_text(args.out / f"power_{args.label}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
