"""Query-free inversion through a shadow head (He, Zhang, Lee, ACSAC 2019, section 6).

The attacker cannot see the head's weights and cannot query it. It runs the tail (the cloud owns
it), holds labelled data from the training distribution (the auxiliary images and their labels)
and knows the head's architecture. It trains a head of that architecture from fresh weights so
that the frozen tail classifies the labelled data through it,

    g* = argmin_g mean CE(tail(g(x)), y)        tail frozen, in eval mode

so g learns to speak the tail's language, and then inverts the received features through g with
rMLE (rmle.invert, white-box on g).

Choices where the paper is silent:

* The shadow head takes the victim's input normalization (model.json's mean and std, part of
  the input spec the attacker must match anyway) and is built with the victim's architecture
  (victim.arch); He et al. also try a different architecture, which does worse.
* A seeded part of the labelled auxiliary set (val_fraction) is held out: the shadow head's
  accuracy through the tail on it says whether the shadow learned anything (chance is
  1/num_classes). The shadow head kept is the one after the last epoch.
* The inversion's TV weight defaults to 0.5, ten times rmle's: the shadow only approximates the
  head, so the prior matters more (measured with 64 targets: digits smallcnn width 0.5 split 2,
  SSIM 0.71 at 0.05 and 0.81 at 0.5; CIFAR-10 smallcnn split 2, 0.50 and 0.69).
* Integer artifacts: the features are fake-quantized with the output scale and zero point, which
  travel in every frame, and the manifest's runtime noise is averaged over as in rmle. The input
  is not fake-quantized: the shadow head is the attacker's own float model, not the artifact.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rmle
from .base import (FRACTION, POSITIVE, Attack, AttackContext, AttackResult, ThreatModel, Victim, option_problems,
                   resolve_device)

__all__ = ["ShadowAttack", "train_shadow_head"]


class ShadowAttack(Attack):
    name = "shadow"
    description = "query-free: a shadow head trained through the frozen tail on labelled data, then inverted"
    paper = "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"
    # labels: as many as the auxiliary set has (data dependent); info["labels"] gives the count used.
    threat_model = ThreatModel(head_weights=False, query_access=False, auxiliary_data="labelled", labels=0)
    OPTIONS = {
        "shadow_epochs": 20,        # passes over the labelled training part
        "shadow_lr": 1e-3,          # Adam, shadow head only (the tail stays frozen)
        "shadow_batch_size": 64,
        "val_fraction": 0.1,        # share of the labelled auxiliary set held out to measure the shadow
        **rmle.RmleAttack.OPTIONS,  # the inversion through the shadow head (see rmle), except:
        "tv_weight": 0.5,           # a stronger prior than rmle's: the shadow only approximates the head
    }

    TINY_OPTIONS = {"shadow_epochs": 1, "shadow_batch_size": 16, "val_fraction": 0.25, "steps": 3, "restarts": 1,
                    "batch_size": 16, "noise_draws": 1}

    def check_options(self, o: dict) -> list[str]:
        problems = option_problems(o, {"shadow_epochs": 1, "shadow_batch_size": 1},
                                   {"shadow_lr": POSITIVE, "val_fraction": FRACTION})
        return problems + rmle.check_inversion_options(o)

    def fit_to(self, sizes: dict, given: set) -> tuple[dict, str | None]:
        """The shadow head trains on the labelled auxiliary set and is measured on a held-out part."""
        from .inverse import held_out_problem

        return {}, held_out_problem("shadow", sizes["aux"], self.options["val_fraction"])

    def run(self, ctx: AttackContext) -> AttackResult:
        """Train the shadow head through the tail on the labelled aux data, then invert the targets."""
        start = time.perf_counter()
        victim, o = _victim(ctx), self.options
        device = resolve_device(ctx.device)
        train, val = _split(len(ctx.aux_images), o["val_fraction"], ctx.seed)
        shadow, history = train_shadow_head(victim, ctx.aux_images[train], ctx.aux_labels[train], o,
                                            seed=ctx.seed, device=device, progress=ctx.progress)
        accuracy = _accuracy(shadow, victim, ctx.aux_images[val], ctx.aux_labels[val], device)
        inversion = {k: o[k] for k in rmle.RmleAttack.OPTIONS}
        model = rmle.surrogate(victim, head=shadow, input_quant=False)
        reconstructions, info = rmle.invert(model, ctx.target_features, ctx.aux_images.shape[1:], inversion,
                                            seed=ctx.seed, device=device, progress=ctx.progress,
                                            desc="shadow inversion")
        scores, summary = self.score(ctx, reconstructions)
        info.update(labels=len(ctx.aux_labels), shadow_train_images=len(train),
                    shadow_val_images=len(val), shadow_val_accuracy=accuracy,
                    chance_accuracy=1.0 / int(victim.arch["num_classes"]), shadow_history=history,
                    shadow_arch=dict(victim.arch), precision=victim.precision, device=str(device),
                    options=dict(o), seconds=time.perf_counter() - start)
        return AttackResult(reconstructions, scores, summary, info)


def _victim(ctx: AttackContext) -> Victim:
    """The victim's tail and architecture, and labelled auxiliary data; refused clearly without them."""
    v = ctx.victim
    missing = [what for what, absent in (
        ("ctx.victim (the deployment: tail, architecture, normalization)", v is None),
        ("victim.tail (the cloud's own tail)", v is not None and v.tail is None),
        ("victim.arch (the head's architecture, from model.json)", v is not None and v.arch is None),
        ("ctx.aux_labels (labels of the auxiliary images)", ctx.aux_labels is None)) if absent]
    if missing:
        raise ValueError("shadow cannot run, it lacks " + "; ".join(missing))
    k, labels = int(v.arch["num_classes"]), ctx.aux_labels
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"aux_labels must be class indices in 0..{k - 1} (victim.arch num_classes {k}), "
                         f"got values in {labels.min()}..{labels.max()}")
    return v




