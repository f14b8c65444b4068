"""MobileNetV2 for 32x32 inputs (CIFAR strides), ReLU6 only, split after an inverted-residual stage.

Stem conv3x3 (-> 32, stride 1) + BN + ReLU6, then the seven stages of (expansion t, channels c,
repeats n, first stride s):

    stage  1      2      3      4      5      6       7
    t,c,n,s 1,16,1,1 6,24,2,1 6,32,3,2 6,64,4,2 6,96,3,1 6,160,3,2 6,320,1,1

(stage 2 and the stem use stride 1 instead of ImageNet's 2, so 32x32 ends at 4x4), then
conv1x1 -> 1280 + BN + ReLU6, global average pool, dropout, linear.

split = number of stages in the head, 0..7 (0 = stem only). Default 2: 24x32x32 features on
32x32 input. Channel counts are width-scaled and rounded to multiples of 8, as in the paper.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .smallcnn import ConvBNAct, classifier, scaled

description = "MobileNetV2, CIFAR strides, ReLU6; split = inverted-residual stages in the head (0..7)"
SPLITS = range(0, 8)
DEFAULT_SPLIT = 2
IMAGE_SIZES = range(8, 65)
IN_CHANNELS = (1, 3)
TINY_WIDTH = 0.25
OPTIONS: dict = {}

_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_DIVISOR = 8


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection; ADD when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers = []
        if expansion != 1:
            layers.append(("expand", ConvBNAct(c_in, hidden, kernel=1, act=nn.ReLU6)))
        layers += [
            ("depthwise", ConvBNAct(hidden, hidden, stride=stride, groups=hidden, act=nn.ReLU6)),
            ("project", ConvBNAct(hidden, c_out, kernel=1, act=None)),
        ]
        self.block = nn.Sequential(OrderedDict(layers))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:  # fixed at construction, so tracing sees no data-dependent branch
            return x + self.block(x)
        return self.block(x)


def _stage(c_in: int, c_out: int, repeats: int, stride: int, expansion: int) -> nn.Sequential:
    blocks = [InvertedResidual(c_in, c_out, stride, expansion)]
    blocks += [InvertedResidual(c_out, c_out, 1, expansion) for _ in range(repeats - 1)]
    return nn.Sequential(*blocks)


def build(*, in_channels: int, image_size: int, num_classes: int, split: int,
          width: float) -> tuple[nn.Module, nn.Module]:
    """(head, tail): head = stem + stage1..stage{split}; tail = the other stages + last conv + classifier."""
    del image_size  # the tail pools globally, so every size in IMAGE_SIZES works
    c_in = scaled(32, width, _DIVISOR)
    parts = [("stem", ConvBNAct(in_channels, c_in, act=nn.ReLU6))]
    for i, (t, c_full, n, s) in enumerate(_STAGES, start=1):
        c_out = scaled(c_full, width, _DIVISOR)
        parts.append((f"stage{i}", _stage(c_in, c_out, n, s, t)))
        c_in = c_out
    c_last = scaled(1280, width, _DIVISOR)
    head = nn.Sequential(OrderedDict(parts[:split + 1]))
    pool, flatten, fc = classifier(c_last, num_classes)
    tail = nn.Sequential(OrderedDict(parts[split + 1:] + [
        ("last", ConvBNAct(c_in, c_last, kernel=1, act=nn.ReLU6)),
        pool, flatten, ("dropout", nn.Dropout(0.2)), fc,
    ]))
    return head, tail
