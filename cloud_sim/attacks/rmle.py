"""White-box regularized maximum-likelihood inversion, rMLE (He, Zhang, Lee, ACSAC 2019, section 4).

The attacker holds the head's weights and the features z the cloud received. For every target it
searches the image whose features match z, under a total-variation prior:

    x* = argmin_{x in [0, 1]}  mean (F(x) - z)^2  +  tv_weight * TV(x)
    F(x) = Q_out(head(Q_in((x - mean) / std)))      Q: fake quantization (integer artifacts only)
    TV(x) = mean over channels and pixels of sqrt(dx^2 + dy^2 + 1e-8)      (the paper's beta = 1)

Choices where the paper is silent or where the deployment differs from its float setting:

* Projected Adam on the pixels: after every step x is clipped to [0, 1]. (A sigmoid
  reparameterization was tried and left: it cannot reach the exact 0 of a digit's background,
  and the residual there cost 0.1 SSIM.) Restart 0 starts from constant gray 0.5 (the paper's
  initialisation), later ones from seeded uniform noise.
* The feature term is the per-element mean and TV the per-pixel mean, so tv_weight does not
  depend on the image or feature size. Targets are optimized in batches, each image on its own
  loss (the batch loss is the per-image sum).
* Restarts: per image, the restart with the lowest final feature-matching loss is kept. The
  ground truth is never looked at.
* Integer artifacts: the head is a float copy of the deployed one (the TFLite head is not
  differentiable). The normalized input is fake-quantized with the artifact's input qparams and
  the output with its output qparams: round half away from zero, clip to [qmin, qmax], and a
  straight-through gradient (identity, also across the clip, so an overshoot can be pulled back).
  The int8 rounding of every intermediate layer and the per-channel int8 weights are not
  modelled, only the input and output quantization the manifest records; the float head stands
  in for the integer kernels in between (the export's parity check puts that mismatch at a mean
  of 0.3 and a maximum of 3 to 4 output steps on the digits heads). Measured on a real int8
  TFLite digits head (smallcnn, width 0.5, split 2), the I/O fake quantization changes little:
  SSIM 0.968 with it, 0.972 with the plain float head (research/algorithms.md 8.2 expects this).
* Runtime noise (manifest `inference_noise`): the feature loss is averaged over `noise_draws`
  draws each step (expectation over transformation). Gaussian and Laplace are drawn in float
  feature units, dropout sets a feature to 0.0, and a `clip_norm` first scales each image's
  features down to that norm, as on the device. For integer artifacts the noise is added to the
  fake-quantized features, which are quantized again on the grid the device sends them on
  (the manifest's `sent`: widened for noise of a step or more), as add_quantized_noise does.

He et al. report SSIM 0.9969 / 0.5998 on MNIST (LeNet, split conv1 / ReLU2) and 0.9960 / 0.6940 /
0.1625 on CIFAR-10 (split conv11 / ReLU22 / ReLU32). With the defaults here, on 32 to 64 held-out
images: digits smallcnn split 2 (32x14x14) 0.999; CIFAR-10 smallcnn split 2 (32x16x16) 0.979 and
split 3 (64x8x8) 0.904; CIFAR-10 resnet18 width 0.25 split 1 0.993.

    target features (M, C', H', W') float32 -> reconstructions (M, C, H, W) in [0, 1]
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from edgeveil.device.noise import check_noise_spec

from .base import (NON_NEGATIVE, POSITIVE, Attack, AttackContext, AttackResult, ThreatModel, Victim, option_problems,
                   resolve_device)

__all__ = ["RmleAttack", "Surrogate", "surrogate", "invert", "fake_quantize", "check_inversion_options"]

_TV_EPS = 1e-8


class RmleAttack(Attack):
    name = "rmle"
    description = "white-box regularized optimization of an input whose features match the received ones"
    paper = "He, Zhang, Lee: Model inversion attacks against collaborative inference (ACSAC 2019)"
    threat_model = ThreatModel(head_weights=True, query_access=False, auxiliary_data="none", labels=0)
    OPTIONS = {
        "steps": 500,           # Adam steps per batch and restart (the paper: 500 for shallow splits)
        "lr": 0.05,             # Adam, on the pixels (projected to [0, 1] after every step)
        "tv_weight": 0.05,      # weight of the total-variation prior
        "restarts": 2,          # restart 0 from gray, later ones from seeded random images
        "batch_size": 128,      # targets optimized together
        "noise_draws": 4,       # runtime-noise draws per step (used only when the victim adds noise)
    }

    TINY_OPTIONS = {"steps": 3, "restarts": 1, "batch_size": 16, "noise_draws": 1}

    def check_options(self, o: dict) -> list[str]:
        return check_inversion_options(o)

    def run(self, ctx: AttackContext) -> AttackResult:
        """Invert every target through the white-box head; per image, the best restart is kept.

        Only the shape of ctx.aux_images is used (it is the input spec), never its pixels."""
        start = time.perf_counter()
        victim = _white_box_victim(ctx)
        device = resolve_device(ctx.device)
        model = surrogate(victim)
        reconstructions, info = invert(model, ctx.target_features, ctx.aux_images.shape[1:], self.options,
                                       seed=ctx.seed, device=device, progress=ctx.progress)
        scores, summary = self.score(ctx, reconstructions)
        info.update(precision=victim.precision, device=str(device), options=dict(self.options),
                    seconds=time.perf_counter() - start)
        return AttackResult(reconstructions, scores, summary, info)


def _white_box_victim(ctx: AttackContext) -> Victim:
    if ctx.victim is None:
        raise ValueError("rmle is a white-box attack: the context has no victim (ctx.victim is None); "
                         "it needs the victim's head weights and input normalization")
    if ctx.victim.head is None:
        raise ValueError(f"rmle is a white-box attack: the {ctx.victim.precision} victim has no head "
                         "(victim.head is None); it needs the float PyTorch head behind the artifact")
    return ctx.victim


def check_inversion_options(o: dict) -> list[str]:
    """Problems with the inversion options (steps, lr, tv_weight, restarts, batch_size, noise_draws)."""
    return option_problems(o, dict.fromkeys(("steps", "restarts", "batch_size", "noise_draws"), 1),
                           {"lr": POSITIVE, "tv_weight": NON_NEGATIVE})




# ---------------------------------------------------------------- the model that is inverted


def fake_quantize(x: torch.Tensor, q: dict) -> torch.Tensor:
    """Quantize-dequantize with q = {"scale", "zero_point", "qmin", "qmax"} as TFLite does
    (round half away from zero, clip); the gradient passes straight through (identity)."""
    with torch.no_grad():
        v = x / q["scale"]
        codes = (torch.sign(v) * torch.floor(v.abs() + 0.5) + q["zero_point"]).clamp(q["qmin"], q["qmax"])
        dequantized = (codes - q["zero_point"]) * q["scale"]
    return dequantized + (x - x.detach())  # the value is exactly `dequantized`, the gradient x's


class Surrogate(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> the features the deployment sends, (B, C', H', W').

    head: a frozen copy of the given float head (eval mode); mean, std: the head's input
    normalization per channel; input_quant / output_quant: qparams of an integer artifact
    (None: float); noise: the runtime noise spec (None: none); sent_quant: qparams of the grid the
    noisy codes are sent on (the manifest's `sent`; needed with noise on an integer artifact). forward(x, generator) adds a
    draw of the noise when given a torch.Generator, and is deterministic without one.
    """

    def __init__(self, head: nn.Module, mean, std, input_quant: dict | None = None,
                 output_quant: dict | None = None, noise: dict | None = None,
                 sent_quant: dict | None = None):
        super().__init__()
        self.head = copy.deepcopy(head).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.input_quant, self.output_quant = input_quant, output_quant
        self.noise = check_noise_spec(noise, "victim.noise")
        if output_quant is not None and self.noise is not None and sent_quant is None:
            raise ValueError("victim.sent_quant is missing: with inference noise on an integer artifact the "
                             "surrogate needs the grid the codes are sent on (the manifest entry's `sent`)")
        self.sent_quant = output_quant if sent_quant is None else sent_quant  # the grid noisy codes are sent on

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.clean(x)
        if generator is None or self.noise is None:
            return z
        return self.noisy(z, generator)

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output codes, dequantized: deterministic, before any runtime noise."""
        h = (x - self.mean) / self.std
        if self.input_quant is not None:
            h = fake_quantize(h, self.input_quant)
        z = self.head(h)
        return z if self.output_quant is None else fake_quantize(z, self.output_quant)

    def noisy(self, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw of the runtime noise on clean(x), as the device adds it (the noise must be set)."""
        kind = self.noise["kind"]
        if self.noise.get("clip_norm") is not None:  # the device scales each image down to the norm first
            flat = z.flatten(1)
            norms = flat.abs().sum(1) if self.noise["clip_ord"] == 1 else flat.norm(dim=1)
            factor = (self.noise["clip_norm"] / norms.clamp_min(1e-12)).clamp(max=1.0)
            z = z * factor.reshape(-1, *([1] * (z.dim() - 1)))
        if kind == "dropout":
            keep = torch.rand(z.shape, generator=generator, device=z.device) >= self.noise["p"]
            return z * keep
        if kind == "gaussian":
            n = torch.randn(z.shape, generator=generator, device=z.device) * self.noise["sigma"]
        else:  # laplace, scale b = sigma: inverse CDF of a uniform draw in (-1/2, 1/2)
            u = torch.rand(z.shape, generator=generator, device=z.device).clamp(1e-7, 1 - 1e-7) - 0.5
            n = -self.noise["sigma"] * torch.sign(u) * torch.log1p(-2 * u.abs())
        z = z + n
        return z if self.sent_quant is None else fake_quantize(z, self.sent_quant)


