"""Arm Vela estimates for Ethos-U NPUs: cycles, time, SRAM and flash, and which ops fall back to the CPU.

Vela (ethos-u-vela) compiles an int8/int16 .tflite for an Ethos-U NPU and reports a performance
*estimate* from its own model of the NPU and memory system: an estimate, never a measurement.
It runs in a subprocess (`python -m ethosu.vela`) on a copy of the model in a scratch folder;
the summary CSV gives cycles, clock, memory use and MACs, stdout names the CPU operators and why.

Vela's own defaults are made explicit so the result says what it assumed: U55 ->
Ethos_U55_High_End_Embedded (500 MHz) with Shared_Sram, U65 -> Ethos_U65_Client_Server (1 GHz)
with Dedicated_Sram_384KB, from the Arm/vela.ini shipped with Vela. `clock_hz` re-runs the same
system config at another NPU clock (a derived section in a copy of that file); the memory clocks
scale with it, as Vela defines them, so the cycle count barely moves and the time scales.

Float models are not refused: Vela leaves every float op on the CPU ("Feature-map dataTypes must
be one of INT8, ...") and estimates 0 NPU cycles; the result names those ops and says so.
"""
from __future__ import annotations

import configparser
import contextlib
import csv
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

from .carray import float_parts
from .convert import _op_codes, _read_tflite
from .errors import ExportError

__all__ = ["ACCELERATORS", "vela_estimate", "npu_support"]

ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512")
_DEFAULTS = {"ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
             "ethos-u65": ("Ethos_U65_Client_Server", "Dedicated_Sram_384KB")}
_CONFIG = "Arm/vela.ini"
_TIMEOUT_S = 900
_INSTALL = "pip install 'edgeveil[mcu]' (ethos-u-vela)"
_CPU_LINE = re.compile(r"^\s*CPU: (\S+) = (.*) \(outputs \[[^\]]*\]\)\s*$", re.M)
_WARNING = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '(.*)'\n((?:.+\n?)+)", re.M)
_KIB = 1024


def vela_estimate(tflite_path, accelerator: str = "ethos-u55-128", *, clock_hz: float | None = None,
                  system_config: str | None = None, memory_mode: str | None = None, workdir=None) -> dict:
    """Compile the model with Vela for `accelerator` and return its estimate.

    system_config / memory_mode: sections of Arm/vela.ini (None: Vela's default for the family).
    workdir: keep Vela's output there (default: a temporary folder, removed afterwards).
    Returns {"accelerator", "vela_version", "cycles", "clock_hz", "time_s" (cycles / clock_hz),
    "sram_bytes", "flash_bytes" (constants in on- and off-chip flash: weights and command stream),
    "dram_bytes", "macs", "npu_ops", "cpu_ops", "cpu_reasons" ({op: reason}), "optimised_model"
    (bytes of the compiled .tflite), "config": {"system_config", "memory_mode", "config_file"},
    "message", "estimate": "Vela performance model, not a measurement"}. Op names are the
    model's TFLite operators (an op Vela fused into an NPU op, like PAD, counts as NPU).
    """
    run = _run_vela(tflite_path, accelerator, clock_hz, system_config, memory_mode, workdir)
    row, cycles = run["csv"], int(float(run["csv"]["cycles_total"]))
    clock = float(row["core_clock"])
    result = {"accelerator": accelerator, "vela_version": run["version"], "cycles": cycles, "clock_hz": clock,
              "time_s": cycles / clock, "sram_bytes": _bytes(row, "sram_memory_used"),
              "flash_bytes": _bytes(row, "off_chip_flash_memory_used") + _bytes(row, "on_chip_flash_memory_used"),
              "dram_bytes": _bytes(row, "dram_memory_used"), "macs": int(float(row["nn_macs"])),
              "npu_ops": run["npu"], "cpu_ops": list(run["cpu"]), "cpu_reasons": run["cpu"],
              "optimised_model": run["optimised_bytes"], "config": run["config"],
              "estimate": "Vela performance model, not a measurement"}
    result["message"] = _message(result, tflite_path)
    return result


