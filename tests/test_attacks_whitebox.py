"""The white-box rMLE attack and the query-free shadow attack, on digits through a trained smallcnn.

The victim: smallcnn at width 0.5, split 2 (16x14x14 features), trained briefly on digits 28x28.
Int8 features are made with the device's own numpy quantization (device.quant), not with the
attack's fake quantization; the slow test inverts a real exported int8 TFLite head.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import digits_28, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")
pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn.datasets")

from edgeveil.cloud_sim import metrics  # noqa: E402
from edgeveil.cloud_sim.attacks import create  # noqa: E402
from edgeveil.cloud_sim.attacks.base import AttackContext, Victim  # noqa: E402
from edgeveil.cloud_sim.attacks.rmle import RmleAttack, fake_quantize, surrogate  # noqa: E402
from edgeveil.cloud_sim.attacks.shadow import ShadowAttack  # noqa: E402
from edgeveil.device.quant import dequantize, quantize  # noqa: E402
from edgeveil.device.noise import add_float_noise, add_quantized_noise, sent_qparams  # noqa: E402
from edgeveil.training import archs  # noqa: E402

MEAN, STD = (0.3,), (0.32,)
ARCH = {"arch": "smallcnn", "split": 2, "width": 0.5, "in_channels": 1, "image_size": 28, "num_classes": 10,
        "options": {}}
QUICK = dict(steps=200, lr=0.1, restarts=1, batch_size=32)   # seconds on one thread for 32 targets
N_AUX, N_TARGET = 1000, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits():
    """Digits resized to 28x28 in [0, 1] (N, 1, 28, 28), labels, and a seeded aux/target split."""
    x, y = digits_28()
    order = np.random.default_rng(0).permutation(len(x))
    return x, y, order[:N_AUX], order[N_AUX:N_AUX + N_TARGET]


@pytest.fixture(scope="module")
def victim(digits):
    """The victim's head and tail, trained jointly for 150 Adam steps on the aux part (97% on the rest).

    So the shadow's labelled data is the victim's training set: He et al.'s "same set" setting."""
    x, y, aux, _ = digits
    torch.manual_seed(0)
    model = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, split=2, width=0.5)
    params = list(model.head.parameters()) + list(model.tail.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    xt, yt = _normalize(torch.from_numpy(x[aux])), torch.from_numpy(y[aux])
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(xt), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model.tail(model.head(xt[idx])), yt[idx])
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    return model.head.eval(), model.tail.eval()


def _normalize(x):
    return (x - MEAN[0]) / STD[0]


