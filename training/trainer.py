"""Plain PyTorch training of a split model with a defense's hooks, checkpointed every epoch.

A run killed at any point (even SIGKILL mid-epoch) and started again resumes from its last
completed epoch and finishes with the same number of epochs: the checkpoint holds the models,
the defense's modules, the optimizer and the RNG state, and each epoch's shuffle is seeded by
(seed, epoch) so a resumed run sees the same batches it would have seen.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeveil.device.files import atomic_write_jsonl, read_jsonl

from .runfile import atomic_torch_save

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA = "edgeveil.checkpoint/1"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adam"
    device: str = "auto"
    seed: int = 0
    max_steps_per_epoch: int | None = None
    augment: str = "none"   # "none", "crop" (random shifts of up to 4 pixels) or "crop-flip" (plus mirror)


AUGMENTS = ("none", "crop", "crop-flip")
_SHIFT = 4


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) normalized -> the same batch randomly shifted by up to 4 pixels (reflected
    border), and for "crop-flip" mirrored left-right with probability 1/2. Draws come from `gen`."""
    if kind == "none":
        return x
    if kind not in AUGMENTS:
        raise ValueError(f"train.augment must be one of {', '.join(AUGMENTS)}, got {kind!r}")
    b, _, h, w = x.shape
    padded = F.pad(x, (_SHIFT,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * _SHIFT + 1, (2, b), generator=gen)).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if kind == "crop-flip":
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available; use auto or cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(head: nn.Module, tail: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512, transform=None) -> float:
    """Top-1 accuracy of tail(transform(head(x))) in eval mode."""
    head.eval(), tail.eval()
    device = next(head.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        z = head(x[i:i + batch_size].to(device))
        if transform is not None:
            z = transform(z)
        correct += (tail(z).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def _optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


class Trainer:
    """Trains ``tail(defense.transform(head(x)))`` on (x, y) tensors already normalized."""

    def __init__(self, head, tail, defense, settings: TrainSettings, workdir: Path, fingerprint: str = ""):
        self.s = settings
        self.device = resolve_device(settings.device)
        self.head, self.tail = head.to(self.device), tail.to(self.device)
        self.defense = defense.to(self.device)
        params = [*head.parameters(), *tail.parameters(), *defense.parameters()]
        self.opt = _optimizer(params, settings)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=settings.epochs)
        self.workdir = Path(workdir)
        self.ckpt_path = self.workdir / "checkpoint.pt"
        self.history_path = self.workdir / "history.jsonl"
        self.fingerprint = fingerprint
        self.epoch = 0  # completed epochs
        self.history: list[dict] = []

    # -- checkpoints -------------------------------------------------------------------------
    def _save(self) -> None:
        atomic_torch_save(self.ckpt_path, {
            "schema": CHECKPOINT_SCHEMA, "fingerprint": self.fingerprint, "epoch": self.epoch,
            "head": self.head.state_dict(), "tail": self.tail.state_dict(),
            "defense": self.defense.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "torch_rng": torch.get_rng_state(),
            "settings": asdict(self.s),
        })

    def resume(self) -> bool:
        """Load the last checkpoint if there is one; True when resumed."""
        if not self.ckpt_path.exists():
            return False
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as e:  # a torn or foreign file: name it rather than fail deep inside torch
            raise ValueError(f"checkpoint {self.ckpt_path} cannot be read ({e}); delete it to start over") from e
        if state.get("schema") != CHECKPOINT_SCHEMA:
            raise ValueError(f"checkpoint {self.ckpt_path}: field schema is {state.get('schema')!r}, "
                             f"expected {CHECKPOINT_SCHEMA!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint {self.ckpt_path} was written for a different config "
                             "(fingerprint mismatch); use a new --out or delete the checkpoint")
        self.head.load_state_dict(state["head"])
        self.tail.load_state_dict(state["tail"])
        self.defense.load_state_dict(state["defense"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch = int(state["epoch"])
        self.history = read_jsonl(self.history_path)[: self.epoch]
        log.info("resumed %s after epoch %d", self.ckpt_path, self.epoch)
        return True

    # -- one step and one epoch --------------------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        self.head.train(), self.tail.train()
        logged = self.defense.adversary_step(x, self.head(x).detach(), y)
        z = self.head(x)
        logits = self.tail(self.defense.transform(z))
        terms = {"task": F.cross_entropy(logits, y), **self.defense.loss(x, z, logits, y)}
        total = sum(terms.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} ({ {k: v.item() for k, v in terms.items()} }); "
                                     "lower train.lr or the defense strength")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        out = {f"loss_{k}": v.item() for k, v in terms.items()}
        out["loss_total"] = total.item()
        out["correct"] = (logits.argmax(1) == y).sum().item()
        return {**out, **logged}

    def _epoch(self, x: torch.Tensor, y: torch.Tensor, bar) -> dict[str, float]:
        gen = torch.Generator().manual_seed(self.s.seed * 100_003 + self.epoch)
        order = torch.randperm(len(x), generator=gen)
        bs, sums, n = self.s.batch_size, {}, 0
        steps = range(0, len(x), bs)
        if self.s.max_steps_per_epoch:
            steps = steps[: self.s.max_steps_per_epoch]
        for i in steps:
            idx = order[i:i + bs]
            xb, yb = augment_batch(x[idx], self.s.augment, gen).to(self.device), y[idx].to(self.device)
            for k, v in self._step(xb, yb).items():
                sums[k] = sums.get(k, 0.0) + (v if k == "correct" else v * len(idx))
            n += len(idx)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{sums['loss_total'] / n:.3f}", acc=f"{sums['correct'] / n:.3f}")
        rec = {k: v / n for k, v in sums.items() if k != "correct"}
        rec["train_accuracy"] = sums["correct"] / n
        return rec

    def fit(self, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
            progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        torch.manual_seed(self.s.seed)
        self.resume()
        per_epoch = len(train[0]) if not self.s.max_steps_per_epoch else min(
            len(train[0]), self.s.max_steps_per_epoch * self.s.batch_size)
        while self.epoch < self.s.epochs:
            t0 = time.perf_counter()
            with tqdm(total=per_epoch, unit="img", disable=not progress, leave=False,
                      desc=f"train epoch {self.epoch + 1}/{self.s.epochs}") as bar:
                rec = self._epoch(*train, bar)
            self.sched.step()
            rec.update(self.defense.end_epoch(self.epoch + 1, self.opt.param_groups[0]["lr"]))
            rec = {"epoch": self.epoch + 1, **rec,
                   "test_accuracy": evaluate(self.head, self.tail, *test, transform=self.defense.eval_transform),
                   "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            self.epoch += 1
            self.history.append(rec)
            atomic_write_jsonl(self.history_path, self.history)
            self._save()
            if progress:
                tqdm.write(f"epoch {rec['epoch']}/{self.s.epochs}: loss {rec['loss_total']:.4f} "
                           f"train acc {rec['train_accuracy']:.4f} test acc {rec['test_accuracy']:.4f} "
                           f"({rec['seconds']:.1f} s)")
        return self.history