def npu_support(tflite_path, accelerator: str = "ethos-u55-128") -> dict:
    """Which of the model's operators Vela maps to the NPU, and why the others stay on the CPU.

    Returns {"npu": [op, ...], "cpu": {op: reason}} (TFLite operator names, in order of first use).
    """
    run = _run_vela(tflite_path, accelerator, None, None, None, None)
    return {"npu": run["npu"], "cpu": run["cpu"]}


# ------------------------------------------------------------------------------- running Vela


def _run_vela(tflite_path, accelerator, clock_hz, system_config, memory_mode, workdir) -> dict:
    """Validate, run Vela once, parse what it wrote: {"csv", "npu", "cpu", "config", ...}."""
    path = _check_model(tflite_path)
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if clock_hz is not None and (isinstance(clock_hz, bool) or not isinstance(clock_hz, (int, float))
                                 or not 1e6 <= clock_hz <= 1e10):
        raise ValueError(f"clock_hz must be an NPU clock in Hz between 1e6 and 1e10, got {clock_hz!r}")
    default_system, default_memory = _DEFAULTS[accelerator.rsplit("-", 1)[0]]
    system_config, memory_mode = system_config or default_system, memory_mode or default_memory
    ini = _read_ini()
    _check_section(ini, "System_Config", system_config)
    _check_section(ini, "Memory_Mode", memory_mode)
    with _folder(workdir) as folder:
        model = folder / path.name
        if model.resolve() != path.resolve():
            shutil.copyfile(path, model)
        config_file, system_config = _config_file(ini, folder, system_config, clock_hz)
        args = [sys.executable, "-m", "ethosu.vela", str(model), "--accelerator-config", accelerator,
                "--config", config_file, "--system-config", system_config, "--memory-mode", memory_mode,
                "--output-dir", str(folder / "out"), "--show-cpu-operations"]
        stdout = _call(args, path)
        row = _summary_row(folder / "out" / f"{model.stem}_summary_{system_config}.csv", path)
        optimised = folder / "out" / f"{model.stem}_vela.tflite"
        npu, cpu = _split_ops(path, stdout)
        return {"csv": row, "npu": npu, "cpu": cpu, "version": metadata.version("ethos-u-vela"),
                "optimised_bytes": optimised.stat().st_size if optimised.is_file() else None,
                "config": {"system_config": system_config, "memory_mode": memory_mode,
                           "config_file": _CONFIG if clock_hz is None else f"{_CONFIG} with core_clock={clock_hz:g}"}}


