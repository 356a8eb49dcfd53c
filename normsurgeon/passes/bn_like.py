"""BN-like modules for the fold: modules that are not ``nn.BatchNorm`` but compute, in eval, a fixed
per-channel ``x * scale + shift`` over the last dim (``PowerNorm``, ``RepBatchNorm``, a finished
``ProgressiveNorm``; they expose ``eval_scale_shift()``).

Their eval forward exports as several ops (rsqrt, mul, add; RepBN also an inner batch_norm plus
``alpha * x``), which the fold rule does not match. ``collapse`` replaces each such module's region of
the captured graph by what a ``TokenBatchNorm`` would have produced (view to (N, C) -> batch_norm ->
view back), so ``fold_bn`` matches, checks and folds it like any token BatchNorm; the module is then
one site (its inner ``rep.bn`` / ``norm`` children are never sites of their own: x also feeds
``alpha * x``, so folding the inner BN alone would be wrong).

Frozen batch norms of other libraries (DETR's ``DetrFrozenBatchNorm2d``, torchvision's
``FrozenBatchNorm2d``...) are BN-like too, over dim 1: ``affine_probe.frozen_scale_shift`` proves
that the module's forward is ``x * scale + shift`` per channel of its buffers (not its class name),
and ``collapse`` turns their region into one ``batch_norm`` node on the input's own shape, which
``fold_bn`` reads as a BatchNorm2d (channel axis 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..affine_probe import frozen_scale_shift
from ..errors import NormSurgeonError
from ..graph import GNode, ModelGraph

__all__ = ["is_bn_like", "channels_first", "scale_shift", "not_foldable_reason", "inside_bn_like", "collapse"]


def is_bn_like(m: nn.Module | None) -> bool:
    return m is not None and not isinstance(m, nn.modules.batchnorm._BatchNorm) and \
        (callable(getattr(m, "eval_scale_shift", None)) or channels_first(m))


def channels_first(m: nn.Module) -> bool:
    """A proven frozen batch norm: its channels are dim 1 (the others' are the last dim)."""
    return not callable(getattr(m, "eval_scale_shift", None)) and frozen_scale_shift(m) is not None


def not_foldable_reason(m: nn.Module) -> str | None:
    """Why the eval map of a BN-like module is not one per-channel affine (None: it is)."""
    if getattr(m, "group_scaling", None) is not None:
        return (f"{type(m).__name__} with group scaling: the per-token group scaling is not a fixed map "
                "(only its affine part would fold)")
    if channels_first(m):
        return None
    try:
        m.eval_scale_shift()
    except NormSurgeonError as e:
        return str(e)
    return None


def scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 of any BN-like module's eval map ``x * scale + shift``."""
    scale, shift = frozen_scale_shift(m) if channels_first(m) else m.eval_scale_shift()
    return scale.detach().to(torch.float64), shift.detach().to(torch.float64)


def inside_bn_like(model: nn.Module) -> set[str]:
    """Paths of modules nested in a BN-like module (its ``rep.bn``, its original ``norm``)."""
    out: set[str] = set()
    for path, m in model.named_modules():
        if is_bn_like(m):
            out.update(f"{path}.{p}" if path else p for p, _ in m.named_modules() if p)
    return out


def _in(node: GNode, path: str) -> bool:
    mp = node.module_path
    return mp is not None and (mp == path or path == "" or mp.startswith(path + "."))


def _replace(value, old: GNode, new: GNode):
    if value is old:
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


def collapse(model: nn.Module, graph: ModelGraph) -> dict[str, str]:
    """Replace each BN-like module's region of ``graph`` by view -> batch_norm -> view nodes (in place).
    Returns {path: reason} for BN-like modules whose region is not one chain x -> y of equal shape."""
    problems: dict[str, str] = {}
    for path, m in model.named_modules():
        if not is_bn_like(m) or any(path.startswith(p + ".") for p in problems):
            continue
        region = [n for n in graph.nodes if n.op not in ("param", "input", "output") and _in(n, path)]
        if not region:
            continue
        members = set(map(id, region))
        inputs: list[GNode] = []
        for n in region:
            for a in n.inputs:
                if id(a) not in members and a.op != "param" and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in region if any(id(u) not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1 or len({n.call_key for n in region if n.module_path == path}) > 1:
            problems[path] = "called more than once, or its forward is not one chain from one input to one output"
            continue
        x, y = inputs[0], outputs[0]
        if x.shape is None or y.shape is None or tuple(x.shape) != tuple(y.shape):
            problems[path] = "no shape information for its forward, or it changes the shape"
            continue
        key = f"{path}#bn_like"
        common = dict(module_path=path, call_key=key, module_stack=list(region[0].module_stack), dtype=y.dtype)
        if channels_first(m):
            channels = frozen_scale_shift(m)[0].numel()
            if len(x.shape) < 2 or int(x.shape[1]) != channels:
                problems[path] = f"its input {tuple(x.shape)} does not hold its {channels} channels at dim 1"
                continue
            bn = GNode(f"{key}_bn", "batch_norm", args=(x,), shape=tuple(x.shape), leaf_module=True, **common)
            _splice(graph, region, members, x, y, [bn])
            continue
        c = int(x.shape[-1])
        flat = GNode(f"{key}_in", "view", args=(x, [-1, c]), shape=(int(torch.Size(x.shape).numel() // c), c),
                     **common)
        bn = GNode(f"{key}_bn", "batch_norm", args=(flat,), shape=flat.shape, leaf_module=True, **common)
        back = GNode(f"{key}_out", "view", args=(bn, list(y.shape)), shape=tuple(y.shape), **common)
        flat.users, bn.users = [bn], [back]
        _splice(graph, region, members, x, y, [flat, bn, back])
    return problems


def _splice(graph: ModelGraph, region: list[GNode], members: set[int], x: GNode, y: GNode, chain: list[GNode]
            ) -> None:
    """Put ``chain`` (its first node reads ``x``) where ``region`` was; ``y``'s readers read its last."""
    last = chain[-1]
    last.users = list(y.users)
    x.users = [u for u in x.users if id(u) not in members] + [chain[0]]
    for u in y.users:
        u.args = _replace(u.args, y, last)
        u.kwargs = _replace(u.kwargs, y, last)
    at = graph.nodes.index(region[0])
    graph.nodes[:] = [n for n in graph.nodes if id(n) not in members]
    graph.nodes[at:at] = chain
