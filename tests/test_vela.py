"""Arm Vela (ethos-u-vela) run for real on the committed fixture: its estimate read back, checked against
Vela's own CSV and against physics (an NPU with M MACs per cycle needs at least MACs / M cycles), and
float models, whose every op Vela leaves on the CPU."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("ethosu.vela")

from edgeveil.export.convert import tflite_operators  # noqa: E402
from edgeveil.export.vela import ACCELERATORS, npu_support, vela_estimate  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"
INT8, FP32 = FIXTURE / "head_int8.tflite", FIXTURE / "head_fp32.tflite"


@pytest.fixture(scope="module")
def u55(tmp_path_factory) -> tuple[dict, Path]:
    workdir = tmp_path_factory.mktemp("vela_u55")
    return vela_estimate(INT8, "ethos-u55-128", workdir=workdir), workdir


def test_int8_head_maps_to_the_npu_with_a_positive_estimate(u55):
    r, _ = u55
    assert r["accelerator"] == "ethos-u55-128" and r["vela_version"].startswith("5.")
    assert r["cycles"] > 0 and r["time_s"] == pytest.approx(r["cycles"] / r["clock_hz"])
    assert r["clock_hz"] == 500e6  # Vela's default U55 system config, Ethos_U55_High_End_Embedded
    assert r["config"] == {"system_config": "Ethos_U55_High_End_Embedded", "memory_mode": "Shared_Sram",
                           "config_file": "Arm/vela.ini"}
    assert r["sram_bytes"] > 0 and r["flash_bytes"] > 0 and r["optimised_model"] > 0
    assert r["cpu_ops"] == [] and r["cpu_reasons"] == {}
    assert r["npu_ops"] == tflite_operators(INT8)  # PAD is fused into the NPU convolution
    assert r["cycles"] >= r["macs"] / 128 > 0  # 128 MACs per cycle at most
    assert "every operator runs on the ethos-u55-128 NPU" in r["message"]
    assert "not a measurement" in r["estimate"]


def test_estimate_is_what_vela_wrote(u55):
    r, workdir = u55
    (summary,) = (workdir / "out").glob("*_summary_*.csv")
    row = next(csv.DictReader(summary.open()))
    assert r["cycles"] == int(float(row["cycles_total"]))
    assert r["time_s"] == pytest.approx(float(row["inference_time"]))
    assert r["sram_bytes"] == round(float(row["sram_memory_used"]) * 1024)
    assert r["optimised_model"] == (workdir / "out" / "head_int8_vela.tflite").stat().st_size


def test_a_slower_clock_keeps_the_cycles_and_stretches_the_time(u55):
    fast, _ = u55
    slow = vela_estimate(INT8, "ethos-u55-128", clock_hz=250e6)
    assert slow["clock_hz"] == 250e6 and slow["config"]["system_config"].startswith("Ethos_U55_High_End_Embedded")
    assert slow["cycles"] == pytest.approx(fast["cycles"], rel=0.02)
    assert slow["time_s"] == pytest.approx(2 * fast["time_s"], rel=0.02)


def test_u65_uses_its_own_default_system(u55):
    r = vela_estimate(INT8, "ethos-u65-256")
    assert r["config"]["system_config"] == "Ethos_U65_Client_Server" and r["clock_hz"] == 1e9
    assert r["cycles"] >= r["macs"] / 256 > 0 and r["cpu_ops"] == []


def test_float_model_is_passed_to_the_cpu_op_by_op_and_said_so():
    """Vela does not refuse a float model: every op stays on the CPU and the NPU estimate is 0 cycles."""
    r = vela_estimate(FP32)
    assert r["npu_ops"] == [] and r["cpu_ops"] == tflite_operators(FP32) == ["CONV_2D", "PAD"]
    assert all("Float32" in reason for reason in r["cpu_reasons"].values())
    assert r["cycles"] == 0 and r["macs"] == 0
    assert "not full-integer (fp32)" in r["message"] and "fall back to the CPU" in r["message"]
    support = npu_support(FP32)
    assert support["npu"] == [] and set(support["cpu"]) == {"CONV_2D", "PAD"}


@pytest.mark.parametrize("kwargs, message", [
    ({"accelerator": "ethos-u99-1"}, "accelerator must be one of " + ", ".join(ACCELERATORS)),
    ({"system_config": "Nope"}, "system_config 'Nope' is not in Vela's Arm/vela.ini; known: Ethos_U55_Deep_Embedded"),
    ({"memory_mode": "Nope"}, "memory_mode 'Nope' is not in Vela's Arm/vela.ini; known: Sram_Only"),
    ({"clock_hz": 5}, "clock_hz must be an NPU clock in Hz"),
])
def test_bad_options_are_named_before_vela_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vela_estimate(INT8, **kwargs)


def test_missing_or_garbled_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        vela_estimate(tmp_path / "nope.tflite")
    (tmp_path / "x.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="x.tflite is not a .tflite model"):
        npu_support(tmp_path / "x.tflite")
