"""The interface every defense implements; the trainer calls only these hooks.

Shapes: x (B, C, H, W) float32 normalized input; z (B, C', H', W') float32 head output;
logits (B, K); y (B,) int64.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def check_option(field: str, value, *, integer: bool = False, low: float = 0.0, high: float = math.inf,
                 open_low: bool = False):
    """A defense's numeric option, checked: low <= value < high (low < value if open_low); ints if integer.

    Returns the value (a float unless integer); a bad one is a ValueError naming the field.
    """
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value) and (value > low if open_low else value >= low) and value < high
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"in ({low}, {high})" if open_low else f"in [{low}, {high})"
        raise ValueError(f"{field} must be {kind} {bound}, got {value!r}")
    return value if integer else float(value)


class Defense:
    """Hooks, in the order the trainer calls them each step:

    1. ``adversary_step(x, z.detach(), y)``: update the defense's own adversaries
       (decoders, estimators) with their own optimizer; returns logged scalars.
    2. ``transform(z)``: the training-time feature transform before the tail (noise, dropout,
       sampling); at inference the device applies ``inference_noise()`` instead.
    3. ``loss(x, z, logits, y)``: extra loss terms, already weighted, added to the task loss.

    And once per epoch ``end_epoch(epoch, lr)``, before the checkpoint is written.

    For tests and reports, a defense also says what it aims to change: ``target_metric(x, r)``
    on the released features and ``TARGET_DIRECTION`` ("down" or "up": where it moves when the
    defense works, compared with `none` trained from the same seed). ``example_strength`` is a
    moderate strength for examples and the contract tests.
    """

    name = "base"
    description = ""
    paper = "-"
    TARGET_DIRECTION: str | None = None
    example_strength: float = 0.0

    def __init__(self, strength: float = 0.0, **options):
        if options:
            raise ValueError(f"defense {self.name} has no options {', '.join(sorted(options))}")
        self.strength = float(strength)
        self.modules = nn.ModuleDict()  # extra trainable modules, checkpointed with the model

    def setup(self, head: nn.Module, tail: nn.Module, input_shape, feature_shape, num_classes: int) -> None:
        """Build the extra modules once shapes are known."""

    def parameters(self):
        """Parameters trained jointly with the head and tail (not the adversaries')."""
        return []

    def adversary_step(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {}

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        return {}

    def eval_transform(self, z: torch.Tensor) -> torch.Tensor:
        """What float evaluation applies to features: the inference-time randomness, in float."""
        return z

    def end_epoch(self, epoch: int, lr: float) -> dict[str, float]:
        """After each epoch's steps, before its checkpoint: per-epoch work such as CEM's class-wise
        clustering. epoch = epochs completed, lr = the next epoch's learning rate; logged scalars."""
        return {}

    def inference_noise(self) -> dict | None:
        """What the device runtime must add after the head, or None."""
        return None

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """What this defense aims to change, measured on one batch.

        x: (B, C, H, W) normalized inputs; r: (B, C', H', W') the features as the cloud receives
        them in float, ``eval_transform(head(x))`` (inference-time randomness included).
        """
        raise NotImplementedError(f"defense {self.name} does not define target_metric")

    def state_dict(self) -> dict:
        return {"modules": self.modules.state_dict(), "optimizers": self._optimizer_states()}

    def load_state_dict(self, state: dict) -> None:
        self.modules.load_state_dict(state["modules"])
        self._load_optimizer_states(state.get("optimizers", {}))

    def _optimizer_states(self) -> dict:
        return {}

    def _load_optimizer_states(self, states: dict) -> None:
        pass

    def to(self, device) -> "Defense":
        self.modules.to(device)
        return self
