"""Stage 4 as the adversary: attack the features the cloud received, float against int8, same inputs.

Targets are the frames in ``cloud/features/`` (verified again under the device key), joined with
the device's record of which test image each one was (``device/sent.jsonl``, ground truth used only
for scoring). Without stored frames the device runner produces the same features locally. The
attacker's auxiliary queries go through the same artifact as the targets: the int8 TFLite head for
int8 features, the PyTorch head for float ones (with the activation clamps export chose, if any: export/clip.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeveil.device.files import read_json
from edgeveil.device.manifest import clamp_bounds
from edgeveil.export.clip import clamped_head

log = logging.getLogger(__name__)

__all__ = ["attack_stage"]


def _float_features(head, images_u8: np.ndarray, mean, std) -> np.ndarray:
    import torch

    from edgeveil.training.data import ImageSet, to_tensors

    x, _ = to_tensors(ImageSet(images_u8, np.zeros(len(images_u8), np.int64), ("0",)), mean, std)
    with torch.no_grad():
        return torch.cat([head(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy()


def _float_id(info: dict, manifest: dict) -> str:
    """What identifies the float deployment: the trained head, and the clamps export put in it."""
    head = info.get("files", {}).get("head.pt", "torch")
    clamps = clamp_bounds(manifest)
    return head if not clamps else f"{head}, clamped {json.dumps(clamps, sort_keys=True)}"


def _to_u8(images01: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8 pixels, as a camera would give them."""
    x = np.asarray(images01, dtype=np.float32)
    if x.ndim != 4 or not np.isfinite(x).all():
        raise ValueError(f"query images must be finite (N, C, H, W) arrays, got shape {x.shape}")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _qparams(detail: dict, grid: dict | None = None) -> dict | None:
    """{"scale", "zero_point", "qmin", "qmax"} of a tensor, on `grid` (a manifest `sent`) if given."""
    grid = detail if grid is None else grid
    if grid.get("scale") is None:
        return None
    info = np.iinfo(np.dtype(detail["dtype"]))
    return {"scale": float(grid["scale"]), "zero_point": int(grid["zero_point"]),
            "qmin": int(info.min), "qmax": int(info.max)}


class _FloatQuery:
    """The PyTorch head (and the manifest's noise, in float) as a query function."""

    def __init__(self, head, mean, std, noise, seed: int):
        from edgeveil.device.noise import add_float_noise

        self.head, self.mean, self.std, self.noise = head, mean, std, noise
        self._add, self._rng = add_float_noise, np.random.default_rng(seed)

    def __call__(self, images01: np.ndarray) -> np.ndarray:
        feats = _float_features(self.head, _to_u8(images01), self.mean, self.std)
        return self._add(feats, self.noise, self._rng)[0]


