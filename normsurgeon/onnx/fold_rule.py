"""The BatchNorm fold rule on an ONNX graph (match, check, rewrite), edited through ``onnx_ir``.

- **the table**: a weighted node is a row of ``passes.fold_targets`` (``read_onnx``: Conv/ConvTranspose
  by spatial rank, Gemm by ``transB``, MatMul ``x @ W``); the math is ``fold_targets.fold``
  (``fold_math``, float64, cast back to the weight's dtype), the exactness of a before-fold into a conv
  ``fold_targets.before_reason``. What is ONNX's own is here: where an op keeps weight and bias, who
  else reads them, how to write them, and the walk.
- **match** (read-only, on ``graph.OnnxGraph``): for every ``BatchNormalization``, walk *backwards*
  through data-movement ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity, Dropout), a
  MaxPool (where the BN's scale is >= 0) and an optional bias ``Add`` to a producer, and *forwards* to
  consumers (Gemm, MatMul, a Conv that reads no padding, a ConvTranspose whose outputs all receive
  every tap, also behind a Flatten). The channel axis is followed on symbolic shapes (``graph``): never
  guessed from sizes. The walk is not ``fold_targets.plan``'s: that one reads integer shapes, and a
  dynamic dim of an ONNX graph is a symbol. Every refusal carries the reason: a value also read
  elsewhere (shared producer), a weight read by other nodes (shared initializer), a padded conv, a
  nonlinearity between, an axis that cannot be proved.
- **rewrite**: the new tensors are written where the weight lives (an initializer stays an initializer
  under its name, a ``Constant`` node keeps being one; a weight computed from constants, such as
  ``Transpose(W)``, becomes a new initializer); a MatMul without a bias gets ``Add(bias)`` after it
  (ONNX Runtime fuses the pair into a Gemm for 2-D inputs and static shapes); the BN node is removed
  and what only it read goes with it.

Sites refer to nodes by their index in the graph's node list, so the driver (``onnx.fold``) can apply
any subset of them to a fresh copy of the model (rollback without undo logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import fold_math
from ..graph import ops
from ..passes import fold_targets
from .graph import (DATA_MOVEMENT, IDENTITY_OPS, NONLINEAR, OnnxGraph, map_axis_through_reshape,
                    map_channels_through_reshape, shape_text)

__all__ = ["OnnxSite", "OnnxTarget", "OnnxRead", "read_onnx", "match", "rewrite", "node_label"]


@dataclass
class OnnxRead:
    """What an ONNX weighted node is in the one fold-target table (``passes.fold_targets``), and where
    it takes its weight and bias (input indices; ``bias`` None: the op has none, MatMul)."""

    row: fold_targets.FoldTarget
    weight: int = 1
    bias: int | None = 2
    groups: int = 1

    @property
    def kind(self) -> str:
        return self.row.kind


#: where each ONNX weighted op takes its weight and its bias (input indices; None: it has no bias input)
_ONNX_IO: dict[str, tuple[int, int | None]] = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2),
                                                "MatMul": (1, None)}


def read_onnx(g: OnnxGraph, node) -> OnnxRead | None:
    """The table row of ``node`` among ``fold_targets.rows_for_onnx(op_type)``, or None if it is no fold
    target: Conv/ConvTranspose by their weight's rank (the row's ``spatial``), Gemm by ``transB`` (1: an
    (out, in) weight, kind ``linear``; 0: (in, out), ``linear_t``), MatMul ``x @ W`` with a constant 2-D
    ``W`` (``linear_t``)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in _ONNX_IO or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    rows = fold_targets.rows_for_onnx(op)
    if op in ("Conv", "ConvTranspose"):
        rank = g.rank(node.inputs[1])
        rows = [r for r in rows if rank is not None and r.spatial == rank - 2]
    elif op == "Gemm":
        if _attr(node, "transA", 0):
            return None
        rows = [r for r in rows if r.kind == ("linear" if _attr(node, "transB", 0) else "linear_t")]
    else:  # MatMul
        if g.rank(node.inputs[1]) != 2 or g.const(node.inputs[1]) is None or g.const(node.inputs[0]) is not None:
            return None
        rows = [r for r in rows if r.kind == "linear_t"]
    if len(rows) != 1:
        return None
    weight, bias = _ONNX_IO[op]
    return OnnxRead(rows[0], weight, bias, int(_attr(node, "group", 1)))


