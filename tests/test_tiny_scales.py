"""A dead layer (all zero over the calibration set) gets a ~1e-9 scale; the export must catch it.

ai-edge-litert 2.3's XNNPACK refuses such models or aborts the process, so the model here is only
ever loaded without XNNPACK.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgeveil.device.interpreter import find_interpreter, run
from edgeveil.export.convert import TINY_SCALE, tiny_scales
from edgeveil.export.estimate import _convert_int8, _in_fresh_process

if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tensorflow is needed to build the test models", allow_module_level=True)


def _int8_model(path, dead: bool) -> None:
    """conv -> ReLU with a bias of -100 when `dead`: every output is 0 on the calibration data.
    Runs in a fresh process: TensorFlow stays out of the test process (see _in_fresh_process)."""
    import tensorflow as tf

    inp = tf.keras.Input((8, 8, 1), batch_size=1)
    conv = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")
    out = conv(inp)
    model = tf.keras.Model(inp, out)
    kernel, bias = conv.get_weights()
    conv.set_weights([np.full_like(kernel, 0.1), np.full_like(bias, -100.0 if dead else 0.1)])
    path.write_bytes(_convert_int8(model, 0))


def test_a_dead_layer_is_found_and_runs_without_xnnpack(tmp_path):
    dead, alive = tmp_path / "dead.tflite", tmp_path / "alive.tflite"
    _in_fresh_process(_int8_model, dead, True)
    _in_fresh_process(_int8_model, alive, False)
    found = tiny_scales(dead)
    assert found and all(f["min_scale"] < TINY_SCALE for f in found)
    assert {f["dtype"] for f in found} <= {"int8", "int16"}
    assert tiny_scales(alive) == []
    model = find_interpreter("ai_edge_litert").make(dead, xnnpack=False)
    codes = run(model, np.zeros((2, 8, 8, 1), np.int8))
    assert codes.shape == (2, 8, 8, 4) and len(np.unique(codes)) == 1  # all at the zero point
