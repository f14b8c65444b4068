"""Runtime noise through the real path: train with `noise`, export int8, run on the device runner."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import QUICK
from edgeveil.pipeline.cli import main


def _train_export(out, sigma: float, caplog) -> dict:
    sets = [*QUICK, "defense.name=noise", f"defense.strength={sigma}", "export.precisions=[int8]"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["--no-progress", "train", "--out", str(out), *args]) == 0
    with caplog.at_level(logging.WARNING, logger="edgeveil.export.run"):
        assert main(["--no-progress", "export", str(out)]) == 0
    return json.loads((out / "export" / "manifest.json").read_text())


@pytest.mark.convert
def test_noise_below_one_step_is_erased_by_rounding_and_the_export_warns(tmp_path, caplog):
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_splits, read_model_info

    m = _train_export(tmp_path / "tiny", 1e-4, caplog)
    assert m["inference_noise"]["kind"] == "gaussian" and m["inference_noise"]["sigma"] == pytest.approx(1e-4)
    check = m["artifacts"]["int8"]["noise_after_rounding"]
    assert check["below_one_step"] and check["sigma_steps"] < 0.1
    assert check["changed_fraction"] < 1e-3
    assert any("rounding erases most of it" in r.getMessage() for r in caplog.records)

    test = load_splits(read_model_info(tmp_path / "tiny")).test
    noisy = HeadRunner(tmp_path / "tiny" / "export", "int8", noise_seed=1).run(test.x[:64])
    again = HeadRunner(tmp_path / "tiny" / "export", "int8", noise_seed=2).run(test.x[:64])
    assert noisy.noise["changed_fraction"] < 1e-3
    assert np.array_equal(noisy.values, again.values)  # two noise draws, the same codes: erased


@pytest.mark.convert
def test_noise_well_above_one_step_survives_on_a_widened_grid_and_accuracy_is_as_deployed(tmp_path, caplog):
    """No warning; the device sends on the widened grid the manifest records, almost nothing is
    clipped, and the manifest's int8 accuracy is the one of the runner's features."""
    import torch

    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits, read_model_info

    m = _train_export(tmp_path / "big", 0.5, caplog)  # ReLU features here step by ~0.01-0.05
    entry = m["artifacts"]["int8"]
    check, out_q = entry["noise_after_rounding"], entry["outputs"][0]
    assert not check["below_one_step"] and check["sigma_steps"] > 3 and check["widened"]
    assert entry["sent"]["scale"] > out_q["scale"] and entry["sent"]["noise"] == m["inference_noise"]
    assert not any("rounding erases" in r.getMessage() for r in caplog.records)
    info = read_model_info(tmp_path / "big")
    test = load_splits(info).test
    out = HeadRunner(tmp_path / "big" / "export", "int8", noise_seed=info["seed"]).run(test.x)
    assert (out.scale, out.zero_point) == (entry["sent"]["scale"], entry["sent"]["zero_point"])
    assert out.noise["changed_fraction"] > 0.5 and out.noise["clipped_fraction"] < 1e-3
    with torch.no_grad():
        pred = load_run(tmp_path / "big").tail(torch.from_numpy(out.to_nchw())).argmax(dim=1).numpy()
    assert entry["tail_accuracy"] == pytest.approx(float((pred == test.y).mean()))


@pytest.mark.convert
def test_export_accuracy_is_measured_with_the_runtime_randomness_as_deployed(tmp_path):
    """A dropout head's tail never sees undropped features: the manifest's accuracy must match the
    device runner's features (same seed, same draws), not the noiseless artifact."""
    import torch

    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits, read_model_info

    out = tmp_path / "dropout"
    sets = [*QUICK, "defense.name=dropout", "defense.strength=0.7", "export.precisions=[int8]"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["--no-progress", "train", "--out", str(out), *args]) == 0
    assert main(["--no-progress", "export", str(out)]) == 0
    entry = json.loads((out / "export" / "manifest.json").read_text())["artifacts"]["int8"]
    info = read_model_info(out)
    test = load_splits(info).test
    feats = HeadRunner(out / "export", "int8", noise_seed=info["seed"]).run(test.x).to_nchw()
    with torch.no_grad():
        pred = load_run(out).tail(torch.from_numpy(feats)).argmax(dim=1).numpy()
    assert entry["tail_accuracy"] == pytest.approx(float((pred == test.y).mean()))
    assert entry["tail_accuracy"] != entry["tail_accuracy_without_noise"]