TARGET_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class OnnxTarget:
    """One weighted node a BN folds into."""

    index: int  # in the node list
    label: str
    op: str
    chain: list[str] = field(default_factory=list)  # data-movement ops between, in dataflow order
    bias_add: int | None = None  # "after": the index of an Add(constant) between producer and BN
    out_rank: int = 2  # rank of the node's output
    axis: int = 1  # its channel axis: of its output ("after"), of its input ("before")
    stride: int = 1  # "before": input feature i holds BN channel (i // stride) % C


@dataclass
class OnnxSite:
    index: int  # the BN node
    label: str
    position: str  # after | before
    targets: list[OnnxTarget]

    @property
    def into(self) -> list[str]:
        return [t.label for t in self.targets]


def node_label(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def bn_problem(g: OnnxGraph, bn) -> str | None:
    if bn.domain not in ("", "ai.onnx"):
        return f"a BatchNormalization of domain {bn.domain!r}"
    if _attr(bn, "training_mode", 0):
        return "training_mode=1: it normalizes with batch statistics"
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in bn.outputs[1:]):
        return "its running statistics outputs are read (a training graph)"
    if len(bn.inputs) < 5 or any(g.const(v) is None for v in bn.inputs[1:5]):
        return "its scale, bias, mean or variance is not a constant"
    if bn.outputs[0].is_graph_output() and bn.inputs[0].is_graph_input():
        return "it maps a graph input straight to a graph output"
    r = g.rank(bn.inputs[0])
    if r is not None and r < 2:
        return f"its input has rank {r}"
    return None


def bn_scale_shift(g: OnnxGraph, bn) -> tuple[torch.Tensor, torch.Tensor]:
    w, b, mean, var = (torch.from_numpy(np.array(g.const(v), dtype=np.float64)) for v in bn.inputs[1:5])
    return fold_math.bn_scale_shift(mean, var, float(_attr(bn, "epsilon", 1e-5)), w, b)


def _single_reader(g: OnnxGraph, v, what: str) -> str | None:
    users = g.users(v)
    if v.is_graph_output():
        return f"{what} is also a graph output"
    if len(users) != 1:
        others = ", ".join(sorted({u.op_type for u in users}))
        return f"{what} is also read by {len(users) - 1} other node(s) ({others})"
    return None


def _weight_problem(g: OnnxGraph, node, label: str, idx: int, role: str = "weight") -> str | None:
    """A constant weight read only by ``node`` (through constant-only ops such as Transpose)."""
    if idx >= len(node.inputs) or node.inputs[idx] is None:
        return None if role == "bias" else f"{label} has no {role}"
    v = node.inputs[idx]
    if g.const(v) is None:
        return f"{label}'s {role} is not a constant"
    seen = v
    while True:
        if seen.is_graph_input() and not seen.is_initializer():
            return f"{label}'s {role} is a graph input"
        users = g.users(seen)
        if len(users) > 1 or seen.is_graph_output():
            return f"{label}'s {role} ({seen.name}) is also read by other nodes (shared)"
        p = seen.producer()
        # a weight stored transposed or cast (Transpose(W)) is still W: tied if W has other readers; a
        # value generated by other ops (Expand of a zero) is no one's weight and is never written in place
        if p is None or p.op_type not in ("Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze") \
                or not p.inputs or p.inputs[0] is None:
            return None
        seen = p.inputs[0]


def _const_bias(g: OnnxGraph, add, x) -> tuple[np.ndarray | None, int]:
    """The constant operand of ``Add(x, c)`` and its index, or (None, -1)."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None, -1
    for i, v in enumerate(add.inputs):
        if v is not x and g.const(v) is not None:
            return g.const(v), i
    return None, -1


def _per_channel(c: np.ndarray, rank: int, axis: int, n: int) -> bool:
    """Whether constant ``c`` (broadcast against a rank-``rank`` tensor) varies only along ``axis``."""
    if c.ndim > rank:
        return False
    shape = [1] * (rank - c.ndim) + list(c.shape)
    return all(d == 1 or (i == axis and d == n) for i, d in enumerate(shape))


#: ops a per-channel map ``s·x + t`` commutes with when ``s >= 0`` on every channel: max(s·x) = s·max(x)
#: (padding pads with -inf, which a positive scale keeps); their extra output (indices) must be unread
MAX_POOLS = frozenset({"MaxPool", "GlobalMaxPool"})


def _passes(node) -> bool:
    """Whether a BN's map can be followed through ``node`` (moved data, or a max-pool: checked later)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in MAX_POOLS:
        return not any(o is not None and (o.uses() or o.is_graph_output()) for o in node.outputs[1:])
    return node.op_type in DATA_MOVEMENT


