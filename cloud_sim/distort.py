"""What a reconstruction gets wrong that a person reads through: the evaluator trains on it.

An inversion attack that recovers a digit's strokes may draw them on a bright, textured
background, inside a dark box, with a halo, a dotted pattern from a strided decoder, or in
negative; one that recovers a photo's shapes may get every colour wrong. A person still reads
such a picture, so the auditor's evaluator must too, or identification calls it private (measured:
a person read 63 of 64 siftfunnel rmle reconstructions of MNIST digits, a clean-trained evaluator
0.108 of 1,000). These distortions keep what a reader uses (shapes, strokes, layout) and change
what they ignore.

    distort(x, gen, p) -> x'   x: (B, C, H, W) float in [0, 1], C 1 (redrawn) or 3 (recoloured)

A grey image is taken as stroke alpha over its border's level and redrawn: another background
(a level, a smooth field, fine texture, sharp-edged boxes), strokes of another contrast or in
negative, a dark or bright rim, local polarity flips. A colour image keeps its pixels and gets false
colours (gains and offsets per channel, shuffled channels, grey), another contrast and a colour
cast. Both get periodic dots, blur and pixel noise. Draws come from `gen` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import luma

__all__ = ["distort", "gaussian_blur"]


def distort(x: torch.Tensor, gen: torch.Generator, p: float = 0.7) -> torch.Tensor:
    """Each image of the batch, with probability p, redrawn (grey) or recoloured (colour)."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"distort takes 1 or 3 channels, got {x.shape[1]}")
    out = _redraw_grey(x, gen) if x.shape[1] == 1 else _recolour(x, gen)
    out = _artefacts(out, gen).clamp(0, 1)
    return torch.where(_coin(len(x), p, gen), out, x)


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders; sigma a float or a (B,) tensor (per image)."""
    b, c, h, w = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
    half = max(1, int(3 * float(sigma.max()) + 0.5))
    r = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, b * c, h, w), (half,) * 4, mode="replicate")
    y = F.conv2d(y, g.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, g.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _coin(b: int, q: float, gen) -> torch.Tensor:
    return (torch.rand(b, generator=gen) < q).view(-1, 1, 1, 1)


def _uniform(lo: float, hi: float, shape, gen) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def _smooth_field(b: int, c: int, h: int, w: int, gen, cells: tuple[int, int]) -> torch.Tensor:
    """(b, c, h, w) in [0, 1]: uniform noise on a coarse grid of `cells` (drawn from the range), upsampled."""
    n = int(torch.randint(cells[0], cells[1] + 1, (1,), generator=gen))
    return F.interpolate(torch.rand(b, c, n, n, generator=gen), size=(h, w), mode="bilinear", align_corners=False)


def _boxes(b: int, h: int, w: int, gen) -> torch.Tensor:
    """(b, 1, h, w) 0/1: one axis-aligned box per image, 20-70% of each side."""
    centre = torch.rand(2, b, 1, 1, 1, generator=gen)
    size = _uniform(0.2, 0.7, (2, b, 1, 1, 1), gen)
    yy, xx = torch.linspace(0, 1, h).view(1, 1, h, 1), torch.linspace(0, 1, w).view(1, 1, 1, w)
    return (((yy - centre[0]).abs() < size[0] / 2) & ((xx - centre[1]).abs() < size[1] / 2)).float()


def _redraw_grey(x: torch.Tensor, gen) -> torch.Tensor:
    b, _, h, w = x.shape
    u = lambda lo, hi: _uniform(lo, hi, (b, 1, 1, 1), gen)  # noqa: E731
    # the strokes: how far each pixel is from the border's level, stretched to 0..1
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1).mean(-1, keepdim=True)
    alpha = (x - border[..., None]).abs()
    alpha = alpha / alpha.amax((2, 3), keepdim=True).clamp_min(1e-3)
    # another background: a level, a smooth field, fine texture, sharp-edged boxes of another level
    bg = (u(0, 0.9) + u(0, 0.5) * (_smooth_field(b, 1, h, w, gen, (2, 7)) - 0.5)
          + u(0, 0.3) * (_smooth_field(b, 1, h, w, gen, (10, 14)) - 0.5))
    for _ in range(2):
        box = _boxes(b, h, w, gen)
        bg = torch.where(_coin(b, 0.35, gen), bg * (1 - box) + box * u(0, 1), bg)
    # strokes that stand out from it by 0.4-0.9, bright on dark, dark on bright, either in between
    level = bg.mean((1, 2, 3), keepdim=True)
    dark = (_coin(b, 0.25, gen) | (level > 0.75)) & (level >= 0.25)
    y = alpha * (level + torch.where(dark, -1.0, 1.0) * u(0.4, 0.9)) + (1 - alpha) * bg
    # a rim around the strokes, mostly dark
    rim = (gaussian_blur(alpha, u(1.0, 2.0).view(-1)) - alpha).clamp_min(0) * u(0, 3)
    y = torch.where(_coin(b, 0.5, gen), y - rim * torch.where(_coin(b, 0.8, gen), 1.0, -1.0), y)
    # local polarity: a smooth mask mixes the picture with its negative
    mask = gaussian_blur((_smooth_field(b, 1, h, w, gen, (2, 7)) > u(0.3, 0.9)).float(), u(0.5, 2.0).view(-1))
    return torch.where(_coin(b, 0.2, gen), mask * (1 - y) + (1 - mask) * y, y)


def _recolour(x: torch.Tensor, gen) -> torch.Tensor:
    b, _, h, w = x.shape
    u = lambda lo, hi, c=1: _uniform(lo, hi, (b, c, 1, 1), gen)  # noqa: E731
    y = torch.where(_coin(b, 0.2, gen), luma(x).expand_as(x), x)
    y = y * u(0.5, 1.5, 3) + u(-0.25, 0.25, 3)
    y = torch.where(_coin(b, 0.25, gen), y[:, torch.randperm(3, generator=gen)], y)
    mean = y.mean((1, 2, 3), keepdim=True)
    y = (y - mean) * u(0.4, 1.3) + mean + u(-0.15, 0.15)
    return y + u(0, 0.4) * (_smooth_field(b, 3, h, w, gen, (2, 6)) - 0.5)


def _artefacts(y: torch.Tensor, gen) -> torch.Tensor:
    """Periodic dots (a strided decoder's checkerboard), blur and pixel noise; milder on photos."""
    b, c, h, w = y.shape
    dots_p, dots_amp, noise = (0.4, 0.5, 0.15) if c == 1 else (0.3, 0.3, 0.1)
    stride = int(torch.randint(2, 5, (1,), generator=gen))
    offset = int(torch.randint(0, stride, (1,), generator=gen))
    dots = torch.zeros(1, 1, h, w)
    dots[..., offset::stride, ::stride] = 1
    y = torch.where(_coin(b, dots_p, gen), y + dots * _uniform(-dots_amp, dots_amp, (b, c, 1, 1), gen), y)
    y = torch.where(_coin(b, 0.4, gen), gaussian_blur(y, _uniform(0.3, 1.2, (b,), gen)), y)
    return y + torch.randn(y.shape, generator=gen) * _uniform(0, noise, (b, 1, 1, 1), gen)
