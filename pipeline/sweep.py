"""A report over several runs (defenses and strengths): the verdicts, and trade-off plots.

A sweep is a folder whose subfolders are run directories (each with config.yaml). Per run it
reads train/model.json, train/metrics.json, export/manifest.json and cloud/attacks.json, and draws,
per attack, accuracy against leakage with float and int8 on the same axes: SSIM for the inverting
attacks, completion accuracy for `pmc`. Each defense is one colour, its strengths joined by a line;
hollow markers and dotted lines are float, filled markers and solid lines int8.

    write_sweep_report(folder) -> (report.md, report.html)
"""
from __future__ import annotations

from pathlib import Path

from edgeveil.device.files import atomic_path, read_json
from edgeveil.device.manifest import clamp_bounds, describe_clamps

__all__ = ["find_runs", "collect", "write_sweep_report"]

# attack -> (metric on the x axis, its label)
_X = {"pmc": ("accuracy", "completion accuracy of the attacker's classifier"), "mine": ("mi", "MI estimate (nats)")}
_DEFAULT_X = ("ssim", "reconstruction SSIM")


def find_runs(folder: Path) -> list[Path]:
    """Run directories directly under `folder` (those with a config.yaml), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if (p / "config.yaml").is_file())


def _read(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):  # not there yet, or left half-written by a failed run
        return None


def collect(folder: Path) -> list[dict]:
    """One record per run: defense, strength, float and int8 accuracy, attack summaries, verdict."""
    rows = []
    for run in find_runs(folder):
        info, metrics = _read(run / "train" / "model.json"), _read(run / "train" / "metrics.json")
        manifest, attacks = _read(run / "export" / "manifest.json"), _read(run / "cloud" / "attacks.json")
        if info is None or metrics is None:
            continue
        accuracy = {"float": metrics["float_test_accuracy"]}
        for prec, a in (manifest or {}).get("artifacts", {}).items():
            accuracy[prec] = a["tail_accuracy"]
        rows.append({"run": run.name, "defense": info["defense"]["name"], "strength": info["defense"]["strength"],
                     "accuracy": accuracy, "device": _int8_device(_read(run / "device" / "bench.json")),
                     "grids": [run.name + "/cloud/" + e["grid"] for e in (attacks or {}).get("attacks", {}).values()
                               if e.get("grid")],
                     "attacks": {n: {p: r["summary"] for p, r in a["precisions"].items()}
                                 for n, a in (attacks or {}).get("attacks", {}).items()},
                     "verdict": (attacks or {}).get("verdict"),
                     "warnings": [w for a in (manifest or {}).get("artifacts", {}).values() for w in a.get("warnings", [])],
                     "clamps": clamp_bounds(manifest or {})})
    return rows


def _int8_device(bench: dict | None) -> dict | None:
    """The int8 head on this machine, one thread, XNNPACK as the board would use it: p50 latency and memory."""
    rows = [r for r in (bench or {}).get("results", []) if r["precision"] == "int8" and r["num_threads"] == 1]
    if not rows:
        return None
    r = next((r for r in rows if r["xnnpack_requested"]), rows[0])
    return {"p50_us": r["p50_us"], "memory_mb": r["memory_overall_mb"], "model_bytes": r["model_bytes"]}


def tradeoff_plot(rows: list[dict], attack: str, path: Path) -> bool:
    """Accuracy against the attack's leakage metric; False when nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, label = _X.get(attack, _DEFAULT_X)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn = False
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    for i, defense in enumerate(defenses):
        rs = sorted((r for r in rows if r["defense"] == defense and attack in r["attacks"]), key=lambda r: r["strength"])
        for prec, fill, style in (("float", "none", ":"), ("int8", "full", "-")):
            pts = [(r["attacks"][attack][prec][metric], r["accuracy"].get(prec)) for r in rs
                   if prec in r["attacks"][attack] and metric in r["attacks"][attack][prec]
                   and r["accuracy"].get(prec) is not None]
            if not pts:
                continue
            xs = [s["mean"] for s, _ in pts]
            err = [[s["mean"] - s["ci95"][0] for s, _ in pts], [s["ci95"][1] - s["mean"] for s, _ in pts]]
            ax.errorbar(xs, [a for _, a in pts], xerr=err, marker="os^vD<>PX*"[i % 10], fillstyle=fill,
                        linestyle=style, color=f"C{i % 10}", capsize=2, label=f"{defense} ({prec})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(f"{label} (more leakage →)")
    ax.set_ylabel("test accuracy (float: PyTorch; int8: the tail on int8 features)")
    ax.set_title(f"{attack}: accuracy against leakage, float (hollow) and int8 (filled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def _fmt_summary(s: dict | None, metric: str) -> str:
    if not s or metric not in s:
        return "-"
    m = s[metric]
    return f"{m['mean']:.3f} ({m['ci95'][0]:.3f}–{m['ci95'][1]:.3f})"


def _failed_cells(folder: Path) -> dict[str, str]:
    """Cells `edgeveil sweep` recorded as failed (sweep.json), with their errors."""
    record = _read(folder / "sweep.json") or {}
    return {name: st.get("error", "failed") for name, st in record.get("cells_state", {}).items()
            if st.get("status") == "failed"}


def build_sweep_report(folder: Path) -> tuple[str, list[Path]]:
    from edgeveil.cloud_sim.verdict import outcome_word

    from .report import _table

    folder = Path(folder)
    rows = sorted(collect(folder), key=lambda r: r["defense"] != "none")  # the baseline first
    if not rows:
        raise FileNotFoundError(f"{folder} holds no trained run directories (subfolders with config.yaml and "
                                "train/model.json)")
    attacks = list(dict.fromkeys(a for r in rows for a in r["attacks"]))
    lines = [f"# edgeveil sweep: {folder.name}", ""]
    failed = _failed_cells(folder)
    if failed:
        lines += ["## Failed cells", "", "Retried once, then recorded; the other cells ran on.", "",
                  *[f"- **{name}**: {error}" for name, error in failed.items()], ""]
    lines += ["## Verdicts", ""]
    verdict_rows = []
    for r in rows:
        v, dev = r["verdict"], r["device"]
        verdict_rows.append([r["run"], r["defense"], f"{r['strength']:g}", f"**{outcome_word(v)}**",
                             "-" if r["accuracy"].get("int8") is None else f"{r['accuracy']['int8']:.4f}",
                             "-" if dev is None else f"{dev['p50_us']:.0f} µs, {dev['memory_mb']:.1f} MB, "
                                                     f"{dev['model_bytes'] / 1024:.1f} KiB",
                             (v or {}).get("headline", "no attack has run").replace("|", "/")])
    lines += [_table(["run", "defense", "strength", "privacy after compression", "int8 accuracy",
                      "int8 head (p50, memory, file)", "why"], verdict_rows), "",
              "The int8 head's latency is the median on this machine (one thread, XNNPACK), with the "
              "interpreter's memory; see each run's report for every artifact.", ""]
    lines += [f"**Warning, {r['run']}:** {w}\n" for r in rows for w in r["warnings"]]
    lines += [f"**Activations clamped, {r['run']}:** {describe_clamps(r['clamps'])}: rare outliers would have taken "
              "their whole int8 grid.\n" for r in rows if r["clamps"]]
    for r in rows:
        for grid in r["grids"]:
            lines += [f"**{r['run']}** ({outcome_word(r['verdict'])}):", "", f"![{r['run']} reconstructions]({grid})", ""]
    header = ["run", "defense", "strength", "float acc", "int8 acc"]
    def metrics_of(a):
        found = {m for r in rows for per in r["attacks"].get(a, {}).values() for m in per}
        return [_X.get(a, _DEFAULT_X)[0]] + (["identification"] if "identification" in found else [])

    for a in attacks:
        for metric in metrics_of(a):
            header += [f"{a} {metric} float", f"{a} {metric} int8"]
    table_rows = []
    for r in rows:
        cells = [r["run"], r["defense"], f"{r['strength']:g}", f"{r['accuracy']['float']:.4f}",
                 "-" if r["accuracy"].get("int8") is None else f"{r['accuracy']['int8']:.4f}"]
        for a in attacks:
            per = r["attacks"].get(a, {})
            for metric in metrics_of(a):
                cells += [_fmt_summary(per.get("float"), metric), _fmt_summary(per.get("int8"), metric)]
        table_rows.append(cells)
    lines += ["## Accuracy and leakage", "", "Means with 95% bootstrap intervals over the attacked test images.", "",
              _table(header, table_rows), ""]
    images = []
    lines += ["## Trade-offs", ""]
    for a in attacks:
        png = folder / "plots" / f"tradeoff_{a}.png"
        if tradeoff_plot(rows, a, png):
            lines += [f"![{a}: accuracy against leakage](plots/{png.name})", ""]
            images.append(png)
    return "\n".join(lines), images


def write_sweep_report(folder: Path) -> tuple[Path, Path]:
    from edgeveil.device.files import atomic_write_text

    from .report import _md_to_html

    folder = Path(folder)
    md, _ = build_sweep_report(folder)
    atomic_write_text(folder / "report.md", md)
    atomic_write_text(folder / "report.html", _md_to_html(md, folder))
    return folder / "report.md", folder / "report.html"
