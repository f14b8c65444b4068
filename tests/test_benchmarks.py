"""The benchmark scripts run end to end (slow: they train, convert and time real models)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_latency_quick(shared_data, tmp_path):
    """--quick trains smallcnn briefly, builds a reduced ceiling, times every engine once and reports."""
    out = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_latency.py"), "--quick",
                           "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-5000:]
    assert "pass 1/1 smallcnn" in done.stderr  # progress lines
    assert "| head | MACs (M) | int8 p50 / p90 (us) |" in done.stdout and "Sanity check" in done.stdout
    report = json.loads((out / "device_latency_quick.json").read_text())
    assert report["quick"] and report["settings"]["passes"] == 1
    rows = {r["head"]: r for r in report["results"]}
    assert list(rows) == ["smallcnn", "CEIL"]
    assert rows["CEIL"]["macs"] == 2 * 128 * 128 * 9 * 14 * 14 and rows["CEIL"]["pct_ceiling"] == pytest.approx(100)
    assert rows["smallcnn"]["macs"] > 0 and rows["smallcnn"]["budget"]["epochs"] == 1
    expected = {"int8", "fp32", "torch", "ort", "int8_2t"}
    if not report["tflite_runtime_skipped"]:  # None unless its venv could not be built (no registry access)
        expected.add("tflrt_int8")
    for row in rows.values():
        assert set(row["engines"]) == expected
        assert all(e["p50_us"] > 0 and e["p90_us"] >= e["p50_us"] for e in row["engines"].values())
        assert row["engines"]["int8"]["xnnpack"] is True and row["gmacs"] > 0
    if "tflrt_int8" in expected:  # tflite-runtime 2.14 does not delegate int8 models to XNNPACK
        assert all(r["engines"]["tflrt_int8"]["xnnpack"] is False for r in rows.values())
    md = (out / "device_latency_quick.md").read_text()
    assert md.splitlines()[2].startswith("Reproduce: `python benchmarks/device_latency.py --quick")
    assert not (out / "device_latency.json").exists()  # --quick never overwrites the full results
    assert seconds < 600, f"--quick took {seconds:.0f} s"  # budget 3 min on an idle 2-core machine


@pytest.mark.slow
def test_attacks_quick(tmp_path):
    """--quick on MNIST: four models trained briefly, every attack on float and int8, the verdicts,
    the score chart, the reconstruction grid and the comparison with the published numbers."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attacks.py"), "--quick", "--datasets", "mnist",
                           "--threads", "1", "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads((out / "attacks_quick.json").read_text())
    assert [r["defense"] for r in report["records"]] == ["none", "infoscissors", "siftfunnel", "cem"]
    for r in report["records"]:
        assert set(r["attacks"]) == {"inverse", "rmle", "ka", "shadow", "pmc", "mine"}
        for a in r["attacks"].values():
            assert set(a["precisions"]) == {"float", "int8"}
            assert all(p["seconds"] > 0 for p in a["precisions"].values())
        assert (r["verdict"]["outcome"] == "baseline") == (r["defense"] == "none")  # the others judged against none
        assert r["verdict"]["diagnostics"] and all(c["attack"] != "mine" for c in r["verdict"]["checks"])
    md = (out / "attacks_quick.md").read_text()
    for words in ("## Verdicts", "| none | rmle | ssim |", "| cem 8 | pmc | accuracy |", "## Against the published",
                  "- rMLE on mnist: SSIM", "![mnist reconstructions from int8 features](attacks_mnist_quick.png)"):
        assert words in md, words
    for png in ("attacks_quick.png", "attacks_mnist_quick.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_device_path_quick(shared_data, tmp_path):
    """--quick trains smallcnn briefly and times raw, the path, its 'before' (git) and the encode, side by side."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_path.py"), "--quick",
                           "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "pass 1/1 smallcnn" in done.stderr and "| head | MACs (M) |" in done.stdout
    report = json.loads((out / "device_path_quick.json").read_text())
    (row,) = report["results"]
    assert row["head"] == "smallcnn" and row["iterations"] == [300] and row["frame_bytes"] == 6383
    assert all(row["stages"][s]["p50_us"] > 0 for s in ("raw", "path", "encode", "whole"))
    assert row["stages"]["whole"]["p50_us"] > row["stages"]["path"]["p50_us"] > row["stages"]["raw"]["p50_us"] * 0.9
    assert row["before"] is not None and row["before"]["whole"] > 0  # the 958cc1f path, loaded from git
    assert set(row["verdicts"]) == {"path/raw", "whole/raw <= 1.4", "encode <= 15 us"}
