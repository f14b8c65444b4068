"""Operator check: can a board's runtime run every operator of an artifact, and how fast a kernel?

For MCU boards the runtime is TensorFlow Lite Micro: an operator without a TFLM kernel fails at
AllocateTensors on the device ("Didn't find op for builtin opcode ..."), so such a model is
refused before any flashable file is written (`require_supported`). Operators TFLM runs but
the board's optimized kernel library (CMSIS-NN on Cortex-M, ESP-NN on the ESP32-S3) does not
cover fall back to TFLM's reference kernels, roughly 10x slower than CMSIS-NN
(edge_toolchain.md section 1.8, TinyEngine's STM32H743 table): they are listed, not refused.
On an Ethos-U board Vela decides which operators go to the NPU (export.vela.npu_support); the
rest run on the Cortex-M through TFLM. Linux boards run the full TFLite builtin set (the
exporter already refuses non-builtin operators).

The lists below are data with their source. Data types are not checked here: TFLM's own
interpreter, which sizes the arena, refuses an operator whose kernel lacks the tensor type.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["TFLM_BUILTINS", "TFLM_SOURCE", "OPTIMIZED_KERNELS", "UnsupportedOperator", "check_operators",
           "check_artifact", "require_supported"]

# The builtin operators TFLM registers (MicroMutableOpResolver's Add* methods / the Python
# package's op resolver), read from tflite-micro at commit 8f6596d, the build of the
# `tflite-micro` Python package this project pins (0.dev20261023182759-g8f6596d).
TFLM_SOURCE = ("tensorflow/tflite-micro tensorflow/lite/micro/micro_mutable_op_resolver.h (Add* methods), "
               "commit 8f6596d as built into the tflite-micro Python package 0.dev20261023182759")
TFLM_BUILTINS = frozenset("""
    ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND
    BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION CONV_2D COS CUMSUM DEPTH_TO_SPACE
    DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR FLOOR_DIV
    FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL HARD_SWISH IF L2_NORMALIZATION
    L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG LOG_SOFTMAX LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC
    MAX_POOL_2D MAXIMUM MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE
    READ_VARIABLE REDUCE_MAX REDUCE_MIN RELU RELU6 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
    REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT
    SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF TANH TRANSPOSE
    TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK VAR_HANDLE WHILE ZEROS_LIKE
""".split())

# Kernel library -> (operators it optimizes, source). Everything else in TFLM_BUILTINS runs the
# reference kernel.
OPTIMIZED_KERNELS = {
    "cmsis-nn": (frozenset("""ADD AVERAGE_POOL_2D BATCH_MATMUL CONV_2D DEPTHWISE_CONV_2D FULLY_CONNECTED
                              MAX_POOL_2D MAXIMUM MINIMUM MUL PAD PADV2 SOFTMAX SVDF TRANSPOSE TRANSPOSE_CONV
                              UNIDIRECTIONAL_SEQUENCE_LSTM""".split()),
                 "tensorflow/tflite-micro tensorflow/lite/micro/kernels/cmsis_nn/ (one file per optimized "
                 "kernel: add, batch_matmul, conv, depthwise_conv, fully_connected, maximum_minimum, mul, "
                 "pad, pooling, softmax, svdf, transpose, transpose_conv, unidirectional_sequence_lstm)"),
    "esp-nn": (frozenset("ADD MUL CONV_2D DEPTHWISE_CONV_2D MAX_POOL_2D AVERAGE_POOL_2D FULLY_CONNECTED".split()),
               "espressif/esp-nn README, kernel table for the ESP32-S3 (commit 0798b58)"),
}
_KERNELS_BY_ESTIMATOR = {"cortex-m4": "cmsis-nn", "cortex-m7": "cmsis-nn", "cortex-m55": "cmsis-nn",
                         "xtensa-lx7-esp-nn": "esp-nn"}


class UnsupportedOperator(ValueError):
    """The artifact uses an operator the board's runtime cannot run; the message names it."""


def check_operators(operators: list[str], board) -> dict:
    """The op check of a list of operator names for `board` (an export.boards.Board).

    Returns {"runtime", "operators", "unsupported", "reference_kernels", "kernels", "source"}:
    unsupported: operators the runtime lacks (refuse for MCU boards); reference_kernels: operators
    that run, but without the board's optimized kernel library.
    """
    ops = list(dict.fromkeys(operators))
    if not board.is_mcu:
        return {"runtime": board.runtime, "operators": ops, "unsupported": [], "reference_kernels": [],
                "kernels": None, "source": "TFLite builtin operators (checked at export)"}
    kernels = _KERNELS_BY_ESTIMATOR.get(board.estimator)
    optimized = OPTIMIZED_KERNELS[kernels][0] if kernels else frozenset()
    unsupported = [op for op in ops if op not in TFLM_BUILTINS]
    return {"runtime": board.runtime, "operators": ops, "unsupported": unsupported,
            "reference_kernels": [op for op in ops if op in TFLM_BUILTINS and op not in optimized],
            "kernels": kernels, "source": TFLM_SOURCE}


def check_artifact(tflite_path: Path, board) -> dict:
    """check_operators on a .tflite, plus Vela's NPU mapping on an Ethos-U board ("npu" key)."""
    from .convert import tflite_operators

    report = check_operators(tflite_operators(tflite_path), board)
    report["npu"] = None
    if board.vela_accelerator:
        from .vela import npu_support

        report["npu"] = npu_support(tflite_path, board.vela_accelerator)
    return report


def require_supported(report: dict, board, artifact: str) -> None:
    """Raise UnsupportedOperator naming every operator `board` cannot run (MCU boards only)."""
    if report["unsupported"]:
        ops = ", ".join(report["unsupported"])
        raise UnsupportedOperator(
            f"{artifact} cannot run on {board.name} ({board.runtime}): TFLite Micro has no kernel for "
            f"{ops}. Nothing was written for the board; change the head so it avoids {ops} "
            f"(supported operators: {TFLM_SOURCE}).")
