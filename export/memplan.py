"""An offline memory plan for TFLite Micro: every activation's arena offset, computed here from the
tensor lifetimes and stored in a copy of the model, so the board does not run TFLM's own planner.

    report = plan_model("export/head_int8.tflite", "export/head_int8_planned.tflite")
    report["planned_bytes"], report["lower_bound_bytes"]      # 49152, 49152 for the ResNet-18 head

TFLite Micro reads a model metadata entry named `OfflineMemoryAllocation` whose buffer holds
little-endian int32 `[version 0, subgraph 0, number of tensors, one offset per tensor]` (-1: plan
this tensor online). It checks only that the count matches the tensors of the model; it places each
offset as given, without checking it, and lays its scratch buffers out around them
(tflite-micro micro_allocation_info.cc and memory_planner/greedy_memory_planner.cc). A wrong plan
therefore gives wrong outputs, not an error: `check_plan` proves ours keeps every two tensors that
are alive at the same time apart, and the export compares the planned model's outputs bit for bit.

Lifetimes follow TFLM's own rules (micro_allocation_info.cc): a graph input is created at step 0,
operator i runs at step i + 1, a tensor lives from the step that writes it to the last step that
reads it (graph outputs: to the last step), both ends included, so an operator's inputs and outputs
never share bytes. TFLM plans a tensor when it has no data in the flatbuffer, is not a variable and
has bytes; each size is rounded up to 16 bytes (TFLM's buffer alignment) and so is every offset.

The plan: first-fit placement (each tensor at the lowest offset where it does not collide with a
tensor placed before it whose lifetime overlaps) in several orders, the smallest result kept. TFLM's
planner is the same placement in one order, by size with ties in tensor order; on equal sizes that
order can fragment the arena, while ordering by first use is optimal for equal sizes (interval graph
colouring). No plan can be smaller than the peak of simultaneously live (aligned) bytes, so a plan
that reaches it is optimal, and the search stops there. When no order reaches it, a bounded
depth-first search looks for a plan within the peak (`_fit_within`).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from edgeveil.device.files import atomic_write_bytes

from .errors import ExportError

__all__ = ["PLAN_METADATA", "MEMORY_PLANS", "Buffer", "tensor_lifetimes", "plan_offsets", "check_plan",
           "plan_size", "live_peak", "embed_plan", "read_plan", "plan_model", "check_memory_plan"]

PLAN_METADATA = "OfflineMemoryAllocation"
# --memory-plan values: TFLM's own greedy planner on the board (the default), or our offline plan.
MEMORY_PLANS = {"tflm": "TFLite Micro's own greedy planner, run on the board at start-up",
                "offline": "offsets computed here and stored in the model's OfflineMemoryAllocation metadata"}
_ALIGN = 16  # TFLM's MicroArenaBufferAlignment
_SEARCH_BUDGET = 200_000  # search nodes (well under a second per 10,000 in CPython)
_SEARCH_MAX_BUFFERS = 300  # recursion depth
_ONLINE = -1


@dataclass(frozen=True)
class Buffer:
    """One tensor TFLM places in the arena: `bytes` rounded up to 16, alive in steps first..last."""

    tensor: int
    name: str
    bytes: int
    first: int
    last: int

    def overlaps_in_time(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


def check_memory_plan(value) -> str:
    """`value` if it names a memory plan, else a ValueError listing the known ones."""
    if value not in MEMORY_PLANS:
        known = "; ".join(f"'{k}' ({v})" for k, v in MEMORY_PLANS.items())
        raise ValueError(f"memory plan must be one of {known}; got {value!r}")
    return value


def tensor_lifetimes(path) -> tuple[list[Buffer], int]:
    """The buffers TFLM plans for subgraph 0 of a .tflite, and the subgraph's tensor count."""
    from .convert import _read_tflite

    schema, model = _read_tflite(path)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"{path} has {model.SubgraphsLength()} subgraphs; the offline plan covers one-subgraph models")
    g = model.Subgraphs(0)
    first, last = {}, {}
    for t in _ints(g.InputsAsNumpy, g.InputsLength()):
        first[t] = last[t] = 0
    steps = g.OperatorsLength()
    for i in range(steps):
        op = g.Operators(i)
        outs = _ints(op.OutputsAsNumpy, op.OutputsLength())
        for t in outs:
            first[t] = last[t] = i + 1
        for t in (*_ints(op.InputsAsNumpy, op.InputsLength()), *outs):
            if t >= 0:
                last[t] = max(last.get(t, i + 1), i + 1)
    for t in _ints(g.OutputsAsNumpy, g.OutputsLength()):
        last[t] = steps
    buffers = []
    for t in sorted(first):
        tensor = g.Tensors(t)
        size = _tensor_bytes(schema, tensor)
        if size and not tensor.IsVariable() and not _has_data(model, tensor):
            buffers.append(Buffer(t, tensor.Name().decode(errors="replace"), _ceil(size), first[t], last[t]))
    return buffers, g.TensorsLength()


