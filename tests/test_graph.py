"""Graph figures of a .tflite (MACs, parameters, the activation lower bound) and the latency estimator.

Tiny Keras models converted to full int8 by TensorFlow's converter (once per module) are counted
by hand; the lower bound is checked against TFLite Micro's real planner, which it must not exceed.
The MLPerf Tiny ResNet-8 check (slow) runs the reference model through the same code.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from edgeveil.export.estimate import (ENGINES, MLPERF_TINY_IC, RESNET8_MACS, _convert_int8, _in_fresh_process,
                                      estimate_latency)
from edgeveil.export.estimate import macs_by_class
from edgeveil.export.graph import activation_lower_bound, macs_by_type, parameter_count, read_graph, summarize

H = W = 8
CIN = 2


def _int8(model, path: Path) -> None:
    """Full-int8 conversion (int8 I/O) with seeded random calibration, as for ResNet-8."""
    path.write_bytes(_convert_int8(model, 0))


def _build(out: str) -> None:
    """mixed: conv 3x3 (2->4) -> depthwise 3x3 -> add(conv, dw) -> avg pool 2 -> flatten -> dense 5;
    chain: conv 2->4 -> conv 4->8 -> conv 8->4; residual: a = conv(x), b = conv(a), a + b.
    Runs in a fresh process: TensorFlow must stay out of the test process (see _in_fresh_process)."""
    import tensorflow as tf

    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    x = tf.keras.Input((H, W, CIN), batch_size=1)
    c = L.Conv2D(4, 3, padding="same")(x)
    a = L.Add()([c, L.DepthwiseConv2D(3, padding="same")(c)])
    dense = L.Dense(5, bias_initializer="ones")  # a zero bias would be dropped by the converter
    mixed = tf.keras.Model(x, dense(L.Flatten()(L.AveragePooling2D(2)(a))))
    chain = tf.keras.Model(x, L.Conv2D(4, 3, padding="same")(L.Conv2D(8, 3, padding="same")(
        L.Conv2D(4, 3, padding="same")(x))))
    r1 = L.Conv2D(4, 3, padding="same", activation="relu")(x)
    residual = tf.keras.Model(x, L.Add()([r1, L.Conv2D(4, 3, padding="same")(r1)]))
    for name, model in (("mixed", mixed), ("chain", chain), ("residual", residual)):
        _int8(model, Path(out) / f"{name}.tflite")


def _need_tensorflow() -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install 'edgeveil[export]')")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _need_tensorflow()
    out = tmp_path_factory.mktemp("graph")
    _in_fresh_process(_build, str(out))
    return {name: out / f"{name}.tflite" for name in ("mixed", "chain", "residual")}


def test_macs_and_elements_match_a_hand_count(models):
    by_type = macs_by_type(read_graph(models["mixed"]))
    assert by_type["CONV_2D"]["macs"] == H * W * 4 * (3 * 3 * CIN)  # out elements x kh x kw x cin
    assert by_type["DEPTHWISE_CONV_2D"]["macs"] == H * W * 4 * (3 * 3)
    assert by_type["FULLY_CONNECTED"]["macs"] == (H // 2) * (W // 2) * 4 * 5
    assert by_type["ADD"] == {"count": 1, "macs": 0, "elements": H * W * 4}
    assert by_type["AVERAGE_POOL_2D"]["elements"] == (H // 2) * (W // 2) * 4 * (2 * 2)
    assert macs_by_class(by_type) == {"conv": by_type["CONV_2D"]["macs"],
                                      "depthwise": by_type["DEPTHWISE_CONV_2D"]["macs"], "fully_connected": 320}


def test_parameters_are_weights_and_biases_not_index_data(models):
    conv, dw, dense = 3 * 3 * CIN * 4 + 4, 3 * 3 * 4 + 4, (H // 2) * (W // 2) * 4 * 5 + 5
    graph = read_graph(models["mixed"])
    assert "RESHAPE" in [op.name for op in graph.ops]  # its int32 shape operand is not a parameter
    assert parameter_count(graph) == conv + dw + dense


def test_lower_bound_on_a_chain_is_the_largest_input_plus_output(models):
    sizes = [H * W * c for c in (CIN, 4, 8, 4)]  # int8: one byte per element
    bound = activation_lower_bound(read_graph(models["chain"]))
    assert bound["bytes"] == max(a + b for a, b in zip(sizes, sizes[1:])) == 4 * 64 + 8 * 64
    assert bound["op_index"] == 1 and len(bound["live"]) == 2


def test_a_skip_connection_keeps_three_tensors_live(models):
    bound = activation_lower_bound(read_graph(models["residual"]))
    assert bound["op"] == "ADD" and bound["bytes"] == 3 * H * W * 4


@pytest.mark.parametrize("name", ["mixed", "chain", "residual"])
def test_tflite_micro_never_plans_below_the_bound(models, name):
    pytest.importorskip("tflite_micro")
    from edgeveil.export.tflm import measure_arena

    head = measure_arena(models[name])["breakdown"]["head_bytes"]
    assert head >= summarize(read_graph(models[name]))["activation_lower_bound_bytes"]


def test_engine_ranges_reproduce_the_published_rows_they_come_from():
    tflm_m4 = next(r for r in MLPERF_TINY_IC if "TFLM + CMSIS-NN" in r[3])
    est = estimate_latency({"conv": RESNET8_MACS}, "cortex-m4", tflm_m4[2])
    assert est["high_ms"] == pytest.approx(tflm_m4[4])
    assert est["label"] == "estimated" and est["cycles_high"] > est["cycles_low"] > 0
    pi4 = next(r for r in MLPERF_TINY_IC if r[1] == "Cortex-A72")
    assert estimate_latency({"conv": RESNET8_MACS}, "cortex-a72", pi4[2])["low_ms"] == pytest.approx(pi4[4])
    for engine in ENGINES.values():
        for low, high in engine.cycles_per_mac.values():
            assert 0 < low < high


def test_estimate_scales_with_macs_and_clock_and_flags_what_it_cannot_see():
    one = estimate_latency({"conv": 2_000_000}, "cortex-m7", 480e6)
    two = estimate_latency({"conv": 4_000_000}, "cortex-m7", 240e6)
    assert two["low_ms"] == pytest.approx(4 * one["low_ms"]) and not one["caveats"]
    esp = estimate_latency({"conv": 1_000_000, "depthwise": 1_000_000}, "xtensa-lx7-esp-nn", 240e6)
    lo, hi = ENGINES["xtensa-lx7-esp-nn"].range_for("depthwise")
    assert esp["cycles_per_mac"]["depthwise"] == [lo, hi] and any("depthwise" in c for c in esp["caveats"])
    assert any("optimistic" in c for c in estimate_latency({"conv": 50_000}, "cortex-m4", 64e6)["caveats"])
    with pytest.raises(ValueError, match="unknown estimator engine 'cortex-m99'"):
        estimate_latency({"conv": 1}, "cortex-m99", 1e8)


@pytest.mark.slow
def test_resnet8_counts_12_5m_macs_and_its_published_latencies_fall_in_the_ranges(tmp_path_factory):
    _need_tensorflow()
    from edgeveil.export.estimate import resnet8_check, resnet8_tflite

    path = resnet8_tflite(tmp_path_factory.mktemp("cache"))
    convs = [(32, 16, 3, 3), (32, 16, 3, 16), (32, 16, 3, 16),  # (out H=W, Cout, k, Cin): stem, stack 1
             (16, 32, 3, 16), (16, 32, 3, 32), (16, 32, 1, 16),  # stack 2 and its 1x1 shortcut
             (8, 64, 3, 32), (8, 64, 3, 64), (8, 64, 1, 32)]  # stack 3
    hand = sum(hw * hw * cout * k * k * cin for hw, cout, k, cin in convs) + 64 * 10
    check = resnet8_check(path)
    assert check["macs"] == hand and math.isclose(check["macs"], RESNET8_MACS, rel_tol=1e-3)
    assert summarize(read_graph(path))["activation_lower_bound_bytes"] == 3 * 32 * 32 * 16
    compared = [r for r in check["rows"] if r["engine"]]
    assert len(compared) >= 10 and all(r["inside"] for r in compared)
    assert {r["engine"] for r in compared} == {"cortex-m4", "cortex-m7", "cortex-m55", "cortex-a72"}
