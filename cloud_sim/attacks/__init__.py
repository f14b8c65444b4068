"""Attacks on received features: one file each, registered by name in ATTACKS (an explicit dict you can grep)."""
from __future__ import annotations

__all__ = ["ATTACKS", "register", "create", "names"]

# name -> ("module:Class", one-line description, paper)
ATTACKS: dict[str, tuple[str, str, str]] = {
    "inverse": ("edgeveil.cloud_sim.attacks.inverse:InverseAttack",
                "black-box inverse network: a decoder trained on auxiliary images queried through the head",
                "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"),
}


def register(name: str, target: str, description: str, paper: str = "-") -> None:
    from .base import register as _register

    _register(ATTACKS, name, target, description, paper)


def create(name: str, **options):
    from .base import create as _create

    return _create(ATTACKS, name, **options)


def names() -> list[tuple[str, str, str]]:
    """(name, description, paper) for `edgeveil list attacks`."""
    return [(n, d, p) for n, (_, d, p) in ATTACKS.items()]
