"""The auditor's evaluator and the preflight that fits attacks to the data before anything trains."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import one_torch_thread  # noqa: E402
from edgeveil.cloud_sim import evaluator as ev_mod  # noqa: E402
from edgeveil.cloud_sim.preflight import attack_plan, describe_plan  # noqa: E402
from edgeveil.training.data import load_dataset, make_splits  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits_splits():
    _, pool = load_dataset("digits")
    return make_splits(None, pool, seed=0)


def _01(images_u8):
    return images_u8.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def test_evaluator_identifies_held_out_digits_and_is_trained_once(digits_splits, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVEIL_CACHE", str(tmp_path))  # an empty cache: this test trains, whatever ran before
    s = digits_splits
    first = ev_mod.get_evaluator(s.evaluator.x, s.evaluator.y, 10, progress=False)
    assert not first.info.get("cached") and first.info["trained_on"] == len(s.evaluator) - len(s.evaluator) // 10
    on_test = first.correct(_01(s.test.x), s.test.y)["identification"]
    assert on_test.shape == (len(s.test),) and set(np.unique(on_test)) <= {0.0, 1.0}
    assert on_test.mean() > 0.85  # measured 0.97 on 359 test digits
    again = ev_mod.get_evaluator(s.evaluator.x, s.evaluator.y, 10, progress=False)
    assert again.info["cached"] and again.info["key"] == first.info["key"]
    np.testing.assert_allclose(again.logits(_01(s.test.x[:20])), first.logits(_01(s.test.x[:20])), atol=1e-5)
    # another split is another evaluator
    other = ev_mod._key(s.aux.x, s.aux.y, 10)
    assert other != first.info["key"]
    # noise is not a digit: a blank reconstruction is (almost) never identified
    blank = np.zeros((50, 1, 28, 28), np.float32)
    assert first.correct(blank, np.arange(50) % 10)["identification"].mean() <= 0.2


def test_top5_is_scored_with_twenty_classes_or_more():
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 20))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(20, dtype=torch.float32))  # always ranks 19, 18, 17, 16, 15
    ev = ev_mod.Evaluator(model, [0.0], [1.0], 20, {})
    out = ev.correct(np.zeros((3, 1, 2, 2), np.float32), np.array([19, 16, 3]))
    assert out["identification"].tolist() == [1.0, 0.0, 0.0]
    assert out["identification_top5"].tolist() == [1.0, 1.0, 0.0]
    ten = ev_mod.Evaluator(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10)), [0.0], [1.0], 10, {})
    assert "identification_top5" not in ten.correct(np.zeros((2, 1, 2, 2), np.float32), np.array([0, 1]))


def test_an_evaluator_split_too_small_is_named():
    assert "empty" in ev_mod.evaluator_problems(np.zeros(0, np.int64), 10)[0]
    problems = ev_mod.evaluator_problems(np.repeat(np.arange(10), 3), 10)
    assert "10 of 10 classes have fewer than 5" in problems[0] and "data.evaluator" in problems[0]
    with pytest.raises(ValueError, match="data.evaluator"):
        ev_mod.get_evaluator(np.zeros((30, 8, 8, 1), np.uint8), np.repeat(np.arange(10), 3), 10)


# ---------------------------------------------------------------- preflight


SMALL = {"targets": 80, "aux": 80, "labelled": 40, "classes": 10, "victim_train": 160, "evaluator": 80}


def test_defaults_that_do_not_fit_small_data_are_scaled_down():
    plan = attack_plan(["mine", "inverse", "pmc"], {}, SMALL)
    assert plan["mine"].skip is None and plan["mine"].scaled == {"batch_size": [64, 40]}
    assert plan["mine"].attack.options["batch_size"] == 40
    assert plan["inverse"].skip is None and not plan["inverse"].scaled
    assert describe_plan(plan) == ["mine runs with options scaled to the data: batch_size 64 -> 40"]


def test_what_cannot_fit_is_skipped_with_the_reason():
    plan = attack_plan(["mine", "pmc", "shadow"], {"mine": {"batch_size": 64}},
                       {**SMALL, "labelled": 8, "aux": 1})
    assert "batch_size=64" in plan["mine"].skip and "give 40" in plan["mine"].skip  # the user's value is kept
    assert "each of the 10 classes" in plan["pmc"].skip and "data.labelled is 8" in plan["pmc"].skip
    assert "shadow needs auxiliary pairs" in plan["shadow"].skip
    tiny = attack_plan(["mine"], {}, {**SMALL, "targets": 6})
    assert "give 3" in tiny["mine"].skip


def test_invalid_names_and_options_are_refused_together():
    with pytest.raises(ValueError) as e:
        attack_plan(["nosuch", "mine"], {"mine": {"epochs": 0}}, SMALL)
    assert "nosuch" in str(e.value) and "epochs must be an integer >= 1" in str(e.value)
