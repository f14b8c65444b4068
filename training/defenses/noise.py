"""Additive Gaussian or Laplace noise on the released features (research/algorithms.md 5.1).

    r = z + n,   n ~ N(0, sigma^2 I)  (kind="gaussian")  or  Laplace(0, b) elementwise  (kind="laplace")

strength = sigma (the std) for Gaussian, the scale b for Laplace (std sqrt(2) b), in feature units.
He, Zhang & Lee (IEEE IoT-J 2020) add it to the intermediate features at inference and report that
the tail copes better when it has seen the noise, so `transform` adds the same noise in training
and `eval_transform` in float evaluation; on the device the runtime adds it after the int8 head
(`inference_noise`), where rounding erases noise far below one step
(`effective_noise_after_rounding` says how much survives).

Noise alone is not differential privacy: the head's output is unbounded, and a head trained with
noise can simply scale its features up. With option ``clip_norm`` every released feature vector
(one image's whole feature tensor) is first scaled down to that norm (L2 for Gaussian, L1 for
Laplace), here and on the device, and `privacy_report` gives (epsilon, delta) per release:

* neighbouring inputs: any two images (local DP, "replace-one"); two clipped vectors differ by at
  most 2 * clip_norm, which is the sensitivity used;
* Gaussian: the analytic Gaussian mechanism (Balle & Wang, ICML 2018, Theorem 8) at option
  ``delta`` (default 1e-5): the smallest epsilon with
  Phi(D / 2s - eps s / D) - e^eps Phi(-D / 2s - eps s / D) <= delta;
* Laplace: epsilon = 2 * clip_norm / b, delta = 0.

Each release is one use of the mechanism: k inferences on the same image compose (k times the
epsilon at worst). Rounding to int8 after the noise is post-processing and keeps the guarantee, but
only if the device clips the dequantized features before adding the noise.
"""
from __future__ import annotations

import math

import torch

from ._dcor import distance_correlation
from .base import Defense

__all__ = ["NoiseDefense", "KINDS", "analytic_gaussian_epsilon", "analytic_gaussian_sigma",
           "classical_gaussian_sigma", "effective_noise_after_rounding"]

KINDS = ("gaussian", "laplace")


