"""MINE (Belghazi et al., ICML 2018): how much the received features say about the input, in nats.

A diagnostic for the evaluator, not an attack: it pairs every target image with the features the
cloud received for it, which is ground truth no attacker holds. Its threat model says so.

A critic T(x, z) -> R, unbounded, is trained to maximize the Donsker-Varadhan lower bound

    I(X; Z) >= E_p(x,z)[T] - log E_p(x)p(z)[exp T]

on the pairs (x_i, z_i) against mismatched pairs (x_i, z_j), i != j. T embeds the image (two
stride-2 convolutions) and the features (one convolution) separately, each pooled to 4x4 and
mapped to `width` numbers, and scores the concatenation with an MLP whose last layer is linear
(a sigmoid output caps the bound at 1 nat: research/algorithms.md, section 3.5). The embeddings
are computed once per batch, so every mismatched pair of a batch, B(B - 1) of them, serves as a
sample of the product of marginals, rather than one shuffle of B.

The gradient of log E[exp T] on a batch is biased; as Belghazi et al. do, its denominator is a
moving average across batches (rate `ema`, 0.01 in the paper), kept in the log domain because T
is unbounded. The value reported is the bound itself, evaluated with the final critic on a held-out
part of the pairs (`val_fraction`, seeded, never trained on), one value per held-out batch of
`batch_size` pairs: the mean over batches, and a 95% bootstrap interval over them. Estimates
depend on the feature shape and the number of pairs, so compare them within a sweep only (float
against int8, defended against undefended on the same targets).

    target_images (M, C, H, W) in [0, 1], target_features (M, C', H', W') -> summary["mi"] in nats
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import FRACTION, POSITIVE, Attack, AttackContext, AttackResult, ThreatModel, option_problems, resolve_device

__all__ = ["MineEstimate"]


@dataclass(frozen=True)
class _Diagnostic(ThreatModel):
    """Not an attacker's capability: the evaluator's ground truth."""

    def describe(self) -> str:
        return ("diagnostic, not an attack: the evaluator's ground truth (each target image with the "
                "features received for it); no head weights, no queries, no auxiliary data, 0 labels")


class MineEstimate(Attack):
    name = "mine"
    description = "diagnostic: a Donsker-Varadhan estimate of the mutual information between inputs and features"
    paper = "Belghazi et al.: Mutual information neural estimation (ICML 2018)"
    threat_model = _Diagnostic(head_weights=False, query_access=False, auxiliary_data="none", labels=0)
    OPTIONS = {
        "epochs": 100,          # passes over the training part of the pairs
        "batch_size": 64,       # pairs per batch, in training and per held-out estimate
        "lr": 1e-3,             # Adam
        "width": 64,            # embedding size of each encoder
        "ema": 0.01,            # moving-average rate of the bias-corrected denominator
        "val_fraction": 0.5,    # share of the pairs held out for the estimate
    }

    TINY_OPTIONS = {"epochs": 1, "batch_size": 8, "width": 8}

    def check_options(self, o: dict) -> list[str]:
        return option_problems(o, {"epochs": 1, "width": 1, "batch_size": 4},
                               {"ema": FRACTION, "val_fraction": FRACTION, "lr": POSITIVE})

    def fit_to(self, sizes: dict, given: set) -> tuple[dict, str | None]:
        """Both halves of the target pairs must hold a batch: scale batch_size down to fit, to 4 at least."""
        n, o = sizes["targets"], self.options
        n_val = int(round(o["val_fraction"] * n))
        room = min(n_val, n - n_val)
        if room >= o["batch_size"]:
            return {}, None
        if "batch_size" in given or room < 4:
            return {}, (f"mine needs batch_size={o['batch_size'] if 'batch_size' in given else 4} pairs on each "
                        f"side, and {n} targets with val_fraction={o['val_fraction']} give {room}")
        return {"batch_size": room}, None

    def run(self, ctx: AttackContext) -> AttackResult:
        """Train the critic on one part of the target pairs, estimate the bound on the other."""
        start, o = time.perf_counter(), self.options
        if ctx.target_images is None:
            raise ValueError("mine needs ctx.target_images: it pairs each target image with its features "
                             "(an evaluator's diagnostic that uses ground truth)")
        device = resolve_device(ctx.device)
        x, z, train, val = _prepare(ctx, o, device)
        seed = int(np.random.SeedSequence([ctx.seed, 3]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            critic = _Critic(x.shape[1:], z.shape[1:], o["width"]).to(device)
        curve = _train(critic, x, z, train, val, o, torch.Generator().manual_seed(seed), ctx.progress)
        values = _held_out(critic, x, z, val, o["batch_size"])
        from .. import metrics

        mean, lo, hi = metrics.bootstrap_ci(values, seed=ctx.seed)
        summary = {"mi": {"mean": mean, "ci95": [lo, hi], "n": len(values), "unit": "nats"}}
        info = {"train_pairs": len(train), "val_pairs": len(val), "val_batches": len(values),
                "scores": "mi: one Donsker-Varadhan value per held-out batch (not per image)",
                "curve": curve, "seed": seed, "device": str(device), "options": dict(o),
                "seconds": time.perf_counter() - start}
        return AttackResult(None, {"mi": values}, summary, info)




def _prepare(ctx: AttackContext, o: dict, device):
    """Standardized images and features on the device, and the seeded train / held-out indices."""
    n = len(ctx.target_features)
    n_val = int(round(o["val_fraction"] * n))
    if n_val < o["batch_size"] or n - n_val < o["batch_size"]:
        raise ValueError(f"mine needs at least batch_size={o['batch_size']} pairs on each side: {n} target "
                         f"pairs with val_fraction={o['val_fraction']} give {n - n_val} to train, {n_val} held out")
    order = np.random.default_rng(ctx.seed).permutation(n)
    train, val = np.sort(order[n_val:]), np.sort(order[:n_val])
    x, z = (_standardized(a, train).to(device) for a in (ctx.target_images, ctx.target_features))
    return x, z, torch.from_numpy(train), torch.from_numpy(val)


def _standardized(a: np.ndarray, train: np.ndarray) -> torch.Tensor:
    """(a - mean) / std per channel, statistics of the training part; dead channels stay ~0."""
    part = a[train]
    mean, std = part.mean(axis=(0, 2, 3), keepdims=True), part.std(axis=(0, 2, 3), keepdims=True)
    std = np.maximum(std, max(1e-3 * float(np.median(std)), 1e-8))
    return torch.from_numpy(((a - mean) / std).astype(np.float32))


# ---------------------------------------------------------------- the critic


def _encoder(channels: int, width: int, stride: int, depth: int) -> nn.Sequential:
    layers, c = [], channels
    for i in range(depth):
        layers += [nn.Conv2d(c, 16 * 2 ** i, 3, stride=stride, padding=1), nn.ReLU()]
        c = 16 * 2 ** i
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, width))


class _Critic(nn.Module):
    """T(x_i, z_j) for every i, j of a batch: (B, C, H, W), (B, C', H', W') -> (B, B), unbounded."""

    def __init__(self, image_shape, feature_shape, width: int):
        super().__init__()
        self.image = _encoder(image_shape[0], width, stride=2, depth=2)
        self.feature = _encoder(feature_shape[0], width, stride=1, depth=1)
        self.score = nn.Sequential(nn.ReLU(), nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ex, ez = self.image(x), self.feature(z)
        b = len(ex)
        both = torch.cat([ex[:, None].expand(b, b, -1), ez[None].expand(b, b, -1)], dim=-1)
        return self.score(both).squeeze(-1)


def _bound(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of T on the B matched pairs, log-mean-exp of T on the B(B - 1) mismatched ones)."""
    b = len(t)
    off = t[~torch.eye(b, dtype=torch.bool, device=t.device)]
    return t.diagonal().mean(), torch.logsumexp(off, 0) - math.log(b * (b - 1))


# ---------------------------------------------------------------- training and the estimate


def _train(critic, x, z, train, val, o: dict, generator, progress: bool) -> list[dict]:
    """Adam on the bias-corrected DV objective; the curve holds train and held-out DV per epoch."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(critic.parameters(), lr=o["lr"])
    log_ma, curve, b = None, [], o["batch_size"]
    for epoch in tqdm(range(1, o["epochs"] + 1), desc="mine", unit="epoch", disable=not progress, leave=False):
        critic.train()
        order, values = train[torch.randperm(len(train), generator=generator)], []
        for i in range(0, len(order) - b + 1, b):  # full batches: the bound's bias depends on B
            idx = order[i:i + b]
            joint, lme = _bound(critic(x[idx], z[idx]))
            log_ma = _moving_log_mean(log_ma, lme.detach(), o["ema"])
            loss = -(joint - torch.exp(lme - log_ma))  # gradient: E_p[dT] - E_q[e^T dT] / moving E_q[e^T]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            values.append(float((joint - lme).detach()))
        curve.append({"epoch": epoch, "train_mi": float(np.mean(values)),
                      "val_mi": float(np.mean(_held_out(critic, x, z, val, b)))})
    return curve


def _moving_log_mean(log_ma, lme: torch.Tensor, rate: float) -> torch.Tensor:
    """log of the moving average of E_q[e^T]: log((1 - rate) * ma + rate * mean e^T)."""
    if log_ma is None:
        return lme
    return torch.logaddexp(log_ma + math.log1p(-rate), lme + math.log(rate))


@torch.no_grad()
def _held_out(critic, x, z, val: torch.Tensor, batch_size: int) -> np.ndarray:
    """The DV bound on each held-out batch: len(val) // batch_size batches of near-equal size."""
    critic.eval()
    out = []
    for idx in np.array_split(val.numpy(), max(1, len(val) // batch_size)):
        joint, lme = _bound(critic(x[idx], z[idx]))
        out.append(float(joint - lme))
    return np.array(out)
