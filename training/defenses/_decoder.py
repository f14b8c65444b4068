"""A small inversion decoder (features -> image) for defenses that train against a simulated attacker.

Used by `adversarial` (and open to `infoscissors`): the defender's own stand-in for the cloud's
inverse-network attack (research/algorithms.md 6.2). It is not the attack: training may not import
cloud_sim, and the attack's decoder is tuned separately.

    decoder = build_decoder(feature_shape=(8, 8, 8), image_shape=(1, 16, 16), width=32)
    x_hat = decoder(z)        # z: (B, 8, 8, 8) -> x_hat: (B, 1, 16, 16), in the normalized input space

The first layer standardizes each feature channel with batch statistics (BatchNorm without affine
parameters): a decoder that does not standardize can collapse to a constant image, which reads as
privacy (research/prototype_int8_privacy.md, finding 5), and a head could otherwise "beat" its
adversary by rescaling its output.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_decoder", "frozen", "fresh_decoder_mse"]


class _Resize(nn.Module):
    """Bilinear resize to a fixed (H, W); a no-op when the size already matches."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if tuple(v.shape[-2:]) == self.size:
            return v
        return F.interpolate(v, size=self.size, mode="bilinear", align_corners=False)


def build_decoder(feature_shape, image_shape, width: int = 32) -> nn.Module:
    """(C', H', W') features -> (C, H, W) images: standardize, conv, one stride-2 transposed conv per
    factor of two between H' and H, conv to C channels, then a bilinear resize to exactly (H, W)."""
    (c_feat, h_feat, _), (c_img, h_img, w_img) = tuple(feature_shape), tuple(image_shape)
    if width < 1:
        raise ValueError(f"decoder width must be >= 1, got {width}")
    layers: list[nn.Module] = [nn.BatchNorm2d(c_feat, affine=False),
                               nn.Conv2d(c_feat, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(max(0, round(math.log2(max(h_img, 1) / max(h_feat, 1))))):
        layers += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, c_img, 3, padding=1),
               _Resize((h_img, w_img))]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Build a graph through `module` without gradients for its parameters (they flow to its input)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def fresh_decoder_mse(x: torch.Tensor, z: torch.Tensor, *, steps: int = 100, width: int = 16,
                      lr: float = 3e-3, seed: int = 0) -> float:
    """Reconstruction MSE of a decoder trained from scratch on half the batch, scored on the other half.

    x: (B, C, H, W) normalized inputs; z: (B, C', H', W') released features for x; B >= 4.
    A cheap, seeded probe of how invertible z is (higher = harder to invert), for target metrics
    and tests; the real measurement is the cloud's inverse-network attack.
    """
    if x.shape[0] != z.shape[0] or x.shape[0] < 4:
        raise ValueError(f"need x and z with the same batch size >= 4, got {x.shape[0]} and {z.shape[0]}")
    x, z = x.detach().float(), z.detach().float()
    half = x.shape[0] // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = build_decoder(z.shape[1:], x.shape[1:], width)
        opt = torch.optim.Adam(decoder.parameters(), lr=lr)
        decoder.train()
        for _ in range(steps):
            loss = F.mse_loss(decoder(z[:half]), x[:half])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        decoder.eval()
        with torch.no_grad():
            return F.mse_loss(decoder(z[half:]), x[half:]).item()
