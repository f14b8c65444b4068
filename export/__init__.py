"""Stage 2: ONNX export, TFLite conversion with calibration, parity against PyTorch.

Importing this package costs numpy only: torch, onnx, onnx2tf and tensorflow are imported inside
the functions that need them (onnx2tf even runs in a subprocess).
"""
from edgeveil.device.manifest import PRECISIONS

from .convert import convert, tflite_operators
from .errors import ExportError
from .onnx_export import export_onnx, load_onnx_checked
from .parity import parity
from .run import export_run

__all__ = [
    "ExportError", "PRECISIONS", "export_onnx", "load_onnx_checked", "convert", "tflite_operators",
    "parity", "export_run",
]