def _pool_reason(chain_ops: list[str], scale: torch.Tensor) -> str | None:
    """``fold_targets.commute_reason`` for ONNX chains: a max-pool between needs ``s >= 0``."""
    pools = [op for op in chain_ops if op in MAX_POOLS]
    negative = (scale < 0).nonzero().flatten().tolist()
    if not pools or not negative:
        return None
    return (f"{pools[0]} sits between, and a max-pool commutes with the BN only where its scale γ/σ is ≥ 0: it "
            f"is negative on {len(negative)} of {scale.numel()} channels (channel {negative[0]} first)")


def _map_forward(g: OnnxGraph, node, axis: int, stride: int, n: int) -> tuple[int | None, int, str | None]:
    """(axis, stride) of n channels after data-movement ``node``, or (None, _, why)."""
    x, y = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    op = node.op_type
    if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None \
            and not (g.const(node.inputs[2]) is not None and not g.const(node.inputs[2]).any()):
        return None, stride, "a Dropout that may run in training mode (training_mode is not the constant false)"
    if op in IDENTITY_OPS:
        return axis, stride, None
    if op in MAX_POOLS:  # pools dims 2.., keeps batch and channels
        if axis in (0, 1) and stride == 1:
            return axis, stride, None
        return None, stride, f"{op} pools over the channel axis {axis}"
    if x is None or y is None:
        return None, stride, f"the shapes around {op} are unknown ({shape_text(x)} → {shape_text(y)})"
    if op == "Transpose":
        perm = _attr(node, "perm") or list(reversed(range(len(x))))
        return list(perm).index(axis), stride, None
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        if stride == 1:
            a = map_axis_through_reshape(x, y, axis)
            if a is not None:
                return a, 1, None
        out = map_channels_through_reshape(x, y, axis, stride, n)
        if out is None:
            return None, stride, (f"{op} {shape_text(x)} → {shape_text(y)} merges or splits the channel axis "
                                  f"{axis}, or it cannot be proved not to")
        return out[0], out[1], None
    return None, stride, f"{op} is not a data-movement op"


def _track(g: OnnxGraph, chain: list, axis: int, n: int, stride: int = 1) -> tuple[int | None, int, str | None]:
    for node in chain:
        axis, stride, why = _map_forward(g, node, axis, stride, n)
        if axis is None:
            return None, stride, why
    return axis, stride, None


# --- after: BN(producer(x)) ------------------------------------------------------------------------

def _own_params_problem(g: OnnxGraph, node, label: str, rd: OnnxRead) -> str | None:
    why = _weight_problem(g, node, label, rd.weight)
    if why is None and rd.bias is not None:
        why = _weight_problem(g, node, label, rd.bias, "bias")
    if why is None and node.op_type == "Gemm":
        c = g.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        n = fold_targets.out_channels(rd.kind, tuple(g.const(node.inputs[1]).shape))
        if c is not None and not _per_channel(c, 2, 1, n):
            return f"{label}'s bias C has shape {list(c.shape)}: not one value per output channel"
    return why


