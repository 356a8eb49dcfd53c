"""The one vocabulary of ops that only move data, and where a channel axis goes through them.

Every pass that follows a tensor through the graph (fold, find, FFN matching) reads these sets;
none keeps a list of its own. Axis tracking is exact: it reads each op's arguments and the shapes
the capture recorded, never guesses from sizes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .node import GNode

# Ops whose output is a row-major re-view of their input: the output shape says it all.
RESHAPE = frozenset({"view", "reshape", "_unsafe_view", "reshape_as", "view_as", "flatten", "unflatten",
                     "squeeze", "unsqueeze", "view_copy", "squeeze_copy", "unsqueeze_copy"})
PERMUTE = frozenset({"permute", "permute_copy"})
TRANSPOSE = frozenset({"transpose", "swapaxes", "swapdims", "transpose_copy", "t"})
IDENTITY = frozenset({"contiguous", "clone", "alias", "detach", "identity", "lift_fresh_copy"})
DROPOUT = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                     "dropout1d", "dropout2d", "dropout3d"})
SLICE = frozenset({"slice", "select"})
# Padding that copies existing values (per channel), unlike constant padding: commutes with a BN.
COPY_PAD_MODES = frozenset({"reflect", "replicate", "circular"})
COPY_PAD = frozenset({"reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
                      "replication_pad2d", "replication_pad3d", "_pad_circular"})
CASTS = frozenset({"to", "_to_copy", "float", "type_as", "half", "bfloat16", "double"})
# Users that read only a tensor's shape/dtype/device (any argument).
SHAPE_ONLY = frozenset({"size", "sym_size", "dim", "numel", "sym_numel", "stride", "sym_stride", "getattr",
                        "empty_like", "zeros_like", "ones_like", "new_empty", "new_zeros", "new_ones"})
# Users that read only the shape/dtype of their *second* argument.
SHAPE_OF_SECOND = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})

# Max-pooling commutes with a per-channel affine map whose scale is >= 0 on every channel
# (max(s·x + t) = s·max(x) + t): a fold may follow a BN through it once the signs are checked
# (``passes.fold_targets.commute_reason``). Not data movement: nothing else may look through it.
MAX_POOL = frozenset({"max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
                      "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d",
                      "adaptive_max_pool2d", "adaptive_max_pool3d"})
MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.AdaptiveMaxPool3d)

# Every op that rearranges (or passes through) a tensor without computing on its values; the
# channel axis can be followed through each by ``map_axis``.
LAYOUT = RESHAPE | PERMUTE | TRANSPOSE | IDENTITY
# LAYOUT plus eval-mode dropout: what find follows to a norm's producer and consumers.
DATA_MOVEMENT = LAYOUT | DROPOUT

ACTIVATIONS = frozenset({
    "gelu", "relu", "silu", "sigmoid", "tanh", "erf", "mish", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "softplus", "relu6", "hardtanh", "prelu", "rrelu", "glu", "gelu_", "relu_",
    "silu_", "hardswish_", "hardtanh_", "elu_", "leaky_relu_", "sigmoid_", "tanh_", "threshold",
})
NONLINEAR = ACTIVATIONS | {"softmax", "log_softmax"}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                      nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softmax,
                      nn.LogSoftmax, nn.PReLU, nn.GLU, nn.Threshold)

# Every form a batch norm takes in an export graph (``batch_norm``; after ``run_decompositions()``,
# ``_native_batch_norm_legit_no_training``, ...) and whether the form fixes the mode (True: training,
# False: inference, None: read its ``training`` argument).
BATCH_NORM_FORMS: dict[str, bool | None] = {
    "batch_norm": None, "native_batch_norm": None, "_native_batch_norm_legit": None,
    "_native_batch_norm_legit_no_training": False, "_batch_norm_no_update": False,
    "_native_batch_norm_legit_functional": True, "_batch_norm_with_update": True,
    "_batch_norm_with_update_functional": True, "cudnn_batch_norm": None, "miopen_batch_norm": None,
}

# batch_norm argument orders: aten (and torch.batch_norm) vs torch.nn.functional.batch_norm.
_BN_ATEN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_BN_FUNCTIONAL_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_args(node: GNode) -> dict[str, Any] | None:
    """The arguments of a batch-norm node by name: every aten form by its schema (export graphs),
    ``torch.batch_norm`` in the aten order and ``F.batch_norm`` (FX graphs: ``running_mean`` second).
    None where the node is not a call whose argument order is known (e.g. an FX leaf module)."""
    target = node.target
    if node.leaf_module:
        return None
    if target is F.batch_norm:
        names = _BN_FUNCTIONAL_ARGS
    elif isinstance(target, torch._ops.OpOverload):  # every form: its schema names the arguments
        names = tuple(a.name for a in target._schema.arguments)
    elif target is torch.batch_norm or isinstance(target, torch._ops.OpOverloadPacket):
        names = _BN_ATEN_ARGS
    else:
        return None
    out = dict(zip(names, node.args))
    out.update((k, v) for k, v in node.kwargs.items() if k in names)
    if target is F.batch_norm:  # F.batch_norm's defaults, so a missing keyword reads as what ran
        for k, v in (("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)):
            out.setdefault(k, v)
    return out


def ints(x: Any) -> list[int] | None:
    if isinstance(x, int):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(v, int) for v in x):
        return list(x)
    return None


def shape_only_use(user: GNode, node: GNode) -> bool:
    """``user`` reads only the shape/dtype of ``node``, not its values."""
    if user.op in SHAPE_ONLY:
        return True
    if user.op in SHAPE_OF_SECOND:
        return bool(user.args) and user.args[0] is not node
    return False


def data_users(node: GNode) -> list[GNode]:
    return [u for u in node.users if not shape_only_use(u, node)]


def is_nonlinear(node: GNode) -> bool:
    return node.op in NONLINEAR or (node.leaf_module and isinstance(node.target, ACTIVATION_MODULES))


def dropout_is_identity(node: GNode, module: nn.Module | None) -> bool:
    """A dropout op (or leaf module) that passes its input through unchanged."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return not module.training or module.p == 0
    if node.leaf_module:
        return False
    p = node.arg(1, "p", 0.5)
    train = node.arg(2, "train", node.kwargs.get("training", True))
    return train is False or p == 0


