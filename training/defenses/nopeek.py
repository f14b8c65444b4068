"""NoPeek: penalize the distance correlation between inputs and features (research/algorithms.md 5.6).

    loss = CE + alpha * dCor(x, z)        per batch, x and z flattened per sample

strength = alpha. Vepakomma et al. (ICDM Workshops 2020) minimize dCor between the raw data and the
split-layer activations, so that what leaves the device depends as little as possible on the input
while the task loss keeps what the label needs. dCor is the (non-squared) distance correlation of
`_dcor.distance_correlation`, with the 1e-7 inside the square roots of the CEM reference code.
The CEM code additionally multiplies alpha by 0.1 (and by 10 again on CIFAR-10); here alpha is the
weight itself, so CEM's alpha = a corresponds to strength = 0.1 a.

Nothing is added at inference: the defense lives entirely in the trained head. Cost O(B^2) per
batch; keep batches <= 128.
"""
from __future__ import annotations

import torch

from ._dcor import distance_correlation
from .base import Defense

__all__ = ["NoPeekDefense"]


class NoPeekDefense(Defense):
    name = "nopeek"
    description = "distance correlation between input and features as a loss (strength = alpha)"
    paper = "Vepakomma, Singh, Gupta & Raskar, ICDM Workshops 2020"
    TARGET_DIRECTION = "down"  # dCor(x, released features)
    example_strength = 1.0

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        """x: (B, C, H, W) inputs; z: (B, C', H', W') the head's output (a batch of 1 adds 0)."""
        if self.strength == 0:
            return {}
        if x.shape[0] < 2:
            return {"dcor": z.new_zeros(())}
        return {"dcor": self.strength * distance_correlation(x, z)}

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        with torch.no_grad():
            return distance_correlation(x, r).item()
