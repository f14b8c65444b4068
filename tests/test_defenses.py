"""Defenses: contract tests over the whole registry, then each defense's own math.

The contract tests loop over `defenses.DEFENSES`, so a newly registered defense is covered without
new test code. Each defense is built at its `example_strength` on a tiny smallcnn (digits at 16x16,
split 2: 8x8x8 features) and trained a few steps with the real Trainer, once per module.
Converter tests (marker `convert`) export every defended head to ONNX and run onnx2tf once per
distinct head structure.
"""
from __future__ import annotations

import copy
import io
import json
import math
import tempfile

import numpy as np
import pytest
import torch

from conftest import one_torch_thread
from edgeveil.training import archs, defenses
from edgeveil.training.defenses._dcor import distance_correlation
from edgeveil.training.defenses.adversarial import AdversarialDefense, ssim
from edgeveil.training.defenses.dropout import DropoutDefense
from edgeveil.training.defenses.mid import MIDDefense
from edgeveil.training.defenses.noise import (NoiseDefense, analytic_gaussian_epsilon, analytic_gaussian_sigma,
                                              classical_gaussian_sigma, clip_per_sample,
                                              effective_noise_after_rounding)
from edgeveil.training.trainer import Trainer, TrainSettings

NAMES = list(defenses.DEFENSES)
DEFENDED = [n for n in NAMES if n != "none"]
SIZE, STEPS, BATCH = 16, 20, 32
# InfoScissors plays two adversaries (decoder, auxiliary classifier) against the head: after 20
# steps the fresh decoder's MSE was above `none`'s by only 1%, after 80 steps clearly (see below).
TARGET_STEPS = {"infoscissors": 80}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits():
    """(x, y, mean, std, raw uint8 NHWC pixels) of the digits pool at 16x16; the last 128 are the probe."""
    from edgeveil.training.data import channel_stats, load_dataset, to_tensors

    _, pool = load_dataset("digits", image_size=SIZE)
    mean, std = channel_stats(pool)
    x, y = to_tensors(pool, mean, std)
    return x, y, mean, std, pool.x


def _model():
    return archs.create("smallcnn", in_channels=1, image_size=SIZE, num_classes=10, split=2, width="tiny")


def _built(name: str):
    """Model and defense from seed 0, the defense at its example strength and set up."""
    torch.manual_seed(0)
    model = _model()
    defense = defenses.create(name, _cls(name).example_strength)
    defense.setup(model.head, model.tail, (1, SIZE, SIZE), model.feature_shape, 10)
    return model, defense


def _cls(name: str):
    return defenses.load(name)


