"""The export manifest (``runs/<name>/export/manifest.json``): schema and checks.

Standard library only, so a board can read a manifest with nothing but Python. The exporter
builds entries with `tensor_entry` / `artifact_entry` and validates the whole document with
`validate_manifest` before writing it with device.files.atomic_write_json; readers call
`read_manifest`, which raises a ValueError naming the file and the field. Keys not listed here
are allowed (later stages add their own, e.g. TFLite Micro arena bytes), so the schema only grows
by adding optional fields.

Layout (abridged)::

    {"schema": "edgeveil.manifest/2", "model_id": "<16 hex: sha256 prefix of the int8 head>",
     "source": {...}, "tools": {...}, "onnx": {...}, "converter": {...}, "calibration": {...},
     "input_spec": {"shape": [1, H, W, C], "layout": "NHWC", "dtype": "uint8",
                    "pixel_scaling": "x/255", "mean": [...], "std": [...]},
     "inference_noise": null | {...},
     "activation_clamps": {"clamps": [{"module", "low", "high"}], ...},   optional (absent or null: none);
           export's clamps on activations one int8 grid cannot hold (export/clip.py), part of the deployed head
     "artifacts": {"int8": {"file": "head_int8.tflite", "precision": "int8", "sha256": ...,
                            "model_id": "<sha256[:16]>", "bytes": ..., "inputs": [tensor],
                            "outputs": [tensor], "sent": sent, "operators": ["CONV_2D", ...], ...}, ...}}

    tensor = {"name", "shape", "dtype", "scale", "zero_point"}   (scale/zero_point null if float)
    sent = {"scale", "zero_point", "noise"}   the grid the device sends this artifact's features on,
           derived once by export (device.noise.sent_qparams) for `noise`, which must be the
           manifest's inference_noise; the output tensor's own grid unless noise widens it
           (scale/zero_point null for a float output)

Schema 2 added the per-artifact `model_id` and `sent`; an older manifest is refused (re-export).
"""
from __future__ import annotations

import re
from pathlib import Path

from .files import read_json, sha256_file

__all__ = [
    "SCHEMA_VERSION", "PRECISIONS", "tensor_entry", "sent_entry", "artifact_entry", "validate_manifest",
    "read_manifest", "artifact_path", "accuracy_warning", "ACCURACY_LOSS_WARNING", "clamp_bounds", "describe_clamps",
]

SCHEMA_VERSION = "edgeveil.manifest/2"
PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8")
ACCURACY_LOSS_WARNING = 0.03  # an artifact costing the tail more accuracy than this is flagged (manifest, reports)
_TOP_FIELDS = {"schema": str, "model_id": str, "source": dict, "tools": dict, "onnx": dict,
               "converter": dict, "calibration": dict, "input_spec": dict, "artifacts": dict}
_INPUT_SPEC_FIELDS = {"shape": list, "layout": str, "dtype": str, "pixel_scaling": str,
                      "mean": list, "std": list}
_ARTIFACT_FIELDS = {"file": str, "precision": str, "sha256": str, "model_id": str, "bytes": int,
                    "inputs": list, "outputs": list, "sent": dict, "operators": list}
_TENSOR_FIELDS = {"name": str, "shape": list, "dtype": str}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


class _Invalid(ValueError):
    """A schema problem at one field; `read_manifest` adds the file name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field} {problem}")


# ------------------------------------------------------------------------------- building


def tensor_entry(name: str, shape, dtype: str, scale: float | None, zero_point: int | None) -> dict:
    """One model input or output: shape as a list of ints, dtype as a numpy name ('int8')."""
    entry = {"name": str(name), "shape": [int(d) for d in shape], "dtype": str(dtype),
             "scale": None if scale is None else float(scale),
             "zero_point": None if zero_point is None else int(zero_point)}
    _check_tensor(entry, "tensor")
    return entry


def sent_entry(scale: float | None, zero_point: int | None, noise: dict | None) -> dict:
    """The grid an artifact's features are sent on, and the noise spec it was derived for."""
    return {"scale": None if scale is None else float(scale),
            "zero_point": None if zero_point is None else int(zero_point), "noise": noise}


def artifact_entry(*, file: str, precision: str, sha256: str, bytes: int, inputs: list,
                   outputs: list, sent: dict, operators: list, **extra) -> dict:
    """An artifact's manifest entry; its model id is sha256[:16]; `extra` (parity, ...) is kept as given."""
    entry = {"file": file, "precision": precision, "sha256": sha256, "model_id": sha256[:16], "bytes": bytes,
             "inputs": inputs, "outputs": outputs, "sent": sent, "operators": operators, **extra}
    _check_artifact(entry, f"artifacts.{precision}")
    return entry


