"""`edgeveil sweep`: every cell of a sweep file run as Ray tasks, baselines first, then the sweep report.

Each stage of a cell (train, export, bench, attack) is one Ray task that declares its CPUs, and a
GPU when the cluster has one. The driver submits a cell's next stage when the previous one
finished, holds at most `max_parallel` cells in flight, and submits a defended cell's attack only
after its baseline's attack finished (the verdict reads it). A stage already finished (by an earlier
run of the same command) is skipped; an interrupted one resumes through the stage's own resume. A
stage that fails is retried once by Ray, whether it raised or its worker died; then its cell is
recorded as failed with the error, and the other cells go on. Ctrl-C (SIGINT to the driver) stops
the running stages, records the sweep as interrupted, and shuts a local Ray down.

Without an address a local Ray starts on 127.0.0.1 and is shut down at the end; with one, the
sweep joins that cluster (the sweep folder must be on a file system every node sees).

    run_sweep(sweep_path, out, address=None, max_parallel=None, progress=True) -> dict  # sweep.json
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .sweep_grid import Cell, Sweep, SweepError, load_sweep

__all__ = ["run_sweep", "SweepError"]

log = logging.getLogger(__name__)
BENCH_RUNS = 50          # timed runs per setting in a sweep's bench stage (one thread, XNNPACK on and off)
EVENTS = "sweep_events.jsonl"
WAIT_SLICE = 0.5         # seconds the driver blocks in ray.wait before it checks for Ctrl-C


def _event(out: Path, **fields) -> None:
    """One line per task start or end, appended by whichever process runs the task."""
    from edgeveil.device.files import append_jsonl

    append_jsonl(out / EVENTS, {"time": round(time.time(), 3), "pid": os.getpid(), **fields})


def _run_stage(stage: str, config: dict, run_dir: str, out: str, cell: str, threads: int) -> dict:
    """The body of every Ray task: one stage of one cell, in the worker process."""
    import torch

    from .config import from_dict

    torch.set_num_threads(max(1, threads))
    _event(Path(out), cell=cell, stage=stage, event="start")
    t0, cfg, run = time.perf_counter(), from_dict(config), Path(run_dir)
    if stage == "train":
        from .stages import train_stage
        train_stage(cfg, run, progress=False)
    elif stage == "export":
        from .stages import export_stage
        export_stage(cfg, run, progress=False)
    elif stage == "bench":
        from .device_stage import bench_stage
        bench_stage(run, runs=BENCH_RUNS, threads=(1,), progress=False)
    elif stage == "attack":
        from .attack_stage import attack_stage
        attack_stage(cfg, run, progress=False)
    seconds = time.perf_counter() - t0
    _event(Path(out), cell=cell, stage=stage, event="end", seconds=round(seconds, 2))
    return {"seconds": seconds, "pid": os.getpid()}


def _finished(stage: str, cell: Cell) -> bool:
    """Whether an earlier run of the sweep already finished this stage (so it is skipped, not rerun)."""
    run, cfg = cell.run_dir, cell.cfg
    if stage == "train":
        return (run / "train" / "model.json").is_file()
    manifest = run / "export" / "manifest.json"
    if stage == "export":
        from edgeveil.export.targets import current_manifest
        return current_manifest(run, cfg.export.precisions, cfg.export.calibration_samples,
                               cfg.export.clamp_outliers) is not None
    later = lambda p: p.is_file() and manifest.is_file() and p.stat().st_mtime >= manifest.stat().st_mtime  # noqa: E731
    if stage == "bench":
        return later(run / "device" / "bench.json")
    attacks = run / "cloud" / "attacks.json"
    if not later(attacks):
        return False
    done = json.loads(attacks.read_text())
    return set(cfg.attack.names) <= set(done.get("attacks", {})) and all(
        not e.get("error") for e in done["attacks"].values())


def _preflight(sweep: Sweep) -> None:
    """Every cell's data and attack needs checked against its splits, before Ray starts."""
    from edgeveil.training import archs

    from .stages import _check_same_training, _resolve, preflight, read_run_config

    for cell in sweep.cells:
        cfg = cell.cfg
        try:
            if (cell.run_dir / "config.yaml").is_file():  # resolve the defaults as that run resolved them
                old = read_run_config(cell.run_dir)
                split = cfg.model.split if cfg.model.split is not None else archs.default_split(cfg.model.arch)
                _check_same_training(cell.run_dir, _resolve(cfg, cfg.data.image_size or old.data.image_size, split))
            for line in preflight(cell.cfg):
                log.info("%s: preflight: %s", cell.name, line)
        except (ValueError, FileNotFoundError) as e:
            raise SweepError(f"{sweep.path}: cell {cell.name}: {e}") from None


