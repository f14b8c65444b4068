"""Attacks: contract tests over the whole registry.

Every test loops over `attacks.ATTACKS`, so a newly registered attack is covered without new test
code. Each attack declares its threat model and its `TINY_OPTIONS`; it is run with those on a tiny
victim (a tiny smallcnn with random weights, digits at 28x28, queried through the stage's own float
query path), given only what its threat model grants, and its result must be what the verdict reads.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import RecordedQuery, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")
pytest.importorskip("sklearn.datasets")

from edgeveil.cloud_sim import metrics  # noqa: E402
from edgeveil.cloud_sim import verdict as verdict_module  # noqa: E402
from edgeveil.cloud_sim.attacks import ATTACKS, create, load  # noqa: E402
from edgeveil.cloud_sim.attacks.base import Attack, AttackContext, AttackResult, ThreatModel, Victim  # noqa: E402
from edgeveil.training import archs  # noqa: E402
from edgeveil.training.data import load_dataset  # noqa: E402

NAMES = list(ATTACKS)
AUXILIARY = ("none", "same-distribution", "other-distribution", "victim-training-set", "labelled")
N_AUX, N_TARGETS, CLASSES = 100, 16, 10
# A value of a type no option takes: every attack must refuse it by the option's name, not crash.
NOT_AN_OPTION_VALUE = object()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits():
    """(images (N, 1, 28, 28) in [0, 1], labels (N,)), shuffled with a fixed seed."""
    _, pool = load_dataset("digits")
    x = (pool.x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], pool.y[order].astype(np.int64)


@pytest.fixture(scope="module")
def model():
    """A tiny smallcnn from seed 0: head (1, 28, 28) -> (C', H', W'), tail -> 10 logits."""
    torch.manual_seed(0)
    built = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=CLASSES, width="tiny")
    arch = {"arch": "smallcnn", "split": built.split, "width": "tiny", "in_channels": 1, "image_size": 28,
            "num_classes": CLASSES, "options": {}}
    return built.head.eval(), built.tail.eval(), arch


