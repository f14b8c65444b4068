"""What a .tflite computes and how much memory its activations need, read from the flatbuffer.

    g = read_graph("runs/digits/export/head_int8.tflite")
    g.ops[0].name, g.ops[0].macs          # 'CONV_2D', 112896
    summarize(g)                           # MACs per op type, parameters, activation lower bound

MACs (multiply-accumulates) are counted for the operators that do matrix work, from the
output shape and the weight shape, as every tool that reports MACs does:

    CONV_2D            out elements x kh x kw x Cin       (weights [Cout, kh, kw, Cin])
    DEPTHWISE_CONV_2D  out elements x kh x kw             (weights [1, kh, kw, Cout])
    FULLY_CONNECTED    out elements x K                   (weights [units, K])
    TRANSPOSE_CONV     in elements x kh x kw x Cout       (weights [Cout, kh, kw, Cin])
    BATCH_MATMUL       out elements x K                   (K: the contracted axis of the lhs)

Every other operator gets `elements` instead: output elements for element-wise ops (ADD, MUL,
activations, QUANTIZE, ...), output elements x window for pooling, input elements for reductions
(MEAN, SUM, REDUCE_MAX, ...); data-movement ops (RESHAPE, PAD, CONCATENATION, ...) count their
output elements too, as bytes moved.

Parameters: the elements of the weight and bias tensors of MAC operators, plus any other
floating-point or 8/16-bit constant operand (a PRELU slope, a MUL by a constant). Integer index
data (PAD's paddings, RESHAPE's shape, MEAN's axes) is not a parameter.

Activation lower bound: a tensor is live from the operator that writes it (graph inputs: from
the start) to the last operator that reads it (graph outputs: to the end); constants live in
flash and are excluded. At every operator the bytes of all live tensors must coexist, so the
largest such sum bounds from below every arena plan that does not compute in place (TFLite
Micro's greedy planner included, before alignment, scratch buffers and the persistent tail).
RESHAPE, SQUEEZE and EXPAND_DIMS are treated as aliases of their input (one buffer), so the
bound stays valid for a runtime that executes them in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Tensor", "Op", "Graph", "read_graph", "macs_by_type", "parameter_count",
           "activation_lower_bound", "summarize", "MAC_OPS"]

MAC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
_POOLS = ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D")
_REDUCTIONS = ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD", "REDUCE_ANY", "REDUCE_ALL")
_ALIASES = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS")
_WEIGHT_INPUTS = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2),
                  "TRANSPOSE_CONV": (1, 3), "BATCH_MATMUL": (0, 1)}
_BYTES = {"FLOAT32": 4, "FLOAT16": 2, "FLOAT64": 8, "INT32": 4, "UINT32": 4, "INT64": 8, "UINT64": 8,
          "INT16": 2, "UINT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1, "INT4": 1, "COMPLEX64": 8}
_PARAM_DTYPES = ("FLOAT32", "FLOAT16", "INT8", "UINT8", "INT16", "INT4")


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite TensorType name: 'INT8', 'FLOAT32', ...
    constant: bool  # has data in the flatbuffer (weights, biases, index data)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return self.elements * _BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Op:
    index: int  # position in execution order
    name: str  # builtin name ('CONV_2D') or custom code
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    macs: int
    elements: int


@dataclass(frozen=True)
class Graph:
    """Subgraph 0 of a .tflite: operators in execution order and the tensors they use."""

    ops: tuple[Op, ...]
    tensors: tuple[Tensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    subgraphs: int


def read_graph(path) -> Graph:
    """Parse a .tflite file (ExportError if it is not one); only subgraph 0 is analysed."""
    from .convert import _op_codes, _read_tflite

    schema, model = _read_tflite(path)
    codes = [name for name, _ in _op_codes(schema, model)]
    types = {v: k for k, v in vars(schema.TensorType).items() if k.isupper()}
    g = model.Subgraphs(0)
    tensors = tuple(_tensor(model, g.Tensors(i), i, types) for i in range(g.TensorsLength()))
    ops = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        name = codes[op.OpcodeIndex()]
        ins = tuple(int(t) for t in op.InputsAsNumpy()) if op.InputsLength() else ()
        outs = tuple(int(t) for t in op.OutputsAsNumpy()) if op.OutputsLength() else ()
        macs, elements = _work(schema, op, name, [tensors[t] if t >= 0 else None for t in ins],
                               [tensors[t] for t in outs])
        ops.append(Op(i, name, ins, outs, macs, elements))
    return Graph(tuple(ops), tensors, tuple(int(t) for t in g.InputsAsNumpy()),
                 tuple(int(t) for t in g.OutputsAsNumpy()), model.SubgraphsLength())


def _tensor(model, t, index: int, types: dict) -> Tensor:
    buf = model.Buffers(t.Buffer()) if t.Buffer() < model.BuffersLength() else None
    constant = buf is not None and (buf.DataLength() > 0 or buf.Offset() > 1)
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    return Tensor(index, t.Name().decode(errors="replace"), shape, types.get(t.Type(), str(t.Type())), constant)


def _work(schema, op, name: str, ins: list, outs: list) -> tuple[int, int]:
    """(MACs, elements) of one operator; see the module docstring for the rules."""
    out = outs[0].elements if outs else 0
    if name == "CONV_2D":
        return out * math.prod(ins[1].shape[1:]), 0
    if name == "DEPTHWISE_CONV_2D":
        return out * math.prod(ins[1].shape[1:3]), 0
    if name == "FULLY_CONNECTED":
        return out * ins[1].shape[-1], 0
    if name == "TRANSPOSE_CONV":
        return ins[2].elements * math.prod(ins[1].shape[:3]), 0
    if name == "BATCH_MATMUL":
        return out * _contracted(schema, op, ins[0]), 0
    if name in _POOLS:
        opts = _options(schema, op, schema.Pool2DOptions)
        return 0, out * opts.FilterHeight() * opts.FilterWidth()
    if name in _REDUCTIONS:
        return 0, ins[0].elements
    return 0, out


def _contracted(schema, op, lhs: Tensor) -> int:
    adj_x = _options(schema, op, schema.BatchMatMulOptions).AdjX()
    return lhs.shape[-2] if adj_x else lhs.shape[-1]


def _options(schema, op, kind):
    table = op.BuiltinOptions()
    opts = kind()
    opts.Init(table.Bytes, table.Pos)
    return opts


def macs_by_type(graph: Graph) -> dict[str, dict]:
    """{op name: {"count", "macs", "elements"}} in order of first use."""
    totals: dict[str, dict] = {}
    for op in graph.ops:
        t = totals.setdefault(op.name, {"count": 0, "macs": 0, "elements": 0})
        t["count"] += 1
        t["macs"] += op.macs
        t["elements"] += op.elements
    return totals


def parameter_count(graph: Graph) -> int:
    """Elements of weights and biases of MAC ops, plus other non-index constants (each counted once)."""
    params = set()
    for op in graph.ops:
        weights = _WEIGHT_INPUTS.get(op.name, ())
        for pos, t in enumerate(op.inputs):
            if t < 0 or not graph.tensors[t].constant:
                continue
            if pos in weights or graph.tensors[t].dtype in _PARAM_DTYPES:
                params.add(t)
    return sum(graph.tensors[t].elements for t in params)


def activation_lower_bound(graph: Graph) -> dict:
    """The peak of simultaneously live activation bytes: {"bytes", "op_index", "op", "live"}.

    live: names of the tensors that make up the peak (aliased tensors under their first name).
    """
    root = _alias_roots(graph)
    first, last = {}, {}
    end = len(graph.ops)
    for t in graph.inputs:
        first[root[t]] = 0
    for op in graph.ops:
        for t in (*op.inputs, *op.outputs):
            if t >= 0 and not graph.tensors[t].constant:
                first.setdefault(root[t], op.index)
                last[root[t]] = op.index
    for t in graph.outputs:
        last[root[t]] = end
    size: dict[int, int] = {}
    for t, r in root.items():
        size[r] = max(size.get(r, 0), graph.tensors[t].bytes)
    best = {"bytes": 0, "op_index": None, "op": None, "live": []}
    for op in graph.ops:
        live = [r for r in first if first[r] <= op.index <= last.get(r, first[r])]
        total = sum(size[r] for r in live)
        if total > best["bytes"]:
            best = {"bytes": total, "op_index": op.index, "op": op.name,
                    "live": [graph.tensors[r].name for r in live]}
    return best


def _alias_roots(graph: Graph) -> dict[int, int]:
    """tensor index -> the tensor whose buffer it shares (itself unless made by RESHAPE & co.)."""
    root = {t.index: t.index for t in graph.tensors if not t.constant}
    for op in graph.ops:
        if op.name in _ALIASES and op.inputs and op.inputs[0] in root:
            for out in op.outputs:
                root[out] = root[op.inputs[0]]
    return root


def summarize(graph: Graph) -> dict:
    """The figures the fit report prints and the manifest keeps (plain JSON types)."""
    bound = activation_lower_bound(graph)
    return {
        "operators": len(graph.ops),
        "subgraphs": graph.subgraphs,
        "macs": sum(op.macs for op in graph.ops),
        "element_ops": sum(op.elements for op in graph.ops),
        "parameters": parameter_count(graph),
        "by_type": macs_by_type(graph),
        "activation_lower_bound_bytes": bound["bytes"],
        "activation_peak_at": {"op_index": bound["op_index"], "op": bound["op"], "live": bound["live"]},
    }
