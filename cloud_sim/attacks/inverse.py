"""Black-box inverse network (He, Zhang, Lee, ACSAC 2019, section 5), in their three query regimes.

The attacker sends images through the deployed head (query access), gets their features, trains
a decoder g: features -> images on those pairs and applies it to the features the cloud received:

    g* = argmin_g mean ||g(s(f(x))) - x||^2  (+ ssim_weight * (1 - SSIM))

Which images it queried is the option `queries` (He et al.'s Table 4 regimes):
  "same-distribution"  the attacker's auxiliary set (ctx.aux_images / aux_features), disjoint from
                       the victim's training data: the realistic default;
  "same-set"           the victim's own training images (ctx.victim_images) through victim.query:
                       the strongest setting, an upper bound;
  "noise"              uniform random pixels through victim.query (`noise_images` of them, default
                       the auxiliary set's size): an attacker without data. He et al. drew Gaussian
                       noise; uniform pixel values cover the input range a camera can produce.

s standardizes each feature channel with the training features' mean and std (applied to the
targets too). A failed attack looks like privacy (research/prototype_int8_privacy.md), so the
decoder is trained from `restarts` seeds and the one with the best loss on a held-out part of the
training pairs is kept; the targets are never used to choose. `fit_decoder` is that procedure on
any (images, features) pairs; `ka` reuses it.

    features (B, C', H', W') float32 -> decoder -> images (B, C, H, W) in [0, 1]
"""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import (FRACTION, NON_NEGATIVE, POSITIVE, Attack, AttackContext, AttackResult, ThreatModel, is_int,
                   option_problems, resolve_device)

__all__ = ["InverseAttack", "DECODER_OPTIONS", "FittedDecoder", "build_decoder", "decoder_option_problems",
           "fit_decoder", "query_features"]

_DEPTHS = ("shallow", "deep")

# The decoder and its training, shared by every attack that trains one (inverse, ka).
DECODER_OPTIONS = {
    "epochs": 30,           # passes over the training part of the pairs, per restart
    "batch_size": 64,
    "lr": 1e-3,             # Adam
    "width": 64,            # decoder channels at the feature resolution
    "depth": "shallow",     # "shallow": one conv per scale; "deep": residual blocks at every scale
    "restarts": 2,          # decoders trained from different seeds; the best on validation is kept
    "ssim_weight": 0.0,     # loss = MSE + ssim_weight * (1 - SSIM)
    "val_fraction": 0.1,    # share of the training pairs held out to pick the decoder
}

# What the attacker had, per query regime.
_THREATS = {
    "same-distribution": ThreatModel(head_weights=False, query_access=True,
                                     auxiliary_data="same-distribution", labels=0),
    "same-set": ThreatModel(head_weights=False, query_access=True, auxiliary_data="victim-training-set", labels=0),
    "noise": ThreatModel(head_weights=False, query_access=True, auxiliary_data="none", labels=0),
}


