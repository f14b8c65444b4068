"""`edgeveil export --target BOARD`: the flashable files and, before anything is flashed, whether
the head fits each board and how fast it will run.

    result = target_report("runs/demo/export", "stm32h743")
    print(format_fit_table(result["fit"]))

For the requested board: the operator check (an MCU board refuses an operator TFLite Micro lacks,
and a model that is not full-integer, before anything is written), then the files: for an MCU
the model as a C array (head_int8.cc / .h), for a Linux board the .tflite and the runtime's
install line. For every board, one fit row: RAM (MCUs: the TFLite Micro arena measured on this
host, plus a margin, against the largest RAM block; Ethos-U boards: Vela's SRAM), flash (model
bytes plus a stated TFLite Micro runtime estimate), and a latency range labelled "estimated".
The shared measurements (graph figures, arena, TFLite Micro against the reference kernels and
XNNPACK on real test images, Vela) are made once. Everything lands in manifest.json under
"targets" (an atomic rewrite; the manifest's validator allows extra keys).

`memory_plan="offline"` (MCU boards) also plans the arena here (`edgeveil.export.memplan`) and
writes the planned copy, head_<precision>_planned.tflite, and its C array instead of the plain
model's; the planned model's arena is measured the same way, its outputs compared bit for bit with
the plain model's under TFLite Micro (run in its minimum arena) and with the reference kernels,
and the fit rows judge RAM by the arena of the model that is flashed.
"""
from __future__ import annotations

import datetime
import tempfile
import time
from pathlib import Path

from edgeveil.device.files import atomic_write_json, read_json, sha256_file
from edgeveil.device.manifest import artifact_path, read_manifest, validate_manifest

from . import boards as board_profiles
from .estimate import estimate_latency, macs_by_class
from .memplan import check_memory_plan

__all__ = ["TARGETS_SCHEMA", "RUNTIME_FLASH", "PLANNER_OVERHEAD_NOTE", "target_report", "analyse", "fit_row",
           "format_fit_table", "format_target_summary", "current_manifest", "check_plan_target"]

TARGETS_SCHEMA = "edgeveil.targets/1"
# TFLite Micro's code in flash, beside the model bytes (neither figure is measured here).
RUNTIME_FLASH = {
    "low_bytes": 22 * 1024, "high_bytes": 193 * 1024,
    "source": "low: TFLM's core runtime plus the operators of the keyword-spotting example, 22 KB on a "
              "Cortex-M3 (tensorflow.org/lite/microcontrollers overview); high: TFLM+CMSIS-NN minus "
              "TinyEngine flash for mcunet-vww0 on the STM32H743, 646 - 453 kB (mit-han-lab/tinyengine "
              "README, edge_toolchain.md section 1.9). Fit is judged on the high figure.",
}
PLANNER_OVERHEAD_NOTE = 0.2  # say so when TFLM's planned activations exceed the lower bound by more
_VELA_ACCELERATORS = ("ethos-u55-128", "ethos-u65-256")
_SAMPLES = 300


def target_report(export_dir, board: str, *, precision: str = "int8", write: bool = True,
                  samples: int = _SAMPLES, progress: bool = False, memory_plan: str = "tflm") -> dict:
    """Check, write the flashable files for `board`, and fit-report every board; returns the
    manifest's "targets" section (also written into manifest.json when `write`).

    samples: test images (from the run's test split) for the arena probe and the kernel comparison.
    Raises UnsupportedOperator / NotFullInteger (ValueErrors naming the operator or float part)
    for an MCU board before anything is written.
    memory_plan: "tflm" (TFLM plans the arena on the board) or "offline" (see the module docstring).
    """
    started = time.perf_counter()
    export_dir = Path(export_dir)
    target = check_plan_target(memory_plan, board)
    manifest_path = export_dir / "manifest.json"
    manifest = read_manifest(manifest_path)
    path = artifact_path(manifest_path, precision, manifest)
    opcheck = _check_target(path, target)
    with tempfile.TemporaryDirectory(prefix="edgeveil_plan_") as scratch:
        planned = None
        if memory_plan == "offline":
            planned = (export_dir if write else Path(scratch)) / f"{path.stem}_planned.tflite"
        analysis = analyse(path, export_dir, precision, samples=samples, progress=progress, planned=planned)
    files = _write_files(planned or path, export_dir, target, precision, write)
    section = _section(manifest, path, precision, analysis, target, opcheck, files, started)
    if write:
        manifest["targets"] = section
        atomic_write_json(manifest_path, validate_manifest(manifest, str(manifest_path)))
    return section


