"""The verdict: does privacy survive compression?

Two questions per attack and leakage metric (higher = more leakage: SSIM, PSNR, completion
accuracy; MSE is reported elsewhere, not judged twice):

* compression: is leakage on the int8 (or fp16) features worse than on the float features of
  the same images? d = mean(int8 - float), paired per image, with a 95% bootstrap interval.
  holds when the interval's upper end is within the tolerance; fails when the mean difference is
  beyond it; uncertain otherwise (the interval reaches past the tolerance but the mean does not).
* defense: does the defense still beat no defense at the same precision? d = defended -
  undefended (paired when both runs attacked the same test images, else independent samples).
  holds when the whole interval is below minus the tolerance: an improvement smaller than what
  compression is allowed to cost is not counted as protection; fails otherwise.

Privacy survives compression when no compression check fails and, at every compressed
precision, the defense beats no defense. Without an undefended baseline only the first question
is answered, and the verdict says so. Runtime noise below one quantization step is flagged: the
rounding on the device erases it, which a float-only evaluation cannot see.

Diagnostics (MINE's mutual information) get the same two differences, under "diagnostics", and
are never judged: their interval is over held-out batches of one trained critic, while the
critic's own training (unconverged within a budget) moves the estimate by more than that.

    verdict(attacks_json, tolerance, baseline=None) -> {"survives", "headline", "checks", "flags", ...}
"""
from __future__ import annotations

import numpy as np

from . import metrics

__all__ = ["DIAGNOSTIC_METRICS", "LEAKAGE_METRICS", "DEFAULT_TOLERANCE", "verdict"]

# metric -> (tolerance key, label, format)
LEAKAGE_METRICS = {"ssim": ("ssim", "SSIM", "+.4f"), "psnr": ("psnr", "PSNR (dB)", "+.2f"),
                   "accuracy": ("accuracy", "completion accuracy", "+.4f")}
DIAGNOSTIC_METRICS = {"mi": ("mi", "MI (nats)", "+.4f")}
DEFAULT_TOLERANCE = {"ssim": 0.02, "psnr": 0.5, "accuracy": 0.02}


def verdict(attacks: dict, tolerance: dict | None = None, baseline: dict | None = None,
            defense: str | None = None) -> dict:
    """Judge one run's attacks.json (and, if given, its undefended baseline's attacks.json)."""
    # Only judged metrics have a tolerance ("mi" in configs from before MI became a diagnostic is dropped).
    tol = {k: v for k, v in {**DEFAULT_TOLERANCE, **(tolerance or {})}.items() if k in DEFAULT_TOLERANCE}
    same_targets = baseline is not None and _indices(attacks) is not None and _indices(attacks) == _indices(baseline)
    checks, diagnostics = [], []
    for name, entry in attacks["attacks"].items():
        for metric in _metrics(entry):
            diagnostic = metric in DIAGNOSTIC_METRICS
            found = _compression(name, entry, metric, tol)
            if baseline is not None and defense not in (None, "none"):
                base = baseline["attacks"].get(name)
                found += (_defense(name, entry, base, metric, same_targets, tol) if base is not None
                          else [] if diagnostic else [_missing(name, metric)])
            if diagnostic:
                for c in found:
                    c.update(outcome="not judged", tolerance=None)
            (diagnostics if diagnostic else checks).extend(found)
    flags = _flags(attacks)
    out = {"schema": "edgeveil.verdict/1", "defense": defense, "tolerance": tol,
           "baseline": baseline is not None, "paired_with_baseline": same_targets, "checks": checks,
           "diagnostics": diagnostics, "flags": flags}
    out.update(_headline(checks, flags, defense, baseline is not None))
    return out


def _indices(attacks: dict):
    return attacks.get("targets", {}).get("indices")


def _metrics(entry: dict) -> list[str]:
    found = {m for rec in entry["precisions"].values() for m in rec["summary"]}
    return [m for m in (*LEAKAGE_METRICS, *DIAGNOSTIC_METRICS) if m in found]


def _compression(name: str, entry: dict, metric: str, tol: dict) -> list[dict]:
    t = tol.get(metric, 0.0)
    out = []
    for prec, rec in entry["precisions"].items():
        if prec == "float" or "float" not in entry["precisions"]:
            continue
        d = _paired_or_means(entry["precisions"]["float"], rec, metric)
        if d is None:
            continue
        mean, lo, hi = d
        outcome = "holds" if hi <= t else "fails" if mean > t else "uncertain"
        out.append({"attack": name, "metric": metric, "kind": "compression", "precision": prec,
                    "difference": {"mean": mean, "ci95": [lo, hi], "of": f"{prec} - float"},
                    "tolerance": t, "outcome": outcome})
    return out


def _defense(name: str, entry: dict, base: dict, metric: str, paired: bool, tol: dict) -> list[dict]:
    t = tol.get(metric, 0.0)
    out = []
    for prec, rec in entry["precisions"].items():
        other = base["precisions"].get(prec)
        if other is None or metric not in rec["summary"] or metric not in other["summary"]:
            continue
        a, b = rec.get("per_image", {}).get(metric), other.get("per_image", {}).get(metric)
        if a and b:
            mean, lo, hi = (metrics.paired_bootstrap_diff(a, b) if paired and len(a) == len(b)
                            else metrics.bootstrap_diff(a, b))
        else:
            mean, lo, hi = _from_summaries(rec["summary"][metric], other["summary"][metric])
        out.append({"attack": name, "metric": metric, "kind": "defense", "precision": prec,
                    "difference": {"mean": mean, "ci95": [lo, hi], "of": "defended - undefended"},
                    "defended": rec["summary"][metric]["mean"], "undefended": other["summary"][metric]["mean"],
                    "tolerance": t, "outcome": "holds" if hi < -t else "fails"})
    return out


