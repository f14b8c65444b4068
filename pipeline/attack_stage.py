"""Stage 4 as the adversary: attack the features the cloud received, float against int8, same inputs.

Targets are the frames in ``cloud/features/`` (verified again under the device key), joined with
the device's record of which test image each one was (``device/sent.jsonl``, ground truth used only
for scoring). Without stored frames the device runner produces the same features locally. The
attacker's auxiliary queries go through the same artifact as the targets: the int8 TFLite head for
int8 features, the PyTorch head for float ones.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["attack_stage"]


def _float_features(head, images_u8: np.ndarray, mean, std) -> np.ndarray:
    import torch

    from edgeveil.training.data import ImageSet, to_tensors

    x, _ = to_tensors(ImageSet(images_u8, np.zeros(len(images_u8), np.int64), ("0",)), mean, std)
    with torch.no_grad():
        return torch.cat([head(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()


def _targets(run_dir: Path, test, runner, keys) -> tuple[np.ndarray, np.ndarray, str]:
    """(test indices, int8 features NCHW float) from the cloud's store, or from the local runner."""
    from edgeveil.cloud_sim.store import read_store

    from .device_stage import read_sent

    index = read_sent(run_dir)
    frames = [f for f in read_store(run_dir, keys) if f.model_id == runner.model_id] if index else []
    frames = [f for f in frames if f.request_id.hex() in index]
    if frames:
        idx = np.array([index[f.request_id.hex()] for f in frames])
        feats = np.concatenate([f.dequantized() for f in frames]).transpose(0, 3, 1, 2)
        return idx, np.ascontiguousarray(feats, np.float32), f"{len(frames)} frames the cloud received"
    log.info("no stored frames for %s: running the device runner locally on the test split", runner.model_id)
    feats = runner.run(test.x).to_nchw()
    return np.arange(len(test)), feats, "the device runner, locally (no frames stored)"


def attack_stage(cfg, run_dir: Path, names: list[str] | None = None, progress: bool = True) -> dict:
    """Run the attacks on float and int8 features; write cloud/attacks.json and one grid per attack."""
    from edgeveil.cloud_sim import metrics
    from edgeveil.cloud_sim.attacks import ATTACKS, create
    from edgeveil.cloud_sim.attacks.base import AttackContext
    from edgeveil.cloud_sim.grid import save_grid
    from edgeveil.cloud_sim.store import default_keys_path, load_or_create_keys
    from edgeveil.device.manifest import write_json_atomic
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits

    run_dir = Path(run_dir)
    names = list(names or cfg.attack.names)
    attacks = {n: create(n, **cfg.attack.options.get(n, {})) for n in names}  # validate before work
    run = load_run(run_dir)
    splits = load_splits(run.info)
    mean, std = run.info["input"]["mean"], run.info["input"]["std"]
    runner = HeadRunner(run_dir / "export", "int8", noise_seed=cfg.seed)
    idx, target_q, source = _targets(run_dir, splits.test, runner, load_or_create_keys(default_keys_path(run_dir)))
    target_u8 = splits.test.x[idx]
    target_images = (target_u8.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    aux_u8 = splits.aux.x
    aux_images = (aux_u8.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    features = {
        "float": (_float_features(run.head, aux_u8, mean, std), _float_features(run.head, target_u8, mean, std)),
        "int8": (runner.run(aux_u8).to_nchw(), target_q),
    }
    out = {"schema": "edgeveil.attacks/1", "targets": {"n": len(idx), "source": source},
           "aux": {"n": len(aux_u8), "source": "attacker auxiliary split, queried through the same artifact"},
           "ssim_convention": {**metrics.SSIM_CONVENTION,
                               "summary": f"torchmetrics, {metrics.SSIM_CONVENTION['window']} window, "
                                          "data range 1, whole map incl. border"},
           "attacks": {}}
    for name, attack in attacks.items():
        entry = {"threat_model": attack.threat_model.describe(), "paper": ATTACKS[name][2], "precisions": {}}
        recs = {}
        for prec, (aux_f, tgt_f) in features.items():
            t0 = time.perf_counter()
            ctx = AttackContext(aux_images=aux_images, aux_features=aux_f, target_features=tgt_f,
                                target_images=target_images, seed=cfg.seed, progress=progress)
            res = attack.run(ctx)
            recs[prec] = res
            entry["precisions"][prec] = {"summary": res.summary, "seconds": time.perf_counter() - t0,
                                         "info": {k: v for k, v in res.info.items() if k != "restarts"},
                                         "per_image": {k: v.tolist() for k, v in res.scores.items()}}
        if all(r.scores for r in recs.values()):
            mean_d, lo, hi = metrics.paired_bootstrap_diff(recs["int8"].scores["ssim"], recs["float"].scores["ssim"])
            entry["difference"] = {"metric": "ssim", "mean": mean_d, "ci95": [lo, hi]}
        if all(r.reconstructions is not None for r in recs.values()):
            grid = f"{name}.png"
            save_grid(target_images, {p: r.reconstructions for p, r in recs.items()}, run_dir / "cloud" / grid,
                      title=f"{name}: originals, then reconstructions from float and int8 features")
            entry["grid"] = grid
        out["attacks"][name] = entry
    write_json_atomic(run_dir / "cloud" / "attacks.json", out)
    return out
