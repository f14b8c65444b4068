"""The flashable head: a .tflite as a C array ({name}.h + {name}.cc), and the full-integer check.

MCU runtimes take full-integer models only: TFLite Micro refuses fp16 weights (its DEQUANTIZE
kernel takes int8/int16/uint8 input) and hybrid dynamic-range kernels ("Hybrid models are not
supported on TFLite Micro"), and Vela leaves every float op on the CPU (tflite-micro#757, #2543;
both verified with this project's exports). `float_parts` finds what is float in a model and
`check_full_integer` refuses it with a message that names it; `write_c_array` calls it first.

The array follows the TFLite Micro convention (`xxd -i` output made const and aligned so it stays
in flash): `alignas(16) const unsigned char <name>[]` in the .cc, with the length and sha256 in
the header as a comment and as macros. The .cc includes its header and `static_assert`s that the
array's size equals the header's length macro, so a .cc and .h from different models (a
half-updated pair) do not compile.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from edgeveil.device.files import atomic_write_bytes

from .convert import _op_codes, _read_tflite

__all__ = ["ALIGNMENT", "NotFullInteger", "FloatParts", "float_parts", "check_full_integer", "write_c_array"]

ALIGNMENT = 16  # bytes: TFLite Micro's buffer alignment (MicroArenaBufferAlignment) and Ethos-U's
_BYTES_PER_LINE = 12
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16")
_KINDS = {
    "fp32": "float32 activations and weights",
    "fp16": "float16 weights dequantized to float32 at run time",
    "dynamic-range": "int8 weights with float32 activations (hybrid kernels)",
    "float-io": "integer inside, but float input/output converted by QUANTIZE/DEQUANTIZE",
}


class NotFullInteger(ValueError):
    """The model has float inputs, outputs or activations; MCU targets take full-integer models only."""


@dataclass(frozen=True)
class FloatParts:
    """What is float in a .tflite model (all empty and kind None for a full-integer model).

    kind: None, "fp32", "fp16", "dynamic-range" or "float-io" (see _KINDS).
    inputs / outputs / activations: "'name' (TYPE)" of each float non-constant tensor (long names cut).
    ops: operator names that read or write a float non-constant tensor, in order of first use.
    """

    kind: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    activations: tuple[str, ...]
    ops: tuple[str, ...]

    def describe(self) -> str:
        """One line: the kind, then each float part ('' for a full-integer model)."""
        if self.kind is None:
            return ""
        parts = [f"{self.kind} ({_KINDS[self.kind]})"]
        parts += [f"input {t}" for t in self.inputs] + [f"output {t}" for t in self.outputs]
        if self.activations:
            shown = ", ".join(self.activations[:2])
            more = f" and {len(self.activations) - 2} more" if len(self.activations) > 2 else ""
            parts.append(f"{len(self.activations)} float activation tensor(s): {shown}{more}")
        if self.ops:
            parts.append(f"float ops: {', '.join(self.ops)}")
        return "; ".join(parts)


def float_parts(tflite_path) -> FloatParts:
    """Inspect the first subgraph of a .tflite model: its float non-constant tensors and the ops
    that touch them. A tensor is constant when its buffer holds data (weights, biases, shapes)."""
    schema, model = _read_tflite(tflite_path)
    graph, codes = model.Subgraphs(0), [name for name, _ in _op_codes(schema, model)]
    types = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}

    def type_of(t: int) -> str:
        return types.get(graph.Tensors(t).Type(), str(graph.Tensors(t).Type()))

    def constant(t: int) -> bool:
        buffer = model.Buffers(graph.Tensors(t).Buffer())
        return buffer is not None and (buffer.DataLength() > 0 or buffer.Size() > 0)

    def label(t: int) -> str:
        return f"{_short(graph.Tensors(t).Name().decode(errors='replace'))!r} ({type_of(t)})"

    floats = {t for t in range(graph.TensorsLength()) if type_of(t) in _FLOAT_TYPES and not constant(t)}
    inputs = [graph.Inputs(i) for i in range(graph.InputsLength())]
    outputs = [graph.Outputs(i) for i in range(graph.OutputsLength())]
    ops, hybrid, inner_float = [], False, False
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        ins = [op.Inputs(k) for k in range(op.InputsLength()) if op.Inputs(k) >= 0]
        touched = ins + [op.Outputs(k) for k in range(op.OutputsLength())]
        if not floats.intersection(touched):
            continue
        name = codes[op.OpcodeIndex()]
        ops.append(name)
        hybrid |= any(constant(t) and type_of(t) in ("INT8", "UINT8") for t in ins)
        inner_float |= name not in ("QUANTIZE", "DEQUANTIZE")
    has_fp16 = any(type_of(t) == "FLOAT16" for t in range(graph.TensorsLength()))
    kind = _kind(bool(floats), has_fp16, hybrid, inner_float)
    return FloatParts(kind, tuple(label(t) for t in inputs if t in floats),
                      tuple(label(t) for t in outputs if t in floats),
                      tuple(label(t) for t in sorted(floats - set(inputs) - set(outputs))),
                      tuple(dict.fromkeys(ops)))


def check_full_integer(tflite_path) -> None:
    """Raise NotFullInteger naming every float part unless the model is full-integer (int8, int16x8)."""
    parts = float_parts(tflite_path)
    if parts.kind is not None:
        raise NotFullInteger(
            f"{tflite_path} is not a full-integer model: {parts.describe()}. MCU targets (TFLite Micro, "
            "Ethos-U) take full-integer models only (int8 or int16x8 inputs, outputs and activations): "
            "use the int8 export, head_int8.tflite")


def write_c_array(tflite_path, out_dir, name: str = "head_int8", *, require_full_integer: bool = True) -> dict:
    """Write out_dir/{name}.cc and out_dir/{name}.h holding the model bytes; return what was written.

    name: a C identifier; it names the array, `<name>_len`, the files and (upper-cased) the macros
    <NAME>_LEN, <NAME>_SHA256 and <NAME>_ALIGNMENT. require_full_integer: refuse float models
    (NotFullInteger) before anything is written. Both texts are built and both destinations
    checked first; each file is then written atomically (temp file, fsync, rename), the .cc first.
    Returns {"cc", "h", "symbol", "length_symbol", "bytes", "sha256", "alignment"}.
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"name must be a C identifier (letters, digits, '_', not starting with a digit), "
                         f"got {name!r}")
    tflite_path = Path(tflite_path)
    data = _read_model(tflite_path)
    if require_full_integer:
        check_full_integer(tflite_path)
    out_dir = Path(out_dir)
    cc_path, h_path = out_dir / f"{name}.cc", out_dir / f"{name}.h"
    for path in (out_dir, cc_path, h_path):
        _check_destination(path, is_dir=path == out_dir)
    sha = hashlib.sha256(data).hexdigest()
    header, source = _header(name, tflite_path.name, len(data), sha), _source(name, data)
    atomic_write_bytes(cc_path, source.encode("ascii"))
    atomic_write_bytes(h_path, header.encode("ascii"))
    return {"cc": str(cc_path), "h": str(h_path), "symbol": name, "length_symbol": f"{name}_len",
            "bytes": len(data), "sha256": sha, "alignment": ALIGNMENT}