def _missing(name: str, metric: str) -> dict:
    return {"attack": name, "metric": metric, "kind": "defense", "precision": None, "difference": None,
            "outcome": "no baseline", "note": f"the undefended baseline did not run {name}"}


def _paired_or_means(a: dict, b: dict, metric: str):
    """(mean, lo, hi) of b - a: paired per image when both have them, else from the two summaries."""
    va, vb = a.get("per_image", {}).get(metric), b.get("per_image", {}).get(metric)
    if va and vb and len(va) == len(vb):
        return metrics.paired_bootstrap_diff(np.asarray(vb), np.asarray(va))
    if metric in a["summary"] and metric in b["summary"]:
        return _from_summaries(b["summary"][metric], a["summary"][metric])
    return None


def _from_summaries(a: dict, b: dict) -> tuple[float, float, float]:
    """mean(a) - mean(b) with an interval from the two independent 95% intervals (normal approximation)."""
    half = np.hypot((a["ci95"][1] - a["ci95"][0]) / 2, (b["ci95"][1] - b["ci95"][0]) / 2)
    d = a["mean"] - b["mean"]
    return float(d), float(d - half), float(d + half)


def _flags(attacks: dict) -> list[str]:
    flags = []
    noise, rounding = attacks.get("inference_noise"), attacks.get("noise_after_rounding")
    if noise and rounding and rounding.get("below_one_step"):
        flags.append(f"runtime noise erased by rounding: sigma {noise.get('sigma'):.4g} is "
                     f"{rounding['sigma_steps']:.2f} int8 output steps, so only {100 * rounding['changed_fraction']:.1f}% "
                     f"of the codes change and the effective noise is {100 * rounding['effective_ratio']:.0f}% of "
                     "nominal: a float evaluation overstates this defense")
    return flags


def _headline(checks: list[dict], flags: list[str], defense: str | None, has_baseline: bool) -> dict:
    comp = [c for c in checks if c["kind"] == "compression"]
    dfn = [c for c in checks if c["kind"] == "defense" and c["precision"] is not None]
    comp_failed = [c for c in comp if c["outcome"] == "fails"]
    compressed_def = [c for c in dfn if c["precision"] != "float"]
    def_failed = [c for c in compressed_def if c["outcome"] == "fails"]
    float_claimed = [c for c in dfn if c["precision"] == "float" and c["outcome"] == "holds"]
    lines = []
    if defense in (None, "none"):
        survives = None
        lines.append("No defense: this run measures how much the features leak, and whether int8 changes that.")
    elif not has_baseline:
        survives = None
        lines.append("No undefended baseline was given (attack.baseline): whether the defense beats no defense "
                     "is not judged, only whether compression made leakage worse.")
    else:
        survives = not comp_failed and not def_failed and bool(compressed_def)
        float_def = [c for c in dfn if c["precision"] == "float"]
        if survives:
            lines.append(f"Privacy survives compression: on the compressed features the device sent, `{defense}` "
                         "still beats no defense under every attack, and no attack leaks more than on float "
                         "features beyond the tolerance.")
        elif float_def and not float_claimed:
            lines.append(f"Privacy does NOT survive compression for `{defense}`, and it did not hold before "
                         "compression either: on float features too, the defense does not beat no defense by "
                         "more than the tolerance.")
        else:
            lines.append(f"Privacy does NOT survive compression for `{defense}`.")
    for c in def_failed:
        claimed = any(f["attack"] == c["attack"] and f["metric"] == c["metric"] for f in float_claimed)
        lines.append(f"{c['attack']} {LEAKAGE_METRICS[c['metric']][1]} on {c['precision']} features: defended "
                     f"{c['defended']:.4f} against undefended {c['undefended']:.4f}, not lower by more than "
                     f"the tolerance {c['tolerance']:g}"
                     + (" — although on float features the defense did beat no defense." if claimed else "."))
    for c in comp_failed:
        d = c["difference"]
        lines.append(f"{c['attack']} {LEAKAGE_METRICS[c['metric']][1]}: {c['precision']} leaks more than float by "
                     f"{d['mean']:{LEAKAGE_METRICS[c['metric']][2]}} (95% CI {d['ci95'][0]:+.4f} to "
                     f"{d['ci95'][1]:+.4f}), beyond the tolerance {c['tolerance']}.")
    if defense in (None, "none") or not has_baseline:
        held = sum(c["outcome"] == "holds" for c in comp)
        lines.append(f"Compression checks: {held} of {len(comp)} hold, {len(comp_failed)} fail, "
                     f"{len(comp) - held - len(comp_failed)} uncertain.")
    lines += [f"Warning: {f}." for f in flags]
    return {"survives": survives, "headline": " ".join(lines)}
