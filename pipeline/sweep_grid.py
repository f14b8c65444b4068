"""A sweep file expanded into cells: one run directory, with its validated config, per combination.

    base_config: configs/cifar10.yaml                  # a run config file every cell starts from
                                                       # (relative to the sweep file); optional
    base: {data: {name: digits}, train: {epochs: 1}}   # config sections merged over base_config (or the defaults)
    grid:
      datasets: [digits]                       # data.name
      archs: [smallcnn, resnet18]              # model.arch
      defenses: {none: [0], noise: [0.5, 1.5]} # defense name -> strengths
      attacks: [inverse]                       # attack.names, run in every cell
      precisions: [float, int8]                # attack.precisions (int8 is always exported)
    set: [model.width=tiny]                    # --set overrides on every cell
    stages: [train, export, bench, attack]     # the default; bench may be left out
    resources: {cpus: 1, gpus: auto}           # per stage task; auto: one GPU when the cluster has one

A cell is (dataset, arch, defense, strength); attacks and precisions are what every cell is attacked
with. A cell's config is base_config, then base, then set, then the grid's values. Each (dataset, arch) gets an undefended baseline (added when the grid has no `none`), and every
defended cell of that (dataset, arch) is judged against it (`attack.baseline`).

    load_sweep(path, out) -> Sweep   # raises SweepError naming the field, before anything runs
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from .config import Config, ConfigError, from_dict, merge_dicts, parse_overrides, read_yaml_mapping

__all__ = ["Cell", "Sweep", "SweepError", "STAGES", "load_sweep"]

STAGES = ("train", "export", "bench", "attack")
_KEYS = {"base", "base_config", "grid", "set", "stages", "resources"}
_GRID_KEYS = {"datasets", "archs", "defenses", "attacks", "precisions"}


class SweepError(ValueError):
    """A sweep file that cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class Cell:
    name: str              # the run directory's name under the sweep folder
    run_dir: Path
    cfg: Config
    baseline: str | None   # the name of the cell this one is judged against (None: it is a baseline)

    @property
    def group(self) -> tuple[str, str]:
        return self.cfg.data.name, self.cfg.model.arch


@dataclass(frozen=True)
class Sweep:
    path: Path
    out: Path
    cells: list[Cell]
    stages: tuple[str, ...]
    cpus: float = 1.0
    gpus: str | float = "auto"
    added_baselines: list[str] = field(default_factory=list)

    def plan(self) -> dict:
        """What sweep.json records about the grid: every cell, its config and its baseline."""
        return {"sweep": str(self.path), "stages": list(self.stages), "resources": {"cpus": self.cpus, "gpus": self.gpus},
                "added_baselines": self.added_baselines,
                "cells": [{"name": c.name, "run_dir": str(c.run_dir), "baseline": c.baseline,
                           "config": c.cfg.to_dict()} for c in self.cells]}


def _label(value) -> str:
    """A short, filesystem-safe label: an npz dataset by its file's stem, a strength as printed by %g."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if text.startswith("npz:"):
        text = Path(text[4:].split(",")[0]).stem
    return "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in text)


def _list_of(raw: dict, key: str, where: str) -> list | None:
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SweepError(f"{where}.{key} must be a non-empty list of names, got {value!r}")
    return value


def _defenses(grid: dict, where: str) -> list[tuple[str, float]]:
    raw = grid.get("defenses", {"none": [0]})
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{where}.defenses must map each defense name to a list of strengths, got {raw!r}")
    pairs = []
    for name, strengths in raw.items():
        if strengths is None:
            strengths = [0]
        if not isinstance(strengths, list) or not strengths or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in strengths):
            raise SweepError(f"{where}.defenses.{name} must be a non-empty list of strengths (numbers), got {strengths!r}")
        pairs += [(str(name), float(s)) for s in strengths]
    return pairs


def _read(path: Path) -> dict:
    try:
        raw = read_yaml_mapping(path, "sweep file")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(_KEYS))}")
    return raw


def _base(raw: dict, path: Path) -> dict:
    """base_config (a run config file, relative to the sweep file), with base's sections merged over it."""
    start: dict = {}
    if "base_config" in raw:
        if not isinstance(raw["base_config"], str) or not raw["base_config"]:
            raise SweepError(f"{path}: base_config must be a path to a run config file, got {raw['base_config']!r}")
        try:
            start = read_yaml_mapping((path.parent / raw["base_config"]).resolve(), f"{path}: base_config")
        except ConfigError as e:
            raise SweepError(str(e)) from None
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"{path}: base must be a mapping of config sections, got {type(base).__name__}")
    return merge_dicts(start, base)


