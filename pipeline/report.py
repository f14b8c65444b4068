"""``report.md`` and a self-contained ``report.html`` (images embedded) from a run directory.

Reads only what the stages wrote: config.yaml, train/metrics.json and model.json, export/manifest.json,
device/bench.json, device/stream.json and cloud/attacks.json. A missing stage is reported as missing,
not as an error, so a report can be written at any point of the pipeline.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from edgeveil.device.files import read_json

__all__ = ["build_report", "write_report"]


def _load(path: Path) -> dict | None:
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{e}; re-run the stage that writes it") from None


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _f(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _ci(s: dict, spec=".4f") -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:{spec}} ({lo:{spec}}–{hi:{spec}})"


def _section_model(run: Path) -> list[str]:
    info = _load(run / "train" / "model.json")
    metrics = _load(run / "train" / "metrics.json")
    if info is None:
        return ["## Model", "", "Not trained yet (`edgeveil train`)."]
    t, d = info["train"], info["data"]
    sizes = ", ".join(f"{k} {v['size']}" for k, v in d["splits"].items())
    return ["## Model", "",
            f"- **{info['arch']}** (width {info['width']}, split {info['split']}), input {info['input']['shape']}, "
            f"features {info['feature_shape']}, defense **{info['defense']['name']}** "
            f"(strength {info['defense']['strength']})",
            f"- Data: `{d['name']}` at {d['image_size']}×{d['image_size']}, splits: {sizes} (seed {info['seed']})",
            f"- Trained {t['epochs_done']} epochs, batch {t['batch_size']}, lr {t['lr']} ({t['seconds']:.1f} s)",
            f"- Float (PyTorch) test accuracy: **{metrics['float_test_accuracy']:.4f}**" if metrics else ""]


def _section_export(run: Path) -> list[str]:
    m = _load(run / "export" / "manifest.json")
    if m is None:
        return ["## Export", "", "Not exported yet (`edgeveil export`)."]
    rows = []
    for prec, a in m["artifacts"].items():
        p = a["parity"]
        rows.append([prec, f"{a['bytes']:,}", _f(a["float_accuracy"]), _f(a["tail_accuracy"]), f"{p['cosine']:.6f}",
                     f"{p['max_abs_err']:.3g}", _f(p.get("mean_err_steps"), ".2f"), _f(p.get("max_err_steps"), ".2f"),
                     ", ".join(a["operators"])])
    return ["## Export: float against quantized", "",
            f"onnx2tf {m['tools'].get('onnx2tf')}, calibration {m['calibration']['count']} images from "
            f"{m['calibration']['split']}; parity on {m['evaluation']['parity_samples']} held-out test images "
            "(steps = output quantization steps); accuracy = the tail fed each artifact's dequantized features.", "",
            _table(["precision", "bytes", "float acc", "tail acc", "cosine", "max abs err", "mean steps",
                    "max steps", "operators"], rows),
            *_clamp_lines(m.get("activation_clamps")),
            *[f"\n**Warning:** {w}" for a in m["artifacts"].values() for w in a.get("warnings", [])]]


def _clamp_lines(record: dict | None) -> list[str]:
    """The activations export clamped (export/clip.py), with the range each had."""
    if not record or not record.get("clamps"):
        return []
    from edgeveil.device.manifest import describe_clamps

    return [f"\n**Activations clamped** ({record['percentile']} % band, over {record['min_ratio']:g}x narrower than "
            f"the full range): {describe_clamps(record['clamps'])}. Rare outliers would have taken each one's whole "
            "int8 grid. The float "
            f"tail answers as before on {100 * record['float_agreement']:.1f}% of {record['samples']} calibration "
            "images. The clamps are part of the deployed head: float and int8 are attacked with them."]


def _xnn(row: dict) -> str:
    if row["xnnpack"]:
        return "on"
    return "off (asked on: not applied)" if row.get("xnnpack_requested") else "off"


def _section_bench(run: Path) -> list[str]:
    b = _load(run / "device" / "bench.json")
    if b is None:
        return ["## Latency", "", "Not benchmarked yet (`edgeveil bench`)."]
    rows = [[r["precision"], f"{r['runtime']['name']} {r['runtime']['version']}", r["num_threads"],
             _xnn(r), r["count"], f"{r['p50_us']:.1f}", f"{r['p90_us']:.1f}",
             f"{r['avg_us']:.1f} ± {r['std_us']:.1f}", f"{r['init_us'] / 1000:.1f}", f"{r['peak_rss_mb']:.1f}",
             f"{r['model_bytes']:,}"] for r in b["results"]]
    mach = b.get("machine", {})
    return ["## Latency on this machine", "",
            f"Batch 1, {mach.get('platform', '?')}, {mach.get('cpu_count', '?')} cores. Times in µs "
            "(median, p90, mean ± std), init in ms, memory in MB.", "",
            _table(["precision", "runtime", "threads", "XNNPACK", "runs", "p50", "p90", "mean", "init ms",
                    "peak RSS", "model bytes"], rows)]


def _section_stream(run: Path) -> list[str]:
    s = _load(run / "device" / "stream.json")
    if s is None:
        return []
    return ["## Device → cloud", "",
            f"{s['sent']} test images run through the {s['precision']} head on the device runner "
            f"({s['runtime']}), sent as signed frames over HTTP to {s['server']}. The server's class equals the "
            f"tail's offline prediction on the same features for **{s['agreement']:.2%}** of them; "
            f"served accuracy {s['served_accuracy']:.4f}."]


_SPEC = {"psnr": ".2f", "mse": ".5f"}
_LABEL = {"ssim": "SSIM", "ssim_luma": "luminance SSIM", "psnr": "PSNR (dB)", "mse": "MSE",
          "accuracy": "completion accuracy", "mi": "MI (nats)",
          "scratch_accuracy": "from-scratch accuracy", "clean_accuracy": "clean accuracy",
          "identification": "identified", "identification_top5": "identified (top-5)"}


def _section_attacks(run: Path) -> tuple[list[str], list[Path]]:
    a = _load(run / "cloud" / "attacks.json")
    if a is None:
        return ["## Attacks", "", "No attack has run yet (`edgeveil attack`)."], []
    lines, images = ["## Attacks: float against int8 features", "",
                     f"Targets: {a['targets']['n']} test images, features from {a['targets']['source']}. "
                     f"SSIM: {a['ssim_convention']['summary']}. Means with 95% bootstrap intervals.",
                     "", _evaluator_line(a.get("evaluator"))], []
    for name, att in a["attacks"].items():
        if att.get("error") or att.get("skipped"):
            why = (f"**Failed**, so it counts for nothing: {att['error']}" if att.get("error")
                   else f"**Skipped** before it ran: {att['skipped']}")
            lines += ["", f"### {name}", "", why]
            continue
        metric_names = list(dict.fromkeys(m for r in att["precisions"].values() for m in r["summary"]))
        rows = [[prec, *(_ci(r["summary"][m], _SPEC.get(m, ".4f")) if m in r["summary"] else "-"
                         for m in metric_names), f"{r['seconds']:.1f}"] for prec, r in att["precisions"].items()]
        lines += ["", f"### {name}", "", f"Threat model: {att['threat_model']}", "",
                  _table(["features", *(_LABEL.get(m, m) for m in metric_names), "seconds"], rows)]
        for metric, per in att.get("differences", {}).items():
            for prec, d in per.items():
                lines += ["", f"{prec} − float {_LABEL.get(metric, metric)}: {d['mean']:+.4f} "
                              f"(95% CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})"]
        if att.get("grid"):
            lines += ["", f"![{name} reconstructions](cloud/{att['grid']})"]
            images.append(run / "cloud" / att["grid"])
    return lines, images


def _evaluator_line(ev: dict | None) -> str:
    """How the identification scores were made, and how well the evaluator does on the originals."""
    if not ev:
        return "Identification: not scored (this attacks.json predates the evaluator)."
    if not ev.get("available"):
        return f"Identification: not scored: {ev['reason']}."
    acc = ev["on_originals"]["identification"]
    top5 = ev["on_originals"].get("identification_top5")
    return (f"Identification: the auditor's evaluator ({ev['arch']}), trained on {ev['trained_on']} images of "
            f"its own split, names the class of **{_ci(acc, '.3f')}** of the original targets"
            + (f" (top-5 {_ci(top5, '.3f')})" if top5 else "") + "; the *identified* column is its accuracy on "
            "the reconstructions.")


def _power_table(v: dict) -> list[str]:
    power = v.get("power") or {}
    rows = [[name, prec, p["measure"], f"{p['value']:.3f}" if "value" in p else "-",
             f"{p['reference']:.3f}" if "reference" in p else "-",
             f"{100 * p['ratio']:.0f}%" if "ratio" in p else p.get("reason", "-"),
             "yes" if p["proven"] else "**too weak to certify**"]
            for name, by in (power.get("by_attack") or {}).items() for prec, p in by.items()]
    if not rows:
        return []
    return ["", f"Attack power, on {power['judged_on']}: an attack certifies a defense at a precision only if it "
                f"reaches {100 * power['threshold']:.0f}% of the reference there (identification on reconstructions "
                "against the evaluator on originals; completion accuracy against clean accuracy).", "",
            _table(["attack", "features", "measure", "attack's", "reference", "ratio", "certifies"], rows), ""]


def _outcome_cell(c: dict) -> str:
    """A check's outcome, saying when the verdict did not count it: a weak attack's checks (compression
    and defense alike) decide nothing, a defense check on a reported-only metric does not bind, and a
    compression failure says whether it replicated with another attack seed."""
    if not c.get("certifies", True):
        return f"{c['outcome']} (not counted: attack too weak)"
    if c["kind"] == "defense" and not c.get("binding", True):
        return f"{c['outcome']} (reported, not binding)"
    again = c.get("replicate")
    if again:
        d = again["difference"]
        verb = {"fails": "failed again", "same": "reproduced exactly"}.get(again["outcome"], "did not replicate")
        return (f"{c['outcome']} ({verb} with attack seed {again['seed']}: {d['mean']:+.4f}, "
                f"CI {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f})")
    return c["outcome"]


def _section_verdict(run: Path) -> list[str]:
    from edgeveil.cloud_sim.verdict import outcome_word

    a = _load(run / "cloud" / "attacks.json")
    v = a.get("verdict") if a else None
    if v is None:
        return []
    lines = ["## Verdict: does privacy survive compression?", "", f"**{outcome_word(v)}.** {v['headline']}", "",
             *_power_table(v)]
    rows = []
    for c in v["checks"]:
        d = c["difference"]
        label = _LABEL.get(c["metric"], c["metric"])
        if d is None:
            rows.append([c["attack"], label, c["kind"], "-", "-", c["outcome"]])
            continue
        what = (f"{c['precision']} − float (tolerance {c['tolerance']:g})" if c["kind"] == "compression"
                else f"defended − undefended, {c['precision']} (must be below −{c['tolerance']:g})")
        rows.append([c["attack"], label, what, f"{d['mean']:+.4f}", f"{d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f}",
                     _outcome_cell(c)])
    if rows:
        lines += [_table(["attack", "metric", "comparison", "difference", "95% CI", "outcome"], rows), ""]
    lines.append("Leakage metrics: higher means more leakage. Compression holds when the interval's upper end is "
                 "within the tolerance; the defense holds when the whole interval is below minus the tolerance.")
    diag = [[c["attack"], _LABEL.get(c["metric"], c["metric"]),
             f"{c['precision']} − float" if c["kind"] == "compression" else f"defended − undefended, {c['precision']}",
             f"{c['difference']['mean']:+.4f}",
             f"{c['difference']['ci95'][0]:+.4f} to {c['difference']['ci95'][1]:+.4f}"]
            for c in v.get("diagnostics", [])]
    if diag:
        lines += ["", "Diagnostics, not judged (the interval is over held-out batches of one trained estimator; "
                      "retraining it moves the estimate by more):", "",
                  _table(["diagnostic", "metric", "comparison", "difference", "95% CI"], diag)]
    return lines


def build_report(run_dir: Path) -> str:
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} does not exist: {run} is not an edgeveil run directory")
    from .report_targets import section_targets

    attacks, _ = _section_attacks(run)
    targets, _ = section_targets(run)
    parts = [f"# edgeveil report: {run.name}", "", *_section_verdict(run), "", *_section_model(run), "",
             *_section_export(run), "", *targets, "",
             *_section_bench(run), "", *_section_stream(run), "", *attacks, "",
             "## Config", "", "```yaml", (run / "config.yaml").read_text().rstrip(), "```", ""]
    return "\n".join(parts)


def _md_to_html(md: str, run: Path) -> str:
    """A small Markdown subset (headings, lists, tables, code, images, bold) to HTML, images inlined."""
    out, in_code, in_table, in_list = [], False, False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c, run)}</{tag}>" for c in cells) + "</tr>")
        elif m := re.match(r"(#+) (.*)", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2), run)}</h{n}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:], run)}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line, run)}</p>")
    out += ["</table>"] * in_table + ["</ul>"] * in_list
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:last-child{text-align:left}th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em;overflow:auto}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>edgeveil report</title><style>{style}</style>" \
           f"</head><body>\n{chr(10).join(out)}\n</body></html>\n"


def _inline(text: str, run: Path) -> str:
    def image(m):
        path = run / m.group(2)
        if not path.is_file():
            return html.escape(f"[missing image {m.group(2)}]")
        data = base64.b64encode(path.read_bytes()).decode()
        return f"<img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'>"

    parts = re.split(r"(!\[[^\]]*\]\([^)]*\))", text)
    out = []
    for p in parts:
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]*)\)", p)
        if m:
            out.append(image(m))
        else:
            esc = html.escape(p)
            esc = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", esc)
            out.append(re.sub(r"`([^`]+)`", r"<code>\1</code>", esc))
    return "".join(out)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    from edgeveil.device.files import atomic_write_text

    run = Path(run_dir)
    md = build_report(run)
    atomic_write_text(run / "report.md", md)
    atomic_write_text(run / "report.html", _md_to_html(md, run))
    return run / "report.md", run / "report.html"
