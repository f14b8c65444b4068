"""The black-box inverse-network attack on digits, the attack interface, and the reconstruction grid."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import RecordedQuery, digits_28, one_torch_thread

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn.datasets")

from edgeveil.cloud_sim import metrics  # noqa: E402
from edgeveil.cloud_sim.attacks import base, inverse  # noqa: E402
from edgeveil.cloud_sim.attacks.base import AttackContext  # noqa: E402
from edgeveil.cloud_sim.attacks.inverse import InverseAttack, build_decoder  # noqa: E402
from edgeveil.cloud_sim.grid import save_grid  # noqa: E402
from edgeveil.device.registry import Registry  # noqa: E402
from edgeveil.training import archs  # noqa: E402

# Few epochs, a narrow decoder and a brisk lr: seconds on one CPU thread.
QUICK = dict(epochs=3, width=16, lr=3e-3, restarts=2)
TINY = dict(epochs=1, width=8, lr=3e-3, restarts=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: one thread is as fast, and far faster when the cores are busy."""
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def head():
    """A fixed random-init smallcnn head for 28x28 grey images: (B, 1, 28, 28) -> (B, 8, 14, 14)."""
    torch.manual_seed(0)
    return archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width="tiny").head.eval()


@pytest.fixture(scope="module")
def digits(head):
    """Digits resized to 28x28 in [0, 1], through the head."""
    x, _ = digits_28()
    with torch.no_grad():
        z = head(torch.from_numpy(x)).numpy()
    order = np.random.default_rng(0).permutation(len(x))
    return x, z, order[:1000], order[1000:1300]


def _context(digits, n_aux=1000, n_target=300, **kw) -> AttackContext:
    x, z, aux, target = digits
    aux, target = aux[:n_aux], target[:n_target]
    return AttackContext(x[aux], z[aux], z[target], x[target], **{"progress": False, **kw})


def _mean_image_ssim(ctx: AttackContext) -> float:
    guess = np.broadcast_to(ctx.aux_images.mean(axis=0), ctx.target_images.shape)
    return float(metrics.image_scores(ctx.target_images, guess)["ssim"].mean())


@pytest.fixture(scope="module")
def quick_run(digits):
    ctx = _context(digits, progress=True)
    return ctx, InverseAttack(**QUICK).run(ctx)


def test_inverse_beats_the_mean_image_baseline(quick_run):
    ctx, result = quick_run
    baseline = _mean_image_ssim(ctx)
    ssim = result.summary["ssim"]
    assert ssim["mean"] > baseline + 0.15, (ssim, baseline)  # measured: 0.82 against 0.39
    assert ssim["ci95"][0] <= ssim["mean"] <= ssim["ci95"][1] and ssim["n"] == 300
    assert result.reconstructions.shape == ctx.target_images.shape
    assert result.reconstructions.min() >= 0 and result.reconstructions.max() <= 1
    assert set(result.scores) == {"ssim", "psnr", "mse"} and len(result.scores["psnr"]) == 300
    assert result.info["train_images"] == 900 and result.info["val_images"] == 100
    assert len(result.info["restarts"]) == 2 and result.info["seconds"] > 0


def test_restarts_keep_the_best_validation_loss(digits, monkeypatch):
    """A restart that cannot learn (lr 0) is never the one reported, whichever it is."""
    ctx = _context(digits, n_aux=300, n_target=100)
    real = inverse._train_restart
    for broken in (0, 1):
        bad_seed = inverse._restart_seed(ctx.seed, broken)

        def sabotaged(data, o, seed, device, bar):
            return real(data, {**o, "lr": 0.0} if seed == bad_seed else o, seed, device, bar)

        monkeypatch.setattr(inverse, "_train_restart", sabotaged)
        result = InverseAttack(**{**TINY, "epochs": 2, "restarts": 2}).run(ctx)
        losses = [r["val_loss"] for r in result.info["restarts"]]
        assert result.info["best_restart"] == 1 - broken
        assert result.info["best_val_loss"] == min(losses) < losses[broken]
    # the reconstructions are the chosen decoder's: restart 0 alone gives the same images
    alone = InverseAttack(**{**TINY, "epochs": 2, "restarts": 1}).run(ctx)
    np.testing.assert_allclose(result.reconstructions, alone.reconstructions, atol=1e-6)


