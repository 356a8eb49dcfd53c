"""Every normalization of an ONNX graph, with the axes it normalizes: fused ops (BatchNormalization,
LayerNormalization, RMSNormalization, GroupNormalization, InstanceNormalization) and LayerNorm/RMSNorm
written out in primitive ops (``ReduceMean → Sub → Pow/Mul → ReduceMean → Add → Sqrt → Div``, the
division either way round: ``x / sqrt`` or ``x * Reciprocal(sqrt)``, the affine ``Mul`` before or
after it).

The axes come from the graph, never from sizes: ``LayerNormalization``'s ``axis`` (all dims from it
to the end), the ``axes`` of the ``ReduceMean``s of a decomposed norm (an attribute before opset 18,
an input from 18). A channels-first LayerNorm (ConvNeXt: ``ReduceMean(axes=[1])`` over ``[N, C, H,
W]``) reports dim 1 only: rewriting it as one LayerNormalization(axis=1) would normalize over C, H
and W together (the wrong result ORT's transformer optimizer produces).

Dims follow ``normsurgeon inspect`` on PyTorch models: statistics dims of a BatchNorm (``[0, 2, 3]``),
normalized dims of a LayerNorm/RMSNorm counted from the end (``[-1]``; ``[-3]`` for dim 1 of a 4-D
input). ``source`` is ``op`` for a fused node and ``pattern`` for a decomposed one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..find import InspectReport, NormSite
from .graph import OnnxGraph, dim_text, load_ir

__all__ = ["inspect_onnx"]

_FUSED = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm", "RMSNormalization": "rmsnorm",
          "SimplifiedLayerNormalization": "rmsnorm", "GroupNormalization": "groupnorm",
          "InstanceNormalization": "instancenorm", "SkipLayerNormalization": "layernorm",
          "SkipSimplifiedLayerNormalization": "rmsnorm"}
_LOOK_THROUGH = ("Cast", "Identity")


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _label(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _shape(g: OnnxGraph, v) -> list | None:
    s = g.shape(v)
    if s is None:
        return None
    return [d[0] if d is not None and not d[1] else dim_text(d) for d in s]


def _base(v):
    """``v`` with Cast/Identity producers looked through."""
    for _ in range(8):
        p = v.producer() if v is not None else None
        if p is None or p.op_type not in _LOOK_THROUGH or not p.inputs:
            return v
        v = p.inputs[0]
    return v


def _src(v):
    b = _base(v)
    return b.producer() if b is not None else None


def _scalar(g: OnnxGraph, v) -> float | None:
    c = g.const(_base(v)) if v is not None else None
    if c is None or c.size != 1:
        return None
    return float(np.asarray(c).reshape(-1)[0])


def _reduce_axes(g: OnnxGraph, node) -> list[int] | None:
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = g.const(node.inputs[1])
        axes = None if c is None else [int(a) for a in c.reshape(-1)]
    return None if axes is None else list(axes)


def _from_end(axes: list[int], rank: int | None) -> list[int]:
    if rank is None:
        return sorted(axes)
    return sorted((a % rank) - rank for a in axes)


def _users(v) -> list:
    out = []
    for use in v.uses():
        node = use[0] if isinstance(use, tuple) else use.node
        if all(node is not o for o in out):
            out.append(node)
    return out


def _neighbours(g: OnnxGraph, node, index: dict[int, int]) -> tuple[str | None, list[str]]:
    p = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    producer = f"{_label(p, index[id(p)])} ({p.op_type})" if p is not None else None
    consumers = [f"{_label(u, index[id(u)])} ({u.op_type})" for u in _users(node.outputs[0]) if id(u) in index]
    return producer, consumers


def _fused_site(g: OnnxGraph, node, kind: str, index: dict[int, int]) -> NormSite:
    x = node.inputs[0]
    shape = _shape(g, x)
    rank = len(shape) if shape is not None else None
    site = NormSite(_label(node, index[id(node)]), kind, "op", module_type=node.op_type, input_shape=shape)
    site.eps = float(_attr(node, "epsilon", 1e-5))
    site.producer, site.consumers = _neighbours(g, node, index)
    if kind == "batchnorm":
        c = g.const(node.inputs[3]) if len(node.inputs) > 3 else None
        site.channels = int(c.size) if c is not None else None
        site.dims = [0] + list(range(2, rank)) if rank is not None else None
        site.affine = True
        site.track_running_stats = not bool(_attr(node, "training_mode", 0))
    elif kind in ("layernorm", "rmsnorm"):
        axis = int(_attr(node, "axis", -1))
        if rank is not None:
            axis %= rank
            site.dims = list(range(axis - rank, 0))
            sizes = [shape[a] for a in range(axis, rank)]
            site.channels = int(np.prod(sizes)) if all(isinstance(s, int) for s in sizes) else None
            if axis == 1 and rank > 2:
                site.note = f"normalizes dims {axis}..{rank - 1} together (axis={axis})"
            site.note = site.note or _channels_first_note(x, axis, rank)
        else:
            site.dims = [axis] if axis < 0 else None
            site.note = f"axis={axis}"
        site.affine = len(node.inputs) > 1
    elif kind == "groupnorm":
        site.channels = int(_attr(node, "num_groups", 0)) or None
        site.note = "channels = num_groups"
    elif kind == "instancenorm":
        site.dims = list(range(2, rank)) if rank is not None else None
    if node.domain not in ("", "ai.onnx"):
        site.note = "; ".join(filter(None, [site.note, f"domain {node.domain}"]))
    return site


def _channels_first_note(x, axis: int, rank: int) -> str | None:
    """A LayerNorm over the last dim of ``Transpose(t)`` normalizes the dim of ``t`` that the transpose
    moved there: ConvNeXt's channels-first LN, exported as Transpose → LayerNormalization → Transpose."""
    p = x.producer() if x is not None else None
    if p is None or p.op_type != "Transpose" or axis != rank - 1:
        return None
    perm = _attr(p, "perm")
    if perm is None or len(perm) != rank or perm[-1] == rank - 1:
        return None
    return (f"channels-first: normalizes dim {perm[-1]} of the tensor before {_label_plain(p)} (transposed to "
            "channels-last around the op)")