def live_peak(buffers: list[Buffer]) -> int:
    """The most aligned bytes alive at one step: no plan that keeps live tensors apart is smaller."""
    steps = {b.first for b in buffers}  # the live set only grows where some buffer starts
    return max((sum(b.bytes for b in buffers if b.first <= s <= b.last) for s in steps), default=0)


def plan_offsets(buffers: list[Buffer], *, budget: int = _SEARCH_BUDGET) -> tuple[dict[int, int], str]:
    """{tensor: offset} and how it was found: the smallest first-fit plan over several orders,
    stopping early at the live peak (optimal); when none reaches it, a bounded search for a plan
    within the peak (`budget` search nodes), else the best first-fit plan."""
    bound = live_peak(buffers)
    best, how = None, "empty"
    for order, key in _ORDERS.items():
        offsets = _first_fit(sorted(buffers, key=key))
        if best is None or plan_size(buffers, offsets) < plan_size(buffers, best):
            best, how = offsets, f"first-fit {order}"
        if plan_size(buffers, best) == bound:
            return best, how
    if best is not None and len(buffers) <= _SEARCH_MAX_BUFFERS:
        found = _fit_within(buffers, bound, budget)
        if found is not None:
            return found, "search within the live peak"
    return best or {}, how


_ORDERS = {
    "by first use": lambda b: (b.first, -b.bytes, b.tensor),
    "by size, then first use": lambda b: (-b.bytes, b.first, b.tensor),
    "by size, then longest life": lambda b: (-b.bytes, b.first - b.last, b.tensor),
    "by size x lifetime": lambda b: (-b.bytes * (b.last - b.first + 1), b.tensor),
    "by lifetime": lambda b: (b.first - b.last, -b.bytes, b.tensor),
}


def _fit_within(buffers: list[Buffer], target: int, budget: int) -> dict[int, int] | None:
    """A plan no higher than `target` bytes, or None when none turned up within `budget` nodes.

    Depth-first over the buffers by size; each goes at 0, against the ceiling, or right above or
    below a placed buffer it shares a step with (first-fit alone never tries the ceiling, which
    some interleavings need: MobileNetV2's residual adds keep a small tensor alive across two
    pairs of large ones)."""
    order = sorted(buffers, key=lambda b: (-b.bytes, b.first, b.tensor))
    placed: dict[int, int] = {}
    nodes = 0

    def place(i: int) -> bool:
        nonlocal nodes
        if i == len(order):
            return True
        nodes += 1
        if nodes > budget:
            return False
        b = order[i]
        live = [(placed[o.tensor], o.bytes) for o in order[:i] if b.overlaps_in_time(o)]
        tries = {0, target - b.bytes, *(off + size for off, size in live), *(off - b.bytes for off, size in live)}
        for off in sorted(t for t in tries if 0 <= t <= target - b.bytes):
            if all(off >= o + size or o >= off + b.bytes for o, size in live):
                placed[b.tensor] = off
                if place(i + 1):
                    return True
                del placed[b.tensor]
        return False

    return dict(placed) if place(0) else None


def _first_fit(ordered: list[Buffer]) -> dict[int, int]:
    placed: list[tuple[int, Buffer]] = []  # (offset, buffer), kept sorted by offset
    offsets = {}
    for b in ordered:
        candidate = 0
        for offset, other in placed:
            if not b.overlaps_in_time(other):
                continue
            if offset >= candidate + b.bytes:
                break  # the gap below `other` holds b
            candidate = max(candidate, offset + other.bytes)
        offsets[b.tensor] = candidate
        placed.append((candidate, b))
        placed.sort(key=lambda p: p[0])
    return offsets


def plan_size(buffers: list[Buffer], offsets: dict[int, int]) -> int:
    """Arena bytes the plan spans (the end of its highest buffer)."""
    return max((offsets[b.tensor] + b.bytes for b in buffers), default=0)


def check_plan(buffers: list[Buffer], offsets: dict[int, int]) -> None:
    """Raise ExportError naming the first two tensors alive at the same time whose bytes overlap,
    a buffer without an offset, or an offset that is negative or not 16-byte aligned."""
    for b in buffers:
        off = offsets.get(b.tensor)
        if off is None or off < 0 or off % _ALIGN:
            raise ExportError(f"memory plan: tensor {b.tensor} '{b.name}' has offset {off!r}; "
                              f"expected a multiple of {_ALIGN} >= 0")
    ordered = sorted(buffers, key=lambda b: offsets[b.tensor])
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if offsets[b.tensor] >= offsets[a.tensor] + a.bytes:
                break
            if a.overlaps_in_time(b):
                raise ExportError(
                    f"memory plan overlaps live tensors: {a.tensor} '{a.name}' (bytes {offsets[a.tensor]}.."
                    f"{offsets[a.tensor] + a.bytes}, steps {a.first}..{a.last}) and {b.tensor} '{b.name}' (bytes "
                    f"{offsets[b.tensor]}..{offsets[b.tensor] + b.bytes}, steps {b.first}..{b.last})")