class InverseAttack(Attack):
    name = "inverse"
    description = "black-box inverse network: a decoder trained on auxiliary images queried through the head"
    paper = "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"
    threat_model = _THREATS["same-distribution"]   # an instance carries its regime's (see __init__)
    OPTIONS = {
        **DECODER_OPTIONS,
        "queries": "same-distribution",     # "same-distribution" | "same-set" | "noise" (module docstring)
        "noise_images": None,               # random images queried in the "noise" regime; None: the aux size
    }

    TINY_OPTIONS = {"epochs": 1, "batch_size": 16, "width": 8, "restarts": 1, "val_fraction": 0.25}

    def __init__(self, **options):
        super().__init__(**options)
        self.threat_model = _THREATS[self.options["queries"]]

    @property
    def wants_victim_images(self) -> bool:
        return self.options["queries"] == "same-set"

    def check_options(self, o: dict) -> list[str]:
        problems = decoder_option_problems(o)
        if o["queries"] not in _THREATS:
            problems.append(f"queries must be one of {', '.join(_THREATS)}, got {o['queries']!r}")
        if o["noise_images"] is not None and (not is_int(o["noise_images"]) or o["noise_images"] < 2):
            problems.append(f"noise_images must be null (the auxiliary set's size) or an integer >= 2, "
                            f"got {o['noise_images']!r}")
        elif o["noise_images"] is not None and o["queries"] != "noise":
            problems.append(f"noise_images applies to queries='noise' only, got queries={o['queries']!r}")
        return problems

    def fit_to(self, sizes: dict, given: set) -> tuple[dict, str | None]:
        """The decoder needs auxiliary pairs both to train on and to hold out."""
        return {}, held_out_problem("inverse", sizes["aux"], self.options["val_fraction"])

    def run(self, ctx: AttackContext) -> AttackResult:
        """Query the regime's images, fit the decoder on the pairs, invert the targets."""
        start = time.perf_counter()
        images, features = self._training_pairs(ctx)
        fit = fit_decoder(images, features, self.options, ctx.seed, ctx.device, ctx.progress, self.name)
        reconstructions = fit.invert(ctx.target_features)
        scores, summary = self.score(ctx, reconstructions)
        info = {"queries": self.options["queries"], "training_pairs": len(images), **fit.info(),
                "options": dict(self.options), "seconds": time.perf_counter() - start}
        return AttackResult(reconstructions, scores, summary, info)

    def _training_pairs(self, ctx: AttackContext) -> tuple[np.ndarray, np.ndarray]:
        """(images (N, C, H, W) in [0, 1], their features through the victim's artifact) for the regime."""
        regime = self.options["queries"]
        if regime == "same-distribution":
            return ctx.aux_images, ctx.aux_features
        if regime == "same-set":
            if ctx.victim_images is None:
                raise ValueError("inverse with queries='same-set' needs ctx.victim_images (the victim's training "
                                 "images), got None: the attack stage loads them when wants_victim_images is True")
            return ctx.victim_images, query_features(ctx, ctx.victim_images, "inverse with queries='same-set'")
        n = self.options["noise_images"] or len(ctx.aux_images)
        rng = np.random.default_rng([ctx.seed, 1])  # pixel values as a camera gives them: k / 255
        images = (rng.integers(0, 256, size=(n,) + ctx.aux_images.shape[1:]) / 255.0).astype(np.float32)
        return images, query_features(ctx, images, "inverse with queries='noise'")


def decoder_option_problems(o: dict) -> list[str]:
    """Every problem with the values of DECODER_OPTIONS in o, each naming the option and what is allowed."""
    problems = option_problems(o, dict.fromkeys(("epochs", "batch_size", "width", "restarts"), 1),
                               {"lr": POSITIVE, "ssim_weight": NON_NEGATIVE, "val_fraction": FRACTION})
    if o["depth"] not in _DEPTHS:
        problems.append(f"depth must be one of {', '.join(_DEPTHS)}, got {o['depth']!r}")
    return problems


def query_features(ctx: AttackContext, images: np.ndarray, who: str) -> np.ndarray:
    """images (N, C, H, W) in [0, 1] -> their features (N, C', H', W') float32 through ctx.victim.query."""
    if ctx.victim is None or ctx.victim.query is None:
        raise ValueError(f"{who} needs query access: ctx.victim with a query function, got "
                         f"{'no victim' if ctx.victim is None else 'a victim without query'}")
    features = np.asarray(ctx.victim.query(images), dtype=np.float32)
    expected = (len(images),) + ctx.target_features.shape[1:]
    if features.shape != expected or not np.isfinite(features).all():
        raise ValueError(f"{who}: victim.query returned {features.shape} features, expected finite {expected}")
    return features




def _restart_seed(seed: int, restart: int) -> int:
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def _progress(enabled: bool, total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="epoch", disable=not enabled, leave=False)


# ---------------------------------------------------------------- fitting


def held_out_problem(name: str, n: int, val_fraction: float) -> str | None:
    """Why n auxiliary pairs cannot be split into a training and a held-out part, or None."""
    n_val = int(round(val_fraction * n))
    if 1 <= n_val < n:
        return None
    return (f"{name} needs auxiliary pairs both to train on and to hold out: {n} auxiliary images with "
            f"val_fraction={val_fraction} hold out {n_val}")


class _Data(NamedTuple):
    z: torch.Tensor         # (N, C', H', W') raw training features on the CPU (shares the caller's memory)
    x: torch.Tensor         # (N, C, H, W) training images on the CPU
    train: torch.Tensor     # indices of the training part
    val: torch.Tensor       # indices of the held-out part that picks the decoder
    mean: torch.Tensor      # (1, C', 1, 1) per-channel statistics of z, on the attack's device
    std: torch.Tensor