def _features(head, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(_normalize(torch.from_numpy(images))).numpy()


def _int8_qparams(aux_features: np.ndarray) -> tuple[dict, dict]:
    """Input and output qparams as a TFLite calibration gives them: min/max range, asymmetric int8."""
    def qparams(lo: float, hi: float) -> dict:
        scale = (hi - lo) / 255.0
        return {"scale": scale, "zero_point": int(round(-128 - lo / scale)), "qmin": -128, "qmax": 127}

    return qparams((0 - MEAN[0]) / STD[0], (1 - MEAN[0]) / STD[0]), qparams(0.0, float(aux_features.max()))


def _sent_q(out_q: dict | None, noise: dict | None) -> dict | None:
    """The grid the device sends noisy codes on, as export derives it into the manifest's `sent`."""
    if out_q is None:
        return None
    scale, zero_point = sent_qparams(out_q["scale"], out_q["zero_point"], out_q["qmin"], out_q["qmax"], noise)
    return {**out_q, "scale": scale, "zero_point": zero_point}


def _int8_features(head, images: np.ndarray, in_q: dict, out_q: dict) -> np.ndarray:
    """The int8 artifact's I/O, with the device's numpy quantization (per-layer rounding aside)."""
    x = _normalize(images)
    x = dequantize(quantize(x, in_q["scale"], in_q["zero_point"], np.int8), in_q["scale"], in_q["zero_point"])
    with torch.no_grad():
        z = head(torch.from_numpy(x)).numpy()
    return dequantize(quantize(z, out_q["scale"], out_q["zero_point"], np.int8), out_q["scale"], out_q["zero_point"])


def _context(digits, head, tail, target_features=None, *, white_box=True, **victim_kw) -> AttackContext:
    x, y, aux, target = digits
    victim = Victim(victim_kw.pop("precision", "float"), head=head if white_box else None, tail=tail,
                    mean=MEAN, std=STD, num_classes=10, arch=ARCH, **victim_kw)
    z_target = _features(head, x[target]) if target_features is None else target_features
    return AttackContext(x[aux], _features(head, x[aux]), z_target, x[target], progress=False,
                         victim=victim, aux_labels=y[aux])


def _ssim(result) -> float:
    return result.summary["ssim"]["mean"]


def _baselines(ctx: AttackContext) -> tuple[float, float]:
    return _guess_ssim(ctx.target_images, ctx.aux_images)


def _guess_ssim(targets: np.ndarray, aux_images: np.ndarray) -> tuple[float, float]:
    """SSIM of seeded uniform noise images and of the mean auxiliary image against the targets."""
    noise = np.random.default_rng(0).random(targets.shape, dtype=np.float32)
    mean = np.broadcast_to(aux_images.mean(axis=0), targets.shape)
    return tuple(float(metrics.image_scores(targets, g)["ssim"].mean()) for g in (noise, mean))


@pytest.fixture(scope="module")
def float_run(digits, victim):
    ctx = _context(digits, *victim)
    return ctx, RmleAttack(**QUICK).run(ctx)


# ---------------------------------------------------------------- rmle


def test_rmle_inverts_float_features_far_above_both_baselines(float_run):
    ctx, result = float_run
    random_image, mean_image = _baselines(ctx)
    # measured: 0.997 against 0.005 (uniform noise) and 0.40 (the mean auxiliary image)
    assert _ssim(result) > mean_image + 0.3 and _ssim(result) > random_image + 0.5, \
        (_ssim(result), random_image, mean_image)
    assert result.reconstructions.shape == ctx.target_images.shape
    assert 0 <= result.reconstructions.min() and result.reconstructions.max() <= 1
    info = result.info
    assert info["steps"] == 200 and len(info["restart_feature_losses"]) == 1 and info["seconds"] > 0
    assert info["fake_quantization"] == {"input": False, "output": False} and info["noise_averaging"] is None


def test_rmle_inverts_int8_features_through_fake_quantization(digits, victim, float_run):
    x, _, aux, target = digits
    head, tail = victim
    in_q, out_q = _int8_qparams(_features(head, x[aux]))
    z_int8 = _int8_features(head, x[target], in_q, out_q)
    steps = z_int8 / out_q["scale"]
    assert np.abs(steps - np.rint(steps)).max() < 1e-3 and not np.allclose(z_int8, _features(head, x[target]))
    ctx = _context(digits, head, tail, z_int8, precision="int8", input_quant=in_q, output_quant=out_q)
    result = RmleAttack(**QUICK).run(ctx)
    assert result.info["fake_quantization"] == {"input": True, "output": True}
    _, mean_image = _baselines(ctx)
    assert _ssim(result) > mean_image + 0.3, (_ssim(result), mean_image)  # measured: 0.98 against 0.40
    assert _ssim(result) > _ssim(float_run[1]) - 0.1  # int8 barely protects against a white-box attacker


def test_fake_quantize_is_the_devices_quantization_with_a_straight_through_gradient():
    rng = np.random.default_rng(0)
    for scale, zero_point in ((0.0123143894597888, -50), (0.013600547797977924, -128), (0.1, 3)):
        ties = ((rng.integers(-300, 300, 5000) + 0.5) * np.float32(scale)).astype(np.float32)
        x = np.concatenate([ties, rng.normal(0, 3, 5000).astype(np.float32)])  # saturates too
        device = dequantize(quantize(x, scale, zero_point, np.int8), scale, zero_point)
        t = torch.from_numpy(x).requires_grad_(True)
        fq = fake_quantize(t, {"scale": scale, "zero_point": zero_point, "qmin": -128, "qmax": 127})
        np.testing.assert_array_equal(fq.detach().numpy(), device)
        fq.sum().backward()
        np.testing.assert_array_equal(t.grad.numpy(), np.ones_like(x))


@pytest.mark.parametrize("noise", [{"kind": "gaussian", "sigma": 0.01}, {"kind": "gaussian", "sigma": 0.05},
                                   {"kind": "laplace", "sigma": 0.03}, {"kind": "dropout", "p": 0.3}],
                         ids=lambda n: f"{n['kind']}-{n.get('sigma', n.get('p'))}")
@pytest.mark.parametrize("precision", ["float", "int8"])
def test_surrogate_noise_is_distributed_as_the_device_adds_it(digits, victim, noise, precision):
    """What the attack averages over matches device.noise: spread and share of changed features."""
    x, _, aux, target = digits
    head, _ = victim
    in_q, out_q = _int8_qparams(_features(head, x[aux])) if precision == "int8" else (None, None)
    model = surrogate(Victim(precision, head=head, mean=MEAN, std=STD, input_quant=in_q, output_quant=out_q,
                             sent_quant=_sent_q(out_q, noise), noise=noise))
    images = torch.from_numpy(x[target]).repeat(4, 1, 1, 1)
    with torch.no_grad():
        clean = model(images).numpy()
        ours = model(images, torch.Generator().manual_seed(0)).numpy() - clean
    rng = np.random.default_rng(0)
    if out_q is None:
        theirs = add_float_noise(clean, noise, rng)[0] - clean
    else:
        codes = quantize(clean, out_q["scale"], out_q["zero_point"], np.int8)
        sent = _sent_q(out_q, noise)
        noisy = add_quantized_noise(codes, out_q["scale"], out_q["zero_point"], noise, rng,
                                    (sent["scale"], sent["zero_point"]))
        theirs = dequantize(noisy.codes, noisy.scale, noisy.zero_point) - clean
        # The output step is 0.025: 0.01 stays on the tensor's grid, 0.05 and 0.03 widen it.
        assert model.sent_quant["scale"] == noisy.scale and noisy.stats.get("widened", False) == (
            noise.get("sigma", 0) >= out_q["scale"])
    assert ours.std() == pytest.approx(theirs.std(), rel=0.03)
    assert (ours != 0).mean() == pytest.approx((theirs != 0).mean(), abs=0.01)
    assert abs(ours.mean() - theirs.mean()) < 0.05 * theirs.std()


def test_noise_draws_share_one_pass_through_the_head(digits, victim):
    """The averaged feature loss runs the head once per step and draws the noise on its output: the
    same value and gradient as running the head on every draw's copy of the images."""
    from edgeveil.cloud_sim.attacks.rmle import _feature_loss

    x, _, aux, target = digits
    head, _ = victim
    in_q, out_q = _int8_qparams(_features(head, x[aux]))
    noise = {"kind": "gaussian", "sigma": 0.05}
    model = surrogate(Victim("int8", head=head, mean=MEAN, std=STD, input_quant=in_q, output_quant=out_q,
                             sent_quant=_sent_q(out_q, noise), noise=noise))
    images = torch.from_numpy(x[target[:16]])
    with torch.no_grad():
        z = model.clean(torch.from_numpy(x[target[16:32]]))
    grads = []
    for shared in (True, False):
        xs = images.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(3)
        if shared:
            loss = _feature_loss(model, xs, z, 4, generator)
        else:
            feats = model(xs.repeat(4, 1, 1, 1), generator)
            loss = (feats - z.repeat(4, 1, 1, 1)).pow(2).flatten(1).mean(1).view(4, -1).mean(0)
        loss.sum().backward()
        grads.append((loss.detach(), xs.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_rmle_averages_runtime_noise_and_stronger_noise_leaks_less(digits, victim):
    x, _, _, target = digits
    head, tail = victim
    clean = _features(head, x[target])
    ssim = {}
    for sigma in (0.05, 1.0):
        noise = {"kind": "gaussian", "sigma": sigma}
        noisy, _ = add_float_noise(clean, noise, np.random.default_rng(1))
        result = RmleAttack(**QUICK, noise_draws=2).run(_context(digits, head, tail, noisy, noise=noise))
        assert result.info["noise_averaging"] == {"kind": "gaussian", "draws": 2}
        ssim[sigma] = _ssim(result)
    assert ssim[1.0] < ssim[0.05] - 0.3, ssim  # measured: 0.41 against 0.975


def test_rmle_int8_with_quantized_dropout_noise(digits, victim):
    """Dropout on int8 codes, as the device applies it; the attack masks its fake-quantized features."""
    x, _, aux, target = digits
    head, tail = victim
    in_q, out_q = _int8_qparams(_features(head, x[aux]))
    codes = quantize(_int8_features(head, x[target], in_q, out_q), out_q["scale"], out_q["zero_point"], np.int8)
    noise = {"kind": "dropout", "p": 0.2}
    own = (out_q["scale"], out_q["zero_point"])  # dropout keeps the tensor's grid
    dropped = add_quantized_noise(codes, *own, noise, np.random.default_rng(2), own).codes
    z = dequantize(dropped, *own)
    ctx = _context(digits, head, tail, z, precision="int8", input_quant=in_q, output_quant=out_q,
                   sent_quant=_sent_q(out_q, noise), noise=noise)
    result = RmleAttack(**QUICK, noise_draws=2).run(ctx)
    assert result.info["noise_averaging"] == {"kind": "dropout", "draws": 2}
    assert _ssim(result) > _baselines(ctx)[1] + 0.2


def test_restarts_keep_the_lowest_feature_loss_and_runs_repeat(digits, victim):
    head, tail = victim
    ctx = _context(digits, head, tail)
    options = dict(QUICK, steps=60, restarts=2, batch_size=20)   # two batches: 20 + 12
    first, again = RmleAttack(**options).run(ctx), RmleAttack(**options).run(ctx)
    np.testing.assert_array_equal(first.reconstructions, again.reconstructions)
    per_restart = first.info["restart_feature_losses"]
    assert first.info["final_feature_loss"] <= min(per_restart) + 1e-12
    assert sum(first.info["chosen_restart_counts"]) == N_TARGET
    one = RmleAttack(**dict(options, restarts=1)).run(ctx)
    assert one.info["final_feature_loss"] == pytest.approx(per_restart[0])  # restart 0 is the same run
    other = RmleAttack(**options).run(AttackContext(ctx.aux_images, ctx.aux_features, ctx.target_features,
                                                    None, seed=1, progress=False, victim=ctx.victim))
    assert other.scores == {} and other.summary == {}
    # restart 0 starts from gray whatever the seed; the seed moves the random restarts
    assert other.info["restart_feature_losses"][0] == per_restart[0]
    assert other.info["restart_feature_losses"][1] != per_restart[1]


# ---------------------------------------------------------------- shadow


def test_shadow_recovers_digits_without_head_weights_or_queries(digits, victim):
    head, tail = victim
    ctx = _context(digits, head, tail, white_box=False)   # the context carries no head at all
    result = ShadowAttack(**QUICK, shadow_epochs=5).run(ctx)
    info = result.info
    assert info["shadow_val_accuracy"] > info["chance_accuracy"] + 0.5, info["shadow_val_accuracy"]
    assert info["labels"] == N_AUX and info["shadow_train_images"] + info["shadow_val_images"] == N_AUX
    random_image, mean_image = _baselines(ctx)
    assert _ssim(result) > random_image + 0.3, (_ssim(result), random_image)  # measured: 0.81 against 0.005
    assert _ssim(result) > mean_image + 0.2, (_ssim(result), mean_image)      # and against 0.40
    assert [h["epoch"] for h in info["shadow_history"]] == [1, 2, 3, 4, 5]


def test_shadow_on_int8_features_fake_quantizes_the_output_only(digits, victim):
    x, _, aux, target = digits
    head, tail = victim
    in_q, out_q = _int8_qparams(_features(head, x[aux]))
    ctx = _context(digits, head, tail, _int8_features(head, x[target], in_q, out_q), white_box=False,
                   precision="int8", input_quant=in_q, output_quant=out_q)
    result = ShadowAttack(**dict(QUICK, steps=50), shadow_epochs=2).run(ctx)
    assert result.info["fake_quantization"] == {"input": False, "output": True}
    assert _ssim(result) > _baselines(ctx)[0] + 0.2


# ---------------------------------------------------------------- refusals and options


def test_white_box_and_shadow_refuse_what_they_lack(digits, victim):
    head, tail = victim
    ctx = _context(digits, head, tail)
    ctx.victim = None
    with pytest.raises(ValueError, match=r"rmle is a white-box attack.*ctx.victim is None"):
        RmleAttack().run(ctx)
    with pytest.raises(ValueError, match=r"shadow cannot run, it lacks ctx.victim"):
        ShadowAttack().run(ctx)
    with pytest.raises(ValueError, match=r"the float victim has no head \(victim.head is None\)"):
        RmleAttack().run(_context(digits, head, tail, white_box=False))
    ctx = _context(digits, head, tail)
    ctx.victim.tail, ctx.victim.arch, ctx.aux_labels = None, None, None
    with pytest.raises(ValueError, match=r"lacks victim.tail.*; victim.arch.*; ctx.aux_labels"):
        ShadowAttack().run(ctx)
    ctx = _context(digits, head, tail)
    ctx.aux_labels = ctx.aux_labels + 5
    with pytest.raises(ValueError, match=r"aux_labels must be class indices in 0..9 .*got values in 5..14"):
        ShadowAttack().run(ctx)


def test_options_are_checked_each_by_name():
    with pytest.raises(ValueError, match=r"attack rmle: no options step \(known: batch_size"):
        RmleAttack(step=3)
    message = (r"steps must be an integer >= 1, got 0.*restarts must be an integer >= 1, got 1.5.*"
               r"noise_draws must be an integer >= 1, got True.*lr must be a number > 0, got -1.*"
               r"tv_weight must be a number >= 0, got nan")
    with pytest.raises(ValueError, match=message):
        RmleAttack(steps=0, restarts=1.5, noise_draws=True, lr=-1, tv_weight=float("nan"))
    with pytest.raises(ValueError, match=r"shadow_epochs must be.*shadow_lr must be.*val_fraction must be "
                                         r"a number in \(0, 1\), got 1.*batch_size must be an integer >= 1, got 0"):
        ShadowAttack(shadow_epochs=0, shadow_lr=0, val_fraction=1, batch_size=0)
    assert ShadowAttack().options["tv_weight"] > RmleAttack().options["tv_weight"]
    assert isinstance(create("rmle", steps=5), RmleAttack) and isinstance(create("shadow"), ShadowAttack)


def test_threat_models():
    assert RmleAttack.threat_model.describe() == "white-box head, no queries, no auxiliary data, 0 labels"
    assert ShadowAttack.threat_model.describe() == "no head weights, no queries, labelled auxiliary data, 0 labels"


# ---------------------------------------------------------------- a real int8 TFLite head


SLOW = ["model.width=0.5", "train.epochs=3", "train.batch_size=32", "train.device=cpu", "data.test=32",
        "export.precisions=[int8]", "attack.precisions=[float,int8]", "attack.shadow.shadow_epochs=5",
        *[f"attack.{name}.{k}={v}" for name in ("rmle", "shadow") for k, v in QUICK.items()]]


@pytest.mark.slow
@pytest.mark.convert
def test_attack_stage_inverts_a_real_int8_tflite_head(tmp_path):
    """Train, export through onnx2tf, and attack the TFLite runner's int8 features (about 40 s)."""
    if importlib.util.find_spec("onnx2tf") is None:  # not imported: it sets the recursion limit to 2**31 - 1
        pytest.skip("onnx2tf is not installed")
    from edgeveil.export import export_run
    from edgeveil.pipeline.attack_stage import attack_stage
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.stages import train_stage
    from edgeveil.training.runfile import load_run, load_splits

    cfg, run_dir = load_config(None, SLOW), tmp_path / "run"
    train_stage(cfg, run_dir, progress=False)
    export_run(run_dir, precisions=("int8",), calibration_samples=100, parity_samples=32, progress=False)
    out = attack_stage(cfg, run_dir, names=["rmle", "shadow"], progress=False)
    splits = load_splits(load_run(run_dir).info)
    random_image, mean_image = _guess_ssim(*((s.x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
                                             for s in (splits.test, splits.aux)))
    rmle, shadow = (out["attacks"][name]["precisions"] for name in ("rmle", "shadow"))
    ssim = {(name, p): r["summary"]["ssim"]["mean"] for name, a in (("rmle", rmle), ("shadow", shadow))
            for p, r in a.items()}
    assert rmle["int8"]["info"]["fake_quantization"] == {"input": True, "output": True}
    assert rmle["float"]["info"]["fake_quantization"] == {"input": False, "output": False}
    # measured: rmle 0.93 float, 0.95 int8; shadow 0.87 both; baselines 0.003 (noise) and 0.39 (mean image)
    assert ssim["rmle", "int8"] > mean_image + 0.3 and abs(ssim["rmle", "int8"] - ssim["rmle", "float"]) < 0.1, ssim
    assert ssim["shadow", "int8"] > random_image + 0.3 and ssim["shadow", "int8"] > mean_image, ssim
    assert shadow["int8"]["info"]["shadow_val_accuracy"] > 0.6  # chance: 0.1
