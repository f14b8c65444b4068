"""The interface every attack implements, and the helpers attacks share.

Shapes (numpy float32): aux_images (N, C, H, W) and target_images (M, C, H, W) in [0, 1];
aux_features (N, C', H', W') and target_features (M, C', H', W'), both through the same head
artifact (dequantized int8, or float); reconstructions (M, C, H, W) in [0, 1]. numpy only here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

__all__ = ["ThreatModel", "Victim", "Attack", "AttackContext", "AttackResult", "resolve_device", "is_int", "is_number",
           "option_problems", "POSITIVE", "NON_NEGATIVE", "FRACTION"]

_ARRAYS = ("aux_images", "aux_features", "target_features", "target_images")
_OPTIONAL = ("labelled_images", "labelled_features", "victim_images")


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker has. Every attack declares one; the report prints describe()."""
    head_weights: bool      # white-box access to the head
    query_access: bool      # can send chosen inputs through the deployed head
    auxiliary_data: str     # "none" | "same-distribution" | "other-distribution" | "victim-training-set" | "labelled"
    labels: int             # labelled samples the attacker has (0 if none)

    def describe(self) -> str:
        """For example "no head weights, query access, same-distribution auxiliary data, 0 labels"."""
        aux = "no" if self.auxiliary_data == "none" else self.auxiliary_data
        return ", ".join(["white-box head" if self.head_weights else "no head weights",
                          "query access" if self.query_access else "no queries",
                          f"{aux} auxiliary data", f"{self.labels} labels"])


@dataclass
class Victim:
    """What the deployment behind the features exposes. An attack uses only what its threat model grants.

    precision: the artifact that produced the features ("float" for the PyTorch head, or a manifest
    precision such as "int8" or "fp16").
    query: images (N, C, H, W) float32 in [0, 1] -> features (N, C', H', W') float32 through that
    same artifact, runtime noise included (query access; KA's other-distribution data, the
    noise-image regime of `inverse`). Images are rounded to uint8 pixels first, as a camera gives them.
    head: the float PyTorch head in eval mode (white-box attacks only); input is normalized images.
    tail: the cloud's own PyTorch tail (the server always has it): features (N, C', H', W') -> logits.
    mean, std: the head's input normalization, (x - mean) / std per channel, x in [0, 1].
    input_quant, output_quant: {"scale", "zero_point", "qmin", "qmax"} of an integer artifact's
    input and output tensors (None for float artifacts): fake-quantize with these to mimic it.
    sent_quant: the same for the grid the artifact's noisy codes are sent on (the manifest entry's
    `sent`, which export derived): the output tensor's own unless inference noise widened it. None
    for float artifacts; required with noise on an integer artifact.
    noise: the inference-time noise spec the runtime adds after the head (manifest
    `inference_noise`), or None.
    arch: how the head is built, from model.json: {"arch", "split", "width", "in_channels",
    "image_size", "num_classes", "options"}; `edgeveil.training.archs.create(arch, in_channels=...,
    image_size=..., num_classes=..., split=..., width=..., **options)` rebuilds it with fresh weights
    (an attacker who knows the architecture but not the weights: `shadow`).
    """
    precision: str = "float"
    query: Callable[[np.ndarray], np.ndarray] | None = None
    head: Any = None
    tail: Any = None
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    input_quant: dict | None = None
    output_quant: dict | None = None
    sent_quant: dict | None = None
    noise: dict | None = None
    num_classes: int = 0
    arch: dict | None = None


@dataclass
class AttackContext:
    """Everything an attack may use (shapes above); arrays become float32 and are checked on creation.

    aux_labels: labels of the auxiliary images (labelled-data attacks such as `shadow`).
    labelled_images / labelled_labels: the attacker's few labelled samples (`pmc`), (L, C, H, W) in
    [0, 1] and (L,) int64, a subset of the auxiliary set; labelled_features are the same through the artifact.
    target_labels: the targets' true classes, for scoring completion attacks only.
    victim_images: images of the victim's own training set, (V, C, H, W) in [0, 1]: only for the
    "same set" query regime of `inverse` (an upper bound: the attacker queried the training data).
    """
    aux_images: np.ndarray
    aux_features: np.ndarray
    target_features: np.ndarray
    target_images: np.ndarray | None = None     # ground truth, for scoring only
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    victim: Victim | None = None
    aux_labels: np.ndarray | None = None
    labelled_images: np.ndarray | None = None
    labelled_features: np.ndarray | None = None
    labelled_labels: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    victim_images: np.ndarray | None = None

    def __post_init__(self):
        for name in (n for n in _ARRAYS + _OPTIONAL if getattr(self, n) is not None):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        for name in ("aux_labels", "labelled_labels", "target_labels"):
            if getattr(self, name) is not None:
                setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        problems = _context_problems(self) + _optional_problems(self)
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