class _ArtifactQuery:
    """A TFLite artifact through the device runner (noise included) as a query function."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, images01: np.ndarray) -> np.ndarray:
        return self.runner.run(_to_u8(images01)).to_nchw()


def _victims(run, runners: dict, manifest: dict, seed: int) -> dict:
    """precision -> Victim: what each deployment exposes to an attacker with the right access."""
    from edgeveil.cloud_sim.attacks.base import Victim

    mean, std = run.info["input"]["mean"], run.info["input"]["std"]
    noise = manifest.get("inference_noise")
    c, h, _ = run.info["input"]["shape"]
    arch = {"arch": run.info["arch"], "split": run.info["split"], "width": run.info["width"], "in_channels": c,
            "image_size": h, "num_classes": int(run.info["num_classes"]), "options": run.info.get("arch_options", {})}
    common = dict(head=run.head, tail=run.tail, mean=tuple(mean), std=tuple(std), noise=noise,
                  num_classes=int(run.info["num_classes"]), arch=arch)
    out = {"float": Victim("float", _FloatQuery(run.head, mean, std, noise, seed), **common)}
    for prec, runner in runners.items():
        entry = manifest["artifacts"][prec]
        out[prec] = Victim(prec, _ArtifactQuery(runner), input_quant=_qparams(entry["inputs"][0]),
                           output_quant=_qparams(entry["outputs"][0]),
                           sent_quant=_qparams(entry["outputs"][0], entry["sent"]), **common)
    return out


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


def _record_key(name: str, attack, prec: str, victim, victim_id: str, idx: np.ndarray, n_aux: int,
                seed: int) -> str:
    """What an (attack, precision) result depends on; a stored result with another key is redone.
    With runtime noise, how the device applies it (the spec and the grid it sends on) is part of it."""
    fields = {"attack": name, "options": attack.options, "precision": prec, "artifact": victim_id,
              "targets": hashlib.sha256(np.ascontiguousarray(idx, np.int64).tobytes()).hexdigest(),
              "aux": n_aux, "seed": seed}
    if victim.noise is not None:
        q = victim.sent_quant
        fields["noise"] = {"spec": victim.noise, "sent": None if q is None else (q["scale"], q["zero_point"])}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_record(folder: Path, stem: str, key: str):
    """(entry, reconstructions or None) of a finished (attack, precision), or None to (re)do it."""
    try:
        rec = read_json(folder / f"{stem}.json")
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    recon = None
    if rec.get("reconstructions"):
        try:
            with np.load(folder / rec["reconstructions"], allow_pickle=False) as z:
                recon = z["reconstructions"].astype(np.float32) / 255.0
        except (OSError, KeyError, ValueError):
            return None
    return rec, recon


def _save_record(folder: Path, stem: str, rec: dict, recon: np.ndarray | None) -> None:
    from edgeveil.device.files import atomic_write_bytes, atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    if recon is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, reconstructions=np.clip(np.rint(recon * 255), 0, 255).astype(np.uint8))
        atomic_write_bytes(folder / f"{stem}.npz", buf.getvalue())
        rec["reconstructions"] = f"{stem}.npz"
    atomic_write_json(folder / f"{stem}.json", rec)


def attack_stage(cfg, run_dir: Path, names: list[str] | None = None, progress: bool = True) -> dict:
    """Run the attacks on float, int8 (and fp16) features of the same inputs; write cloud/attacks.json.

    Each finished (attack, precision) is kept in cloud/attacks/ with a key over what it depends on,
    so a rerun after an interruption resumes: finished pairs are read back, not recomputed.
    """
    from edgeveil.cloud_sim import metrics
    from edgeveil.cloud_sim.attacks import create
    from edgeveil.cloud_sim.grid import save_grid
    from edgeveil.cloud_sim.preflight import attack_plan, describe_plan, split_sizes
    from edgeveil.cloud_sim.verdict import failing_compression, verdict
    from edgeveil.cloud_sim.store import default_keys_path, load_or_create_keys
    from edgeveil.device.files import atomic_write_json
    from edgeveil.device.runner import HeadRunner
    from edgeveil.training.runfile import load_run, load_splits

    run_dir = Path(run_dir)
    names = list(names or cfg.attack.names)
    for n in names:  # invalid names and options fail before anything loads
        create(n, **cfg.attack.options.get(n, {}))
    run = load_run(run_dir)
    baseline = _read_baseline(cfg, run.info)  # a wrong baseline fails before the long work
    splits = load_splits(run.info)
    plan = attack_plan(names, cfg.attack.options, split_sizes(splits, int(run.info["num_classes"])))
    for line in describe_plan(plan):
        log.warning(line)
    attacks = {n: p.attack for n, p in plan.items() if p.skip is None}
    runners = {"int8": HeadRunner(run_dir / "export", "int8", noise_seed=cfg.seed)}
    manifest = runners["int8"].manifest
    # The float deployment is the head as exported: with the activation clamps export chose, if any.
    run = run._replace(head=clamped_head(run.head, manifest))
    for prec in cfg.attack.precisions:
        if prec not in ("float", "int8") and prec in manifest["artifacts"]:
            runners[prec] = HeadRunner(run_dir / "export", prec, noise_seed=cfg.seed)
    skipped = [p for p in cfg.attack.precisions if p != "float" and p not in manifest["artifacts"]]
    if skipped:
        log.info("not exported, so not attacked: %s", ", ".join(skipped))
    victims = _victims(run, {p: r for p, r in runners.items() if p in cfg.attack.precisions}, manifest, cfg.seed)
    idx, target_q, source = _targets(run_dir, splits.test, runners["int8"],
                                     load_or_create_keys(default_keys_path(run_dir)))
    to01 = lambda u8: (u8.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)  # noqa: E731
    target_images, aux_images = to01(splits.test.x[idx]), to01(splits.aux.x)
    labelled = splits.labelled
    victim_images = to01(splits.victim_train.x) if any(a.wants_victim_images for a in attacks.values()) else None
    target_features = {p: (target_q if p == "int8" else v.query(target_images)) for p, v in victims.items()}
    artifact_ids = {p: (_float_id(run.info, manifest) if p == "float" else manifest["artifacts"][p]["sha256"])
                    for p in victims}
    out = {"schema": "edgeveil.attacks/2",
           "targets": {"n": len(idx), "source": source, "indices": [int(i) for i in idx]},
           "aux": {"n": len(aux_images), "source": "attacker auxiliary split, queried through the same artifact"},
           "labelled": {"n": len(labelled)}, "precisions": list(victims),
           "inference_noise": manifest.get("inference_noise"),
           "noise_after_rounding": manifest["artifacts"]["int8"].get("noise_after_rounding"),
           "ssim_convention": metrics.SSIM_CONVENTION,
           "attacks": {}}
    inputs = _Inputs(idx, aux_images, splits.aux.y, target_images, splits.test.y[idx], to01(labelled.x),
                     labelled.y, victim_images)
    evaluator, out["evaluator"] = _evaluator(splits, inputs, int(run.info["num_classes"]), cfg.seed, progress)
    features = _Features(victims, inputs, target_features)
    for name, p in plan.items():
        if p.skip is not None:
            out["attacks"][name] = {"skipped": p.skip, "precisions": {},
                                    "threat_model": p.attack.threat_model.describe(), "options": p.attack.options}
    for name, attack in attacks.items():
        try:
            entry, recons = _attack_entry(name, attack, features, inputs, run_dir / "cloud" / "attacks",
                                          artifact_ids, cfg.seed, progress)
        except Exception as e:  # one failing attack must not cost the others, the verdict or the report
            log.exception("attack %s failed", name)
            out["attacks"][name] = {"error": f"{type(e).__name__}: {e}", "precisions": {},
                                    "threat_model": attack.threat_model.describe(), "options": attack.options}
            continue
        _score_all(entry, recons, name, inputs, evaluator, cfg.seed)
        entry["differences"] = _differences(entry["precisions"], metrics)
        again = failing_compression(entry, cfg.attack.tolerance)
        if again:  # a compression failure counts only if it replicates with another attack seed
            entry["replicate"] = _replicate(name, attack, ["float", *again], features, inputs, run_dir, artifact_ids,
                                            evaluator, cfg.seed + 1, progress)
        if plan[name].scaled:
            entry["scaled_to_data"] = plan[name].scaled
        if recons and all(r is not None for r in recons.values()):
            grid = f"{name}.png"
            save_grid(target_images, recons, run_dir / "cloud" / grid,
                      title=f"{name}: originals, then reconstructions from " + ", ".join(recons) + " features")
            entry["grid"] = grid
        out["attacks"][name] = entry
    out["verdict"] = verdict(out, cfg.attack.tolerance, baseline, defense=run.info.get("defense", {}).get("name"),
                             power=cfg.attack.power)
    atomic_write_json(run_dir / "cloud" / "attacks.json", out)
    return out


def _evaluator(splits, inputs, num_classes: int, seed: int, progress: bool):
    """(the auditor's evaluator or None, its attacks.json entry: accuracy on the original targets)."""
    from edgeveil.cloud_sim import metrics
    from edgeveil.cloud_sim.evaluator import ARCH, evaluator_problems, get_evaluator

    ev_split = splits.evaluator
    problems = (["this run has no evaluator split (trained before it existed): train it again"]
                if ev_split is None else evaluator_problems(ev_split.y, num_classes))
    if problems:
        log.warning("no identification scores: %s", "; ".join(problems))
        return None, {"available": False, "reason": "; ".join(problems), "arch": ARCH}
    ev = get_evaluator(ev_split.x, ev_split.y, num_classes, seed=seed, progress=progress)
    on_originals = ev.correct(inputs.target_images, inputs.target_labels)
    entry = {"available": True, "arch": ev.info["arch"], "trained_on": ev.info["trained_on"],
             "validation_accuracy": ev.info["validation_accuracy"], "cache_key": ev.info["key"],
             "data": "the auditor's evaluator split: disjoint from the victim's training set, the attacker's "
                     "auxiliary set and the targets",
             "on_originals": metrics.summarize(on_originals, seed=seed)}
    return ev, entry


def _score_reconstructions(result: dict, recon: np.ndarray, inputs, evaluator, seed: int) -> None:
    """Score the reconstructions as saved (uint8 pixels), so anyone can recompute the report from the
    .npz: interior SSIM, PSNR, MSE, and the evaluator's identification of each one."""
    from edgeveil.cloud_sim import metrics

    saved = np.clip(np.rint(recon * 255), 0, 255).astype(np.float32) / 255.0
    scores = metrics.image_scores(inputs.target_images, saved)
    if evaluator is not None:
        scores.update(evaluator.correct(saved, inputs.target_labels))
    result["summary"].update(metrics.summarize(scores, seed=seed))
    result["per_image"].update({k: np.asarray(v).tolist() for k, v in scores.items()})


class _Inputs(NamedTuple):
    """What every attack gets, whatever the precision (images (N, C, H, W) in [0, 1])."""
    indices: np.ndarray         # test-set index of each target
    aux_images: np.ndarray
    aux_labels: np.ndarray
    target_images: np.ndarray   # ground truth, for scoring
    target_labels: np.ndarray
    labelled_images: np.ndarray
    labelled_labels: np.ndarray
    victim_images: np.ndarray | None  # loaded only when an attack asks for them


class _Features:
    """Features per precision, each queried once through its victim and shared by every attack."""

    def __init__(self, victims: dict, inputs: _Inputs, targets: dict):
        self.victims, self._inputs, self.targets, self._cache = victims, inputs, targets, {}

    def of(self, prec: str, what: str) -> np.ndarray | None:
        """what: "aux" or "labelled" (None when there are no labelled samples)."""
        if (prec, what) not in self._cache:
            images = self._inputs.aux_images if what == "aux" else self._inputs.labelled_images
            self._cache[prec, what] = self.victims[prec].query(images) if len(images) else None
        return self._cache[prec, what]


def _replicate(name: str, attack, precisions: list[str], features: _Features, inputs: _Inputs, run_dir: Path,
               artifact_ids: dict, evaluator, seed: int, progress: bool) -> dict:
    """The attack again with another seed on `precisions`, scored like the first run: {"seed", "precisions"}.
    If it fails, {"seed", "error"}: the failing check then stands, untested."""
    log.warning("%s: a compression check fails; running it again with attack seed %d on %s features to see "
                "whether that replicates", name, seed, ", ".join(precisions))
    try:
        entry, recons = _attack_entry(name, attack, features, inputs, run_dir / "cloud" / "attacks", artifact_ids,
                                      seed, progress, precisions=precisions, suffix=f".seed{seed}")
    except Exception as e:  # the first run's results, the verdict and the report still come
        log.exception("attack %s with seed %d failed", name, seed)
        return {"seed": seed, "error": f"{type(e).__name__}: {e}"}
    _score_all(entry, recons, name, inputs, evaluator, seed, suffix=f".seed{seed}")
    return {"seed": seed, "precisions": entry["precisions"]}


def _score_all(entry: dict, recons: dict, name: str, inputs, evaluator, seed: int, suffix: str = "") -> None:
    """Score each precision's reconstructions (when every precision has them) and name their .npz."""
    if not recons or any(r is None for r in recons.values()):
        return
    for prec, recon in recons.items():
        _score_reconstructions(entry["precisions"][prec], recon, inputs, evaluator, seed)
        entry["precisions"][prec]["reconstructions"] = f"attacks/{name}.{prec}{suffix}.npz"  # uint8, as scored


def _attack_entry(name: str, attack, features: _Features, inputs: _Inputs, folder: Path, artifact_ids: dict,
                  seed: int, progress: bool, precisions: list[str] | None = None,
                  suffix: str = "") -> tuple[dict, dict]:
    """One attack on every precision (or those given), finished ones read back from `folder`;
    (entry, reconstructions). Records are NAME.PRECISION{suffix}.json/.npz."""
    entry = {"threat_model": attack.threat_model.describe(), "description": attack.description,
             "paper": attack.paper, "options": attack.options, "precisions": {}}
    recons = {}
    for prec, victim in features.victims.items():
        if precisions is not None and prec not in precisions:
            continue
        stem = f"{name}.{prec}{suffix}"
        key = _record_key(name, attack, prec, victim, artifact_ids[prec], inputs.indices, len(inputs.aux_images),
                          seed)
        done = _load_record(folder, stem, key)
        if done is not None:
            log.info("%s on %s features: finished earlier, read back", name, prec)
            rec, recons[prec] = done
            entry["precisions"][prec] = rec["result"]
            continue
        result, recons[prec] = _run_attack(attack, prec, victim, features, inputs, seed, progress)
        _save_record(folder, stem, {"key": key, "result": result}, recons[prec])
        entry["precisions"][prec] = result
    labels = [r["info"]["labels"] for r in entry["precisions"].values() if "labels" in r.get("info", {})]
    if labels:  # attacks whose label count depends on the data (shadow) report the real one
        entry["threat_model"] = dataclasses.replace(attack.threat_model, labels=int(max(labels))).describe()
    return entry, recons


def _run_attack(attack, prec: str, victim, features: _Features, inputs: _Inputs, seed: int,
                progress: bool) -> tuple[dict, np.ndarray | None]:
    """(the stored result, reconstructions) of one attack on one precision's features."""
    from edgeveil.cloud_sim.attacks.base import AttackContext

    t0 = time.perf_counter()
    ctx = AttackContext(aux_images=inputs.aux_images, aux_features=features.of(prec, "aux"),
                        target_features=features.targets[prec], target_images=inputs.target_images,
                        seed=seed, progress=progress, victim=victim, aux_labels=inputs.aux_labels,
                        labelled_images=inputs.labelled_images, labelled_features=features.of(prec, "labelled"),
                        labelled_labels=inputs.labelled_labels, target_labels=inputs.target_labels,
                        victim_images=inputs.victim_images if attack.wants_victim_images else None)
    res = attack.run(ctx)
    result = {"summary": res.summary, "seconds": time.perf_counter() - t0,
              "info": {k: v for k, v in res.info.items() if k != "restarts"},
              "per_image": {k: np.asarray(v).tolist() for k, v in res.scores.items()}}
    return result, res.reconstructions


def _check_baseline(info: dict, baseline_dir: Path) -> None:
    """The baseline must be the same model on the same data, only without the defense."""
    from edgeveil.training.runfile import read_model_info

    other = read_model_info(baseline_dir)
    keys = ("arch", "split", "width", "num_classes")
    diff = [f"{k}: {other.get(k)!r} here {info.get(k)!r}" for k in keys if other.get(k) != info.get(k)]
    if other["data"].get("splits") != info["data"].get("splits"):
        diff.append("data splits (sizes or hashes) differ")
    if diff:
        raise ValueError(f"attack.baseline {baseline_dir} is not the same model on the same data: {'; '.join(diff)}")


def _read_baseline(cfg, info: dict) -> dict | None:
    """The undefended baseline run's attacks.json (attack.baseline), checked to be the same model and data."""
    if not cfg.attack.baseline:
        return None
    path = Path(cfg.attack.baseline) / "cloud" / "attacks.json"
    try:
        baseline = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"attack.baseline: {path} does not exist; run the attacks on the undefended "
                                "baseline first (edgeveil attack BASELINE_DIR)") from None
    except ValueError as e:
        raise ValueError(f"attack.baseline: {e}") from None
    _check_baseline(info, Path(cfg.attack.baseline))
    return baseline


def _differences(precisions: dict, metrics) -> dict:
    """metric -> precision -> paired (precision - float) mean and 95% bootstrap interval."""
    if "float" not in precisions:
        return {}
    base = precisions["float"]["per_image"]
    out: dict = {}
    for prec, rec in precisions.items():
        if prec == "float":
            continue
        for metric, values in rec["per_image"].items():
            if metric in base and len(base[metric]) == len(values):
                mean_d, lo, hi = metrics.paired_bootstrap_diff(np.asarray(values), np.asarray(base[metric]))
                out.setdefault(metric, {})[prec] = {"mean": mean_d, "ci95": [lo, hi]}
    return out
