"""Frozen batch norms of other libraries, recognised by what they compute, not by their class name.

DETR's ``DetrFrozenBatchNorm2d``, RT-DETR's ``RTDetrFrozenBatchNorm2d``, torchvision's and
detectron2's ``FrozenBatchNorm2d`` hold a BatchNorm's statistics and affine as buffers and compute
``x * scale + shift`` per channel (dim 1) in their forward: no ``batch_norm`` op, no ``nn.BatchNorm``
class. ``frozen_scale_shift`` proves that a module is such a map and returns its (scale, shift):

- its state is buffers only (no parameters, no children), and its floating buffers are 1-D of one
  length C (the channels);
- a float64 copy of it (so the values are exact, not float32 roundings) maps inputs of shape
  (2, C, 3, 2) and (2, C, 3) (rank 4 first: 2-D detection backbones) to the same shape, and on two
  seeded random inputs agrees with ``x * scale + shift``, where ``shift = f(0)`` and
  ``scale = f(1) - f(0)`` are per channel: constant over batch and positions. A nonlinear map, one
  that mixes channels or positions, or that reads its input's values in any other way fails one of
  these to far beyond rounding;
- it calls no norm function (``F.batch_norm`` on buffers is a functional norm: found and folded
  as one, the call staying in the forward).

A module that behaves differently in train and eval mode would not be a frozen norm: both are probed.
The result is cached per module until one of its buffers changes.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["frozen_scale_shift"]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple | None]]" = weakref.WeakKeyDictionary()
_PROBE_SHAPES = ((3, 2), (3,), (2, 2, 2), ())  # the sizes after (N, C): ranks 4, 3, 5, 2


def frozen_scale_shift(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) in float64 when ``module``'s forward is proven to be ``x * scale + shift`` per
    channel (dim 1) of its own buffers; None otherwise (see the module docstring)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or not _candidate(module):
        return None
    key = tuple((b.data_ptr(), b._version) for b in module.buffers())
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _probe(module)
    _CACHE[module] = (key, result)
    return result


def _candidate(module: nn.Module) -> bool:
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    floats = [b for b in module.buffers() if b.is_floating_point()]
    return len(floats) >= 2 and all(b.dim() == 1 for b in floats) and len({b.numel() for b in floats}) == 1


def _probe(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    c = next(b for b in module.buffers() if b.is_floating_point()).numel()
    try:
        m = copy.deepcopy(module).to(torch.float64)
    except Exception:  # noqa: BLE001 - a module that cannot be copied is not proven
        return None
    for rest in _PROBE_SHAPES:
        try:
            with _Calls() as calls:
                maps = [_affine_at(m, c, rest, training) for training in (False, True)]
            if any(name in calls.names for name in _NORM_FUNCTIONS):
                return None  # a functional norm call: found and folded as such (it stays in the forward)
        except Exception:  # noqa: BLE001 - the module rejects inputs of this rank: try the next one
            continue
        if None in maps:
            continue
        (s0, b0), (s1, b1) = maps
        if torch.equal(s0, s1) and torch.equal(b0, b1):
            return s0, b0
    return None


_NORM_FUNCTIONS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")


class _Calls(TorchFunctionMode):
    """The names of the torch functions a forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def _affine_at(m: nn.Module, c: int, rest: tuple, training: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of ``m`` on inputs (2, C, *rest) when it is one per-channel affine map there."""
    m.train(training)
    shape = (2, c, *rest)
    per_channel = (1, c) + (1,) * len(rest)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        zero = m(torch.zeros(shape, dtype=torch.float64))
        one = m(torch.ones(shape, dtype=torch.float64))
        if not all(isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == torch.float64 for t in (zero, one)):
            return None
        shift = zero.reshape(2, c, -1)[0, :, 0].reshape(per_channel)
        scale = (one - zero).reshape(2, c, -1)[0, :, 0].reshape(per_channel)
        if not (torch.equal(zero, shift.expand(shape)) and torch.equal(one - zero, scale.expand(shape))):
            return None  # not the same map at every batch index and position
        for _ in range(2):
            x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
            want = x * scale + shift
            atol = 1e-12 * float(want.abs().max() + 1)
            if not torch.allclose(m(x), want, rtol=1e-12, atol=atol):
                return None
    return scale.reshape(c), shift.reshape(c)