def _optional_problems(ctx: AttackContext) -> list[str]:
    problems = []
    pairs = (("aux_labels", ctx.aux_labels, len(ctx.aux_images)),
             ("target_labels", ctx.target_labels, len(ctx.target_features)))
    for name, labels, n in pairs:
        if labels is not None and labels.shape != (n,):
            problems.append(f"{name} must have shape ({n},), got {labels.shape}")
    vi = ctx.victim_images
    if vi is not None and (vi.ndim != 4 or vi.shape[1:] != ctx.aux_images.shape[1:]):
        problems.append(f"victim_images must be (V, {', '.join(map(str, ctx.aux_images.shape[1:]))}), got {vi.shape}")
    li, lf, ll = ctx.labelled_images, ctx.labelled_features, ctx.labelled_labels
    if (li is None) != (ll is None):
        problems.append("labelled_images and labelled_labels come together")
    elif li is not None:
        if li.ndim != 4 or li.shape[1:] != ctx.aux_images.shape[1:] or ll.shape != (len(li),):
            problems.append(f"labelled_images must be (L, {', '.join(map(str, ctx.aux_images.shape[1:]))}) "
                            f"with labelled_labels (L,), got {li.shape} and {ll.shape}")
        if lf is not None and lf.shape != (len(li),) + ctx.aux_features.shape[1:]:
            problems.append(f"labelled_features must be {(len(li),) + ctx.aux_features.shape[1:]}, got {lf.shape}")
    return problems


@dataclass
class AttackResult:
    reconstructions: np.ndarray | None          # (M, C, H, W) in [0, 1], or None (non-inverting attacks)
    scores: dict[str, np.ndarray] = field(default_factory=dict)   # metric -> (M,) per image
    summary: dict = field(default_factory=dict)                   # metric -> {"mean", "ci95", "n", ...}
    info: dict = field(default_factory=dict)                      # seeds, epochs, losses, seconds


class Attack:
    """Subclasses set the class attributes, declare OPTIONS (name -> default) and implement run().

    description: one line for `edgeveil list attacks` and attacks.json (the registry reads it here).
    TINY_OPTIONS: overrides of OPTIONS that make a run take a second or two on a tiny victim: the
    contract tests (tests/test_attack_contract.py) run every registered attack with them.
    """
    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = "-"
    threat_model: ClassVar[ThreatModel] = ThreatModel(False, False, "none", 0)
    OPTIONS: ClassVar[dict[str, Any]] = {}
    TINY_OPTIONS: ClassVar[dict[str, Any]] = {}

    @property
    def wants_victim_images(self) -> bool:
        """True when this configuration needs ctx.victim_images (the stage loads them only then)."""
        return False

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

    def fit_to(self, sizes: dict[str, int], given: set[str]) -> tuple[dict[str, Any], str | None]:
        """(option changes, reason to skip or None) for a run's data, decided before anything trains.

        sizes: "targets", "aux", "labelled", "classes" (and the other split sizes). given: the
        options the user set; only defaults are scaled down, a given option that cannot fit is a
        reason to skip that names it. The default: the attack fits any data.
        """
        return {}, None

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


def is_int(v) -> bool:
    """An int option value (True and False are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float option value (booleans are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Rules for option_problems: (test, what is allowed)
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 < v < 1, "in (0, 1)")


def option_problems(o: dict, counts: dict[str, int] | None = None,
                    numbers: dict[str, tuple[Callable[[float], bool], str]] | None = None) -> list[str]:
    """Every problem with option values, each naming the option and what it allows.

    counts: option -> the smallest integer allowed; numbers: option -> (test, what is allowed),
    e.g. POSITIVE, NON_NEGATIVE, FRACTION, for finite numbers (booleans are neither).
    """
    problems = [f"{k} must be an integer >= {low}, got {o[k]!r}"
                for k, low in (counts or {}).items() if not is_int(o[k]) or o[k] < low]
    return problems + [f"{k} must be a number {allowed}, got {o[k]!r}"
                       for k, (ok, allowed) in (numbers or {}).items() if not is_number(o[k]) or not ok(o[k])]


def resolve_device(name: str):
    """torch.device for "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    import torch

    cuda = torch.cuda.is_available()
    name = ("cuda" if cuda else "cpu") if name == "auto" else name
    if not isinstance(name, str) or name.split(":")[0] not in ("cpu", "cuda") or (name != "cpu" and not cuda):
        raise ValueError(f"device must be 'auto', 'cpu' or (with CUDA available) 'cuda[:N]', got {name!r}")
    return torch.device(name)