def is_data_movement(node: GNode, module: nn.Module | None = None) -> bool:
    """``node`` only moves its first input's values (``module``: the module that ran it, for dropout)."""
    op = node.op
    if not (node.args and isinstance(node.args[0], GNode)):
        return False
    if op in LAYOUT or op in SLICE or _same_shape_expand(node):
        return True
    if op in DROPOUT:
        return dropout_is_identity(node, module)
    if op == "pad" or op in COPY_PAD:
        return ints(node.arg(1, "pad")) is not None and (op != "pad" or node.arg(2, "mode", "constant") in COPY_PAD_MODES)
    return False


def _pooled_dims(node: GNode) -> int:
    """How many trailing dims a max-pool op pools (``max_pool2d``: 2)."""
    if node.leaf_module:
        return {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2,
                nn.AdaptiveMaxPool3d: 3}[type(node.target)]
    return int(next(c for c in node.op if c.isdigit()))


def commutes_with_positive_affine(node: GNode) -> bool:
    """``node`` is a max-pool (or the values output of one that returns indices too): it commutes with a
    per-channel ``s·x + t`` where ``s >= 0`` on every channel, when the channel axis is not pooled."""
    if not (node.args and isinstance(node.args[0], GNode)):
        return False
    if node.op == "getitem":
        return node.args[1] == 0 and commutes_with_positive_affine(node.args[0])
    if node.leaf_module:
        return isinstance(node.target, MAX_POOL_MODULES) and not node.target.return_indices
    return node.op in MAX_POOL


def _same_shape_expand(node: GNode) -> bool:
    src = node.args[0]
    return node.op == "expand" and src.shape is not None and node.shape is not None and \
        tuple(src.shape) == tuple(node.shape)


