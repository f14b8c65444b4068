"""The offline memory plan (`edgeveil export --memory-plan offline`): the plan never overlaps two
live tensors (property check on seeded random lifetimes, judged by an independent check), TFLite
Micro really places tensors where the metadata says, the planned model stays bit-exact, and bad
input fails early with a clear message. One tiny digits run goes through the real CLI."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_exported_run
from edgeveil.export.errors import ExportError
from edgeveil.export.graph import activation_lower_bound, read_graph
from edgeveil.export.memplan import (
    PLAN_METADATA,
    Buffer,
    check_memory_plan,
    check_plan,
    embed_plan,
    live_peak,
    plan_model,
    plan_offsets,
    plan_size,
    read_plan,
    tensor_lifetimes,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"
INT8 = FIXTURE / "head_int8.tflite"


def overlapping_pairs(buffers: list[Buffer], offsets: dict[int, int]) -> list[tuple[int, int]]:
    """Every pair alive at a common step whose byte ranges intersect: a brute force over all pairs
    and steps, independent of memplan.check_plan."""
    bad = []
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            same_time = any(a.first <= s <= a.last for s in range(b.first, b.last + 1))
            same_bytes = offsets[a.tensor] < offsets[b.tensor] + b.bytes and offsets[b.tensor] < offsets[a.tensor] + a.bytes
            if same_time and same_bytes:
                bad.append((a.tensor, b.tensor))
    return bad


def random_buffers(rng, n: int) -> list[Buffer]:
    """n tensors over a short graph: mostly short lives, sizes with many repeats, as in real heads."""
    steps = int(rng.integers(2, 16))
    out = []
    for t in range(n):
        first = int(rng.integers(0, steps + 1))
        last = int(min(steps, first + rng.geometric(0.4) - 1))
        out.append(Buffer(t, f"t{t}", 16 * int(rng.choice([1, 2, 3, 5, 8, 13, 21, 64, 64, 200])), first, last))
    return out


# ------------------------------------------------------------------------------- the plan itself


def test_plans_never_overlap_live_tensors_and_never_beat_the_live_peak():
    rng = np.random.default_rng(14)
    reached, searched = 0, 0
    for case in range(400):
        buffers = random_buffers(rng, int(rng.integers(2, 20)))
        offsets, order = plan_offsets(buffers)
        assert overlapping_pairs(buffers, offsets) == [], (case, order)
        check_plan(buffers, offsets)  # agrees: no error
        assert all(offsets[b.tensor] % 16 == 0 for b in buffers)
        assert plan_size(buffers, offsets) >= live_peak(buffers)
        reached += plan_size(buffers, offsets) == live_peak(buffers)
        searched += order == "search within the live peak"
    assert reached > 300 and searched > 0  # the peak is usually reached; the rest are harder packings


# Lifetimes of the MobileNetV2 (width 0.25, split 2) int8 head: (tensor, bytes, first step, last step).
# Small tensors carried across the residual adds straddle pairs of large depthwise tensors.
MOBILENETV2 = [(0, 3072, 0, 1), (19, 8192, 1, 4), (20, 8192, 2, 3), (21, 8192, 3, 4), (22, 8192, 4, 8),
               (23, 49152, 5, 6), (24, 49152, 6, 7), (25, 8192, 7, 8), (26, 8192, 8, 12), (27, 49152, 9, 10),
               (28, 49152, 10, 11), (29, 8192, 11, 12), (30, 8192, 12, 12)]


def test_the_search_reaches_the_peak_where_every_first_fit_order_misses():
    from edgeveil.export.memplan import _ORDERS, _first_fit

    buffers = [Buffer(t, f"t{t}", size, first, last) for t, size, first, last in MOBILENETV2]
    peak = live_peak(buffers)
    assert peak == 106_496
    assert all(plan_size(buffers, _first_fit(sorted(buffers, key=key))) > peak for key in _ORDERS.values())
    offsets, method = plan_offsets(buffers)
    assert method == "search within the live peak" and plan_size(buffers, offsets) == peak
    assert overlapping_pairs(buffers, offsets) == []
    fallback, how = plan_offsets(buffers, budget=1)  # no room to search: the best first-fit plan
    assert how.startswith("first-fit") and plan_size(buffers, fallback) > peak
    assert overlapping_pairs(buffers, fallback) == []


def test_check_plan_names_the_overlapping_live_tensors():
    a, b, c = Buffer(0, "in", 32, 0, 1), Buffer(1, "mid", 32, 1, 2), Buffer(2, "out", 32, 2, 2)
    check_plan([a, b, c], {0: 0, 1: 32, 2: 0})  # in and out never live together: may share bytes
    with pytest.raises(ExportError, match=r"overlaps live tensors: 1 'mid' \(bytes 32\.\.64, steps 1\.\.2\) and 2 'out'"):
        check_plan([a, b, c], {0: 0, 1: 32, 2: 48})
    with pytest.raises(ExportError, match="tensor 1 'mid' has offset 8; expected a multiple of 16"):
        check_plan([a, b, c], {0: 0, 1: 8, 2: 64})


def test_lifetimes_of_a_real_head_match_the_graph_bound():
    buffers, count = tensor_lifetimes(INT8)
    assert count == read_graph(INT8).tensors.__len__()
    assert live_peak(buffers) == activation_lower_bound(read_graph(INT8))["bytes"]
    offsets, _ = plan_offsets(buffers)
    assert plan_size(buffers, offsets) == live_peak(buffers)


# ------------------------------------------------------------------------------- in TFLite Micro

tflm = pytest.importorskip("tflite_micro")

from edgeveil.device.runner import HeadRunner  # noqa: E402
from edgeveil.export.tflm import compare_kernels, measure_arena, tflm_outputs  # noqa: E402
from edgeveil.training.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    """int8 (200, 16, 16, 1): the bundled digits quantized the device's way for the fixture head."""
    _, pool = load_dataset("digits", image_size=16)
    return HeadRunner(FIXTURE, "int8").preprocess(pool.x[:200])