# ------------------------------------------------------------------------------- helpers


def _kind(has_float: bool, has_fp16: bool, hybrid: bool, inner_float: bool) -> str | None:
    if not has_float:
        return None
    if has_fp16:
        return "fp16"
    if hybrid:
        return "dynamic-range"
    return "fp32" if inner_float else "float-io"


def _short(name: str, limit: int = 48) -> str:
    """TFLite tensor names join every fused op's name; keep the start."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _read_model(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a .tflite model (no TFL3 file identifier)")
    return data


def _check_destination(path: Path, is_dir: bool) -> None:
    if is_dir and path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} exists and is not a folder")
    if not is_dir and path.is_dir():
        raise ValueError(f"cannot write {path}: a folder of that name is in the way")


def _header(name: str, source_name: str, length: int, sha: str) -> str:
    macro, guard = name.upper(), f"EDGEVEIL_{name.upper()}_H_"
    return (
        f"// {name}.h: {source_name} as a C array, generated by edgeveil. Do not edit.\n"
        f"// Model length: {length} bytes; sha256: {sha}\n"
        f"// The array is const (it stays in flash) and {ALIGNMENT}-byte aligned, as TFLite Micro expects.\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"#define {macro}_LEN {length}u\n"
        f"#define {macro}_SHA256 \"{sha}\"\n"
        f"#define {macro}_ALIGNMENT {ALIGNMENT}\n\n"
        "#ifdef __cplusplus\nextern \"C\" {\n#endif\n\n"
        f"extern const unsigned char {name}[];\n"
        f"extern const unsigned int {name}_len;\n\n"
        "#ifdef __cplusplus\n}  // extern \"C\"\n#endif\n\n"
        f"#endif  // {guard}\n"
    )


def _source(name: str, data: bytes) -> str:
    rows = []
    for i in range(0, len(data), _BYTES_PER_LINE):
        rows.append("    " + ", ".join(f"0x{b:02x}" for b in data[i : i + _BYTES_PER_LINE]) + ",")
    return (
        f"// {name}.cc: generated by edgeveil (C++11). Do not edit; see {name}.h.\n"
        f"#include \"{name}.h\"\n\n"
        f"alignas({ALIGNMENT}) const unsigned char {name}[] = {{\n" + "\n".join(rows) + "\n};\n"
        f"const unsigned int {name}_len = {len(data)}u;\n\n"
        f"static_assert(sizeof({name}) == {name.upper()}_LEN, \"{name}.cc and {name}.h are from different models\");\n"
    )
