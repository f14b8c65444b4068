"""Knowledge alignment (other-distribution auxiliary data) and the MINE diagnostic, on digits."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import RecordedQuery, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")
pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn.datasets")

from edgeveil.cloud_sim import metrics  # noqa: E402
from edgeveil.cloud_sim.attacks import create  # noqa: E402
from edgeveil.cloud_sim.attacks.base import AttackContext, Victim  # noqa: E402
from edgeveil.cloud_sim.attacks.inverse import InverseAttack  # noqa: E402
from edgeveil.cloud_sim.attacks.ka import KnowledgeAlignmentAttack, convert_images  # noqa: E402
from edgeveil.cloud_sim.attacks.mine import MineEstimate  # noqa: E402
from edgeveil.training import archs  # noqa: E402
from edgeveil.training.data import load_dataset  # noqa: E402

DECODER = dict(epochs=4, width=16, lr=3e-3, restarts=1)
MINE = dict(epochs=20, batch_size=50, val_fraction=0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: one thread is as fast, and far faster when the cores are busy."""
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def digits():
    """(images (1797, 1, 28, 28) in [0, 1], a fixed random-init smallcnn head -> (8, 14, 14))."""
    _, pool = load_dataset("digits")
    x = (pool.x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    torch.manual_seed(0)
    head = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width="tiny").head.eval()
    return x[np.random.default_rng(0).permutation(len(x))], head


def _victim_context(digits, n_target=200) -> AttackContext:
    """Targets are digits; the context's own (same-distribution) aux set is 20 digits KA never uses."""
    x, head = digits
    query = RecordedQuery(head)
    aux, target = x[:20], x[20:20 + n_target]
    ctx = AttackContext(aux, query.query(aux), query.query(target), target, progress=False,
                        victim=Victim(query=query))
    return ctx


# ---------------------------------------------------------------- ka


def test_ka_with_cifar10_beats_random_images(digits, shared_data):
    """Grey CIFAR-10 photographs teach the decoder more about digits than random pixels do."""
    ctx = _victim_context(digits)
    cifar = f"npz:{shared_data / 'cifar10_test_jpeg.npz'}"
    ka = KnowledgeAlignmentAttack(**DECODER, aux_dataset=cifar, aux_size=600).run(ctx)
    noise = InverseAttack(**DECODER, queries="noise", noise_images=600).run(_victim_context(digits))
    random_images = np.random.default_rng(0).random(ctx.target_images.shape, dtype=np.float32)
    floor = float(metrics.image_scores(ctx.target_images, random_images)["ssim"].mean())
    ssim = ka.summary["ssim"]  # measured: 0.62 against 0.18 (noise queries) and 0.004 (random images)
    assert ssim["mean"] > noise.summary["ssim"]["mean"] + 0.2, (ssim, noise.summary["ssim"])
    assert ssim["mean"] > floor + 0.3 and ssim["n"] == 200, (ssim, floor)
    assert ka.reconstructions.shape == ctx.target_images.shape
    (sent,) = ctx.victim.query.sent
    assert sent.shape == (600, 1, 28, 28) and ka.info["converted_to"] == [1, 28, 28]
    assert ka.info["source_shape"] == [32, 32, 3] and ka.info["aux_pool"] == 10_000


def test_ka_aux_size_sets_the_training_pairs(digits, shared_data):
    small = f"npz:{shared_data / 'cifar10_train200_png.npz'}"
    runs = {n: KnowledgeAlignmentAttack(**{**DECODER, "epochs": 1}, aux_dataset=small, aux_size=n)
            for n in (60, 150)}
    for n, attack in runs.items():
        ctx = _victim_context(digits, n_target=30)
        result = attack.run(ctx)
        assert result.info["training_pairs"] == n == result.info["train_images"] + result.info["val_images"]
        assert len(ctx.victim.query.sent[-1]) == n
    with pytest.raises(ValueError, match="aux_size=300 but aux_dataset .* holds 200 images"):
        KnowledgeAlignmentAttack(aux_dataset=small, aux_size=300).run(_victim_context(digits, n_target=30))


def test_ka_refuses_bad_aux_datasets(digits, tmp_path):
    with pytest.raises(ValueError, match="aux_dataset must be one of digits, mnist.*npz:PATH.*got 'cifar-11'"):
        KnowledgeAlignmentAttack(aux_dataset="cifar-11")
    with pytest.raises(ValueError, match="aux_size must be an integer >= 2.*npz file '/nowhere/x.npz' not found"):
        KnowledgeAlignmentAttack(aux_dataset="npz:/nowhere/x.npz", aux_size=1)
    bad = tmp_path / "float.npz"
    np.savez(bad, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="ka: aux_dataset 'npz:.*float.npz' could not be loaded: .*expected uint8"):
        KnowledgeAlignmentAttack(aux_dataset=f"npz:{bad}").run(_victim_context(digits, n_target=10))
    ctx = _victim_context(digits, n_target=10)
    ctx.victim = None
    digits_aux = KnowledgeAlignmentAttack(**DECODER, aux_dataset="digits", aux_size=20)
    with pytest.raises(ValueError, match="ka needs query access"):
        digits_aux.run(ctx)