@pytest.fixture(scope="module")
def trained(digits):
    """name -> (head, tail, defense) after STEPS steps of the real Trainer from seed 0 (cached)."""
    x, y = digits[0][:1024], digits[1][:1024]
    cache: dict = {}

    def get(name: str, steps: int = STEPS):
        if (name, steps) not in cache:
            model, defense = _built(name)
            epochs = -(-steps * BATCH // len(x))  # enough passes over the 1,024 images for `steps`
            settings = TrainSettings(epochs=epochs, batch_size=BATCH, lr=3e-3, device="cpu", seed=0,
                                     max_steps_per_epoch=min(steps, len(x) // BATCH))
            with tempfile.TemporaryDirectory() as tmp:
                Trainer(model.head, model.tail, defense, settings, tmp).fit((x, y), (x[:64], y[:64]), progress=False)
            cache[(name, steps)] = (model.head.eval(), model.tail.eval(), defense)
        return cache[(name, steps)]

    return get


def _first_conv(head) -> torch.nn.Conv2d:
    return next(m for m in head.modules() if isinstance(m, torch.nn.Conv2d))


def _flat(state, prefix=""):
    """A nested state dict as {path: tensor or value}, for exact comparison."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix: state}


def _same(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    if fa.keys() != fb.keys():
        return False
    return all(torch.equal(v, fb[k]) if torch.is_tensor(v) else v == fb[k] for k, v in fa.items())


# ------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_describes_the_class(name):
    cls = _cls(name)
    assert cls.name == name and cls.paper
    assert defenses.DEFENSES.describe(name) == cls.description  # one line, from the class only
    if name != "none":
        assert cls.TARGET_DIRECTION in ("up", "down"), f"{name} must declare TARGET_DIRECTION"
        assert cls.example_strength > 0 and cls.paper != "-"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_refused_by_name(name):
    with pytest.raises(ValueError, match="no_such_option"):
        defenses.create(name, _cls(name).example_strength, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_loss_terms_are_finite_and_gradients_reach_the_first_conv(name, trained, digits):
    head, tail, defense = copy.deepcopy(trained(name))  # trained a few steps: adversaries warmed up
    x, y = digits[0][:BATCH], digits[1][:BATCH]
    head.train(), tail.train()
    logged = defense.adversary_step(x, head(x).detach(), y)
    assert all(isinstance(v, float) and math.isfinite(v) for v in logged.values()), logged
    z = head(x)
    released = defense.transform(z)
    assert released.shape == z.shape
    logits = tail(released)
    terms = defense.loss(x, z, logits, y)
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values()), terms
    conv = _first_conv(head)
    conv.weight.grad = None
    if terms:  # the defense's own terms shape the head, not only the tail
        grad, = torch.autograd.grad(sum(terms.values()), conv.weight, retain_graph=True, allow_unused=True)
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    total = torch.nn.functional.cross_entropy(logits, y) + sum(terms.values())
    total.backward()
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_inference_noise_is_a_spec_the_device_runs(name):
    from edgeveil.device.noise import check_noise_spec

    spec = defenses.create(name, _cls(name).example_strength).inference_noise()
    assert check_noise_spec(spec) == spec
    json.dumps(spec, allow_nan=False)  # it goes into model.json and manifest.json


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_restores_the_adversaries_exactly(name, trained, digits):
    head, _, defense = trained(name)
    defense = copy.deepcopy(defense)  # the cached one stays as trained
    buffer = io.BytesIO()
    torch.save(defense.state_dict(), buffer)  # what the trainer's checkpoint holds, loaded the same way
    buffer.seek(0)
    _, fresh = _built(name)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert _same(fresh.state_dict(), defense.state_dict())
    x, y = digits[0][BATCH:2 * BATCH], digits[1][BATCH:2 * BATCH]
    with torch.no_grad():
        z = head(x)
    results = []
    for d in (defense, fresh):
        torch.manual_seed(7)
        results.append(d.adversary_step(x, z, y))
    assert results[0] == results[1]
    assert _same(fresh.state_dict(), defense.state_dict())  # the next step is the same step


@pytest.mark.parametrize("name", DEFENDED)
def test_a_few_steps_move_the_target_against_none(name, trained, digits):
    """Same seed, same batches: the defense's own target metric on its released features moves in
    TARGET_DIRECTION compared with the undefended head's features."""
    x = digits[0][-128:]
    steps = TARGET_STEPS.get(name, STEPS)
    head_none = trained("none", steps)[0]
    head, _, defense = trained(name, steps)
    with torch.no_grad():
        torch.manual_seed(1)
        released, plain = defense.eval_transform(head(x)), head_none(x)
    defended, undefended = defense.target_metric(x, released), defense.target_metric(x, plain)
    print(f"{name} after {steps} steps: target {defended:.5f} against none's {undefended:.5f}")
    assert math.isfinite(defended) and math.isfinite(undefended)
    if defense.TARGET_DIRECTION == "down":
        assert defended < undefended, (defended, undefended)
    else:
        assert defended > undefended, (defended, undefended)


def _graph_structure(onnx_path) -> str:
    """The ONNX graph without weight values: operators, attributes, tensor shapes."""
    import onnx

    model = onnx.load(str(onnx_path))
    g = model.graph
    return repr(([(n.op_type, list(n.input), list(n.output), sorted((a.name, str(onnx.helper.get_attribute_value(a)))
                                                                      for a in n.attribute)) for n in g.node],
                 [(t.name, list(t.dims)) for t in g.initializer], [str(v.type) for v in (*g.input, *g.output)]))


@pytest.fixture(scope="module")
def converted():
    """ONNX graph structure -> (problems, operators) of its int8 conversion: onnx2tf runs once per
    distinct head structure (about 10 s each), not again for a defense whose head only has other weights."""
    return {}


@pytest.mark.convert
@pytest.mark.parametrize("name", NAMES)
def test_defended_head_converts_to_full_int8_builtins(name, trained, digits, converted, tmp_path):
    from edgeveil.export import convert, export_onnx
    from edgeveil.export.convert import tflite_operators, tflite_problems

    head = trained(name)[0]
    export_onnx(head, (1, SIZE, SIZE), tmp_path / "head.onnx")  # the defense's own head, checked by onnx
    key = _graph_structure(tmp_path / "head.onnx")
    if key not in converted:
        _, _, mean, std, pixels = digits
        calib = pixels[:64].astype(np.float32) / 255.0
        path = convert(tmp_path / "head.onnx", calib, mean, std, tmp_path, ("int8",))["int8"]
        converted[key] = (tflite_problems(path, "int8"), tflite_operators(path))
    problems, operators = converted[key]
    assert problems == [] and "CONV_2D" in operators


# ------------------------------------------------------------------------------- distance correlation


def _dcor_reference(x: np.ndarray, z: np.ndarray) -> float:
    """Textbook double-centred V-statistic, in float64 loops over pairs."""
    def centred(v):
        n = len(v)
        d = np.array([[np.linalg.norm(v[i] - v[j]) for j in range(n)] for i in range(n)])
        return d - d.mean(0) - d.mean(1)[:, None] + d.mean()
    a, b = centred(x.reshape(len(x), -1)), centred(z.reshape(len(z), -1))
    return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


def test_dcor_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 4, 4, generator=g)
    z = torch.tanh(x.flatten(1)[:, :10] * 2) + 0.3 * torch.randn(40, 10, generator=g)
    assert distance_correlation(x, z).item() == pytest.approx(_dcor_reference(x.numpy(), z.numpy()), abs=1e-4)


def test_dcor_separates_independent_from_dependent_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    independent = distance_correlation(x, torch.randn(400, 5, generator=g)).item()  # biased up at finite n
    nonlinear = distance_correlation(x, x.pow(2)).item()  # uncorrelated but dependent
    affine = distance_correlation(x, 3.0 * x @ torch.linalg.qr(torch.randn(5, 5, generator=g))[0] + 1.0).item()
    assert independent < 0.25 and nonlinear > 0.4 and affine == pytest.approx(1.0, abs=1e-3)


def test_dcor_gradient_is_finite_with_repeated_samples():
    x = torch.randn(8, 6)
    z = torch.zeros(8, 4, requires_grad=True)
    for features in (z, torch.cat([z[:4], z[4:] + 1.0])):  # constant (dead ReLU), two groups of equal rows
        z.grad = None
        value = distance_correlation(x, features)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------------- noise


def test_analytic_gaussian_accountant_known_values():
    # Balle & Wang 2018: eps = 1, delta = 1e-5, sensitivity 1 needs sigma ~ 3.73 (analytic) where the
    # classical sqrt(2 ln(1.25 / delta)) / eps gives 4.84.
    assert analytic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-3)
    assert classical_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(4.8448, abs=1e-3)
    assert analytic_gaussian_epsilon(3.7306, 1.0, 1e-5) == pytest.approx(1.0, abs=1e-3)
    for eps in (0.1, 0.5, 0.9):  # the analytic sigma is always the smaller one
        assert analytic_gaussian_sigma(eps, 1e-5) < classical_gaussian_sigma(eps, 1e-5)
    assert analytic_gaussian_sigma(1.0, 1e-5, 2.0) == pytest.approx(2 * 3.7306, abs=2e-3)  # scales with D


def test_noise_privacy_report_and_device_spec():
    plain = NoiseDefense(0.5)
    assert plain.privacy_report()["epsilon"] is None and set(plain.inference_noise()) == {"kind", "sigma"}
    clipped = NoiseDefense(3.7306, clip_norm=0.5)  # sensitivity 2 * 0.5 = 1
    report = clipped.privacy_report()
    assert report["epsilon"] == pytest.approx(1.0, abs=1e-3) and report["delta"] == 1e-5
    assert report["sensitivity"] == 1.0 and "replace-one" in report["neighbouring"]
    from edgeveil.device.noise import check_noise_spec

    spec = clipped.inference_noise()
    assert check_noise_spec(spec) == spec and json.dumps(spec, allow_nan=False)
    assert spec["clip_norm"] == 0.5 and spec["clip_ord"] == 2 and spec["epsilon"] == report["epsilon"]
    laplace = NoiseDefense(4.0, kind="laplace", clip_norm=1.0).privacy_report()
    assert laplace["epsilon"] == pytest.approx(0.5) and laplace["delta"] == 0.0
    with pytest.raises(ValueError, match="kind"):
        NoiseDefense(0.5, kind="uniform")


def test_clipping_bounds_every_released_vector():
    z = torch.randn(16, 4, 3, 3) * torch.linspace(0.01, 10, 16).view(-1, 1, 1, 1)
    for ord in (1, 2):
        out = clip_per_sample(z, 2.0, ord)
        norms = torch.linalg.vector_norm(out.flatten(1), ord=ord, dim=1)
        before = torch.linalg.vector_norm(z.flatten(1), ord=ord, dim=1)
        assert (norms <= 2.0 + 1e-5).all()
        assert torch.allclose(out[before <= 2.0], z[before <= 2.0])  # inside: unchanged


def test_noise_below_one_step_is_erased_by_rounding():
    tiny = effective_noise_after_rounding(0.1, 1.0, "gaussian")
    assert tiny["changed_fraction"] < 1e-6 and tiny["effective_ratio"] < 0.01
    large = effective_noise_after_rounding(20.0, 1.0, "gaussian")
    assert large["effective_std"] == pytest.approx(math.sqrt(400 + 1 / 12), rel=1e-4)  # Sheppard


def test_rounding_model_reproduces_the_prototype():
    """research/prototype_int8_privacy.md: 45% of codes at the zero point (-128); sigma = 0.25 step
    changed 3.5% of codes with effective std 0.19; from 1 step up the noise is 10-21% below nominal."""
    quarter = effective_noise_after_rounding(0.25, 1.0, "gaussian", zero_point_share=0.45)
    assert quarter["changed_fraction"] == pytest.approx(0.035, abs=0.001)
    assert quarter["effective_std"] == pytest.approx(0.19, abs=0.005)
    for sigma in (1.0, 10.0):
        ratio = effective_noise_after_rounding(sigma, 1.0, "gaussian", zero_point_share=0.45)["effective_ratio"]
        assert 0.79 <= ratio <= 0.91  # the model: 0.900 and 0.862 (no clipping at the top)


@pytest.mark.parametrize("kind, sigma_steps, share", [("gaussian", 0.4, 0.0), ("gaussian", 0.9, 0.45),
                                                      ("gaussian", 1.5, 0.45), ("laplace", 0.3, 0.0),
                                                      ("laplace", 2.0, 0.45)])
def test_rounding_model_matches_the_device_runner(kind, sigma_steps, share):
    """Closed form against the device runtime's own noise path on int8 codes (Monte Carlo): below one
    step on the tensor's grid, clipped at the zero point; from one step on, on the widened grid the
    device sends (no clipping), which is what export records in the manifest."""
    from edgeveil.device.noise import add_quantized_noise, sent_qparams

    rng = np.random.default_rng(0)
    n, scale = 200_000, 0.05
    codes = rng.integers(-100, 100, n).astype(np.int8)
    codes[: int(share * n)] = -128  # the zero point of ReLU features
    spec = {"kind": kind, "sigma": sigma_steps * scale}
    noisy = add_quantized_noise(codes, scale, -128, spec, rng, sent_qparams(scale, -128, -128, 127, spec))
    assert noisy.stats["widened"] == (sigma_steps >= 1)
    model = effective_noise_after_rounding(sigma_steps * scale, noisy.scale, kind,
                                           zero_point_share=0.0 if noisy.stats["widened"] else share)
    assert noisy.stats["changed_fraction"] == pytest.approx(model["changed_fraction"], abs=0.01)
    assert noisy.stats["effective_std"] == pytest.approx(model["effective_std"], rel=0.02)


# ------------------------------------------------------------------------------- the others


def test_dropout_zeroes_without_rescaling():
    torch.manual_seed(0)
    d = DropoutDefense(0.3)
    z = torch.rand(64, 8, 4, 4) + 1.0
    out = d.transform(z)
    kept = out != 0
    assert torch.equal(out[kept], z[kept])  # no 1 / (1 - p)
    assert (~kept).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert d.inference_noise() == {"kind": "dropout", "p": 0.3}
    with pytest.raises(ValueError, match="strength"):
        DropoutDefense(1.0)


def test_mid_releases_the_mean_and_samples_in_training():
    torch.manual_seed(0)
    d = MIDDefense(0.1)
    d.setup(None, None, (1, 8, 8), (4, 4, 4), 10)
    z = torch.rand(256, 4, 4, 4)
    assert torch.equal(d.eval_transform(z), z) and d.inference_noise() is None
    noise = d.transform(z) - z
    sigma = d._sigma(z)
    assert (noise / sigma).std().item() == pytest.approx(1.0, abs=0.02)
    kl = d.loss(None, z, None, None)["kl"]
    assert kl.item() == pytest.approx(0.1 * d.target_metric(None, z), rel=1e-5) and kl.item() > 0


def test_adversarial_ssim_and_both_losses():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 1, 16, 16, generator=g)
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(img, torch.rand(4, 1, 16, 16, generator=g)).item() < 0.2
    for loss, sign in (("ssim", 1), ("mse", -1)):
        torch.manual_seed(0)
        d = AdversarialDefense(0.3, loss=loss, ssim_threshold=-1.0)
        d.setup(None, None, (1, 16, 16), (8, 8, 8), 10)
        z = torch.randn(8, 8, 8, 8, requires_grad=True)
        term = d.loss(img.repeat(2, 1, 1, 1), z, None, None)["adv"]
        assert sign * term.item() > 0
        term.backward()
        assert z.grad.abs().sum() > 0 and all(p.grad is None for p in d.modules.parameters())