def map_axis_through_reshape(in_shape: Iterable[int], out_shape: Iterable[int], axis: int) -> int | None:
    """Where input axis ``axis`` lands after a row-major reshape, or None if it is merged or split.

    Output axis ``a`` (size n, trailing product P) is input axis ``j`` iff ``in_shape[j] == n`` and
    ``prod(in_shape[j+1:]) == P``: then the index along both axes is ``(flat // P) % n``.
    """
    ins, outs = [int(v) for v in in_shape], [int(v) for v in out_shape]
    n, trailing = ins[axis], math.prod(ins[axis + 1:])
    for a, m in enumerate(outs):
        if m == n and math.prod(outs[a + 1:]) == trailing:
            return a
    return None


def map_axis(node: GNode, axis: int) -> tuple[int | None, str | None]:
    """The channel axis after ``node`` (a data-movement op) given the axis in its input, or
    (None, why) when the op merges, splits, drops or pads it."""
    src = node.args[0]
    in_shape, out_shape = src.shape, node.shape
    if commutes_with_positive_affine(node):
        if node.op == "getitem":  # the values of a max-pool that also returns indices
            return axis, None
        if in_shape is None:
            return None, f"no shape information at {node.op} (the captured graph has no shapes)"
        if axis >= len(in_shape) - _pooled_dims(node):
            return None, f"{node.op} pools the channel axis"
        return axis, None
    if in_shape is None or (out_shape is None and node.op not in IDENTITY | DROPOUT):
        return None, f"no shape information at {node.op} (the captured graph has no shapes)"
    ndim = len(in_shape)
    op = node.op
    if op in IDENTITY or op in DROPOUT or (op == "expand" and _same_shape_expand(node)):
        return axis, None

    if op in RESHAPE:
        a = map_axis_through_reshape(in_shape, out_shape, axis)
        return (a, None) if a is not None else (None, f"{op} to {tuple(out_shape)} merges or splits the channel "
                                                f"axis {axis} of {tuple(in_shape)}")
    if op in PERMUTE:
        dims = ints(node.arg(1, "dims"))
        if dims is None or len(dims) != ndim:
            return None, f"cannot read the dims of {op}"
        return [d % ndim for d in dims].index(axis), None
    if op in TRANSPOSE:
        if op == "t":
            a, b = (0, 1) if ndim == 2 else (0, 0)
        else:
            a, b = node.arg(1, "dim0"), node.arg(2, "dim1")
            if not isinstance(a, int) or not isinstance(b, int):
                return None, f"cannot read the dims of {op}"
            a, b = a % ndim, b % ndim
        return (b if axis == a else a if axis == b else axis), None
    if op == "slice":
        dim = node.arg(1, "dim", 0)
        if not isinstance(dim, int):
            return None, "cannot read the dim of slice"
        if dim % ndim == axis and tuple(out_shape) != tuple(in_shape):
            return None, "slice drops channels"
        return axis, None
    if op == "pad" or op in COPY_PAD:
        padded = len(ints(node.arg(1, "pad"))) // 2  # pads the last `padded` dims
        if axis >= ndim - padded:
            return None, f"{op} pads the channel axis"
        return axis, None
    if op == "select":
        dim = node.arg(1, "dim")
        if not isinstance(dim, int):
            return None, "cannot read the dim of select"
        dim %= ndim
        if dim == axis:
            return None, "select picks a single channel"
        return (axis - 1 if dim < axis else axis), None
    return None, f"{op} is not a data-movement op"


def track_axis(chain: list[GNode], axis: int) -> tuple[int | None, str | None]:
    """``map_axis`` through a chain of data-movement nodes, in dataflow order."""
    for node in chain:
        axis, why = map_axis(node, axis)
        if axis is None:
            return None, why
    return axis, None


@dataclass(frozen=True)
class Channels:
    """Where ``n`` channels lie along one axis: index ``i`` of ``axis`` holds channel ``(i // stride) % n``.

    ``stride == 1`` on an axis of size ``n``: the axis *is* the channel axis. A reshape that merges
    the channel axis with the axes after it gives ``stride`` = their product (``flatten(1)`` of
    (N, C, H, W): feature ``j`` of the (N, C·H·W) result is channel ``j // (H·W)``); merged with axes
    before it, the pattern repeats every ``n · stride``. Either way each index along ``axis`` has one
    known channel, which is all a consumer fold needs.
    """

    axis: int
    stride: int = 1


