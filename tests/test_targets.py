"""`edgeveil export --target`: flashable files, the operator check, and the fit report on a real tiny run.

One digits run is trained and exported (fp32 + int8) through the CLI with `--target stm32h743`;
the other tests read what it wrote or call the library on it. The unsupported-operator model
(a conv followed by GELU, which TFLite Micro has no kernel for) is built by TensorFlow's converter.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK, one_torch_thread
from edgeveil.device.files import sha256_file
from edgeveil.device.manifest import read_manifest
from edgeveil.export.boards import get_board, load_boards
from edgeveil.export.carray import NotFullInteger
from edgeveil.export.estimate import _in_fresh_process, estimate_latency, macs_by_class
from edgeveil.export.opcheck import TFLM_BUILTINS, UnsupportedOperator, check_artifact
from edgeveil.export.targets import RUNTIME_FLASH, fit_row, target_report
from edgeveil.pipeline.cli import main
from edgeveil.pipeline.report_targets import section_targets

pytest.importorskip("tflite_micro")
pytest.importorskip("ethosu")
pytestmark = pytest.mark.convert


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir, stdout of `edgeveil export RUN --target stm32h743`, its seconds)."""
    run = tmp_path_factory.mktemp("targets") / "run"
    sets = [a for s in [*QUICK, "export.precisions=[fp32,int8]"] for a in ("--set", s)]
    assert main(["--no-progress", "train", "--out", str(run), *sets]) == 0
    import contextlib
    import io

    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(["--no-progress", "export", str(run), "--target", "stm32h743"])
    assert code == 0, out.getvalue()
    return run, out.getvalue(), time.perf_counter() - started


