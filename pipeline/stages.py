"""The stages in data-flow order, each reading what the one before it wrote in the run directory."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
from pathlib import Path

import yaml

from edgeveil.device.files import atomic_write_json, read_json

from .config import Config, ConfigError, dump_config, from_dict

log = logging.getLogger(__name__)

__all__ = ["train_stage", "export_stage", "read_run_config", "write_run_config"]

_TRAIN_SECTIONS = ("data", "model", "defense", "train", "seed")


def write_run_config(run_dir: Path, cfg: Config) -> None:
    from edgeveil.device.files import atomic_write_text

    atomic_write_text(Path(run_dir) / "config.yaml", dump_config(cfg))


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not an edgeveil run directory")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def train_fingerprint(cfg: Config) -> str:
    d = cfg.to_dict()
    d = {k: d[k] for k in _TRAIN_SECTIONS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _resolve(cfg: Config, image_size: int, split: int) -> Config:
    """Write every default out: the dataset's image size and the architecture's split."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=image_size),
                               model=dataclasses.replace(cfg.model, split=split))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_training(run_dir: Path, cfg: Config) -> None:
    if not (run_dir / "config.yaml").exists():
        return
    old = read_run_config(run_dir)
    if train_fingerprint(old) != train_fingerprint(cfg):
        a = _flat({k: old.to_dict()[k] for k in _TRAIN_SECTIONS})
        b = _flat({k: cfg.to_dict()[k] for k in _TRAIN_SECTIONS})
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ConfigError(f"{run_dir} already holds a run with a different config ({', '.join(diff)} differ); "
                          "use a new --out to train another model")


def _width(value):
    try:
        return float(value) if value not in ("full", "tiny") else value
    except (TypeError, ValueError):
        return value


