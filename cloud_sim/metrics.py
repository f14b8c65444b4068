"""Reconstruction metrics and their confidence intervals.

Images are (N, C, H, W) float arrays or tensors in [0, 1] (data range 1.0), originals first:

    image_scores(originals, reconstructions) -> {"ssim": (N,), "psnr": (N,), "mse": (N,)}
                                                (and "ssim_luma": (N,) for colour images)
    summarize(scores)                        -> {metric: {"mean", "median", "ci95", "n"}}
    bootstrap_ci(values)                     -> (mean, lo, hi), percentile bootstrap of the mean
    paired_bootstrap_diff(a, b)              -> (mean, lo, hi) of a - b on the same images
    bootstrap_diff(a, b)                     -> (mean, lo, hi) of mean(a) - mean(b), independent samples

SSIM and PSNR come from torchmetrics (a maintained library). The reported SSIM is the mean of
the SSIM map over its valid interior, as scikit-image and the papers average it: a border of 5
pixels, where the 11x11 window would reach into reflected padding, is left out. Tests check it
per image against scikit-image. SSIM_CONVENTION says exactly which SSIM the report uses.

Colour images also get luminance SSIM ("ssim_luma"): the same SSIM on their luminance, weighted as
scikit-image's rgb2gray. SSIM over RGB channels reads a reconstruction with the right outlines in the
wrong colours as poor (rmle on CIFAR-10 siftfunnel: 0.40 over RGB, 0.62 on luminance, and a person
reads every outline); luminance SSIM scores the structure a person recognises, apart from colour.
torch and torchmetrics are imported inside the functions that need them.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "SSIM_CONVENTION", "PSNR_CAP_DB", "RANGE_TOLERANCE", "BORDER",
    "LUMA_WEIGHTS", "luma", "image_scores", "ssim_maps", "bootstrap_ci", "paired_bootstrap_diff", "bootstrap_diff", "summarize",
]

WINDOW = 11
BORDER = (WINDOW - 1) // 2  # pixels at each side whose window reaches past the image
SIGMA = 1.5
DATA_RANGE = 1.0
PSNR_CAP_DB = 100.0        # PSNR of identical images (infinite) is reported as this
RANGE_TOLERANCE = 1e-4     # values this far outside [0, 1] are clipped; further out is an error
_CHUNK = 512               # images per SSIM call, to bound memory
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)  # R, G, B: ITU-R BT.709, as scikit-image's rgb2gray

SSIM_CONVENTION = {
    "library": "torchmetrics.functional.image.structural_similarity_index_measure",
    "window": f"gaussian {WINDOW}x{WINDOW}",
    "sigma": SIGMA,
    "k1": 0.01,
    "k2": 0.03,
    "data_range": DATA_RANGE,
    "precision": "float32",
    "per_image": "the mean of the image's SSIM map over channels and the valid interior",
    "border": (
        f"the valid interior only: {BORDER} pixels at each side, where the window would reach "
        "into padding, are left out, as in scikit-image (structural_similarity with "
        "gaussian_weights=True, sigma=1.5, use_sample_covariance=False) and the papers. "
        "Averaging the whole map instead lets faint residue on a flat black border dominate: "
        "on MNIST it reads reconstructions a person cannot tell from the originals as 0.62"
    ),
    "min_size": f"{WINDOW}x{WINDOW}",
    "summary": f"interior SSIM, gaussian {WINDOW}x{WINDOW} window, sigma {SIGMA}, data range 1 "
               "(scikit-image's convention)",
    "luminance": (
        "colour images are also scored on luminance (ssim_luma): the same SSIM on "
        f"{LUMA_WEIGHTS[0]} R + {LUMA_WEIGHTS[1]} G + {LUMA_WEIGHTS[2]} B (scikit-image's rgb2gray), which "
        "scores outlines and texture apart from colour; a defense must cut both, and the smaller cut is the one "
        "quoted"
    ),
}


def image_scores(originals, reconstructions) -> dict[str, np.ndarray]:
    """Per-image SSIM, PSNR (dB, capped at PSNR_CAP_DB) and MSE (per element), each (N,); for
    3-channel images also luminance SSIM ("ssim_luma").

    Computed in float32 (as on a GPU): per-image SSIM agrees with float64 to about 1e-5.
    """
    import torch

    target, preds = _as_images(originals, reconstructions)
    with torch.no_grad():
        mse = (preds - target).pow(2).mean(dim=(1, 2, 3))
        out = {
            "ssim": _ssim(target, preds)[0].double().numpy(),
            "psnr": _psnr(target, preds).double().numpy(),
            "mse": mse.double().numpy(),
        }
        if target.shape[1] == 3:
            out["ssim_luma"] = _ssim(luma(target), luma(preds))[0].double().numpy()
        return out


def luma(images):
    """(N, 3, H, W) RGB tensor -> (N, 1, H, W) luminance, weighted as scikit-image's rgb2gray."""
    import torch

    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def ssim_maps(originals, reconstructions, double: bool = False) -> np.ndarray:
    """The SSIM map of each image over its valid interior, (N, C, H - 10, W - 10); its mean over
    (C, H, W) is the reported SSIM.

    double=True computes in float64 (slow on CPU, for cross-checks against scikit-image).
    """
    import torch

    target, preds = _as_images(originals, reconstructions)
    if double:
        target, preds = target.double(), preds.double()
    with torch.no_grad():
        return _ssim(target, preds)[1].numpy()


