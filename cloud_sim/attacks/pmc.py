"""Passive model completion (Fu et al., USENIX Security 2022) and its train-from-scratch baseline.

The curious cloud receives features but has no labels for them. With a few labelled samples of
its own (40 for 10 classes, 4 a class, as in Fu et al. and InfoScissors) and an unlabelled pool
(the auxiliary images), it trains its own small classifier on the features with MixMatch
(Berthelot et al., NeurIPS 2019) and scores it on the features it received:

    standardized features (B, C', H', W') -> top model -> logits (B, num_classes)

Augmentation (MixMatch needs stochastic views of every sample). The attacker owns its auxiliary
and labelled images, so it augments the *images* (a random shift of up to `shift` of the image
size with reflection padding, MixMatch's random crop; optionally horizontal flips) and sends
every view through the deployed artifact (victim.query), fresh views at every step: the features
it learns from come out of the same head, quantization and runtime noise as the targets. This
needs query access, and the threat model says so: steps * batch_size * (1 + K) queries (96,000
with the defaults; supervised: steps * batch_size). The unaugmented aux and labelled features in
the context only give the standardization statistics; the targets are classified unaugmented.

MixMatch, per step (B labelled samples drawn with replacement, B unlabelled ones from the whole
auxiliary pool, the labelled included): one view of each labelled sample; K views of each
unlabelled one; the guess q = Sharpen(mean_k softmax(model(u_k)), T), without gradient; MixUp of
every row with a random row of the whole (labelled + unlabelled) batch, lambda ~ Beta(alpha,
alpha) per row, lambda' = max(lambda, 1 - lambda); loss = soft cross-entropy on the labelled rows
+ w * mean squared error between the softmax and the mixed guesses on the unlabelled rows (mean
over rows and classes, the paper's 1/(L |U'|)). The evaluated model is an exponential moving
average of the weights.

Numbers. Berthelot et al.: K = 2, T = 0.5, alpha = 0.75, lambda_u = 100 (75 in the released
CIFAR-10 runs), w ramped linearly over the first 16,000 of ~1M steps, Adam lr 0.002, weight
average 0.999. Fu et al.'s model completion: T = 0.8, lambda_u = 50, batch 16, a single view for
the guess, w ramped over the whole training, weight average 0.999, 25 x 1,024 steps. The defaults
keep the paper's K, T, alpha and lr, lambda_u = 75, and Fu et al.'s whole-run ramp: in runs of
hundreds of steps a short ramp lets the unlabelled term take over before the labelled one has
taught anything, and the model collapses (measured on digits, 40 labels: 18% with the full
weight after a third of 300 steps, 88% with the whole-run ramp over 500 steps). The weight
average decays at 0.99, not 0.999, for the same short runs.

The top model (Fu et al. put BN -> ReLU -> FC on the bottom model's output vector; here the
features are maps): conv3x3 (stride 2 on maps of 8x8 and more) -> BN -> ReLU -> conv3x3 -> BN
-> ReLU -> global average pool -> linear. "supervised" trains the same model on the labelled
views alone (cross-entropy), the ablation without the unlabelled pool.

Baseline, same labels: the victim's whole architecture (head + tail, from victim.arch) with fresh
weights, trained from scratch on the labelled *images* alone with the same image augmentation,
scored on the target images. Clean accuracy is the deployment's own: victim.tail on the target
features. InfoScissors (CIFAR-10, ResNet-18, no defense, 40 labels): clean 77.20%, completion
69.31%, from scratch 15.34%.

Measured (one CPU thread, smallcnn split 2, 40 labels; clean / MixMatch / supervised / scratch):
digits, tiny victim trained 300 steps, 800 aux, 397 targets, defaults: 92.7 / 93.5 / 84.6 / 71.5%;
MNIST, full-width victim trained 10 epochs on 6,000 images, 2,000 aux, 2,000 targets, defaults:
97.7 / 96.8 / 82.2 / 69.1%, 2.5 minutes for MixMatch on a busy 2-core host.

Features are standardized per channel with the auxiliary features' statistics (a failed attack
looks like privacy: research/prototype_int8_privacy.md). target_labels are used only to score.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (NON_NEGATIVE, POSITIVE, Attack, AttackContext, AttackResult, ThreatModel, option_problems,
                   resolve_device)

__all__ = ["PassiveCompletionAttack", "build_top_model"]

_METHODS = ("mixmatch", "supervised")
_NUMBERS = {  # option -> (test, what is allowed)
    "lr": POSITIVE, "temperature": (lambda v: 0 < v <= 1, "in (0, 1]"), "alpha": POSITIVE, "lambda_u": NON_NEGATIVE,
    "rampup": (lambda v: 0 <= v <= 1, "in [0, 1]"), "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "shift": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}
_CURVE_POINTS = 20      # training-curve entries kept in info
_EVAL_BATCH = 256


class PassiveCompletionAttack(Attack):
    name = "pmc"
    description = ("passive model completion: a classifier on the features from few labels (MixMatch), "
                   "beside a from-scratch baseline")
    paper = "Fu et al.: Label inference attacks against vertical federated learning (USENIX Security 2022)"
    threat_model = ThreatModel(head_weights=False, query_access=True, auxiliary_data="labelled", labels=40)
    OPTIONS = {
        "method": "mixmatch",   # "mixmatch" | "supervised" (labelled views only, the ablation)
        "steps": 1000,          # optimizer steps of the top model
        "batch_size": 32,       # B labelled and B unlabelled samples a step
        "lr": 2e-3,             # Adam, for the top model and the from-scratch baseline
        "width": 64,            # channels of the top model's convolutions
        "augmentations": 2,     # K: views of each unlabelled sample averaged into its guessed label
        "temperature": 0.5,     # T: sharpening of the guessed label
        "alpha": 0.75,          # MixUp's Beta(alpha, alpha)
        "lambda_u": 75.0,       # weight of the unlabelled loss after the ramp
        "rampup": 1.0,          # share of the steps over which that weight rises linearly from 0
        "ema": 0.99,            # decay of the weight average that is evaluated (0: the last weights)
        "shift": 0.125,         # largest random shift, as a fraction of the image size (4 px at 32)
        "flip": False,          # random horizontal flips too (natural images; wrong for digits)
        "scratch_steps": 300,   # optimizer steps of the from-scratch baseline
    }

    TINY_OPTIONS = {"steps": 3, "batch_size": 8, "width": 8, "scratch_steps": 3}

    def check_options(self, o: dict) -> list[str]:
        problems = option_problems(o, dict.fromkeys(("steps", "batch_size", "width", "augmentations",
                                                     "scratch_steps"), 1), _NUMBERS)
        if not isinstance(o["flip"], bool):
            problems.append(f"flip must be true or false, got {o['flip']!r}")
        if o["method"] not in _METHODS:
            problems.append(f"method must be one of {', '.join(_METHODS)}, got {o['method']!r}")
        return problems

    def fit_to(self, sizes: dict, given: set) -> tuple[dict, str | None]:
        """One labelled sample of every class at least (data.labelled, balanced over classes)."""
        if sizes["labelled"] < sizes["classes"]:
            return {}, (f"pmc needs a labelled sample of each of the {sizes['classes']} classes, and data.labelled "
                        f"is {sizes['labelled']}")
        return {}, None

    def run(self, ctx: AttackContext) -> AttackResult:
        """Complete the model on the features, train the baseline from scratch, score both and the tail."""
        from tqdm.auto import tqdm

        from .. import metrics

        start = time.perf_counter()
        o, device = self.options, resolve_device(ctx.device)
        num_classes = _check_context(ctx)
        completion_rng, scratch_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(ctx.seed).spawn(2))
        total = o["steps"] + o["scratch_steps"]
        with tqdm(total=total, desc="pmc", unit="step", disable=not ctx.progress, leave=False) as bar:
            completion = _complete(ctx, o, num_classes, completion_rng, device, bar)
            scratch = _from_scratch(ctx, o, scratch_rng, device, bar)
        scores = {"accuracy": completion.correct, "scratch_accuracy": scratch.correct,
                  "clean_accuracy": _clean_correct(ctx)}
        counts = np.bincount(ctx.labelled_labels, minlength=num_classes)
        info = {
            "labels": len(ctx.labelled_labels), "per_class": counts.tolist(), "method": o["method"],
            "history": completion.history, "scratch_history": scratch.history,
            "queries": completion.queries, "completion_seconds": completion.seconds,
            "scratch_seconds": scratch.seconds, "scratch_model": f"{ctx.victim.arch['arch']} (victim.arch), "
                                                                 "fresh weights, labelled images only",
            "augmentation": f"images: random shift up to {o['shift']:g} of the size (reflect padding)"
                            + (", horizontal flips" if o["flip"] else "") + ", queried through the artifact",
            "feature_standardization": "per channel, auxiliary-feature mean and std",
            "device": str(device), "options": dict(o), "seconds": time.perf_counter() - start,
        }
        return AttackResult(None, scores, metrics.summarize(scores, seed=ctx.seed), info)




def _check_context(ctx: AttackContext) -> int:
    """The number of classes; every missing input in one ValueError."""
    v, problems = ctx.victim, []
    needs = {"query (the augmented views)": v is not None and v.query is not None,
             "tail (the clean accuracy)": v is not None and v.tail is not None,
             "arch (the from-scratch baseline)": v is not None and bool(v.arch),
             "num_classes >= 2": v is not None and v.num_classes >= 2}
    if not all(needs.values()):
        problems.append("pmc needs the victim's " + ", ".join(n for n, ok in needs.items() if not ok)
                        + ("; no victim given" if v is None else ""))
    if ctx.labelled_images is None or not len(ctx.labelled_images):
        problems.append("pmc needs labelled samples (labelled_images and labelled_labels; data.labelled)")
    for name in ("target_labels", "target_images"):
        if getattr(ctx, name) is None:
            problems.append(f"pmc needs {name} to score the completed and the from-scratch models")
    if problems:
        raise ValueError("; ".join(problems))
    k = v.num_classes
    for name in ("labelled_labels", "target_labels"):
        labels = getattr(ctx, name)
        if labels.min() < 0 or labels.max() >= k:
            problems.append(f"{name} must be class indices in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    missing = sorted(set(range(k)) - set(ctx.labelled_labels.tolist()))
    if missing and not problems:
        problems.append(f"the labelled set has no sample of class(es) {', '.join(map(str, missing))}: "
                        f"pmc needs at least one labelled sample of each of the {k} classes")
    if problems:
        raise ValueError("; ".join(problems))
    return k


# ---------------------------------------------------------------- augmented views through the artifact


def _augment(images: np.ndarray, rng: np.random.Generator, shift: float, flip: bool) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> a random shift of each image (reflection padding), optionally flipped."""
    n, _, h, w = images.shape
    s = round(shift * min(h, w))
    out = images
    if s:
        padded = np.pad(images, ((0, 0), (0, 0), (s, s), (s, s)), mode="reflect")
        dy, dx = rng.integers(0, 2 * s + 1, size=(2, n))
        out = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirrored = rng.random(n) < 0.5
        out = np.where(mirrored[:, None, None, None], out[..., ::-1], out)
    return np.ascontiguousarray(out, dtype=np.float32)