def _model_info(cfg: Config, model, splits, sizes: dict, norm, defense, settings, history: list[dict]) -> dict:
    """What model.json records: enough to rebuild the model, the data splits and the head's input."""
    import torch

    channels, image_size = splits.test.x.shape[3], splits.test.x.shape[1]
    return {
        "arch": cfg.model.arch, "split": model.split, "width": _width(cfg.model.width),
        "arch_options": cfg.model.options, "num_classes": len(splits.test.class_names),
        "class_names": list(splits.test.class_names),
        "input": {"shape": [channels, image_size, image_size], "layout": "NCHW", "pixel_scale": "x/255",
                  "mean": norm[0], "std": norm[1]},
        "feature_shape": list(model.feature_shape),
        "defense": {"name": cfg.defense.name, "strength": cfg.defense.strength, "options": cfg.defense.options},
        "inference_noise": defense.inference_noise(),
        "seed": cfg.seed,
        "data": {"name": cfg.data.name, "root": cfg.data.root, "download": cfg.data.download,
                 "image_size": image_size, "sizes": sizes, "splits": splits.describe()},
        "train": {**dataclasses.asdict(settings), "epochs_done": len(history),
                  "seconds": sum(r["seconds"] for r in history)},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def preflight(cfg: Config) -> list[str]:
    """Before training: carve the splits as training will, and fit every attack to their sizes.

    Invalid attack names or options raise here (all at once); attacks too large for the data are
    scaled down or skipped, and the lines returned say which, and whether identification can be scored.
    """
    from edgeveil.cloud_sim.evaluator import evaluator_problems
    from edgeveil.cloud_sim.preflight import attack_plan, describe_plan, split_sizes
    from edgeveil.training import data

    image_size = cfg.data.image_size or data.default_image_size(cfg.data.name)
    train_pool, test_pool = data.load_dataset(cfg.data.name, cfg.data.root, download=cfg.data.download,
                                              image_size=image_size)
    splits = data.make_splits(train_pool, test_pool, seed=cfg.seed, victim_train=cfg.data.victim_train,
                              aux=cfg.data.aux, test_size=cfg.data.test, labelled=cfg.data.labelled,
                              evaluator=cfg.data.evaluator)
    classes = len(test_pool.class_names)
    sizes = split_sizes(splits, classes)
    lines = describe_plan(attack_plan(cfg.attack.names, cfg.attack.options, sizes))
    lines += [f"identification cannot be scored, so the verdict will be inconclusive: {p}"
              for p in evaluator_problems(splits.evaluator.y, classes)]
    return [f"splits: {sizes['victim_train']} victim training, {sizes['targets']} test (the attack targets), "
            f"{sizes['aux']} attacker auxiliary, {sizes['labelled']} labelled, {sizes['evaluator']} for the "
            "auditor's evaluator", *lines]


def train_stage(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """Train the split model of ``cfg`` into ``run_dir/train`` (resuming if interrupted)."""
    import torch

    from edgeveil.training import archs, data, defenses
    from edgeveil.training.runfile import save_trained
    from edgeveil.training.trainer import Trainer, TrainSettings, evaluate

    run_dir = Path(run_dir)
    train_dir = run_dir / "train"
    # Validate everything cheap before loading data or training.
    defense = defenses.create(cfg.defense.name, cfg.defense.strength, **cfg.defense.options)
    image_size = cfg.data.image_size or data.default_image_size(cfg.data.name)
    train_pool, test_pool = data.load_dataset(cfg.data.name, cfg.data.root, download=cfg.data.download,
                                              image_size=image_size)
    channels, image_size = test_pool.x.shape[3], test_pool.x.shape[1]
    split = cfg.model.split if cfg.model.split is not None else archs.default_split(cfg.model.arch)
    cfg = _resolve(cfg, image_size, split)
    torch.manual_seed(cfg.seed)  # weight init is part of the seeded run
    model = archs.create(cfg.model.arch, in_channels=channels, image_size=image_size,
                         num_classes=len(test_pool.class_names), split=split,
                         width=_width(cfg.model.width), **cfg.model.options)
    archs.check(model.head, (channels, image_size, image_size))
    _check_same_training(run_dir, cfg)
    if (train_dir / "model.json").exists():
        log.info("%s is already trained; nothing to do", train_dir)
        return read_json(train_dir / "metrics.json")

    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg)
    sizes = {"victim_train": cfg.data.victim_train, "aux": cfg.data.aux, "test_size": cfg.data.test,
             "labelled": cfg.data.labelled, "evaluator": cfg.data.evaluator}
    splits = data.make_splits(train_pool, test_pool, seed=cfg.seed, **sizes)
    mean, std = data.channel_stats(splits.victim_train)
    train_t = data.to_tensors(splits.victim_train, mean, std)
    test_t = data.to_tensors(splits.test, mean, std)
    defense.setup(model.head, model.tail, (channels, image_size, image_size), model.feature_shape,
                  len(test_pool.class_names))

    t = cfg.train
    settings = TrainSettings(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                             optimizer=t.optimizer, device=t.device, seed=cfg.seed,
                             max_steps_per_epoch=t.max_steps_per_epoch, augment=t.augment)
    trainer = Trainer(model.head, model.tail, defense, settings, train_dir, train_fingerprint(cfg))
    history = trainer.fit(train_t, test_t, progress=progress)

    head, tail = trainer.head.cpu().eval(), trainer.tail.cpu().eval()
    defense.to("cpu")
    accuracy = evaluate(head, tail, *test_t, transform=defense.eval_transform)
    info = _model_info(cfg, model, splits, sizes, (mean, std), defense, settings, history)
    metrics = {"schema": "edgeveil.metrics/1", "float_test_accuracy": accuracy,
               "test_size": len(splits.test), "epochs": len(history),
               "train_seconds": info["train"]["seconds"]}
    atomic_write_json(train_dir / "metrics.json", metrics)
    save_trained(train_dir, info, head, tail)
    return metrics


def export_stage(cfg: Config, run_dir: Path, progress: bool = True, target: str | None = None,
                 memory_plan: str = "tflm") -> dict:
    """Export the trained head; with a target board (`target`, else export.target) also write the
    flashable files and the fit report (the manifest's "targets" section). memory_plan "offline"
    (MCU targets) writes an offline-planned copy of the model and its C array (export.targets).

    With a target, a current export is reused instead of converted again: same head.pt and
    model.json, the same precisions and calibration count, every artifact's sha256 intact.
    A new export removes the C arrays of the previous one (they would describe another model).
    """
    from edgeveil.export.memplan import check_memory_plan
    from edgeveil.export.run import export_run

    run_dir, e = Path(run_dir), cfg.export
    target = target or e.target
    manifest = None
    check_memory_plan(memory_plan)
    if target is None and memory_plan != "tflm":
        raise ValueError(f"--memory-plan {memory_plan} needs --target BOARD (an MCU board: edgeveil list boards)")
    if target is not None:
        from edgeveil.export.targets import check_plan_target, current_manifest

        check_plan_target(memory_plan, target)  # an unknown board or plan fails before the long export
        manifest = current_manifest(run_dir, e.precisions, e.calibration_samples, e.clamp_outliers)
        if manifest is not None:
            log.info("%s is current: reusing it for --target %s", run_dir / "export" / "manifest.json", target)
    if manifest is None:
        for stale in (*run_dir.glob("export/head_*.cc"), *run_dir.glob("export/head_*.h"),
                      *run_dir.glob("export/head_*_planned.tflite")):
            stale.unlink()
        manifest = export_run(run_dir, precisions=tuple(e.precisions), calibration_samples=e.calibration_samples,
                              clamp_outliers=e.clamp_outliers,
                              parity_samples=e.parity_samples, progress=progress)
    if target is not None:
        from edgeveil.export.targets import target_report

        manifest["targets"] = target_report(run_dir / "export", target, progress=progress, memory_plan=memory_plan)
    return manifest