def test_convert_images_grey_rgb_and_size():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    grey = convert_images(rgb, (1, 32, 32))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert grey.shape == (3, 1, 32, 32) and np.abs(grey[:, 0] * 255 - luma).max() <= 1.0
    back = convert_images(rgb[..., :1], (3, 28, 28))
    assert back.shape == (3, 3, 28, 28) and (back[:, 0] == back[:, 1]).all() and (back[:, 1] == back[:, 2]).all()
    assert np.allclose(back * 255, np.rint(back * 255), atol=1e-4) and 0 <= back.min() and back.max() <= 1
    same = convert_images(rgb, (3, 32, 32))
    np.testing.assert_array_equal(same, rgb.transpose(0, 3, 1, 2) / np.float32(255))


def test_ka_registry_and_threat_model(shared_data):
    attack = create("ka", epochs=1)  # the default aux_dataset is the shared CIFAR-10 test set
    assert isinstance(attack, KnowledgeAlignmentAttack)
    assert attack.threat_model.describe() == (
        "no head weights, query access, other-distribution auxiliary data, 0 labels")
    assert attack.options["aux_dataset"].endswith("cifar10_test_jpeg.npz") and not attack.wants_victim_images


# ---------------------------------------------------------------- mine


@pytest.fixture(scope="module")
def pairs(digits):
    """600 digits and their features: deterministic, permuted, and with a little or a lot of noise."""
    x, head = digits
    x = x[:600]
    with torch.no_grad():
        z = head(torch.from_numpy(x)).numpy()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(z.shape).astype(np.float32) * z.std()
    features = {"deterministic": z, "permuted": z[rng.permutation(len(z))],
                "noise 0.5 sd": z + 0.5 * noise, "noise 3 sd": z + 3 * noise}
    return x, features


@pytest.fixture(scope="module")
def estimates(pairs):
    x, features = pairs
    return {name: MineEstimate(**MINE).run(AttackContext(x[:10], z[:10], z, x, progress=False))
            for name, z in features.items()}


def test_mine_sees_dependence_and_its_absence(estimates):
    mi = {name: r.summary["mi"] for name, r in estimates.items()}  # measured: 3.66, -0.02, 2.65, 1.29 nats
    assert abs(mi["permuted"]["mean"]) < 0.1, mi["permuted"]
    assert mi["deterministic"]["ci95"][0] > mi["permuted"]["ci95"][1] + 1.0, mi
    assert mi["noise 0.5 sd"]["mean"] > mi["noise 3 sd"]["mean"] + 0.3, mi


def test_mine_result_layout(estimates):
    result = estimates["deterministic"]
    mi = result.summary["mi"]
    assert result.reconstructions is None and mi["unit"] == "nats" and mi["n"] == 6
    assert mi["ci95"][0] <= mi["mean"] <= mi["ci95"][1]
    assert np.isclose(result.scores["mi"].mean(), mi["mean"]) and result.scores["mi"].shape == (6,)
    assert result.info["train_pairs"] == result.info["val_pairs"] == 300
    curve = result.info["curve"]
    assert len(curve) == MINE["epochs"] and curve[-1]["train_mi"] > curve[0]["train_mi"]


def test_mine_is_seeded(pairs):
    x, features = pairs
    z = features["noise 3 sd"]
    runs = [MineEstimate(**{**MINE, "epochs": 3}).run(AttackContext(x[:10], z[:10], z, x, seed=s, progress=False))
            for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0].scores["mi"], runs[1].scores["mi"])
    assert runs[0].info["curve"] == runs[1].info["curve"]
    assert not np.allclose(runs[0].scores["mi"], runs[2].scores["mi"])


def test_mine_is_declared_a_diagnostic_and_checks_its_input(pairs):
    assert MineEstimate.threat_model.describe().startswith("diagnostic, not an attack: the evaluator's ground truth")
    x, features = pairs
    z = features["deterministic"]
    with pytest.raises(ValueError, match="mine needs ctx.target_images"):
        MineEstimate(**MINE).run(AttackContext(x[:10], z[:10], z, None, progress=False))
    with pytest.raises(ValueError, match="at least batch_size=50 pairs on each side: 60 target pairs"):
        MineEstimate(**MINE).run(AttackContext(x[:10], z[:10], z[:60], x[:60], progress=False))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 4.*ema must be a number in"):
        MineEstimate(batch_size=2, ema=1.5)
