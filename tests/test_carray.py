"""The C array for MCU firmware: compiled by a real C++ compiler, linked, run, and compared with the
.tflite bytes; float models refused naming what is float; nothing half-written on failure."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeveil.export.carray import ALIGNMENT, NotFullInteger, check_full_integer, float_parts, write_c_array

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_tiny"
INT8, FP32 = FIXTURE / "head_int8.tflite", FIXTURE / "head_fp32.tflite"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, c++ or clang++) on PATH")

# Reads the .tflite named on the command line and compares it with the array; prints the hash macro.
MAIN = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include "NAME.h"

static_assert(MACRO_LEN > 0, "length macro");

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  std::FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 3;
  std::vector<unsigned char> want;
  int c;
  while ((c = std::fgetc(f)) != EOF) want.push_back(static_cast<unsigned char>(c));
  std::fclose(f);
  if (want.size() != MACRO_LEN || NAME_len != MACRO_LEN) return 4;
  if (std::memcmp(want.data(), NAME, want.size()) != 0) return 5;
  if (reinterpret_cast<std::uintptr_t>(NAME) % MACRO_ALIGNMENT != 0) return 6;
  std::printf("%s %u\n", MACRO_SHA256, NAME_len);
  return 0;
}
"""


def compile_cc(cc: Path, *flags: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CXX, "-std=c++11", "-Wall", "-Wextra", "-Werror", *flags, str(cc)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@needs_cxx
def test_array_compiles_links_and_holds_the_model_bytes_aligned(tmp_path):
    out = write_c_array(INT8, tmp_path, "digits_head")
    data = INT8.read_bytes()
    assert out == {"cc": str(tmp_path / "digits_head.cc"), "h": str(tmp_path / "digits_head.h"),
                   "symbol": "digits_head", "length_symbol": "digits_head_len", "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), "alignment": ALIGNMENT}
    header = Path(out["h"]).read_text()
    assert "#ifndef EDGEVEIL_DIGITS_HEAD_H_" in header and f"{len(data)} bytes" in header
    assert "extern const unsigned char digits_head[];" in header
    assert "extern const unsigned int digits_head_len;" in header
    rows = [line for line in Path(out["cc"]).read_text().splitlines() if line.startswith("    0x")]
    assert all(line.count("0x") == 12 for line in rows[:-1]) and 1 <= rows[-1].count("0x") <= 12
    assert "alignas(16) const unsigned char digits_head[]" in Path(out["cc"]).read_text()

    main = MAIN.replace("NAME", "digits_head").replace("MACRO", "DIGITS_HEAD")
    (tmp_path / "main.cc").write_text(main)
    for source in ("digits_head.cc", "main.cc"):
        done = compile_cc(tmp_path / source, "-c", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    link = subprocess.run([CXX, "digits_head.o", "main.o", "-o", "check"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert link.returncode == 0, link.stderr
    ran = subprocess.run([str(tmp_path / "check"), str(INT8)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, f"exit {ran.returncode} (4 length, 5 bytes, 6 alignment)"
    assert ran.stdout.split() == [out["sha256"], str(len(data))]


@needs_cxx
def test_a_cc_and_h_from_different_models_do_not_compile(tmp_path):
    """The .cc static_asserts its size against the header's length macro: a half-updated pair fails."""
    write_c_array(INT8, tmp_path, "head")
    other = tmp_path / "other"
    write_c_array(FP32, other, "head", require_full_integer=False)
    assert compile_cc(tmp_path / "head.cc", "-c", cwd=tmp_path).returncode == 0
    shutil.copyfile(other / "head.h", tmp_path / "head.h")
    done = compile_cc(tmp_path / "head.cc", "-c", cwd=tmp_path)
    assert done.returncode != 0 and "different models" in done.stderr


def test_float_model_is_refused_naming_what_is_float_and_nothing_is_written(tmp_path):
    out = tmp_path / "firmware"
    with pytest.raises(NotFullInteger) as err:
        write_c_array(FP32, out)
    message = str(err.value)
    assert "head_fp32.tflite" in message and "fp32" in message
    assert "input 'input' (FLOAT32)" in message and "output 'Identity' (FLOAT32)" in message
    assert "CONV_2D" in message and "int8" in message
    assert isinstance(err.value, ValueError) and listing(out) == []


def test_float_parts_of_the_fixtures():
    assert float_parts(INT8).kind is None and float_parts(INT8).describe() == ""
    parts = float_parts(FP32)
    assert parts.kind == "fp32" and parts.ops == ("CONV_2D", "PAD")
    assert len(parts.activations) == 2 and all(a.endswith("(FLOAT32)") for a in parts.activations)
    check_full_integer(INT8)  # no exception: the int8 fixture is full-integer


def test_float_model_is_written_when_asked(tmp_path):
    out = write_c_array(FP32, tmp_path, "float_head", require_full_integer=False)
    assert out["bytes"] == FP32.stat().st_size and listing(tmp_path) == ["float_head.cc", "float_head.h"]


@pytest.mark.parametrize("name", ["1head", "head-int8", "", "head int8", None])
def test_name_must_be_a_c_identifier(tmp_path, name):
    with pytest.raises(ValueError, match="C identifier"):
        write_c_array(INT8, tmp_path, name)
    assert listing(tmp_path) == []


def test_a_folder_in_the_way_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "head_int8.h").mkdir()
    with pytest.raises(ValueError, match=r"head_int8\.h: a folder of that name is in the way"):
        write_c_array(INT8, tmp_path)
    assert listing(tmp_path) == ["head_int8.h"]


def test_rewrite_replaces_both_files_and_leaves_no_temp_files(tmp_path):
    write_c_array(FP32, tmp_path, "head", require_full_integer=False)
    out = write_c_array(INT8, tmp_path, "head")
    assert listing(tmp_path) == ["head.cc", "head.h"]
    assert out["sha256"] in (tmp_path / "head.h").read_text()
    assert f"head_len = {INT8.stat().st_size}u;" in (tmp_path / "head.cc").read_text()


def test_missing_or_garbled_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        write_c_array(tmp_path / "nope.tflite", tmp_path / "out")
    (tmp_path / "x.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="x.tflite is not a .tflite model"):
        write_c_array(tmp_path / "x.tflite", tmp_path / "out")
    assert listing(tmp_path / "out") == []
