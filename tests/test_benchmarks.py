"""The benchmark scripts run end to end (slow: they train, convert and time real models), and the
sweep files that hold the benchmarks' grids expand against the registries."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_latency_quick(shared_data, tmp_path):
    """--quick trains smallcnn briefly, builds a reduced ceiling, times every engine once and reports."""
    out = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_latency.py"), "--quick",
                           "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-5000:]
    assert "pass 1/1 smallcnn" in done.stderr  # progress lines
    assert "| head | MACs (M) | int8 p50 / p90 (us) |" in done.stdout and "Sanity check" in done.stdout
    report = json.loads((out / "device_latency_quick.json").read_text())
    assert report["quick"] and report["settings"]["passes"] == 1
    rows = {r["head"]: r for r in report["results"]}
    assert list(rows) == ["smallcnn", "CEIL"]
    assert rows["CEIL"]["macs"] == 2 * 128 * 128 * 9 * 14 * 14 and rows["CEIL"]["pct_ceiling"] == pytest.approx(100)
    assert rows["smallcnn"]["macs"] > 0 and rows["smallcnn"]["budget"]["epochs"] == 1
    expected = {"int8", "fp32", "torch", "ort", "int8_2t"}
    if not report["tflite_runtime_skipped"]:  # None unless its venv could not be built (no registry access)
        expected.add("tflrt_int8")
    for row in rows.values():
        assert set(row["engines"]) == expected
        assert all(e["p50_us"] > 0 and e["p90_us"] >= e["p50_us"] for e in row["engines"].values())
        assert row["engines"]["int8"]["xnnpack"] is True and row["gmacs"] > 0
    if "tflrt_int8" in expected:  # tflite-runtime 2.14 does not delegate int8 models to XNNPACK
        assert all(r["engines"]["tflrt_int8"]["xnnpack"] is False for r in rows.values())
    md = (out / "device_latency_quick.md").read_text()
    assert md.splitlines()[2].startswith("Reproduce: `python benchmarks/device_latency.py --quick")
    assert not (out / "device_latency.json").exists()  # --quick never overwrites the full results
    assert seconds < 600, f"--quick took {seconds:.0f} s"  # budget 3 min on an idle 2-core machine


CONFIGS = REPO / "benchmarks" / "configs"
SWEEP_FILES = sorted(p for p in CONFIGS.glob("*.yaml") if "grid" in (yaml.safe_load(p.read_text()) or {}))
DATA = REPO.parent / "shared" / "datasets"  # the sweep files name datasets relative to the checkout's root


def _needs(*files: str) -> None:
    missing = [f for f in files if not (DATA / f).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {DATA} (the benchmark sweep files read the shared datasets there)")


# ---- the sweep files: they expand with no error, against the registries ---------------------------

def test_the_benchmarks_grids_are_sweep_files():
    names = {p.name for p in SWEEP_FILES}
    assert {"defenses_mnist.yaml", "defenses_cifar10.yaml", "attacks_mnist.yaml", "attacks_cifar10.yaml",
            "sweep_tiny.yaml"} <= names, names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_benchmark_sweep_file_expands_against_the_registries(path, tmp_path, monkeypatch):
    from edgeveil.cloud_sim.attacks import ATTACKS
    from edgeveil.pipeline.sweep_grid import load_sweep
    from edgeveil.training import archs
    from edgeveil.training.defenses import DEFENSES

    monkeypatch.chdir(REPO)
    spec = yaml.safe_load(path.read_text())
    sweep = load_sweep(path, tmp_path / "out")
    grid = spec["grid"]
    strengths = {d: s for d, s in grid["defenses"].items()}
    expected = sum(len(s) for s in strengths.values()) + (0 if "none" in strengths else 1)
    assert len(sweep.cells) == expected * len(grid.get("datasets", [0])) * len(grid.get("archs", [0]))
    by_name = {c.name: c for c in sweep.cells}
    assert set(strengths) <= set(DEFENSES) and set(grid["attacks"]) <= set(ATTACKS)
    for cell in sweep.cells:
        cfg = cell.cfg
        assert cfg.defense.name in DEFENSES and cfg.model.arch in {n for n, _ in archs.names()}
        assert set(cfg.attack.names) == set(grid["attacks"]) <= set(ATTACKS)
        assert set(cfg.attack.options) <= set(ATTACKS)  # options only for registered attacks
        assert cfg.attack.precisions == grid["precisions"] and "int8" in cfg.export.precisions
        if cfg.defense.name == "none":
            assert cell.baseline is None and cfg.attack.baseline is None
        else:
            assert cfg.defense.strength in strengths[cfg.defense.name]
            base = by_name[cell.baseline]
            assert base.cfg.defense.name == "none" and base.group == cell.group
            assert cfg.attack.baseline == str(base.run_dir)
            for section in ("data", "model", "train", "export"):  # judged against a baseline trained the same way
                assert getattr(cfg, section) == getattr(base.cfg, section), section


def _script_constant(script: str, name: str):
    """A module-level literal of a benchmark script, read without running it (cifar10.py sets up its
    state folder on import)."""
    tree = ast.parse((REPO / "benchmarks" / script).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script} has no {name}")


@pytest.mark.parametrize("name", ["attacks_cifar10", "defenses_cifar10"])
def test_the_cifar10_sweeps_train_the_victims_of_cifar10_py(name, tmp_path, monkeypatch):
    """Same config file, and (attacks) the same four models at cifar10.py's strengths."""
    from edgeveil.pipeline.config import load_config
    from edgeveil.pipeline.sweep_grid import load_sweep

    monkeypatch.chdir(REPO)
    victims = load_config(CONFIGS / "cifar10.yaml")
    sweep = load_sweep(CONFIGS / f"{name}.yaml", tmp_path / "out")
    models = {m: [float(o.split("=")[1]) for o in opts if o.startswith("defense.strength=")] or [0.0]
              for m, opts in _script_constant("cifar10.py", "MODELS").items()}
    cells = {(c.cfg.defense.name, c.cfg.defense.strength) for c in sweep.cells}
    assert {(m, s[0]) for m, s in models.items()} <= cells
    if name.startswith("attacks"):
        assert cells == {(m, s[0]) for m, s in models.items()}
    for cell in sweep.cells:
        for section in ("data", "model", "train", "export"):
            assert getattr(cell.cfg, section) == getattr(victims, section), (cell.name, section)


