"""The dependency rule for edgeveil.device: numpy, the standard library and a TFLite interpreter only.

Fast: in this (full) environment, importing and running the device modules loads no torch or
tensorflow, and no device source file imports anything but the standard library, numpy or itself.
Slow: .ci/device_envs.sh builds the two clean board environments (numpy 2 + ai-edge-litert,
numpy<2 + tflite-runtime 2.14) and runs tests/fixtures/device_smoke.py in each.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "tensorflow", "tf_keras", "onnx", "onnx2tf", "onnxruntime", "yaml", "tqdm")
MODULES = ("edgeveil.device", "edgeveil.device.interpreter", "edgeveil.device.quant", "edgeveil.device.manifest",
           "edgeveil.device.noise", "edgeveil.device.runner", "edgeveil.device.bench", "edgeveil.device.wire",
           "edgeveil.device.client", "edgeveil.device.cli", "edgeveil.device.registry")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_the_device_modules_loads_nothing_heavy():
    assert _loaded_after("import " + ", ".join(MODULES)) == []


def test_running_the_head_and_the_benchmark_loads_nothing_heavy():
    code = ("import numpy as np\n"
            "from edgeveil.device.runner import HeadRunner\n"
            "from edgeveil.device import cli\n"
            "d = 'tests/fixtures/digits_tiny'\n"
            "HeadRunner(d, 'int8').run(np.load(d + '/expected.npz')['images'])\n"
            "assert cli.main(['bench', d + '/head_int8.tflite', '--runs', '3', '--quiet']) == 0")
    assert _loaded_after(code) == []


def test_device_sources_import_only_stdlib_numpy_and_themselves():
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    problems = []
    for path in sorted((REPO / "device").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] not in allowed]
    assert problems == []


def test_fixture_is_small_and_complete():
    folder = REPO / "tests" / "fixtures" / "digits_tiny"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["expected.npz", "head_fp32.tflite", "head_int8.tflite", "manifest.json"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 100_000


@pytest.mark.slow
def test_clean_board_environments():
    """Both clean environments install and pass the smoke check (about a minute with a warm pip cache)."""
    done = subprocess.run(["bash", str(REPO / ".ci" / "device_envs.sh")], capture_output=True, text=True,
                          timeout=1800, cwd=REPO)
    output = done.stdout + done.stderr
    if done.returncode == 75:
        pytest.skip("package registry unreachable: " + output.strip().splitlines()[-1])
    assert done.returncode == 0, output[-5000:]
    assert "SMOKE OK runtime=ai_edge_litert" in output and "SMOKE OK runtime=tflite_runtime" in output
    assert "xnnpack_active=True" in output  # XNNPACK ran somewhere (litert int8, fp32 on both)
