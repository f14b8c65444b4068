"""CEM, conditional entropy maximization (Xia et al., CVPR 2025), on top of an obfuscation defense.

research/algorithms.md section 4. With released features z = f_h(x) + noise of std sigma, any
reconstruction's per-element MSE is at least exp(2 H(x|z) / d) / (2 pi e), and a Gaussian
mixture model of f_h(x) lower-bounds H(x|z) by terms in log det(I + Sigma_k / sigma^2): packing
the features of each class tightly around a few prototypes, relative to the noise power,
raises the floor for every attack. The loss is L_D + lambda L_C, where L_D is a base defense
(option `base`: noise, adversarial or nopeek, built through the registry with `base_strength`
and `base_options`; every hook is delegated to it, so its inference noise is CEM's).

L_C as the reference code computes it (section 4.2):
* after each epoch, k-means per class on the flattened head outputs (K = 5 clusters when the head
  ends in a sigmoid, else 15; 50 Lloyd iterations; k-means++ the first time, then warm-started
  from the previous centroids), keeping per cluster the centroid mu, the weight pi (its share
  of the class) and the scalar variance v (mean over members and dimensions of (z - mu)^2);
* per batch, each feature goes to the nearest centroid of its own class; per cluster the batch
  variance v_b blends with the epoch's: v~ = eta v_b + (1 - eta) v, eta = min(0.99, 10 n_b / n_k)
  (n_b members in the batch, n_k = pi times the class's count in the epoch);
* L_C = mean over the classes in the batch of sum_k pi_k relu(log(v~ + 0.01) - log(tau sigma^2 + 0.01)),
  a hinge that stops once a cluster's variance is below tau sigma^2 (tau = var_threshold, 0.125).
* The term weight is lambda s(lr), s(lr) = 1 below lr 4.1e-4 and 0.001 / lr above (section 4.4):
  CEM ramps up as the learning rate decays. L_C depends on the head's output only, so its
  gradient reaches only the head, as in the reference code's separate head-only backward.
strength = lambda (the code's grid: 0, 8, 16). Logged: `cem` (lambda s L_C) and the base's terms.

Where this departs from the reference code, and why:
* The k-means features are the head outputs the trainer hands to `adversary_step` (training
  mode, before the noise), not a separate eval-mode pass over the training set: at most
  `kmeans_samples` per class (the first ones of the epoch's shuffled order, so a uniform sample),
  and no more than 2^26 floats in all. They are fitted in `end_epoch`, which the trainer calls
  after each epoch with the next epoch's learning rate; until the first one L_C is 0, as in the
  code's first epoch. The buffer is emptied there, so a checkpoint holds only the clusters.
* sigma: the base's noise std (Gaussian sigma, or sqrt(2) b for Laplace). A base without noise
  has sigma = 0 unless option sigma is set; the hinge then keeps pulling clusters together
  until their variance is small against 0.01.
Nothing else is added at inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._decoder import fresh_decoder_mse
from .base import Defense, check_option

__all__ = ["CEMDefense", "BASES", "kmeans"]

BASES = ("noise", "adversarial", "nopeek")
# base -> its default strength: the middle of CEM's noise sweep (0.01..0.15, on sigmoid features),
# CEM's gan_adv strength 0.3, NoPeek's example strength
_BASE_STRENGTH = {"noise": 0.1, "adversarial": 0.3, "nopeek": 1.0}
_GAMMA0 = 0.01
_RAMP_LR = 4.1e-4
_BUFFER_FLOATS = 2 ** 26


def _kmeans_pp(v: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability proportional to D^2."""
    chosen = [int(torch.randint(len(v), (1,), generator=gen))]
    d2 = (v - v[chosen[0]]).pow(2).sum(1)
    for _ in range(k - 1):
        probs = d2 if d2.sum() > 0 else torch.ones_like(d2)
        chosen.append(int(torch.multinomial(probs, 1, generator=gen)))
        d2 = torch.minimum(d2, (v - v[chosen[-1]]).pow(2).sum(1))
    return v[chosen].clone()


