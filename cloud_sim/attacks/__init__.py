"""Attacks on received features: one file each, registered by name in ATTACKS (an explicit dict you can grep)."""
from __future__ import annotations

__all__ = ["ATTACKS", "register", "create", "names"]

# name -> ("module:Class", one-line description, paper)
ATTACKS: dict[str, tuple[str, str, str]] = {
    "inverse": ("edgeveil.cloud_sim.attacks.inverse:InverseAttack",
                "black-box inverse network: a decoder trained on auxiliary images queried through the head",
                "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"),
    "rmle": ("edgeveil.cloud_sim.attacks.rmle:RmleAttack",
             "white-box regularized optimization of an input whose features match the received ones",
             "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"),
    "ka": ("edgeveil.cloud_sim.attacks.ka:KnowledgeAlignmentAttack",
           "knowledge alignment: an inverse network trained on auxiliary data from another distribution",
           "Yang, Chang, Liang: Neural network inversion in adversarial setting via background knowledge "
           "alignment (CCS 2019)"),
    "shadow": ("edgeveil.cloud_sim.attacks.shadow:ShadowAttack",
               "query-free: a shadow head trained through the frozen tail on labelled data, then inverted",
               "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"),
    "pmc": ("edgeveil.cloud_sim.attacks.pmc:PassiveCompletionAttack",
            "passive model completion: a classifier on the features from few labels (MixMatch), "
            "beside a from-scratch baseline",
            "Fu et al.: Label inference attacks against vertical federated learning (USENIX Security 2022)"),
    "mine": ("edgeveil.cloud_sim.attacks.mine:MineEstimate",
             "diagnostic: a Donsker-Varadhan estimate of the mutual information between inputs and features",
             "Belghazi et al.: Mutual information neural estimation (ICML 2018)"),
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
