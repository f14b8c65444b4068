"""Defenses: one file each, registered by name in DEFENSES (an explicit dict you can grep)."""
from __future__ import annotations

import importlib

__all__ = ["DEFENSES", "register", "create", "names"]

# name -> ("module:Class", one-line description, paper)
DEFENSES: dict[str, tuple[str, str, str]] = {
    "none": ("edgeveil.training.defenses.none:NoDefense",
             "no defense: the plain split model, the baseline every defense is measured against", "-"),
    "noise": ("edgeveil.training.defenses.noise:NoiseDefense",
              "Gaussian or Laplace noise on the features (strength = sigma or b); clip_norm adds (eps, delta)",
              "He, Zhang & Lee, IEEE IoT-J 2020; accountant: Balle & Wang, ICML 2018"),
    "dropout": ("edgeveil.training.defenses.dropout:DropoutDefense",
                "random zeroing of released features at training and inference (strength = p, no rescale)",
                "He, Zhang & Lee, IEEE IoT-J 2020"),
    "nopeek": ("edgeveil.training.defenses.nopeek:NoPeekDefense",
               "distance correlation between input and features as a loss (strength = alpha)",
               "Vepakomma, Singh, Gupta & Raskar, ICDM Workshops 2020"),
    "mid": ("edgeveil.training.defenses.mid:MIDDefense",
            "variational information bottleneck on the released features (strength = KL weight lambda)",
            "Zou, Liu & Zhang, arXiv 2301.01142, 2023"),
    "adversarial": ("edgeveil.training.defenses.adversarial:AdversarialDefense",
                    "adversarial training against a jointly trained inversion decoder (strength = alpha)",
                    "Li et al., ResSFL, CVPR 2022 (the CEM code's gan_adv baseline)"),
    "infoscissors": ("edgeveil.training.defenses.infoscissors:InfoScissorsDefense",
                     "CLUB bounds on I(r; x) and I(z; y) with adversarially fitted decoder and classifier "
                     "(strength = lambda_d, option lambda_l)",
                     "Duan et al., InfoScissors, NeurIPS 2024 (arXiv 2306.07973)"),
    "siftfunnel": ("edgeveil.training.defenses.siftfunnel:SiftFunnelDefense",
                   "label smoothing + dCor(x, z) + inter-channel Pearson redundancy + L1 on the features "
                   "(strength = beta, the dCor weight); pair with arch funnel",
                   "Yuan et al., SiftFunnel, arXiv 2501.00824 (2025)"),
    "cem": ("edgeveil.training.defenses.cem:CEMDefense",
            "conditional entropy maximization: class-wise cluster-variance hinge on top of a base defense "
            "(strength = lambda; option base = noise, adversarial or nopeek)",
            "Xia et al., CEM, CVPR 2025"),
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
