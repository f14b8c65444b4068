"""SiftFunnel (Yuan et al. 2025, arXiv 2501.00824): the training loss of the official trainer.

research/algorithms.md section 3.2, for transmitted features z (B, C, h, w), normalized
inputs x, softmax output p and K classes:

    L = alpha KL(t || p)                 label smoothing: t = 1 - s on the true class, s / (K - 1) elsewhere
      + beta  dCor(x, z)                 "non-linear" constraint: distance correlation over the batch
      + gamma R(z)                       "linear" constraint: inter-channel Pearson redundancy
      + l1    mean |z|                   sparsity (the reference code calls it "entropy")

strength = beta, the dCor weight: the term that bounds what z says about x. The other
coefficients are options with the reference code's defaults: alpha = 5, gamma = 2, smoothing
s = 0.25, l1 = 0.03 (the checkpoints' names suggest the paper-era runs used s = 0.35,
alpha = 4.5, beta = 0.4, gamma = 0.1: set them with --set defense.options...). The trainer
always adds CE(logits, y), so the logged `smoothing` term is alpha KL(t || p) - CE; task +
smoothing is the paper's alpha KL(t || p).

R(z): per sample, each channel's h*w map is a vector; the C x C Pearson correlation matrix
of those vectors, squared, averaged over the off-diagonal pairs and the batch. Its other parts,
the funnel head with lightweight attention and the cloud-side upsampler, are the arch `funnel`
(training/archs/funnel.py); the loss works on any arch.

Fixed, not copied, from the reference code (research/algorithms.md sections 3.2, 3.5, 7, 11):
* R averaged all C x C entries. The diagonal is 1 for a live channel but 0 for a dead (all
  zero) one, which the L1 term produces, so killing channels lowered the "redundancy". Here
  only off-diagonal pairs count, and a constant channel has correlation 0 with every other
  (a variance floor of 1e-8 keeps its gradient finite instead of 0/0).
* Its MSE divided the summed squared error by N*H*W rather than N*C*H*W (3x too large on RGB);
  its SSIM ran skimage on a 4-D (N, C, H, W) array, so the 7x7x7 window straddled neighbouring
  images; its MINE statistic network ends in a sigmoid, which caps the Donsker-Varadhan
  estimate at 1 nat. None of that is used here: the cloud's metrics are per-element MSE and
  per-image SSIM (cloud_sim.metrics), and target_metric is dCor, computed exactly.
* The "entropy" term is an L1 penalty and is logged as `l1`.
Kept as in the code: dCor on the normalized input; batch-mean KL. Nothing is added at inference.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ._dcor import distance_correlation
from .base import Defense, check_option

__all__ = ["SiftFunnelDefense", "pearson_redundancy", "smoothed_targets"]

_VAR_FLOOR = 1e-8


def pearson_redundancy(z: torch.Tensor) -> torch.Tensor:
    """z: (B, C, h, w) -> scalar: mean over the batch and channel pairs i != j of corr(z_i, z_j)^2,
    the correlation taken over the h*w positions of one sample; 0 when C < 2."""
    b, c = z.shape[:2]
    if c < 2:
        return z.sum() * 0.0
    v = z.reshape(b, c, -1)
    v = v - v.mean(-1, keepdim=True)
    v = v / (v.pow(2).sum(-1, keepdim=True) + _VAR_FLOOR).sqrt()
    corr = v @ v.transpose(1, 2)  # (B, C, C)
    off = ~torch.eye(c, dtype=torch.bool, device=z.device)
    return corr[:, off].pow(2).mean()


def smoothed_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, K): 1 - s on the label, s / (K - 1) on every other class."""
    t = torch.full((y.shape[0], num_classes), smoothing / (num_classes - 1), device=y.device)
    return t.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)


class SiftFunnelDefense(Defense):
    name = "siftfunnel"
    description = ("label smoothing + dCor(x, z) + inter-channel Pearson redundancy + L1 on the features "
                   "(strength = beta, the dCor weight); pair with arch funnel")
    paper = "Yuan et al., SiftFunnel, arXiv 2501.00824 (2025)"
    TARGET_DIRECTION = "down"  # dCor(x, released features)
    example_strength = 2.0

    def __init__(self, strength: float = 0.0, *, alpha: float = 5.0, gamma: float = 2.0,
                 smoothing: float = 0.25, l1: float = 0.03, **options):
        super().__init__(strength, **options)
        self.beta = check_option("defense.strength (beta)", self.strength)
        self.alpha = check_option("defense.options.alpha", alpha)
        self.gamma = check_option("defense.options.gamma", gamma)
        self.smoothing = check_option("defense.options.smoothing", smoothing, high=1.0)
        self.l1 = check_option("defense.options.l1", l1)

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        t = smoothed_targets(y, logits.shape[1], self.smoothing)
        kl = F.kl_div(F.log_softmax(logits, dim=1), t, reduction="batchmean")
        terms = {"smoothing": self.alpha * kl - F.cross_entropy(logits, y)}
        if self.beta:
            terms["dcor"] = self.beta * distance_correlation(x, z)
        if self.gamma:
            terms["redundancy"] = self.gamma * pearson_redundancy(z)
        if self.l1:
            terms["l1"] = self.l1 * z.abs().mean()
        return terms

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Distance correlation between the inputs and the released features."""
        with torch.no_grad():
            return distance_correlation(x, r).item()
