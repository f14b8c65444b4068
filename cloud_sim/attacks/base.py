"""The interface every attack implements, and the helpers behind the registry in __init__.

Shapes (numpy float32): aux_images (N, C, H, W) and target_images (M, C, H, W) in [0, 1];
aux_features (N, C', H', W') and target_features (M, C', H', W'), both through the same head
artifact (dequantized int8, or float); reconstructions (M, C, H, W) in [0, 1]. numpy only here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = ["ThreatModel", "Attack", "AttackContext", "AttackResult", "resolve_device",
           "register", "load", "create"]

_ARRAYS = ("aux_images", "aux_features", "target_features", "target_images")


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker has. Every attack declares one; the report prints describe()."""
    head_weights: bool      # white-box access to the head
    query_access: bool      # can send chosen inputs through the deployed head
    auxiliary_data: str     # "none" | "same-distribution" | "other-distribution" | "labelled"
    labels: int             # labelled samples the attacker has (0 if none)

    def describe(self) -> str:
        """For example "no head weights, query access, same-distribution auxiliary data, 0 labels"."""
        aux = "no" if self.auxiliary_data == "none" else self.auxiliary_data
        return ", ".join(["white-box head" if self.head_weights else "no head weights",
                          "query access" if self.query_access else "no queries",
                          f"{aux} auxiliary data", f"{self.labels} labels"])


@dataclass
class AttackContext:
    """Everything an attack may use (shapes above); arrays become float32 and are checked on creation."""
    aux_images: np.ndarray
    aux_features: np.ndarray
    target_features: np.ndarray
    target_images: np.ndarray | None = None     # ground truth, for scoring only
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name in (n for n in _ARRAYS if getattr(self, n) is not None):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        problems = _context_problems(self)
        if problems:
            raise ValueError("attack context: " + "; ".join(problems))


def _context_problems(ctx: AttackContext) -> list[str]:
    arrays = {n: getattr(ctx, n) for n in _ARRAYS if getattr(ctx, n) is not None}
    problems = [f"{n} must be 4-D (N, C, H, W), non-empty and finite, got shape {a.shape}"
                for n, a in arrays.items() if a.ndim != 4 or not a.size or not np.isfinite(a).all()]
    if problems:
        return problems
    ai, af, tf, ti = ctx.aux_images, ctx.aux_features, ctx.target_features, ctx.target_images
    if len(ai) != len(af):
        problems.append(f"aux_images has {len(ai)} images but aux_features {len(af)}")
    if af.shape[1:] != tf.shape[1:]:
        problems.append(f"aux_features {af.shape[1:]} and target_features {tf.shape[1:]} differ")
    if ti is not None and (len(ti) != len(tf) or ti.shape[1:] != ai.shape[1:]):
        problems.append(f"target_images must be {(len(tf),) + ai.shape[1:]}, got {ti.shape}")
    for n, a in (("aux_images", ai), ("target_images", ti)):
        if a is not None and (a.min() < -1e-4 or a.max() > 1 + 1e-4):
            problems.append(f"{n} must be in [0, 1], got [{a.min():.4g}, {a.max():.4g}]: de-normalize them")
    if not (isinstance(ctx.seed, int) and ctx.seed >= 0):
        problems.append(f"seed must be an integer >= 0, got {ctx.seed!r}")
    return problems


@dataclass
class AttackResult:
    reconstructions: np.ndarray | None          # (M, C, H, W) in [0, 1], or None (non-inverting attacks)
    scores: dict[str, np.ndarray] = field(default_factory=dict)   # metric -> (M,) per image
    summary: dict = field(default_factory=dict)                   # metric -> {"mean", "ci95", "n", ...}
    info: dict = field(default_factory=dict)                      # seeds, epochs, losses, seconds


class Attack:
    """Subclasses set the class attributes, declare OPTIONS (name -> default) and implement run()."""
    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = "-"
    threat_model: ClassVar[ThreatModel] = ThreatModel(False, False, "none", 0)
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        self.options = {**self.OPTIONS, **options}
        problems = ([f"no options {', '.join(unknown)} (known: {', '.join(sorted(self.OPTIONS)) or 'none'})"]
                    if unknown else self.check_options(self.options))
        if problems:
            raise ValueError(f"attack {self.name}: " + "; ".join(problems))

    def check_options(self, options: dict[str, Any]) -> list[str]:
        """Every problem with the option values, each naming the option, value and what is allowed."""
        return []

    def run(self, ctx: AttackContext) -> AttackResult:
        raise NotImplementedError(f"attack {self.name} does not implement run()")

    @staticmethod
    def score(ctx: AttackContext, reconstructions: np.ndarray) -> tuple[dict, dict]:
        """(per-image scores, summary) against ctx.target_images, or ({}, {}) without ground truth."""
        if ctx.target_images is None:
            return {}, {}
        from .. import metrics  # torch and torchmetrics load only when scoring
        scores = metrics.image_scores(ctx.target_images, reconstructions)
        return scores, metrics.summarize(scores, seed=ctx.seed)


def resolve_device(name: str):
    """torch.device for "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    import torch

    cuda = torch.cuda.is_available()
    name = ("cuda" if cuda else "cpu") if name == "auto" else name
    if not isinstance(name, str) or name.split(":")[0] not in ("cpu", "cuda") or (name != "cpu" and not cuda):
        raise ValueError(f"device must be 'auto', 'cpu' or (with CUDA available) 'cuda[:N]', got {name!r}")
    return torch.device(name)


def register(registry: dict, name: str, target: str, description: str, paper: str = "-") -> None:
    """registry[name] = ("package.module:Class", description, paper); a taken name is refused."""
    module, sep, attr = target.partition(":")
    if name in registry or not (module and sep and attr):
        raise ValueError(f"cannot register attack {name!r} -> {target!r}: the name is taken "
                         "or the target is not 'package.module:Class'")
    registry[name] = (target, description, paper)


def load(registry: dict, name: str) -> type[Attack]:
    """The attack class (imports its module); an unknown name lists the known ones."""
    if name not in registry:
        raise ValueError(f"attack.names must be among {', '.join(registry)}, got {name!r}")
    module, _, cls = registry[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)



def create(registry: dict, name: str, **options) -> Attack:
    """An attack instance; unknown names and unknown options are refused with the known ones listed."""
    return load(registry, name)(**options)