def accuracy_warning(precision: str, float_accuracy: float | None, accuracy: float, zero_point_share: float | None,
                     step: float | None) -> str | None:
    """Export's warning (stored in the entry's `warnings`) when an artifact's features cost the tail
    more than ACCURACY_LOSS_WARNING of accuracy; None otherwise. The verdict judges privacy only: a
    head that rounds its features away looks private."""
    if float_accuracy is None or float_accuracy - accuracy <= ACCURACY_LOSS_WARNING:
        return None
    where = (f"; {100 * zero_point_share:.1f}% of its output codes sit at the zero point" if zero_point_share is not None
             else "") + (f" (output step {step:.3g})" if step else "")
    return (f"{precision}: the tail's accuracy on these features is {accuracy:.3f} against {float_accuracy:.3f} in float, "
            f"{100 * (float_accuracy - accuracy):.1f} points lost{where}. Privacy measured on this artifact partly "
            "comes from that loss.")


def clamp_bounds(manifest: dict) -> list[dict]:
    """The clamps a manifest records ([] for none, or a manifest from before clamps existed)."""
    return list((manifest.get("activation_clamps") or {}).get("clamps") or [])


def describe_clamps(clamps: list[dict]) -> str:
    """One phrase per clamp, for the reports: the tensor, its bounds and the range it had."""
    return "; ".join(f"{c['module'] or 'the head output'} to [{c['low']:.3g}, {c['high']:.3g}] (it ranged "
                     f"{c['min']:.3g} to {c['max']:.3g})" for c in clamps)


# ------------------------------------------------------------------------------- checking


def validate_manifest(obj, source: str = "manifest") -> dict:
    """Return `obj` if it is a valid manifest, else raise ValueError naming `source` and the field."""
    try:
        _check_manifest(obj)
    except _Invalid as e:
        raise ValueError(f"{source}: {e}") from None
    return obj