def _check_model(tflite_path) -> Path:
    if importlib.util.find_spec("ethosu") is None:
        raise ImportError(f"Arm Vela is not installed: {_INSTALL}")
    path = Path(tflite_path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a .tflite model (no TFL3 file identifier)")
    return path


def _read_ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.optionxform = str  # Vela's keys are case-sensitive (Sram_clock_scale)
    ini.read(Path(importlib.util.find_spec("ethosu").submodule_search_locations[0]) / "config_files" / _CONFIG)
    return ini


def _check_section(ini, kind: str, name: str) -> None:
    known = [s.split(".", 1)[1] for s in ini.sections() if s.startswith(kind + ".")]
    if name not in known:
        option = "system_config" if kind == "System_Config" else "memory_mode"
        raise ValueError(f"{option} {name!r} is not in Vela's {_CONFIG}; known: {', '.join(known)}")


def _config_file(ini, folder: Path, system_config: str, clock_hz) -> tuple[str, str]:
    """(--config value, --system-config value): Arm/vela.ini itself, or a copy with a section
    that inherits `system_config` and sets core_clock. The new section's name starts with the
    old one's: Vela 5.2's compiler treats sections named Ethos_U55* differently from others with
    the same settings (measured: 166,764 against 165,236 cycles for the same ResNet head)."""
    if clock_hz is None:
        return _CONFIG, system_config
    name = f"{system_config}_at_{int(clock_hz)}Hz"
    ini[f"System_Config.{name}"] = {"inherit": f"System_Config.{system_config}", "core_clock": repr(float(clock_hz))}
    path = folder / "edgeveil_vela.ini"
    with open(path, "w") as f:
        ini.write(f)
    return str(path), name


@contextlib.contextmanager
def _folder(workdir):
    """`workdir` (created if needed, kept) or a temporary folder (removed afterwards)."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="edgeveil_vela_") as tmp:
        yield Path(tmp)


def _call(args: list[str], path: Path) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"Vela did not finish compiling {path} in {_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        tail = " | ".join(line for line in (proc.stdout + proc.stderr).splitlines()[-6:] if line.strip())
        raise ExportError(f"Vela could not compile {path} (exit {proc.returncode}): {tail}")
    return proc.stdout


def _summary_row(summary: Path, path: Path) -> dict:
    if not summary.is_file():
        raise ExportError(f"Vela compiled {path} but wrote no summary {summary.name} in {summary.parent}")
    with open(summary, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = ("cycles_total", "core_clock", "sram_memory_used", "off_chip_flash_memory_used",
              "on_chip_flash_memory_used", "dram_memory_used", "nn_macs")
    if len(rows) != 1 or any(k not in rows[0] for k in needed):
        raise ExportError(f"{summary}: expected one row with {', '.join(needed)}")
    return rows[0]


def _bytes(row: dict, key: str) -> int:
    """The CSV's memory figures are KiB as floats."""
    return int(round(float(row[key]) * _KIB))


# ------------------------------------------------------------------------------- operators


def _split_ops(path: Path, stdout: str) -> tuple[list[str], dict[str, str]]:
    """(NPU op types, {CPU op type: reason}) in the model's TFLite names.

    Vela lists CPU operators by their output tensor ("CPU: <op> = <ofm> (outputs [...])") and
    explains each refusal in a warning naming the op and its ofm. Output names map back to the
    model's operators; an op type is NPU when at least one instance is not on the CPU.
    """
    producers = _producers(path)
    reasons: dict[str, list[str]] = {}
    for vela_op, ofm, text in _WARNING.findall(stdout):
        op = producers.get(ofm) or producers.get(ofm.removesuffix("_act")) or vela_op
        reason = " ".join(line.strip().removeprefix("Reason: ") for line in text.splitlines() if line.strip())
        reasons.setdefault(op, [])
        if reason not in reasons[op]:
            reasons[op].append(reason)
    cpu_counts = Counter(producers.get(ofm) or vela_op for vela_op, ofm in _CPU_LINE.findall(stdout))
    all_counts = Counter(producers.values())
    order = list(dict.fromkeys(producers.values()))
    npu = [op for op in order if all_counts[op] > cpu_counts.get(op, 0)]
    cpu_ops = [op for op in order if op in cpu_counts] + [op for op in cpu_counts if op not in all_counts]
    cpu = {op: "; ".join(reasons.get(op, ["Vela gave no reason"])) for op in cpu_ops}
    return npu, cpu


def _producers(path: Path) -> dict[str, str]:
    """{output tensor name: TFLite op type} for every operator of the first subgraph, in order."""
    schema, model = _read_tflite(path)
    graph, codes = model.Subgraphs(0), [name for name, _ in _op_codes(schema, model)]
    out = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        for k in range(op.OutputsLength()):
            out[graph.Tensors(op.Outputs(k)).Name().decode(errors="replace")] = codes[op.OpcodeIndex()]
    return out


def _message(result: dict, tflite_path) -> str:
    if not result["cpu_ops"]:
        return (f"every operator runs on the {result['accelerator']} NPU: Vela estimates "
                f"{result['time_s'] * 1e3:.3f} ms at {result['clock_hz'] / 1e6:g} MHz")
    text = (f"{', '.join(result['cpu_ops'])} fall back to the CPU (TFLite Micro kernels on the Cortex-M); "
            "Vela's cycles and time cover the NPU part only")
    parts = float_parts(tflite_path)
    if parts.kind is not None:
        text = (f"the model is not full-integer ({parts.kind}): the Ethos-U NPU runs int8/int16 only, so "
                f"{text}. Use the int8 export")
    return text
