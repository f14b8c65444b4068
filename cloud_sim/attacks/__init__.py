"""Attacks on received features: one file each, registered by name in ATTACKS (an explicit dict you can grep).

An attack class says what it is once, in its `description`, `paper` and `threat_model` attributes.
"""
from __future__ import annotations

from edgeveil.device.registry import Registry

__all__ = ["ATTACKS", "register", "create", "load", "names"]

ATTACKS = Registry("attack", "attack.names", "Class", {
    "inverse": "edgeveil.cloud_sim.attacks.inverse:InverseAttack",
    "rmle": "edgeveil.cloud_sim.attacks.rmle:RmleAttack",
    "ka": "edgeveil.cloud_sim.attacks.ka:KnowledgeAlignmentAttack",
    "shadow": "edgeveil.cloud_sim.attacks.shadow:ShadowAttack",
    "pmc": "edgeveil.cloud_sim.attacks.pmc:PassiveCompletionAttack",
    "mine": "edgeveil.cloud_sim.attacks.mine:MineEstimate",
})


def register(name: str, target: str) -> None:
    """Add an attack; target is "package.module:Class". A taken name is refused."""
    ATTACKS.register(name, target)


def load(name: str):
    """The attack class (imports its module); an unknown name lists the known ones."""
    return ATTACKS.load(name)


def create(name: str, **options):
    """An attack instance; unknown names and unknown options are refused with the known ones listed."""
    return load(name)(**options)


def names() -> list[tuple[str, str, str]]:
    """(name, description, paper) for `edgeveil list attacks`, from each attack's class."""
    return [(n, ATTACKS.describe(n), load(n).paper) for n in ATTACKS]
