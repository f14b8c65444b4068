"""Reconstruction metrics: torchmetrics against scikit-image on the same images and region."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import one_torch_thread

pytest.importorskip("torchmetrics")
skm = pytest.importorskip("skimage.metrics")
Image = pytest.importorskip("PIL.Image")
ImageFilter = pytest.importorskip("PIL.ImageFilter")
datasets = pytest.importorskip("sklearn.datasets")

from edgeveil.cloud_sim import metrics  # noqa: E402

BORDER = 5  # (11 - 1) / 2: scikit-image's mean covers only the map this far in from each side
SKIMAGE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: one thread is as fast, and far faster when the cores are busy."""
    yield from one_torch_thread()


def _digit(img8: np.ndarray, blur: float = 0.0) -> np.ndarray:
    pil = Image.fromarray(np.uint8(np.rint(img8 * 255 / 16))).resize((28, 28), Image.BILINEAR)
    if blur:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(pil, dtype=np.float64) / 255


@pytest.fixture(scope="module")
def pairs():
    """60 real 28x28 digits and three perturbed versions: noise, blur, blur plus noise."""
    digits = datasets.load_digits().images[:60]
    rng = np.random.default_rng(0)
    x = np.stack([_digit(d) for d in digits])[:, None]
    blurred = np.stack([_digit(d, 1.2) for d in digits])[:, None]
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    mixed = np.clip(blurred + rng.normal(0, 0.05, x.shape), 0, 1)
    return x, {"noise": noisy, "blur": blurred, "mixed": mixed}


def _skimage(x, y, channel_axis=None):
    """Per-image (mean, full map) from scikit-image, the map shaped (C, H, W)."""
    out = [skm.structural_similarity(a if channel_axis is not None else a[0],
                                     b if channel_axis is not None else b[0],
                                     channel_axis=channel_axis, full=True, **SKIMAGE_SSIM)
           for a, b in zip(x, y)]
    means = np.array([m for m, _ in out])
    maps = np.stack([s if channel_axis is not None else s[None] for _, s in out])
    return means, maps


def _interior(maps):
    return maps[..., BORDER:-BORDER, BORDER:-BORDER]


@pytest.mark.parametrize("kind", ["noise", "blur", "mixed"])
def test_ssim_map_matches_skimage_on_the_valid_interior(pairs, kind):
    x, perturbed = pairs
    y = perturbed[kind]
    sk_mean, sk_map = _skimage(x, y)
    ours64 = metrics.ssim_maps(x, y, double=True)
    assert ours64.shape[2:] == (28 - 2 * BORDER, 28 - 2 * BORDER)
    assert np.abs(ours64 - _interior(sk_map)).max() < 1e-6
    # the reported float32 path: the map within float32 cancellation, the interior means tightly
    ours32 = metrics.ssim_maps(x, y)
    assert np.abs(ours32 - _interior(sk_map)).max() < 1e-3
    assert np.abs(ours32.mean(axis=(1, 2, 3)) - sk_mean).max() < 2e-5


@pytest.mark.parametrize("kind", ["noise", "blur", "mixed"])
def test_reported_ssim_is_skimages_per_image(pairs, kind):
    """The headline convention: per image, the interior mean, as scikit-image reports it."""
    x, perturbed = pairs
    y = perturbed[kind]
    scores = metrics.image_scores(x, y)["ssim"]
    sk_mean, _ = _skimage(x, y)
    assert np.abs(scores - sk_mean).max() < 1e-4
    assert metrics.SSIM_CONVENTION["window"] == "gaussian 11x11" and "interior" in metrics.SSIM_CONVENTION["border"]


def test_faint_residue_on_a_black_border_does_not_dominate():
    """What made MNIST read 0.62: a perfect digit plus residue of 0.02 on the black background.
    scikit-image scores it high; so must the report."""
    x = np.zeros((1, 1, 28, 28))
    x[0, 0, 8:20, 10:18] = 1.0
    y = np.clip(x + np.random.default_rng(1).uniform(0, 0.04, x.shape), 0, 1)
    ours = metrics.image_scores(x, y)["ssim"][0]
    sk_mean, _ = _skimage(x, y)
    assert abs(ours - sk_mean[0]) < 1e-4


def test_rgb_matches_skimage_with_channel_axis(pairs):
    x, perturbed = pairs
    rgb_x = np.concatenate([x, perturbed["blur"], x], axis=1)[:10]
    rgb_y = np.concatenate([perturbed["noise"], perturbed["mixed"], perturbed["blur"]], axis=1)[:10]
    sk_mean, sk_map = _skimage(rgb_x, rgb_y, channel_axis=0)
    ours = metrics.ssim_maps(rgb_x, rgb_y, double=True)
    assert np.abs(ours - _interior(sk_map)).max() < 1e-6
    np.testing.assert_allclose(ours.mean(axis=(1, 2, 3)), sk_mean, atol=1e-9)
    np.testing.assert_allclose(metrics.image_scores(rgb_x, rgb_y)["ssim"], sk_mean, atol=1e-4)