def _match_after(g: OnnxGraph, bn, index: dict[int, int], C: int) -> tuple[OnnxTarget | None, str]:
    x = bn.inputs[0]
    chain: list = []
    bias_add = None
    while True:
        why = _single_reader(g, x, f"the value {x.name!r} between the producer and the BN")
        p = x.producer()
        if p is None:
            return None, "its input is a graph input, not the output of a Conv/Gemm/MatMul"
        rd = read_onnx(g, p)
        if why and rd is not None:
            return None, f"producer {node_label(p, index[id(p)])} output is also read elsewhere: {why}"
        if why:
            return None, why
        if rd is not None:
            break
        if _passes(p):
            chain.insert(0, p)
            x = p.inputs[0]
            continue
        if p.op_type == "Add" and bias_add is None:
            c, ci = _const_bias(g, p, None)
            src = p.inputs[1 - ci] if ci >= 0 else None
            if src is not None and src.producer() is not None and read_onnx(g, src.producer()) is not None:
                bias_add = p
                x = src
                continue
        if p.op_type in NONLINEAR:
            return None, f"a nonlinearity ({p.op_type}) sits between the producer and the BN"
        return None, f"its input comes from {p.op_type} ({node_label(p, index[id(p)])}), not from a Conv/Gemm/MatMul"
    label = node_label(p, index[id(p)])
    if rd.row.after is None:
        return None, f"a BN after {label} ({rd.row.name}) does not fold into it"
    why = _own_params_problem(g, p, label, rd)
    if why:
        return None, why
    if len(p.outputs) != 1:
        return None, f"{label} has several outputs"
    out = p.outputs[0]
    shape = g.shape(out)
    if shape is None:
        return None, f"the shape of {label}'s output is unknown"
    rank = len(shape)
    axis = fold_targets.channel_axis(rd.kind, rd.row.spatial, tuple(shape))
    n_out = fold_targets.out_channels(rd.kind, tuple(g.const(p.inputs[rd.weight]).shape), rd.groups)
    steps = ([bias_add] if bias_add is not None else []) + chain
    why = _pool_reason([n.op_type for n in chain], bn_scale_shift(g, bn)[0])
    if why:
        return None, why
    if C != 1:  # a one-channel BN is a scalar map: it folds wherever its axis sits
        a, stride, why = _track(g, chain, axis, C)
        if why:
            return None, f"between {label} and the BN: {why}"
        if a != 1 or stride != 1:
            return None, f"the BN normalizes axis 1 but {label}'s channels arrive on axis {a}"
        if n_out != C:
            return None, f"{label} has {n_out} output channels, the BN {C}"
    if bias_add is not None:
        ci = [i for i, v in enumerate(bias_add.inputs) if g.const(v) is not None][0]
        c = g.const(bias_add.inputs[ci])
        why = _weight_problem(g, bias_add, f"the bias Add after {label}", ci, "bias")
        if why:
            return None, why
        if not _per_channel(c, rank, axis, n_out):
            return None, f"the Add after {label} adds a constant of shape {list(c.shape)}: not one value per channel"
    return OnnxTarget(index[id(p)], label, p.op_type, [n.op_type for n in steps],
                      bias_add=index[id(bias_add)] if bias_add is not None else None, out_rank=rank, axis=axis), ""


# --- before: consumer(BN(x)) -----------------------------------------------------------------------

def _conv_before_reason(node, label: str, rd: OnnxRead, shift: torch.Tensor, w_shape) -> str | None:
    """``fold_targets.before_reason`` with an ONNX Conv/ConvTranspose's attributes."""
    n = rd.row.spatial
    kernel = list(_attr(node, "kernel_shape") or w_shape[2:])
    pads = list(_attr(node, "pads") or [0] * (2 * n))
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    dil = list(_attr(node, "dilations") or [1] * n)
    stride = list(_attr(node, "strides") or [1] * n)
    out_pad = list(_attr(node, "output_padding") or [0] * n)
    if node.op_type == "ConvTranspose":
        if _attr(node, "output_shape") is not None or auto not in ("NOTSET", "VALID"):
            return f"consumer {label} is a ConvTranspose with output_shape/auto_pad: its taps cannot be checked"
        if pads[:n] != pads[n:]:
            return f"consumer {label} is a ConvTranspose with asymmetric pads {pads}"
        padding: object = pads[:n]
    else:
        padding = "same" if auto in ("SAME_UPPER", "SAME_LOWER") else "valid" if auto == "VALID" else pads
    return fold_targets.before_reason(rd.row, label, shift, padding=padding, dilation=dil, kernel=kernel,
                                      stride=stride, output_padding=out_pad)


