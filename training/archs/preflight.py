"""Preflight: list every layer of a head that will not lower to full-int8 TFLite builtin operators.

The head is traced with torch.fx and one zero image is propagated through it for shapes. Each
leaf module, function and tensor method is checked against an allow-list of what onnx2tf turns
into int8 CONV_2D, DEPTHWISE_CONV_2D, ADD, MUL, MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, PAD,
LOGISTIC, RESIZE, RESHAPE, CONCATENATION, FULLY_CONNECTED, with ReLU/ReLU6 fused. Run it before
training: a problem found after a long run costs the run.

Problem strings read `head.<path>: <Type> <why> (<what to use instead>)`.
torch is imported inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable

__all__ = ["PreflightError", "preflight", "check"]

_ACTIVATION_HINT = "(use ReLU or ReLU6)"
_SPATIAL = {2, 3}


class PreflightError(ValueError):
    """The head has layers that will not lower to full-int8 TFLite; .problems lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the head will not convert to full-int8 TFLite builtins "
                         f"({len(self.problems)} problem(s)):\n{lines}")


def check(head, input_shape: tuple[int, int, int]) -> None:
    """Raise PreflightError listing every problem at once; return None when the head is clean."""
    problems = preflight(head, input_shape)
    if problems:
        raise PreflightError(problems)


def preflight(head, input_shape: tuple[int, int, int]) -> list[str]:
    """Every problem that stops `head` on a (C, H, W) input from lowering to full-int8 TFLite; [] if none."""
    import torch.fx

    _check_input_shape(input_shape)
    try:
        graph_module = torch.fx.symbolic_trace(head)
    except Exception as e:  # fx raises many types; all mean "not a static graph"
        return [f"head: torch.fx cannot trace {type(head).__name__}, so it cannot be exported as a "
                f"static graph ({type(e).__name__}: {e})"]
    problems = _propagate_shapes(graph_module, head, input_shape)
    for node in graph_module.graph.nodes:
        problem = _check_node(node, graph_module)
        if problem:
            problems.append(problem)
    return problems


def _check_input_shape(input_shape: Any) -> None:
    ok = (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape))
    if not ok:
        raise ValueError(f"input_shape must be (C, H, W) positive integers, got {input_shape!r}")


def _propagate_shapes(graph_module, head, input_shape) -> list[str]:
    """Store each node's output shape in node.meta["shape"]; eval mode, so BN statistics stay untouched."""
    import torch.fx

    class _Shapes(torch.fx.Interpreter):
        def run_node(self, node):
            self.current = node
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                node.meta["shape"] = tuple(result.shape)
            return result

    interpreter = _Shapes(graph_module)
    interpreter.extra_traceback = False
    modes = {m: m.training for m in head.modules()}
    head.eval()
    try:
        with torch.no_grad():
            interpreter.run(torch.zeros(1, *input_shape))
    except Exception as e:
        node = getattr(interpreter, "current", None)
        where = f" at head.{node.target if node.op == 'call_module' else node.name}" if node else ""
        return [f"head: fails on a {(1, *input_shape)} input{where} ({type(e).__name__}: {e})"]
    finally:
        for module, training in modes.items():
            module.training = training
    return []


def _check_node(node, graph_module) -> str | None:
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        reason = _module_reason(module, _input_shape(node))
        return f"head.{node.target}: {type(module).__name__} {reason}" if reason else None
    if node.op == "call_function":
        table, name = _function_rules(), getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        table, name = _method_rules(), node.target
    else:  # placeholder, get_attr, output
        return None
    rule = table.get(node.target, _not_allowed)
    reason = rule(node)
    return f"{_node_path(node)}: {name}() {reason}" if reason else None


def _node_path(node) -> str:
    """head.<enclosing module path>.<node name> for functions and methods."""
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    scope = scope if isinstance(scope, str) else ""
    return ".".join(p for p in ("head", scope, node.name) if p)


def _input_shape(node) -> tuple[int, ...] | None:
    first = node.args[0] if node.args else None
    return first.meta.get("shape") if hasattr(first, "meta") else None


def _not_allowed(*_) -> str:
    return "is not on the full-int8 TFLite builtin allow-list"


def _ok(*_) -> None:
    return None


# ---- modules ---------------------------------------------------------------------------------

def _module_reason(module, in_shape) -> str | None:
    """None when the module lowers to int8 builtins, else why not and what to use instead."""
    rules, denied = _module_rules()
    for cls in type(module).__mro__:
        if cls in rules:
            return rules[cls](module, in_shape)
    for cls in type(module).__mro__:
        if cls in denied:
            return denied[cls]
    return _not_allowed()


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv(module, _shape) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not zero padding (use padding_mode='zeros')"
    if _pair(module.dilation) != (1, 1):
        return f"dilation={module.dilation} is not supported (use dilation 1)"
    return None


def _conv_transpose(module, shape) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups} has no int8 TRANSPOSE_CONV lowering (use groups=1)"
    return _conv(module, shape)


def _batch_norm(module, _shape) -> str | None:
    if not module.track_running_stats:
        return "without running statistics cannot fold into the conv (use track_running_stats=True)"
    return None


def _pool(module, _shape) -> str | None:
    if module.ceil_mode:
        return "ceil_mode=True has no TFLite pooling equivalent (use ceil_mode=False)"
    if _pair(module.padding) != (0, 0):
        return f"padding={module.padding} has no exact TFLite pooling equivalent (use padding=0)"
    if getattr(module, "dilation", 1) not in (1, (1, 1)):
        return f"dilation={module.dilation} is not supported (use dilation 1)"
    if getattr(module, "return_indices", False) or getattr(module, "divisor_override", None):
        return "return_indices/divisor_override have no TFLite equivalent"
    return None