def test_same_seed_same_result_other_seed_other_result(digits):
    ctx = _context(digits, n_aux=200, n_target=50)
    first, second = InverseAttack(**TINY).run(ctx), InverseAttack(**TINY).run(ctx)
    np.testing.assert_array_equal(first.reconstructions, second.reconstructions)
    assert first.info["restarts"][0]["history"] == second.info["restarts"][0]["history"]
    other = InverseAttack(**TINY).run(_context(digits, n_aux=200, n_target=50, seed=1))
    assert not np.allclose(first.reconstructions, other.reconstructions)


def test_deep_decoder_and_no_ground_truth(digits):
    x, z, aux, target = digits
    ctx = AttackContext(x[aux[:200]], z[aux[:200]], z[target[:20]], None, progress=False)
    result = InverseAttack(**TINY, depth="deep", ssim_weight=0.5).run(ctx)
    assert result.reconstructions.shape == (20, 1, 28, 28)
    assert np.isfinite(result.info["best_val_loss"])
    assert result.scores == {} and result.summary == {}


def _regime_context(digits, head, **kw) -> AttackContext:
    """300 aux and 200 targets; the victim's training set is the 497 digits in neither."""
    x = digits[0]
    victim_train = np.setdiff1d(np.arange(len(x)), np.concatenate([digits[2], digits[3]]))
    return _context(digits, n_aux=300, n_target=200, victim=base.Victim(query=RecordedQuery(head)),
                    victim_images=x[victim_train], **kw)


@pytest.fixture(scope="module")
def regimes(digits, head):
    """Each query regime on the same targets, with the same decoder budget."""
    out = {}
    for queries in ("same-distribution", "same-set", "noise"):
        ctx = _regime_context(digits, head)
        out[queries] = ctx, InverseAttack(**QUICK, queries=queries).run(ctx)
    return out


def test_each_query_regime_trains_on_its_own_queries(regimes):
    ctx, result = regimes["same-distribution"]
    assert ctx.victim.query.sent == [] and result.info["training_pairs"] == 300
    ctx, result = regimes["same-set"]
    (sent,) = ctx.victim.query.sent
    np.testing.assert_array_equal(sent, ctx.victim_images)
    assert result.info["training_pairs"] == 497 == result.info["train_images"] + result.info["val_images"]
    ctx, result = regimes["noise"]
    (sent,) = ctx.victim.query.sent
    assert sent.shape == (300, 1, 28, 28) and result.info["training_pairs"] == 300
    levels = np.unique(np.rint(sent * 255))
    assert len(levels) == 256 and np.allclose(sent * 255, np.rint(sent * 255), atol=1e-4)  # camera pixels
    assert abs(float(sent.mean()) - 0.5) < 0.01
    assert [regimes[q][1].info["queries"] for q in regimes] == list(regimes)


def test_query_regimes_rank_as_he_et_al_report(regimes):
    """Same set >= same distribution >> noise (He et al. 2019, Table 4), on the same targets."""
    ssim = {q: r.summary["ssim"]["mean"] for q, (_, r) in regimes.items()}  # measured: 0.76, 0.68, 0.09
    assert ssim["same-set"] > ssim["same-distribution"] - 0.02, ssim
    assert ssim["noise"] < ssim["same-distribution"] - 0.1, ssim


def test_query_regimes_refuse_what_they_lack(digits, head):
    bare = _context(digits, n_aux=50, n_target=10)
    for queries in ("same-set", "noise"):
        with pytest.raises(ValueError, match="needs .*query"):
            InverseAttack(**TINY, queries=queries).run(
                _context(digits, n_aux=50, n_target=10, victim=base.Victim(), victim_images=bare.aux_images))
    with pytest.raises(ValueError, match="needs ctx.victim_images"):
        InverseAttack(**TINY, queries="same-set").run(
            _context(digits, n_aux=50, n_target=10, victim=base.Victim(query=RecordedQuery(head))))
    assert [InverseAttack(queries=q).wants_victim_images for q in ("same-distribution", "same-set", "noise")] == [
        False, True, False]
    assert InverseAttack(queries="noise").threat_model.describe() == (
        "no head weights, query access, no auxiliary data, 0 labels")
    assert "victim-training-set" in InverseAttack(queries="same-set").threat_model.describe()
    with pytest.raises(ValueError, match="queries must be one of.*noise_images must be null"):
        InverseAttack(queries="train", noise_images=1)
    with pytest.raises(ValueError, match="noise_images applies to queries='noise' only"):
        InverseAttack(noise_images=100)