def _match_before(g: OnnxGraph, bn, index: dict[int, int], C: int) -> tuple[list[OnnxTarget] | None, str]:
    y = bn.outputs[0]
    if y.is_graph_output():
        return None, "its output is a graph output"
    scale, shift = bn_scale_shift(g, bn)
    targets: list[OnnxTarget] = []
    for user in g.users(y):
        chain: list = []
        node = user
        while _passes(node):
            chain.append(node)
            why = _single_reader(g, node.outputs[0], f"the output of {node.op_type} after the BN")
            if why:
                return None, why
            node = g.users(node.outputs[0])[0]
        label = node_label(node, index[id(node)])
        rd = read_onnx(g, node)
        if node.op_type in NONLINEAR:
            return None, f"its output feeds a nonlinearity ({node.op_type})"
        if rd is None:
            if node.op_type in TARGET_OPS:
                return None, f"its output feeds {node.op_type} ({label}) whose weight is not a constant 2-D/conv weight"
            return None, f"its output feeds {node.op_type} ({label}), not only Gemm/MatMul/Conv"
        fed = chain[-1].outputs[0] if chain else y
        if node.inputs[0] is not fed or any(v is fed for v in node.inputs[1:]):
            return None, f"consumer {label} reads the BN as its weight, not as its input"
        why = _own_params_problem(g, node, label, rd)
        if why:
            return None, why
        w_shape = tuple(g.const(node.inputs[rd.weight]).shape)
        if rd.kind in ("conv", "conv_transpose"):
            why = _conv_before_reason(node, label, rd, shift, w_shape)
        elif rd.row.before is None:
            why = f"a BN before {label} ({rd.row.name}) does not fold into it"
        if why:
            return None, why
        x_shape = g.shape(fed)
        if x_shape is None:
            return None, f"the shape of {label}'s input is unknown"
        want = fold_targets.channel_axis(rd.kind, rd.row.spatial, tuple(x_shape))
        stride = 1
        if C != 1:
            a, stride, why = _track(g, chain, 1, C)
            if why:
                return None, f"between the BN and {label}: {why}"
            if a != want:
                return None, (f"the BN's channels arrive on axis {a} of {label}'s input, which reads channels on "
                              f"axis {want}")
            n_in = fold_targets.in_channels(rd.kind, w_shape, rd.groups)
            if n_in % (C * stride):
                return None, f"{label}'s {n_in} input channels are not whole blocks of the BN's {C} channels"
        why = _pool_reason([n.op_type for n in chain], scale)
        if why:
            return None, why
        targets.append(OnnxTarget(index[id(node)], label, node.op_type, [n.op_type for n in chain], stride=stride,
                                  out_rank=g.rank(node.outputs[0]) or len(x_shape), axis=want))
    if not targets:
        return None, "its output is not read"
    return targets, ""


def match(g: OnnxGraph) -> list[tuple[str, int, OnnxSite | None, str | None]]:
    """Every BatchNormalization: ``(label, index, site or None, reason it cannot fold)``."""
    nodes = list(g.graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    out = []
    for i, bn in enumerate(nodes):
        if bn.op_type != "BatchNormalization":
            continue
        label = node_label(bn, i)
        try:
            out.append((label, i, *_match_one(g, bn, i, label, index)))
        except Exception as e:  # noqa: BLE001 - a graph this matcher misreads skips one BN, never the fold
            out.append((label, i, None, f"could not be matched ({type(e).__name__}: {e})"))
    return out


def _match_one(g: OnnxGraph, bn, i: int, label: str, index: dict[int, int]) -> tuple[OnnxSite | None, str | None]:
    why = bn_problem(g, bn)
    if why:
        return None, why
    C = int(np.asarray(g.const(bn.inputs[3])).size)
    target, why_after = _match_after(g, bn, index, C)
    if target is not None:
        return OnnxSite(i, label, "after", [target]), None
    targets, why_before = _match_before(g, bn, index, C)
    if targets is not None:
        return OnnxSite(i, label, "before", targets), None
    return None, f"after: {why_after}; before: {why_before}"


# --- rewrite -----------------------------------------------------------------------------------------

class _Names:
    def __init__(self, graph) -> None:
        self.used = {v.name for n in graph for v in n.outputs if v.name}
        self.used |= {v.name for v in graph.inputs if v.name} | set(graph.initializers)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _set_const(g: OnnxGraph, graph, node, idx: int, array: np.ndarray, names: _Names, base: str) -> None:
    """Write ``array`` as input ``idx`` of ``node``: in place where the constant is this node's alone."""
    import onnx_ir as ir

    g.invalidate()
    v = node.inputs[idx] if idx < len(node.inputs) else None
    if v is not None and len(g.users(v)) == 1 and not v.is_graph_output():
        if v.is_initializer() and v.const_value is not None:
            v.const_value = ir.tensor(array, name=v.name)
            v.shape = ir.Shape(array.shape)
            return
        p = v.producer()
        if p is not None and p.op_type == "Constant":
            for k in list(p.attributes):
                del p.attributes[k]
            p.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))
            return
    new = _new_const(graph, array, names.fresh(base))
    old = v
    if idx < len(node.inputs):
        node.replace_input_with(idx, new)
    else:
        node.resize_inputs(idx + 1)
        node.replace_input_with(idx, new)
    if old is not None:
        _drop_if_dead(graph, old)