def test_the_attacks_sweeps_run_every_attack_of_the_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("attacks_bench", REPO / "benchmarks" / "attacks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for ds, path in module.DATASETS.items():
        grid = yaml.safe_load(path.read_text())["grid"]
        assert list(grid["attacks"]) == list(module.ATTACKS), ds
        assert set(grid["defenses"]) == {"none", "infoscissors", "siftfunnel", "cem"}, ds


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_benchmark_sweep_passes_the_preflight_on_its_data(path, tmp_path, monkeypatch):
    """Every attack fits the data splits as the sweep will carve them: none is scaled down or skipped,
    and identification can be scored (the preflight `edgeveil sweep` runs before Ray starts); ka's
    auxiliary dataset loads."""
    from edgeveil.pipeline.stages import preflight
    from edgeveil.pipeline.sweep_grid import load_sweep
    from edgeveil.training.data import load_dataset

    cfg = load_sweep(path, tmp_path / "out").cells[0].cfg  # the cells differ in defense only
    aux = cfg.attack.options.get("ka", {}).get("aux_dataset")
    npz = [Path(f).name for name in (cfg.data.name, aux or "") if name.startswith("npz:") for f in name[4:].split(",")]
    _needs(*npz)
    monkeypatch.chdir(REPO)
    lines = preflight(cfg)
    assert lines[0].startswith("splits: ") and lines[1:] == [], lines
    if aux:
        _, pool = load_dataset(aux)
        assert len(pool.y) >= cfg.attack.options["ka"]["aux_size"]


# ---- the quick runs: through the sweep, then the tables ------------------------------------------

def _run_script(script: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, runs = tmp_path / "results", tmp_path / "runs"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick", "--runs", str(runs),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done, out, runs.with_name("runs_quick")


def _check_sweep(folder: Path, cells: list[str], config: str) -> dict:
    """The grid ran as `edgeveil sweep` runs it: sweep.json, every cell done, the quick budget in the
    sweep file it ran, the sweep report."""
    record = json.loads((folder / "sweep.json").read_text())
    assert record["status"] == "done" and record["failed"] == [] and record["address"] == "local"
    assert list(record["cells_state"]) == cells
    ran = yaml.safe_load(Path(record["sweep"]).read_text())
    committed = yaml.safe_load((CONFIGS / config).read_text())
    assert "train.epochs=1" in ran["set"] and ran["base"] == committed["base"]
    assert (folder / "report.html").is_file()
    return record


@pytest.mark.slow
def test_defenses_quick(tmp_path):
    """--quick --only cem, from another directory: the MNIST sweep file cut to none and cem, run on a
    local Ray; the table, the budget line and the plot from its run directories."""
    _needs("mnist_test.npz")
    done, out, runs = _run_script("defenses.py", tmp_path, "--only", "cem", "--timing-repeats", "1", "--max-parallel", "2")
    cells = ["mnist_test-smallcnn-none", *(f"mnist_test-smallcnn-cem-{s}" for s in ("4", "8", "16"))]
    record = _check_sweep(runs / "mnist", cells, "defenses_mnist.yaml")
    assert record["parallel"] == 2
    report = json.loads((out / "defenses_quick.json").read_text())
    assert [(r["defense"], r["strength"]) for r in report["rows"]] == [("none", 0), ("cem", 4), ("cem", 8), ("cem", 16)]
    for r in report["rows"]:
        assert r["budget"]["victim_train"] == 300 and r["budget"]["epochs"] == 1 and r["targets"] == 100
        assert set(r["ssim"]) == {"float", "int8"} and r["step_time_ratio"] is not None
        assert r["run_dir"].startswith(str(runs / "mnist"))
    md = (out / "defenses_quick.md").read_text()
    for words in ("Reproduce: `python benchmarks/defenses.py --quick --only cem`", "## mnist",
                  "**mnist**: smallcnn width full split 2, 300 training images × 1 epochs per defense",
                  "| defense | strength | float acc | int8 acc |", "| cem | 16 |", "(defenses_quick.png)"):
        assert words in md, words
    assert (out / "defenses_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "edgeveil sweep --config benchmarks/configs/defenses_mnist.yaml --out DIR" in done.stdout
    # The tables again from the sweep folder alone, as after `edgeveil sweep` on a cluster: nothing reruns.
    again = subprocess.run([sys.executable, str(REPO / "benchmarks" / "defenses.py"), "--quick", "--only", "cem",
                            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "again"), "--tables-only"],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((runs / "mnist" / "sweep.json").read_text())["seconds"] == record["seconds"]
    assert (tmp_path / "again" / "defenses_quick.md").read_text().split("## mnist")[1] == md.split("## mnist")[1]


@pytest.mark.slow
def test_attacks_quick(tmp_path):
    """--quick on MNIST: the sweep file's four models trained briefly on a local Ray, every attack on
    float and int8, the verdicts, the score chart, the reconstruction grid and the comparison with the
    published numbers."""
    _needs("mnist_test.npz", "cifar10_test_jpeg.npz")
    _, out, runs = _run_script("attacks.py", tmp_path)
    _check_sweep(runs / "mnist", [f"mnist_test-smallcnn-{m}" for m in ("none", "infoscissors-0.3", "siftfunnel-2",
                                                                       "cem-8")], "attacks_mnist.yaml")
    report = json.loads((out / "attacks_quick.json").read_text())
    assert [r["defense"] for r in report["records"]] == ["none", "infoscissors", "siftfunnel", "cem"]
    for r in report["records"]:
        assert set(r["attacks"]) == {"inverse", "rmle", "ka", "shadow", "pmc", "mine"}
        assert r["attacks"]["rmle"]["options"]["steps"] == 5 and r["attacks"]["ka"]["options"]["aux_size"] == 100
        for a in r["attacks"].values():
            assert set(a["precisions"]) == {"float", "int8"}
            assert all(p["seconds"] > 0 for p in a["precisions"].values())
        assert (r["verdict"]["outcome"] == "baseline") == (r["defense"] == "none")  # the others judged against none
        assert r["verdict"]["diagnostics"] and all(c["attack"] != "mine" for c in r["verdict"]["checks"])
    md = (out / "attacks_quick.md").read_text()
    for words in ("## Verdicts", "| none | rmle | ssim |", "| cem 8 | pmc | accuracy |", "## Against the published",
                  "- rMLE on mnist: SSIM", "![mnist reconstructions from int8 features](attacks_mnist_quick.png)",
                  "300 training images × 1 epochs", 'rmle {"steps": 5', "ka auxiliary data: cifar10_test_jpeg.npz"):
        assert words in md, words
    for png in ("attacks_quick.png", "attacks_mnist_quick.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_device_path_quick(shared_data, tmp_path):
    """--quick trains smallcnn briefly and times raw, the path, its 'before' (git) and the encode, side by side."""
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_path.py"), "--quick",
                           "--runs", str(tmp_path / "runs"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "pass 1/1 smallcnn" in done.stderr and "| head | MACs (M) |" in done.stdout
    report = json.loads((out / "device_path_quick.json").read_text())
    (row,) = report["results"]
    assert row["head"] == "smallcnn" and row["iterations"] == [300] and row["frame_bytes"] == 6383
    assert all(row["stages"][s]["p50_us"] > 0 for s in ("raw", "path", "encode", "whole"))
    assert row["stages"]["whole"]["p50_us"] > row["stages"]["path"]["p50_us"] > row["stages"]["raw"]["p50_us"] * 0.9
    assert row["before"] is not None and row["before"]["whole"] > 0  # the 958cc1f path, loaded from git
    assert set(row["verdicts"]) == {"path/raw", "whole/raw <= 1.4", "encode <= 15 us"}


def _cifar10_module(monkeypatch):
    """benchmarks/cifar10.py imported with its environment change undone after the test."""
    monkeypatch.setenv("EDGEVEIL_CACHE", str(REPO / "benchmarks" / "state" / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import importlib

    return importlib.import_module("cifar10")


STATE_CIFAR10 = REPO / "benchmarks" / "state" / "cifar10"


@pytest.mark.skipif(not (STATE_CIFAR10 / "none" / "cloud" / "attacks.json").is_file(),
                    reason="the committed CIFAR-10 state has no finished undefended run")
def test_cifar10_tables_are_rebuilt_from_the_finished_runs(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cifar10.py"), "--tables-only", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md, records = (out / "cifar10.md").read_text(), json.loads((out / "cifar10.json").read_text())
    finished = [m for m in ("none", "infoscissors", "siftfunnel", "cem")
                if (STATE_CIFAR10 / m / "cloud" / "attacks.json").is_file()]
    assert [r["model"] for r in records] == finished
    none = json.loads((STATE_CIFAR10 / "none" / "cloud" / "attacks.json").read_text())
    ssim = none["attacks"]["inverse"]["precisions"]["int8"]["summary"]["ssim"]["mean"]
    assert "| none 0 |" in md and f"| inverse | int8 | {ssim:.3f} |" in md
    for model in finished[1:]:
        assert f"- **{model} " in md.split("## The papers' claim")[1], model  # a claim line per defended model
    assert "| gap (points) |" in md and (out / "cifar10_none_inverse.png").is_file()


def test_the_papers_claim_needs_a_50_percent_cut_within_3_points_under_the_proven_attack(monkeypatch):
    cifar10 = _cifar10_module(monkeypatch)

    def rec(model, acc, ssim, proven=True, luma=None):
        summary = {"ssim": {"mean": ssim}, **({"ssim_luma": {"mean": luma}} if luma is not None else {})}
        return {"model": model, "strength": 1.0, "float_accuracy": acc, "int8_accuracy": acc,
                "attacks": {"inverse": {"precisions": {"int8": {"summary": summary}}}},
                "verdict": {"power": {"by_attack": {"inverse": {"int8": {"proven": proven}}}}}}

    none = rec("none", 0.90, 0.90)
    assert "reaches the papers' claim" in cifar10.paper_claim(rec("d", 0.88, 0.40), none)
    assert "does not reach" in cifar10.paper_claim(rec("d", 0.88, 0.50), none)  # 44% cut
    assert "more than 3" in cifar10.paper_claim(rec("d", 0.86, 0.10), none)  # 4 points
    assert "no reconstruction attack proved" in cifar10.paper_claim(rec("d", 0.88, 0.1, proven=False), none)
    # colour images: the smaller of the RGB and luminance cuts decides (false colours are not privacy)
    colour_none = rec("none", 0.90, 0.90, luma=0.95)
    line = cifar10.paper_claim(rec("d", 0.88, 0.40, luma=0.76), colour_none)
    assert "does not reach" in line and "int8 luminance SSIM falls 20% (0.950 -> 0.760)" in line
    assert "reaches the papers' claim" in cifar10.paper_claim(rec("d", 0.88, 0.40, luma=0.45), colour_none)
    assert cifar10.int8_cost({**rec("d", 0.88, 0.4), "int8_accuracy": 0.86}) is None  # 2 points: no line
    line = cifar10.int8_cost({**rec("d", 0.84, 0.4), "int8_accuracy": 0.22,
                              "int8_output": {"step": 1.98, "zero_point_share": 0.983}})
    assert "62.0 points lost" in line and "98.3% of its output codes" in line
