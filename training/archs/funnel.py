"""SiftFunnel's funnel-shaped edge head with lightweight attention, and its cloud-side upsampler.

After the 4-block CNN funnel of SiftFunnel (Yuan et al. 2025, `pv4_classifier_4` in the
official code; research/algorithms.md section 3.3), made full-int8-TFLite friendly.

Head (device), full width, `image_size` <= 32 (one pool: 32x32 -> 12x16x16, 28x28 -> 12x14x14):

    stem    conv3x3 (-> 64) + BN + ReLU, max-pool 2
    att1    SE channel gate (r = 32), then a spatial gate
    funnel  conv1x1 (-> 16) + BN + ReLU, [max-pool 2 when image_size > 32], conv1x1 (-> 12),
            conv3x3, x * sigmoid(x), conv1x1, conv3x3, conv5x5 (12 channels), ReLU; every conv
            with BN
    att2    SE channel gate (r = 4), then CBAM: channel gate on average- and max-pooled
            vectors (r = 6) and a spatial gate

At 64x64 (the paper's size) the funnel's pool is kept, giving the paper's 12x16x16; at 32x32
and below it is dropped, as research/algorithms.md section 9.2 proposes, so the features keep
half the input's side. Option `funnel_channels` (default 12) sets the sent channel count.

Tail (cloud): the upsampling module "Up" (conv3x3 -> 128, conv3x3 + BN + ReLU: channels are
restored, the side is unchanged), a channel and a spatial gate, conv3x3 -> 256 and -> 512 each
with BN, ReLU and max-pool 2 (a pool that would shrink a side below 1 is left out), flatten,
FC -> 5K, ReLU, dropout 0.5, FC -> K.

Departures from the reference code, all for int8 TFLite (training/archs/preflight.py):
* SiLU is written x * sigmoid(x) (LOGISTIC + MUL); nn.SiLU is not on the allow-list.
* Triplet attention and CBAM's spatial gate pool over channels (channel max and mean: ZPool),
  which the allow-list does not lower; the spatial gate here is conv kxk (C -> 1) + BN +
  sigmoid, a learned channel pooling in place of ZPool. The tail uses the same gates
  (it runs in PyTorch, but one gate family keeps the two halves alike).
* Channel gates are 1x1 convolutions on the pooled (B, C, 1, 1) tensor (CONV_2D), the
  max-pooled branch is AdaptiveMaxPool2d(1).
* BN after every funnel conv (the reference has it after the first only). BN folds into
  CONV_2D, so the int8 head is unchanged in kind; without it the thin, gated funnel did not
  train at tiny width (digits 28x28: chance after 4 epochs; with it 0.87 after 3).
* A ReLU sits between the two classifier FCs (the reference composes two linear maps).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .smallcnn import ConvBNAct, scaled

description = "SiftFunnel's funnel head (12 channels, SE/CBAM-like gates) and cloud upsampler; one split (1)"
SPLITS = range(1, 2)  # one cut: after the funnel and its attention
DEFAULT_SPLIT = 1
IMAGE_SIZES = range(8, 65)
IN_CHANNELS = (1, 3)
TINY_WIDTH = 0.25
OPTIONS: dict = {"funnel_channels": 12}

# int8 quantizes each tensor with one scale, and a gate MLP's hidden tensor that is all zero
# over the calibration set gets a degenerate scale (~1e-9) that XNNPACK refuses to prepare
# (ai-edge-litert 2.3 sometimes aborts instead). So gate MLPs keep at least _MIN_HIDDEN hidden
# units (the paper's r = 32 on 64 channels gives 2) and their hidden biases start at
# _HIDDEN_BIAS, so an untrained or briefly trained head never calibrates to a dead hidden layer.
_MIN_HIDDEN = 4
_HIDDEN_BIAS = 0.1


class SigmoidLinear(nn.Module):
    """x * sigmoid(x) (SiLU), as LOGISTIC + MUL so it lowers to int8 builtins."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ChannelGate(nn.Module):
    """SE (average pooling) or CBAM's channel gate (average and max pooling, shared MLP)."""

    def __init__(self, channels: int, reduction: int, use_max: bool = False):
        super().__init__()
        hidden = max(_MIN_HIDDEN, channels // reduction)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1) if use_max else None
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        nn.init.constant_(self.mlp[0].bias, _HIDDEN_BIAS)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.mlp(self.avg(x))
        if self.max is not None:
            score = score + self.mlp(self.max(x))
        return x * self.gate(score)


class SpatialGate(nn.Module):
    """conv kxk (C -> 1) + BN + sigmoid, multiplied into every channel."""

    def __init__(self, channels: int, kernel: int = 7):
        super().__init__()
        self.score = ConvBNAct(channels, 1, kernel=kernel, act=None)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.score(x))


