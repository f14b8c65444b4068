"""Latency on a board without the board: MACs x cycles per MAC / clock, as a range, "estimated".

    est = estimate_latency({"conv": 9.9e6}, "cortex-m7", 480e6)
    est["low_ms"], est["high_ms"]          # 18.8, 41.5

Cycles per MAC come from published measurements (edge_toolchain.md sections 1.8 and 3), kept
here as data and turned into ranges by stated rules, per engine (core + kernel library):

* Cortex-M: MLPerf Tiny v0.5-v1.3 image classification (ResNet-8, 12.5 M MACs): cycles/MAC =
  clock x latency / 12.5 M. Low end: the best tuned engine on that core; high end: TFLM +
  CMSIS-NN where it was submitted (M4), else the best M7 figure of the same engine version times
  TinyEngine's measured TFLM+CMSIS-NN / X-CUBE-AI 7.3 latency ratio on the STM32H743 (53/32 ms).
* Cortex-M55: Renesas' TFLM submission on a Helium Cortex-M85 is the low end; twice that is the
  high end (an assumption: the same dual-beat MVE, a smaller core and memory system; no M55
  measurement is published).
* ESP32-S3: ESP-NN's kernel table (ticks per kernel at 240 MHz), divided by each kernel's MACs.
* Cortex-A: the Raspberry Pi 4 MLPerf Tiny figure (1.08 ms, four A72 cores) fixes an efficiency
  of 24% of the A72's int8 peak (8 MAC/cycle/core); the range spans four cores (low) to one core
  (high) at that efficiency; the A76 uses its own peak (32 MAC/cycle/core, SDOT) at the same
  efficiency.

Element-wise work (ADD, pooling, ...) is not charged separately: the Cortex-M and Cortex-A
figures are whole-network latencies divided by conv/FC MACs, so they include a ResNet-8-like
share of it. No source gives a per-operator overhead; small heads (under ~1 M MACs, where fixed
costs dominate) and depthwise-heavy heads run slower than these ranges say, and the estimate
carries a caveat when either applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["MLPERF_TINY_IC", "RESNET8_MACS", "ESP_NN_S3", "ENGINES", "Engine", "op_class", "macs_by_class",
           "estimate_latency"]

RESNET8_MACS = 12_500_000  # the MAC count MLPerf Tiny's cycles/MAC figures divide by (section 1.8)
_SOURCE_MLPERF = ("MLPerf Tiny image classification results v0.5-v1.3 (mlcommons/tiny_results_v*), "
                  "edge_toolchain.md section 1.8")

# (board, core, clock_hz, submission / engine, latency_ms), ResNet-8 on CIFAR-10.
MLPERF_TINY_IC = (
    ("NUCLEO-L4R5ZI", "Cortex-M4F", 120e6, "v0.5 reference, TFLM + CMSIS-NN", 704.2),
    ("NUCLEO-L4R5ZI", "Cortex-M4F", 120e6, "v1.0 OctoML microTVM + CMSIS-NN", 389.6),
    ("NUCLEO-L4R5ZI", "Cortex-M4F", 120e6, "v1.0 ST X-CUBE-AI 7.3", 226.9),
    ("NUCLEO-L4R5ZI", "Cortex-M4F", 120e6, "v1.0 Plumerai", 173.2),
    ("NUCLEO-L4R5ZI", "Cortex-M4F", 120e6, "v1.2 ST X-CUBE-AI 9.0", 165.1),
    ("DISCO-F746NG", "Cortex-M7", 216e6, "v1.0 Plumerai", 64.8),
    ("DISCO-F746NG", "Cortex-M7", 216e6, "v1.2 Bosch HALE int8", 62.6),
    ("NUCLEO-H7A3ZI-Q", "Cortex-M7", 280e6, "v1.0 ST X-CUBE-AI 7.3", 54.3),
    ("NUCLEO-H7A3ZI-Q", "Cortex-M7", 280e6, "v1.2 ST X-CUBE-AI 9.0", 40.8),
    ("NUCLEO-U575ZI-Q", "Cortex-M33", 160e6, "v1.0 ST X-CUBE-AI 7.3", 139.7),
    ("NUCLEO-U575ZI-Q", "Cortex-M33", 160e6, "v1.3 ST", 109.5),
    ("nRF5340-DK", "Cortex-M33", 128e6, "v1.0 OctoML microTVM + CMSIS-NN", 316.2),
    ("EK-RA8D1", "Cortex-M85", 480e6, "v1.2 Renesas, TFLM", 8.5),
    ("Raspberry Pi 4B", "Cortex-A72", 1.5e9, "v0.5 LatentAI LEIP int8", 1.08),
)
_TINYENGINE_TFLM_OVER_XCUBE = 53 / 32  # mcunet-vww0 on STM32H743: TFLM+CMSIS-NN 53 ms, X-CUBE-AI 7.3 32 ms
_A72_PEAK, _A76_PEAK = 8, 32  # int8 MACs per cycle per core (edge_toolchain.md section 3)

# ESP-NN on the ESP32-S3 (240 MHz): (kernel, op class, ticks, MACs). MACs from the README's
# shapes: 10x10x64 out x 64 in; 8x8x16 out x 16 in; 8x8x64 out x 3x3x3; 16x16x16 out x 3x3;
# 10x10x32 out (4 channels x multiplier 8) x 5x5.
ESP_NN_S3 = (
    ("conv 1x1, 10x10, 64->64", "conv", 461_398, 10 * 10 * 64 * 64),
    ("conv 1x1, 8x8, 16->16", "conv", 43_578, 8 * 8 * 16 * 16),
    ("conv 3x3, 10x10, 3->64, no pad", "conv", 643_689, 8 * 8 * 64 * 27),
    ("depthwise 3x3, 18x18x16, no pad", "depthwise", 191_931, 16 * 16 * 16 * 9),
    ("depthwise 5x5, 12x12x4 x8, pad 1", "depthwise", 366_102, 10 * 10 * 32 * 25),
)
_SOURCE_ESP_NN = "espressif/esp-nn README, kernel-wise ticks on the ESP32-S3 at 240 MHz (commit 0798b58)"

_OP_CLASS = {"CONV_2D": "conv", "TRANSPOSE_CONV": "conv", "DEPTHWISE_CONV_2D": "depthwise",
             "FULLY_CONNECTED": "fully_connected", "BATCH_MATMUL": "fully_connected"}


@dataclass(frozen=True)
class Engine:
    """A core + kernel library: cycles per MAC (low, high) per op class ("*": every class)."""

    description: str
    cycles_per_mac: dict
    basis: str
    source: str

    def range_for(self, op_class: str) -> tuple[float, float]:
        return self.cycles_per_mac.get(op_class, self.cycles_per_mac["*"])


def _cpm(row) -> float:
    return row[2] * row[4] / 1e3 / RESNET8_MACS


def _rows(core: str, engine: str = "") -> list:
    return [r for r in MLPERF_TINY_IC if r[1] == core and engine in r[3]]


def _esp(op_class: str) -> tuple[float, float]:
    values = [ticks / macs for _, c, ticks, macs in ESP_NN_S3 if c == op_class]
    return min(values), max(values)


def _engines() -> dict[str, Engine]:
    m4 = [_cpm(r) for r in _rows("Cortex-M4F")]
    m7 = [_cpm(r) for r in _rows("Cortex-M7")]
    m7_high = max(_cpm(r) for r in _rows("Cortex-M7", "X-CUBE-AI 7.3")) * _TINYENGINE_TFLM_OVER_XCUBE
    m85 = _cpm(_rows("Cortex-M85")[0])
    a72 = _cpm(_rows("Cortex-A72")[0])  # all four cores
    efficiency = 1 / (a72 * 4 * _A72_PEAK)
    return {
        "cortex-m4": Engine("Cortex-M4(F), TFLM + CMSIS-NN", {"*": (min(m4), _cpm(_rows("Cortex-M4F", "TFLM")[0]))},
                            "low: best tuned engine (ST X-CUBE-AI 9.0); high: MLPerf Tiny v0.5 reference "
                            "TFLM + CMSIS-NN", _SOURCE_MLPERF),
        "cortex-m7": Engine("Cortex-M7, TFLM + CMSIS-NN", {"*": (min(m7), m7_high)},
                            "low: best tuned engine (ST X-CUBE-AI 9.0); high: X-CUBE-AI 7.3 x 53/32, "
                            "TinyEngine's TFLM+CMSIS-NN over X-CUBE-AI 7.3 latency on the STM32H743",
                            _SOURCE_MLPERF + "; mit-han-lab/tinyengine README (section 1.9)"),
        "cortex-m55": Engine("Cortex-M55 (Helium), TFLM + CMSIS-NN", {"*": (m85, 2 * m85)},
                             "low: Renesas TFLM on a Helium Cortex-M85 (EK-RA8D1); high: twice that "
                             "(assumed: no Cortex-M55 figure is published)", _SOURCE_MLPERF),
        "xtensa-lx7-esp-nn": Engine("Xtensa LX7 (ESP32-S3), TFLM + ESP-NN",
                                    {"*": _esp("conv"), "conv": _esp("conv"), "depthwise": _esp("depthwise")},
                                    "per-kernel ticks / MACs: best and worst kernel of each class",
                                    _SOURCE_ESP_NN),
        "cortex-a72": Engine("Cortex-A72 (Raspberry Pi 4), LiteRT + XNNPACK", {"*": (a72, 4 * a72)},
                             f"Pi 4 ResNet-8 (1.08 ms) = {efficiency:.0%} of the 4-core int8 peak; "
                             "low: 4 cores, high: 1 core at that efficiency", _SOURCE_MLPERF + "; section 3"),
        "cortex-a76": Engine("Cortex-A76 (Raspberry Pi 5), LiteRT + XNNPACK",
                             {"*": (1 / (4 * _A76_PEAK * efficiency), 1 / (_A76_PEAK * efficiency))},
                             f"the A76's int8 peak (32 MAC/cycle/core, SDOT) at the Pi 4's {efficiency:.0%} "
                             "efficiency; low: 4 cores, high: 1 core (no Pi 5 measurement is published)",
                             "edge_toolchain.md section 3 (derivation) and section 1.8 (Pi 4 figure)"),
    }


ENGINES = _engines()


def op_class(op_name: str) -> str | None:
    """'conv', 'depthwise' or 'fully_connected' for a MAC operator; None for any other."""
    return _OP_CLASS.get(op_name)


def macs_by_class(by_type: dict) -> dict[str, int]:
    """{op class: MACs} from graph.macs_by_type's {op name: {"macs", ...}}."""
    out: dict[str, int] = {}
    for name, t in by_type.items():
        cls = op_class(name)
        if cls and t["macs"]:
            out[cls] = out.get(cls, 0) + t["macs"]
    return out


