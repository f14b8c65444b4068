"""The torch side of export/clip.py (imported only when a head gets clamps)."""
from torch import nn


class Clamped(nn.Module):
    """`inner`, its output clamped to [low, high]; in inner's training mode, as the head it sits in."""

    def __init__(self, inner: nn.Module, low: float, high: float):
        super().__init__()
        self.inner, self.low, self.high = inner, float(low), float(high)
        self.train(inner.training)

    def forward(self, x):
        return self.inner(x).clamp(self.low, self.high)