def _ssim(target, preds):
    """(per-image interior SSIM (N,), interior maps (N, C, H - 10, W - 10)), _CHUNK images at a time.

    torchmetrics returns the map over the whole reflect-padded image; its border is cut off here.
    """
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    maps = torch.cat([ssim(preds[i:i + _CHUNK], target[i:i + _CHUNK], gaussian_kernel=True, sigma=SIGMA,
                           kernel_size=WINDOW, data_range=DATA_RANGE, reduction="none",
                           return_full_image=True)[1] for i in range(0, len(target), _CHUNK)])
    interior = maps[..., BORDER:-BORDER, BORDER:-BORDER]
    return interior.mean(dim=(1, 2, 3)), interior


def _psnr(target, preds):
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    values = psnr(preds, target, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    return values.nan_to_num(posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)


def _as_images(originals, reconstructions):
    """Both as float32 CPU tensors (N, C, H, W), clipped to [0, 1]; every problem in one ValueError."""
    import torch

    a, b = (torch.as_tensor(np.array(x.detach().cpu() if torch.is_tensor(x) else x))
            for x in (originals, reconstructions))
    problems = []
    for label, x in (("originals", a), ("reconstructions", b)):
        problems += _check_one(label, x)
    if not problems and a.shape != b.shape:
        problems.append(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} "
                        "must have the same shape")
    if problems:
        raise ValueError("; ".join(problems))
    return a.float().clamp(0.0, 1.0), b.float().clamp(0.0, 1.0)


def _check_one(label: str, x) -> list[str]:
    import torch

    if x.dim() != 4:
        return [f"{label} must be (N, C, H, W), got shape {tuple(x.shape)}"]
    if len(x) == 0:
        return [f"{label} is empty"]
    if not x.is_floating_point():
        return [f"{label} must be float images in [0, 1], got dtype {x.dtype}"]
    h, w = x.shape[2:]
    problems = []
    if h < WINDOW or w < WINDOW:
        problems.append(f"{label} are {h}x{w}, smaller than the {WINDOW}x{WINDOW} SSIM window: "
                        f"resize them to at least {WINDOW}x{WINDOW} (for example 28x28 or 32x32)")
    x = x.double()
    if not torch.isfinite(x).all():
        problems.append(f"{label} contain NaN or infinite values")
    elif x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE:
        problems.append(f"{label} must be in [0, 1] (data range 1.0), got values in "
                        f"[{float(x.min()):.4g}, {float(x.max()):.4g}]: de-normalize them first")
    return problems


# ---------------------------------------------------------------- confidence intervals


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean and its percentile-bootstrap (1 - alpha) interval, fixed by seed."""
    x = _check_values(values, "values")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    means = _resampled_means(x, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def paired_bootstrap_diff(a, b, n_boot: int = 2000, alpha: float = 0.05,
                          seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of a - b where a[i] and b[i] score the same image (resampled together)."""
    a = _check_values(a, "a")
    b = _check_values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one value per image on both sides, got {len(a)} and {len(b)}")
    return bootstrap_ci(a - b, n_boot=n_boot, alpha=alpha, seed=seed)


def bootstrap_diff(a, b, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi) of mean(a) - mean(b) for independent samples, each resampled on its own."""
    a = _check_values(a, "a")
    b = _check_values(b, "b")
    if not (isinstance(n_boot, int) and n_boot >= 1):
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    rng = np.random.default_rng(seed)
    diffs = _resampled_means(a, n_boot, rng) - _resampled_means(b, n_boot, rng)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def _check_values(values, label: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError(f"{label} is empty: nothing to bootstrap")
    if not np.isfinite(x).all():
        raise ValueError(f"{label} contains NaN or infinite values")
    return x


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples with replacement, drawn in blocks of at most ~4M indices."""
    rows = max(1, 4_000_000 // len(x))
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        out[start:start + k] = x[rng.integers(0, len(x), size=(k, len(x)))].mean(axis=1)
    return out


def summarize(scores: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """{metric: {"mean", "median", "ci95": [lo, hi], "n"}} for each per-image score array."""
    out = {}
    for name, values in scores.items():
        mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, alpha=0.05, seed=seed)
        out[name] = {"mean": mean, "median": float(np.median(values)), "ci95": [lo, hi],
                     "n": int(np.size(values))}
    return out
