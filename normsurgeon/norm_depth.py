"""Which norms feed which: the depth of each norm in a model's data flow, from one forward pass.

Exact calibration (``calibrate``) fixes the norms in stages: a norm's statistics are taken from inputs
computed with every norm upstream of it already fixed. Norms of equal depth (no path between them,
e.g. a ResNet's shortcut BN and the first BN of its main branch) share a stage, so the number of
passes over the data is the number of depths, not the number of norms.

How: one forward under a ``TorchDispatchMode`` that tags tensors. Each norm's output gets the tag of
that norm; every aten op's outputs (and the arguments it writes in place) inherit the union of its
inputs' tags. A norm's input tags are the norms it depends on, whatever Python code sits between
them (``detach``, ``no_grad``, views, in-place adds: all are aten ops). Dependencies that leave the
tensor world (``.item()`` steering control flow) are not seen.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["norm_depths"]


class _Tags(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.tags = WeakIdKeyDictionary()

    def of(self, x) -> frozenset:
        return self.tags.get(x, frozenset()) if isinstance(x, torch.Tensor) else frozenset()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = frozenset().union(*(self.of(t) for t in tree_leaves((args, kwargs))))
        if src:
            written = []
            for i, a in enumerate(func._schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    written.append(args[i] if i < len(args) else kwargs.get(a.name))
            for t in tree_leaves((out, written)):
                if isinstance(t, torch.Tensor):
                    self.tags[t] = self.of(t) | src
        return out


def norm_depths(model: nn.Module, norms: Sequence[nn.Module],
                run: Callable[[], object]) -> tuple[list[int | None], bool]:
    """Depth of each of ``norms`` in one call of ``run()`` (which calls ``model``): 0 when its input
    depends on no other norm, else 1 + the largest depth among the norms it depends on. None for a
    norm that did not run. Returns (depths, traced): when the tagging mode cannot run the model,
    ``traced`` is False and the depths are the call order (one norm per stage: slower, still exact).
    A norm that feeds itself (called again on its own output) ignores that edge.
    """
    index = {id(m): i for i, m in enumerate(norms)}
    depth: list[int | None] = [None] * len(norms)
    order: list[int] = []
    mode: _Tags | None = None

    def pre(m, args, kwargs):
        i = index[id(m)]
        if i not in order:
            order.append(i)
        if mode is None:
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        deps = [depth[j] for j in mode.of(x) if j != i and depth[j] is not None]
        d = 1 + max(deps) if deps else 0
        depth[i] = d if depth[i] is None else max(depth[i], d)

    def post(m, args, kwargs, out):
        if mode is not None:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    mode.tags[t] = frozenset({index[id(m)]})

    handles = []
    try:
        for m in norms:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        try:
            mode = _Tags()
            with mode:
                run()
            return depth, True
        except Exception:  # noqa: BLE001 - a model the mode cannot run: fall back to call order
            mode = None
            depth = [None] * len(norms)
            order.clear()
            run()
            for k, i in enumerate(order):
                depth[i] = k
            return depth, False
    finally:
        for h in handles:
            h.remove()
