"""The registry helper every stage shares (device/registry.py), on the real registries."""
from __future__ import annotations

import copy
import pickle

import pytest

from edgeveil.cloud_sim.attacks import ATTACKS
from edgeveil.device.registry import Registry
from edgeveil.training.archs import ARCHS
from edgeveil.training.defenses import DEFENSES


def _registry(**targets) -> Registry:
    return Registry("attack", "attack.names", "Class", targets)


@pytest.mark.parametrize("registry", [DEFENSES, ATTACKS, ARCHS], ids=["defenses", "attacks", "archs"])
def test_every_entry_loads_and_describes_itself_in_one_line(registry):
    for name in registry:
        assert registry.load(name) is not None
        line = registry.describe(name)
        assert line.strip() and "\n" not in line


@pytest.mark.parametrize("registry, field", [(DEFENSES, "defense.name"), (ATTACKS, "attack.names"),
                                             (ARCHS, "model.arch")])
def test_an_unknown_name_names_the_field_and_lists_every_known_one(registry, field):
    with pytest.raises(ValueError, match=f"^{field} must be one of {', '.join(registry)}, got 'nosuch'$"):
        registry.load("nosuch")
    with pytest.raises(ValueError, match="^--flag must be one of"):
        registry.check("nosuch", field="--flag")


def test_register_refuses_a_taken_name_and_a_malformed_target():
    registry = _registry(inverse="edgeveil.cloud_sim.attacks.inverse:InverseAttack")
    with pytest.raises(ValueError, match="'inverse' is already registered"):
        registry.register("inverse", "edgeveil.cloud_sim.attacks.rmle:RmleAttack")
    for bad in ("no_colon", "module:", ":Class", None):
        with pytest.raises(ValueError, match="must look like 'package.module:Class'"):
            registry.register("other", bad)
    assert list(registry) == ["inverse"]


def test_a_missing_or_multi_line_description_is_refused():
    registry = _registry(base="edgeveil.cloud_sim.attacks.base:Attack")  # the base class describes nothing
    with pytest.raises(ValueError, match=r"Attack.description must be one non-empty line, got ''"):
        registry.describe("base")


def test_copies_and_pickles_keep_the_checks():
    for registry in (copy.deepcopy(ARCHS), pickle.loads(pickle.dumps(ARCHS))):
        assert isinstance(registry, Registry) and registry == ARCHS and registry.field == "model.arch"
        with pytest.raises(ValueError, match="model.arch must be one of"):
            registry.load("nosuch")