def test_planned_fixture_is_bit_exact_and_its_plan_reads_back(tmp_path, codes):
    report = plan_model(INT8, tmp_path / "planned.tflite")
    planned = tmp_path / "planned.tflite"
    buffers, count = tensor_lifetimes(INT8)
    plan = read_plan(planned.read_bytes())
    assert len(plan) == count and read_plan(INT8.read_bytes()) is None
    assert {b.tensor: plan[b.tensor] for b in buffers} == {b.tensor: report["offsets"][b.name] for b in buffers}
    assert all(plan[t] == -1 for t in range(count) if t not in {b.tensor for b in buffers})  # constants: online
    arena = measure_arena(planned, inputs=codes[:1])
    assert arena["breakdown"]["head_bytes"] == report["planned_bytes"] == report["lower_bound_bytes"]
    assert np.array_equal(tflm_outputs(planned, codes, arena_bytes=arena["arena_bytes"]), tflm_outputs(INT8, codes))
    assert compare_kernels(planned, codes)["tflm_vs_reference"]["bit_exact"]


def test_tflm_places_tensors_where_the_metadata_says(tmp_path, codes):
    """A valid but wasteful plan (every tensor in its own bytes) costs exactly the sum of the
    tensors, and a plan that overlaps live tensors breaks the outputs: TFLM follows the metadata,
    and the bit-exactness check can fail."""
    buffers, count = tensor_lifetimes(INT8)
    spread, end = {}, 0
    for b in buffers:
        spread[b.tensor], end = end, end + b.bytes
    wasteful = tmp_path / "spread.tflite"
    wasteful.write_bytes(embed_plan(INT8.read_bytes(), spread, count))
    assert measure_arena(wasteful)["breakdown"]["head_bytes"] == sum(b.bytes for b in buffers) > live_peak(buffers)
    assert np.array_equal(tflm_outputs(wasteful, codes), tflm_outputs(INT8, codes))
    clash = tmp_path / "clash.tflite"
    clash.write_bytes(embed_plan(INT8.read_bytes(), {b.tensor: 0 for b in buffers}, count))
    with pytest.raises(ExportError, match="overlaps live tensors"):
        check_plan(buffers, {b.tensor: 0 for b in buffers})
    assert not np.array_equal(tflm_outputs(clash, codes), tflm_outputs(INT8, codes))


