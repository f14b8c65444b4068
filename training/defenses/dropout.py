"""Dropout on the released features, at training and at inference (research/algorithms.md 5.2).

    r = z * m,   m_i ~ Bernoulli(1 - p) elementwise, independently per image and per inference

strength = p, the drop probability, in [0, 1). He, Zhang & Lee (IEEE IoT-J 2020) drop intermediate
features at inference so that each release hides a random subset of them; the deeper the split,
the smaller the p that suffices (MNIST: 0.9 after ReLU1, 0.2 after pool2).

No 1/(1 - p) rescaling, as in the CEM reference code: a dropped feature becomes exactly 0.0, which
is the int8 zero point, so the device's zeroing (`inference_noise` {"kind": "dropout", "p": p})
and the float path agree, and rounding cannot erase it. The same mask rule is applied in training
(`transform`) and in float evaluation (`eval_transform`), so the tail is trained on the very
distribution it receives at inference; a rescale would only change that distribution's scale,
and the device runtime does not rescale.
"""
from __future__ import annotations

import torch

from ._dcor import distance_correlation
from .base import Defense

__all__ = ["DropoutDefense"]


class DropoutDefense(Defense):
    name = "dropout"
    description = "random zeroing of released features at training and inference (strength = p, no rescale)"
    paper = "He, Zhang & Lee, IEEE IoT-J 2020"
    TARGET_DIRECTION = "down"  # dCor(x, released features)
    example_strength = 0.5

    def __init__(self, strength: float = 0.0, **options):
        super().__init__(strength, **options)
        if not 0.0 <= self.strength < 1.0:
            raise ValueError(f"defense.strength (the drop probability p) must be in [0, 1), got {strength}")

    def _release(self, z: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return z
        keep = torch.rand_like(z) >= self.strength
        return z * keep

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return self._release(z)

    def eval_transform(self, z: torch.Tensor) -> torch.Tensor:
        return self._release(z)

    def inference_noise(self) -> dict | None:
        return None if self.strength == 0 else {"kind": "dropout", "p": self.strength}

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Distance correlation between the inputs and the released (partly zeroed) features."""
        with torch.no_grad():
            return distance_correlation(x, r).item()