def check_plan_target(memory_plan: str, board: str):
    """The board profile, once `memory_plan` is known and fits the board (an offline plan is a
    TFLite Micro arena plan: MCU boards only). Cheap: call it before a long export."""
    check_memory_plan(memory_plan)
    target = board_profiles.get_board(board)
    if memory_plan == "offline" and not target.is_mcu:
        raise ValueError(f"--memory-plan offline plans a TFLite Micro arena, but {board} is a {target.kind} board "
                         f"running {target.runtime}: pick an MCU board (edgeveil list boards) or drop --memory-plan")
    return target


def _check_target(path: Path, board) -> dict:
    from .carray import check_full_integer
    from .opcheck import check_artifact, require_supported

    report = check_artifact(path, board)
    if board.is_mcu:
        require_supported(report, board, path.name)
        check_full_integer(path)
    return report


def _write_files(path: Path, export_dir: Path, board, precision: str, write: bool) -> dict:
    if not board.is_mcu:
        return {"tflite": path.name, "install": board.install}
    if not write:
        return {"tflite": path.name}
    from .carray import write_c_array

    written = write_c_array(path, export_dir, name=path.stem)
    return {"tflite": path.name, "cc": Path(written["cc"]).name, "h": Path(written["h"]).name,
            "symbol": written["symbol"], "length_symbol": written["length_symbol"],
            "alignment": written["alignment"], "sha256": written["sha256"], "bytes": written["bytes"]}


# ------------------------------------------------------------------------------- measurements


def analyse(path: Path, export_dir: Path, precision: str, *, samples: int = _SAMPLES,
            progress: bool = False, planned: Path | None = None) -> dict:
    """The board-independent figures: graph, and for a full-integer model the TFLite Micro arena,
    the kernel comparison on real test inputs and Vela's estimates ({"graph", "full_integer", ...}).
    planned: where to write an offline-planned copy; its figures go under "memory_plan"."""
    from .carray import float_parts
    from .graph import read_graph, summarize

    graph = summarize(read_graph(path))
    parts = float_parts(path)
    result = {"graph": graph, "model_bytes": path.stat().st_size, "full_integer": parts.kind is None,
              "float_parts": None if parts.kind is None else parts.describe(),
              "arena": None, "kernels": None, "vela": {}}
    if parts.kind is not None:
        return result
    from .tflm import compare_kernels, measure_arena
    from .vela import vela_estimate

    inputs = _test_inputs(export_dir, precision, samples)
    result["arena"] = measure_arena(path, inputs=inputs)
    result["arena"]["planner_overhead"] = _planner_overhead(result["arena"], graph)
    result["kernels"] = compare_kernels(path, inputs, progress=progress)
    if planned is not None:
        result["memory_plan"] = offline_plan(path, planned, inputs, graph, progress=progress)
    boards = board_profiles.load_boards().values()
    accelerators = dict.fromkeys([*_VELA_ACCELERATORS, *(b.vela_accelerator for b in boards if b.vela_accelerator)])
    result["vela"] = {acc: vela_estimate(path, acc) for acc in accelerators}
    return result


def _test_inputs(export_dir: Path, precision: str, samples: int):
    """The first `samples` images of the run's test split, quantized the device's way."""
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_splits, read_model_info

    run_dir = export_dir.parent
    if not (run_dir / "train" / "model.json").is_file():
        raise ValueError(f"{run_dir / 'train' / 'model.json'} not found: the target checks run the head on the "
                         f"run's own test images, so {export_dir} must stay inside its run directory")
    images = load_splits(read_model_info(run_dir)).test.x[:samples]
    return HeadRunner(export_dir, precision).preprocess(images)