def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of the labelled auxiliary set, a seeded permutation."""
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"shadow needs labelled auxiliary images to train and to measure the shadow head: "
                         f"{n} images with val_fraction={val_fraction} leaves {n_val} held out")
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------- the shadow head


def train_shadow_head(victim: Victim, images: np.ndarray, labels: np.ndarray, o: dict, *, seed: int,
                      device, progress: bool) -> tuple[nn.Module, list]:
    """A fresh head of victim.arch trained so that the frozen victim.tail classifies `images`.

    images (N, C, H, W) in [0, 1], labels (N,) int64; o: shadow_epochs, shadow_lr,
    shadow_batch_size. Returns the head in eval mode and the per-epoch history (loss, accuracy).
    """
    from tqdm.auto import tqdm

    from edgeveil.training import archs

    a = victim.arch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = archs.create(a["arch"], in_channels=a["in_channels"], image_size=a["image_size"],
                            num_classes=a["num_classes"], split=a["split"], width=a["width"],
                            **a.get("options", {})).head.to(device)
    tail = _frozen(victim.tail, device)
    norm = _Normalize(victim.mean, victim.std).to(device)
    x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels))
    optimizer = torch.optim.Adam(head.parameters(), lr=o["shadow_lr"])
    generator = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=o["shadow_epochs"], desc="shadow head", unit="epoch", disable=not progress, leave=False)
    with bar:
        for epoch in range(1, o["shadow_epochs"] + 1):
            loss, acc = _epoch(head, tail, norm, optimizer, x, y, o["shadow_batch_size"], generator, device)
            history.append({"epoch": epoch, "loss": loss, "accuracy": acc})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}", acc=f"{acc:.2f}")
    return head.eval(), history


def _epoch(head, tail, norm, optimizer, x, y, batch_size: int, generator, device) -> tuple[float, float]:
    """One pass in a seeded order; returns the mean cross-entropy and the training accuracy."""
    head.train()
    order, total, correct = torch.randperm(len(x), generator=generator), 0.0, 0
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        logits = tail(head(norm(xb)))
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
    return total / len(x), correct / len(x)


@torch.no_grad()
def _accuracy(head, victim: Victim, images: np.ndarray, labels: np.ndarray, device) -> float:
    """Top-1 accuracy of tail(shadow(x)) on held-out labelled images."""
    tail, norm = _frozen(victim.tail, device), _Normalize(victim.mean, victim.std).to(device)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    pred = torch.cat([tail(head(norm(x[i:i + 256]))).argmax(1) for i in range(0, len(x), 256)])
    return float((pred.cpu().numpy() == labels).mean())


def _frozen(module: nn.Module, device) -> nn.Module:
    """A copy in eval mode without gradients: the victim's own module is never touched."""
    return copy.deepcopy(module).to(device).eval().requires_grad_(False)


class _Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