def _new_const(graph, array: np.ndarray, name: str):
    """A new constant value: an initializer, or a ``Constant`` node in a graph that has no initializers
    (a converter that writes every weight as a Constant node gets its style kept)."""
    import onnx_ir as ir

    tensor = ir.tensor(array, name=name)
    if not graph.initializers and any(n.op_type == "Constant" for n in graph):
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=name)
        node.outputs[0].name = name
        node.outputs[0].shape = ir.Shape(array.shape)
        node.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        first = next(iter(graph), None)
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
        return node.outputs[0]
    new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                   const_value=tensor)
    graph.register_initializer(new)
    return new


def _drop_if_dead(graph, v) -> None:
    """Remove ``v`` (an initializer, or a node's output) and what only it read, once nothing reads it."""
    if v is None or v.uses() or v.is_graph_output() or v.is_graph_input():
        return
    if v.is_initializer():
        graph.initializers.pop(v.name, None)
        return
    p = v.producer()
    if p is None or p.graph is not graph or any(o.uses() or o.is_graph_output() for o in p.outputs):
        return
    inputs = list(p.inputs)
    graph.remove(p, safe=True)
    for i in inputs:
        _drop_if_dead(graph, i)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))  # a writable copy: constants are read-only views


def _bias_after(g: OnnxGraph, node, rank: int, n_out: int) -> tuple[object | None, int]:
    """An ``Add(node's output, constant)`` that is the only reader of a MatMul's output, adding one value
    per output channel (the MatMul's bias as exporters write it)."""
    out = node.outputs[0]
    users = g.users(out)
    if len(users) == 1 and not out.is_graph_output():
        c, ci = _const_bias(g, users[0], out)
        if c is not None and _per_channel(c, rank, rank - 1, n_out) and \
                _weight_problem(g, users[0], "bias", ci, "bias") is None:
            return users[0], ci
    return None, -1


def _insert_bias(g: OnnxGraph, graph, node, bias: np.ndarray, names: _Names) -> None:
    import onnx_ir as ir

    if not np.any(bias):  # a BN without shift: nothing to add
        return
    out = node.outputs[0]
    b = _new_const(graph, bias, names.fresh(f"{out.name or 'matmul'}.bias"))
    add = ir.Node("", "Add", [out, b], name=names.fresh(f"{node.name or 'MatMul'}/bias_add"))
    add.outputs[0].name = names.fresh(f"{out.name or 'matmul'}_biased")
    add.outputs[0].shape = out.shape
    add.outputs[0].type = out.type
    for use in list(out.uses()):
        user = use[0] if isinstance(use, tuple) else use.node
        idx = use[1] if isinstance(use, tuple) else use.idx
        if user is not add:
            user.replace_input_with(idx, add.outputs[0])
    if out.is_graph_output():  # the graph's output is now the biased value, under the name it had
        for i, v in enumerate(graph.outputs):
            if v is out:
                graph.outputs[i] = add.outputs[0]
        name = out.name
        out.name = names.fresh(f"{name}_unbiased")
        add.outputs[0].name = name
    graph.insert_after(node, add)