def _pool_or_identity(fits: bool) -> nn.Module:
    return nn.MaxPool2d(2) if fits else nn.Identity()


def _head(in_channels: int, image_size: int, width: float, funnel_channels: int) -> nn.Sequential:
    c_stem, c_mid, c_out = scaled(64, width), scaled(16, width), scaled(funnel_channels, width)
    funnel = nn.Sequential(OrderedDict(
        squeeze=ConvBNAct(c_stem, c_mid, kernel=1),
        pool=_pool_or_identity(image_size > 32),
        narrow=ConvBNAct(c_mid, c_out, kernel=1, act=None),
        conv3a=ConvBNAct(c_out, c_out, act=None),
        silu=SigmoidLinear(),
        mix=ConvBNAct(c_out, c_out, kernel=1, act=None),
        conv3b=ConvBNAct(c_out, c_out, act=None),
        conv5=ConvBNAct(c_out, c_out, kernel=5, act=None),
        act=nn.ReLU(),
    ))
    return nn.Sequential(OrderedDict(
        stem=ConvBNAct(in_channels, c_stem),
        pool=nn.MaxPool2d(2),
        se1=ChannelGate(c_stem, 32),
        spatial1=SpatialGate(c_stem),
        funnel=funnel,
        se2=ChannelGate(c_out, 4),
        cbam_channel=ChannelGate(c_out, 6, use_max=True),
        cbam_spatial=SpatialGate(c_out),
    ))


def _tail(c_in: int, side: int, width: float, num_classes: int) -> nn.Sequential:
    c_up, c3, c4 = scaled(128, width), scaled(256, width), scaled(512, width)
    parts = [("up", nn.Sequential(nn.Conv2d(c_in, c_up, 3, padding=1), ConvBNAct(c_up, c_up))),
             ("channel", ChannelGate(c_up, 16)), ("spatial", SpatialGate(c_up))]
    c_prev = c_up
    for name, c in (("conv3", c3), ("conv4", c4)):
        parts.append((name, nn.Sequential(ConvBNAct(c_prev, c), _pool_or_identity(side >= 2))))
        side, c_prev = (side // 2 if side >= 2 else side), c
    hidden = 5 * num_classes
    parts += [("flatten", nn.Flatten()), ("fc1", nn.Linear(c_prev * side * side, hidden)),
              ("act", nn.ReLU()), ("dropout", nn.Dropout(0.5)), ("fc2", nn.Linear(hidden, num_classes))]
    return nn.Sequential(OrderedDict(parts))


def build(*, in_channels: int, image_size: int, num_classes: int, split: int, width: float,
          funnel_channels: int = 12) -> tuple[nn.Module, nn.Module]:
    """(head, tail); the head sends scaled(funnel_channels) channels at image_size // 2 (// 4 above 32)."""
    del split  # one cut only
    if isinstance(funnel_channels, bool) or not isinstance(funnel_channels, int) or funnel_channels < 1:
        raise ValueError(f"model.funnel_channels must be an integer >= 1, got {funnel_channels!r}")
    head = _head(in_channels, image_size, width, funnel_channels)
    side = image_size // 2 // (2 if image_size > 32 else 1)
    tail = _tail(scaled(funnel_channels, width), side, width, num_classes)
    return head, tail