# ------------------------------------------------------------------------------- the model file


def embed_plan(model_bytes: bytes, offsets: dict[int, int], tensor_count: int) -> bytes:
    """The model with an `OfflineMemoryAllocation` metadata entry (an existing one is replaced):
    int32 [0, 0, tensor_count, offset or -1 per tensor]. Every buffer keeps 16-byte alignment."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    values = [0, 0, tensor_count] + [offsets.get(t, _ONLINE) for t in range(tensor_count)]
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    model.metadata = [m for m in (model.metadata or []) if m.name not in (PLAN_METADATA, PLAN_METADATA.encode())]
    buf = schema.BufferT()
    buf.data = np.frombuffer(struct.pack(f"<{len(values)}i", *values), dtype=np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name, entry.buffer = PLAN_METADATA, len(model.buffers) - 1
    model.metadata.append(entry)
    builder = _AlignedBuilder(len(model_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class _AlignedBuilder:
    """A flatbuffers Builder whose byte vectors (buffer data) start on 16-byte boundaries, as the
    converter writes them: the generated Python packer aligns them to 1 byte only."""

    def __new__(cls, size: int):
        import flatbuffers

        class Builder(flatbuffers.Builder):
            def StartVector(self, elemSize, numElems, alignment):
                return super().StartVector(elemSize, numElems, max(alignment, _ALIGN) if elemSize == 1 else alignment)

        return Builder(size)


def read_plan(model_bytes: bytes) -> list[int] | None:
    """The offsets (one per tensor, -1 = online) of a model's offline plan, or None without one."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(model_bytes, 0)
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() and meta.Name().decode() == PLAN_METADATA:
            data = model.Buffers(meta.Buffer()).DataAsNumpy().tobytes()
            version, subgraph, count = struct.unpack_from("<3i", data)
            if (version, subgraph) != (0, 0) or len(data) != 4 * (3 + count):
                raise ExportError(f"{PLAN_METADATA} metadata is malformed: version {version}, subgraph "
                                  f"{subgraph}, {count} offsets in {len(data)} bytes")
            return list(struct.unpack_from(f"<{count}i", data, 12))
    return None


def plan_model(src, dst) -> dict:
    """Plan `src` (a .tflite TFLite Micro can run) and write the planned copy to `dst`.

    Returns {"file", "source", "model_bytes" (of the planned copy), "planned_bytes",
    "lower_bound_bytes", "ratio", "method", "buffers", "offsets" ({tensor name: offset}),
    "tflm_order_bytes" (the same placement in TFLM's own order, for comparison)}. Refuses a model TFLite Micro cannot run (fp16 or dynamic-range weights).
    """
    from .carray import NotFullInteger, float_parts

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"model file {src} does not exist")
    parts = float_parts(src)
    if parts.kind in ("fp16", "dynamic-range"):
        raise NotFullInteger(f"cannot plan {src} for TFLite Micro: {parts.describe()}. TFLite Micro has no fp16-weight "
                             "or hybrid kernels: plan the int8 export, head_int8.tflite")
    buffers, count = tensor_lifetimes(src)
    offsets, method = plan_offsets(buffers)
    check_plan(buffers, offsets)
    data = embed_plan(src.read_bytes(), offsets, count)
    if read_plan(data) != [offsets.get(t, _ONLINE) for t in range(count)]:
        raise ExportError(f"the plan read back from the packed {dst.name} differs from the one written")
    atomic_write_bytes(dst, data)
    planned, bound = plan_size(buffers, offsets), live_peak(buffers)
    tflm_order = _first_fit(sorted(buffers, key=lambda b: (-b.bytes, b.tensor)))
    return {"file": dst.name, "source": src.name, "model_bytes": len(data), "planned_bytes": planned,
            "lower_bound_bytes": bound, "ratio": planned / bound if bound else 1.0, "method": method,
            "buffers": len(buffers),
            "tflm_order_bytes": plan_size(buffers, tflm_order),
            "offsets": {b.name: offsets[b.tensor] for b in buffers}}


# ------------------------------------------------------------------------------- helpers


def _ints(getter, length: int) -> tuple[int, ...]:
    return tuple(int(t) for t in getter()) if length else ()


def _has_data(model, tensor) -> bool:
    index = tensor.Buffer()
    if index >= model.BuffersLength():
        return False
    buf = model.Buffers(index)
    return buf.DataLength() > 0 or buf.Offset() > 1


def _tensor_bytes(schema, tensor) -> int:
    from .graph import _BYTES

    types = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    return math.prod(shape) * _BYTES.get(types.get(tensor.Type(), ""), 4)


def _ceil(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
