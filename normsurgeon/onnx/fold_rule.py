"""The BatchNorm fold rule on an ONNX graph (match, check, rewrite), edited through ``onnx_ir``.

- **match** (read-only, on ``graph.OnnxGraph``): for every ``BatchNormalization``, walk *backwards*
  through data-movement ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity, Dropout) and
  an optional bias ``Add`` to a producer (Conv, ConvTranspose, Gemm, MatMul with a constant weight),
  and *forwards* to consumers (Gemm, MatMul, Conv that reads no padding, also behind a Flatten).
  The channel axis is followed through every op on symbolic shapes (``graph``): never guessed from
  sizes. Every refusal carries the reason: a value also read elsewhere (shared producer), a weight
  read by other nodes (shared initializer), a padded conv, a nonlinearity between, an axis that
  cannot be proved.
- **rewrite**: new weights from ``fold_math`` (float64, cast back to the weight's dtype), written
  where the weight lives (an initializer stays an initializer under its name, a ``Constant`` node
  keeps being one; a weight computed from constants, such as ``Transpose(W)``, becomes a new
  initializer); a MatMul without a bias gets ``Add(bias)`` after it (ONNX Runtime fuses MatMul+Add);
  the BN node is removed and what only it read goes with it.

Sites refer to nodes by their index in the graph's node list, so the driver (``onnx.fold``) can apply
any subset of them to a fresh copy of the model (rollback without undo logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import fold_math
from .graph import (DATA_MOVEMENT, IDENTITY_OPS, NONLINEAR, OnnxGraph, map_axis_through_reshape,
                    map_channels_through_reshape, numel, shape_text)

__all__ = ["OnnxSite", "OnnxTarget", "match", "rewrite", "node_label", "TARGETS"]

#: The fold targets of an ONNX graph, one row each: the fold_math kind of its weight layout (see
#: ``fold_math.fold_bn_into``), which input is the weight and which the bias, the axis of its output
#: that holds its output channels and the axis of its input that holds its input channels (None:
#: the last), and whether a BN before it folds exactly.
TARGETS: dict[str, dict] = {
    "Conv": {"kind": "conv", "weight": 1, "bias": 2, "out_axis": 1, "in_axis": 1, "before": True},
    "ConvTranspose": {"kind": "conv_transpose", "weight": 1, "bias": 2, "out_axis": 1, "in_axis": 1,
                      "before": False},
    "Gemm": {"kind": "linear", "weight": 1, "bias": 2, "out_axis": 1, "in_axis": 1, "before": True},
    "MatMul": {"kind": "linear_t", "weight": 1, "bias": None, "out_axis": -1, "in_axis": -1, "before": True},
}


@dataclass
class OnnxTarget:
    """One weighted node a BN folds into."""

    index: int  # in the node list
    label: str
    op: str
    chain: list[str] = field(default_factory=list)  # data-movement ops between, in dataflow order
    bias_add: int | None = None  # "after": the index of an Add(constant) between producer and BN
    out_rank: int = 2  # rank of the node's output
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
        if seen.is_graph_input():
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


def _map_forward(g: OnnxGraph, node, axis: int, stride: int, n: int) -> tuple[int | None, int, str | None]:
    """(axis, stride) of n channels after data-movement ``node``, or (None, _, why)."""
    x, y = g.shape(node.inputs[0]), g.shape(node.outputs[0])
    op = node.op_type
    if op in IDENTITY_OPS:
        return axis, stride, None
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

def _match_after(g: OnnxGraph, bn, index: dict[int, int], C: int) -> tuple[OnnxTarget | None, str]:
    x = bn.inputs[0]
    chain: list = []
    bias_add = None
    while True:
        why = _single_reader(g, x, f"the value {x.name!r} between the producer and the BN")
        p = x.producer()
        if p is None:
            return None, "its input is a graph input, not the output of a Conv/Gemm/MatMul"
        if why and p.op_type in TARGETS:
            return None, f"producer {node_label(p, index[id(p)])} output is also read elsewhere: {why}"
        if why:
            return None, why
        if p.op_type in TARGETS and p.domain in ("", "ai.onnx"):
            break
        if p.op_type in DATA_MOVEMENT and p.domain in ("", "ai.onnx"):
            chain.insert(0, p)
            x = p.inputs[0]
            continue
        if p.op_type == "Add" and bias_add is None:
            c, ci = _const_bias(g, p, None)
            src = p.inputs[1 - ci] if ci >= 0 else None
            if src is not None and src.producer() is not None and src.producer().op_type in TARGETS:
                bias_add = p
                x = src
                continue
        if p.op_type in NONLINEAR:
            return None, f"a nonlinearity ({p.op_type}) sits between the producer and the BN"
        return None, f"its input comes from {p.op_type} ({node_label(p, index[id(p)])}), not from a Conv/Gemm/MatMul"
    label = node_label(p, index[id(p)])
    row = TARGETS[p.op_type]
    why = _weight_problem(g, p, label, row["weight"])
    if why:
        return None, why
    if row["bias"] is not None:
        why = _weight_problem(g, p, label, row["bias"], "bias")
        if why:
            return None, why
    out = p.outputs[0]
    rank = g.rank(out)
    if rank is None:
        return None, f"the shape of {label}'s output is unknown"
    axis = row["out_axis"] % rank
    if p.op_type == "MatMul":
        wr = g.rank(p.inputs[1])
        if g.const(p.inputs[0]) is not None or wr != 2:
            return None, f"{label} is not x @ W with a constant 2-D W"
    if p.op_type == "Gemm":
        if _attr(p, "transA", 0):
            return None, f"{label} transposes its input (transA=1): its output channels are its weight's"
        c = g.const(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
        n_out = g.shape(out)[1]
        if c is not None and n_out is not None and not _per_channel(c, 2, 1, n_out[0]):
            return None, f"{label}'s bias C has shape {list(c.shape)}: not one value per output channel"
    if p.op_type in ("Conv", "ConvTranspose") and len(p.outputs) != 1:
        return None, f"{label} has several outputs"
    n_out = g.shape(out)[axis]
    if n_out != (C, ()):
        return None, f"{label} has {n_out[0] if n_out else '?'} output channels, the BN {C}"
    steps = ([bias_add] if bias_add is not None else []) + chain
    a, stride, why = _track(g, chain, axis, C)
    if why:
        return None, f"between {label} and the BN: {why}"
    if a != 1 or stride != 1:
        return None, f"the BN normalizes axis 1 but {label}'s channels arrive on axis {a}"
    if bias_add is not None:
        c, _ = _const_bias(g, bias_add, None)
        why = _weight_problem(g, bias_add, f"the bias Add after {label}", [i for i, v in enumerate(bias_add.inputs)
                                                                            if g.const(v) is not None][0], "bias")
        if why:
            return None, why
        if not _per_channel(c, rank, axis, C):
            return None, f"the Add after {label} adds a constant of shape {list(c.shape)}: not one value per channel"
    return OnnxTarget(index[id(p)], label, p.op_type, [n.op_type for n in steps],
                      bias_add=index[id(bias_add)] if bias_add is not None else None, out_rank=rank), ""


# --- before: consumer(BN(x)) -----------------------------------------------------------------------

def _match_before(g: OnnxGraph, bn, index: dict[int, int], C: int) -> tuple[list[OnnxTarget] | None, str]:
    y = bn.outputs[0]
    if y.is_graph_output():
        return None, "its output is a graph output"
    targets: list[OnnxTarget] = []
    for user in g.users(y):
        chain: list = []
        node = user
        while node.op_type in DATA_MOVEMENT and node.domain in ("", "ai.onnx"):
            chain.append(node)
            why = _single_reader(g, node.outputs[0], f"the output of {node.op_type} after the BN")
            if why:
                return None, why
            node = g.users(node.outputs[0])[0]
        label = node_label(node, index[id(node)])
        row = TARGETS.get(node.op_type)
        if node.op_type in NONLINEAR:
            return None, f"its output feeds a nonlinearity ({node.op_type})"
        if row is None or node.domain not in ("", "ai.onnx"):
            return None, f"its output feeds {node.op_type} ({label}), not only Gemm/MatMul/Conv"
        if not row["before"]:
            return None, f"consumer {label} is a {node.op_type}: a BN shift before it does not fold exactly"
        fed = chain[-1].outputs[0] if chain else y
        if node.inputs[0] is not fed or any(v is fed for v in node.inputs[1:]):
            return None, f"consumer {label} reads the BN as its weight, not as its input"
        why = _weight_problem(g, node, label, row["weight"])
        if why:
            return None, why
        if row["bias"] is not None:
            why = _weight_problem(g, node, label, row["bias"], "bias")
            if why:
                return None, why
        if node.op_type == "MatMul" and g.rank(node.inputs[1]) != 2:
            return None, f"{label} is not x @ W with a constant 2-D W"
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return None, f"consumer {label} transposes its input (transA=1)"
        if node.op_type == "Conv":
            pads = _attr(node, "pads") or []
            auto = _attr(node, "auto_pad", "NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
                return None, (f"consumer {label} zero-pads its input (pads={list(pads)}, auto_pad={auto}): the BN "
                              "shift would not reach the padded border")
        x_shape = g.shape(fed)
        if x_shape is None:
            return None, f"the shape of {label}'s input is unknown"
        want = row["in_axis"] % len(x_shape)
        a, stride, why = _track(g, chain, 1, C)
        if why:
            return None, f"between the BN and {label}: {why}"
        if a != want:
            return None, f"the BN's channels arrive on axis {a} of {label}'s input, which reads channels on axis {want}"
        n_in = x_shape[want]
        if n_in is None or n_in[1] or n_in[0] % (C * stride):
            return None, f"{label}'s input channels ({n_in[0] if n_in else '?'}) are not whole blocks of the BN's {C}"
        targets.append(OnnxTarget(index[id(node)], label, node.op_type, [n.op_type for n in chain], stride=stride,
                                  out_rank=g.rank(node.outputs[0]) or len(x_shape)))
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
        why = bn_problem(g, bn)
        if why:
            out.append((label, i, None, why))
            continue
        C = int(np.asarray(g.const(bn.inputs[3])).size)
        target, why_after = _match_after(g, bn, index, C)
        if target is not None:
            out.append((label, i, OnnxSite(i, label, "after", [target]), None))
            continue
        targets, why_before = _match_before(g, bn, index, C)
        if targets is not None:
            out.append((label, i, OnnxSite(i, label, "before", targets), None))
            continue
        out.append((label, i, None, f"after: {why_after}; before: {why_before}"))
    return out


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
    name = names.fresh(base)
    new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                   const_value=ir.tensor(array, name=name))
    graph.register_initializer(new)
    old = v
    if idx < len(node.inputs):
        node.replace_input_with(idx, new)
    else:
        node.resize_inputs(idx + 1)
        node.replace_input_with(idx, new)
    if old is not None:
        _drop_if_dead(graph, old)


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

    out = node.outputs[0]
    name = names.fresh(f"{out.name or 'matmul'}.bias")
    b = ir.Value(name=name, shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)),
                 const_value=ir.tensor(bias, name=name))
    graph.register_initializer(b)
    add = ir.Node("", "Add", [out, b], name=names.fresh(f"{node.name or 'MatMul'}/bias_add"))
    add.outputs[0].name = names.fresh(f"{out.name or 'matmul'}_biased")
    add.outputs[0].shape = out.shape
    add.outputs[0].type = out.type
    for use in list(out.uses()):
        user = use[0] if isinstance(use, tuple) else use.node
        idx = use[1] if isinstance(use, tuple) else use.idx
        if user is not add:
            user.replace_input_with(idx, add.outputs[0])
    graph.insert_after(node, add)


def _weight_io(g: OnnxGraph, node) -> tuple[np.ndarray, np.ndarray | None]:
    """(weight in fold_math's layout, bias or None) of a target node, alpha/beta applied for Gemm."""
    row = TARGETS[node.op_type]
    w = np.asarray(g.const(node.inputs[row["weight"]]))
    b = None
    if row["bias"] is not None and len(node.inputs) > row["bias"] and node.inputs[row["bias"]] is not None:
        b = np.asarray(g.const(node.inputs[row["bias"]]))
    if node.op_type == "Gemm":
        w = (w if _attr(node, "transB", 0) else w.T) * np.asarray(_attr(node, "alpha", 1.0), w.dtype)
        if b is not None:
            b = np.broadcast_to(b * np.asarray(_attr(node, "beta", 1.0), b.dtype), (w.shape[0],)).copy()
    return w, b


def _store(g: OnnxGraph, graph, node, w: np.ndarray, b: np.ndarray | None, names: _Names) -> None:
    import onnx_ir as ir

    row = TARGETS[node.op_type]
    base = node.name or node.op_type
    if node.op_type == "Gemm":
        w = w if _attr(node, "transB", 0) else w.T
        for k, v in (("alpha", 1.0), ("beta", 1.0)):
            if _attr(node, k, 1.0) != 1.0:
                node.attributes[k] = ir.AttrFloat32(k, v)
    old_w = node.inputs[row["weight"]]
    _set_const(g, graph, node, row["weight"], np.ascontiguousarray(w),
               names, f"{old_w.name if old_w is not None and old_w.name else base}.folded")
    if b is not None and row["bias"] is not None:
        _set_const(g, graph, node, row["bias"], b, names, f"{base}.bias")


def _fold(kind: str, position: str, w, b, s, t, groups: int) -> tuple[np.ndarray, np.ndarray]:
    nw, nb = fold_math.fold_bn_into(kind, position, _t(w), None if b is None else _t(b), s, t, groups=groups)
    return nw.numpy(), nb.numpy()


def rewrite(site: OnnxSite, g: OnnxGraph, nodes: list) -> None:
    """Apply ``site`` to the model ``g`` views (``nodes``: its node list when the sites were matched)."""
    graph = g.graph
    names = _Names(graph)
    bn = nodes[site.index]
    s, t = bn_scale_shift(g, bn)
    for target in site.targets:
        node = nodes[target.index]
        kind = TARGETS[node.op_type]["kind"]
        groups = int(_attr(node, "group", 1))
        w, b = _weight_io(g, node)
        if site.position == "after":
            add = nodes[target.bias_add] if target.bias_add is not None else None
            if add is None and node.op_type == "MatMul":
                add, _ = _bias_after(g, node, target.out_rank, w.shape[1])
            if add is not None:
                c, ci = _const_bias(g, add, node.outputs[0])
                out_rank = max(target.out_rank, c.ndim)
                axis = TARGETS[node.op_type]["out_axis"] % target.out_rank + (out_rank - target.out_rank)
                full = [1] * (out_rank - c.ndim) + list(c.shape)
                cv = _t(np.broadcast_to(c.reshape(full), [s.numel() if i == axis else 1 for i in range(out_rank)])
                        .reshape(-1).astype(np.float64))
                nw, nb = _fold(kind, "after", w, b, s, torch.zeros_like(t), groups)
                shape = [1] * out_rank
                shape[axis] = s.numel()
                keep = max(c.ndim, out_rank - axis)  # the constant's own rank, or enough to reach the axis
                new_c = (s * cv + t).to(dtype=_t(c).dtype).numpy().reshape(shape[out_rank - keep:])
                _store(g, graph, node, nw, nb if b is not None else None, names)
                _set_const(g, graph, add, ci, np.ascontiguousarray(new_c), names, f"{node.name or 'bias'}.bias")
            else:
                nw, nb = _fold(kind, "after", w, b, s, t, groups)
                if TARGETS[node.op_type]["bias"] is None:
                    _store(g, graph, node, nw, None, names)
                    _insert_bias(g, graph, node, nb, names)
                else:
                    _store(g, graph, node, nw, nb, names)
        else:
            C = s.numel()
            in_axis = TARGETS[node.op_type]["in_axis"]
            n_in = w.shape[1 if kind in ("linear", "conv") else 0] * (groups if kind == "conv" else 1)
            if kind == "linear_t":
                n_in = w.shape[0]
            ss = fold_math.expand_channels(s, target.stride, n_in) if (n_in != C or target.stride != 1) else s
            tt = fold_math.expand_channels(t, target.stride, n_in) if (n_in != C or target.stride != 1) else t
            del in_axis
            if node.op_type == "MatMul":
                add, ci = _bias_after(g, node, target.out_rank, w.shape[1])
                nw, nb = _fold(kind, "before", w, None, ss, tt, groups)
                _store(g, graph, node, nw, None, names)
                if add is not None:
                    c = np.asarray(g.const(add.inputs[ci]))
                    new_c = (c.astype(np.float64) + nb.astype(np.float64)).astype(c.dtype)
                    _set_const(g, graph, add, ci, np.ascontiguousarray(new_c), names, f"{node.name or 'bias'}.bias")
                else:
                    _insert_bias(g, graph, node, nb, names)
            else:
                nw, nb = _fold(kind, "before", w, b, ss, tt, groups)
                _store(g, graph, node, nw, nb, names)
    _remove_bn(graph, bn)


def _remove_bn(graph, bn) -> None:
    x, y = bn.inputs[0], bn.outputs[0]
    params = list(bn.inputs[1:])
    if y.is_graph_output():
        name = y.name
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        x.name = name
    else:
        y.replace_all_uses_with(x)
        graph.remove(bn, safe=True)
    for p in params:
        _drop_if_dead(graph, p)


_ = numel