def kmeans(v: torch.Tensor, k: int, iters: int, gen: torch.Generator,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of v (n, D), n >= k -> (centroids (k, D), assignment (n,)).
    An empty cluster keeps its centroid; stops early when no centroid moves."""
    centroids = _kmeans_pp(v, k, gen) if init is None else init.clone()
    for _ in range(iters):
        assign = torch.cdist(v, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, v)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids, torch.cdist(v, centroids).argmin(1)


def _ends_in_sigmoid(head: nn.Module | None) -> bool:
    """True when the head's output is a sigmoid's: the last layer, through nested Sequentials."""
    while isinstance(head, nn.Sequential) and len(head):
        head = head[-1]
    return isinstance(head, nn.Sigmoid)


class CEMDefense(Defense):
    name = "cem"
    description = ("conditional entropy maximization: class-wise cluster-variance hinge on top of a base "
                   "defense (strength = lambda; option base = noise, adversarial or nopeek)")
    paper = "Xia et al., CEM, CVPR 2025"
    TARGET_DIRECTION = "up"  # held-out MSE of a freshly trained decoder on the released features
    example_strength = 8.0

    def __init__(self, strength: float = 0.0, *, base: str = "noise", base_strength: float | None = None,
                 base_options: dict | None = None, sigma: float | None = None, var_threshold: float = 0.125,
                 clusters: int | None = None, kmeans_iters: int = 50, kmeans_samples: int = 1000,
                 lr_ramp: bool = True, **options):
        super().__init__(strength, **options)
        check_option("defense.strength (lambda)", self.strength)
        if base not in BASES:
            raise ValueError(f"defense.options.base must be one of {', '.join(BASES)}, got {base!r}")
        if base_options is not None and not isinstance(base_options, dict):
            raise ValueError(f"defense.options.base_options must be a mapping, got {base_options!r}")
        from . import create  # the registry, imported here: it imports this module lazily too

        self.base = create(base, _BASE_STRENGTH[base] if base_strength is None else base_strength,
                           **(base_options or {}))
        self.modules = self.base.modules  # the base's modules are the only trainable ones
        self.sigma = self._noise_std() if sigma is None else check_option("defense.options.sigma", sigma)
        self.tau = check_option("defense.options.var_threshold", var_threshold)
        self.clusters = (None if clusters is None
                         else check_option("defense.options.clusters", clusters, integer=True, low=1))
        self.iters = check_option("defense.options.kmeans_iters", kmeans_iters, integer=True, low=1)
        self.samples = check_option("defense.options.kmeans_samples", kmeans_samples, integer=True, low=1)
        if not isinstance(lr_ramp, bool):
            raise ValueError(f"defense.options.lr_ramp must be true or false, got {lr_ramp!r}")
        self.lr_ramp = lr_ramp
        self.lr: float | None = None  # the learning rate end_epoch reported last
        self.epochs = 0
        self.clusters_state: dict[str, torch.Tensor] = {}
        self._buffer: dict[int, list[torch.Tensor]] = {}
        self._seen: dict[int, int] = {}
        self._device = torch.device("cpu")

    def _noise_std(self) -> float:
        spec = self.base.inference_noise() or {}
        if spec.get("kind") == "gaussian":
            return float(spec["sigma"])
        if spec.get("kind") == "laplace":
            return math.sqrt(2.0) * float(spec["sigma"])
        return 0.0

    # -- setup and delegation -------------------------------------------------------------------
    def setup(self, head, tail, input_shape, feature_shape, num_classes) -> None:
        self.base.setup(head, tail, input_shape, feature_shape, num_classes)
        self.num_classes, self.dim = num_classes, math.prod(feature_shape)
        self.k = self.clusters or (5 if _ends_in_sigmoid(head) else 15)
        self.cap = max(1, min(self.samples, _BUFFER_FLOATS // (num_classes * self.dim)))

    def parameters(self):
        return self.base.parameters()

    def transform(self, z):
        return self.base.transform(z)

    def eval_transform(self, z):
        return self.base.eval_transform(z)

    def inference_noise(self):
        return self.base.inference_noise()

    def target_metric(self, x: torch.Tensor, r: torch.Tensor) -> float:
        """Held-out reconstruction MSE of a decoder trained from scratch on half the batch."""
        return fresh_decoder_mse(x, r)

    def to(self, device) -> "CEMDefense":
        self.base.to(device)
        self._device = torch.device(device)
        self.clusters_state = {k: v.to(device) for k, v in self.clusters_state.items()}
        return self

    # -- training -------------------------------------------------------------------------------
    def adversary_step(self, x, z, y) -> dict[str, float]:
        """The base's adversary step; the detached head outputs are kept for the epoch's k-means."""
        logged = self.base.adversary_step(x, z, y)
        flat = z.detach().flatten(1).float().cpu()
        for c in y.unique().tolist():
            rows = flat[(y == c).cpu()]
            self._seen[c] = self._seen.get(c, 0) + len(rows)
            kept = sum(len(t) for t in self._buffer.get(c, []))
            if kept < self.cap:
                self._buffer.setdefault(c, []).append(rows[: self.cap - kept])
        return logged

    def scale(self) -> float:
        """s(lr) of section 4.4: 1 below lr 4.1e-4, else 0.001 / lr (1 without lr_ramp)."""
        if not self.lr_ramp or self.lr is None or self.lr < _RAMP_LR:
            return 1.0
        return 0.001 / self.lr

    def loss(self, x, z, logits, y) -> dict[str, torch.Tensor]:
        terms = dict(self.base.loss(x, z, logits, y))
        if self.strength > 0 and self.clusters_state:
            l_c = self.conditional_entropy_loss(z, y)
            if l_c is not None:
                terms["cem"] = self.strength * self.scale() * l_c
        return terms

    def conditional_entropy_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """L_C of one batch (None when no class in it has clusters yet); z: (B, ...) head output."""
        s = self.clusters_state
        flat, floor = z.flatten(1), math.log(self.tau * self.sigma ** 2 + _GAMMA0)
        per_class = []
        for c in y.unique().tolist():
            if not bool(s["fitted"][c]):
                continue
            f, mu = flat[y == c], s["centroids"][c]
            assign = torch.cdist(f.detach(), mu).argmin(1)
            sq = (f - mu[assign]).pow(2).mean(1)
            n_b = torch.bincount(assign, minlength=self.k).to(sq.dtype)
            v_b = torch.zeros_like(n_b).index_add(0, assign, sq) / n_b.clamp_min(1)
            eta = (10 * n_b / s["sizes"][c].clamp_min(1e-12)).clamp(max=0.99)
            v = eta * v_b + (1 - eta) * s["variances"][c]
            per_class.append((s["weights"][c] * F.relu(torch.log(v + _GAMMA0) - floor)).sum())
        return torch.stack(per_class).mean() if per_class else None

    def end_epoch(self, epoch: int, lr: float) -> dict[str, float]:
        """Fit the class-wise clusters on the epoch's features; lr is the next epoch's learning rate."""
        logged = dict(getattr(self.base, "end_epoch", lambda *_: {})(epoch, lr))
        self.lr, self.epochs = float(lr), int(epoch)
        if self._buffer:
            self._fit()
            fitted = self.clusters_state["fitted"]
            mean_var = (self.clusters_state["weights"] * self.clusters_state["variances"]).sum(1)[fitted].mean()
            logged.update(cem_cluster_var=mean_var.item(), cem_scale=self.scale())
        self._buffer, self._seen = {}, {}
        return logged

    def _fit(self) -> None:
        """k-means per class on the buffered features, on the CPU; the result goes to the defense's device."""
        s = {k: t.cpu().clone() for k, t in self.clusters_state.items()}
        if not s:
            zeros = torch.zeros(self.num_classes, self.k)
            s = {"centroids": torch.zeros(self.num_classes, self.k, self.dim), "weights": zeros,
                 "variances": zeros.clone(), "sizes": zeros.clone(),
                 "fitted": torch.zeros(self.num_classes, dtype=torch.bool)}
        for c, parts in sorted(self._buffer.items()):
            v = torch.cat(parts)
            k = min(self.k, len(v))
            gen = torch.Generator().manual_seed(self.epochs * 100_003 + c)  # reproducible on resume
            init = s["centroids"][c] if bool(s["fitted"][c]) and k == self.k else None
            mu, assign = kmeans(v, k, self.iters, gen, init)
            counts = torch.bincount(assign, minlength=k).to(v.dtype)
            var = torch.zeros(k).index_add_(0, assign, (v - mu[assign]).pow(2).mean(1))
            pad = self.k - k  # a class with fewer samples than clusters: the empty slots weigh 0
            s["centroids"][c] = torch.cat([mu, mu[:1].expand(pad, -1)])
            s["weights"][c] = F.pad(counts / len(v), (0, pad))
            s["variances"][c] = F.pad(var / counts.clamp_min(1), (0, pad))
            s["sizes"][c] = F.pad(counts / len(v) * self._seen[c], (0, pad))
            s["fitted"][c] = True
        self.clusters_state = {k: t.to(self._device) for k, t in s.items()}

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "lr": self.lr, "epochs": self.epochs,
                "clusters": dict(self.clusters_state)}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state["base"])
        self.lr, self.epochs = state.get("lr"), int(state.get("epochs", 0))
        self.clusters_state = dict(state.get("clusters", {}))
        self._buffer, self._seen = {}, {}