def _connect(address: str | None, cpus: int | None) -> bool:
    """Join the cluster at `address`, or start a local Ray on 127.0.0.1; True when we started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                    or (Path.home() / ".ray" / "auth_token").is_file()):
        # `ray start --head` (Ray 2.5x+) turns token authentication on and writes the token to
        # ~/.ray/auth_token; a driver sends it only in token mode (which also works when the cluster
        # has authentication off). Ray reads this when it is imported.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    return True


def _error_text(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".strip()
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


class _Driver:
    """Submits stages as their inputs become ready; one object per sweep invocation."""

    def __init__(self, sweep: Sweep, max_parallel: int, bar):
        import ray

        self.ray, self.sweep, self.max_parallel, self.bar = ray, sweep, max_parallel, bar
        gpus = sweep.gpus
        if gpus == "auto":
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.gpus = float(gpus)
        self.task = ray.remote(_run_stage)
        self.state = {c.name: {"status": "pending", "stages": {}} for c in sweep.cells}
        self.cells = {c.name: c for c in sweep.cells}
        self.queue = list(sweep.cells)          # baselines first (load_sweep sorts them)
        self.active: dict = {}                  # object ref -> (cell name, stage)
        self.waiting: list[str] = []            # cells whose attack waits for their baseline
        self.running: set[str] = set()

    def _submit(self, cell: Cell, index: int) -> None:
        stages = self.sweep.stages
        while index < len(stages) and _finished(stages[index], cell):
            self.state[cell.name]["stages"][stages[index]] = {"status": "finished earlier"}
            self.bar.update(1)
            index += 1
        if index == len(stages):
            self._close(cell.name, "done")
            return
        stage = stages[index]
        if stage == "attack" and cell.baseline is not None:
            base = self.state[cell.baseline]["status"]
            if base == "failed":
                self._fail(cell.name, stage, f"its baseline {cell.baseline} failed, so it cannot be judged")
                return
            if base != "done":
                self.waiting.append(cell.name)
                return
        gpu = self.gpus if stage in ("train", "attack") else 0
        ref = self.task.options(num_cpus=self.sweep.cpus, num_gpus=gpu, max_retries=1, retry_exceptions=True,
                                name=f"{cell.name}:{stage}").remote(
            stage, cell.cfg.to_dict(), str(cell.run_dir), str(self.sweep.out), cell.name, int(self.sweep.cpus))
        self.active[ref] = (cell.name, stage)
        self.state[cell.name]["status"] = "running"

    def _close(self, name: str, status: str) -> None:
        self.state[name]["status"] = status
        self.running.discard(name)
        for other in [w for w in self.waiting if self.cells[w].baseline == name]:
            self.waiting.remove(other)
            self._submit(self.cells[other], self.sweep.stages.index("attack"))

    def _fail(self, name: str, stage: str, error: str) -> None:
        self.state[name]["stages"][stage] = {"status": "failed", "error": error}
        self.state[name]["error"] = f"{stage}: {error}"
        remaining = len(self.sweep.stages) - len(self.state[name]["stages"])
        self.bar.update(remaining + 1)
        self._close(name, "failed")

    def run(self) -> dict:
        while self.queue or self.active or self.waiting:
            while self.queue and len(self.running) < self.max_parallel:
                cell = self.queue.pop(0)
                self.running.add(cell.name)
                self._submit(cell, 0)
            if not self.active:
                if self.waiting and not self.queue:  # cannot happen: a baseline always precedes its cells
                    raise RuntimeError(f"cells wait on baselines that never ran: {self.waiting}")
                continue
            ready: list = []
            while not ready:  # in slices: a blocking wait would hold Ctrl-C until the stage ends
                ready, _ = self.ray.wait(list(self.active), num_returns=1, timeout=WAIT_SLICE)
            name, stage = self.active.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except Exception as e:  # Ray already retried once
                self._fail(name, stage, _error_text(e))
                self._postfix()
                continue
            self.state[name]["stages"][stage] = {"status": "done", "seconds": round(result["seconds"], 2)}
            self.bar.update(1)
            self._submit(self.cells[name], self.sweep.stages.index(stage) + 1)
            self._postfix()
        return self.state

    def cancel(self) -> list[str]:
        """Stop every running stage (its worker is killed; the stage resumes on the next run)."""
        for ref in self.active:
            self.ray.cancel(ref, force=True)
        return sorted(f"{name}:{stage}" for name, stage in self.active.values())

    def _postfix(self) -> None:
        done = sum(s["status"] == "done" for s in self.state.values())
        failed = sum(s["status"] == "failed" for s in self.state.values())
        self.bar.set_postfix_str(f"{done}/{len(self.state)} cells done" + (f", {failed} failed" if failed else ""))


def _attempts(out: Path) -> dict:
    """How many times each (cell, stage) started, from the task events."""
    counts: dict = {}
    path = out / EVENTS
    if path.is_file():
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "start":
                counts[(e["cell"], e["stage"])] = counts.get((e["cell"], e["stage"]), 0) + 1
    return counts


def run_sweep(sweep_path, out, *, address: str | None = None, max_parallel: int | None = None,
              progress: bool = True) -> dict:
    """Run every cell; write sweep.json, each run's report and the sweep report. Returns sweep.json."""
    from tqdm.auto import tqdm

    from edgeveil.device.files import atomic_write_json

    from .report import write_report
    from .sweep import write_sweep_report

    if max_parallel is not None and max_parallel < 1:
        raise SweepError(f"--max-parallel must be at least 1, got {max_parallel}")
    sweep = load_sweep(sweep_path, out)
    _preflight(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {"schema": "edgeveil.sweep/1", **sweep.plan(), "address": address or "local"}
    atomic_write_json(sweep.out / "sweep.json", {**record, "status": "running"})
    local = _connect(address, None)
    try:
        import ray

        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // sweep.cpus))
        parallel = min(max_parallel or slots, slots, len(sweep.cells))
        with tqdm(total=len(sweep.cells) * len(sweep.stages), unit="stage", desc="sweep", disable=not progress,
                  dynamic_ncols=True) as bar:
            driver = _Driver(sweep, parallel, bar)
            try:
                state = driver.run()
            except KeyboardInterrupt:
                stopped = driver.cancel()
                atomic_write_json(sweep.out / "sweep.json", {**record, "status": "interrupted", "stopped": stopped,
                                                             "cells_state": driver.state})
                print(f"sweep interrupted; stopped {', '.join(stopped) or 'nothing'}. Rerun the same command to "
                      "resume: finished stages are skipped.", file=sys.stderr)
                raise
    finally:
        if local:
            import ray
            ray.shutdown()
    attempts = _attempts(sweep.out)
    for name, s in state.items():
        for stage, st in s["stages"].items():
            st["attempts"] = attempts.get((name, stage), 0)
    failed = sorted(n for n, s in state.items() if s["status"] == "failed")
    for cell in sweep.cells:
        if state[cell.name]["status"] == "done":
            write_report(cell.run_dir)
    record.update(status="failed" if failed else "done", failed=failed, cells_state=state,
                  parallel=parallel, seconds=round(time.time() - started, 1))
    atomic_write_json(sweep.out / "sweep.json", record)
    if any(state[c.name]["status"] == "done" for c in sweep.cells):
        write_sweep_report(sweep.out)
    return record