def _label_plain(node) -> str:
    return node.name or node.op_type


def _decomposed(g: OnnxGraph, index: dict[int, int]) -> list[NormSite]:
    """Find ``y / Sqrt(ReduceMean(y²) + eps)`` (or ``y * Reciprocal(...)``); LayerNorm if ``y = x - mean(x)``."""
    sites: list[NormSite] = []
    for node in g.graph:
        if node.op_type == "Sqrt":
            inner = node.inputs[0]
        elif node.op_type == "Pow" and len(node.inputs) == 2 and _scalar(g, node.inputs[1]) == 0.5:
            inner = node.inputs[0]
        else:
            continue
        add = _src(inner)
        eps = None
        var_v = inner
        if add is not None and add.op_type == "Add" and len(add.inputs) == 2:
            consts = [_scalar(g, v) for v in add.inputs]
            if sum(c is not None for c in consts) != 1:
                continue
            eps = next(c for c in consts if c is not None)
            var_v = add.inputs[0] if consts[1] is not None else add.inputs[1]
        var = _src(var_v)
        if var is None or var.op_type != "ReduceMean":
            continue
        sq = _src(var.inputs[0])
        if sq is None:
            continue
        if sq.op_type == "Pow" and len(sq.inputs) == 2 and _scalar(g, sq.inputs[1]) == 2.0:
            y = _base(sq.inputs[0])
        elif sq.op_type == "Mul" and len(sq.inputs) == 2 and _base(sq.inputs[0]) is _base(sq.inputs[1]):
            y = _base(sq.inputs[0])
        else:
            continue
        if not _normalizes(node, y):
            continue
        axes = _reduce_axes(g, var)
        sub = y.producer() if y is not None else None
        kind, x = "rmsnorm", y
        differs: list[str] = []
        if sub is not None and sub.op_type == "Sub" and len(sub.inputs) == 2:
            mean = _src(sub.inputs[1])
            if mean is not None and mean.op_type == "ReduceMean" and _base(mean.inputs[0]) is _base(sub.inputs[0]):
                kind, x = "layernorm", sub.inputs[0]
                if _reduce_axes(g, mean) != axes:
                    differs.append(f"mean over axes {_reduce_axes(g, mean)}, variance over {axes}")
        if eps is None:
            differs.append("no eps")
        if any(p is not None and p.op_type == "Cast" for p in (var.inputs[0].producer(), node.inputs[0].producer())):
            differs.append("casts around the statistics")
        shape = _shape(g, x)
        rank = len(shape) if shape is not None else None
        site = NormSite(f"{_label(var, index[id(var)])}:pattern", kind, "pattern", module_type="decomposed",
                        input_shape=shape, eps=eps, differs=differs)
        if axes is not None:
            site.dims = _from_end(axes, rank)
            if rank is not None:
                pos = sorted(a % rank for a in axes)
                sizes = [shape[a] for a in pos]
                site.channels = int(np.prod(sizes)) if all(isinstance(s, int) for s in sizes) else None
                if pos == [1] and rank > 2:
                    site.note = "channels-first: normalizes dim 1 only (a LayerNormalization op with axis=1 would " \
                                "normalize dims 1..end together)"
        else:
            site.note = "ReduceMean without axes: normalizes over every dim"
        p = x.producer() if x is not None else None
        site.producer = f"{_label(p, index[id(p)])} ({p.op_type})" if p is not None and id(p) in index else None
        sites.append(site)
    return sites