def _adaptive_pool(module, shape) -> str | None:
    return _whole_pooling(module.output_size, shape)


def _whole_pooling(output_size, shape) -> str | None:
    """Adaptive pooling lowers to MEAN (output 1) or a plain pool (output dividing the input)."""
    out = _pair(output_size)
    if out == (1, 1) or (shape is not None and len(shape) == 4 and all(
            o and s % o == 0 for s, o in zip(shape[2:], out))):
        return None
    return (f"output_size={output_size} on input {shape} is not a whole-number pooling "
            f"(use output_size 1 or a size dividing the input)")


def _upsample(module, _shape) -> str | None:
    if module.mode not in ("nearest", "bilinear"):
        return f"mode={module.mode!r} has no int8 RESIZE lowering (use 'nearest' or 'bilinear')"
    return None


def _constant_pad(module, _shape) -> str | None:
    if module.value != 0:
        return f"value={module.value} is non-zero constant padding (use zero padding)"
    return None


@functools.cache
def _module_rules() -> tuple[dict[type, Callable], dict[type, str]]:
    from torch import nn

    rules = {nn.Conv2d: _conv, nn.ConvTranspose2d: _conv_transpose, nn.BatchNorm2d: _batch_norm,
             nn.MaxPool2d: _pool, nn.AvgPool2d: _pool, nn.AdaptiveAvgPool2d: _adaptive_pool,
             nn.AdaptiveMaxPool2d: _adaptive_pool, nn.Upsample: _upsample,
             nn.ConstantPad2d: _constant_pad}
    for cls in (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Identity, nn.Dropout,
                nn.Dropout2d, nn.Flatten, nn.Linear, nn.ZeroPad2d):
        rules[cls] = _ok
    denied = {cls: f"is not on the full-int8 TFLite allow-list {_ACTIVATION_HINT}" for cls in (
        nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU, nn.CELU,
        nn.Softplus, nn.Softsign, nn.PReLU, nn.Hardtanh, nn.LogSigmoid, nn.GLU)}
    for cls in (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm, nn.BatchNorm1d):
        denied[cls] = "has no full-int8 TFLite builtin (use BatchNorm2d after a conv: it folds into CONV_2D)"
    for cls in (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d):
        denied[cls] = "is not zero padding (use ZeroPad2d or the conv's own zero padding)"
    return rules, denied


# ---- functions and tensor methods ------------------------------------------------------------

def _arg(node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _mean(node) -> str | None:
    dims, shape = _arg(node, 1, "dim"), _input_shape(node)
    rank = len(shape) if shape is not None else 4
    dims = (dims,) if isinstance(dims, int) else dims
    if dims is not None and {d % rank for d in dims} == _SPATIAL:
        return None
    return f"over dims {dims} is not the spatial mean over H, W (only that lowers to int8 MEAN)"


def _interpolate(node) -> str | None:
    mode = _arg(node, 3, "mode", "nearest")
    if mode not in ("nearest", "bilinear"):
        return f"mode={mode!r} has no int8 RESIZE lowering (use 'nearest' or 'bilinear')"
    return None


def _pad(node) -> str | None:
    mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    if mode != "constant" or value not in (None, 0, 0.0):
        return f"mode={mode!r}, value={value!r} is not zero padding (use zero padding)"
    return None


def _pool_function(node, ceil_index: int) -> str | None:
    if _arg(node, ceil_index, "ceil_mode", False):
        return "ceil_mode=True has no TFLite pooling equivalent (use ceil_mode=False)"
    if _pair(_arg(node, 3, "padding", 0)) != (0, 0):
        return "padding has no exact TFLite pooling equivalent (use padding=0)"
    return None


def _adaptive_function(node) -> str | None:
    return _whole_pooling(_arg(node, 1, "output_size"), _input_shape(node))


def _denied_function(node) -> str:
    return f"is not on the full-int8 TFLite allow-list {_ACTIVATION_HINT}"


@functools.cache
def _function_rules() -> dict[Any, Callable]:
    import torch
    import torch.nn.functional as F

    rules: dict[Any, Callable] = {f: _ok for f in (
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.getitem, getattr, torch.add, torch.sub, torch.mul, torch.cat, torch.concat,
        torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.leaky_relu,
        torch.clamp, torch.flatten, torch.reshape, F.conv2d, F.linear, F.batch_norm, F.dropout)}
    rules.update({torch.mean: _mean, F.interpolate: _interpolate, F.pad: _pad,
                  F.max_pool2d: functools.partial(_pool_function, ceil_index=5),
                  F.avg_pool2d: functools.partial(_pool_function, ceil_index=4),
                  F.adaptive_avg_pool2d: _adaptive_function})
    for f in (F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.selu, F.celu,
              F.softplus, torch.erf):
        rules[f] = _denied_function
    return rules


@functools.cache
def _method_rules() -> dict[str, Callable]:
    rules: dict[str, Callable] = {m: _ok for m in (
        "add", "add_", "sub", "mul", "mul_", "relu", "relu_", "sigmoid", "tanh", "clamp",
        "view", "reshape", "flatten", "size", "contiguous", "permute")}
    rules["mean"] = _mean
    return rules
