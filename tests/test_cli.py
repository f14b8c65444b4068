import subprocess
import sys

import pytest

from edgeveil.pipeline.cli import main


@pytest.mark.parametrize("what,expect", [("defenses", "none"), ("archs", "smallcnn"), ("datasets", "digits"),
                                         ("attacks", "inverse")])
def test_list_prints_name_then_description(what, expect, capsys):
    assert main(["list", what]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line.split(None, 1)) == 2 for line in lines)
    assert expect in [line.split()[0] for line in lines]


def test_boards_are_listed_and_an_unknown_target_is_refused(tmp_path, capsys):
    assert main(["list", "boards"]) == 0
    assert "stm32h743" in [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["export", str(tmp_path), "--target", "stm32h999"]) == 1
    assert "unknown board 'stm32h999'" in capsys.readouterr().err

def test_bad_config_gives_a_clean_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeveil.pipeline.cli", "train", "--out", str(tmp_path / "r"),
                        "--set", "train.epochs=-1", "--set", "data.name=nosuch"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "train.epochs must be in 1..10000, got -1" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_says_where_it_looked(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "data.name=cifar10",
                 "--set", f"data.root={tmp_path / 'nodata'}"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "nodata") in err and "download" in err
