"""Which defenses should `edgeveil demo` show? Measure candidates on the demo's own data and budget.

    python benchmarks/demo_candidates.py --runs /tmp/demo_candidates [--attacks inverse,rmle]

Each candidate is trained, exported (int8) and attacked on float and int8 features exactly as the
demo does (without the device benchmark and the HTTP stream), then judged against the undefended
run. Prints one row per candidate: float/int8 accuracy, SSIM and identification per attack and
precision, the verdict's outcome; writes benchmarks/results/demo_candidates.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [("none", 0.0, []), ("dropout", 0.5, []), ("dropout", 0.8, []), ("nopeek", 1.0, []),
              ("siftfunnel", 2.0, []), ("noise", 0.5, []), ("noise", 0.05, []), ("noise", 0.02, []),
              ("noise", 1.5, []), ("noise", 3.0, []), ("noise", 0.005, []),
              # learned defenses: a float-only protection would show as "does not survive"
              ("mid", 1.0, []), ("adversarial", 0.3, []), ("cem", 8.0, []), ("cem", 16.0, []),
              ("infoscissors", 0.3, []), ("infoscissors", 0.8, []), ("nopeek", 4.0, [])]


def run(name: str, strength: float, extra: list[str], runs: Path, attacks: list[str], base_overrides: list[str]):
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage, train_stage

    run_dir = runs / f"{name}_{strength:g}"
    overrides = [*base_overrides, f"defense.name={name}", f"defense.strength={strength}", *extra,
                 "export.precisions=[int8]", "attack.precisions=[float,int8]",
                 f"attack.names=[{','.join(attacks)}]"]
    if name != "none":
        overrides.append(f"attack.baseline={runs / 'none_0'}")
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    metrics = train_stage(cfg, run_dir, progress=False)
    manifest = export_stage(cfg, run_dir, progress=False)
    out = attack_stage(cfg, run_dir, progress=False)
    row = {"defense": name, "strength": strength, "float_accuracy": metrics["float_test_accuracy"],
           "int8_accuracy": manifest["artifacts"]["int8"]["tail_accuracy"],
           "noise_after_rounding": manifest["artifacts"]["int8"].get("noise_after_rounding"),
           "seconds": round(time.perf_counter() - t0, 1), "outcome": out["verdict"]["outcome"],
           "headline": out["verdict"]["headline"], "scores": {}}
    for a, e in out["attacks"].items():
        for p, r in e.get("precisions", {}).items():
            row["scores"][f"{a}/{p}"] = {m: round(r["summary"][m]["mean"], 4) for m in ("ssim", "identification")
                                         if m in r["summary"]}
    return row


def main(argv=None) -> int:
    from edgeveil.device.files import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("/tmp/demo_candidates"))
    ap.add_argument("--attacks", default="inverse,rmle")
    ap.add_argument("--only", help="comma-separated NAME_STRENGTH, e.g. noise_1.5,noise_3")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    rows = []
    for name, strength, extra in CANDIDATES:
        if args.only and name != "none" and f"{name}_{strength:g}" not in args.only.split(","):
            continue
        row = run(name, strength, extra, args.runs, args.attacks.split(","), args.overrides)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("defense", "strength", "float_accuracy", "int8_accuracy",
                                              "outcome", "scores", "seconds")}), flush=True)
    out = REPO / "benchmarks" / "results" / "demo_candidates.json"
    # rows measured before (other --only selections) are kept unless measured again here
    done = {(r["defense"], r["strength"]) for r in rows}
    kept = [r for r in (json.loads(out.read_text())["rows"] if out.is_file() else [])
            if (r["defense"], r["strength"]) not in done]
    atomic_write_json(out, {"argv": sys.argv[1:], "rows": kept + rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
