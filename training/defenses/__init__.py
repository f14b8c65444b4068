"""Defenses: one file each, registered by name in DEFENSES (an explicit dict you can grep).

A defense class says what it is once, in its `description` and `paper` attributes.
"""
from __future__ import annotations

from edgeveil.device.registry import Registry

__all__ = ["DEFENSES", "register", "create", "load", "names"]

DEFENSES = Registry("defense", "defense.name", "Class", {
    "none": "edgeveil.training.defenses.none:NoDefense",
    "noise": "edgeveil.training.defenses.noise:NoiseDefense",
    "dropout": "edgeveil.training.defenses.dropout:DropoutDefense",
    "nopeek": "edgeveil.training.defenses.nopeek:NoPeekDefense",
    "mid": "edgeveil.training.defenses.mid:MIDDefense",
    "adversarial": "edgeveil.training.defenses.adversarial:AdversarialDefense",
    "infoscissors": "edgeveil.training.defenses.infoscissors:InfoScissorsDefense",
    "siftfunnel": "edgeveil.training.defenses.siftfunnel:SiftFunnelDefense",
    "cem": "edgeveil.training.defenses.cem:CEMDefense",
})


def register(name: str, target: str) -> None:
    """Add a defense; target is "package.module:Class". A taken name is refused."""
    DEFENSES.register(name, target)


def load(name: str, field: str = "defense.name"):
    """The defense class; an unknown name lists the known ones under `field`."""
    return DEFENSES.load(name, field)


def names() -> list[tuple[str, str, str]]:
    """(name, description, paper) of every defense, from its class, for `edgeveil list defenses`."""
    return [(n, DEFENSES.describe(n), load(n).paper) for n in DEFENSES]


def create(name: str, strength: float = 0.0, **options):
    return load(name)(strength=strength, **options)
