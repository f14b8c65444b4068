"""Board profiles: the shipped boards.yaml, its validation, and `edgeveil list boards`."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgeveil.export import boards
from edgeveil.export.estimate import ENGINES
from edgeveil.export.opcheck import OPTIMIZED_KERNELS, check_operators
from edgeveil.pipeline.cli import main

# The boards issue #6 names, by the profile that carries each.
ISSUE_BOARDS = {"rpi4": "Cortex-A72", "rpi5": "Cortex-A76", "coral-micro": "Cortex-M7", "stm32h743": "Cortex-M7",
                "stm32f746-disco": "Cortex-M7", "nrf52840": "Cortex-M4F", "nano33-ble-sense": "Cortex-M4F",
                "esp32s3": "Xtensa LX7", "corstone-300": "Cortex-M55"}


def _entry(**changes) -> dict:
    """A valid profile (the shipped nrf52840) with `changes` applied; None removes a field."""
    entry = yaml.safe_load(boards.BOARDS_FILE.read_text())["nrf52840"]
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def _write(tmp_path: Path, profiles: dict) -> Path:
    path = tmp_path / "boards.yaml"
    path.write_text(yaml.safe_dump(profiles))
    return path


def test_shipped_profiles_cover_the_issue_boards_with_a_source_each():
    shipped = boards.load_boards()
    assert {name: b.core for name, b in shipped.items()} == ISSUE_BOARDS
    for b in shipped.values():
        assert len(b.source) > 20 and b.clock_hz > 1e6 and b.ram_bytes > 0
        assert b.estimator in ENGINES
        assert b.arena_limit_bytes <= b.ram_bytes
        assert (b.install is not None) == (b.kind == "linux")
        assert (b.flash_bytes is None) == (b.kind == "linux")


def test_the_h743_arena_is_limited_by_its_512k_axi_block_not_its_1mb():
    h743 = boards.get_board("stm32h743")
    assert h743.ram_bytes > 1_000_000
    assert h743.arena_limit_bytes == 512 * 1024


def test_only_the_ethos_board_runs_vela_and_every_mcu_has_a_kernel_library():
    shipped = boards.load_boards().values()
    assert [b.name for b in shipped if b.vela_accelerator] == ["corstone-300"]
    for b in shipped:
        if b.is_mcu:
            assert check_operators(["CONV_2D"], b)["kernels"] in OPTIMIZED_KERNELS


def test_every_problem_is_reported_at_once_naming_board_and_field(tmp_path):
    path = _write(tmp_path, {
        "good": _entry(),
        "slow": _entry(clock_hz=-5),
        "nosrc": _entry(source=None),
        "odd": _entry(estimator="cortex-m99", colour="red"),
        "tiny": _entry(largest_contiguous_ram_bytes=10**9),
        "pi": _entry(kind="linux", flash_bytes=None),
        "npu": _entry(accelerator="Ethos-U55-128"),
    })
    with pytest.raises(ValueError) as e:
        boards.load_boards(path)
    msg = str(e.value)
    for expected in ("board 'slow': field clock_hz must be a positive integer (bytes or Hz), got -5",
                     "board 'nosrc': field source is missing",
                     "board 'odd': unknown field 'colour'",
                     "board 'odd': field estimator must be one of",
                     "board 'tiny': field largest_contiguous_ram_bytes (1000000000) exceeds ram_bytes",
                     "board 'pi': field install (the device runtime's install line) is required",
                     "board 'npu': field vela_accelerator is required"):
        assert expected in msg
    assert "'good'" not in msg and str(path) in msg


def test_mcu_without_flash_and_bad_yaml_are_refused(tmp_path):
    with pytest.raises(ValueError, match="board 'm': field flash_bytes is required for an mcu board"):
        boards.load_boards(_write(tmp_path, {"m": _entry(flash_bytes=None)}))
    (tmp_path / "bad.yaml").write_text("rpi: [unclosed")
    with pytest.raises(ValueError, match="cannot read board profiles"):
        boards.load_boards(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="expected a mapping"):
        boards.load_boards(_write(tmp_path, ["rpi4"]))


def test_unknown_board_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        boards.get_board("stm32h999")
    assert "unknown board 'stm32h999'" in str(e.value)
    assert all(name in str(e.value) for name in ISSUE_BOARDS)


def test_list_boards_prints_name_then_description(capsys):
    assert main(["list", "boards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(boards.load_boards())
    assert all(len(line.split(None, 1)) == 2 for line in lines)
    assert any("512 KB AXI SRAM" in line for line in lines)
