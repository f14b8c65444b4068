"""Adversarial representation learning against a jointly trained inversion decoder (algorithms.md 5.7).

Every batch, as in the ResSFL-style "gan_adv" defense of the CEM reference code:

1. decoder step (`adversary_step`, head frozen): the simulated attacker g: z -> x maximizes
   SSIM(g(z), x) (option loss="ssim", the code's default) or minimizes MSE (loss="mse");
2. head and tail step (`loss`): CE + alpha * max(0, SSIM(g(z), x) - t) with the hinge t = 0.5
   (option ssim_threshold; the code uses 0.6 for large images), or CE - alpha * MSE(g(z), x).

strength = alpha (default in the code: 0.3). The hinge stops the head from over-fitting one
decoder once that decoder is bad enough; the unbounded -MSE variant has no such stop and can
diverge at large alpha. SSIM here is computed on images mapped back to [0, 1] with the batch's
per-channel range (the defense does not know the dataset's normalization), with an 11x11 Gaussian
window (sigma 1.5; shrunk for images under 11 pixels) over the valid interior.

Differences from the reference code: no 30-epoch decoder pre-training (the trainer has no
pre-training hook: the decoder warms up during the first epoch, one step per batch by default,
option decoder_steps), and the decoder (`_decoder.build_decoder`) standardizes its input features
per channel, so the head cannot escape it by rescaling. Nothing is added at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._decoder import build_decoder, fresh_decoder_mse, frozen
from .base import Defense

__all__ = ["AdversarialDefense", "ssim"]

LOSSES = ("ssim", "mse")


def _window(size: int, channels: int, device) -> torch.Tensor:
    sigma = 1.5 * size / 11.0
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of images a, b: (B, C, H, W) in [0, 1] (data range 1), differentiable."""
    channels, size = a.shape[1], min(11, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # odd
    w = _window(size, channels, a.device)

    def blur(v):
        return F.conv2d(v, w, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a.pow(2), blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return ssim_map.mean()


def _to_unit(x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Map x and others with the affine that takes x's per-channel batch range to [0, 1]."""
    lo = x.amin(dim=(0, 2, 3), keepdim=True).detach()
    span = (x.amax(dim=(0, 2, 3), keepdim=True).detach() - lo).clamp_min(1e-6)
    return [(v - lo) / span for v in (x, *others)]


class AdversarialDefense(Defense):
    name = "adversarial"
    description = "adversarial training against a jointly trained inversion decoder (strength = alpha)"
    paper = "Li et al., ResSFL, CVPR 2022 (the CEM code's gan_adv baseline)"
    TARGET_DIRECTION = "up"  # reconstruction MSE of a freshly trained decoder
    example_strength = 0.3

    def __init__(self, strength: float = 0.0, *, loss: str = "ssim", ssim_threshold: float = 0.5,
                 decoder_width: int = 32, decoder_lr: float = 1e-3, decoder_steps: int = 1, **options):
        super().__init__(strength, **options)
        if loss not in LOSSES:
            raise ValueError(f"defense.options.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        for key, value, low in (("decoder_width", decoder_width, 1), ("decoder_steps", decoder_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"defense.options.{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(decoder_lr, (int, float)) or not decoder_lr > 0:
            raise ValueError(f"defense.options.decoder_lr must be > 0, got {decoder_lr!r}")
        if not isinstance(ssim_threshold, (int, float)) or not -1.0 <= ssim_threshold <= 1.0:
            raise ValueError(f"defense.options.ssim_threshold must be in [-1, 1], got {ssim_threshold!r}")
        self.loss_kind, self.threshold = loss, float(ssim_threshold)
        self.width, self.lr, self.steps = decoder_width, float(decoder_lr), decoder_steps
        self.opt: torch.optim.Optimizer | None = None

    def setup(self, head, tail, input_shape, feature_shape, num_classes) -> None:
        self.modules["decoder"] = build_decoder(feature_shape, input_shape, self.width)
        self.opt = torch.optim.Adam(self.modules["decoder"].parameters(), lr=self.lr)

    def _attacker(self):
        if self.opt is None:
            raise RuntimeError("defense adversarial: call setup() before training")
        return self.modules["decoder"].train()

    def adversary_step(self, x, z, y) -> dict[str, float]:
        """Train the decoder on (z detached, x); returns its MSE and SSIM before the last step."""
        decoder = self._attacker()
        for _ in range(self.steps):
            rec = decoder(z)
            mse = F.mse_loss(rec, x)
            x01, rec01 = _to_unit(x, rec)
            sim = ssim(rec01, x01)
            objective = 1.0 - sim if self.loss_kind == "ssim" else mse
            self.opt.zero_grad(set_to_none=True)
            objective.backward()
            self.opt.step()
        return {"adv_rec": mse.item(), "adv_ssim": sim.item()}

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        if self.strength == 0:
            return {}
        with frozen(self._attacker()) as decoder:
            rec = decoder(z)
        if self.loss_kind == "mse":
            return {"adv": -self.strength * F.mse_loss(rec, x)}
        x01, rec01 = _to_unit(x, rec)
        return {"adv": self.strength * F.relu(ssim(rec01, x01) - self.threshold)}

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Held-out reconstruction MSE of a decoder trained from scratch on half the batch."""
        return fresh_decoder_mse(x, r)

    def _optimizer_states(self) -> dict:
        return {} if self.opt is None else {"decoder": self.opt.state_dict()}

    def _load_optimizer_states(self, states: dict) -> None:
        if "decoder" in states:
            self._attacker()
            self.opt.load_state_dict(states["decoder"])