def _resources(raw: dict, path: Path) -> tuple[float, str | float]:
    res = raw.get("resources") or {}
    if not isinstance(res, dict) or set(res) - {"cpus", "gpus"}:
        raise SweepError(f"{path}: resources takes cpus and gpus, got {res!r}")
    cpus, gpus = res.get("cpus", 1), res.get("gpus", "auto")
    if not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or cpus <= 0:
        raise SweepError(f"{path}: resources.cpus must be a positive number, got {cpus!r}")
    if gpus != "auto" and (not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or gpus < 0):
        raise SweepError(f"{path}: resources.gpus must be auto or a number >= 0, got {gpus!r}")
    return float(cpus), gpus


def _stages(raw: dict, path: Path) -> tuple[str, ...]:
    stages = raw.get("stages", list(STAGES))
    if not isinstance(stages, list) or [s for s in stages if s not in STAGES]:
        raise SweepError(f"{path}: stages must be a list among {', '.join(STAGES)}, got {stages!r}")
    missing = [s for s in ("train", "export", "attack") if s not in stages]
    if missing:
        raise SweepError(f"{path}: stages must include train, export and attack (the verdict needs them); "
                         f"missing {', '.join(missing)}")
    return tuple(s for s in STAGES if s in stages)


def _check_components(cfg: Config) -> None:
    """The registered names and their options (the config schema checks types and ranges only)."""
    from edgeveil.cloud_sim.attacks import create as create_attack
    from edgeveil.training import archs, defenses

    known = [n for n, _ in archs.names()]
    if cfg.model.arch not in known:
        raise ConfigError(f"model.arch must be one of {', '.join(known)}, got {cfg.model.arch!r}")
    if cfg.model.split is not None and cfg.model.split not in archs.valid_splits(cfg.model.arch):
        raise ConfigError(f"model.split must be in {archs.valid_splits(cfg.model.arch)} for {cfg.model.arch}, "
                          f"got {cfg.model.split}")
    defenses.create(cfg.defense.name, cfg.defense.strength, **cfg.defense.options)
    for attack in cfg.attack.names:
        create_attack(attack, **cfg.attack.options.get(attack, {}))


def _cell_config(base: dict, overrides: dict, name: str, path: Path) -> Config:
    try:
        cfg = from_dict(merge_dicts(base, overrides))
        _check_components(cfg)
    except (ConfigError, ValueError, TypeError) as e:
        raise SweepError(f"{path}: cell {name}: {e}") from None
    return cfg


def load_sweep(path: str | Path, out: str | Path) -> Sweep:
    """Read and expand a sweep file; every cell's config is validated here, before anything starts."""
    path, out = Path(path).resolve(), Path(out).resolve()
    raw = _read(path)
    base = _base(raw, path)
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or set(grid) - _GRID_KEYS:
        raise SweepError(f"{path}: grid takes {', '.join(sorted(_GRID_KEYS))}, got {sorted(grid) if isinstance(grid, dict) else grid!r}")
    try:
        common = parse_overrides(raw.get("set") or [])
    except ConfigError as e:
        raise SweepError(f"{path}: set: {e}") from None
    base = merge_dicts(base, common)
    where = f"{path}: grid"
    datasets = _list_of(grid, "datasets", where) or [base.get("data", {}).get("name", "digits")]
    archs = _list_of(grid, "archs", where) or [base.get("model", {}).get("arch", "smallcnn")]
    attack = {k: v for k, v in (("names", _list_of(grid, "attacks", where)),
                                ("precisions", _list_of(grid, "precisions", where))) if v is not None}
    defenses = _defenses(grid, where)
    added = []
    cells: list[Cell] = []
    for dataset in datasets:
        for arch in archs:
            prefix = f"{_label(dataset)}-{_label(arch)}"
            pairs = defenses if any(d == "none" for d, _ in defenses) else [("none", 0.0), *defenses]
            if pairs is not defenses:
                added.append(f"{prefix}-none")
            baseline = f"{prefix}-none"
            for defense, strength in pairs:
                is_base = defense == "none"
                name = baseline if is_base else f"{prefix}-{_label(defense)}-{_label(strength)}"
                over = {"data": {"name": dataset}, "model": {"arch": arch},
                        "defense": {"name": defense, "strength": strength},
                        "attack": {**attack, **({} if is_base else {"baseline": str(out / baseline)})}}
                cells.append(Cell(name, out / name, _cell_config(base, over, name, path), None if is_base else baseline))
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: the grid names two cells alike ({', '.join(dupes)}); give `none` one strength "
                         "and each defense distinct strengths")
    cells.sort(key=lambda c: c.baseline is not None)  # baselines first
    cpus, gpus = _resources(raw, path)
    return Sweep(path, out, cells, _stages(raw, path), cpus, gpus, added)