class NoiseDefense(Defense):
    name = "noise"
    description = "Gaussian or Laplace noise on the features (strength = sigma or b); clip_norm adds (eps, delta)"
    paper = "He, Zhang & Lee, IEEE IoT-J 2020; accountant: Balle & Wang, ICML 2018"
    TARGET_DIRECTION = "down"  # dCor(x, released features)
    example_strength = 0.5

    def __init__(self, strength: float = 0.0, *, kind: str = "gaussian", clip_norm: float | None = None,
                 delta: float = 1e-5, **options):
        super().__init__(strength, **options)
        if kind not in KINDS:
            raise ValueError(f"defense.options.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"defense.strength (the noise sigma) must be a finite number >= 0, got {strength}")
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                      or not 0 < clip_norm < math.inf):
            raise ValueError(f"defense.options.clip_norm must be a positive number or null, got {clip_norm!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"defense.options.delta must be in (0, 1), got {delta!r}")
        self.kind, self.delta = kind, float(delta)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.clip_ord = 2 if kind == "gaussian" else 1

    # -- the release --------------------------------------------------------------------------
    def _release(self, z: torch.Tensor) -> torch.Tensor:
        if self.clip_norm is not None:
            z = clip_per_sample(z, self.clip_norm, self.clip_ord)
        if self.strength == 0:
            return z
        if self.kind == "gaussian":
            return z + self.strength * torch.randn_like(z)
        return z + self.strength * (torch.empty_like(z).exponential_() - torch.empty_like(z).exponential_())

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return self._release(z)

    def eval_transform(self, z: torch.Tensor) -> torch.Tensor:
        return self._release(z)

    def inference_noise(self) -> dict | None:
        if self.strength == 0 and self.clip_norm is None:
            return None
        spec = {"kind": self.kind, "sigma": self.strength}
        if self.clip_norm is not None:
            report = self.privacy_report()
            spec.update({"clip_norm": self.clip_norm, "clip_ord": self.clip_ord,
                         **{k: report[k] for k in ("epsilon", "delta", "sensitivity", "neighbouring", "accountant")}})
        return spec

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Distance correlation between the inputs and the released (noisy) features."""
        with torch.no_grad():
            return distance_correlation(x, r).item()

    # -- privacy accounting --------------------------------------------------------------------
    def privacy_report(self) -> dict:
        """(epsilon, delta) of one release, or epsilon None when no finite guarantee exists."""
        report = {"mechanism": self.kind, "sigma": self.strength, "clip_norm": self.clip_norm,
                  "clip_ord": self.clip_ord if self.clip_norm is not None else None,
                  "epsilon": None, "delta": None, "sensitivity": None, "neighbouring": None, "accountant": None,
                  "unit": "one released feature vector (one image, one inference)"}
        if self.clip_norm is None:
            report["note"] = "no clipping: the features are unbounded, so the noise gives no (epsilon, delta)"
            return report
        sensitivity = 2.0 * self.clip_norm
        report.update(sensitivity=sensitivity, neighbouring="replace-one: any two inputs (local DP per release)")
        if self.strength == 0:
            report["note"] = "sigma is 0: clipping alone gives no (epsilon, delta)"
        elif self.kind == "gaussian":
            report.update(epsilon=analytic_gaussian_epsilon(self.strength, sensitivity, self.delta),
                          delta=self.delta, accountant="analytic Gaussian mechanism (Balle & Wang 2018)")
        else:
            report.update(epsilon=sensitivity / self.strength, delta=0.0, accountant="Laplace mechanism (L1)")
        return report


def clip_per_sample(z: torch.Tensor, max_norm: float, ord: int = 2) -> torch.Tensor:
    """Scale each sample of z (B, ...) down to L`ord` norm <= max_norm (unchanged when already inside)."""
    norms = torch.linalg.vector_norm(z.reshape(z.shape[0], -1), ord=ord, dim=1)
    factor = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return z * factor.view(-1, *([1] * (z.dim() - 1)))


# ------------------------------------------------------------------------------- accountant


def _log_phi(t: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail."""
    if t > -30:
        return math.log(0.5 * math.erfc(-t / math.sqrt(2.0)))
    u = -t  # asymptotic series of the Mills ratio
    return -0.5 * u * u - math.log(u * math.sqrt(2.0 * math.pi)) + math.log1p(-1.0 / u**2 + 3.0 / u**4)


def _gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """The exact delta of the Gaussian mechanism at epsilon (Balle & Wang 2018, Theorem 8)."""
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    return math.exp(_log_phi(a - b)) - math.exp(epsilon + _log_phi(-a - b))


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """Smallest epsilon (to 1e-10 relative) for which N(0, sigma^2) noise is (epsilon, delta)-DP."""
    if sigma <= 0 or sensitivity <= 0 or not 0 < delta < 1:
        raise ValueError(f"need sigma > 0, sensitivity > 0 and 0 < delta < 1, got {sigma}, {sensitivity}, {delta}")
    if _gaussian_delta(0.0, sigma, sensitivity) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gaussian_delta(hi, sigma, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * hi:  # delta(epsilon) decreases in epsilon
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_delta(mid, sigma, sensitivity) > delta else (lo, mid)
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest sigma for which N(0, sigma^2) noise is (epsilon, delta)-DP (analytic mechanism)."""
    if epsilon <= 0 or sensitivity <= 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0, sensitivity > 0 and 0 < delta < 1, got {epsilon}, {sensitivity}, {delta}")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while _gaussian_delta(epsilon, hi, sensitivity) > delta:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * hi:  # delta decreases in sigma
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _gaussian_delta(epsilon, mid, sensitivity) > delta else (lo, mid)
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon (Dwork & Roth 2014, Thm A.1; epsilon <= 1)."""
    if not 0 < epsilon <= 1 or not 0 < delta < 1:
        raise ValueError(f"the classical bound needs 0 < epsilon <= 1 and 0 < delta < 1, got {epsilon}, {delta}")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


# ------------------------------------------------------------------------------- rounding


def _tail_beyond(u: torch.Tensor, spread: float, kind: str) -> torch.Tensor:
    """P(t > u) for u >= 0, t ~ N(0, spread^2) or Laplace(0, spread), float64."""
    if kind == "gaussian":
        return 0.5 * torch.special.erfc(u / (spread * math.sqrt(2.0)))
    return 0.5 * torch.exp(-u / spread)


def _one_sided_moments(spread: float, kind: str) -> tuple[float, float, float]:
    """For k = round(t), t in steps: (P(k >= 1), sum k P(k), sum k^2 P(k)) over k >= 1."""
    reach = 12.0 if kind == "gaussian" else 45.0  # tail beyond this many spreads: < 1e-19
    ks = torch.arange(1, int(math.ceil(reach * spread)) + 3, dtype=torch.float64)
    p = _tail_beyond(ks - 0.5, spread, kind) - _tail_beyond(ks + 0.5, spread, kind)
    return float(_tail_beyond(torch.tensor(0.5, dtype=torch.float64), spread, kind)), float((ks * p).sum()), \
        float((ks * ks * p).sum())


def effective_noise_after_rounding(sigma: float, scale: float, kind: str = "gaussian",
                                   zero_point_share: float = 0.0) -> dict:
    """What survives of noise added to integer codes and rounded (the device's path), in expectation.

    sigma: the noise std (Gaussian) or scale b (Laplace), in feature units; scale: the output
    quantization step; zero_point_share: the share of codes sitting at the dtype's minimum (ReLU
    features at the zero point -128), where clipping removes the negative half of the noise.
    A code moves by k = round(n / scale) (or max(k, 0) at the minimum). Clipping at the top of the
    range is ignored. Returns sigma_steps, nominal_std, changed_fraction (expected share of codes
    that move), effective_std (std of the applied change, feature units) and effective_ratio
    (effective / nominal; 0 when everything is erased).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not (sigma >= 0 and math.isfinite(sigma)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"need sigma >= 0 and scale > 0 (finite), got sigma={sigma}, scale={scale}")
    if not 0.0 <= zero_point_share <= 1.0:
        raise ValueError(f"zero_point_share must be in [0, 1], got {zero_point_share}")
    nominal = sigma if kind == "gaussian" else math.sqrt(2.0) * sigma
    out = {"kind": kind, "sigma": sigma, "scale": scale, "sigma_steps": sigma / scale, "nominal_std": nominal,
           "zero_point_share": zero_point_share, "changed_fraction": 0.0, "effective_std": 0.0,
           "effective_ratio": 0.0}
    spread = sigma / scale
    if spread < 1e-3:  # P(|t| >= 0.5) < 1e-54 for either kind: nothing survives
        return out
    if spread > 1e5:  # the sum would be long; rounding adds scale^2 / 12 (Sheppard) and nothing else
        p1 = 0.5
        m1 = spread / math.sqrt(2.0 * math.pi) if kind == "gaussian" else spread / 2.0  # E[t; t > 0]
        m2 = 0.5 * ((nominal / scale) ** 2 + 1.0 / 12.0)
    else:
        p1, m1, m2 = _one_sided_moments(spread, kind)
    share = zero_point_share
    changed = (1.0 - share) * 2.0 * p1 + share * p1
    mean = share * m1
    second = (1.0 - share) * 2.0 * m2 + share * m2
    std = scale * math.sqrt(max(second - mean * mean, 0.0))
    out.update(changed_fraction=changed, effective_std=std, effective_ratio=std / nominal if nominal else 0.0)
    return out
