"""The train stage end to end on digits, the defense hooks, and kill-and-resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QUICK
from edgeveil.pipeline.cli import main
from edgeveil.training import defenses
from edgeveil.training.defenses.base import Defense
from edgeveil.training.runfile import load_run, read_model_info
from edgeveil.training.trainer import Trainer, TrainSettings


def _sets(*pairs):
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "digits"
    assert main(["--no-progress", "train", "--out", str(out), *_sets(*QUICK)]) == 0
    return out


def test_train_writes_the_run_directory(digits_run: Path):
    train = digits_run / "train"
    for name in ("model.json", "head.pt", "tail.pt", "history.jsonl", "metrics.json", "checkpoint.pt"):
        assert (train / name).is_file(), name
    cfg = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert cfg["data"]["image_size"] == 28 and cfg["model"]["split"] is not None  # defaults written out
    info = read_model_info(digits_run)
    assert info["input"]["shape"] == [1, 28, 28] and len(info["input"]["mean"]) == 1
    assert set(info["data"]["splits"]) == {"victim_train", "test", "aux", "labelled", "evaluator"}
    assert all(len(s["sha256"]) == 64 for s in info["data"]["splits"].values())
    history = [json.loads(line) for line in (train / "history.jsonl").read_text().splitlines()]
    epochs = int(next(o for o in QUICK if o.startswith("train.epochs=")).split("=")[1])
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert {"loss_task", "loss_total", "train_accuracy", "test_accuracy"} <= set(history[0])
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["float_test_accuracy"] > 0.5  # four tiny epochs on 720 digits beat chance (0.1) by far


def test_loaded_run_reproduces_the_recorded_accuracy(digits_run: Path):
    from edgeveil.training.data import to_tensors
    from edgeveil.training.runfile import load_splits
    from edgeveil.training.trainer import evaluate

    run = load_run(digits_run)
    splits = load_splits(run.info)
    x, y = to_tensors(splits.test, run.info["input"]["mean"], run.info["input"]["std"])
    acc = evaluate(run.head, run.tail, x, y)
    assert acc == json.loads((digits_run / "train" / "metrics.json").read_text())["float_test_accuracy"]


def test_rerun_same_config_is_a_no_op_and_other_config_is_refused(digits_run: Path, capsys):
    before = (digits_run / "train" / "head.pt").stat().st_mtime_ns
    assert main(["--no-progress", "train", "--out", str(digits_run), *_sets(*QUICK)]) == 0
    assert (digits_run / "train" / "head.pt").stat().st_mtime_ns == before
    assert main(["--no-progress", "train", "--out", str(digits_run), *_sets(*QUICK, "train.lr=0.1")]) == 1
    assert "train.lr differ" in capsys.readouterr().err


def test_corrupted_run_directory_is_named(tmp_path: Path, digits_run: Path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(digits_run, bad)
    (bad / "train" / "model.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"model.json is not valid JSON"):
        load_run(bad)
    (bad / "train" / "model.json").write_text(json.dumps({"schema": "edgeveil.model/1", "arch": "smallcnn"}))
    with pytest.raises(ValueError, match=r"missing field\(s\) split, width"):
        load_run(bad)
    shutil.copy(digits_run / "train" / "model.json", bad / "train" / "model.json")
    (bad / "train" / "head.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"head.pt does not match the sha256 recorded in model.json"):
        load_run(bad)
    with pytest.raises(FileNotFoundError, match="is not an edgeveil run directory|does not exist"):
        load_run(tmp_path / "nowhere")


class _Recorder(Defense):
    """A defense that records which hooks the trainer called, with what shapes."""

    name = "recorder"

    def __init__(self, strength=0.0):
        super().__init__(strength)
        self.calls: dict[str, int] = {}
        self.probe = None

    def _hit(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def setup(self, head, tail, input_shape, feature_shape, num_classes):
        self._hit("setup")
        self.modules["probe"] = torch.nn.Linear(1, 1)

    def parameters(self):
        return list(self.modules["probe"].parameters())

    def adversary_step(self, x, z, y):
        self._hit("adversary_step")
        assert not z.requires_grad
        return {"adv_metric": 1.0}

    def transform(self, z):
        self._hit("transform")
        return z

    def loss(self, x, z, logits, y):
        self._hit("loss")
        extra = self.modules["probe"](z.mean().reshape(1, 1)).sum() * 0.0
        return {"probe": extra + z.pow(2).mean() * 1e-3}

    def eval_transform(self, z):
        self._hit("eval_transform")
        return z

    def end_epoch(self, epoch, lr):
        self._hit("end_epoch")
        return {"epoch_metric": float(epoch)}


def _tiny_problem(seed=0):
    from edgeveil.training import archs

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = archs.create("smallcnn", in_channels=1, image_size=28, num_classes=10, width="tiny")
    return model, (x, y)


def test_trainer_calls_every_defense_hook_and_logs_each_term(tmp_path: Path):
    model, data = _tiny_problem()
    d = _Recorder()
    d.setup(model.head, model.tail, (1, 28, 28), model.feature_shape, 10)
    s = TrainSettings(epochs=1, batch_size=16, lr=1e-3, device="cpu")
    history = Trainer(model.head, model.tail, d, s, tmp_path).fit(data, data, progress=False)
    assert d.calls["setup"] == 1 and d.calls["adversary_step"] == 4 and d.calls["transform"] == 4
    assert d.calls["loss"] == 4 and d.calls["eval_transform"] >= 1 and d.calls["end_epoch"] == 1
    assert {"loss_task", "loss_probe", "loss_total", "adv_metric"} <= set(history[0])
    assert history[0]["epoch_metric"] == 1.0
    assert history[0]["loss_total"] == pytest.approx(history[0]["loss_task"] + history[0]["loss_probe"], rel=1e-5)


def test_none_defense_is_registered_and_goes_through_the_hooks(tmp_path: Path):
    model, data = _tiny_problem()
    d = defenses.create("none")
    assert d.inference_noise() is None and d.loss(None, None, None, None) == {}
    s = TrainSettings(epochs=1, batch_size=32, lr=1e-3, device="cpu")
    history = Trainer(model.head, model.tail, d, s, tmp_path).fit(data, data, progress=False)
    assert history[0]["loss_total"] == pytest.approx(history[0]["loss_task"])
    with pytest.raises(ValueError, match="defense.name must be one of none"):
        defenses.create("nosuch")
    with pytest.raises(ValueError, match="has no options"):
        defenses.create("none", alpha=1)


def _train_cmd(out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "edgeveil.pipeline.cli", "--no-progress", "train", "--out", str(out),
            *_sets("model.width=tiny", f"train.epochs={epochs}", "train.batch_size=8", "train.device=cpu")]


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:
        return 0


def test_sigkill_mid_epoch_then_resume_finishes_the_same_epochs(tmp_path: Path):
    epochs = 4
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(killed, epochs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "train" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while _checkpoint_epoch(ckpt) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # somewhere inside epoch 2 (or later), with no chance to clean up
    proc.wait()
    done_at_kill = _checkpoint_epoch(ckpt)
    assert 1 <= done_at_kill < epochs
    assert not (killed / "train" / "model.json").exists()

    subprocess.run(_train_cmd(killed, epochs), env=env, check=True, capture_output=True)
    history = [json.loads(line) for line in (killed / "train" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert _checkpoint_epoch(ckpt) == epochs

    # The resumed run ends exactly where an uninterrupted one does.
    clean = tmp_path / "clean"
    subprocess.run(_train_cmd(clean, epochs), env=env, check=True, capture_output=True)
    a = torch.load(killed / "train" / "head.pt", weights_only=True)
    b = torch.load(clean / "train" / "head.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