def _balanced(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of n samples, as even over the classes as n allows (every class first)."""
    order = np.argsort(labels, kind="stable")
    by_class = [order[labels[order] == k] for k in range(CLASSES)]
    return np.array([by_class[i % CLASSES][i // CLASSES] for i in range(n)])


def _context(attack: Attack, digits, model) -> AttackContext:
    """A context holding only what the attack's threat model grants (the server always has the tail)."""
    x, y = digits
    head, tail, arch = model
    threat = attack.threat_model
    query = RecordedQuery(head)
    victim = Victim("float", query=query if threat.query_access else None,
                    head=head if threat.head_weights else None, tail=tail, num_classes=CLASSES, arch=arch)
    aux, aux_y = x[:N_AUX], y[:N_AUX]
    targets, target_y = x[N_AUX:N_AUX + N_TARGETS], y[N_AUX:N_AUX + N_TARGETS]
    labelled = {}
    if threat.labels:
        pick = _balanced(aux_y, threat.labels)
        labelled = dict(labelled_images=aux[pick], labelled_features=query.query(aux[pick]),
                        labelled_labels=aux_y[pick])
    return AttackContext(aux, query.query(aux), query.query(targets), targets, seed=0, device="cpu",
                         progress=False, victim=victim,
                         aux_labels=aux_y if threat.auxiliary_data == "labelled" else None,
                         target_labels=target_y, victim_images=x[-N_AUX:] if attack.wants_victim_images else None,
                         **labelled)


@pytest.fixture(scope="module")
def results(digits, model):
    """name -> (context, result) of every attack run with its TINY_OPTIONS, run once per module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            attack = create(name, **load(name).TINY_OPTIONS)
            ctx = _context(attack, digits, model)
            cache[name] = ctx, attack.run(ctx)
        return cache[name]

    return get


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize("name", NAMES)
def test_attack_declares_its_threat_model_and_description(name):
    cls = load(name)
    assert issubclass(cls, Attack) and cls.name == name
    assert ATTACKS.describe(name) == cls.description and cls.paper and cls.paper != "-"
    for threat in (cls.threat_model, create(name, **cls.TINY_OPTIONS).threat_model):
        assert isinstance(threat, ThreatModel)
        assert isinstance(threat.head_weights, bool) and isinstance(threat.query_access, bool)
        assert threat.auxiliary_data in AUXILIARY, threat.auxiliary_data
        assert isinstance(threat.labels, int) and threat.labels >= 0
        line = threat.describe()
        assert line and "\n" not in line and f"{threat.labels} labels" in line


@pytest.mark.parametrize("name", NAMES)
def test_tiny_options_are_declared_options_that_validate(name):
    cls = load(name)
    assert "TINY_OPTIONS" in vars(cls), f"{name} must declare TINY_OPTIONS for these tests"
    assert set(cls.TINY_OPTIONS) <= set(cls.OPTIONS), set(cls.TINY_OPTIONS) - set(cls.OPTIONS)
    assert create(name, **cls.TINY_OPTIONS).options == {**cls.OPTIONS, **cls.TINY_OPTIONS}


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_refused_with_the_known_ones(name):
    with pytest.raises(ValueError, match=rf"attack {name}: no options no_such_option \(known: .*\)") as err:
        create(name, no_such_option=1)
    assert all(option in str(err.value) for option in load(name).OPTIONS)


@pytest.mark.parametrize("name, option", [(n, o) for n in NAMES for o in load(n).OPTIONS])
def test_option_of_the_wrong_type_is_refused_by_name(name, option):
    with pytest.raises(ValueError, match=rf"attack {name}: .*\b{option}\b"):
        create(name, **{**load(name).TINY_OPTIONS, option: NOT_AN_OPTION_VALUE})


def test_an_unknown_attack_lists_the_registered_ones():
    with pytest.raises(ValueError, match=f"attack.names must be one of {', '.join(NAMES)}, got 'nosuch'"):
        create("nosuch")


# ---------------------------------------------------------------- a run and its result


@pytest.mark.parametrize("name", NAMES)
def test_attack_runs_on_a_tiny_victim_within_its_threat_model(name, results):
    ctx, result = results(name)
    assert isinstance(result, AttackResult)
    threat = load(name).threat_model
    assert (ctx.victim.head is None) != threat.head_weights and (ctx.victim.query is None) != threat.query_access
    r = result.reconstructions
    if r is not None:
        assert r.shape == ctx.target_images.shape and r.dtype == np.float32
        assert np.isfinite(r).all() and r.min() >= 0 and r.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_result_has_the_schema_the_stage_stores(name, results):
    ctx, result = results(name)
    for metric, values in result.scores.items():
        values = np.asarray(values)
        assert values.ndim == 1 and len(values) and np.isfinite(values).all(), metric
    for metric, s in result.summary.items():
        assert isinstance(s["mean"], float) and math.isfinite(s["mean"]), (metric, s)
        lo, hi = s["ci95"]
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= s["mean"] + 1e-9 and s["mean"] <= hi + 1e-9
        assert isinstance(s["n"], int) and s["n"] > 0
        if metric in result.scores:
            assert s["n"] == len(result.scores[metric]), metric
    stored = _stored(ctx, result)
    json.dumps(stored, allow_nan=False)  # what attacks.json holds: no NaN, numpy arrays as lists
    json.dumps({k: v for k, v in result.info.items() if k != "restarts"}, allow_nan=False, default=_no_numpy)


@pytest.mark.parametrize("name", NAMES)
def test_verdict_reads_every_metric_of_the_result(name, results):
    """Judged as the stage would store it, on float and int8 and against a baseline: every metric the
    verdict knows is checked, and the attack has a power test unless it only gives diagnostics."""
    ctx, result = results(name)
    rec = _stored(ctx, result)
    run = {"targets": {"indices": list(range(N_TARGETS))},
           "attacks": {name: {"precisions": {"float": rec, "int8": rec}}}}
    known = set(verdict_module.LEAKAGE_METRICS) | set(verdict_module.DIAGNOSTIC_METRICS)
    metrics_given = set(rec["summary"]) & known
    assert metrics_given, f"{name} gives no metric the verdict reads: {sorted(rec['summary'])}"
    v = verdict_module.verdict(run, baseline=run, defense="noise")
    judged = {(c["metric"], c["kind"]) for c in v["checks"] + v["diagnostics"]}
    assert judged == {(m, k) for m in metrics_given for k in ("compression", "defense")}, judged
    if metrics_given - set(verdict_module.DIAGNOSTIC_METRICS):
        assert set(v["power"]["by_attack"][name]) == {"float", "int8"}
    assert v["headline"] and v["outcome"] in verdict_module.OUTCOMES


def _stored(ctx: AttackContext, result: AttackResult) -> dict:
    """The per-precision record the attack stage writes: the attack's own scores, and a
    reconstruction's pixel scores (the stage adds identification when it has an evaluator)."""
    summary = dict(result.summary)
    per_image = {k: np.asarray(v).tolist() for k, v in result.scores.items()}
    if result.reconstructions is not None:
        scores = metrics.image_scores(ctx.target_images, result.reconstructions)
        summary.update(metrics.summarize(scores, seed=0))
        per_image.update({k: np.asarray(v).tolist() for k, v in scores.items()})
    return {"summary": summary, "per_image": per_image}


def _no_numpy(value):
    raise TypeError(f"attacks.json cannot hold {type(value).__name__} {value!r}: convert it in the attack")
