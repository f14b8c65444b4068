"""The paper defenses' own behaviour: InfoScissors, SiftFunnel (and the funnel arch), CEM.

The registry-wide contract (finite terms, checkpoints, inference specs, int8 heads) is in
test_defenses.py; here each defense's math. Tiny smallcnn models on seeded random images.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import one_torch_thread
from edgeveil.training import archs, defenses
from edgeveil.training.defenses.cem import BASES, CEMDefense, kmeans
from edgeveil.training.defenses.infoscissors import InfoScissorsDefense, classifier_start
from edgeveil.training.defenses.noise import NoiseDefense
from edgeveil.training.defenses.siftfunnel import SiftFunnelDefense, pearson_redundancy
from edgeveil.training.trainer import Trainer, TrainSettings

SIZE, CLASSES = 16, 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def _model(arch: str = "smallcnn", **kw):
    torch.manual_seed(0)
    return archs.create(arch, in_channels=1, image_size=SIZE, num_classes=CLASSES, width="tiny", **kw)


def _batch(n: int = 32, seed: int = 0):
    """Images whose class sets a bright quadrant, so features carry both x and y."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * 8:(r + 1) * 8, q * 8:(q + 1) * 8] += 1.0
    return x, y


def _setup(defense, model):
    defense.setup(model.head, model.tail, (1, SIZE, SIZE), model.feature_shape, CLASSES)
    return defense


# ------------------------------------------------------------------------------- InfoScissors


def _encoder_output(model, defense, x):
    """What reaches the device-side classifier: the cloud's z, through a hook of our own."""
    seen = []
    handle = model.tail.get_submodule(defense.classifier_start).register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0]))
    logits = model.tail(model.head(x))
    handle.remove()
    return seen[0], logits


def test_infoscissors_adversaries_fit_and_the_head_pushes_back():
    model, (x, y) = _model(), _batch()
    d = _setup(InfoScissorsDefense(0.3, lambda_l=0.2), model)
    decoder_mse, aux_ce = [], []
    for _ in range(40):  # adversaries only: the head and tail stay fixed
        logged = d.adversary_step(x, model.head(x).detach(), y)
        z = model.head(x)
        terms = d.loss(x, z, model.tail(z), y)
        decoder_mse.append(logged["decoder_mse"])
        aux_ce.append(logged.get("aux_ce", math.nan))
    assert all(torch.isfinite(t) for t in terms.values())
    assert set(terms) == {"input_bound", "prediction_bound", "task_share"}
    assert decoder_mse[-1] < 0.7 * decoder_mse[0] and aux_ce[-1] < 0.7 * aux_ce[1], (decoder_mse, aux_ce)

    # now only the head (and encoder) move, against the frozen posteriors: their losses go up
    decoder, aux = d.modules["decoder"], d.modules["aux"]
    for p in d.modules.parameters():
        p.grad = None
    perm = torch.roll(torch.arange(len(x)), 1)
    with torch.no_grad():
        mse0 = F.mse_loss(decoder(model.head(x)), x).item()
        ce0 = F.cross_entropy(aux(_encoder_output(model, d, x)[0]), y).item()
    opt = torch.optim.Adam([*model.head.parameters(), *model.tail.parameters()], lr=3e-3)
    for _ in range(15):
        z_cloud, _ = _encoder_output(model, d, x)
        bound = d.input_bound(x, model.head(x), perm) + d.prediction_bound(z_cloud, y, perm)
        opt.zero_grad(set_to_none=True)
        bound.backward()
        opt.step()
    assert all(p.grad is None for p in d.modules.parameters())  # the posteriors were not trained
    with torch.no_grad():
        assert F.mse_loss(decoder(model.head(x)), x).item() > mse0
        assert F.cross_entropy(aux(_encoder_output(model, d, x)[0]), y).item() > ce0


