"""The verdict: does privacy survive compression?

Judged metrics (higher = more leakage): SSIM (interior; on colour images over RGB and on luminance),
PSNR, identification (the auditor's evaluator on the reconstructions; top-5 too with 20 classes or
more) and completion accuracy. MSE is reported elsewhere, not judged twice; MINE's MI is a diagnostic
(see below).

Attack power. A failed attack looks like privacy, so an attack certifies a defense at a precision
only after it has shown, on the undefended baseline at that precision, that it works:
* a reconstruction attack: the evaluator identifies at least `power` (default 0.8) of what it
  identifies on the originals;
* a completion attack: its accuracy from few labels reaches `power` of the clean accuracy.
An attack below that is "too weak to certify": its figures are reported, its checks are not counted.
A compression check (int8 - float) needs the attack proven at both precisions: one that fails on float
features and does better on int8 shows its own failure, since int8 features are a function of the
float ones (up to runtime noise that rounding erases).

Two questions per attack, metric and precision:
* compression: does the int8 (or fp16) artifact leak more than the float head on the same images?
  d = mean(int8 - float), paired per image, 95% bootstrap interval. holds when the interval's upper
  end is within the tolerance; fails when its lower end is beyond it (a mean past the tolerance with
  an interval reaching back to it is noise, not evidence: it cannot decide "does not survive");
  uncertain otherwise. A failure must replicate: the attack stage runs the attack again with another
  seed on both precisions (the entry's `replicate`), and a failure that does not fail again is
  uncertain: the bootstrap covers the images, not the attack's own variance.
* defense: does the defense beat no defense at this precision? d = defended - undefended (paired
  when both runs attacked the same images). holds when the whole interval is below minus the
  tolerance; fails otherwise. Binding for SSIM (RGB and luminance: a defense that only shifts colours
  keeps the outlines a person reads) and completion accuracy (DEFENSE_METRICS); PSNR and
  identification are reported beside them: the evaluator names the task's own classes, which the
  server is meant to learn, so no useful defense lowers it (it still proves attack power and is
  judged for compression).

The outcome (a decision, stated before any prose):
* survives: no compression check fails, and at every compressed precision the defense beats no
  defense under every attack that proved its power (and it did in float too);
* does not survive: the defense protected in float against an attack that proved its power, and
  compression took that away (a compressed defense check failed, or a compression check failed);
* never protected: the defense did not beat no defense even in float, and compression took nothing
  away that float had;
* inconclusive: no undefended baseline, or no attack proved its power; `missing` says what.
A run without a defense gets the outcome "baseline": it measures leakage and attack power.

Diagnostics (MINE's mutual information) get the same two differences, under "diagnostics", never
judged: their interval covers held-out batches of one critic, not the critic's own training.

    verdict(attacks_json, tolerance, baseline=None, defense=None, power=0.8) -> {"outcome", "headline", ...}

Inside, the decision and its prose are apart: `decide(...)` computes a `Decision` (the outcome,
the checks that decided it, what is missing, the evidence), and `headline(decision)` writes every
sentence from that alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import metrics

__all__ = ["DEFENSE_METRICS", "DIAGNOSTIC_METRICS", "LEAKAGE_METRICS", "DEFAULT_TOLERANCE", "DEFAULT_POWER", "OUTCOMES",
           "Decision", "attack_power", "decide", "failing_compression", "headline", "outcome_word", "verdict"]

# metric -> (tolerance key, label, format)
LEAKAGE_METRICS = {"ssim": ("ssim", "SSIM", "+.4f"), "ssim_luma": ("ssim", "luminance SSIM", "+.4f"),
                   "psnr": ("psnr", "PSNR (dB)", "+.2f"),
                   "identification": ("identification", "identification accuracy", "+.4f"),
                   "identification_top5": ("identification", "top-5 identification accuracy", "+.4f"),
                   "accuracy": ("accuracy", "completion accuracy", "+.4f")}
DIAGNOSTIC_METRICS = {"mi": ("mi", "MI (nats)", "+.4f")}
# What a defense must cut to beat no defense: the pixels (SSIM) of a reconstruction, over RGB and on
# luminance (false colours alone must not pass for privacy), the accuracy of a completion.
# Identification of the task's own class is what the tail computes from the features by design, so a
# useful defense cannot lower it; its defense checks are reported, not binding.
DEFENSE_METRICS = ("ssim", "ssim_luma", "accuracy")
DEFAULT_TOLERANCE = {"ssim": 0.02, "psnr": 0.5, "identification": 0.02, "accuracy": 0.02}
DEFAULT_POWER = 0.8
OUTCOMES = {"survives": "survives", "does not survive": "does NOT survive", "never protected": "never protected",
            "inconclusive": "inconclusive", "baseline": "baseline (no defense)"}


def outcome_word(v: dict | None) -> str:
    """The outcome as the reports print it ("-" when there is no verdict)."""
    return "-" if not v else OUTCOMES.get(v.get("outcome"), "not judged")


def verdict(attacks: dict, tolerance: dict | None = None, baseline: dict | None = None,
            defense: str | None = None, power: float = DEFAULT_POWER) -> dict:
    """Judge one run's attacks.json (and, if given, its undefended baseline's attacks.json)."""
    tol = {k: v for k, v in {**DEFAULT_TOLERANCE, **(tolerance or {})}.items() if k in DEFAULT_TOLERANCE}
    undefended = defense in (None, "none")
    reference = attacks if undefended else baseline
    powers = attack_power(reference, power) if reference is not None else {}
    same_targets = baseline is not None and _indices(attacks) is not None and _indices(attacks) == _indices(baseline)
    checks, diagnostics = _all_checks(attacks, None if undefended else baseline, powers, same_targets, tol)
    decision = decide(checks, powers, defense, baseline is not None, attacks, power)
    return {"schema": "edgeveil.verdict/2", "defense": defense, "tolerance": tol,
            "power": {"threshold": power, "by_attack": powers,
                      "judged_on": "this run" if undefended else "the undefended baseline" if baseline else None},
            "baseline": baseline is not None, "paired_with_baseline": same_targets, **decision.to_json(),
            "checks": checks, "diagnostics": diagnostics, "flags": decision.flags,
            "survives": _SURVIVES.get(decision.outcome), "headline": headline(decision)}


_SURVIVES = {"survives": True, "does not survive": False, "never protected": False}


def _all_checks(attacks: dict, baseline: dict | None, powers: dict, same_targets: bool,
                tol: dict) -> tuple[list[dict], list[dict]]:
    """(judged checks, diagnostic ones) of every attack and metric; defense checks only given a baseline
    (None for an undefended run). Each check says whether its attack proved its power there."""
    checks, diagnostics = [], []
    for name, entry in attacks["attacks"].items():
        for metric in _metrics(entry):
            diagnostic = metric in DIAGNOSTIC_METRICS
            found = _compression(name, entry, metric, tol)
            for c in found:
                if c["outcome"] == "fails":
                    _second_seed(c, entry, metric)
            if baseline is not None:
                base = baseline["attacks"].get(name)
                found += (_defense(name, entry, base, metric, same_targets, tol) if base and base.get("precisions")
                          else [] if diagnostic else [_missing(name, metric)])
            proven = {p: bool(by.get("proven")) for p, by in powers.get(name, {}).items()}
            for c in found:
                if diagnostic:
                    c.update(outcome="not judged", tolerance=None)
                # int8 - float is evidence only where the attack worked on both sides: an attack too weak
                # on float features and doing better on int8 shows its own failure, not a leak
                c["certifies"] = proven.get(c["precision"], False) and (c["kind"] != "compression"
                                                                        or proven.get("float", False))
            (diagnostics if diagnostic else checks).extend(found)
    return checks, diagnostics


# ---------------------------------------------------------------- attack power


def attack_power(reference: dict, threshold: float = DEFAULT_POWER) -> dict:
    """attack -> precision -> {"measure", "value", "reference", "ratio", "proven"} on the undefended run.

    Reconstruction attacks: identification on reconstructions against the evaluator on originals.
    Completion attacks: completion accuracy against clean accuracy. Others (MI) have no power test.
    """
    on_originals = ((reference.get("evaluator") or {}).get("on_originals") or {}).get("identification", {})
    out = {}
    for name, entry in reference["attacks"].items():
        for prec, rec in entry.get("precisions", {}).items():
            s = rec.get("summary", {})
            if "identification" in s and on_originals:
                value, ref, measure = s["identification"]["mean"], on_originals["mean"], "identification"
            elif "accuracy" in s and "clean_accuracy" in s:
                value, ref, measure = s["accuracy"]["mean"], s["clean_accuracy"]["mean"], "completion"
            elif "ssim" in s:  # a reconstruction attack but no evaluator: power cannot be shown
                out.setdefault(name, {})[prec] = {"measure": "identification", "proven": False,
                                                  "reason": "no evaluator: identification was not scored"}
                continue
            else:
                continue
            ratio = value / ref if ref > 0 else 0.0
            out.setdefault(name, {})[prec] = {"measure": measure, "value": value, "reference": ref,
                                              "ratio": ratio, "proven": bool(ratio >= threshold)}
    return out


# ---------------------------------------------------------------- checks


def _indices(attacks: dict):
    return attacks.get("targets", {}).get("indices")


def _metrics(entry: dict) -> list[str]:
    found = {m for rec in entry.get("precisions", {}).values() for m in rec["summary"]}
    return [m for m in (*LEAKAGE_METRICS, *DIAGNOSTIC_METRICS) if m in found]


def _tolerance(metric: str, tol: dict) -> float:
    key = (LEAKAGE_METRICS.get(metric) or DIAGNOSTIC_METRICS.get(metric))[0]
    return tol.get(key, 0.0)


def _compression(name: str, entry: dict, metric: str, tol: dict) -> list[dict]:
    t = _tolerance(metric, tol)
    out = []
    for prec, rec in entry["precisions"].items():
        if prec == "float" or "float" not in entry["precisions"]:
            continue
        d = _paired_or_means(entry["precisions"]["float"], rec, metric)
        if d is None:
            continue
        out.append({"attack": name, "metric": metric, "kind": "compression", "precision": prec,
                    "difference": _difference(d, f"{prec} - float"), "tolerance": t, "outcome": _outcome_of(d, t)})
    return out


def _outcome_of(d: tuple[float, float, float], t: float) -> str:
    return "holds" if d[2] <= t else "fails" if d[1] > t else "uncertain"


def _difference(d: tuple[float, float, float], of: str) -> dict:
    return {"mean": d[0], "ci95": [d[1], d[2]], "of": of}


def _second_seed(check: dict, entry: dict, metric: str) -> None:
    """A failing compression check counts only when it replicates: the same attack, run again with
    another seed on float and on the compressed features, must fail it too. A learned or optimised
    attack's result varies with its seed, and the bootstrap over images does not see that (MNIST rmle
    at 300 steps: float SSIM 0.926, int8 0.941, on features int8 rounds from the float ones)."""
    replicate = entry.get("replicate") or {}
    runs = replicate.get("precisions", {})
    if "float" not in runs or check["precision"] not in runs:
        return
    d = _paired_or_means(runs["float"], runs[check["precision"]], metric)
    if d is None:
        return
    again = _outcome_of(d, check["tolerance"])
    check["replicate"] = {"seed": replicate["seed"], "difference": _difference(d, check["difference"]["of"]),
                          "outcome": again}
    if _same_per_image(runs, entry["precisions"], metric):
        check["replicate"]["outcome"] = "same"
        check["note"] = (f"attack seed {replicate['seed']} reproduces every image exactly: at these options the "
                         "attack does not depend on its seed, so the gap is how it behaves, not its luck")
    elif again != "fails":
        check["outcome"] = "uncertain"
        check["note"] = (f"did not replicate: with attack seed {replicate['seed']} the difference is "
                         f"{d[0]:+.4g} (95% CI {d[1]:+.4g} to {d[2]:+.4g}), so the gap is the attack's variance")


def _same_per_image(runs: dict, first: dict, metric: str) -> bool:
    """True when the second seed's per-image scores equal the first run's at every precision it ran."""
    def values(rec):
        return rec.get("per_image", {}).get(metric)
    return all(values(rec) is not None and values(rec) == values(first.get(prec, {})) for prec, rec in runs.items())


def failing_compression(entry: dict, tolerance: dict | None = None) -> list[str]:
    """The compressed precisions where this attack entry fails a compression check of a judged metric:
    the ones to run again with another attack seed before the check may count."""
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    return sorted({c["precision"] for m in _metrics(entry) if m in LEAKAGE_METRICS
                   for c in _compression("", entry, m, tol) if c["outcome"] == "fails"})


def _defense(name: str, entry: dict, base: dict, metric: str, paired: bool, tol: dict) -> list[dict]:
    t = _tolerance(metric, tol)
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
                    "tolerance": t, "outcome": "holds" if hi < -t else "fails",
                    "binding": metric in DEFENSE_METRICS})
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


# ---------------------------------------------------------------- the decision


@dataclass
class Decision:
    """What the verdict decided and on what: the only input the prose (`headline`) reads.

    outcome: one of OUTCOMES. decided_by: the checks that settled it (attack, metric, precision,
    the difference and its interval); empty for "baseline" and "inconclusive", where `missing` says
    what would have settled it. evidence: the check lists behind the outcome. weak: attacks too weak
    to certify at some precision, with their figures in weak_power (attack -> precision -> figures)
    against `threshold`. compression: how many compression checks hold, fail, are uncertain.
    """
    outcome: str
    defense: str | None
    missing: list[str]
    weak: list[str]
    errors: list[str]
    skipped: list[str]
    evidence: dict
    decided_by: list[dict]
    compression: dict
    weak_power: dict
    threshold: float
    flags: list[str]

    def to_json(self) -> dict:
        """The fields the verdict stores beside its checks (in attacks.json's `verdict`)."""
        return {"outcome": self.outcome, "missing": self.missing, "weak": self.weak, "errors": self.errors,
                "skipped": self.skipped, "evidence": self.evidence, "decided_by": self.decided_by,
                "compression": self.compression}


def decide(checks: list[dict], powers: dict, defense: str | None, has_baseline: bool, attacks: dict,
           threshold: float = DEFAULT_POWER) -> Decision:
    """The decision (module docstring) from the checks and attack power, before any prose."""
    weak = sorted({n for n, by in powers.items() for p in by.values() if not p["proven"]})
    at_float, compressed = _certified(checks)
    evidence = _evidence(checks, powers, at_float, compressed)
    outcome, missing, decided_by = _outcome(evidence, at_float, compressed, weak, defense, has_baseline)
    comp = [c["outcome"] for c in checks if c["kind"] == "compression"]
    unreplicated = sum(1 for c in checks if c["kind"] == "compression" and c.get("replicate")
                       and c["replicate"]["outcome"] not in ("fails", "same"))
    return Decision(outcome=outcome, defense=defense, missing=missing, weak=weak,
                    errors=_attack_notes(attacks, "error"), skipped=_attack_notes(attacks, "skipped"),
                    evidence=evidence, decided_by=[_reference(c) for c in decided_by],
                    compression={**{o: comp.count(o) for o in ("holds", "fails", "uncertain")},
                                 "not_replicated": unreplicated},
                    weak_power={n: by for n, by in powers.items() if n in weak}, threshold=threshold,
                    flags=_flags(attacks))


def _attack_notes(attacks: dict, key: str) -> list[str]:
    """'name: why' for every attack whose entry carries `key` ("error" or "skipped")."""
    return [f"{n}: {e[key]}" for n, e in attacks["attacks"].items() if e.get(key)]


def _certified(checks: list[dict]) -> tuple[list[dict], list[dict]]:
    """(at float, at compressed precisions): the binding defense checks of an attack that proved its
    power at that precision, the only ones that can certify a defense."""
    certified = [c for c in checks if c["kind"] == "defense" and c["precision"] is not None and c["certifies"]
                 and c.get("binding", True)]
    return [c for c in certified if c["precision"] == "float"], [c for c in certified if c["precision"] != "float"]


def _evidence(checks: list[dict], powers: dict, at_float: list[dict], compressed: list[dict]) -> dict:
    """The check lists the outcome is decided on; lost: compressed checks that fail where float held."""
    held_float = {(c["attack"], c["metric"]) for c in at_float if c["outcome"] == "holds"}
    # A compression check counts only for an attack that proved its power: int8 features are (up to the
    # runtime noise rounding erases) a function of the float ones, so a weak attack doing better on int8
    # says the attack failed in float, not that int8 leaks more (pmc on CIFAR-10 siftfunnel: 0.162
    # float, below training from scratch, against 0.314 int8).
    return {"compression_failed": [c for c in checks if c["kind"] == "compression" and c["outcome"] == "fails"
                                   and c["certifies"]],
            "lost": [c for c in compressed if c["outcome"] == "fails" and (c["attack"], c["metric"]) in held_float],
            "float_failed": [c for c in at_float if c["outcome"] == "fails"],
            "compressed_failed": [c for c in compressed if c["outcome"] == "fails"],
            "certified": len(at_float) + len(compressed),
            "proven": sorted({n for n, by in powers.items() if any(p["proven"] for p in by.values())})}


def _outcome(ev: dict, at_float: list[dict], compressed: list[dict], weak: list[str], defense: str | None,
             has_baseline: bool) -> tuple[str, list[str], list[dict]]:
    """(outcome, what is missing, the checks that decided it)."""
    if defense in (None, "none"):
        return "baseline", [], []
    if not has_baseline:
        return "inconclusive", ["an undefended baseline trained the same way (attack.baseline)"], []
    if not ev["certified"]:
        return "inconclusive", [_MISSING_POWER.format(", ".join(weak)) if weak else _MISSING_POWER_TEST], []
    if not compressed:
        return "inconclusive", ["a compressed precision attacked by an attack that proved its power"], []
    protected_float = bool(at_float) and all(c["outcome"] == "holds" for c in at_float)
    if protected_float and not ev["compression_failed"] and not ev["compressed_failed"]:
        return "survives", [], compressed
    if ev["lost"] or (protected_float and ev["compression_failed"]):
        return "does not survive", [], ev["lost"] + ev["compression_failed"]
    if not at_float:
        return "inconclusive", ["an attack that proves its power on float features of the baseline"], []
    return "never protected", [], ev["float_failed"]


_MISSING_POWER = "an attack that proves its power on the undefended baseline; too weak there: {}"
_MISSING_POWER_TEST = ("an attack with a power test (a reconstruction attack scored by the evaluator, or a "
                       "completion attack) that ran on both runs")


def _reference(c: dict) -> dict:
    """A check, as the decision cites it: which attack, metric and precision, and the numbers."""
    d = c["difference"]
    ref = {"attack": c["attack"], "metric": c["metric"], "kind": c["kind"], "precision": c["precision"],
           "outcome": c["outcome"], "difference": d["mean"], "ci95": d["ci95"], "of": d["of"],
           "tolerance": c["tolerance"]}
    if "defended" in c:
        ref.update(defended=c["defended"], undefended=c["undefended"])
    return ref


# ---------------------------------------------------------------- the prose, made from the decision only


_OPENINGS = {
    "baseline": "No defense: this run measures how much the features leak, whether int8 changes that, "
                "and which attacks are strong enough to certify a defense.",
    "inconclusive": "Inconclusive for `{defense}`: missing {missing}.",
    "survives": "Privacy survives compression: on the compressed features the device sent, `{defense}` beats "
                "no defense under every attack that proved its power ({proven}), as it did in float, and no "
                "attack leaks more than on float features beyond the tolerance.",
    "does not survive": "Privacy does NOT survive compression for `{defense}`: it protected in float, and "
                        "compression took that away.",
    "never protected": "`{defense}` never protected: even on float features it does not beat no defense under "
                       "every attack that proved its power, so this is a defense problem, not a compression "
                       "problem.",
}


def headline(d: Decision) -> str:
    """The verdict in sentences, made only from the decision."""
    ev = d.evidence
    out = [_OPENINGS[d.outcome].format(defense=d.defense, missing="; ".join(d.missing),
                                       proven=", ".join(ev["proven"]))]
    if d.outcome == "survives":
        out += _cut_lines([c for c in d.decided_by if "defended" in c])
    out += [_check_line(c) + " On float features it did." for c in ev["lost"]]
    out += [_check_line(c) for c in ev["compression_failed"]]
    if d.outcome == "never protected":
        out += [_check_line(c) for c in ev["float_failed"]]
    if d.weak_power:
        out.append(f"Too weak to certify (below {100 * d.threshold:.0f}% on the undefended model at some precision): "
                   + "; ".join(_power_line(n, by) for n, by in d.weak_power.items()) + ".")
    if d.outcome == "baseline":
        c = d.compression
        uncounted = c["fails"] - len(ev["compression_failed"])
        total = c["holds"] + c["fails"] + c["uncertain"]
        again = c.get("not_replicated", 0)
        out.append(f"Compression checks: {c['holds']} of {total} hold, {c['fails']} fail"
                   + (f" ({uncounted} of them by an attack too weak to certify at both precisions, not counted)"
                      if uncounted else "") + f", {c['uncertain']} uncertain"
                   + (f" ({again} of them failed once and did not replicate with another attack seed)" if again else "")
                   + ".")
    out += [f"Attack failed: {e}." for e in d.errors]
    out += [f"Skipped, this data is too small for it: {e}." for e in d.skipped]
    out += [f"Warning: {f}." for f in d.flags]
    return " ".join(out)


def _replicate_clause(again: dict, fmt: str) -> str:
    if again["outcome"] == "same":
        return (f"; attack seed {again['seed']} reproduces it image for image (at these options the attack does not "
                "depend on its seed, so this is how it behaves on each side)")
    return f", and again with attack seed {again['seed']} ({again['difference']['mean']:{fmt}})"


def _check_line(c: dict) -> str:
    label, fmt = LEAKAGE_METRICS[c["metric"]][1], LEAKAGE_METRICS[c["metric"]][2]
    if c["kind"] == "compression":
        d = c["difference"]
        again = c.get("replicate")
        return (f"{c['attack']} {label}: {c['precision']} leaks more than float by {d['mean']:{fmt}} "
                f"(95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f}), beyond the tolerance {c['tolerance']:g}"
                + (_replicate_clause(again, fmt) if again else "")
                + ".")
    return (f"{c['attack']} {label} on {c['precision']} features: defended {c['defended']:.4f} against undefended "
            f"{c['undefended']:.4f}, not lower by more than the tolerance {c['tolerance']:g}.")


COLOUR_GAP = 0.05  # an RGB SSIM cut this much larger than the luminance one is named as colour alone


def _cut(c: dict) -> float:
    return 1 - c["defended"] / c["undefended"] if c["undefended"] > 0 else 0.0


def _cut_lines(checks: list[dict]) -> list[str]:
    """How much a surviving defense cuts, one sentence per attack and precision: a survival that leaves
    90% of the leakage reads differently from one that leaves 40%. Where SSIM was scored over RGB and
    on luminance and the RGB cut is clearly larger, the luminance cut is the one to quote: the rest is
    colour alone."""
    groups: dict = {}
    for c in checks:
        groups.setdefault((c["attack"], c["precision"]), []).append(c)
    out = []
    for (attack, prec), found in groups.items():
        parts = [f"{LEAKAGE_METRICS[c['metric']][1]} defended {c['defended']:.4f} against undefended "
                 f"{c['undefended']:.4f}, {100 * _cut(c):.0f}% lower" for c in found]
        cut = {c["metric"]: _cut(c) for c in found}
        colour = cut["ssim"] - cut["ssim_luma"] if {"ssim", "ssim_luma"} <= cut.keys() else 0.0
        tail = (f" (quote {100 * cut['ssim_luma']:.0f}%: the RGB cut is {100 * colour:.0f} points larger "
                "because the colours are wrong, not the outlines)" if colour >= COLOUR_GAP else "")
        out.append(f"{attack} on {prec} features: " + "; ".join(parts) + tail + ".")
    return out


def _power_line(name: str, by_prec: dict) -> str:
    parts = []
    for prec, p in by_prec.items():
        if "ratio" not in p:
            parts.append(f"{prec}: {p['reason']}")
        else:
            what = "identified" if p["measure"] == "identification" else "completion accuracy"
            parts.append(f"{prec}: {what} {p['value']:.3f} against {p['reference']:.3f} "
                         f"({100 * p['ratio']:.0f}%)")
    return f"{name} ({'; '.join(parts)})"
