"""Defenses: one file each, registered by name in DEFENSES (an explicit dict you can grep)."""
from __future__ import annotations

import importlib

__all__ = ["DEFENSES", "register", "create", "names"]

# name -> ("module:Class", one-line description, paper)
DEFENSES: dict[str, tuple[str, str, str]] = {
    "none": ("edgeveil.training.defenses.none:NoDefense",
             "no defense: the plain split model, the baseline every defense is measured against", "-"),
}


def register(name: str, target: str, description: str, paper: str = "-") -> None:
    if name in DEFENSES:
        raise ValueError(f"defense {name!r} is already registered")
    DEFENSES[name] = (target, description, paper)


def names() -> list[tuple[str, str, str]]:
    return [(n, d, p) for n, (_, d, p) in DEFENSES.items()]


def create(name: str, strength: float = 0.0, **options):
    if name not in DEFENSES:
        raise ValueError(f"defense.name must be one of {', '.join(DEFENSES)}, got {name!r}")
    module, _, cls = DEFENSES[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)(strength=strength, **options)