def surrogate(victim: Victim, head: nn.Module | None = None, input_quant: bool = True) -> Surrogate:
    """The differentiable stand-in for the victim's artifact: its head (or `head`), normalization,
    I/O fake quantization (input only with input_quant=True) and runtime noise."""
    return Surrogate(victim.head if head is None else head, victim.mean, victim.std,
                     victim.input_quant if input_quant else None, victim.output_quant, victim.noise,
                     victim.sent_quant)


# ---------------------------------------------------------------- the optimization


def invert(model: Surrogate, targets: np.ndarray, image_shape: tuple, options: dict, *, seed: int,
           device, progress: bool, desc: str = "rmle") -> tuple[np.ndarray, dict]:
    """Reconstructions (M, *image_shape) in [0, 1] of targets (M, C', H', W') and an info dict.

    options: steps, lr, tv_weight, restarts, batch_size, noise_draws (see RmleAttack.OPTIONS).
    """
    o, model = options, model.to(device)
    b, n = o["batch_size"], len(targets)
    best_x = np.zeros((n, *image_shape), np.float32)
    best_loss = np.full(n, np.inf)
    finals = np.zeros((o["restarts"], n))
    with _progress(progress, desc, o["restarts"] * o["steps"] * -(-n // b)) as bar:
        for i in range(0, n, b):
            z = torch.as_tensor(targets[i:i + b], dtype=torch.float32, device=device)
            for r in range(o["restarts"]):
                x = _optimize(model, z, image_shape, o, _seed(seed, i // b, r), r, bar)
                loss = _final_loss(model, x, z, o, _seed(seed, i // b, 0, stream=1))
                x, loss = x.cpu().numpy(), loss.cpu().numpy().astype(np.float64)
                better = loss < best_loss[i:i + b]
                best_x[i:i + b][better], best_loss[i:i + b][better] = x[better], loss[better]
                finals[r, i:i + b] = loss
    if not np.isfinite(best_loss).all():
        raise RuntimeError(f"{desc}: the optimization diverged for {int((~np.isfinite(best_loss)).sum())} of "
                           f"{n} targets in every restart (lr={o['lr']}); try a lower lr")
    noisy = model.noise is not None
    info = {"steps": o["steps"], "restart_feature_losses": [float(f.mean()) for f in finals],
            "chosen_restart_counts": np.bincount(finals.argmin(axis=0), minlength=o["restarts"]).tolist(),
            "final_feature_loss": float(best_loss.mean()),
            "fake_quantization": {"input": model.input_quant is not None, "output": model.output_quant is not None},
            "noise_averaging": {"kind": model.noise["kind"], "draws": o["noise_draws"]} if noisy else None}
    return best_x, info


def _optimize(model: Surrogate, z: torch.Tensor, image_shape: tuple, o: dict, seed: int, restart: int,
              bar) -> torch.Tensor:
    """One restart on one batch: the images (B, *image_shape) in [0, 1]."""
    generator = torch.Generator(device=z.device).manual_seed(seed)
    shape = (len(z), *image_shape)
    x = torch.full(shape, 0.5, device=z.device) if restart == 0 else \
        torch.rand(shape, generator=generator, device=z.device)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=o["lr"])
    draws = o["noise_draws"] if model.noise is not None else 1
    for _ in range(o["steps"]):
        loss = _feature_loss(model, x, z, draws, generator) + o["tv_weight"] * _tv(x)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        bar.update(1)
    return x.detach()


@torch.no_grad()
def _final_loss(model: Surrogate, x: torch.Tensor, z: torch.Tensor, o: dict, seed: int) -> torch.Tensor:
    """Per-image feature loss (B,) that picks the restart: the same noise draws for every restart."""
    draws = o["noise_draws"] if model.noise is not None else 1
    return _feature_loss(model, x, z, draws, torch.Generator(z.device).manual_seed(seed))


def _feature_loss(model: Surrogate, x: torch.Tensor, z: torch.Tensor, draws: int, generator) -> torch.Tensor:
    """Per-image mean squared feature error (B,), averaged over `draws` noise draws."""
    if model.noise is None:
        return (model(x) - z).pow(2).flatten(1).mean(1)
    # The head runs once; only the noise differs between draws.
    clean = model.clean(x)
    feats = model.noisy(clean.repeat(draws, *([1] * (clean.dim() - 1))), generator)
    return (feats - z.repeat(draws, *([1] * (z.dim() - 1)))).pow(2).flatten(1).mean(1).view(draws, -1).mean(0)


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Isotropic total variation (beta = 1) per image, (B,): the mean over channels and pixels."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2) + _TV_EPS).sqrt().flatten(1).mean(1)


def _seed(seed: int, batch: int, restart: int, stream: int = 0) -> int:
    """stream 0: a restart's initialization and noise; stream 1: the draws that score restarts."""
    return int(np.random.SeedSequence([seed, batch, restart, stream]).generate_state(1)[0])


def _progress(enabled: bool, desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)
