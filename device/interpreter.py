"""The one TFLite interpreter shim: nobody else imports an interpreter directly.

`find_interpreter()` picks the first runtime that imports: ai-edge-litert, then tflite-runtime,
then tensorflow.lite. `Runtime.make(model)` returns a `LoadedModel` with tensors allocated that
says which kernels run it (XNNPACK delegate, optimized builtins, or reference kernels).
`run(model, x)` feeds a batch one sample at a time to a batch-of-1 model.

Callers can bring their own interpreter class with `Runtime.custom(cls)`.
Module level needs numpy and the standard library only.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

__all__ = ["RUNTIMES", "Runtime", "LoadedModel", "InterpreterError", "find_interpreter", "run"]

# name -> (module holding Interpreter and OpResolverType, distributions that carry its version).
# "tensorflow" means tf.lite (importing tensorflow.lite directly gives the source package, which
# has no Interpreter); its OpResolverType lives in tf.lite.experimental.
RUNTIMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ai_edge_litert": ("ai_edge_litert.interpreter", ("ai-edge-litert", "ai-edge-litert-nightly")),
    "tflite_runtime": ("tflite_runtime.interpreter", ("tflite-runtime",)),
    "tensorflow": ("tensorflow", ("tensorflow", "tensorflow-cpu")),
}
_INSTALL_HINT = "pip install 'edgeveil[device]' (ai-edge-litert)"


class InterpreterError(RuntimeError):
    """The runtime could not load or allocate a model."""


@dataclass(frozen=True)
class LoadedModel:
    """An interpreter with tensors allocated, and how it runs the model.

    xnnpack: True if the XNNPACK delegate took at least one node (a DELEGATE node in the
    execution plan), False if not, None if the runtime cannot tell. resolver: 'auto' (optimized
    builtins plus default delegates), 'builtin_without_default_delegates' or 'builtin_ref'.
    Interpreter methods (get_input_details, invoke, ...) are forwarded.
    """

    interpreter: Any
    runtime: str
    version: str
    resolver: str
    num_threads: int | None
    xnnpack: bool | None

    def __getattr__(self, name: str):
        if name == "interpreter":  # not set yet (copy, pickle): do not recurse
            raise AttributeError(name)
        return getattr(self.interpreter, name)


@dataclass(frozen=True)
class Runtime:
    """A TFLite runtime: its name, version, Interpreter class and OpResolverType enum (or None)."""

    name: str
    version: str
    interpreter_cls: type
    resolver_enum: Any = None

    @classmethod
    def custom(cls, interpreter_cls: type, name: str | None = None, version: str = "unknown",
               resolver_enum: Any = None) -> "Runtime":
        """Wrap an injected Interpreter class. Without `resolver_enum`, the OpResolverType of the
        module defining the class or one of its bases is used (None if there is none)."""
        if resolver_enum is None:
            modules = (sys.modules.get(klass.__module__) for klass in interpreter_cls.__mro__)
            resolver_enum = next((m.OpResolverType for m in modules if hasattr(m, "OpResolverType")), None)
        return cls(name or interpreter_cls.__module__, version, interpreter_cls, resolver_enum)

    def make(self, model, num_threads: int | None = None, xnnpack: bool = True,
             reference_kernels: bool = False) -> LoadedModel:
        """Load `model` (a .tflite path, or its bytes) and allocate its tensors.

        xnnpack=False selects BUILTIN_WITHOUT_DEFAULT_DELEGATES, reference_kernels=True selects
        BUILTIN_REF (no delegate either); a runtime without OpResolverType refuses both.
        """
        kwargs = {**_model_kwargs(model), **self._resolver_kwargs(xnnpack, reference_kernels)}
        if num_threads is not None:
            if not isinstance(num_threads, int) or num_threads < 1:
                raise ValueError(f"num_threads must be an int >= 1 or None, got {num_threads!r}")
            kwargs["num_threads"] = num_threads
        label = kwargs.get("model_path", "<model bytes>")
        try:
            interp = self.interpreter_cls(**kwargs)
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as e:
            raise InterpreterError(f"{self.name} {self.version} cannot load {label}: {e}") from e
        resolver = _resolver_label(xnnpack, reference_kernels)
        return LoadedModel(interp, self.name, self.version, resolver, num_threads, _xnnpack_active(interp))

    def _resolver_kwargs(self, xnnpack: bool, reference_kernels: bool) -> dict:
        if xnnpack and not reference_kernels:
            return {}
        if self.resolver_enum is None:
            raise ValueError(f"runtime {self.name} has no OpResolverType: it cannot turn XNNPACK off "
                             "or select reference kernels")
        member = "BUILTIN_REF" if reference_kernels else "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
        return {"experimental_op_resolver_type": getattr(self.resolver_enum, member)}


def find_interpreter(prefer: str | None = None) -> Runtime:
    """The first importable runtime of RUNTIMES (or exactly `prefer`, one of its keys)."""
    if prefer is not None and prefer not in RUNTIMES:
        raise ValueError(f"unknown interpreter {prefer!r}; known: {', '.join(RUNTIMES)}")
    names = [prefer] if prefer else list(RUNTIMES)
    for name in names:
        runtime = _try_import(name)
        if runtime is not None:
            return runtime
    raise ImportError(f"no TFLite interpreter found (tried {', '.join(names)}); install one: {_INSTALL_HINT}")


def run(interp, x: np.ndarray) -> np.ndarray:
    """Run a single-input, single-output, batch-of-1 model over a batch, one sample at a time.

    x: (N, *input_shape[1:]) with exactly the input tensor's dtype (quantize first for an
    integer input). Returns (N, *output_shape[1:]) in the output tensor's dtype.
    """
    inp, out = _single_io(interp)
    _check_input(x, inp)
    result = np.empty((len(x), *[int(d) for d in out["shape"][1:]]), dtype=out["dtype"])
    for i in range(len(x)):
        interp.set_tensor(inp["index"], x[i : i + 1])
        interp.invoke()
        result[i] = interp.get_tensor(out["index"])[0]
    return result


# ------------------------------------------------------------------------------- helpers


def _try_import(name: str) -> Runtime | None:
    module_name, dists = RUNTIMES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    if name == "tensorflow":
        lite = module.lite
        return Runtime(name, _version(dists, module), lite.Interpreter, lite.experimental.OpResolverType)
    return Runtime(name, _version(dists, module), module.Interpreter, getattr(module, "OpResolverType", None))


def _version(dists: tuple[str, ...], module) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return str(getattr(module, "__version__", "unknown"))


def _model_kwargs(model) -> dict:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return {"model_content": bytes(model)}
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"model file {os.fspath(model)} does not exist")
        return {"model_path": os.fspath(model)}
    raise TypeError(f"model must be a .tflite path or bytes, got {type(model).__name__}")


def _resolver_label(xnnpack: bool, reference_kernels: bool) -> str:
    if reference_kernels:
        return "builtin_ref"
    return "auto" if xnnpack else "builtin_without_default_delegates"


def _xnnpack_active(interp) -> bool | None:
    """The XNNPACK delegate replaces the nodes it takes by DELEGATE nodes when tensors are allocated."""
    ops = getattr(interp, "_get_ops_details", None)
    if ops is None:
        return None
    try:
        return any(op.get("op_name") == "DELEGATE" for op in ops())
    except (RuntimeError, ValueError):
        return None


def _single_io(interp) -> tuple[dict, dict]:
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"run() needs a model with one input and one output, this one has "
                         f"{len(inputs)} and {len(outputs)}")
    return inputs[0], outputs[0]


def _check_input(x, inp: dict) -> None:
    shape = tuple(int(d) for d in inp["shape"])
    want = "(N, " + ", ".join(str(d) for d in shape[1:]) + ")"
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array {want}, got {type(x).__name__}")
    if shape[0] != 1:
        raise ValueError(f"run() needs a batch-of-1 model, input {inp['name']!r} has shape {shape}")
    if x.ndim != len(shape) or x.shape[1:] != shape[1:]:
        raise ValueError(f"x has shape {x.shape}, expected {want} for model input {inp['name']!r}")
    if x.dtype != np.dtype(inp["dtype"]):
        hint = " (quantize it with edgeveil.device.quant.quantize first)" if np.issubdtype(
            np.dtype(inp["dtype"]), np.integer) else ""
        raise ValueError(f"x has dtype {x.dtype}, expected {np.dtype(inp['dtype'])} for model input "
                         f"{inp['name']!r}{hint}")