def _normalizes(sqrt_node, y) -> bool:
    """Whether the square root divides ``y`` (possibly scaled by the affine weight first): ``Div(y', s)``,
    or ``Mul(y', Reciprocal(s))``/``Mul(y', Div(1, s))``."""
    out = sqrt_node.outputs[0]
    dividers = []
    for u in _users(out):
        if u.op_type == "Div" and len(u.inputs) == 2 and u.inputs[1] is out:
            dividers.append(u.inputs[0])
        elif u.op_type in ("Reciprocal", "Div") and (u.op_type == "Reciprocal" or u.inputs[1] is out):
            for m in _users(u.outputs[0]):
                if m.op_type == "Mul":
                    dividers += [v for v in m.inputs if v is not u.outputs[0]]
    for v in dividers:
        v = _base(v)
        if v is _base(y):
            return True
        p = v.producer()  # the affine weight first: w * (x - u) / sqrt(...)
        if p is not None and p.op_type == "Mul" and any(_base(i) is _base(y) for i in p.inputs):
            return True
    return False


def inspect_onnx(model: Any) -> InspectReport:
    """Every normalization of ``model`` (a path or an ``onnx.ModelProto``) in the main graph."""
    m = load_ir(model)
    g = OnnxGraph(m)
    nodes = list(g.graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    sites = [_fused_site(g, n, _FUSED[n.op_type], index) for n in nodes if n.op_type in _FUSED]
    sites += _decomposed(g, index)
    opset = next((v for d, v in m.opset_imports.items() if d in ("", "ai.onnx")), None)
    report = InspectReport(f"onnx (opset {opset}, {len(nodes)} nodes)", sites)
    report.inputs = [{"name": v.name, "shape": [d if isinstance(d, int) else (getattr(d, "value", None) or "?")
                                                 for d in (v.shape or [])],
                      "dtype": str(v.dtype.numpy()) if v.dtype is not None else "?"}
                     for v in g.graph.inputs if not v.is_initializer()]
    subgraphs = sum(1 for n in nodes for a in n.attributes.values() if a.type.name in ("GRAPH", "GRAPHS"))
    if subgraphs or m.functions:
        report.failed_parts.append(("(subgraphs/functions)", f"{subgraphs} If/Loop subgraph(s) and "
                                    f"{len(m.functions)} local function(s) are not inspected"))
    return report