def _weight_io(g: OnnxGraph, node, rd: OnnxRead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight in its row's layout, bias or None) of a target node; Gemm's alpha/beta applied."""
    w = np.asarray(g.const(node.inputs[rd.weight]))
    b = None
    if rd.bias is not None and len(node.inputs) > rd.bias and node.inputs[rd.bias] is not None:
        b = np.asarray(g.const(node.inputs[rd.bias]))
    if node.op_type == "Gemm":
        w = w * np.asarray(_attr(node, "alpha", 1.0), w.dtype)
        if b is not None:
            n = fold_targets.out_channels(rd.kind, w.shape)
            b = np.broadcast_to(b * np.asarray(_attr(node, "beta", 1.0), b.dtype), (1, n)).reshape(n)
    return _t(w), None if b is None else _t(b)


def _store(g: OnnxGraph, graph, node, rd: OnnxRead, w: torch.Tensor, b: torch.Tensor | None, names: _Names) -> None:
    import onnx_ir as ir

    base = node.name or node.op_type
    if node.op_type == "Gemm":
        for k in ("alpha", "beta"):
            if _attr(node, k, 1.0) != 1.0:
                node.attributes[k] = ir.AttrFloat32(k, 1.0)
    old_w = node.inputs[rd.weight]
    _set_const(g, graph, node, rd.weight, np.ascontiguousarray(w.numpy()),
               names, f"{old_w.name if old_w is not None and old_w.name else base}.folded")
    if b is not None and rd.bias is not None:
        _set_const(g, graph, node, rd.bias, np.ascontiguousarray(b.numpy()), names, f"{base}.bias")


def rewrite(site: OnnxSite, g: OnnxGraph, nodes: list) -> None:
    """Apply ``site`` to the model ``g`` views (``nodes``: its node list when the sites were matched)."""
    graph = g.graph
    names = _Names(graph)
    bn = nodes[site.index]
    s, t = bn_scale_shift(g, bn)
    for target in site.targets:
        node = nodes[target.index]
        rd = read_onnx(g, node)
        if rd is None:
            raise ValueError(f"{target.label} is no longer a fold target")
        w, b = _weight_io(g, node, rd)
        channels = ops.Channels(target.axis, target.stride)
        if site.position == "after":
            add = nodes[target.bias_add] if target.bias_add is not None else None
            if add is None and rd.bias is None:
                add, _ = _bias_after(g, node, target.out_rank, fold_targets.out_channels(rd.kind, tuple(w.shape)))
            if add is not None:  # y = s·(P(x) + c) + t: P's weight (and own bias) scaled, c' = s·c + t
                c, ci = _const_bias(g, add, node.outputs[0])
                out_rank = max(target.out_rank, c.ndim)
                axis = target.axis + (out_rank - target.out_rank)
                n = s.numel() if s.numel() != 1 else fold_targets.out_channels(rd.kind, tuple(w.shape), rd.groups)
                ss, tt = (s, t) if s.numel() == n else (s.expand(n), t.expand(n))
                nw, nb = fold_targets.fold(rd.row, "after", w, b, ss, torch.zeros_like(tt), groups=rd.groups)
                shape = [n if i == axis else 1 for i in range(out_rank)]
                full = [1] * (out_rank - c.ndim) + list(c.shape)
                cv = _t(np.broadcast_to(c.reshape(full), shape).reshape(-1).astype(np.float64))
                keep = max(c.ndim, out_rank - axis)  # the constant's own rank, or enough to reach the axis
                new_c = (ss * cv + tt).numpy().astype(c.dtype).reshape(shape[out_rank - keep:])
                _store(g, graph, node, rd, nw, nb if b is not None else None, names)
                _set_const(g, graph, add, ci, np.ascontiguousarray(new_c), names, f"{node.name or 'bias'}.bias")
            else:
                nw, nb = fold_targets.fold(rd.row, "after", w, b, s, t, groups=rd.groups)
                _store(g, graph, node, rd, nw, nb if rd.bias is not None else None, names)
                if rd.bias is None:
                    _insert_bias(g, graph, node, nb.numpy(), names)
        else:
            nw, nb = fold_targets.fold(rd.row, "before", w, b if rd.bias is not None else None, s, t,
                                       groups=rd.groups, channels=channels)
            _store(g, graph, node, rd, nw, nb if rd.bias is not None else None, names)
            if rd.bias is None:
                add, ci = _bias_after(g, node, target.out_rank, fold_targets.out_channels(rd.kind, tuple(w.shape)))
                if add is not None:
                    c = np.asarray(g.const(add.inputs[ci]))
                    new_c = (c.astype(np.float64) + nb.double().numpy()).astype(c.dtype)
                    _set_const(g, graph, add, ci, np.ascontiguousarray(new_c), names, f"{node.name or 'bias'}.bias")
                else:
                    _insert_bias(g, graph, node, nb.numpy(), names)
    _remove_bn(graph, bn)


def _remove_bn(graph, bn) -> None:
    x, y = bn.inputs[0], bn.outputs[0]
    params = list(bn.inputs[1:])
    if y.is_graph_output():
        name = y.name
        # a graph output needs a type; an exporter may have written none for the intermediate value
        x.type = x.type if x.type is not None else y.type
        x.shape = x.shape if x.shape is not None else y.shape
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        x.name = name
    else:
        y.replace_all_uses_with(x)
        graph.remove(bn, safe=True)
    for p in params:
        _drop_if_dead(graph, p)