def offline_plan(path: Path, planned: Path, inputs, graph: dict, *, progress: bool = False) -> dict:
    """Plan `path` into `planned` and measure it: the plan's figures (memplan.plan_model), "arena"
    (measure_arena of the planned model), "kernels" (compare_kernels of the planned model) and
    "bit_exact_vs_unplanned" (TFLM's outputs of the planned model in its minimum arena against the
    plain model's, on `inputs`)."""
    import numpy as np

    from .memplan import plan_model
    from .tflm import compare_kernels, measure_arena, tflm_outputs

    plan = plan_model(path, planned)
    arena = measure_arena(planned, inputs=inputs)
    arena["planner_overhead"] = _planner_overhead(arena, graph)
    same = np.array_equal(tflm_outputs(planned, inputs, arena_bytes=arena["arena_bytes"]), tflm_outputs(path, inputs))
    return {**plan, "kind": "offline", "arena": arena, "kernels": compare_kernels(planned, inputs, progress=progress),
            "bit_exact_vs_unplanned": bool(same)}


def _planner_overhead(arena: dict, graph: dict) -> dict:
    """TFLM's planned activations (the arena's head) against the lifetime lower bound."""
    bound, head = graph["activation_lower_bound_bytes"], arena["breakdown"]["head_bytes"]
    over = head / bound - 1 if bound else 0.0
    note = None
    if over > PLANNER_OVERHEAD_NOTE:
        note = (f"TFLite Micro's greedy planner uses {head:,} B for activations, {over:.0%} above the "
                f"{bound:,} B lower bound from tensor lifetimes: an offline plan in the model's metadata "
                f"(`--memory-plan offline`) could save up to {head - bound:,} B")
    return {"head_bytes": head, "lower_bound_bytes": bound, "overhead": over, "note": note}


# ------------------------------------------------------------------------------- fit


def fit_row(board, analysis: dict) -> dict:
    """One board's verdict: {"board", "kind", "fits", "reasons", "ram", "flash", "latency"}.

    ram / flash: {"needed", "limit", "margin_bytes", "margin_pct", "what"} (margin < 0: shortfall);
    latency: an estimate range in ms or None.
    """
    reasons = []
    if board.is_mcu and not analysis["full_integer"]:
        reasons.append(f"not full-integer ({analysis['float_parts']}): MCU targets take the int8 export")
        return {"board": board.name, "kind": board.kind, "fits": False, "reasons": reasons,
                "ram": None, "flash": None, "latency": None}
    ram, flash = _ram(board, analysis), _flash(board, analysis)
    for part in (ram, flash):
        if part["margin_bytes"] is not None and part["margin_bytes"] < 0:
            reasons.append(f"{part['what']}: {-part['margin_bytes']:,} B short")
    spread = RUNTIME_FLASH["high_bytes"] - RUNTIME_FLASH["low_bytes"]
    if board.is_mcu and -spread <= flash["margin_bytes"] < 0:
        reasons[-1] += " (it fits with the low runtime estimate: check the firmware's link map)"
    return {"board": board.name, "kind": board.kind, "fits": not reasons, "reasons": reasons,
            "ram": ram, "flash": flash, "latency": _latency(board, analysis)}


def _margin(needed: int, limit: int | None, what: str) -> dict:
    if limit is None:
        return {"needed": needed, "limit": None, "margin_bytes": None, "margin_pct": None, "what": what}
    return {"needed": needed, "limit": limit, "margin_bytes": limit - needed,
            "margin_pct": 100.0 * (limit - needed) / limit, "what": what}


def _ram(board, analysis: dict) -> dict:
    if not board.is_mcu:
        needed = analysis["model_bytes"] + analysis["graph"]["activation_lower_bound_bytes"]
        return _margin(needed, board.ram_bytes, "model + activations vs RAM (trivial; the interpreter's own "
                       "few MB not counted)")
    block = "largest RAM block" if board.largest_contiguous_ram_bytes else "RAM"
    if board.vela_accelerator:
        return _margin(analysis["vela"][board.vela_accelerator]["sram_bytes"], board.arena_limit_bytes,
                       f"Vela SRAM ({board.vela_accelerator}) vs {block}")
    arena, plan = analysis["arena"], analysis.get("memory_plan")
    if plan:
        arena = plan["arena"]
    return _margin(arena["recommended_bytes"], board.arena_limit_bytes,
                   f"TFLM arena{' (offline plan)' if plan else ''} +{arena['margin']:.0%} vs {block}")