def estimate_latency(macs: dict[str, int], engine: str, clock_hz: float) -> dict:
    """Latency range of `macs` ({op class: MACs}) on `engine` at `clock_hz`; all figures estimated."""
    if engine not in ENGINES:
        raise ValueError(f"unknown estimator engine {engine!r}; known: {', '.join(ENGINES)}")
    if not clock_hz or clock_hz <= 0:
        raise ValueError(f"clock_hz must be > 0, got {clock_hz!r}")
    e = ENGINES[engine]
    low = sum(m * e.range_for(c)[0] for c, m in macs.items())
    high = sum(m * e.range_for(c)[1] for c, m in macs.items())
    total = sum(macs.values())
    return {"label": "estimated", "engine": engine, "engine_description": e.description,
            "clock_hz": clock_hz, "macs": total, "cycles_low": round(low), "cycles_high": round(high),
            "low_ms": 1e3 * low / clock_hz, "high_ms": 1e3 * high / clock_hz,
            "cycles_per_mac": {c: list(e.range_for(c)) for c in macs}, "basis": e.basis, "source": e.source,
            "caveats": _caveats(macs, total)}


def _caveats(macs: dict, total: int) -> list[str]:
    caveats = []
    if total < 1_000_000:
        caveats.append(f"{total:,} MACs: fixed per-operator costs dominate heads this small and no source "
                       "gives them, so the low end is optimistic")
    if total and macs.get("depthwise", 0) / total > 0.2:
        caveats.append(f"{macs['depthwise'] / total:.0%} of MACs are depthwise, which runs at worse cycles/MAC "
                       "than the 3x3 convs the figures were measured on (section 1.8): expect the high end")
    return caveats


