"""MID: a variational information bottleneck at the cut (research/algorithms.md 5.5).

    training:   r = mu + sigma * eps,  eps ~ N(0, I),   mu = z = head(x),  sigma = softplus(g(z) - shift)
    loss:       CE(tail(r), y) + lambda * mean over elements of KL( N(mu, sigma^2) || N(0, 1) )
    inference:  r = mu = head(x)       (deterministic: the bottleneck mean)

strength = lambda (research/algorithms.md 9.2 sweeps 1e-4 .. 1e-2). Zou, Liu & Zhang ("Mutual
Information Regularization for Vertical Federated Learning", 2023) insert a stochastic bottleneck
(an encoder to (mu, sigma), one reparameterized sample, a KL to N(0, I)) where the data crosses
between parties; their VFLAIR code (`MID_model`) holds it on the receiving side, with
sigma = softplus(raw - 0.5) and the KL averaged over the bottleneck's elements, both kept here
(option `std_shift`, default 0.5; SiftFunnel's MID baseline uses 5).

Where the bottleneck lives (our decision): on the device. Here the receiver is the attacker, so a
bottleneck in the cloud would leave the released tensor unconstrained and defend nothing at
inference. The head's own output is the bottleneck mean: the head's last layer *is* the mean
encoder, so the deployed int8 head is exactly the defended one, with no extra module to export.
The sigma network (one 1x1 conv on z, in `self.modules`, trained jointly with head and tail) is
needed only in training. The bottleneck therefore has the shape of z; choose its size through the
architecture's width and split.

At inference the device releases the mean, as VIB does: no noise, no formal bound on I(x; r). What
protects is what training did: the KL pushes every unit the task does not need to 0 (ReLU units
die) and keeps the rest small against the noise the tail learned to tolerate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Defense

__all__ = ["MIDDefense", "gaussian_kl"]


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mu, sigma^2) || N(0, 1) ) = 0.5 (mu^2 + sigma^2 - 1) - log sigma."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - torch.log(sigma)


class MIDDefense(Defense):
    name = "mid"
    description = "variational information bottleneck on the released features (strength = KL weight lambda)"
    paper = "Zou, Liu & Zhang, arXiv 2301.01142, 2023"
    TARGET_DIRECTION = "down"  # the bottleneck rate: mean KL per element
    example_strength = 1.0

    def __init__(self, strength: float = 0.0, *, std_shift: float = 0.5, **options):
        super().__init__(strength, **options)
        if isinstance(std_shift, bool) or not isinstance(std_shift, (int, float)):
            raise ValueError(f"defense.options.std_shift must be a number, got {std_shift!r}")
        self.std_shift = float(std_shift)

    def setup(self, head, tail, input_shape, feature_shape, num_classes) -> None:
        channels = int(feature_shape[0])
        conv = len(feature_shape) == 3  # (C, H, W) maps; (C,) vectors get a linear layer
        self.modules["sigma"] = nn.Conv2d(channels, channels, 1) if conv else nn.Linear(channels, channels)

    def parameters(self):
        return list(self.modules.parameters())

    def _sigma(self, z: torch.Tensor) -> torch.Tensor:
        if "sigma" not in self.modules:
            raise RuntimeError("defense mid: call setup() before training")
        return F.softplus(self.modules["sigma"](z) - self.std_shift).clamp_min(1e-6)

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """Training: one reparameterized sample mu + sigma * eps (z is mu)."""
        return z + self._sigma(z) * torch.randn_like(z)

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        if self.strength == 0:
            return {}
        return {"kl": self.strength * gaussian_kl(z, self._sigma(z)).mean()}

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Mean KL per element of the training channel N(r, sigma(r)^2) against N(0, 1)."""
        with torch.no_grad():
            return gaussian_kl(r, self._sigma(r)).mean().item()