def test_colour_images_get_luminance_ssim_as_skimage_scores_rgb2gray(pairs):
    color = pytest.importorskip("skimage.color")
    x, perturbed = pairs
    rgb_x = np.concatenate([x, perturbed["blur"], x], axis=1)[:10]
    rgb_y = np.concatenate([perturbed["noise"], perturbed["mixed"], perturbed["blur"]], axis=1)[:10]
    expected = [skm.structural_similarity(color.rgb2gray(a.transpose(1, 2, 0)), color.rgb2gray(b.transpose(1, 2, 0)),
                                          **SKIMAGE_SSIM) for a, b in zip(rgb_x, rgb_y)]
    np.testing.assert_allclose(metrics.image_scores(rgb_x, rgb_y)["ssim_luma"], expected, atol=1e-4)
    assert "ssim_luma" not in metrics.image_scores(x, perturbed["noise"])  # one channel: it would repeat "ssim"


def test_luminance_ssim_sees_structure_that_lost_its_colour(pairs):
    """The picture-against-number gap it closes: the same outlines in other colours. A greyscale copy of a
    colour image keeps every outline; RGB SSIM marks it down, luminance SSIM does not."""
    x, perturbed = pairs
    rgb = np.concatenate([x, perturbed["blur"], 1 - x], axis=1)[:10]
    luma = np.tensordot(metrics.LUMA_WEIGHTS, rgb, axes=([0], [1]))[:, None]
    grey = np.repeat(luma, 3, axis=1)
    scores = metrics.image_scores(rgb, grey)
    assert scores["ssim_luma"].min() > 0.999
    assert scores["ssim"].max() < 0.9


@pytest.mark.parametrize("kind", ["noise", "blur", "mixed"])
def test_psnr_and_mse_match_skimage(pairs, kind):
    x, perturbed = pairs
    y = perturbed[kind]
    scores = metrics.image_scores(x, y)
    expected = [skm.peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]
    np.testing.assert_allclose(scores["psnr"], expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores["mse"], ((x - y) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)


def test_identical_images_score_ssim_one_and_capped_psnr(pairs):
    x, _ = pairs
    scores = metrics.image_scores(x[:5], x[:5].copy())
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-6)
    assert (scores["psnr"] == metrics.PSNR_CAP_DB).all() and (scores["mse"] == 0).all()


def test_accepts_tensors_and_clips_tiny_overshoot(pairs):
    import torch

    x, perturbed = pairs
    y = perturbed["blur"][:4]
    a = metrics.image_scores(torch.from_numpy(x[:4]).float(), torch.from_numpy(y).float())
    b = metrics.image_scores(x[:4], np.clip(y + 1e-6, None, 1 + 1e-6))
    np.testing.assert_allclose(a["ssim"], b["ssim"], atol=1e-4)


@pytest.mark.parametrize("shape_a, shape_b, values, message", [
    ((2, 1, 28, 28), (2, 1, 28, 27), 0.5, "same shape"),
    ((2, 1, 8, 8), (2, 1, 8, 8), 0.5, "8x8, smaller than the 11x11 SSIM window: resize"),
    ((2, 1, 28, 28), (2, 1, 28, 28), 255.0, r"must be in \[0, 1\]"),
    ((1, 28, 28), (1, 28, 28), 0.5, r"\(N, C, H, W\)"),
])
def test_bad_inputs_are_refused_with_clear_messages(shape_a, shape_b, values, message):
    with pytest.raises(ValueError, match=message):
        metrics.image_scores(np.full(shape_a, 0.5), np.full(shape_b, values))


def test_bootstrap_contains_mean_narrows_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    small, large = rng.uniform(0, 1, 50), rng.uniform(0, 1, 5000)
    mean, lo, hi = metrics.bootstrap_ci(small)
    assert lo < mean < hi and mean == pytest.approx(small.mean())
    _, lo_l, hi_l = metrics.bootstrap_ci(large)
    assert hi_l - lo_l < (hi - lo) / 5  # width shrinks like 1/sqrt(n): 10x here
    assert metrics.bootstrap_ci(small, seed=3) == metrics.bootstrap_ci(small, seed=3)
    assert metrics.bootstrap_ci(small, seed=3) != metrics.bootstrap_ci(small, seed=4)
    assert metrics.bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="empty"):
        metrics.bootstrap_ci([])


def test_paired_bootstrap_sees_a_small_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.3, 0.9, 300)  # per-image spread much larger than the shift
    b = a - 0.01 + rng.normal(0, 0.002, 300)
    mean, lo, hi = metrics.paired_bootstrap_diff(a, b)
    assert mean == pytest.approx(0.01, abs=1e-3) and 0 < lo < mean < hi
    with pytest.raises(ValueError, match="one value per image"):
        metrics.paired_bootstrap_diff(a, b[:-1])


def test_summarize(pairs):
    x, perturbed = pairs
    summary = metrics.summarize(metrics.image_scores(x, perturbed["mixed"]))
    assert set(summary) == {"ssim", "psnr", "mse"}
    for entry in summary.values():
        lo, hi = entry["ci95"]
        assert lo <= entry["mean"] <= hi and entry["n"] == len(x)
