"""Typed, frozen experiment configs, validated once on load.

Every error names the field, the value and what is allowed, and all problems are
reported at once: ``model.split must be an integer or null, got 'two'``.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "parse_overrides", "merge_dicts", "dump_config"]


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem."""


def _spec(default=None, *, factory=None, choices=None, min=None, max=None, doc=""):
    meta = {"choices": choices, "min": min, "max": max, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    name: str = _spec("digits", doc="digits, mnist, fashion-mnist, cifar10, cifar100, svhn, npz:PATH[,TEST], imagefolder:PATH")
    root: str | None = _spec(None, doc="local folder for torchvision datasets")
    download: bool = _spec(False, doc="let torchvision download a missing dataset")
    image_size: int | None = _spec(None, min=8, max=512, doc="resize to this side; null = the dataset's default")
    victim_train: int | None = _spec(None, min=1, doc="victim training set size; null = the default share")
    aux: int | None = _spec(None, min=1, doc="attacker auxiliary set size; null = the default share")
    test: int | None = _spec(None, min=1, doc="test set size; null = the default share")
    labelled: int = _spec(40, min=0, doc="attacker's labelled samples, balanced over classes")
    evaluator: int | None = _spec(None, min=0, doc="the auditor's labelled set for the identification "
                                                   "classifier, disjoint from every other split; null = the default share")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _spec("smallcnn", doc="a registered architecture: edgeveil list archs")
    split: int | None = _spec(None, min=0, doc="where the head ends; null = the architecture's default")
    width: str | float = _spec("full", doc="'full', 'tiny' or a channel multiplier > 0")
    options: dict = _spec(factory=dict, doc="architecture options")


@dataclass(frozen=True)
class DefenseConfig:
    name: str = _spec("none", doc="a registered defense: edgeveil list defenses")
    strength: float = _spec(0.0, min=0.0, doc="the defense's main coefficient")
    options: dict = _spec(factory=dict, doc="the defense's other coefficients (any other key goes here)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _spec(8, min=1, max=10_000)
    batch_size: int = _spec(64, min=1, max=65_536)
    lr: float = _spec(2e-3, min=0.0)
    weight_decay: float = _spec(1e-4, min=0.0)
    optimizer: str = _spec("adam", choices=["adam", "sgd"])
    device: str = _spec("auto", doc="auto, cpu, cuda or cuda:N")
    max_steps_per_epoch: int | None = _spec(None, min=1, doc="cap on batches per epoch (quick runs)")
    augment: str = _spec("none", choices=["none", "crop", "crop-flip"],
                         doc="training augmentation: random 4-pixel shifts (crop), plus horizontal flips (crop-flip)")


@dataclass(frozen=True)
class ExportConfig:
    precisions: list = _spec(factory=lambda: ["fp32", "fp16", "dynamic", "int8", "int16x8"])
    calibration_samples: int = _spec(200, min=1, max=100_000)
    parity_samples: int = _spec(256, min=1, max=100_000)
    clamp_outliers: str = _spec("auto", choices=["auto", "none"],
                                doc="auto: clamp activations whose rare outliers would take their whole int8 grid")
    target: str | None = _spec(None, doc="a board profile: edgeveil list boards")


# cloud_sim.verdict.DEFAULT_TOLERANCE and DEFAULT_POWER
_TOLERANCE = {"ssim": 0.02, "psnr": 0.5, "identification": 0.02, "accuracy": 0.02}
_POWER = 0.8


@dataclass(frozen=True)
class AttackConfig:
    names: list = _spec(factory=lambda: ["inverse"])
    precisions: list = _spec(factory=lambda: ["float", "int8", "fp16"],
                             doc="feature precisions to attack: float (PyTorch) and exported artifacts; "
                                 "ones the export did not produce are skipped")
    baseline: str | None = _spec(None, doc="run directory of the undefended model trained the same way, "
                                           "for the verdict's defended-against-undefended comparison")
    tolerance: dict = _spec(factory=lambda: dict(_TOLERANCE),
                            doc="how much worse int8 may leak than float: ssim, psnr (dB), identification "
                                "and completion accuracy (fractions)")
    power: float = _spec(_POWER, min=0.0, max=1.0,
                         doc="an attack certifies a defense only if, on the undefended baseline, the evaluator "
                             "identifies at least this share of what it identifies on the originals")
    options: dict = _spec(factory=dict, doc="per-attack options, keyed by attack name")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    seed: int = _spec(0, min=0, max=2**31 - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Sections whose unknown keys are the component's own options rather than typos.
_OPEN_SECTIONS = {"defense": "options", "attack": "options", "model": "options"}
_PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8")


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def _coerce(path: str, value: Any, tp, meta: dict) -> tuple[Any, str | None]:
    """Check one leaf value against its annotation and metadata; return (value, problem)."""
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        return (None, None) if type(None) in allowed else (value, f"{path} must be {_type_name(tp)}, got null")
    ok = None
    for a in allowed:
        if a is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = float(value)
            break
        if a is int and isinstance(value, int) and not isinstance(value, bool):
            ok = value
            break
        if a in (str, bool, list, dict) and isinstance(value, a):
            ok = value
            break
    if ok is None:
        return value, f"{path} must be {_type_name(tp)}, got {value!r}"
    if meta.get("choices") and ok not in meta["choices"]:
        return ok, f"{path} must be one of {', '.join(map(str, meta['choices']))}, got {ok!r}"
    if isinstance(ok, (int, float)) and not isinstance(ok, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and ok < lo) or (hi is not None and ok > hi):
            rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
            return ok, f"{path} must be in {rng}, got {ok!r}"
    return ok, None


def _build(cls, raw: dict, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    raw = dict(raw)
    section = prefix.rstrip(".")
    if section in _OPEN_SECTIONS:
        extra = {k: raw.pop(k) for k in list(raw) if k not in names}
        opts = raw.setdefault(_OPEN_SECTIONS[section], {})
        if isinstance(opts, dict):
            raw[_OPEN_SECTIONS[section]] = {**opts, **extra}
    for key in raw:
        if key not in names:
            problems.append(f"{prefix}{key} is not a known field; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], path + ".", problems)
            continue
        value, problem = _coerce(path, raw[f.name], tp, dict(f.metadata))
        if problem:
            problems.append(problem)
        else:
            kwargs[f.name] = copy.deepcopy(value)
    return cls(**kwargs)


def _check_semantics(cfg: Config, problems: list[str]) -> None:
    width = cfg.model.width
    if isinstance(width, str) and width not in ("full", "tiny"):
        try:
            width = float(width)
        except ValueError:
            problems.append(f"model.width must be 'full', 'tiny' or a number > 0, got {width!r}")
    if isinstance(width, float) and width <= 0:
        problems.append(f"model.width must be 'full', 'tiny' or a number > 0, got {width!r}")
    bad = [p for p in cfg.export.precisions if p not in _PRECISIONS]
    if bad or not cfg.export.precisions:
        problems.append(f"export.precisions must be a non-empty list of {', '.join(_PRECISIONS)}, "
                        f"got {cfg.export.precisions!r}")
    attack_precisions = ("float",) + _PRECISIONS
    bad = [p for p in cfg.attack.precisions if p not in attack_precisions]
    if bad or "float" not in cfg.attack.precisions or len(cfg.attack.precisions) < 2:
        problems.append(f"attack.precisions must list float and at least one of {', '.join(_PRECISIONS)}, "
                        f"got {cfg.attack.precisions!r}")
    tol = cfg.attack.tolerance
    # "mi" is accepted for configs written before MI became a diagnostic; it is not used.
    bad = {k: v for k, v in tol.items() if k not in (*_TOLERANCE, "mi") or isinstance(v, bool)
           or not isinstance(v, (int, float)) or not v >= 0}
    if bad:
        problems.append(f"attack.tolerance takes numbers >= 0 for {', '.join(_TOLERANCE)}, got {bad!r}")
    if not (cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:")):
        problems.append(f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}")


def from_dict(raw: dict) -> Config:
    problems: list[str] = []
    cfg = _build(Config, raw or {}, "", problems)
    if not problems:
        _check_semantics(cfg, problems)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.epochs=3", "defense.base=noise"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects key=value with a dotted key such as train.epochs=3, got {pair!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {e}") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is set to a value and used as a section")
        node[leaf] = value
    return out


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """The mapping in a YAML file; ConfigError naming `what` and the file if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply ``--set`` overrides, validate."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return from_dict(merge_dicts(raw, parse_overrides(overrides or [])))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