class FittedDecoder(NamedTuple):
    """The decoder of the best restart, with the standardization it was trained under."""
    decoder: nn.Module      # eval mode, on `device`
    data: _Data
    runs: list              # one _Restart per seed
    best: int               # index of the kept restart
    batch_size: int
    device: torch.device

    def invert(self, features: np.ndarray) -> np.ndarray:
        """features (M, C', H', W') -> reconstructions (M, C, H, W) float32 in [0, 1]."""
        return _predict(self.decoder, self.data, np.asarray(features, np.float32), self.batch_size, self.device)

    def info(self) -> dict:
        best = self.runs[self.best]
        return {"best_restart": self.best, "best_val_loss": best.val_loss, "best_epoch": best.best_epoch,
                "restarts": [{"seed": r.seed, "val_loss": r.val_loss, "best_epoch": r.best_epoch,
                              "history": r.history} for r in self.runs],
                "train_images": len(self.data.train), "val_images": len(self.data.val),
                "feature_standardization": "per channel, training-feature mean and std",
                "device": str(self.device)}


def fit_decoder(images: np.ndarray, features: np.ndarray, o: dict, seed: int, device: str = "auto",
                progress: bool = False, name: str = "inverse") -> FittedDecoder:
    """Train o["restarts"] decoders features -> images (options as DECODER_OPTIONS), keep the best.

    images (N, C, H, W) in [0, 1] and their features (N, C', H', W'), float32. A seeded
    val_fraction of the pairs is held out; each restart keeps its best epoch on it, and the
    restart with the lowest held-out loss wins.
    """
    device = resolve_device(device)
    images, features = np.asarray(images, np.float32), np.asarray(features, np.float32)
    data = _prepare(images, features, o, seed, device, name)
    runs = []
    with _progress(progress, o["restarts"] * o["epochs"], name) as bar:
        for r in range(o["restarts"]):
            runs.append(_train_restart(data, o, _restart_seed(seed, r), device, bar))
    best = min(range(len(runs)), key=lambda r: runs[r].val_loss)
    if not np.isfinite(runs[best].val_loss):
        raise RuntimeError(f"{name}: every decoder diverged (lr={o['lr']}); try a lower lr")
    decoder = _new_decoder(data, o).to(device)
    decoder.load_state_dict(runs[best].state)
    return FittedDecoder(decoder.eval(), data, runs, best, o["batch_size"], device)


def _prepare(images: np.ndarray, features: np.ndarray, o: dict, seed: int, device, name: str) -> _Data:
    """Hold out a seeded part of the pairs; per-channel statistics of the training features."""
    n, (h, w) = len(images), images.shape[2:]
    if len(features) != n:
        raise ValueError(f"{name}: {n} images but {len(features)} features")
    n_val = int(round(o["val_fraction"] * n))
    if not 1 <= n_val < n:
        raise ValueError(f"{name} needs training pairs for both training and validation: {n} pairs "
                         f"with val_fraction={o['val_fraction']} leaves {n_val} for validation")
    if o["ssim_weight"] > 0 and min(h, w) < 11:
        raise ValueError(f"ssim_weight needs images of at least 11x11 (the SSIM window), got {h}x{w}")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    mean = features.mean(axis=(0, 2, 3), dtype=np.float64)
    std = features.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(std, max(1e-3 * float(np.median(std)), 1e-8))  # dead channels stay ~0, not huge
    stats = [torch.tensor(v, dtype=torch.float32, device=device).reshape(1, -1, 1, 1) for v in (mean, std)]
    return _Data(_tensor(features), _tensor(images), order[n_val:], order[:n_val], *stats)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing a's memory; read-only arrays (memory maps) are fine: nothing writes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _standardize(z: torch.Tensor, data: _Data, device) -> torch.Tensor:
    return (z.to(device) - data.mean) / data.std


class _Restart(NamedTuple):
    seed: int
    state: dict | None      # the decoder's weights at its best validation epoch
    val_loss: float
    best_epoch: int
    history: list