def _flash(board, analysis: dict) -> dict:
    if not board.is_mcu:
        return _margin(analysis["model_bytes"], board.flash_bytes, "model file (card storage)")
    model, what = analysis["model_bytes"], "model + TFLM runtime (high estimate) vs flash"
    if analysis.get("memory_plan"):
        model = analysis["memory_plan"]["model_bytes"]
    if board.vela_accelerator:
        model = analysis["vela"][board.vela_accelerator]["optimised_model"]
        what = "Vela-compiled model + TFLM runtime (high estimate) vs flash"
    return _margin(model + RUNTIME_FLASH["high_bytes"], board.flash_bytes, what)


def _latency(board, analysis: dict) -> dict:
    graph = analysis["graph"]
    macs = macs_by_class(graph["by_type"])
    if not board.vela_accelerator:
        return estimate_latency(macs, board.estimator, board.clock_hz)
    vela = analysis["vela"][board.vela_accelerator]
    cpu_macs = macs_by_class({op: t for op, t in graph["by_type"].items() if op in vela["cpu_ops"]})
    cpu = estimate_latency(cpu_macs, board.estimator, board.clock_hz) if cpu_macs else None
    npu_ms = vela["time_s"] * 1e3
    return {"label": "estimated", "engine": f"vela {board.vela_accelerator}",
            "low_ms": npu_ms + (cpu["low_ms"] if cpu else 0.0), "high_ms": npu_ms + (cpu["high_ms"] if cpu else 0.0),
            "npu_ms": npu_ms, "npu_clock_hz": vela["clock_hz"], "cpu_fallback": cpu,
            "source": f"Vela {vela['vela_version']} performance model ({vela['config']['system_config']})"}


# ------------------------------------------------------------------------------- report


def _section(manifest: dict, path: Path, precision: str, analysis: dict, target, opcheck: dict, files: dict,
             started: float) -> dict:
    old = manifest.get("targets") or {}
    sha = sha256_file(path)
    flashed = old.get("boards", {}) if old.get("artifact", {}).get("sha256") == sha else {}
    flashed[target.name] = {"kind": target.kind, "files": files, "operators": opcheck,
                            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return {"schema": TARGETS_SCHEMA,
            "artifact": {"precision": precision, "file": path.name, "sha256": sha, "bytes": analysis["model_bytes"]},
            "analysis": analysis, "runtime_flash": RUNTIME_FLASH,
            "fit": [fit_row(b, analysis) for b in board_profiles.load_boards().values()],
            "boards": flashed, "last_target": target.name,
            "seconds": round(time.perf_counter() - started, 2)}


def human_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024:.1f} KiB"


def _part(p: dict | None) -> str:
    if p is None:
        return "-"
    if p["limit"] is None:
        return f"{human_bytes(p['needed'])} / card"
    return f"{human_bytes(p['needed'])} / {human_bytes(p['limit'])} ({p['margin_pct']:+.0f}%)"


def _ms(lat: dict | None) -> str:
    if lat is None:
        return "-"
    if lat.get("cpu_fallback") is None and "npu_ms" in lat:
        return f"{lat['npu_ms']:.3g} ms (Vela)"
    return f"{lat['low_ms']:.3g}-{lat['high_ms']:.3g} ms"