def map_channels_through_reshape(in_shape: Iterable[int], out_shape: Iterable[int], ch: Channels, n: int
                                 ) -> Channels | None:
    """``ch`` (of ``n`` channels) after a row-major reshape, or None where the channel of an element
    is no longer a function of its index along one output axis (the channel axis is split).

    The flat row-major index ``f`` of an element holds channel ``(f // period) % n`` with
    ``period = stride · prod(in_shape[axis+1:])`` (true while the axis size is a multiple of
    ``n · stride``, which every state built here keeps). Output axis ``a`` (size ``m``, trailing
    product ``P``) carries it alone iff ``P`` divides ``period`` (later axes never change the channel)
    and ``m · P`` is a multiple of ``n · period`` (earlier axes skip whole channel cycles); then the
    channel of index ``i`` is ``(i // (period / P)) % n``. At most one axis qualifies when ``n > 1``.
    """
    ins, outs = [int(v) for v in in_shape], [int(v) for v in out_shape]
    period = ch.stride * math.prod(ins[ch.axis + 1:])
    for a, m in enumerate(outs):
        trailing = math.prod(outs[a + 1:])
        if period % trailing == 0 and (m * trailing) % (n * period) == 0:
            return Channels(a, period // trailing)
    return None


def map_channels(node: GNode, ch: Channels, n: int) -> tuple[Channels | None, str | None]:
    """``map_axis`` for a channel layout that may be merged with other axes (see ``Channels``)."""
    if node.op in RESHAPE:
        src = node.args[0]
        if src.shape is None or node.shape is None:
            return None, f"no shape information at {node.op} (the captured graph has no shapes)"
        out = map_channels_through_reshape(src.shape, node.shape, ch, n)
        if out is None:
            return None, (f"{node.op} to {tuple(node.shape)} splits the channel axis {ch.axis} of "
                          f"{tuple(src.shape)}" if ch.stride != 1 else
                          f"{node.op} to {tuple(node.shape)} merges or splits the channel axis {ch.axis} of "
                          f"{tuple(src.shape)}")
        return out, None
    if ch.stride != 1 and node.op in SLICE | COPY_PAD | {"pad"}:
        axis, why = map_axis(node, ch.axis)
        src = node.args[0]
        if axis is None or (node.op == "slice" and node.arg(1, "dim", 0) % len(src.shape) == ch.axis):
            return None, why or f"{node.op} cuts the merged channel axis"
        return Channels(axis, ch.stride), None
    axis, why = map_axis(node, ch.axis)
    return (Channels(axis, ch.stride), None) if axis is not None else (None, why)


def track_channels(chain: list[GNode], ch: Channels, n: int) -> tuple[Channels | None, str | None]:
    """``map_channels`` through a chain of data-movement nodes, in dataflow order."""
    for node in chain:
        ch, why = map_channels(node, ch, n)
        if ch is None:
            return None, why
    return ch, None


def apply_move(node: GNode, t: torch.Tensor) -> torch.Tensor:
    """Run a data-movement op on a stand-in tensor (to check that a module's forward is the identity)."""
    op = node.op
    if op in IDENTITY or op in DROPOUT or op == "batch_norm":
        return t
    if op in RESHAPE:
        return t.reshape(node.shape)
    if op in PERMUTE:
        return t.permute(ints(node.arg(1, "dims")))
    if op == "t":
        return t.t() if t.dim() == 2 else t
    if op in TRANSPOSE:
        return t.transpose(node.arg(1, "dim0"), node.arg(2, "dim1"))
    if op == "slice":
        dim = node.arg(1, "dim", 0) % t.dim()
        sl = slice(node.arg(2, "start"), node.arg(3, "end"), node.arg(4, "step", 1))
        return t[(slice(None),) * dim + (sl,)]
    if op == "select":
        return t.select(node.arg(1, "dim"), node.arg(2, "index"))
    if op == "pad" or op in COPY_PAD:
        mode = node.arg(2, "mode", "constant") if op == "pad" else (
            "reflect" if op.startswith("reflection") else "replicate" if op.startswith("replication") else "circular")
        return F.pad(t.double(), ints(node.arg(1, "pad")), mode=mode).long()
    raise ValueError(op)