def test_infoscissors_lambdas_select_the_bounds_and_reweight_the_task():
    model, (x, y) = _model(), _batch(16)
    for lambda_d, lambda_l, expected in ((0.0, 0.2, {"prediction_bound", "task_share"}),
                                         (0.3, 0.0, {"input_bound", "task_share"}), (0.0, 0.0, set())):
        d = _setup(InfoScissorsDefense(lambda_d, lambda_l=lambda_l), model)
        assert ("decoder" in d.modules) == (lambda_d > 0) and ("aux" in d.modules) == (lambda_l > 0)
        logged = d.adversary_step(x, model.head(x).detach(), y)
        assert ("decoder_mse" in logged) == (lambda_d > 0)
        z = model.head(x)
        logits = model.tail(z)
        terms = d.loss(x, z, logits, y)
        assert set(terms) == expected
        if terms:  # task + task_share = (1 - lambda_d - lambda_l) CE, the paper's weighting
            ce = F.cross_entropy(logits, y)
            assert (ce + terms["task_share"]).item() == pytest.approx((1 - lambda_d - lambda_l) * ce.item())
    with pytest.raises(ValueError, match="< 1"):
        InfoScissorsDefense(0.6, lambda_l=0.4)
    with pytest.raises(ValueError, match="lambda_l"):
        InfoScissorsDefense(0.3, lambda_l=-0.1)


def test_infoscissors_prediction_only_through_the_trainer_logs_no_input_term(tmp_path):
    model, (x, y) = _model(), _batch(64)
    d = _setup(defenses.create("infoscissors", 0.0, lambda_l=0.2), model)
    settings = TrainSettings(epochs=1, batch_size=32, lr=3e-3, device="cpu", seed=0)
    history = Trainer(model.head, model.tail, d, settings, tmp_path).fit((x, y), (x, y), progress=False)
    assert "loss_prediction_bound" in history[0] and "loss_input_bound" not in history[0]
    assert all(math.isfinite(v) for v in history[0].values())


def test_device_classifier_starts_at_the_last_block():
    assert classifier_start(_model("resnet18", split=0).tail)[0] == "layer4.1"  # last BasicBlock + FC
    assert classifier_start(_model("smallcnn", split=2).tail)[0] == "block4"
    assert classifier_start(_model("funnel").tail)[0] == "conv4"


# ------------------------------------------------------------------------------- SiftFunnel


def test_pearson_redundancy_of_duplicated_decorrelated_and_dead_channels():
    pos = torch.arange(64, dtype=torch.float32)
    waves = torch.stack([torch.cos(2 * math.pi * k * pos / 64) for k in (1, 2, 3, 4)])  # orthogonal
    decorrelated = waves.reshape(1, 4, 8, 8).repeat(2, 1, 1, 1)
    duplicated = waves[:1].repeat(4, 1).reshape(1, 4, 8, 8) * torch.tensor([1.0, 2.0, -1.0, 0.5]).view(1, 4, 1, 1)
    assert pearson_redundancy(decorrelated).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_redundancy(duplicated).item() == pytest.approx(1.0, abs=1e-5)
    # a dead channel correlates with nothing (off-diagonal only), and its gradient stays finite
    dead = torch.cat([duplicated[:, :2], torch.zeros(1, 1, 8, 8)], 1).requires_grad_()
    value = pearson_redundancy(dead)
    value.backward()
    assert value.item() == pytest.approx(2 / 6, abs=1e-5) and torch.isfinite(dead.grad).all()
    assert pearson_redundancy(torch.randn(3, 1, 4, 4)).item() == 0.0  # one channel: no pairs


