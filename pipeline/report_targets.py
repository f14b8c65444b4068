"""The report's fit section: export/manifest.json's "targets" (written by `edgeveil export --target`).

`section_targets(run_dir)` returns (Markdown lines, image paths); it has no images, so the list is
empty. A run without a target check gets one line saying how to make one.
"""
from __future__ import annotations

from pathlib import Path

from edgeveil.device.files import read_json
from edgeveil.export.targets import format_plan, human_bytes

__all__ = ["section_targets"]


def section_targets(run_dir) -> tuple[list[str], list[Path]]:
    """Markdown for the targets section of report.md, and the images it references (none)."""
    path = Path(run_dir) / "export" / "manifest.json"
    try:
        targets = read_json(path).get("targets")
    except FileNotFoundError:
        targets = None
    except ValueError as e:
        raise ValueError(f"{e}; re-run `edgeveil export`") from None
    if not targets:
        return ["## Boards", "", "No board checked yet (`edgeveil export RUN --target BOARD`, "
                "boards: `edgeveil list boards`)."], []
    a = targets["analysis"]
    lines = ["## Boards: does the head fit, and how fast will it run", "",
             f"Artifact `{targets['artifact']['file']}` ({targets['artifact']['bytes']:,} B, sha256 "
             f"`{targets['artifact']['sha256'][:16]}…`). Latencies are **estimated** (MACs × published "
             "cycles per MAC at the board clock, or Vela's performance model), not measured.", "",
             *_graph(a["graph"]), *_memory(a), "", _fit_table(targets["fit"]), "", *_caveats(targets["fit"]),
             *_vela(a["vela"]), *_flashed(targets["boards"]),
             "", f"Flash adds the TFLite Micro runtime: {targets['runtime_flash']['source']}"]
    return lines, []


def _graph(g: dict) -> list[str]:
    per_type = ", ".join(f"{op} ×{t['count']} ({t['macs']:,} MACs)" if t["macs"] else f"{op} ×{t['count']}"
                         for op, t in g["by_type"].items())
    return [f"- {g['macs']:,} MACs, {g['parameters']:,} parameters, {g['operators']} operators: {per_type}"]


def _memory(a: dict) -> list[str]:
    if a["arena"] is None:
        return [f"- Not full-integer ({a['float_parts']}): no TFLite Micro figures; MCU boards need the int8 export."]
    arena, over = a["arena"], a["arena"]["planner_overhead"]
    lines = [f"- TFLite Micro arena (measured, bisection, {arena['interpreter']}): **{arena['arena_bytes']:,} B** "
             f"(head {arena['breakdown']['head_bytes']:,} B, tail {arena['breakdown']['tail_bytes']:,} B); "
             f"with the {arena['margin']:.0%} margin {arena['recommended_bytes']:,} B. {arena['note']}.",
             f"- Activation lower bound from tensor lifetimes: {over['lower_bound_bytes']:,} B; the planner's "
             f"activations are {over['overhead']:+.0%} above it."]
    if over["note"] and not a.get("memory_plan"):
        lines.append(f"- **{over['note']}.**")
    lines.append(f"- {a['kernels']['message']}")
    if a.get("memory_plan"):
        plan = format_plan(a["memory_plan"], arena["arena_bytes"])
        lines.append(f"- {plan[0].upper()}{plan[1:]}.")
    return lines


def _part(p: dict | None) -> str:
    if p is None:
        return "-"
    if p["limit"] is None:
        return f"{human_bytes(p['needed'])} / card"
    return (f"{human_bytes(p['needed'])} / {human_bytes(p['limit'])} "
            f"({p['margin_bytes']:+,} B, {p['margin_pct']:+.1f}%)")


def _latency(lat: dict | None) -> str:
    if lat is None:
        return "-"
    return f"{lat['low_ms']:.3g}–{lat['high_ms']:.3g} ms ({lat['engine']})"


def _fit_table(fit: list[dict]) -> str:
    rows = ["| board | fits | RAM needed / available (margin) | flash needed / available (margin) | "
            "latency, estimated |", "|---|---|---|---|---|"]
    for r in fit:
        verdict = "yes" if r["fits"] else "**no**: " + "; ".join(r["reasons"])
        rows.append(f"| {r['board']} | {verdict} | {_part(r['ram'])} | {_part(r['flash'])} | "
                    f"{_latency(r['latency'])} |")
    return "\n".join(rows)


def _caveats(fit: list[dict]) -> list[str]:
    seen = {}
    for r in fit:
        for caveat in (r["latency"] or {}).get("caveats", []):
            seen.setdefault(caveat, []).append(r["board"])
    return [f"- {c} ({', '.join(boards)})" for c, boards in seen.items()] + ([""] if seen else [])


def _vela(vela: dict) -> list[str]:
    if not vela:
        return []
    lines = ["Vela (Ethos-U NPU performance model):", ""]
    for acc, v in vela.items():
        lines.append(f"- {acc} ({v['config']['system_config']}, {v['clock_hz'] / 1e6:g} MHz): "
                     f"{v['time_s'] * 1e3:.3f} ms, {v['cycles']:,} cycles, SRAM {v['sram_bytes']:,} B, "
                     f"flash {v['flash_bytes']:,} B; {v['message']}")
    return lines


def _flashed(boards: dict) -> list[str]:
    lines = []
    for name, entry in boards.items():
        files = entry["files"]
        if "cc" in files:
            lines.append(f"- `{name}`: `{files['cc']}` + `{files['h']}` (`{files['symbol']}`, "
                         f"{files['alignment']}-byte aligned)")
        else:
            lines.append(f"- `{name}`: copy `{files['tflite']}`; runtime: `{files.get('install')}`")
    return ["", "Flashable files:", "", *lines] if lines else []