def test_deep_decoder_is_deeper():
    """"deep" adds residual blocks (two at the feature resolution, one per up-sampling stage)."""
    shallow, deep = (build_decoder((8, 7, 7), (1, 28, 28), width=16, depth=d) for d in ("shallow", "deep"))
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in d.modules()) for d in (shallow, deep)]
    residual = [sum(type(m).__name__ == "_Residual" for m in d.modules()) for d in (shallow, deep)]
    assert residual == [0, 4] and convs == [4, 4 + 2 * 4], (convs, residual)
    params = [sum(p.numel() for p in d.parameters()) for d in (shallow, deep)]
    assert params[1] > 2 * params[0]


@pytest.mark.parametrize("feature_shape, image_shape", [
    ((8, 14, 14), (1, 28, 28)), ((16, 7, 7), (3, 28, 28)), ((4, 28, 28), (1, 28, 28)),
    ((32, 8, 8), (3, 30, 30)), ((64, 4, 4), (3, 32, 32)),
])
@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_decoder_maps_any_ratio_to_images(feature_shape, image_shape, depth):
    decoder = build_decoder(feature_shape, image_shape, width=16, depth=depth).eval()
    with torch.no_grad():
        out = decoder(torch.randn(2, *feature_shape))
    assert out.shape == (2, *image_shape) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_options_are_checked():
    with pytest.raises(ValueError, match="no options decoder_depth, epoch"):
        InverseAttack(epoch=3, decoder_depth="deep")
    with pytest.raises(ValueError, match="epochs must be an integer >= 1.*lr must be.*depth must be one of"):
        InverseAttack(epochs=0, lr=-1.0, depth="huge")
    assert InverseAttack().options["restarts"] == 2 and InverseAttack().options["depth"] == "shallow"


def test_context_reports_every_problem():
    good = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"aux_images has 4 images but aux_features 3.*differ.*\[0, 1\]"):
        AttackContext(good, np.zeros((3, 8, 14, 14)), np.zeros((2, 8, 7, 7)), good[:2] + 5)


def test_threat_model_and_registry_helpers():
    assert InverseAttack.threat_model.describe() == (
        "no head weights, query access, same-distribution auxiliary data, 0 labels")
    registry = Registry("attack", "attack.names", "Class",
                        {"inverse": "edgeveil.cloud_sim.attacks.inverse:InverseAttack"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register("inverse", "x.y:Z")
    assert registry.load("inverse") is InverseAttack and registry.describe("inverse") == InverseAttack.description
    with pytest.raises(ValueError, match="attack.names must be one of inverse, got 'rmle'"):
        registry.load("rmle")


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_grid_png_layout_and_atomic_write(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    ctx, result = quick_run
    two = save_grid(ctx.target_images, result.reconstructions, tmp_path / "grid2.png", title="inverse")
    mean = np.broadcast_to(ctx.aux_images.mean(axis=0), ctx.target_images.shape)
    three = save_grid(ctx.target_images, {"inverse": result.reconstructions, "mean image": mean},
                      tmp_path / "sub" / "grid3.png", n=16)
    rgb = np.repeat(ctx.target_images[:5], 3, axis=1) * np.array([1, 0.5, 0.2], np.float32)[:, None, None]
    small = save_grid(rgb, rgb[::-1].copy(), tmp_path / "rgb.png", n=16)
    (w2, h2), (w3, h3), (w_rgb, _) = _png_size(two), _png_size(three), _png_size(small)
    assert w2 == w3 > w_rgb > 0 and h3 > h2 > 0  # 16 columns vs 5; three rows vs two
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["grid2.png", "grid3.png", "rgb.png"]
    with pytest.raises(ValueError, match="row 'bad'"):
        save_grid(ctx.target_images, {"bad": result.reconstructions[:, :, :20]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
