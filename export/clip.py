"""Clamp the head's activations whose rare outliers would take a whole int8 grid.

TFLite puts each activation tensor on one grid (a scale and a zero point), set by the tensor's
minimum and maximum over the calibration set. A tensor whose values sit in a narrow band but
reach far beyond it a few times in a thousand gets a step so coarse that the band keeps only a
few codes. siftfunnel 2.0 on CIFAR-10 is such a head: the residual branch before its last
addition ranges over -22.9..484.6 while 99.8 % of its values lie in -11.4..-0.15. On int8 the
tail's accuracy falls from 0.842 to 0.220; clamped to that band, the float head still scores 0.842
and the int8 head 0.808.

`find_clamps` measures every BatchNorm output of the head (where each convolution's output tensor
is decided) and the head's own output on the calibration images. A tensor whose full range is
more than MIN_RATIO times its central band (PERCENTILE, both sides) is clamped to that band,
provided the float tail still answers as before on at least FLOAT_AGREEMENT of the images;
otherwise nothing is clamped (the outliers carry what the tail needs). A clamp is a MINIMUM and a
MAXIMUM after the convolution in the exported graph, and TFLite gives those operators their
input's grid, so the convolution itself is quantized on the band.

The clamps belong to the deployed head: the manifest's `activation_clamps` records them, export
builds the ONNX graph and the PyTorch reference from `clamped_head`, and the attacks use the same
clamped head for the float deployment, so float and int8 are compared on one head.
"""
from __future__ import annotations

import copy

import numpy as np

from edgeveil.device.manifest import clamp_bounds, describe_clamps  # re-exported: the manifest owns the field

__all__ = ["MODES", "PERCENTILE", "MIN_RATIO", "FLOAT_AGREEMENT", "find_clamps", "clamped_head", "clamp_bounds",
           "describe_clamps"]

MODES = ("auto", "none")
PERCENTILE = 99.9  # the band: PERCENTILE and 100 - PERCENTILE of the tensor's calibration values
MIN_RATIO = 16.0  # clamp when the full range is over this many times the band (the band keeps < 16 codes)
FLOAT_AGREEMENT = 0.99  # the float tail must answer as before on this share of calibration images
_BATCH = 128
HEAD_OUTPUT = ""  # the module name that stands for the head's own output


def find_clamps(head, tail, calibration, *, percentile: float = PERCENTILE, min_ratio: float = MIN_RATIO,
                float_agreement: float = FLOAT_AGREEMENT) -> dict:
    """The manifest's `activation_clamps` for `head` on calibration inputs (N, C, H, W float32,
    normalized): the clamps kept (maybe none) and every candidate tensor as last measured.

    Tensors are taken in forward order and measured again after each clamp, so an outlier that
    only follows from an earlier one is not clamped twice."""
    import torch

    x = torch.as_tensor(np.asarray(calibration, np.float32))
    if x.ndim != 4 or len(x) == 0 or not torch.isfinite(x).all():
        raise ValueError(f"calibration inputs must be a finite (N, C, H, W) array with N >= 1, got shape {tuple(x.shape)}")
    reference = _predict(tail, head, x)
    clamps: list[dict] = []
    refused: dict[str, float] = {}  # module -> float agreement with its clamp: its outliers carry information
    agreement = None
    while True:
        current = clamped_head(head, {"activation_clamps": {"clamps": clamps}})
        candidates = _measure(current, x, percentile)
        for c in candidates:
            c["clamped"] = any(k["module"] == c["module"] for k in clamps)
            c["refused_float_agreement"] = refused.get(c["module"])
        todo = next((c for c in candidates if c["ratio"] > min_ratio and c["high"] > c["low"]
                     and not c["clamped"] and c["module"] not in refused), None)
        if todo is None:
            break
        trial = [*clamps, {k: todo[k] for k in ("module", "low", "high", "min", "max", "ratio")}]
        got = float((_predict(tail, clamped_head(head, {"activation_clamps": {"clamps": trial}}), x) == reference).mean())
        if got >= float_agreement:
            clamps, agreement = trial, got
        else:
            refused[todo["module"]] = got
    return {"percentile": percentile, "min_ratio": min_ratio, "float_agreement_target": float_agreement,
            "samples": int(len(x)), "clamps": clamps, "float_agreement": agreement, "candidates": candidates}


def clamped_head(head, manifest: dict):
    """A copy of `head` with the manifest's clamps in place (the head itself when there are none)."""
    clamps = clamp_bounds(manifest)
    if not clamps:
        return head
    from ._clamp import Clamped

    out = copy.deepcopy(head)
    modules = dict(out.named_modules())
    for c in clamps:
        name = c["module"]
        if name == HEAD_OUTPUT:
            continue
        if not name or name not in modules:
            raise ValueError(f"activation clamp on {name!r}: the head has no such module (re-run the export)")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, Clamped(modules[name], c["low"], c["high"]))
    last = [c for c in clamps if c["module"] == HEAD_OUTPUT]
    return Clamped(out, last[0]["low"], last[0]["high"]) if last else out


def _measure(current, x, percentile: float) -> list[dict]:
    """Every candidate tensor of a (clamped) head, in forward order: range, central band, their ratio."""
    candidates = []
    for name, v in _activations(current, x).items():
        low, high = (float(q) for q in np.percentile(v, [100.0 - percentile, percentile]))
        full = max(float(v.max()), 0.0) - min(float(v.min()), 0.0)  # a grid always holds zero
        band = max(high, 0.0) - min(low, 0.0)
        candidates.append({"module": name, "min": float(v.min()), "max": float(v.max()), "low": low, "high": high,
                           "ratio": full / band if band > 0 else (float("inf") if full > 0 else 1.0)})
    return candidates


def _activations(current, x) -> dict[str, np.ndarray]:
    """Each candidate's values over all of x, in the order the forward pass makes them: every
    BatchNorm output (after its clamp, if it has one), then the head's output (HEAD_OUTPUT).
    Names are the original head's module names."""
    import torch

    from ._clamp import Clamped

    top = current.inner if isinstance(current, Clamped) else current  # a clamp on the output wraps the whole head
    inside = {id(m.inner) for m in top.modules() if isinstance(m, Clamped)}
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.setdefault(name, []).append(
                 out.detach().float().flatten().numpy()))
             for name, m in top.named_modules()
             if isinstance(m, Clamped) or (isinstance(m, torch.nn.BatchNorm2d) and id(m) not in inside)]
    outputs = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), _BATCH):
                outputs.append(current(x[i:i + _BATCH]).float().flatten().numpy())
    finally:
        for h in hooks:
            h.remove()
    return {**{name: np.concatenate(parts) for name, parts in seen.items()}, HEAD_OUTPUT: np.concatenate(outputs)}


def _predict(tail, head, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([tail(head(x[i:i + _BATCH])).argmax(1).numpy() for i in range(0, len(x), _BATCH)])