class _Features(NamedTuple):
    """Augmented views of the attacker's images, queried and standardized on the attack's device."""
    query: object
    mean: torch.Tensor      # (1, C', 1, 1) auxiliary-feature statistics
    std: torch.Tensor
    shape: tuple            # (C', H', W')
    shift: float
    flip: bool
    device: torch.device

    def views(self, images: np.ndarray, rng) -> torch.Tensor:
        z = np.asarray(self.query(_augment(images, rng, self.shift, self.flip)), dtype=np.float32)
        if z.shape != (len(images),) + self.shape:
            raise ValueError(f"victim.query returned features {z.shape}, expected {(len(images),) + self.shape}")
        return self.standardize(z)

    def standardize(self, z: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.ascontiguousarray(z)).to(self.device) - self.mean) / self.std


def _feature_source(ctx: AttackContext, o: dict, device) -> _Features:
    z = ctx.aux_features
    mean, std = z.mean(axis=(0, 2, 3), dtype=np.float64), z.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(std, max(1e-3 * float(np.median(std)), 1e-8))  # dead channels stay ~0, not huge
    stats = [torch.tensor(s, dtype=torch.float32, device=device).reshape(1, -1, 1, 1) for s in (mean, std)]
    return _Features(ctx.victim.query, *stats, tuple(z.shape[1:]), o["shift"], o["flip"], device)


