"""`edgeveil sweep`: the grid expands and validates before anything starts, and real Ray runs it,
locally, on a cluster started with `ray start --head`, through a killed worker and a failing cell."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import QUICK
from edgeveil.pipeline.cli import main
from edgeveil.pipeline.sweep_grid import SweepError, load_sweep

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'edgeveil[sweep]')")

# One epoch and a short inverse attack: the grid tests Ray's scheduling, not the numbers.
TINY = [*[o for o in QUICK if not o.startswith("train.epochs")], "train.epochs=1", "export.precisions=[int8]",
        "export.calibration_samples=50", "attack.inverse.epochs=2", "attack.inverse.restarts=1",
        "attack.inverse.width=16"]


def _sweep_file(tmp: Path, grid: dict, extra: list[str] = (), **top) -> Path:
    path = tmp / "sweep.yaml"
    spec = {"grid": {"datasets": ["digits"], "attacks": ["inverse"], "precisions": ["float", "int8"], **grid},
            "set": [*TINY, *extra], "stages": ["train", "export", "attack"], **top}
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """The real command in its own process, as a user runs it (Ray workers inherit its environment)."""
    return subprocess.run([sys.executable, "-m", "edgeveil.pipeline.cli", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def _events(out: Path) -> list[dict]:
    path = out / "sweep_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- the grid, before Ray ------------------------------------------------------------------------

def test_the_grid_expands_to_one_cell_per_combination_with_the_baseline_first(tmp_path):
    path = _sweep_file(tmp_path, {"archs": ["smallcnn", "resnet18"], "defenses": {"noise": [0.5, 1.5]}})
    sweep = load_sweep(path, tmp_path / "out")
    names = [c.name for c in sweep.cells]
    assert names[:2] == ["digits-smallcnn-none", "digits-resnet18-none"]  # added, and first
    assert sorted(names[2:]) == sorted(f"digits-{a}-noise-{s}" for a in ("smallcnn", "resnet18") for s in ("0.5", "1.5"))
    assert sweep.added_baselines == ["digits-smallcnn-none", "digits-resnet18-none"]
    for cell in sweep.cells[2:]:
        arch = cell.cfg.model.arch
        assert cell.baseline == f"digits-{arch}-none"
        assert cell.cfg.attack.baseline == str(tmp_path / "out" / cell.baseline)
        assert cell.cfg.train.epochs == 1 and cell.cfg.attack.names == ["inverse"]
    assert sweep.cells[0].cfg.attack.baseline is None and sweep.cells[0].cfg.defense.name == "none"


@pytest.mark.parametrize("grid, extra, field", [
    ({"defenses": {"noise": [-1.0]}}, [], "defense.strength"),
    ({"defenses": {"none": [0]}}, ["train.epochs=0"], "train.epochs"),
    ({"archs": ["nosucharch"]}, [], "model.arch"),
    ({"defenses": {"noise": "strong"}}, [], "grid.defenses.noise"),
])
def test_an_invalid_cell_is_refused_before_anything_starts_with_the_field_named(tmp_path, grid, extra, field):
    path = _sweep_file(tmp_path, grid, extra)
    with pytest.raises(SweepError) as e:
        load_sweep(path, tmp_path / "out")
    assert field in str(e.value) and str(path) in str(e.value)


def test_the_command_refuses_an_invalid_cell_without_starting_ray_or_writing(tmp_path, capsys):
    path = _sweep_file(tmp_path, {"defenses": {"none": [0], "noise": [0.5, -2.0]}})
    assert main(["--no-progress", "sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "defense.strength" in err and "digits-smallcnn-noise--2" in err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_base_is_merged_over_base_config_then_set_then_the_grid(tmp_path):
    (tmp_path / "victims.yaml").write_text(yaml.safe_dump(
        {"data": {"name": "digits", "test": 200}, "train": {"lr": 0.5, "batch_size": 16}}))
    path = _sweep_file(tmp_path, {"defenses": {"noise": [0.5]}}, ["train.batch_size=8"], base_config="victims.yaml",
                       base={"train": {"lr": 0.01}, "attack": {"inverse": {"epochs": 4}, "rmle": {"steps": 7}}})
    for cell in load_sweep(path, tmp_path / "out").cells:
        cfg = cell.cfg
        assert cfg.data.test == 200                                    # from base_config only
        assert cfg.train.lr == 0.01 and cfg.train.batch_size == 8      # base over base_config; set over both
        assert cfg.attack.options["rmle"] == {"steps": 7}              # from base only
        assert cfg.attack.options["inverse"]["epochs"] == 2            # set over base
    path = _sweep_file(tmp_path, {}, base_config="victims.yaml", base={"train": {"epochz": 3}})
    with pytest.raises(SweepError, match="train.epochz"):
        load_sweep(path, tmp_path / "out")
    path = _sweep_file(tmp_path, {}, base_config=["victims.yaml"])
    with pytest.raises(SweepError, match="base_config must be a path"):
        load_sweep(path, tmp_path / "out")


def test_unknown_keys_in_the_sweep_file_are_named(tmp_path):
    path = _sweep_file(tmp_path, {"defenses": {"none": [0]}}, stagez=["train"])
    with pytest.raises(SweepError, match="unknown key.*stagez"):
        load_sweep(path, tmp_path / "out")


# ---- on Ray --------------------------------------------------------------------------------------

def _check_finished_grid(out: Path, cells: list[str]) -> None:
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "done" and record["failed"] == []
    assert set(record["cells_state"]) == set(cells)
    for name in cells:
        attacks = json.loads((out / name / "cloud" / "attacks.json").read_text())
        assert attacks["verdict"]["outcome"] in ({"baseline"} if name.endswith("-none")
                                                 else {"survives", "does not survive", "never protected", "inconclusive"})
        assert (out / name / "report.html").is_file()
    starts = {(e["cell"], e["stage"]): e["time"] for e in _events(out) if e["event"] == "start"}
    ends = {(e["cell"], e["stage"]): e["time"] for e in _events(out) if e["event"] == "end"}
    for name in cells:  # a defended cell is attacked only once its baseline's attack has finished
        if not name.endswith("-none"):
            base = name.rsplit("-", 2)[0] + "-none"
            assert starts[(name, "attack")] >= ends[(base, "attack")]
            cfg = yaml.safe_load((out / name / "config.yaml").read_text())
            assert cfg["attack"]["baseline"] == str(out / base)
    html = (out / "report.html").read_text()
    assert all(name in html for name in cells)


GRID_2X2 = {"archs": ["smallcnn", "resnet18"], "defenses": {"none": [0], "noise": [1.5]}}
CELLS_2X2 = ["digits-smallcnn-none", "digits-resnet18-none", "digits-smallcnn-noise-1.5", "digits-resnet18-noise-1.5"]


@pytest.mark.slow
def test_a_2x2_grid_runs_on_a_local_ray_and_a_rerun_skips_what_finished(tmp_path):
    path, out = _sweep_file(tmp_path, GRID_2X2), tmp_path / "out"
    done = _cli("sweep", "--config", str(path), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    _check_finished_grid(out, CELLS_2X2)
    assert "Ray local" in done.stdout
    started = len(_events(out))
    again = _cli("sweep", "--config", str(path), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_events(out)) == started  # nothing ran again
    record = json.loads((out / "sweep.json").read_text())
    assert all(st["status"] == "finished earlier" for s in record["cells_state"].values() for st in s["stages"].values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1, started as a user would (`ray start --head`), stopped afterwards."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(0.5)
    else:
        pytest.fail("the Ray head did not open its port within 120 s")
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_the_same_grid_runs_on_a_cluster_started_with_ray_start(tmp_path, ray_head):
    path, out = _sweep_file(tmp_path, GRID_2X2), tmp_path / "out"
    done = _cli("sweep", "--config", str(path), "--out", str(out), "--address", ray_head)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_finished_grid(out, CELLS_2X2)
    assert f"Ray {ray_head}" in done.stdout


def _sweep_in_its_attack(tmp_path):
    """A one-cell sweep started in a subprocess, returned 2 s into its attack stage (a longer attack,
    so that it is still running then): (process, sweep file, out folder, the attack's start event)."""
    path, out = _sweep_file(tmp_path, {"defenses": {"none": [0]}}, ["attack.inverse.epochs=10"]), tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "edgeveil.pipeline.cli", "--no-progress", "sweep", "--config",
                              str(path), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.monotonic() + 900
    while victim is None and time.monotonic() < deadline and sweep.poll() is None:
        victim = next((e for e in _events(out) if e["stage"] == "attack" and e["event"] == "start"), None)
        time.sleep(0.2)
    assert victim is not None, "the attack stage never started"
    time.sleep(2)
    return sweep, path, out, victim


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_retried_and_the_sweep_completes(tmp_path):
    sweep, path, out, victim = _sweep_in_its_attack(tmp_path)
    assert not any(e["stage"] == "attack" and e["event"] == "end" for e in _events(out)), "attack ended before the kill"
    os.kill(victim["pid"], signal.SIGKILL)
    stdout, stderr = sweep.communicate(timeout=1500)
    assert sweep.returncode == 0, stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    attack = record["cells_state"]["digits-smallcnn-none"]["stages"]["attack"]
    assert attack == {"status": "done", "seconds": attack["seconds"], "attempts": 2}
    starts = [e for e in _events(out) if e["stage"] == "attack" and e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["pid"] != victim["pid"]
    assert (out / "digits-smallcnn-none" / "cloud" / "attacks.json").is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_ctrl_c_stops_the_running_stage_records_it_and_a_rerun_resumes(tmp_path):
    sweep, path, out, victim = _sweep_in_its_attack(tmp_path)
    sweep.send_signal(signal.SIGINT)  # the driver alone, as a job scheduler or `kill -INT` sends it
    interrupted = time.monotonic()
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
    assert time.monotonic() - interrupted < 60
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "interrupted" and record["stopped"] == ["digits-smallcnn-none:attack"]
    deadline = time.monotonic() + 30
    while _pid_alive(victim["pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _pid_alive(victim["pid"]), "the attack's worker outlived the sweep"
    again = _cli("sweep", "--config", str(path), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((out / "sweep.json").read_text())["cells_state"]["digits-smallcnn-none"]["stages"]
    assert stages["train"]["status"] == "finished earlier" and stages["attack"]["status"] == "done"


@pytest.mark.slow
def test_a_failing_cell_is_retried_once_recorded_and_the_others_finish(tmp_path):
    path, out = _sweep_file(tmp_path, {"defenses": {"none": [0], "noise": [1.5]}}), tmp_path / "out"
    broken = out / "digits-smallcnn-noise-1.5" / "train"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{ not json")  # as a corrupted earlier run leaves it: export fails
    done = _cli("sweep", "--config", str(path), "--out", str(out))
    assert done.returncode == 1
    assert "1 cell(s) failed: digits-smallcnn-noise-1.5" in done.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert record["failed"] == ["digits-smallcnn-noise-1.5"]
    failed = record["cells_state"]["digits-smallcnn-noise-1.5"]
    assert failed["status"] == "failed" and failed["stages"]["export"]["attempts"] == 2
    assert "export:" in failed["error"] and "JSON" in failed["error"]
    assert record["cells_state"]["digits-smallcnn-none"]["status"] == "done"
    assert "digits-smallcnn-noise-1.5" in (out / "report.md").read_text()  # named in the report too