def test_siftfunnel_terms_and_label_smoothing():
    x, y = _batch(16)
    z = torch.relu(torch.randn(16, 6, 4, 4)).requires_grad_()
    logits = torch.randn(16, CLASSES, requires_grad=True)
    d = SiftFunnelDefense(2.0, alpha=5.0, gamma=2.0, smoothing=0.25, l1=0.03)
    terms = d.loss(x, z, logits, y)
    assert set(terms) == {"smoothing", "dcor", "redundancy", "l1"}
    t = torch.full((16, CLASSES), 0.25 / (CLASSES - 1)).scatter_(1, y[:, None], 0.75)
    kl = (t * (t.log() - F.log_softmax(logits, 1))).sum(1).mean()
    assert (F.cross_entropy(logits, y) + terms["smoothing"]).item() == pytest.approx(5 * kl.item(), rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.03 * z.abs().mean().item())
    assert 0 < terms["dcor"].item() <= 2.0
    sum(terms.values()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert "dcor" not in SiftFunnelDefense(0.0).loss(x, z, logits, y)  # strength = beta
    with pytest.raises(ValueError, match="smoothing"):
        SiftFunnelDefense(2.0, smoothing=1.0)


# ------------------------------------------------------------------------------- the funnel arch


@pytest.mark.parametrize("channels,size,shape", [(1, 28, (3, 14, 14)), (3, 32, (3, 16, 16))])
def test_funnel_head_passes_preflight(channels, size, shape):
    model = archs.create("funnel", in_channels=channels, image_size=size, num_classes=10, width="tiny")
    assert model.feature_shape == shape
    assert archs.preflight(model.head, (channels, size, size)) == []
    full = archs.create("funnel", in_channels=channels, image_size=size, num_classes=10)
    assert full.feature_shape == (12, *shape[1:])  # the paper's 12-channel funnel, half the side


_RUN_INT8 = """
import sys, numpy as np
from edgeveil.device.interpreter import find_interpreter, run
from edgeveil.export.parity import prepare_input, read_output
model = find_interpreter().make(sys.argv[1])  # the device's default runtime, XNNPACK included
inp, out = model.get_input_details()[0], model.get_output_details()[0]
np.save(sys.argv[3], read_output(run(model, prepare_input(np.load(sys.argv[2]), inp)), out))
"""


@pytest.mark.convert
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_funnel_head_converts_to_full_int8_builtins_and_matches_pytorch(channels, size, tmp_path):
    """Builtin int8 operators only, and the device runtime (in a subprocess: a runtime that cannot
    prepare a degenerate scale may abort) reproduces the PyTorch features."""
    import subprocess
    import sys

    import numpy as np

    from edgeveil.export import convert, export_onnx
    from edgeveil.export.convert import tflite_operators, tflite_problems
    from edgeveil.export.parity import match_layout

    model = archs.create("funnel", in_channels=channels, image_size=size, num_classes=10, width="tiny")
    head = model.head.eval()
    export_onnx(head, (channels, size, size), tmp_path / "head.onnx")
    rng = np.random.default_rng(0)
    calib = rng.random((32, size, size, channels), dtype=np.float32)
    path = convert(tmp_path / "head.onnx", calib, [0.5] * channels, [0.25] * channels, tmp_path, ("int8",))["int8"]
    assert tflite_problems(path, "int8") == []
    assert set(tflite_operators(path)) <= {"CONV_2D", "MAX_POOL_2D", "MEAN", "LOGISTIC", "MUL", "ADD",
                                          "QUANTIZE", "DEQUANTIZE"}

    x = (rng.random((8, size, size, channels), dtype=np.float32) - 0.5) / 0.25
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", _RUN_INT8, str(path), str(tmp_path / "x.npy"),
                           str(tmp_path / "z.npy")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    got = match_layout(np.load(tmp_path / "z.npy"), model.feature_shape)[0]
    with torch.no_grad():
        want = head(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    cosine = (got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))
    assert cosine > 0.99, cosine


# ------------------------------------------------------------------------------- CEM


def _clustered(n_per_class: int = 40, spread: float = 0.3, seed: int = 0):
    """Features (B, 2, 2, 2) around two prototypes per class; labels (B,)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(2, 2, 8, generator=g)
    y = torch.arange(2).repeat_interleave(n_per_class)
    which = torch.arange(2 * n_per_class) % 2
    z = centres[y, which] + spread * torch.randn(2 * n_per_class, 8, generator=g)
    return z.view(-1, 2, 2, 2), y


def test_cem_delegates_to_noise_and_adds_its_term_after_an_epoch():
    cem = defenses.create("cem", 8.0, base="noise", base_strength=0.2, clusters=2)
    assert isinstance(cem.base, NoiseDefense) and cem.sigma == 0.2
    assert cem.inference_noise() == NoiseDefense(0.2).inference_noise() == {"kind": "gaussian", "sigma": 0.2}
    cem.setup(None, None, (1, SIZE, SIZE), (2, 2, 2), 2)
    z, y = _clustered()
    x = torch.randn(len(z), 1, SIZE, SIZE)
    torch.manual_seed(0)
    assert (cem.transform(z) - z).std().item() == pytest.approx(0.2, rel=0.2)  # the base's noise
    assert cem.loss(x, z, None, y) == {}  # no clusters before the first epoch ends, as in the code
    cem.adversary_step(x, z, y)
    logged = cem.end_epoch(1, lr=1e-4)
    assert logged["cem_scale"] == 1.0 and logged["cem_cluster_var"] == pytest.approx(0.09, rel=0.3)
    z_grad = z.clone().requires_grad_()
    term = cem.loss(x, z_grad, None, y)["cem"]
    # per cluster pi relu(log(v + 0.01) - log(tau sigma^2 + 0.01)), v ~ 0.09: pi sums to 1 per class
    assert term.item() == pytest.approx(8 * (math.log(0.09 + 0.01) - math.log(0.125 * 0.04 + 0.01)), rel=0.2)
    term.backward()
    assert z_grad.grad.abs().sum() > 0
    spread_out = CEMDefense(8.0, base="noise", base_strength=2.0, clusters=2)  # tau sigma^2 = 0.5 > v
    spread_out.setup(None, None, (1, SIZE, SIZE), (2, 2, 2), 2)
    spread_out.adversary_step(x, z, y)
    spread_out.end_epoch(1, lr=1e-4)
    assert spread_out.loss(x, z, None, y)["cem"].item() == 0.0


def test_cem_learning_rate_ramp_base_options_and_checkpoint():
    cem = CEMDefense(16.0, base="noise", base_strength=0.5, base_options={"kind": "laplace"}, clusters=2)
    assert cem.sigma == pytest.approx(math.sqrt(2) * 0.5)  # Laplace std
    assert cem.inference_noise() == {"kind": "laplace", "sigma": 0.5}
    cem.setup(None, None, (1, SIZE, SIZE), (2, 2, 2), 2)
    z, y = _clustered()
    cem.adversary_step(torch.zeros(len(z), 1, SIZE, SIZE), z, y)
    cem.end_epoch(1, lr=0.05)
    assert cem.scale() == pytest.approx(0.02)  # 0.001 / lr above 4.1e-4 (section 4.4)
    fresh = CEMDefense(16.0, base="noise", base_strength=0.5, base_options={"kind": "laplace"}, clusters=2)
    fresh.setup(None, None, (1, SIZE, SIZE), (2, 2, 2), 2)
    fresh.load_state_dict(cem.state_dict())
    assert fresh.scale() == cem.scale()
    assert torch.equal(fresh.loss(None, z, None, y)["cem"], cem.loss(None, z, None, y)["cem"])
    nopeek = CEMDefense(8.0, base="nopeek")
    assert nopeek.inference_noise() is None and nopeek.sigma == 0.0


def test_cem_refuses_an_unknown_base_listing_the_allowed_ones():
    assert BASES == ("noise", "adversarial", "nopeek")
    with pytest.raises(ValueError, match=r"base must be one of noise, adversarial, nopeek, got 'mid'"):
        defenses.create("cem", 8.0, base="mid")
    with pytest.raises(ValueError, match="base_options"):
        CEMDefense(8.0, base_options=[1])


def test_kmeans_finds_separated_clusters():
    z, _ = _clustered(spread=0.05)
    v = z.flatten(1)[:40]  # class 0: two prototypes
    centroids, assign = kmeans(v, 2, 50, torch.Generator().manual_seed(0))
    which = torch.arange(40) % 2  # the prototype each row was drawn around
    assert torch.equal(assign, which) or torch.equal(assign, 1 - which)
    assert (v - centroids[assign]).pow(2).mean().item() < 0.01