# ---------------------------------------------------------------- the completed model


class _Trained(NamedTuple):
    correct: np.ndarray     # (M,) 1.0 where the model's class is the target's
    history: list
    queries: int
    seconds: float


def build_top_model(feature_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> nn.Module:
    """(B, C', H', W') standardized features -> (B, num_classes) logits; stride 2 first on maps >= 8x8."""
    c, h, w = feature_shape
    stride = 2 if min(h, w) >= 8 else 1
    return nn.Sequential(
        nn.Conv2d(c, width, 3, stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def _complete(ctx: AttackContext, o: dict, num_classes: int, rng, device, bar) -> _Trained:
    """Train the top model (MixMatch or supervised), return its correctness on the target features."""
    start = time.perf_counter()
    feats = _feature_source(ctx, o, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        model = build_top_model(feats.shape, num_classes, o["width"]).to(device)
    average = _weight_average(model, o["ema"])
    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"])
    step_fn = _mixmatch_step if o["method"] == "mixmatch" else _supervised_step
    curve, history, queries = [], [], 0
    for step in range(1, o["steps"] + 1):
        losses, n = step_fn(model, ctx, feats, o, step, rng, num_classes)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if average is not None:
            average.update_parameters(model)
        queries += n
        curve.append({k: float(v.detach()) for k, v in losses.items()})
        _log_curve(curve, history, step, o["steps"])
        bar.update(1)
    evaluated = average.module if average is not None else model
    logits = _predict(evaluated, [feats.standardize(ctx.target_features[i:i + _EVAL_BATCH])
                                  for i in range(0, len(ctx.target_features), _EVAL_BATCH)])
    correct = (logits.argmax(1) == ctx.target_labels).astype(np.float64)
    return _Trained(correct, history, queries, time.perf_counter() - start)


def _weight_average(model: nn.Module, decay: float):
    """An exponential moving average of the weights and BN statistics, or None for decay 0."""
    if decay == 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _log_curve(curve: list, history: list, step: int, steps: int) -> None:
    """Every steps / _CURVE_POINTS steps: the mean of each loss since the last entry."""
    if step % max(1, steps // _CURVE_POINTS) and step != steps:
        return
    history.append({"step": step, **{k: float(np.mean([c[k] for c in curve])) for k in curve[0]}})
    curve.clear()


def _labelled_batch(ctx: AttackContext, feats: _Features, b: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    idx = rng.integers(0, len(ctx.labelled_labels), size=b)
    y = torch.from_numpy(ctx.labelled_labels[idx]).to(feats.device)
    return feats.views(ctx.labelled_images[idx], rng), y


def _supervised_step(model, ctx, feats, o, step, rng, num_classes) -> tuple[dict, int]:
    x, y = _labelled_batch(ctx, feats, o["batch_size"], rng)
    model.train()
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss}, len(x)


def _mixmatch_step(model, ctx, feats, o, step, rng, num_classes) -> tuple[dict, int]:
    """One MixMatch loss (Berthelot et al. 2019, algorithm 1) and the queries it took."""
    b, k = o["batch_size"], o["augmentations"]
    x, y = _labelled_batch(ctx, feats, b, rng)
    u_idx = rng.integers(0, len(ctx.aux_images), size=b)
    u = feats.views(np.concatenate([ctx.aux_images[u_idx]] * k), rng)    # (K * B, ...) view-major
    model.train()
    with torch.no_grad():
        guess = torch.softmax(model(u), 1).reshape(k, b, -1).mean(0)
        guess = guess ** (1 / o["temperature"])
        guess = (guess / guess.sum(1, keepdim=True)).repeat(k, 1)
    inputs = torch.cat([x, u])
    targets = torch.cat([F.one_hot(y, num_classes).float(), guess])
    lam = rng.beta(o["alpha"], o["alpha"], size=len(inputs))
    lam = torch.tensor(np.maximum(lam, 1 - lam), dtype=torch.float32, device=inputs.device)
    perm = torch.from_numpy(rng.permutation(len(inputs))).to(inputs.device)
    mixed = lam.view(-1, 1, 1, 1) * inputs + (1 - lam.view(-1, 1, 1, 1)) * inputs[perm]
    mixed_targets = lam.view(-1, 1) * targets + (1 - lam.view(-1, 1)) * targets[perm]
    logits = model(mixed)
    loss_x = -(mixed_targets[:b] * F.log_softmax(logits[:b], 1)).sum(1).mean()
    loss_u = F.mse_loss(torch.softmax(logits[b:], 1), mixed_targets[b:])
    ramp = o["rampup"] * o["steps"]
    weight = o["lambda_u"] * (min(1.0, step / ramp) if ramp else 1.0)
    return {"loss": loss_x + weight * loss_u, "loss_x": loss_x, "loss_u": loss_u,
            "weight": torch.tensor(weight)}, len(x) + len(u)


@torch.no_grad()
def _predict(model: nn.Module, batches) -> np.ndarray:
    model.eval()
    return torch.cat([model(x).cpu() for x in batches]).numpy()


# ---------------------------------------------------------------- baseline and clean accuracy


def _scratch_model(arch: dict) -> nn.Module:
    from edgeveil.training import archs

    split = archs.create(arch["arch"], in_channels=arch["in_channels"], image_size=arch["image_size"],
                         num_classes=arch["num_classes"], split=arch["split"], width=arch["width"],
                         **(arch.get("options") or {}))
    return nn.Sequential(split.head, split.tail)


def _from_scratch(ctx: AttackContext, o: dict, rng, device, bar) -> _Trained:
    """The victim's architecture, fresh weights, trained on the labelled images alone."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        model = _scratch_model(ctx.victim.arch).to(device)
    mean = ctx.aux_images.mean(axis=(0, 2, 3), keepdims=True)
    std = np.maximum(ctx.aux_images.std(axis=(0, 2, 3), keepdims=True), 1e-3)

    def to_input(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).to(device)

    optimizer = torch.optim.Adam(model.parameters(), lr=o["lr"])
    images, labels = ctx.labelled_images, torch.from_numpy(ctx.labelled_labels).to(device)
    b, curve, history = min(o["batch_size"], len(images)), [], []
    for step in range(1, o["scratch_steps"] + 1):
        idx = rng.permutation(len(images))[:b]
        model.train()
        loss = F.cross_entropy(model(to_input(_augment(images[idx], rng, o["shift"], o["flip"]))), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append({"loss": float(loss.detach())})
        _log_curve(curve, history, step, o["scratch_steps"])
        bar.update(1)
    targets = ctx.target_images
    logits = _predict(model, [to_input(targets[i:i + _EVAL_BATCH]) for i in range(0, len(targets), _EVAL_BATCH)])
    correct = (logits.argmax(1) == ctx.target_labels).astype(np.float64)
    return _Trained(correct, history, 0, time.perf_counter() - start)


def _clean_correct(ctx: AttackContext) -> np.ndarray:
    """(M,) 1.0 where the deployment's own tail classifies the received features correctly."""
    tail = ctx.victim.tail
    device = next(tail.parameters()).device
    was_training = tail.training
    try:
        logits = _predict(tail, [torch.from_numpy(ctx.target_features[i:i + _EVAL_BATCH]).to(device)
                                 for i in range(0, len(ctx.target_features), _EVAL_BATCH)])
    finally:
        tail.train(was_training)
    return (logits.argmax(1) == ctx.target_labels).astype(np.float64)
