"""Passive model completion on the features of a briefly trained digits victim, its baselines, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import digits_28, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn.datasets")

import torch.nn.functional as F  # noqa: E402

from edgeveil.cloud_sim import attacks, metrics  # noqa: E402
from edgeveil.cloud_sim.attacks.base import AttackContext, Victim  # noqa: E402
from edgeveil.cloud_sim.attacks import pmc  # noqa: E402
from edgeveil.cloud_sim.attacks.pmc import PassiveCompletionAttack, build_top_model  # noqa: E402
from edgeveil.training import archs  # noqa: E402

# A narrow top model, few steps and a brisk lr: seconds on one CPU thread.
QUICK = {"steps": 400, "width": 32, "lr": 5e-3, "scratch_steps": 300}
TINY = {"steps": 6, "width": 8, "scratch_steps": 3}
ARCH = {"arch": "smallcnn", "split": 2, "width": "tiny", "in_channels": 1, "image_size": 28,
        "num_classes": 10, "options": {}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits():
    """Digits at 28x28 in [0, 1] with labels, split into victim-train 600 / aux 800 / targets 397."""
    x, y = digits_28()
    order = np.random.default_rng(0).permutation(len(x))
    return x, y, order[:600], order[600:1400], order[1400:]


@pytest.fixture(scope="module")
def victim(digits) -> Victim:
    """A tiny smallcnn trained 300 steps on the victim's split; query rounds images to uint8 pixels."""
    x, y, train, _, _ = digits
    torch.manual_seed(0)
    split = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width="tiny")
    model = torch.nn.Sequential(split.head, split.tail)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, len(train), 64)
        loss = F.cross_entropy(model(torch.from_numpy(x[train[idx]])), torch.from_numpy(y[train[idx]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head, tail = split.head.eval(), split.tail.eval()

    def query(images):
        pixels = (np.clip(np.rint(images * 255), 0, 255) / 255).astype(np.float32)
        with torch.no_grad():
            return head(torch.from_numpy(pixels)).numpy()

    return Victim("float", query=query, head=head, tail=tail, num_classes=10, arch=ARCH)


def _context(digits, deployed: Victim, per_class=4, n_target=397, **kw) -> AttackContext:
    """The attacker's aux pool with `per_class` labelled samples of each class, and the targets
    (features through `deployed`); kw overrides any field, the victim included."""
    x, y, _, aux, target = digits
    target = target[:n_target]
    labelled = np.concatenate([aux[y[aux] == c][:per_class] for c in range(10)])
    query = deployed.query
    fields = {"aux_images": x[aux], "aux_features": query(x[aux]), "target_features": query(x[target]),
              "target_images": x[target], "progress": False, "victim": deployed,
              "labelled_images": x[labelled], "labelled_features": query(x[labelled]),
              "labelled_labels": y[labelled], "target_labels": y[target]}
    return AttackContext(**{**fields, **kw})


@pytest.fixture(scope="module")
def runs(digits, victim):
    ctx = _context(digits, victim, progress=True)
    return ctx, {m: PassiveCompletionAttack(**QUICK, method=m).run(ctx) for m in ("mixmatch", "supervised")}


def test_completion_beats_training_from_scratch_and_chance(runs):
    """Measured: MixMatch 0.91, supervised 0.81, from scratch 0.73, clean 0.93 (40 labels, 397 targets)."""
    _, results = runs
    for method, result in results.items():
        acc, scratch = result.scores["accuracy"], result.scores["scratch_accuracy"]
        assert acc.mean() > 0.5, (method, acc.mean())                      # chance is 0.1
        _, lo, _ = metrics.paired_bootstrap_diff(acc, scratch, seed=0)
        assert lo > 0.03, (method, acc.mean(), scratch.mean())             # same targets, same 40 labels
        assert result.info["scratch_history"][-1]["loss"] < 0.1            # the baseline did fit its labels
    assert results["mixmatch"].summary["accuracy"]["mean"] > 0.85


def test_mixmatch_is_at_least_as_good_as_supervised_only(runs):
    _, results = runs
    mixmatch, supervised = (results[m].scores["accuracy"] for m in ("mixmatch", "supervised"))
    mean_diff, lo, _ = metrics.paired_bootstrap_diff(mixmatch, supervised, seed=0)
    assert mean_diff > 0 and lo > 0, (mixmatch.mean(), supervised.mean())


def test_clean_accuracy_is_the_tails_own(runs, victim):
    ctx, results = runs
    with torch.no_grad():
        direct = (victim.tail(torch.from_numpy(ctx.target_features)).argmax(1).numpy() == ctx.target_labels)
    for result in results.values():
        np.testing.assert_array_equal(result.scores["clean_accuracy"], direct.astype(np.float64))
    assert direct.mean() > 0.8  # a trained victim, else the comparison says nothing


def test_scores_summary_and_info(runs):
    ctx, results = runs
    m = len(ctx.target_labels)
    for method, result in results.items():
        assert result.reconstructions is None
        assert set(result.scores) == set(result.summary) == {"accuracy", "scratch_accuracy", "clean_accuracy"}
        for name, values in result.scores.items():
            assert values.shape == (m,) and set(np.unique(values)) <= {0.0, 1.0}
            s = result.summary[name]
            assert s["n"] == m and s["mean"] == pytest.approx(values.mean())
            assert s["ci95"][0] <= s["mean"] <= s["ci95"][1] and s["ci95"][0] < s["ci95"][1]
        info = result.info
        assert info["labels"] == 40 and info["per_class"] == [4] * 10 and info["method"] == method
        assert info["history"][-1]["step"] == QUICK["steps"] and len(info["history"]) == 20
        assert info["seconds"] >= info["completion_seconds"] + info["scratch_seconds"] > 0
    # MixMatch queries B labelled and K * B unlabelled views a step; supervised only the labelled ones
    assert results["mixmatch"].info["queries"] == QUICK["steps"] * 32 * 3
    assert results["supervised"].info["queries"] == QUICK["steps"] * 32
    assert {"loss_x", "loss_u", "weight"} <= set(results["mixmatch"].info["history"][0])
    assert results["mixmatch"].info["history"][-1]["weight"] == pytest.approx(75.0, rel=0.06)


def test_same_seed_same_result_other_seed_other_result(digits, victim):
    ctx = _context(digits, victim, n_target=100)
    first, second = (PassiveCompletionAttack(**TINY).run(ctx) for _ in range(2))
    for name in first.scores:
        np.testing.assert_array_equal(first.scores[name], second.scores[name])
    assert first.info["history"] == second.info["history"]
    other = PassiveCompletionAttack(**TINY).run(_context(digits, victim, n_target=100, seed=1))
    assert other.info["history"] != first.info["history"]


def test_registered_with_an_honest_threat_model():
    attack = attacks.create("pmc", steps=5)
    assert isinstance(attack, PassiveCompletionAttack) and attack.options["steps"] == 5
    tm = attack.threat_model
    assert not tm.head_weights and tm.query_access and tm.auxiliary_data == "labelled" and tm.labels == 40


@pytest.mark.parametrize("shape", [(8, 14, 14), (16, 7, 7), (64, 4, 4), (3, 1, 1)])
def test_top_model_takes_any_feature_map(shape):
    model = build_top_model(shape, num_classes=7, width=8).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_views_are_shifted_crops_or_mirror_images():
    images = np.random.default_rng(0).random((30, 2, 8, 8), dtype=np.float32)
    flipped = pmc._augment(images, np.random.default_rng(1), shift=0.0, flip=True)
    mirrored = [np.array_equal(f, i[..., ::-1]) for f, i in zip(flipped, images)]
    assert all(m or np.array_equal(f, i) for m, f, i in zip(mirrored, flipped, images)) and 0 < sum(mirrored) < 30
    shifted = pmc._augment(images, np.random.default_rng(1), shift=0.25, flip=False)   # up to 2 pixels
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    offsets = [next((dy, dx) for dy in range(5) for dx in range(5)
                    if np.array_equal(s, p[:, dy:dy + 8, dx:dx + 8])) for s, p in zip(shifted, padded)]
    assert len(set(offsets)) > 5 and shifted.dtype == np.float32


# ---------------------------------------------------------------- refusals


def test_refuses_without_labelled_data_or_target_labels(digits, victim):
    attack = PassiveCompletionAttack(**TINY)
    no_labels = _context(digits, victim, labelled_images=None, labelled_features=None, labelled_labels=None,
                         target_labels=None)
    with pytest.raises(ValueError, match="labelled samples.*target_labels"):
        attack.run(no_labels)
    empty = _context(digits, victim, per_class=0)
    with pytest.raises(ValueError, match="needs labelled samples"):
        attack.run(empty)


def test_refuses_a_labelled_set_that_lacks_a_class(digits, victim):
    ctx = _context(digits, victim)
    keep = ctx.labelled_labels != 3
    ctx = _context(digits, victim, labelled_images=ctx.labelled_images[keep],
                   labelled_features=ctx.labelled_features[keep], labelled_labels=ctx.labelled_labels[keep])
    with pytest.raises(ValueError, match=r"no sample of class\(es\) 3: .* each of the 10 classes"):
        PassiveCompletionAttack(**TINY).run(ctx)


def test_refuses_labels_out_of_range_and_a_missing_victim(digits, victim):
    ctx = _context(digits, victim)
    bad = _context(digits, victim, target_labels=np.where(ctx.target_labels == 9, 12, ctx.target_labels))
    with pytest.raises(ValueError, match=r"target_labels must be class indices in 0\.\.9, got 0\.\.12"):
        PassiveCompletionAttack(**TINY).run(bad)
    with pytest.raises(ValueError, match=r"needs the victim's query .*, tail .*, arch .*; no victim given"):
        PassiveCompletionAttack(**TINY).run(_context(digits, victim, victim=None))
    no_query = Victim("float", tail=victim.tail, num_classes=10, arch=ARCH)
    with pytest.raises(ValueError, match=r"needs the victim's query \(the augmented views\)$"):
        PassiveCompletionAttack(**TINY).run(_context(digits, victim, victim=no_query))


def test_a_query_of_the_wrong_shape_is_named(digits, victim):
    wrong = Victim("float", query=lambda images: victim.query(images)[:, :4], tail=victim.tail,
                   num_classes=10, arch=ARCH)
    with pytest.raises(ValueError, match=r"victim.query returned features \(32, 4, 14, 14\), expected"):
        PassiveCompletionAttack(**TINY).run(_context(digits, victim, victim=wrong))


@pytest.mark.parametrize("options, message", [
    ({"method": "fixmatch"}, "method must be one of mixmatch, supervised, got 'fixmatch'"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"augmentations": 2.0}, "augmentations must be an integer >= 1, got 2.0"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"temperature": 0}, r"temperature must be a number in \(0, 1\], got 0"),
    ({"alpha": -1}, "alpha must be a number > 0, got -1"),
    ({"lambda_u": float("nan")}, "lambda_u must be a number >= 0, got nan"),
    ({"rampup": 1.5}, r"rampup must be a number in \[0, 1\], got 1.5"),
    ({"ema": 1.0}, r"ema must be a number in \[0, 1\), got 1.0"),
    ({"shift": 0.5}, r"shift must be a number in \[0, 0.5\), got 0.5"),
    ({"flip": "yes"}, "flip must be true or false, got 'yes'"),
    ({"lr": "fast"}, "lr must be a number > 0, got 'fast'"),
    ({"epochs": 3}, r"no options epochs \(known: "),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=f"attack pmc: .*{message}"):
        PassiveCompletionAttack(**options)


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        PassiveCompletionAttack(steps=0, alpha=0, method="x")
    assert all(name in str(err.value) for name in ("steps", "alpha", "method"))