# ------------------------------------------------------------------------------- ResNet-8 check

_ENGINE_OF_CORE = {"Cortex-M4F": "cortex-m4", "Cortex-M7": "cortex-m7", "Cortex-M85": "cortex-m55",
                   "Cortex-A72": "cortex-a72"}
_TOLERANCE = 0.01  # published figures are rounded, and the ranges' ends are themselves published rows


def resnet8_tflite(cache_dir=None, seed: int = 0) -> Path:
    """MLPerf Tiny's ResNet-8 (32x32x3; 16/32/64 filters; 3 residual stacks; avg pool; dense 10) as
    a full-int8 .tflite: random weights and random calibration (latency and size do not depend on
    them, and nothing is downloaded). Built once with tf.keras, cached as
    `cache_dir`/resnet8_int8_seed{seed}.tflite (default ~/.cache/edgeveil)."""
    from edgeveil.device.files import atomic_write_bytes

    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "edgeveil"
    path = cache / f"resnet8_int8_seed{seed}.tflite"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _in_fresh_process(_resnet8_int8, seed))
    return path


def _in_fresh_process(fn, *args):
    """fn(*args) in a new interpreter, so TensorFlow is never imported into this one: with torch
    2.14 and TensorFlow 2.21 installed together, importing torch's triton (torch.optim does)
    after TensorFlow segfaults the process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _resnet8_int8(seed: int) -> bytes:
    return _convert_int8(_resnet8_keras(seed), seed)


def _resnet8_keras(seed: int):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers

    def conv_bn(x, filters, stride=1, relu=True, kernel=3):
        x = L.BatchNormalization()(L.Conv2D(filters, kernel, strides=stride, padding="same")(x))
        return L.Activation("relu")(x) if relu else x

    inputs = tf.keras.Input((32, 32, 3), batch_size=1)
    x = conv_bn(inputs, 16)
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        y = conv_bn(conv_bn(x, filters, stride), filters, relu=False)
        shortcut = x if stride == 1 else L.Conv2D(filters, 1, strides=stride, padding="same")(x)
        x = L.Activation("relu")(L.add([shortcut, y]))
    x = L.Flatten()(L.AveragePooling2D(pool_size=8)(x))
    return tf.keras.Model(inputs, L.Dense(10, activation="softmax")(x))


def _convert_int8(model, seed: int) -> bytes:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    shape = (1, *model.input_shape[1:])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rng.random(shape, dtype=np.float32)] for _ in range(32))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def resnet8_check(tflite_path) -> dict:
    """Run ResNet-8 through graph.py and this estimator; compare with every published MLPerf Tiny
    latency whose core has an engine here. The ranges were derived from these same rows, so the
    check confirms the MAC count and the arithmetic, and shows where the interior rows fall."""
    from .graph import macs_by_type, read_graph

    by_type = macs_by_type(read_graph(tflite_path))
    macs = macs_by_class(by_type)
    rows = []
    for board, core, clock, engine_name, ms in MLPERF_TINY_IC:
        engine = _ENGINE_OF_CORE.get(core)
        row = {"board": board, "core": core, "clock_hz": clock, "submission": engine_name, "published_ms": ms,
               "engine": engine}
        if engine:
            est = estimate_latency(macs, engine, clock)
            row.update(low_ms=est["low_ms"], high_ms=est["high_ms"],
                       inside=est["low_ms"] * (1 - _TOLERANCE) <= ms <= est["high_ms"] * (1 + _TOLERANCE))
        rows.append(row)
    total = sum(macs.values())
    return {"macs": total, "published_macs": RESNET8_MACS, "mac_ratio": total / RESNET8_MACS,
            "by_type": by_type, "rows": rows, "tolerance": _TOLERANCE}
