"""VGG11-BN split with a narrow sigmoid bottleneck: the CEM setting (Xia et al., CVPR 2025).

VGG11 config, each entry a conv3x3 + BN + ReLU (a number) or a 2x2 max-pool ("M"):

    index  1   2  3    4  5    6    7  8    9    10 11   12   13
    entry  64  M  128  M  256  256  M  512  512  M  512  512  M

split = the cut: the number of config entries in the head, 1..12 (default 4, as in CEM:
conv64, pool, conv128, pool -> 128x8x8 on 32x32 input). The head then ends in the bottleneck,
conv3x3 (-> `bottleneck` channels, option, default 8) + BN + sigmoid, so 32x32 input gives
8x8x8 features. The tail starts with conv3x3 back up to the cut's channel count + BN + ReLU,
runs the rest of the config, global average pooling (1x1 already at 32x32, as in CEM) and the
CEM classifier (dropout, FC 512, ReLU, dropout, FC 512, ReLU, FC). A max-pool that would shrink a side below 1 pixel is left out (inputs under 32x32).
bottleneck=0 gives the plain VGG11-BN split (no bottleneck, no sigmoid, no tail up-conv).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .smallcnn import ConvBNAct, scaled

description = "VGG11-BN with a sigmoid bottleneck (CEM setting); split = VGG cfg entries in the head (1..12)"
SPLITS = range(1, 13)
DEFAULT_SPLIT = 4
IMAGE_SIZES = range(8, 65)
IN_CHANNELS = (1, 3)
TINY_WIDTH = 0.125
OPTIONS: dict = {"bottleneck": 8}

_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _features(in_channels: int, image_size: int, width: float) -> list[tuple[str, nn.Module, int]]:
    """(name, layer, channels after it) for every config entry; a skipped pool is an Identity."""
    layers, c_in, side, n_conv, n_pool = [], in_channels, image_size, 0, 0
    for entry in _CFG:
        if entry == "M":
            n_pool += 1
            fits = side >= 2
            layers.append((f"pool{n_pool}", nn.MaxPool2d(2) if fits else nn.Identity(), c_in))
            side = side // 2 if fits else side
        else:
            n_conv += 1
            c_out = scaled(entry, width)
            layers.append((f"conv{n_conv}", ConvBNAct(c_in, c_out), c_out))
            c_in = c_out
    return layers


def _classifier(c_in: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(), nn.Linear(c_in, hidden), nn.ReLU(),
        nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def build(*, in_channels: int, image_size: int, num_classes: int, split: int, width: float,
          bottleneck: int = 8) -> tuple[nn.Module, nn.Module]:
    """(head, tail) cut after `split` config entries, with a `bottleneck`-channel sigmoid head output."""
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 0:
        raise ValueError(f"model.bottleneck must be an integer >= 0 (0 = none), got {bottleneck!r}")
    layers = _features(in_channels, image_size, width)
    c_cut = layers[split - 1][2]
    head_parts = [(name, layer) for name, layer, _ in layers[:split]]
    tail_parts = [(name, layer) for name, layer, _ in layers[split:]]
    if bottleneck:
        head_parts.append(("bottleneck", ConvBNAct(c_cut, bottleneck, act=nn.Sigmoid)))
        tail_parts.insert(0, ("upconv", ConvBNAct(bottleneck, c_cut)))
    c_last = layers[-1][2]
    tail_parts += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                   ("classifier", _classifier(c_last, scaled(512, width), num_classes))]
    return nn.Sequential(OrderedDict(head_parts)), nn.Sequential(OrderedDict(tail_parts))
