"""ResNet-18 with the CIFAR stem (conv3x3 stride 1, no max-pool), split after a stage.

Stages: stem (conv3x3 -> 64 + BN + ReLU), layer1..layer4 of two BasicBlocks each, widths
64/128/256/512 x width, strides 1/2/2/2. split = number of residual stages in the head:

    0  stem only (the InfoScissors setting: the first conv layer)  64x32x32 on 32x32 input
    1  stem + layer1 (default)                                     64x32x32
    2  .. layer2                                                   128x16x16
    3  .. layer3                                                   256x8x8

(4 would leave only pooling and the classifier in the tail, so it is not offered.)
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .smallcnn import ConvBNAct, classifier, scaled

description = "ResNet-18, CIFAR stem; split = stages in the head (0 = stem conv only .. 3)"
SPLITS = range(0, 4)
DEFAULT_SPLIT = 1
IMAGE_SIZES = range(8, 65)
IN_CHANNELS = (1, 3)
TINY_WIDTH = 0.125
OPTIONS: dict = {}

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels at full width, first stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, a residual ADD, then ReLU; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = ConvBNAct(c_in, c_out, stride=stride)
        self.conv2 = ConvBNAct(c_out, c_out, act=None)
        if stride != 1 or c_in != c_out:
            self.shortcut = ConvBNAct(c_in, c_out, kernel=1, stride=stride, act=None)
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def _stage(c_in: int, c_out: int, stride: int, blocks: int = 2) -> nn.Sequential:
    layers = [BasicBlock(c_in, c_out, stride)]
    layers += [BasicBlock(c_out, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build(*, in_channels: int, image_size: int, num_classes: int, split: int,
          width: float) -> tuple[nn.Module, nn.Module]:
    """(head, tail): head = stem + layer1..layer{split}; tail = the other stages + pool + fc."""
    del image_size  # the tail pools globally, so every size in IMAGE_SIZES works
    c_in = scaled(64, width)
    parts = [("stem", ConvBNAct(in_channels, c_in))]
    for i, (c_full, stride) in enumerate(_STAGES, start=1):
        c_out = scaled(c_full, width)
        parts.append((f"layer{i}", _stage(c_in, c_out, stride)))
        c_in = c_out
    head = nn.Sequential(OrderedDict(parts[:split + 1]))
    tail = nn.Sequential(OrderedDict(parts[split + 1:] + classifier(c_in, num_classes)))
    return head, tail
