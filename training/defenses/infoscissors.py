"""InfoScissors (Duan et al., NeurIPS 2024; "PrivaScissors", arXiv 2306.07973): two CLUB bounds.

research/algorithms.md section 2. The three-part split is device head f_h (x -> r), cloud
encoder f_e (r -> z) and device classifier f_c (z -> logits). InfoScissors shrinks

* I(r; x), so the cloud cannot reconstruct the input, and
* I(z; y), so the cloud cannot complete the model and read the prediction,

each through a CLUB upper bound (Cheng et al. 2020) with a learned variational posterior that
is fitted adversarially, one step per batch. For a batch and a random permutation pi:

    input      L_d = -mse(g(r_i), x_i) + mse(g(r_i), x_pi(i))     q(x|r) Gaussian around g(r)
    prediction L_l = -CE(h(z_i), y_i) + CE(h(z_i), y_pi(i))        q(y|z) = softmax(h(z))
    objective  (1 - lambda_d - lambda_l) CE(f_c(z), y) + lambda_d L_d + lambda_l L_l

strength = lambda_d; option lambda_l (default 0.1, the middle of the grid of section 2.4).
lambda_d = 0 gives the prediction-only defense, lambda_l = 0 the input-only one, both > 0 the
integrated one; lambda_d + lambda_l < 1. Logged terms: `input_bound` (lambda_d L_d),
`prediction_bound` (lambda_l L_l) and `task_share` = -(lambda_d + lambda_l) CE, which turns the
trainer's CE into the paper's (1 - lambda_d - lambda_l) CE exactly.

Per-batch schedule (section 2.3): `adversary_step` takes one decoder step on (r detached, x);
the auxiliary classifier needs the cloud encoder's z, which exists only once the tail has run,
so `loss` first takes its step on z detached and then builds both bounds with the updated
posteriors, before the joint step on head and tail. The trainer's single optimizer steps head,
encoder and classifier together (the paper's separate f_c step is folded into the joint step).
The posteriors' own losses are logged as `decoder_mse` and `aux_ce` (the latter one step late:
`loss` can return only weighted terms, so the next `adversary_step` reports it).

Where the paper (as far as it could be read) is silent, the choices here:

* Head: any registered arch; the paper's is ResNet-18's first conv + BN + ReLU
  (`--set model.arch=resnet18 --set model.split=0`).
* Where z is: the input of the tail's last block, the device-side f_c = last block + pooling +
  FC ("last basic block + FC" in the paper). Found in `setup`: the last top-level child of the
  tail that holds a conv, descending into a stage of blocks to its last block (resnet18:
  `layer4.1`); a tail without convs uses its last Linear. `classifier_start` names it; a forward
  pre-hook on it hands z to `loss`. The pipeline still runs that block in the cloud: the bound
  trains for the three-part layout, and the prediction side protects only when f_c is deployed
  on the device.
* Decoder g: `_decoder.build_decoder` (standardizes features per channel, so the head cannot
  escape the bound by rescaling), width 32, always in training mode.
* Learning rates: Adam 3e-3 for both posteriors. CLUB is an upper bound only while q fits, and
  a posterior that lags the head gives a loose, misdirected bound: on digits (smallcnn, 256
  steps, lambda_d 0.3) 3e-3 left a fresh decoder's MSE at 0.040 and accuracy at 0.81, against
  0.028 and 0.76 with 1e-3.
* Variance of the Gaussian posterior: fixed, with the log-likelihood divided by the input size,
  i.e. per-element MSE in the normalized input space: the term's scale does not grow with the
  image, and the variance only rescales lambda_d.
* Auxiliary classifier h: global average pooling of z, then a 2-layer MLP (512 hidden, ReLU),
  (section 2.4 suggests an MLP like the PMC attacker's head).
* Negatives: one uniform random permutation of the batch per step, shared by both bounds
  (CLUB's sampled form; a fixed point pairs a sample with itself, which only dilutes the
  negatives by about 1/B).
* Warm-up: none by default (the summary's schedule has none; both posteriors take their step
  on the batch before its bound is formed). Option warmup_steps ramps lambda_d and lambda_l
  linearly from 0 over that many steps.
Nothing is added at inference.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ._decoder import build_decoder, fresh_decoder_mse, frozen
from .base import Defense, check_option

__all__ = ["InfoScissorsDefense", "classifier_start"]


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def classifier_start(tail: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) where the device-side classifier f_c starts in `tail` (see the module doc)."""
    children = [(n, m) for n, m in tail.named_children() if _has_conv(m)]
    if not children:
        linears = [(n, m) for n, m in tail.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("infoscissors: the tail has neither a conv block nor a Linear layer to "
                             "start the device-side classifier at")
        return linears[-1]
    name, module = children[-1]
    while isinstance(module, nn.Sequential) and len(module) > 1 and _has_conv(module[-1]):
        name, module = f"{name}.{len(module) - 1}", module[-1]
    return name, module


def _aux_classifier(z_shape: tuple[int, ...], hidden: int, num_classes: int) -> nn.Sequential:
    pool = [nn.AdaptiveAvgPool2d(1)] if len(z_shape) == 3 else []
    return nn.Sequential(*pool, nn.Flatten(), nn.Linear(z_shape[0], hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class InfoScissorsDefense(Defense):
    name = "infoscissors"
    description = ("CLUB bounds on I(r; x) and I(z; y) with adversarially fitted decoder and "
                   "classifier (strength = lambda_d, option lambda_l)")
    paper = "Duan et al., InfoScissors, NeurIPS 2024 (arXiv 2306.07973)"
    TARGET_DIRECTION = "up"  # held-out MSE of a freshly trained decoder on the released features
    example_strength = 0.3

    def __init__(self, strength: float = 0.0, *, lambda_l: float = 0.1, decoder_width: int = 32,
                 decoder_lr: float = 3e-3, aux_hidden: int = 512, aux_lr: float = 3e-3,
                 warmup_steps: int = 0, **options):
        super().__init__(strength, **options)
        self.lambda_d = check_option("defense.strength (lambda_d)", self.strength)
        self.lambda_l = check_option("defense.options.lambda_l", lambda_l)
        if self.lambda_d + self.lambda_l >= 1:
            raise ValueError(f"defense.strength (lambda_d) + defense.options.lambda_l must be < 1, got "
                             f"{self.lambda_d} + {self.lambda_l}")
        opt = "defense.options."
        self.decoder_width = check_option(opt + "decoder_width", decoder_width, integer=True, low=1)
        self.aux_hidden = check_option(opt + "aux_hidden", aux_hidden, integer=True, low=1)
        self.decoder_lr = check_option(opt + "decoder_lr", decoder_lr, open_low=True)
        self.aux_lr = check_option(opt + "aux_lr", aux_lr, open_low=True)
        self.warmup_steps = check_option(opt + "warmup_steps", warmup_steps, integer=True)
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.steps = 0  # adversary steps taken: drives the warm-up, checkpointed
        self.classifier_start: str | None = None
        self._z: torch.Tensor | None = None  # the cloud encoder's output of the last training forward
        self._aux_ce: float | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, head, tail, input_shape, feature_shape, num_classes) -> None:
        if self.lambda_d > 0:
            self.modules["decoder"] = build_decoder(feature_shape, input_shape, self.decoder_width)
            self.opts["decoder"] = torch.optim.Adam(self.modules["decoder"].parameters(), lr=self.decoder_lr)
        if self.lambda_l > 0:
            if tail is None:
                raise ValueError("infoscissors with lambda_l > 0 needs the tail (the cloud encoder's output)")
            self.classifier_start, start = classifier_start(tail)
            z_shape = _encoder_output_shape(tail, start, feature_shape)
            start.register_forward_pre_hook(self._capture)
            self.modules["aux"] = _aux_classifier(z_shape, self.aux_hidden, num_classes)
            self.opts["aux"] = torch.optim.Adam(self.modules["aux"].parameters(), lr=self.aux_lr)

    def _capture(self, _module, inputs) -> None:
        if torch.is_grad_enabled():  # a training forward, not an evaluation pass
            self._z = inputs[0]

    # -- the adversaries ------------------------------------------------------------------------
    def adversary_step(self, x, z, y) -> dict[str, float]:
        """One maximum-likelihood step of the decoder q(x|r) on (r detached, x)."""
        self.steps += 1
        logged = {} if self._aux_ce is None else {"aux_ce": self._aux_ce}  # the previous batch's
        if self.lambda_d > 0:
            decoder = self.modules["decoder"].train()
            mse = F.mse_loss(decoder(z.detach()), x)
            self.opts["decoder"].zero_grad(set_to_none=True)
            mse.backward()
            self.opts["decoder"].step()
            logged["decoder_mse"] = mse.item()
        return logged

    def _aux_step(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """One maximum-likelihood step of q(y|z) on the cloud encoder's output, detached."""
        aux = self.modules["aux"].train()
        ce = F.cross_entropy(aux(z.detach()), y)
        self.opts["aux"].zero_grad(set_to_none=True)
        ce.backward()
        self.opts["aux"].step()
        self._aux_ce = ce.item()

    # -- the bounds -----------------------------------------------------------------------------
    def _ramp(self) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, self.steps / self.warmup_steps)

    def input_bound(self, x: torch.Tensor, r: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """CLUB estimate of I(r; x) up to scale: -mse(g(r), x) + mse(g(r), x[perm]); gradient to r only."""
        with frozen(self.modules["decoder"].train()) as decoder:
            rec = decoder(r)
        return F.mse_loss(rec, x[perm]) - F.mse_loss(rec, x)

    def prediction_bound(self, z: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """CLUB estimate of I(z; y): -CE(h(z), y) + CE(h(z), y[perm]); gradient to z only."""
        with frozen(self.modules["aux"].train()) as aux:
            logits = aux(z)
        return F.cross_entropy(logits, y[perm]) - F.cross_entropy(logits, y)

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        weight = self._ramp()
        lambda_d, lambda_l = weight * self.lambda_d, weight * self.lambda_l
        perm = torch.randperm(x.shape[0], device=x.device)
        terms = {}
        if self.lambda_d > 0:
            terms["input_bound"] = lambda_d * self.input_bound(x, z, perm)
        if self.lambda_l > 0:
            z_cloud, self._z = self._z, None
            if z_cloud is None:
                raise RuntimeError(f"infoscissors: no tail forward with gradients reached "
                                   f"tail.{self.classifier_start} before loss(); run the tail first")
            self._aux_step(z_cloud, y)
            terms["prediction_bound"] = lambda_l * self.prediction_bound(z_cloud, y, perm)
        if terms:
            terms["task_share"] = -(lambda_d + lambda_l) * F.cross_entropy(logits, y)
        return terms

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Held-out reconstruction MSE of a decoder trained from scratch on half the batch."""
        return fresh_decoder_mse(x, r)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        aux_ce = {} if self._aux_ce is None else {"aux_ce": self._aux_ce}  # logged by the next step
        return {**super().state_dict(), "steps": self.steps, **aux_ce}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps = int(state.get("steps", 0))
        self._z, self._aux_ce = None, state.get("aux_ce")

    def _optimizer_states(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.opts.items()}

    def _load_optimizer_states(self, states: dict) -> None:
        for k, opt in self.opts.items():
            if k in states:
                opt.load_state_dict(states[k])


def _encoder_output_shape(tail: nn.Module, start: nn.Module, feature_shape) -> tuple[int, ...]:
    """Shape (without batch) of what reaches `start` when the tail runs; eval mode, no gradients."""
    seen = []
    handle = start.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[1:]))
    modes = {m: m.training for m in tail.modules()}
    tail.eval()
    try:
        with torch.no_grad():
            tail(torch.zeros(1, *feature_shape))
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    return tuple(seen[0])