def read_manifest(path) -> dict:
    """Read and validate a manifest.json; every problem is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found (run `edgeveil export` first)")
    return validate_manifest(read_json(path), str(path))


def artifact_path(manifest_path, precision: str, manifest: dict, verify: bool = True) -> Path:
    """Path of one artifact next to its manifest; with `verify`, its sha256 must match."""
    entries = manifest["artifacts"]
    if precision not in entries:
        raise ValueError(f"{manifest_path}: no artifact {precision!r}; it has {', '.join(entries)}")
    path = Path(manifest_path).parent / entries[precision]["file"]
    if verify and sha256_file(path) != entries[precision]["sha256"]:
        raise ValueError(f"{path} does not match field artifacts.{precision}.sha256 of {manifest_path}")
    return path


def _check_manifest(obj) -> None:
    if not isinstance(obj, dict):
        raise _Invalid("(top level)", f"must be a JSON object, got {type(obj).__name__}")
    _check_fields(obj, _TOP_FIELDS, "")
    if obj["schema"] != SCHEMA_VERSION:
        raise _Invalid("schema", f"is {obj['schema']!r}, this edgeveil reads {SCHEMA_VERSION!r}: re-run "
                                 "`edgeveil export RUN_DIR` to rewrite the manifest")
    if not _HEX16.fullmatch(obj["model_id"]):
        raise _Invalid("model_id", f"must be 16 lowercase hex digits, got {obj['model_id']!r}")
    if "inference_noise" not in obj:
        raise _Invalid("inference_noise", "is missing (null when the head adds no noise)")
    _check_fields(obj["input_spec"], _INPUT_SPEC_FIELDS, "input_spec.")
    _check_clamps(obj.get("activation_clamps"))
    if not obj["artifacts"]:
        raise _Invalid("artifacts", "is empty")
    for key, entry in obj["artifacts"].items():
        _check_artifact(entry, f"artifacts.{key}")
        if entry["precision"] != key:
            raise _Invalid(f"artifacts.{key}.precision", f"is {entry['precision']!r}, expected {key!r}")
        if entry["sent"]["noise"] != obj["inference_noise"]:
            raise _Invalid(f"artifacts.{key}.sent.noise", f"is {entry['sent']['noise']!r}, but inference_noise is "
                           f"{obj['inference_noise']!r}: re-run `edgeveil export RUN_DIR`")


def _check_clamps(record) -> None:
    if record is None:
        return
    if not isinstance(record, dict) or not isinstance(record.get("clamps"), list):
        raise _Invalid("activation_clamps", f"must be null or an object with a list `clamps`, got {record!r}")
    for i, clamp in enumerate(record["clamps"]):
        where = f"activation_clamps.clamps[{i}]"
        if not isinstance(clamp, dict) or not isinstance(clamp.get("module"), str):
            raise _Invalid(where, f"must be an object with a module name, got {clamp!r}")
        for side in ("low", "high"):
            value = clamp.get(side)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf"):
                raise _Invalid(f"{where}.{side}", f"must be a finite number, got {value!r}")
        if not clamp["low"] < clamp["high"]:
            raise _Invalid(where, f"low {clamp['low']} must be below high {clamp['high']}")


def _check_artifact(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise _Invalid(where, f"must be an object, got {type(entry).__name__}")
    _check_fields(entry, _ARTIFACT_FIELDS, where + ".")
    if entry["precision"] not in PRECISIONS:
        raise _Invalid(f"{where}.precision", f"is {entry['precision']!r}, expected one of {PRECISIONS}")
    name = entry["file"]
    if not name or Path(name).name != name or name in (".", ".."):
        raise _Invalid(f"{where}.file", f"must be a bare file name next to the manifest, got {name!r}")
    if not _HEX64.fullmatch(entry["sha256"]):
        raise _Invalid(f"{where}.sha256", "must be 64 lowercase hex digits")
    if entry["model_id"] != entry["sha256"][:16]:
        raise _Invalid(f"{where}.model_id", f"must be the first 16 digits of its sha256, got {entry['model_id']!r}")
    if entry["bytes"] <= 0:
        raise _Invalid(f"{where}.bytes", f"must be > 0, got {entry['bytes']}")
    for kind in ("inputs", "outputs"):
        if not entry[kind]:
            raise _Invalid(f"{where}.{kind}", "is empty")
        for i, tensor in enumerate(entry[kind]):
            _check_tensor(tensor, f"{where}.{kind}[{i}]")
    _check_sent(entry["sent"], entry["outputs"][0], f"{where}.sent")
    if not all(isinstance(op, str) and op for op in entry["operators"]):
        raise _Invalid(f"{where}.operators", "must be a list of operator names")


def _check_tensor(tensor, where: str) -> None:
    if not isinstance(tensor, dict):
        raise _Invalid(where, f"must be an object, got {type(tensor).__name__}")
    _check_fields(tensor, _TENSOR_FIELDS, where + ".")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in tensor["shape"]):
        raise _Invalid(f"{where}.shape", f"must be a list of positive ints, got {tensor['shape']!r}")
    for key in ("scale", "zero_point"):
        if key not in tensor:
            raise _Invalid(f"{where}.{key}", "is missing (null for a float tensor)")
    scale = tensor["scale"]
    if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0):
        raise _Invalid(f"{where}.scale", f"must be a number > 0 or null, got {scale!r}")
    if (scale is None) != (tensor["zero_point"] is None):
        raise _Invalid(f"{where}.zero_point", "must be null exactly when scale is null")


def _check_sent(sent: dict, output: dict, where: str) -> None:
    for key in ("scale", "zero_point", "noise"):
        if key not in sent:
            raise _Invalid(f"{where}.{key}", "is missing (null for a float output / no noise)")
    scale, zero_point = sent["scale"], sent["zero_point"]
    if (scale is None) != (output["scale"] is None):
        raise _Invalid(f"{where}.scale", "must be null exactly when the output tensor's scale is null")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise _Invalid(f"{where}.scale", f"must be a number > 0 or null, got {scale!r}")
    integer = isinstance(zero_point, int) and not isinstance(zero_point, bool)
    if (zero_point is None) != (scale is None) or not (zero_point is None or integer):
        raise _Invalid(f"{where}.zero_point", f"must be an integer, null exactly when scale is null, "
                                              f"got {zero_point!r}")
    if sent["noise"] is not None and not isinstance(sent["noise"], dict):
        raise _Invalid(f"{where}.noise", f"must be a noise spec object or null, got {sent['noise']!r}")


def _check_fields(obj: dict, fields: dict, prefix: str) -> None:
    for key, kind in fields.items():
        if key not in obj:
            raise _Invalid(prefix + key, "is missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _Invalid(prefix + key, f"must be a {_JSON_NAMES[kind]}, got {type(value).__name__}")


_JSON_NAMES = {str: "string", int: "integer", dict: "object", list: "list"}
