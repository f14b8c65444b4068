"""A small split CNN for 8x8..32x32 grayscale or RGB images (digits, MNIST, Fashion-MNIST).

Four Conv3x3-BN-ReLU blocks at full width: 16, 32 (stride 2), 64 (stride 2), 64.
split = number of blocks in the head (1..3, default 2: 32x14x14 features on 28x28 input,
the setting of research/prototype_int8_privacy.md). The tail runs the remaining blocks,
global average pooling and a linear classifier.

Also home of the building blocks the other arch modules share (ConvBNAct, scaled).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

description = "small CNN for 8x8..32x32 grayscale or RGB; split = conv blocks in the head (1..3)"
SPLITS = range(1, 4)
DEFAULT_SPLIT = 2
IMAGE_SIZES = range(8, 33)
IN_CHANNELS = (1, 3)
TINY_WIDTH = 0.25
OPTIONS: dict = {}

# (output channels at full width, stride) of each conv block
_BLOCKS = ((16, 1), (32, 2), (64, 2), (64, 1))


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """channels * width rounded to a multiple of divisor, at least divisor (and at least 1)."""
    rounded = int(channels * width / divisor + 0.5) * divisor
    return max(divisor, 1, rounded)


class ConvBNAct(nn.Sequential):
    """conv (bias-free, zero padding) + BatchNorm + activation; lowers to one fused CONV_2D."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(c_out),
            act=act() if act is not None else nn.Identity(),
        ))


def classifier(c_in: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    """Global average pool, flatten, linear: (B, c_in, H, W) -> (B, num_classes)."""
    return [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
            ("fc", nn.Linear(c_in, num_classes))]


def build(*, in_channels: int, image_size: int, num_classes: int, split: int,
          width: float) -> tuple[nn.Module, nn.Module]:
    """(head, tail) with `split` conv blocks in the head; image_size only bounds the input."""
    del image_size  # every size in IMAGE_SIZES works with the same layers
    blocks, c_in = [], in_channels
    for i, (c_full, stride) in enumerate(_BLOCKS, start=1):
        c_out = scaled(c_full, width)
        blocks.append((f"block{i}", ConvBNAct(c_in, c_out, stride=stride)))
        c_in = c_out
    head = nn.Sequential(OrderedDict(blocks[:split]))
    tail = nn.Sequential(OrderedDict(blocks[split:] + classifier(c_in, num_classes)))
    return head, tail
