"""What defenses.py and attacks.py share: a benchmark's grid is a sweep file, run by `edgeveil sweep`'s
machinery (a local Ray, or a cluster given an address), and the tables are built from its run directories.

    spec = derive(CONFIG, extra_set=QUICK, only=["cem"])   # the sweep file, budgets cut, defenses kept
    plan = run_grid(CONFIG, out, spec, address=None, max_parallel=None)  # sweep.json of the finished sweep
    plan = read_plan(out)                                     # ... or of one `edgeveil sweep` ran already
    for cell in done_cells(plan): cell["run_dir"], cell["config"], cell["seconds"]

Dataset paths inside the sweep files (and configs/cifar10.yaml) are relative to the checkout's root,
so the scripts run the sweep from there (`at_repo_root`), and so should `edgeveil sweep`.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "benchmarks" / "configs"
DERIVED = "sweep_file.yaml"  # the sweep file a script ran, written into the sweep folder when it differs


def at_repo_root() -> None:
    """The sweep files name datasets relative to the checkout (as configs/cifar10.yaml does)."""
    os.chdir(REPO)


def derive(path: Path, extra_set: list[str] = (), only: list[str] | None = None) -> dict:
    """The sweep file as a mapping, with `extra_set` appended to its `set` and the grid's defenses cut to
    `only` (and `none`); base_config made absolute, so the result can be written anywhere."""
    spec = yaml.safe_load(Path(path).read_text())
    if "base_config" in spec:
        spec["base_config"] = str((Path(path).parent / spec["base_config"]).resolve())
    if extra_set:
        spec["set"] = [*(spec.get("set") or []), *extra_set]
    if only is not None:
        grid = spec["grid"]["defenses"]
        unknown = [d for d in only if d not in grid]
        if unknown:
            raise ValueError(f"{path}: no defense {', '.join(unknown)} in its grid; it has {', '.join(grid)}")
        spec["grid"]["defenses"] = {d: s for d, s in grid.items() if d == "none" or d in only}
    return spec


def grid_defenses(spec: dict) -> dict[str, list[float]]:
    """defense -> its strengths, in the sweep file's order (`none` left out)."""
    return {d: [float(s) for s in strengths] for d, strengths in spec["grid"]["defenses"].items() if d != "none"}


def run_grid(path: Path, out: Path, spec: dict, *, address: str | None, max_parallel: int | None) -> dict:
    """Run the sweep (the committed file itself when `spec` is unchanged, else the derived one written into
    `out`) on Ray, resuming whatever an earlier run finished; its sweep.json."""
    from edgeveil.device.files import atomic_write_text
    from edgeveil.pipeline.ray_sweep import SweepError, run_sweep

    file = Path(path)
    if spec != derive(path):
        file = out / DERIVED
        atomic_write_text(file, yaml.safe_dump(spec, sort_keys=False))
    try:
        return run_sweep(file, out, address=address, max_parallel=max_parallel, progress=True)
    except SweepError as e:  # an invalid cell or a failed preflight: named before Ray starts
        raise SystemExit(f"{file}: {e}") from None


def read_plan(out: Path) -> dict:
    """sweep.json of a finished sweep in `out` (by this script or by `edgeveil sweep`)."""
    from edgeveil.device.files import read_json

    path = Path(out) / "sweep.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run the sweep first (without --tables-only, or "
                         "`edgeveil sweep --config benchmarks/configs/... --out` this folder)")
    plan = read_json(path)
    if plan.get("status") == "running" or "cells_state" not in plan:
        raise SystemExit(f"{path}: the sweep has not finished (status {plan.get('status')!r}); rerun the same "
                         "sweep command to resume it")
    return plan


def done_cells(plan: dict) -> list[dict]:
    """The finished cells of a sweep, baselines first: name, run_dir, config, and each stage's seconds
    when it ran in the last invocation (None when an earlier one finished it)."""
    out = []
    for cell in plan["cells"]:
        state = plan["cells_state"][cell["name"]]
        if state["status"] == "done":
            out.append({**cell, "run_dir": Path(cell["run_dir"]),
                        "seconds": {s: st.get("seconds") for s, st in state["stages"].items()}})
    return out


def failed_cells(plan: dict) -> dict[str, str]:
    return {name: s.get("error", "failed") for name, s in plan["cells_state"].items() if s["status"] == "failed"}


def announce(config: Path, out: Path) -> str:
    """What runs where, and the command that runs the full grid on a cluster."""
    rel = config.relative_to(REPO)
    return (f"the sweep {rel} into {out} (on a cluster: edgeveil sweep --config {rel} --out DIR "
            "--address HOST:PORT, then this script with --tables-only)")


def add_sweep_arguments(ap, runs: Path) -> None:
    """The options every sweep-run benchmark takes: where, on which Ray, and tables only."""
    ap.add_argument("--address", help="a running Ray cluster (host:port); default: a local Ray, stopped at the end")
    ap.add_argument("--max-parallel", type=int, help="at most this many cells at once (default: what the CPUs allow)")
    ap.add_argument("--tables-only", action="store_true", help="only the tables, from sweeps already run into "
                    "--runs/<dataset> (by this script or `edgeveil sweep`)")
    ap.add_argument("--runs", type=Path, default=runs, help="one sweep folder per dataset under it")


def sweep_plan(ds: str, config: Path, out: Path, args, extra_set: list[str] = (),
               only: list[str] | None = None) -> dict:
    """sweep.json of dataset `ds`'s sweep in `out`: read with --tables-only (SystemExit naming a missing
    or unfinished one), else run (resumed) with `extra_set` and `only` applied to the sweep file."""
    if args.tables_only:
        return read_plan(out)
    print(f"== {ds}: {announce(config, out)}", flush=True)
    spec = derive(config, extra_set, only)
    return run_grid(config, out, spec, address=args.address, max_parallel=args.max_parallel)
