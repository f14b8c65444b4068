"""Split architectures: registered by name in ARCHS (an explicit dict you can grep).

`create(name, ...)` builds a `SplitModel`: a head that runs on the device and a tail that
completes inference in the cloud.

    x:      (B, C, H, W) float32, already normalized
    head:   x -> z, (B, C', H', W') float32, the tensor that is quantized and sent
    tail:   z -> logits, (B, num_classes)

Every head lowers to full-int8 TFLite builtin operators; `preflight(head, input_shape)`
lists every layer that would not, before a long training run starts.

An arch module (the part before ':' in its target) defines, besides its builder:

    description    one line for `edgeveil list archs`
    SPLITS         range of valid split values        DEFAULT_SPLIT  int
    IMAGE_SIZES    range of valid input sizes (H = W) IN_CHANNELS    tuple of valid channel counts
    TINY_WIDTH     the channel multiplier "tiny" means
    OPTIONS        dict of extra keyword options and their defaults

and `builder(*, in_channels, image_size, num_classes, split, width: float, **options)`
returns `(head, tail)`. This module imports no torch at load time.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from edgeveil.device.registry import Registry

from .preflight import PreflightError, check, preflight

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ARCHS", "SplitModel", "PreflightError",
    "register", "names", "create", "default_split", "valid_splits", "preflight", "check",
]

ARCHS = Registry("arch", "model.arch", "builder", {
    "smallcnn": "edgeveil.training.archs.smallcnn:build",
    "resnet18": "edgeveil.training.archs.resnet:build",
    "mobilenetv2": "edgeveil.training.archs.mobilenet:build",
    "vgg11_bn": "edgeveil.training.archs.vgg:build",
    "funnel": "edgeveil.training.archs.funnel:build",
})

_WIDTHS = {"full": 1.0}
_MAX_WIDTH = 8.0


class SplitModel(NamedTuple):
    """A split network. feature_shape is (C, H, W) of the head's output for the built image size."""
    head: "nn.Module"
    tail: "nn.Module"
    split: int
    feature_shape: tuple[int, int, int]


def register(name: str, target: str) -> None:
    """Add an architecture. target is "package.module:builder"; a duplicate name is refused."""
    ARCHS.register(name, target)


def names() -> list[tuple[str, str]]:
    """(name, description) of every registered arch, for `edgeveil list archs`."""
    return [(name, ARCHS.describe(name)) for name in ARCHS]


def default_split(name: str) -> int:
    return _arch_module(name).DEFAULT_SPLIT


def valid_splits(name: str) -> range:
    return _arch_module(name).SPLITS


def create(name: str, *, in_channels: int, image_size: int, num_classes: int,
           split: int | None = None, width: str | float = "full", **options: Any) -> SplitModel:
    """Build the head and tail of arch `name`; every argument is validated before any layer is built.

    width: "full" (1.0), "tiny" (the arch's small multiplier, for fast tests) or a positive multiplier.
    options: arch-specific keyword options (see the arch module's OPTIONS).
    """
    module = _arch_module(name)
    split = _check_split(name, module, split)
    multiplier = _check_width(width, module.TINY_WIDTH)
    _check_input(name, module, in_channels, image_size, num_classes)
    unknown = sorted(set(options) - set(module.OPTIONS))
    if unknown:
        known = ", ".join(sorted(module.OPTIONS)) or "none"
        raise ValueError(f"model options {unknown} are not known for {name} (known: {known})")
    builder = ARCHS.load(name)
    head, tail = builder(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                         split=split, width=multiplier, **{**module.OPTIONS, **options})
    shape = _feature_shape(head, in_channels, image_size)
    return SplitModel(head=head, tail=tail, split=split, feature_shape=shape)


def _arch_module(name: str) -> ModuleType:
    return ARCHS.module(name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _span(values: range | tuple) -> str:
    if isinstance(values, range):
        return f"{values.start}..{values.stop - 1}"
    return " or ".join(str(v) for v in values)


def _check_split(name: str, module: ModuleType, split: int | None) -> int:
    if split is None:
        return module.DEFAULT_SPLIT
    if not _is_int(split) or split not in module.SPLITS:
        raise ValueError(f"model.split must be {_span(module.SPLITS)} for {name}, got {split!r}")
    return split


def _check_width(width: str | float, tiny: float) -> float:
    allowed = "'full', 'tiny' or a number in (0, 8]"
    if isinstance(width, str):
        if width == "tiny":
            return tiny
        if width in _WIDTHS:
            return _WIDTHS[width]
        raise ValueError(f"model.width must be {allowed}, got {width!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ValueError(f"model.width must be {allowed}, got {width!r}")
    if not (math.isfinite(width) and 0 < width <= _MAX_WIDTH):
        raise ValueError(f"model.width must be {allowed}, got {width!r}")
    return float(width)


def _check_input(name: str, module: ModuleType, in_channels: int, image_size: int,
                 num_classes: int) -> None:
    problems = []
    if not _is_int(in_channels) or in_channels not in module.IN_CHANNELS:
        problems.append(f"in_channels must be {_span(module.IN_CHANNELS)} for {name}, got {in_channels!r}")
    if not _is_int(image_size) or image_size not in module.IMAGE_SIZES:
        problems.append(f"image_size must be {_span(module.IMAGE_SIZES)} for {name}, got {image_size!r}")
    if not _is_int(num_classes) or num_classes < 2:
        problems.append(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _feature_shape(head: "nn.Module", in_channels: int, image_size: int) -> tuple[int, int, int]:
    """Run one zero image through the head in eval mode (running statistics stay untouched)."""
    import torch

    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            z = head(torch.zeros(1, in_channels, image_size, image_size))
    finally:
        head.train(was_training)
    if z.dim() != 4:
        raise ValueError(f"the head must return (B, C, H, W) features, got shape {tuple(z.shape)}")
    return tuple(z.shape[1:])
