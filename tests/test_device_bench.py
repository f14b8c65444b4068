"""The device benchmark (bench_model, bench_export_dir) and the `edgeveil-device` command."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeveil.device import cli
from edgeveil.device.bench import bench_export_dir, bench_model, format_table
from edgeveil.device.interpreter import Runtime, find_interpreter

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"
INT8 = FIXTURE / "head_int8.tflite"
FIELDS = ("init_us", "first_inference_us", "warmup_avg_us", "count", "avg_us", "std_us", "min_us", "max_us",
          "p50_us", "p90_us", "p99_us", "memory_init_mb", "memory_overall_mb", "peak_rss_mb", "rss_growth_mb",
          "model_bytes", "num_threads", "runtime", "xnnpack", "xnnpack_requested", "machine")


def test_bench_model_reports_benchmark_model_fields_in_order():
    r = bench_model(INT8, runs=30, warmup=3)
    assert all(k in r for k in FIELDS), [k for k in FIELDS if k not in r]
    assert r["count"] == 30 and r["warmup_runs"] == 3 and r["num_threads"] == 1
    assert 0 < r["min_us"] <= r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["max_us"]
    assert r["min_us"] <= r["avg_us"] <= r["max_us"] and r["std_us"] >= 0
    assert r["init_us"] > 0 and r["first_inference_us"] > 0 and r["warmup_avg_us"] > 0
    assert r["model_bytes"] == INT8.stat().st_size and r["input"] == {"shape": [1, 16, 16, 1], "dtype": "int8"}
    assert r["runtime"]["name"] == "ai_edge_litert" and r["runtime"]["version"]
    assert r["peak_rss_mb"] > 10  # numpy + the interpreter alone take more than that
    assert r["memory_overall_mb"] == pytest.approx(r["memory_init_mb"] + r["rss_growth_mb"], abs=0.01)
    assert r["machine"]["cpu_count"] >= 1 and r["machine"]["platform"]
    json.dumps(r, allow_nan=False)  # JSON-ready


def test_xnnpack_flag_follows_the_delegate_for_int8_on_litert():
    on = bench_model(INT8, runtime="ai_edge_litert", runs=5, warmup=0, xnnpack=True)
    off = bench_model(INT8, runtime="ai_edge_litert", runs=5, warmup=0, xnnpack=False)
    assert (on["xnnpack"], on["xnnpack_requested"], on["resolver"]) == (True, True, "auto")
    assert (off["xnnpack"], off["xnnpack_requested"]) == (False, False)
    assert off["resolver"] == "builtin_without_default_delegates"
    assert on["warmup_avg_us"] is None


def test_min_seconds_extends_the_count():
    r = bench_model(INT8, runs=1, warmup=0, min_seconds=0.05)
    assert r["count"] > 1 and r["count"] * r["avg_us"] >= 0.05e6 * 0.5


@pytest.mark.parametrize("kwargs, message", [({"runs": 0}, "runs must be an int >= 1"),
                                             ({"warmup": -1}, "warmup must be an int >= 0"),
                                             ({"threads": 0}, "num_threads must be an int >= 1"),
                                             ({"min_seconds": -1}, "min_seconds")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_model(INT8, **kwargs)


def test_missing_and_corrupt_models_are_named(tmp_path):
    from edgeveil.device.interpreter import InterpreterError

    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        bench_model(tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(INT8.read_bytes()[:700])
    with pytest.raises(InterpreterError, match="bad.tflite"):
        bench_model(bad)


def test_bench_export_dir_covers_every_artifact_and_setting():
    seen = []
    report = bench_export_dir(FIXTURE, runs=5, warmup=1,
                              on_result=lambda done, total, row: seen.append((done, total)))
    rows = report["results"]
    assert [(r["precision"], r["num_threads"], r["xnnpack_requested"]) for r in rows] == [
        (p, t, x) for p in ("fp32", "int8") for t in (1, 2) for x in (True, False)]
    assert seen == [(i, 8) for i in range(1, 9)] and report["skipped"] == []
    assert report["model_id"] == json.loads((FIXTURE / "manifest.json").read_text())["model_id"]
    assert report["schema"] == "edgeveil.bench/1" and report["settings"]["runs"] == 5
    assert all("machine" not in r and r["count"] == 5 for r in rows) and report["machine"]["cpu_count"] >= 1
    int8_on = [r["xnnpack"] for r in rows if r["precision"] == "int8" and r["xnnpack_requested"]]
    assert int8_on == [True, True]
    json.dumps(report, allow_nan=False)


def test_bench_export_dir_skips_xnnpack_off_when_the_runtime_cannot(tmp_path):
    bare = Runtime("bare", "0", find_interpreter("ai_edge_litert").interpreter_cls, None)
    report = bench_export_dir(FIXTURE, runs=3, warmup=0, threads=(1,), runtime=bare)
    assert [r["xnnpack_requested"] for r in report["results"]] == [True, True]
    skipped = [(s["precision"], s["xnnpack_requested"]) for s in report["skipped"]]
    assert skipped == [("fp32", False), ("int8", False)]
    assert "cannot turn XNNPACK off" in report["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="named runtime"):
        bench_export_dir(FIXTURE, runs=3, runtime=bare, isolate=True)


def test_bench_export_dir_checks_sha256(tmp_path):
    out = tmp_path / "export"
    shutil.copytree(FIXTURE, out)
    (out / "head_fp32.tflite").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="head_fp32.tflite does not match field artifacts.fp32.sha256"):
        bench_export_dir(out, runs=3)


def test_bench_export_dir_isolated_runs_in_fresh_processes():
    report = bench_export_dir(FIXTURE, runs=5, warmup=1, threads=(1,), xnnpack=(True,), isolate=True)
    assert [r["precision"] for r in report["results"]] == ["fp32", "int8"] and report["settings"]["isolated"]
    assert all(r["count"] == 5 and r["xnnpack"] is True for r in report["results"])


def test_format_table_says_when_xnnpack_was_asked_but_not_applied():
    row = bench_model(INT8, runs=3, warmup=0)
    row = {**row, "xnnpack": False}
    table = format_table([row])
    assert "off (asked on)" in table and "head_int8.tflite" in table and table.count("\n") == 1


# ------------------------------------------------------------------------------- CLI


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "deep" / "bench.json"
    argv = ["bench", str(INT8), "--runs", "7", "--warmup", "2", "--threads", "2", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "head_int8.tflite" in printed and "p90_us" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["count"] == 7 and result["num_threads"] == 2 and result["xnnpack"] is True
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # atomic: no temp file left


def test_cli_no_xnnpack_and_quiet(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert cli.main(["bench", str(INT8), "--runs", "3", "--no-xnnpack", "--quiet", "--json", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text())["xnnpack"] is False


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), (b"\x00" * 64, "cannot load")])
def test_cli_bad_model_exits_1_with_a_message(tmp_path, capsys, content, needle):
    model = tmp_path / "model.tflite"
    if content is not None:
        model.write_bytes(content)
    assert cli.main(["bench", str(model), "--runs", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgeveil-device: error:") and str(model) in err and needle in err
    assert "Traceback" not in err


def test_cli_entry_point_has_no_traceback_on_error(tmp_path):
    exe = shutil.which("edgeveil-device") or shutil.which("edgeveil-device", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "edgeveil.device.cli"]
    done = subprocess.run([*cmd, "bench", str(tmp_path / "missing.tflite")], capture_output=True, text=True)
    assert done.returncode == 1 and "missing.tflite does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    usage = subprocess.run([*cmd, "bench"], capture_output=True, text=True)
    assert usage.returncode == 2 and "MODEL.tflite" in usage.stderr


# ------------------------------------------------------------------------------- the per-image path


def test_bench_path_times_raw_and_the_path_side_by_side():
    from edgeveil.device.bench import bench_path, format_path_table

    r = bench_path(FIXTURE, "int8", runs=40, warmup=2)
    stages = r["stages"]
    assert set(stages) == {"raw", "path", "encode", "whole"} and all(s["count"] == 40 for s in stages.values())
    assert all(0 < s["min_us"] <= s["p50_us"] <= s["p90_us"] for s in stages.values())
    assert r["ratios"]["whole/raw"] == pytest.approx(stages["whole"]["p50_us"] / stages["raw"]["p50_us"], abs=1e-3)
    # whole is run + encode on one clock, so its median sits between the larger part and the sum
    assert stages["whole"]["p50_us"] >= stages["path"]["min_us"]
    assert r["frame_bytes"] == 54 + len("bench") + 4 * 4 + 4 + 8 * 8 * 8 + 32  # int8 (1, 8, 8, 8) features
    assert r["features"] == {"shape": [1, 8, 8, 8], "dtype": "int8"} and r["input"]["dtype"] == "int8"
    assert r["xnnpack"] is True and r["num_threads"] == 1 and r["schema"] == "edgeveil.bench_path/1"
    table = format_path_table(r)
    assert table.count("\n") == 4 and "HeadRunner.run" in table and f"{r['frame_bytes']} B frame" in table
    json.dumps(r, allow_nan=False)


def test_bench_path_refuses_bad_counts():
    from edgeveil.device.bench import bench_path

    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        bench_path(FIXTURE, runs=0)
    with pytest.raises(ValueError, match="images must be an int >= 1"):
        bench_path(FIXTURE, images=0)


def test_cli_path_by_model_file_or_folder(tmp_path, capsys):
    out = tmp_path / "path.json"
    assert cli.main(["bench", str(INT8), "--path", "--runs", "10", "--warmup", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "raw set_tensor+invoke+get_tensor" in printed and "path/raw" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["precision"] == "int8" and result["stages"]["raw"]["count"] == 10
    assert cli.main(["bench", str(FIXTURE), "--path", "--precision", "fp32", "--runs", "5", "--quiet",
                     "--json", str(out)]) == 0
    assert capsys.readouterr().out == "" and json.loads(out.read_text())["features"]["dtype"] == "float32"


def test_cli_path_needs_the_manifest(tmp_path, capsys):
    lone = tmp_path / "head_int8.tflite"
    shutil.copy(INT8, lone)
    assert cli.main(["bench", str(lone), "--path", "--runs", "3"]) == 1
    assert "no manifest.json in" in capsys.readouterr().err
    assert cli.main(["bench", str(INT8), "--path", "--precision", "fp32", "--runs", "3"]) == 1
    assert "disagrees with head_int8.tflite" in capsys.readouterr().err
