"""Knowledge alignment (Yang, Chang, Liang, CCS 2019): an inverse network from other-distribution data.

The attacker has no data from the victim's distribution, only generic "background knowledge"
images (option `aux_dataset`, for example CIFAR-10 against a digits victim). It converts them to
the victim's input format, queries them through the deployed head, trains the inverse network of
`inverse` on the pairs (the same decoder, restarts and held-out choice: `fit_decoder`) and applies
it to the features the cloud received.

Yang et al. invert a classifier's released prediction vector. Their alignment truncates the
auxiliary predictions to the victim's released form (its top-m scores), so the decoder trains on
inputs shaped like the ones it will see. Here the released thing is the head's whole feature
tensor, so there is nothing to truncate; the alignment (research/algorithms.md, section 6.3) is
that every training input has the exact form of a received one:
  - images: each auxiliary image is converted to the victim's input (C, H, W) deterministically:
    RGB to grey with ITU-R 601-2 luma (PIL "L"), grey to RGB by replication, then a PIL bilinear
    resize (as edgeveil.training.data resizes digits), kept as uint8 pixels;
  - features: the images go through victim.query, the same artifact as the targets (int8 TFLite
    codes, dequantized, or the float head) with the runtime's inference noise, so quantization and
    noise are part of the training distribution;
  - standardization: per channel with the auxiliary features' statistics, applied to the targets
    too, as in `inverse`. Matching the moments instead (the targets standardized with their own
    statistics, which the cloud sees) is not done: on a digits victim it lowered SSIM from 0.78 to
    0.61 with 2,000 CIFAR-10 images (presumably it moves features away from what the inverse learned).
Where the paper is silent: the conversion above; the decoder (`inverse`'s convolutional one, as
theirs maps a prediction vector, not a feature map, to an image); which auxiliary images (`aux_size` of
them, a seeded draw from the train and test pools of `aux_dataset`); and choosing the decoder on
a held-out part of the auxiliary pairs, since the attacker has nothing from the victim's
distribution to choose with.

    features (B, C', H', W') float32 -> decoder -> images (B, C, H, W) in [0, 1]
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .base import Attack, AttackContext, AttackResult, ThreatModel, option_problems
from .inverse import DECODER_OPTIONS, decoder_option_problems, fit_decoder, query_features

__all__ = ["KnowledgeAlignmentAttack", "convert_images", "default_aux_dataset"]

_TORCHVISION = ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")
_NAMES = ("digits",) + _TORCHVISION


def default_aux_dataset() -> str:
    """npz:<shared datasets>/cifar10_test_jpeg.npz, the shared data beside the checkout.

    The folder is $EDGEVEIL_SHARED_DATA, else ../shared/datasets next to the repository (as the
    tests find it). CIFAR-10: natural RGB photographs, another distribution for most victims.
    """
    env = os.environ.get("EDGEVEIL_SHARED_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "datasets"
    return f"npz:{folder / 'cifar10_test_jpeg.npz'}"


class KnowledgeAlignmentAttack(Attack):
    name = "ka"
    description = "knowledge alignment: an inverse network trained on auxiliary data from another distribution"
    paper = ("Yang, Chang, Liang: Neural network inversion in adversarial setting via background knowledge "
             "alignment (CCS 2019)")
    threat_model = ThreatModel(head_weights=False, query_access=True, auxiliary_data="other-distribution",
                               labels=0)
    OPTIONS = {
        **DECODER_OPTIONS,
        "aux_dataset": default_aux_dataset(),   # an edgeveil dataset name (edgeveil list datasets)
        "data_root": None,                      # folder of torchvision datasets; None: the default root
        "aux_size": 2000,                       # background images drawn (seeded) from the dataset's pools
    }

    TINY_OPTIONS = {"epochs": 1, "batch_size": 16, "width": 8, "restarts": 1, "val_fraction": 0.25,
                    "aux_dataset": "digits", "aux_size": 32}

    def check_options(self, o: dict) -> list[str]:
        problems = decoder_option_problems(o) + option_problems(o, {"aux_size": 2})
        if o["data_root"] is not None and not isinstance(o["data_root"], str):
            problems.append(f"data_root must be a folder path or null, got {o['data_root']!r}")
        return problems + _dataset_problems(o["aux_dataset"])

    def run(self, ctx: AttackContext) -> AttackResult:
        """Draw and convert the background images, query them, fit the decoder, invert the targets."""
        start = time.perf_counter()
        o = self.options
        pool = _load_pool(o["aux_dataset"], o["data_root"])
        if len(pool) < o["aux_size"]:
            raise ValueError(f"ka: aux_size={o['aux_size']} but aux_dataset {o['aux_dataset']!r} holds "
                             f"{len(pool)} images")
        chosen = np.sort(np.random.default_rng([ctx.seed, 2]).choice(len(pool), o["aux_size"], replace=False))
        images = convert_images(pool[chosen], ctx.aux_images.shape[1:])
        features = query_features(ctx, images, "ka")
        fit = fit_decoder(images, features, o, ctx.seed, ctx.device, ctx.progress, self.name)
        reconstructions = fit.invert(ctx.target_features)
        scores, summary = self.score(ctx, reconstructions)
        info = {"aux_dataset": o["aux_dataset"], "aux_pool": len(pool), "training_pairs": len(images),
                "source_shape": list(pool.shape[1:]), "converted_to": list(images.shape[1:]),
                **fit.info(), "options": dict(o), "seconds": time.perf_counter() - start}
        return AttackResult(reconstructions, scores, summary, info)


def convert_images(images_u8: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 (N, h, w, c) -> float32 (N, C, H, W) in [0, 1], on the 1/255 grid.

    c -> C: RGB to grey with PIL's ITU-R 601-2 luma, grey to RGB by replication; then a PIL
    bilinear resize to H x W. Deterministic.
    """
    from PIL import Image

    c, h, w = (int(v) for v in shape)
    if c not in (1, 3):
        raise ValueError(f"ka converts to 1 or 3 channels, got a target shape {tuple(shape)}")
    mode, out = ("L" if c == 1 else "RGB"), np.empty((len(images_u8), h, w, c), np.uint8)
    for i, img in enumerate(images_u8):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert(mode)
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.BILINEAR)
        out[i] = np.asarray(pil).reshape(h, w, c)
    return out.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def _dataset_problems(name) -> list[str]:
    """aux_dataset must be a dataset name edgeveil.training.data.load_dataset reads, with its files present."""
    known = ", ".join(_NAMES + ("npz:PATH[,PATH]", "imagefolder:PATH"))
    if not isinstance(name, str):
        return [f"aux_dataset must be a dataset name ({known}), got {name!r}"]
    if name.startswith("npz:") and len(name) > 4:
        missing = [p for p in name[4:].split(",") if not Path(p.strip()).expanduser().is_file()]
        return [f"aux_dataset {name!r}: npz file {p!r} not found" for p in missing]
    if name.startswith("imagefolder:") and len(name) > 12:
        folder = Path(name[12:]).expanduser()
        return [] if folder.is_dir() else [f"aux_dataset {name!r}: folder {str(folder)!r} not found"]
    return [] if name in _NAMES else [f"aux_dataset must be one of {known}, got {name!r}"]


def _load_pool(name: str, root: str | None) -> np.ndarray:
    """Every image of the dataset (train pool, then test pool) as uint8 (N, h, w, c)."""
    from edgeveil.training.data import load_dataset

    try:
        train, test = load_dataset(name, root)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"ka: aux_dataset {name!r} could not be loaded: {e} (set attack.options.ka.aux_dataset "
                         "to another dataset, for example npz:PATH, or data_root to the folder that holds it)") from e
    return test.x if train is None else np.concatenate([train.x, test.x])
