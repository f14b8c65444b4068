from pathlib import Path

import pytest
import yaml

from edgeveil.pipeline.config import Config, ConfigError, dump_config, load_config, parse_overrides


def test_defaults_round_trip(tmp_path: Path):
    cfg = load_config()
    assert cfg == Config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    # every default is written out
    assert set(yaml.safe_load(path.read_text())) == {"data", "model", "defense", "train", "export", "attack", "seed"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.01", "model.width=0.5", "defense.base=noise",
                             "export.precisions=[int8, fp32]", "data.root=null"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.model.width == 0.5
    assert cfg.defense.options == {"base": "noise"}  # a defense's own option, not a typo
    assert cfg.export.precisions == ["int8", "fp32"]
    assert cfg.data.root is None


def test_every_problem_is_reported_with_field_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.epochs=0", "train.optimizer=rmsprop", "data.nmae=x", "model.width=huge",
                           "train.batch_size=many"])
    msg = str(e.value)
    assert "train.epochs must be in 1..10000, got 0" in msg
    assert "train.optimizer must be one of adam, sgd, got 'rmsprop'" in msg
    assert "data.nmae is not a known field; allowed:" in msg and "name" in msg
    assert "train.batch_size must be int, got 'many'" in msg


def test_semantic_checks():
    with pytest.raises(ConfigError, match=r"model.width must be 'full', 'tiny' or a number > 0, got 'huge'"):
        load_config(None, ["model.width=huge"])
    with pytest.raises(ConfigError, match=r"export.precisions must be a non-empty list of .* got \['int4'\]"):
        load_config(None, ["export.precisions=[int4]"])
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        load_config(None, ["train.device=tpu"])


@pytest.mark.parametrize("bad", ["epochs", "train.epochs", "=3", "train..epochs=3"])
def test_malformed_set(bad):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides([bad])


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "sec.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train must be a mapping, got 5"):
        load_config(tmp_path / "sec.yaml")
