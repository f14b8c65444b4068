"""edgeveil-device on an arm64 userland under qemu-user (benchmarks/arm64_device.py).

Fast: a missing userland is refused up front, naming every missing step; the step arithmetic.
Slow: on a tiny exported run, the script runs the int8 head under emulation with reference kernels
and XNNPACK and compares the codes with this machine's. Skips, saying what is missing, unless
qemu-user is installed and the userland prepared (`python benchmarks/arm64_device.py --prepare`).
"""
from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_exported_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "arm64_device.py"


def _script():
    """benchmarks/arm64_device.py as a module (it imports arm64_userland from beside it)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.append(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("arm64_device", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unprepared_userland_is_refused_naming_each_missing_step(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(REPO / "tests" / "fixtures" / "digits_tiny", run_dir / "export")
    done = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run_dir), "--arm64-dir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    assert "arm64 userland not ready" in done.stderr
    assert f"no arm64 python3.11 at {tmp_path / 'none'}" in done.stderr
    assert f"arm64_device.py --prepare --arm64-dir {tmp_path / 'none'}" in done.stderr
    assert "no aarch64 edgeveil[device] environment" in done.stderr


def test_steps_counts_quantization_steps():
    a = np.array([[-128, 0, 5, 127]], np.int8)
    got = _script().steps(a, np.array([[-127, 0, 3, 127]], np.int8))
    assert got == {"values": 4, "max_steps": 2, "differ": 2, "differ_share": 0.5, "mean_steps": 0.75}
    with pytest.raises(ValueError, match="shapes differ"):
        _script().steps(a, a[:, :2])


@pytest.fixture(scope="module")
def userland():
    script = _script()
    u = script.Userland(script.DEFAULT_DIR)
    problems = u.missing()
    if problems:
        pytest.skip("arm64 userland not available: " + "; ".join(problems))
    return u


@pytest.fixture(scope="module")
def arm64_report(userland, tmp_path_factory):
    run_dir = tiny_exported_run(tmp_path_factory, "arm64", "[int8]")
    out = tmp_path_factory.mktemp("arm64_results")
    done = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run_dir), "--limit", "16", "--runs", "5",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads((out / "arm64_device.json").read_text()), (out / "arm64_device.md").read_text(), userland


@pytest.mark.slow
def test_the_arm64_runner_is_the_installed_device_package_alone(arm64_report):
    doc, _, u = arm64_report
    arm = doc["sides"]["aarch64/ai_edge_litert"]["reference"]
    assert arm["machine"] == "aarch64" and arm["runtime"] == "ai_edge_litert" and arm["images"] == 16
    assert Path(arm["edgeveil_from"]).is_relative_to(u.sites["ai_edge_litert"])  # not the checkout
    assert arm["heavy_installed"] == [] and arm["heavy_loaded"] == []
    assert doc["sides"]["host/ai_edge_litert"]["reference"]["machine"] == platform.machine()


@pytest.mark.slow
def test_arm64_reference_kernels_are_bit_exact_and_xnnpack_within_a_step(arm64_report):
    doc, md, _ = arm64_report
    rows = {(r["arm64"], r["host"]): r for r in doc["comparisons"] if r["arm64"].startswith("ai_edge_litert")}
    ref = [r for (a, h), r in rows.items() if "reference" in a and "reference" in h]
    xnn = [r for (a, h), r in rows.items() if a.endswith("XNNPACK") and h.endswith("XNNPACK")]
    assert len(ref) == 1 and len(xnn) == 1, list(rows)  # XNNPACK really ran on both sides
    assert ref[0]["max_steps"] == 0 and ref[0]["inputs_identical"] and ref[0]["values"] > 0
    assert xnn[0]["max_steps"] <= 1 and xnn[0]["inputs_identical"]
    assert "| max steps |" in md and "not a board's latency" in md


@pytest.mark.slow
def test_edgeveil_device_bench_runs_under_emulation(arm64_report):
    doc, _, _ = arm64_report
    emulated = [b for b in doc["bench"] if b["emulated"]]
    assert emulated and all(b["machine"] == "aarch64" and b["count"] == 5 and b["p50_us"] > 0 for b in emulated)
    assert {b["xnnpack_requested"] for b in emulated} == {True, False}