def test_a_second_plan_replaces_the_first(tmp_path):
    first = tmp_path / "a.tflite"
    plan_model(INT8, first)
    again = plan_model(first, tmp_path / "b.tflite")
    data = (tmp_path / "b.tflite").read_bytes()
    assert data.count(PLAN_METADATA.encode()) == 1 and read_plan(data) is not None
    assert again["planned_bytes"] == again["lower_bound_bytes"]


@pytest.mark.parametrize("value", ["bogus", "", None, "OFFLINE"])
def test_unknown_memory_plan_is_refused_with_the_choices(value):
    with pytest.raises(ValueError, match=r"memory plan must be one of 'tflm' .*'offline' .*got"):
        check_memory_plan(value)


# ------------------------------------------------------------------------------- the CLI on a real run


def cli(*argv) -> tuple[int, str, str]:
    from edgeveil.pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--no-progress", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--target", "stm32h743", "--memory-plan", "bogus"], "memory plan must be one of 'tflm'"),
    (["--target", "rpi4", "--memory-plan", "offline"], "rpi4 is a linux board .* pick an MCU board"),
])
def test_bad_memory_plan_arguments_fail_before_any_work(tmp_path, args, message):
    run = tmp_path / "never_trained"  # no run at all: the check must come first
    run.mkdir()
    code, _, err = cli("export", str(run), *args)
    assert code == 1 and re.search(message, err), err
    assert not any(run.rglob("*.tflite"))


def test_offline_plan_without_a_board_is_refused_before_the_export(tmp_path):
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import export_stage

    with pytest.raises(ValueError, match="--memory-plan offline needs --target BOARD"):
        export_stage(load_config(None, []), tmp_path, progress=False, memory_plan="offline")
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    pytest.importorskip("ethosu")
    return tiny_exported_run(tmp_path_factory, "memplan", "[fp16,int8]")


@pytest.mark.slow
@pytest.mark.convert
def test_export_memory_plan_offline_writes_the_planned_model_and_both_arenas(run):
    from edgeveil.device.files import sha256_file
    from edgeveil.device.manifest import read_manifest

    code, out, err = cli("export", str(run), "--target", "stm32h743", "--memory-plan", "offline")
    assert code == 0, err
    export = run / "export"
    planned = export / "head_int8_planned.tflite"
    assert read_plan(planned.read_bytes()) is not None and read_plan((export / "head_int8.tflite").read_bytes()) is None
    header = (export / "head_int8_planned.h").read_text()
    assert sha256_file(planned) in header and (export / "head_int8_planned.cc").is_file()
    targets = read_manifest(export / "manifest.json")["targets"]
    plan, own = targets["analysis"]["memory_plan"], targets["analysis"]["arena"]
    assert plan["bit_exact_vs_unplanned"] and plan["kernels"]["tflm_vs_reference"]["bit_exact"]
    assert plan["kernels"]["n"] > 1
    assert plan["arena"]["breakdown"]["head_bytes"] == plan["planned_bytes"] == plan["lower_bound_bytes"]
    assert plan["arena"]["arena_bytes"] <= own["arena_bytes"]
    assert targets["boards"]["stm32h743"]["files"]["tflite"] == planned.name
    stm = next(r for r in targets["fit"] if r["board"] == "stm32h743")
    assert stm["ram"]["needed"] == plan["arena"]["recommended_bytes"] and "offline plan" in stm["ram"]["what"]
    assert f"arena {plan['arena']['arena_bytes']:,} B against {own['arena_bytes']:,} B with TFLM's own planner" in out
    with pytest.raises(ValueError, match="TFLite Micro has no fp16-weight"):
        plan_model(export / "head_fp16.tflite", export / "nope.tflite")
    assert not (export / "nope.tflite").exists()
