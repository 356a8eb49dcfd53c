"""Flatten whatever a model returns into tensors, and compare two such results.

Models return tensors, tuples, lists, dicts or transformers ``ModelOutput`` objects (an OrderedDict
subclass); every comparison in normsurgeon goes through ``flatten_outputs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model's output in a stable order; non-tensor leaves (None, ints) are dropped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # also transformers.ModelOutput
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if hasattr(out, "to_tuple"):
        return flatten_outputs(out.to_tuple())
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flatten_outputs(getattr(out, f.name))]
    return []


@dataclass
class ErrorStats:
    """How far ``actual`` is from ``expected``.

    ``max_rel_error`` is the largest absolute error divided by the largest magnitude of the expected
    output (per output tensor): element-wise relative error explodes on values near zero and says
    nothing about whether the model still computes the same thing.
    """

    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    min_cosine: float = 1.0

    def merge(self, other: "ErrorStats") -> "ErrorStats":
        return ErrorStats(max(self.max_abs_error, other.max_abs_error),
                          max(self.max_rel_error, other.max_rel_error),
                          min(self.min_cosine, other.min_cosine))

    def within(self, rtol: float, atol: float) -> bool:
        return self.max_abs_error <= atol or self.max_rel_error <= rtol

    def to_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "cosine": self.min_cosine}


def compare_outputs(expected: Any, actual: Any) -> ErrorStats:
    """Compare two model outputs (any structure, or sequences of numpy arrays) tensor by tensor."""
    exp = _as_tensors(expected)
    act = _as_tensors(actual)
    if not exp:
        # Comparing nothing must never read as "identical".
        raise ValueError(f"the model's output ({type(expected).__name__}) holds no tensors to compare")
    if len(exp) != len(act):
        raise ValueError(f"outputs differ in structure: {len(exp)} tensors vs {len(act)}")
    stats = ErrorStats()
    for e, a in zip(exp, act):
        if e.shape != a.shape:
            raise ValueError(f"output shapes differ: {tuple(e.shape)} vs {tuple(a.shape)}")
        if not e.is_floating_point():
            mismatch = float((e != a).any())
            stats = stats.merge(ErrorStats(mismatch, mismatch, 1.0 - mismatch))
            continue
        e64, a64 = e.detach().double().cpu(), a.detach().double().cpu()
        if e64.numel() == 0:
            continue
        diff = (e64 - a64).abs()
        finite = torch.isfinite(e64) & torch.isfinite(a64)
        if not bool(finite.all()) and not bool((e64[~finite] == a64[~finite]).all()):
            stats = stats.merge(ErrorStats(float("inf"), float("inf"), -1.0))
            continue
        diff = torch.where(finite, diff, torch.zeros_like(diff))
        max_abs = float(diff.max())
        scale = float(e64[finite].abs().max()) if bool(finite.any()) else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        ef, af = e64[finite].flatten(), a64[finite].flatten()
        denom = float(ef.norm() * af.norm())
        cos = float(ef @ af) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
        stats = stats.merge(ErrorStats(max_abs, max_rel, cos))
    return stats


def _as_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], torch.Tensor) and hasattr(x[0], "shape") \
            and not isinstance(x[0], (list, tuple, dict)):
        return [torch.as_tensor(v) for v in x]  # numpy arrays from ONNX Runtime
    return flatten_outputs(x)