def _new_decoder(data: _Data, o: dict) -> nn.Module:
    return build_decoder(tuple(data.z.shape[1:]), tuple(data.x.shape[1:]), o["width"], o["depth"])


def _train_restart(data: _Data, o: dict, seed: int, device, bar) -> _Restart:
    """One decoder from one seed; returns its weights at the epoch with the lowest validation loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = _new_decoder(data, o).to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=o["lr"])
    generator = torch.Generator().manual_seed(seed)
    best, history = _Restart(seed, None, float("inf"), 0, []), []
    for epoch in range(1, o["epochs"] + 1):
        train_loss = _train_epoch(decoder, optimizer, data, o, generator, device)
        val_loss = _evaluate(decoder, data, o, device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best.val_loss:  # NaN never wins
            state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
            best = _Restart(seed, state, val_loss, epoch, history)
        bar.update(1)
        bar.set_postfix(seed=seed, val_loss=f"{val_loss:.4g}")
    return best._replace(history=history)


def _loss(rec: torch.Tensor, x: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = F.mse_loss(rec, x)
    if ssim_weight > 0:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        loss = loss + ssim_weight * (1 - ssim(rec, x, data_range=1.0))
    return loss


def _train_epoch(decoder, optimizer, data: _Data, o: dict, generator, device) -> float:
    decoder.train()
    order, total = data.train[torch.randperm(len(data.train), generator=generator)], 0.0
    for i in range(0, len(order), o["batch_size"]):
        idx = order[i:i + o["batch_size"]]
        rec = decoder(_standardize(data.z[idx], data, device))
        loss = _loss(rec, data.x[idx].to(device), o["ssim_weight"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(order)


@torch.no_grad()
def _evaluate(decoder, data: _Data, o: dict, device) -> float:
    decoder.eval()
    total, b = 0.0, o["batch_size"]
    for i in range(0, len(data.val), b):
        idx = data.val[i:i + b]
        rec = decoder(_standardize(data.z[idx], data, device))
        total += float(_loss(rec, data.x[idx].to(device), o["ssim_weight"])) * len(idx)
    return total / len(data.val)


@torch.no_grad()
def _predict(decoder, data: _Data, features: np.ndarray, batch_size: int, device) -> np.ndarray:
    decoder.eval()
    out = [decoder(_standardize(_tensor(features[i:i + batch_size]), data, device)).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- the decoder


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_block(c, c), nn.Conv2d(c, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class _Decoder(nn.Module):
    def __init__(self, stem: nn.Module, stages: nn.ModuleList, out: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.stem, self.stages, self.out, self.size = stem, stages, out, size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(z)
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2, mode="nearest"))
        if tuple(x.shape[-2:]) != self.size:  # ratios that are not powers of two
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(x))


def build_decoder(feature_shape: tuple[int, int, int], image_shape: tuple[int, int, int],
                  width: int = 64, depth: str = "shallow") -> nn.Module:
    """Decoder (B, C', H', W') -> (B, C, H, W) in [0, 1] for any up-sampling ratio.

    One nearest-neighbour x2 up-sampling + conv stage per doubling that fits in H/H' (channels
    halve, down to 16), a bilinear resize for what is left, a 3x3 conv and a sigmoid.
    "deep" adds two residual blocks at the feature resolution and one after every stage.
    """
    if depth not in _DEPTHS:
        raise ValueError(f"depth must be one of {', '.join(_DEPTHS)}, got {depth!r}")
    (c_feat, h_feat, w_feat), (c_img, h_img, w_img) = feature_shape, image_shape
    doublings = 0
    while h_feat * 2 ** (doublings + 1) <= h_img and w_feat * 2 ** (doublings + 1) <= w_img:
        doublings += 1
    deep = depth == "deep"
    stem = [_conv_block(c_feat, width)] + ([_Residual(width), _Residual(width)] if deep else [])
    stages, c = [], width
    for _ in range(doublings):
        c_next = max(c // 2, min(16, width))
        stages.append(nn.Sequential(_conv_block(c, c_next), *([_Residual(c_next)] if deep else [])))
        c = c_next
    return _Decoder(nn.Sequential(*stem), nn.ModuleList(stages), nn.Conv2d(c, c_img, 3, padding=1),
                    (h_img, w_img))
