"""device/files.py: the one place every stage writes files (atomic), writes and reads JSON, and hashes files."""
from __future__ import annotations

import json
import os

import pytest

from edgeveil.device import files


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_json_writes_nan_and_infinity_as_null_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "a.json"
    doc = {"x": float("nan"), "y": [1.5, float("inf"), -float("inf")], "z": {"w": (1, float("nan"))}, "s": "nan"}
    files.atomic_write_json(path, doc)
    assert files.read_json(path) == {"x": None, "y": [1.5, None, None], "z": {"w": [1, None]}, "s": "nan"}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert doc["x"] != doc["x"]  # the caller's object is not modified
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask() and _leftovers(path.parent) == []


def test_jsonl_round_trip_stops_at_a_torn_line(tmp_path):
    path = tmp_path / "h.jsonl"
    assert files.read_jsonl(path) == []
    files.atomic_write_jsonl(path, [{"a": 1}, {"b": float("nan")}])
    files.append_jsonl(path, {"c": 3})
    assert files.read_jsonl(path) == [{"a": 1}, {"b": None}, {"c": 3}]
    with open(path, "a") as f:
        f.write('{"d": ')  # a crash mid-append
    assert files.read_jsonl(path) == [{"a": 1}, {"b": None}, {"c": 3}]


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        files.read_json(path)
    with pytest.raises(FileNotFoundError):
        files.read_json(tmp_path / "missing.json")


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.json"
    files.atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        files.atomic_write_json(path, {"v": object()})
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert json.loads(path.read_text()) == {"v": 1} and _leftovers(tmp_path) == []
    with files.atomic_path(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and _leftovers(tmp_path) == []


def test_private_files_are_0600(tmp_path):
    path = files.atomic_write_json(tmp_path / "keys.json", {"dev": "00"}, private=True)
    assert path.stat().st_mode & 0o777 == 0o600


def test_install_file_moves_into_place_and_sha256_file(tmp_path):
    src = tmp_path / "work" / "x.bin"
    src.parent.mkdir()
    src.write_bytes(b"abc")
    dst = files.install_file(src, tmp_path / "out" / "x.bin")
    assert not src.exists() and dst.read_bytes() == b"abc"
    assert files.sha256_file(dst) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    files.atomic_write_text(tmp_path / "t.md", "é\n")
    assert (tmp_path / "t.md").read_bytes() == "é\n".encode()