def _build_gelu(path: str) -> None:
    """Full-int8 conv 3x3 -> GELU on a 28x28x1 input (the tiny run's input shape). Runs in a fresh
    process: TensorFlow must stay out of the test process (see estimate._in_fresh_process)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((28, 28, 1), batch_size=1)
    model = tf.keras.Model(x, tf.keras.layers.Activation(tf.nn.gelu)(tf.keras.layers.Conv2D(4, 3, padding="same")(x)))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((1, 28, 28, 1), dtype=np.float32)] for _ in range(8))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    Path(path).write_bytes(conv.convert())


@pytest.fixture(scope="module")
def gelu_model(tmp_path_factory):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'edgeveil[export]')")
    path = tmp_path_factory.mktemp("gelu") / "gelu_int8.tflite"
    _in_fresh_process(_build_gelu, str(path))
    return path


def _targets(run: Path) -> dict:
    return read_manifest(run / "export" / "manifest.json")["targets"]


def test_export_target_writes_the_c_array_and_prints_the_fit_table(exported):
    run, stdout, seconds = exported
    export = run / "export"
    header = (export / "head_int8.h").read_text()
    assert sha256_file(export / "head_int8.tflite") in header and (export / "head_int8.cc").is_file()
    table = stdout[stdout.index("board "):]
    for name in load_boards():
        assert re.search(rf"^{re.escape(name)}\s+(yes|NO)\s", table, re.M), name
    assert "estimated" in stdout and "TFLite Micro matched LiteRT's reference kernels bit for bit" in stdout
    targets = _targets(run)
    assert targets["last_target"] == "stm32h743" and [r["board"] for r in targets["fit"]] == list(load_boards())
    print(f"export + target on a fresh tiny run: {seconds:.1f} s")


def test_fit_rows_are_the_measurements_against_the_board_figures(exported):
    run = exported[0]
    t = _targets(run)
    a, h743 = t["analysis"], next(r for r in t["fit"] if r["board"] == "stm32h743")
    assert a["arena"]["breakdown"]["head_bytes"] >= a["graph"]["activation_lower_bound_bytes"] > 0
    assert a["kernels"]["tflm_vs_reference"]["bit_exact"] and a["kernels"]["n"] > 100
    assert h743["ram"]["needed"] == a["arena"]["recommended_bytes"] > a["arena"]["arena_bytes"]
    assert h743["ram"]["limit"] == get_board("stm32h743").arena_limit_bytes
    assert h743["ram"]["margin_bytes"] == h743["ram"]["limit"] - h743["ram"]["needed"]
    assert h743["flash"]["needed"] == (run / "export" / "head_int8.tflite").stat().st_size + RUNTIME_FLASH["high_bytes"]
    expected = estimate_latency(macs_by_class(a["graph"]["by_type"]), "cortex-m7", 480e6)
    assert h743["latency"]["low_ms"] == pytest.approx(expected["low_ms"]) and h743["latency"]["label"] == "estimated"
    corstone = next(r for r in t["fit"] if r["board"] == "corstone-300")
    assert corstone["ram"]["needed"] == a["vela"]["ethos-u55-128"]["sram_bytes"]
    assert corstone["latency"]["npu_ms"] == pytest.approx(1e3 * a["vela"]["ethos-u55-128"]["time_s"])
    assert set(a["vela"]) == {"ethos-u55-128", "ethos-u65-256"}


def test_a_second_target_reuses_the_export_and_keeps_the_first(exported, capsys):
    run = exported[0]
    before = read_manifest(run / "export" / "manifest.json")["created"]
    assert main(["--no-progress", "export", str(run), "--target", "rpi4"]) == 0
    out = capsys.readouterr().out
    assert "pip install 'edgeveil[device]'" in out
    manifest = read_manifest(run / "export" / "manifest.json")
    assert manifest["created"] == before  # not converted again
    assert set(manifest["targets"]["boards"]) == {"stm32h743", "rpi4"}
    assert manifest["targets"]["boards"]["rpi4"]["files"] == {"tflite": "head_int8.tflite",
                                                              "install": get_board("rpi4").install}


def test_an_arena_larger_than_the_ram_block_is_reported_with_the_shortfall(exported):
    a = _targets(exported[0])["analysis"]
    needed = a["arena"]["recommended_bytes"]
    small = dataclasses.replace(get_board("nrf52840"), name="small", ram_bytes=needed - 1000,
                                flash_bytes=a["model_bytes"] + RUNTIME_FLASH["high_bytes"] - 24)
    row = fit_row(small, a)
    assert not row["fits"] and row["ram"]["margin_bytes"] == -1000 and row["flash"]["margin_bytes"] == -24
    assert row["reasons"] == ["TFLM arena +10% vs RAM: 1,000 B short",
                              "model + TFLM runtime (high estimate) vs flash: 24 B short (it fits with the low "
                              "runtime estimate: check the firmware's link map)"]
    tiny_flash = dataclasses.replace(small, ram_bytes=needed,
                                     flash_bytes=a["model_bytes"] + RUNTIME_FLASH["low_bytes"] - 1)
    short = RUNTIME_FLASH["high_bytes"] - RUNTIME_FLASH["low_bytes"] + 1
    assert fit_row(tiny_flash, a)["reasons"] == [f"model + TFLM runtime (high estimate) vs flash: {short:,} B short"]
    assert fit_row(dataclasses.replace(small, ram_bytes=needed, flash_bytes=10**6), a)["fits"]


def test_a_float_artifact_is_refused_for_an_mcu_and_accepted_for_a_pi(exported):
    export = exported[0] / "export"
    with pytest.raises(NotFullInteger, match="float"):
        target_report(export, "nrf52840", precision="fp32")
    assert not (export / "head_fp32.cc").exists()
    pi = target_report(export, "rpi4", precision="fp32", write=False)
    verdict = {r["board"]: r for r in pi["fit"]}
    assert verdict["rpi4"]["fits"] and not verdict["stm32h743"]["fits"]
    assert "not full-integer" in verdict["stm32h743"]["reasons"][0]


def test_an_operator_tflite_micro_lacks_is_named_and_nothing_is_written(exported, gelu_model, tmp_path):
    from edgeveil.export.tflm import measure_arena

    with pytest.raises(Exception, match="GELU"):  # the real TFLite Micro agrees with the op list
        measure_arena(gelu_model)
    assert check_artifact(gelu_model, get_board("rpi4"))["unsupported"] == []
    export = tmp_path / "run" / "export"
    shutil.copytree(exported[0] / "export", export)
    for stale in export.glob("head_*.[ch]*"):
        stale.unlink()
    shutil.copyfile(gelu_model, export / "head_int8.tflite")
    manifest = json.loads((export / "manifest.json").read_text())
    sha = sha256_file(gelu_model)
    manifest["artifacts"]["int8"].update(sha256=sha, model_id=sha[:16], bytes=gelu_model.stat().st_size)
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedOperator, match=r"TFLite Micro has no kernel for GELU"):
        target_report(export, "stm32h743")
    assert not list(export.glob("head_int8.[ch]*"))
    assert json.loads((export / "manifest.json").read_text())["targets"] == manifest["targets"]  # untouched


def test_the_op_list_only_claims_kernels_the_installed_tflite_micro_has():
    import tflite_micro

    so = next(Path(tflite_micro.__file__).parent.rglob("_runtime*.so")).read_bytes()
    registered = {m.decode() for m in re.findall(rb"Register_([A-Z][A-Z0-9_]*)Ev", so)}
    assert TFLM_BUILTINS <= registered, sorted(TFLM_BUILTINS - registered)
    assert "GELU" not in registered and "GELU" not in TFLM_BUILTINS


def test_unknown_board_fails_before_exporting(exported, capsys):
    run = exported[0]
    created = read_manifest(run / "export" / "manifest.json")["created"]
    assert main(["--no-progress", "export", str(run), "--target", "stm32h999"]) == 1
    assert "unknown board 'stm32h999'" in capsys.readouterr().err
    assert read_manifest(run / "export" / "manifest.json")["created"] == created


def test_an_export_moved_out_of_its_run_is_refused_with_the_reason(exported, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(exported[0] / "export", export)
    with pytest.raises(ValueError, match="must stay inside its run directory"):
        target_report(export, "stm32h743")


def test_report_section_has_the_fit_table(exported, tmp_path):
    lines, images = section_targets(exported[0])
    text = "\n".join(lines)
    assert images == [] and "| board | fits |" in text
    assert all(f"| {name} |" in text for name in load_boards()) and "estimated" in text
    assert "No board checked yet" in section_targets(tmp_path)[0][2]