def format_fit_table(fit: list[dict]) -> str:
    """The fit rows as an aligned text table (RAM and flash: needed / available (margin %))."""
    rows = [("board", "fits", "RAM needed / available", "flash needed / available", "latency (estimated)")]
    for r in fit:
        rows.append((r["board"], "yes" if r["fits"] else "NO", _part(r["ram"]), _part(r["flash"]), _ms(r["latency"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {r['board']}: {'; '.join(r['reasons'])}" for r in fit if r["reasons"]]
    return "\n".join(lines)


def current_manifest(run_dir, precisions, calibration_samples: int, clamp_outliers: str = "auto") -> dict | None:
    """The run's export manifest if it is current (same trained head and model.json, the same
    precisions, calibration count and clamp mode, every artifact's sha256 intact), else None."""
    run_dir = Path(run_dir)
    path = run_dir / "export" / "manifest.json"
    try:
        manifest = read_manifest(path)
        source, info = manifest["source"], read_json(run_dir / "train" / "model.json")
        calibration = min(calibration_samples, info["data"]["splits"]["victim_train"]["size"])
        same = (source.get("head_pt_sha256") == sha256_file(run_dir / "train" / "head.pt")
                and source.get("model_json_sha256") == sha256_file(run_dir / "train" / "model.json")
                and set(manifest["artifacts"]) == set(precisions)
                and manifest["calibration"].get("count") == calibration
                # "auto" records its measurement (clamps or not); "none", and manifests from before: null
                and (manifest.get("activation_clamps") is None) == (clamp_outliers == "none"))
        if same:
            for precision in precisions:
                artifact_path(path, precision, manifest)  # sha256 check
    except (ValueError, OSError, KeyError, TypeError):
        return None
    return manifest if same else None


def format_plan(plan: dict, tflm_arena: int) -> str:
    """One line on the offline plan: both arenas, the planned activations against the bound, exactness."""
    arena, bound = plan["arena"], plan["lower_bound_bytes"]
    exact = plan["bit_exact_vs_unplanned"] and plan["kernels"]["tflm_vs_reference"]["bit_exact"]
    return (f"offline memory plan ({plan['file']}): arena {arena['arena_bytes']:,} B against {tflm_arena:,} B with "
            f"TFLM's own planner ({arena['arena_bytes'] - tflm_arena:+,} B); planned activations "
            f"{arena['breakdown']['head_bytes']:,} B = {arena['breakdown']['head_bytes'] / bound:.3f}x the "
            f"{bound:,} B lower bound, TFLM's persistent structs {arena['breakdown']['tail_bytes']:,} B; outputs "
            + ("bit-exact against the plain model and the reference kernels" if exact else
               "NOT bit-exact: do not flash it (report this as a bug)"))


def format_target_summary(section: dict) -> str:
    """What `edgeveil export --target` prints: the files, the checks, then the fit table."""
    board = section["last_target"]
    entry, a = section["boards"][board], section["analysis"]
    files, ops = entry["files"], entry["operators"]
    lines = [f"target {board} ({ops['runtime']}):"]
    if "cc" in files:
        lines.append(f"  wrote {files['cc']} and {files['h']}: {files['tflite']} as `{files['symbol']}` "
                     f"({files['bytes']:,} B, {files['alignment']}-byte aligned, sha256 in the header)")
    else:
        lines.append(f"  copy {files['tflite']} to the board; runtime: {files['install']}")
    lines.append(f"  operators: {', '.join(ops['operators'])}: all supported" + (
        f"; {', '.join(ops['reference_kernels'])} without {ops['kernels']} kernels (reference kernels, slower)"
        if ops["reference_kernels"] else ""))
    if ops.get("npu"):
        cpu = ops["npu"]["cpu"]
        lines.append("  Vela: every operator on the NPU" if not cpu else
                     "  Vela: on the CPU: " + "; ".join(f"{op} ({why})" for op, why in cpu.items()))
    if a["arena"]:
        arena, over = a["arena"], a["arena"]["planner_overhead"]
        lines.append(f"  TFLite Micro arena: {arena['arena_bytes']:,} B measured, {arena['recommended_bytes']:,} B "
                     f"with the {arena['margin']:.0%} margin ({arena['note']}); activations' lower bound "
                     f"{over['lower_bound_bytes']:,} B, planner {over['head_bytes']:,} B ({over['overhead']:+.0%})")
        if over["note"] and not a.get("memory_plan"):
            lines.append(f"  {over['note']}")
        lines.append(f"  {a['kernels']['message']}")
        if a.get("memory_plan"):
            lines.append(f"  {format_plan(a['memory_plan'], arena['arena_bytes'])}")
    g = a["graph"]
    lines.append(f"  {g['macs']:,} MACs, {g['parameters']:,} parameters; flash adds a TFLite Micro runtime of "
                 f"{RUNTIME_FLASH['low_bytes'] // 1024}-{RUNTIME_FLASH['high_bytes'] // 1024} KiB (high end used)")
    lines += ["", format_fit_table(section["fit"]),
              "latencies are estimates (MACs x published cycles/MAC, or Vela's model), not measurements"]
    return "\n".join(lines)
