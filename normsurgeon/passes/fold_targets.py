"""The one table of fold targets, and the one matcher every fold editor reads.

An inference BatchNorm is a per-channel affine map ``y = s·x + t``. It folds into a weighted op next
to it: *after* a producer (``BN(P(x))``: scale the producer's output channels, ``b' = s·b + t``) or
*before* consumers (``C(BN(x))``: scale their input channels, the shift becomes ``b' = b + W·t``).
Three editors apply the same folds: the ``nn.Module`` editor (``passes.fold_bn``), the
``ExportedProgram`` editor (``passes.fold_bn_program``) and the ONNX editor (on onnx_ir). They share:

1. **The table** (``TABLE``: one ``FoldTarget`` row per target kind). Row fields:

   - ``name``: the row's name (``"conv2d"``, ``"linear"``, ``"mha_in_proj"``...).
   - ``kind``: the weight layout, which decides where channels sit in the weight tensor:
     ``linear`` ``(out, in)``; ``linear_t`` ``(in, out)`` (transformers' Conv1D, ``x @ W``, ONNX
     ``MatMul`` / ``Gemm`` with ``transB=0``); ``conv`` ``(out, in/groups, *k)``; ``conv_transpose``
     ``(in, out/groups, *k)`` (see ``fold_math``). ``out_channels``/``in_channels`` read them.
   - ``spatial``: spatial dims of a conv (0 for the linear kinds). The activation's channel axis is
     ``channel_axis(kind, spatial, shape)``: the last axis for the linear kinds, axis 1 (batched) for
     convs.
   - ``ops``: the graph-vocabulary op names (``graph.ops``: aten names without overload; FX leaf modules
     map to the same names) that run this target; ``onnx``: the ONNX op types that do.
   - ``module``: the class of the ``nn.Module`` that owns the weight in a user's model (the module
     editor refuses a functional call without such an owner); ``None``: the form exists only in
     programs/ONNX graphs (a decomposed linear, ``x @ W``). ``params``: the attribute names of weight
     and bias on that module (``in_proj_weight`` for ``nn.MultiheadAttention``'s packed projection).
   - ``after`` / ``before``: the names of the ``fold_math`` functions for a BN after / before this
     target (``None``: it never folds on that side, e.g. an MHA's in-projection has nothing after it
     that a BN could be); ``grouped``: they take ``groups=``.
   - ``before_needs``: what a before-fold needs to be exact: ``None`` (always), ``"no_zero_padding"``
     (a conv: a zero-padded border is not shifted by ``t``), ``"uniform_taps"`` (a ConvTranspose: every
     output position must receive every kernel tap, or the shift must be zero). ``before_reason``
     checks it from the conv's attributes.

   The flatten head (``flatten → Linear``) and fan-out to several readers (q, k and v after one BN) are
   not rows: they are channel mappings (``ops.Channels``: channels merged with the axes after them) and
   sites with several targets, which every row supports.

2. **The matcher** over the shared graph view (``graph.node.GNode``; op names from ``graph.ops``):
   ``match_after(bn)`` walks back from a batch-norm node through data-movement ops (and ops that commute
   with a positive per-channel affine map: max-pooling) to a producer, ``match_before(out)`` forwards
   to every consumer. Each returns ``Reach``es (the weighted node, what it reads: ``TargetRead``, and the
   chain of ops between) or the reason there is none. ``read`` recognizes a weighted op: ``read_torch``
   knows every torch form (``linear``, ``convNd``, ``conv_transposeNd``, ``convolution``, ``addmm``/``mm``/
   ``bmm`` over a transposed weight after ``run_decompositions()``, ``matmul``: ``x @ W`` and a Linear
   subclass's own ``x @ self.weight.T``); the ONNX editor passes its
   own reader returning the rows of ``Conv``/``ConvTranspose``/``Gemm``/``MatMul`` (``rows_for_onnx``).

3. **The checks** that need only the graph and the BN's numbers: ``producer_reason`` (the producer's
   output read elsewhere, its channel axis lost or moved, another channel count), ``consumer_channels``
   (where the BN's channels arrive in a consumer's input, merged channels included), ``before_reason``
   (padding, ConvTranspose taps), ``commute_reason`` (a max-pool between needs ``s ≥ 0`` on every
   channel).

4. **The math**: ``fold(row, position, weight, bias, scale, shift, groups=, channels=)``
   returns the new ``(weight, bias)`` in float64-exact ``fold_math``, cast back.

5. **One call per BN**: ``plan(bn, out, n_bn, scale, shift, moves=, read=, own=, name=)`` runs 2 and 3
   and returns the editor-neutral ``FoldSite``s (norm, position, targets, channel mapping per target)
   with a reason for each side that does not fold; ``own`` is the editor's check of a target, run
   first. The ``ExportedProgram`` editor is built on it and so can the ONNX editor be (a ``GNode``
   view of the onnx_ir graph with vocabulary op names, its own ``read`` for Conv/ConvTranspose/Gemm/
   MatMul filling ``TargetRead``'s conv attributes); the module editor composes the same functions
   with its module checks in between.

An editor then does only what is its own: who owns a weight (a module attribute, a program
placeholder, an ONNX initializer), whether it is shared or tied, how to write the new tensors and
remove the BN, and how to undo. Adding a fold target is one row here plus, if its math is new, one
``fold_math`` function (docs/ARCHITECTURE.md shows an example).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .. import fold_math
from ..graph import GNode, ops

__all__ = ["FoldTarget", "TABLE", "row", "rows_for_onnx", "TargetRead", "Reach", "FoldSite", "plan", "read_torch",
           "match_after", "match_before", "channel_axis", "out_channels", "in_channels", "producer_reason", "consumer_channels",
           "before_reason", "commute_reason", "reads_padding", "fold", "where"]


@dataclass(frozen=True)
class FoldTarget:
    """One row of the table: a kind of weighted op a BatchNorm folds into (see the module docstring)."""

    name: str
    kind: str  # linear | linear_t | conv | conv_transpose
    spatial: int
    ops: frozenset[str]
    module: type | str | None  # owner class in an nn.Module model ("transformers Conv1D": resolved late)
    after: str | None  # fold_math function for a BN after it
    before: str | None  # fold_math function for a BN before it
    grouped: bool = False
    before_needs: str | None = None  # None | "no_zero_padding" | "uniform_taps"
    params: tuple[str, str] = ("weight", "bias")
    onnx: frozenset[str] = frozenset()

    def owner_class(self) -> type | None:
        """The ``nn.Module`` class owning the weight (transformers' Conv1D only if transformers is loaded)."""
        if isinstance(self.module, str):
            mod = sys.modules.get("transformers.pytorch_utils")
            return getattr(mod, "Conv1D", None) if mod is not None else None
        return self.module


def _conv_rows(transposed: bool) -> list[FoldTarget]:
    out = []
    for n in (1, 2, 3):
        name = f"conv_transpose{n}d" if transposed else f"conv{n}d"
        cls = getattr(nn, f"ConvTranspose{n}d" if transposed else f"Conv{n}d")
        out.append(FoldTarget(
            name, "conv_transpose" if transposed else "conv", n, frozenset({name, "convolution"}), cls,
            after="fold_bn_after_conv_transpose" if transposed else "fold_bn_after_conv",
            before="fold_bn_before_conv_transpose" if transposed else "fold_bn_before_conv", grouped=True,
            before_needs="uniform_taps" if transposed else "no_zero_padding",
            onnx=frozenset({"ConvTranspose" if transposed else "Conv"})))
    return out


TABLE: tuple[FoldTarget, ...] = (
    FoldTarget("linear", "linear", 0, frozenset({"linear"}), nn.Linear, "fold_bn_after_linear", "fold_bn_before_linear",
               onnx=frozenset({"Gemm"})),  # Gemm with transB=1
    # a linear after run_decompositions(): addmm(b, x, W.t()), mm(x, W.t()), bmm(x, expand(W.t()))
    FoldTarget("linear_decomposed", "linear", 0, frozenset({"addmm", "mm", "bmm"}), None,
               "fold_bn_after_linear", "fold_bn_before_linear"),
    # x @ W.T (+ b): a Linear subclass computing its own forward (transformers' FalconLinear) records a
    # matmul over its transposed (out, in) weight, its bias an add after; the module editor proves the
    # module owns both (fold_bn._check_matmul_linear)
    FoldTarget("linear_matmul", "linear", 0, frozenset({"matmul"}), nn.Linear,
               "fold_bn_after_linear", "fold_bn_before_linear"),
    # transformers' Conv1D (GPT-2): addmm(b, x, W) with W (in, out)
    FoldTarget("hf_conv1d", "linear_t", 0, frozenset({"addmm"}), "transformers Conv1D",
               "fold_bn_after_transposed_linear", "fold_bn_before_transposed_linear"),
    # x @ W with a (in, out) weight: programs and ONNX (MatMul, Gemm with transB=0)
    FoldTarget("matmul", "linear_t", 0, frozenset({"matmul", "mm", "bmm"}), None,
               "fold_bn_after_transposed_linear", "fold_bn_before_transposed_linear",
               onnx=frozenset({"MatMul", "Gemm"})),
    *_conv_rows(False),
    *_conv_rows(True),
    # nn.MultiheadAttention reads its packed in-projection with F.linear (q = k = v: one BN before it)
    FoldTarget("mha_in_proj", "linear", 0, frozenset({"linear"}), nn.MultiheadAttention, None,
               "fold_bn_before_linear", params=("in_proj_weight", "in_proj_bias")),
    FoldTarget("mha_out_proj", "linear", 0, frozenset({"linear"}), nn.MultiheadAttention, "fold_bn_after_linear",
               None, params=("out_proj.weight", "out_proj.bias")),
)
_BY_NAME = {r.name: r for r in TABLE}


def row(name: str) -> FoldTarget:
    return _BY_NAME[name]


def rows_for_onnx(op_type: str) -> list[FoldTarget]:
    """The rows an ONNX op type can be (``Gemm``: ``linear`` with transB=1, ``matmul`` with transB=0)."""
    return [r for r in TABLE if op_type in r.onnx]


# --- weight layouts ------------------------------------------------------------------------------------

def out_channels(kind: str, weight_shape: tuple | None, groups: int = 1) -> int | None:
    if weight_shape is None:
        return None
    return {"linear": weight_shape[0], "linear_t": weight_shape[-1], "conv": weight_shape[0],
            "conv_transpose": weight_shape[1] * groups}[kind]


def in_channels(kind: str, weight_shape: tuple | None, groups: int = 1) -> int | None:
    if weight_shape is None:
        return None
    return {"linear": weight_shape[1], "linear_t": weight_shape[0], "conv": weight_shape[1] * groups,
            "conv_transpose": weight_shape[0]}[kind]


def channel_axis(kind: str, spatial: int, shape: tuple | None) -> int | None:
    """The channel axis of a target's input/output activation of ``shape``."""
    if shape is None:
        return None
    if kind in ("linear", "linear_t"):
        return len(shape) - 1
    return 1 if len(shape) == spatial + 2 else 0 if len(shape) == spatial + 1 else None


def fold(r: FoldTarget, position: str, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
         shift: torch.Tensor, *, groups: int = 1, channels: ops.Channels | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded ``(weight, bias)`` of target row ``r`` with the BN ``position``ed after/before it.

    ``scale``/``shift`` are the BN's per-channel map; where they do not match the target's channel count
    (a one-channel BN: a scalar; channels merged with the axes after them: ``channels.stride``) they are
    laid out along its channels first (``fold_math.expand_channels``)."""
    name = r.after if position == "after" else r.before
    if name is None:
        raise ValueError(f"a BN does not fold {position} a {r.name}")
    n = (out_channels if position == "after" else in_channels)(r.kind, tuple(weight.shape), groups)
    stride = channels.stride if channels is not None else 1
    if not (stride == 1 and scale.shape[0] == n):
        scale, shift = fold_math.expand_channels(scale, stride, n), fold_math.expand_channels(shift, stride, n)
    fn: Callable = getattr(fold_math, name)  # looked up per call: tests patch fold_math
    return fn(weight, bias, scale, shift, groups=groups) if r.grouped else fn(weight, bias, scale, shift)


# --- reading a weighted op ----------------------------------------------------------------------------

@dataclass
class TargetRead:
    """What a weighted node reads, whatever graph it is in. Conv attributes are None where the graph does
    not hold them (an FX leaf module: its editor reads the module)."""

    row: FoldTarget
    input: Any  # the activation node
    weight: Any  # the node holding the weight tensor (a "param" node), None for an FX leaf module
    bias: Any
    bias_index: int | None  # where the op takes its bias (None: it has none, e.g. mm, bmm)
    weight_chain: list[GNode] = field(default_factory=list)  # weight param → op (t, expand, view)
    groups: int | None = 1
    stride: Any = None
    padding: Any = None
    dilation: Any = None
    output_padding: Any = None

    @property
    def kind(self) -> str:
        return self.row.kind

    @property
    def spatial(self) -> int:
        return self.row.spatial

    def weight_shape(self) -> tuple | None:
        w = self.weight
        return tuple(w.shape) if isinstance(w, GNode) and w.shape is not None else None


_LEAF_ROWS = {"linear": "linear", **{f"conv{n}d": f"conv{n}d" for n in (1, 2, 3)},
              **{f"conv_transpose{n}d": f"conv_transpose{n}d" for n in (1, 2, 3)}}


def read_torch(node: GNode) -> TargetRead | None:
    """The row and operands of a torch weighted op (export, decomposed export or FX graph), or None."""
    op = node.op
    if node.leaf_module:
        name = _LEAF_ROWS.get(op)
        return TargetRead(row(name), node.args[0] if node.args else None, None, None, None, groups=None) if name else None
    if op == "linear":
        return TargetRead(row("linear"), node.arg(0, "input"), node.arg(1, "weight"), node.arg(2, "bias"), 2)
    if op.startswith("conv") and (op == "convolution" or op in _LEAF_ROWS):
        return _read_conv(node)
    if op in ("addmm", "mm", "bmm", "matmul"):
        if op == "addmm":
            x, w, b, bi = node.arg(1, "mat1"), node.arg(2, "mat2"), node.arg(0, "input"), 0
            if node.arg(3, "beta", 1) != 1 or node.arg(4, "alpha", 1) != 1:
                return None
        else:
            x, w, b, bi = node.arg(0, "self"), node.arg(1, "mat2" if op != "matmul" else "other"), None, None
        chain, base = _weight_chain(w, batched=op in ("bmm", "matmul"))
        if base is None:
            return None
        if any(n.op in _WEIGHT_T for n in chain):  # W.t(): a linear over its (out, in) weight
            return TargetRead(row("linear_matmul" if op == "matmul" else "linear_decomposed"), x, base, b, bi, chain)
        if op == "addmm":
            return TargetRead(row("hf_conv1d"), x, base, b, bi, chain)
        return TargetRead(row("matmul"), x, base, b, bi, chain)
    return None


# ``W.T`` / ``W.mT`` of a 2-D weight: a transpose (aten.numpy_T, mT; not data movement elsewhere)
_MATRIX_T = frozenset({"numpy_T", "mT"})
_WEIGHT_T = ops.PERMUTE | ops.TRANSPOSE | _MATRIX_T


def _weight_chain(w: Any, *, batched: bool) -> tuple[list[GNode], GNode | None]:
    """Walk from a matmul's second operand back to a 2-D weight: ``[view/expand of it] [t/permute]``.

    Returns (nodes from the weight to the operand, the weight node) or ([], None) when the operand is
    not one 2-D state tensor (transposed at most once; ``expand``/``view`` only add batch copies)."""
    chain: list[GNode] = []
    x = w
    while batched and isinstance(x, GNode) and x.op in ("expand", "view", "reshape", "_unsafe_view", "unsqueeze") \
            and x.args and isinstance(x.args[0], GNode) and _adds_batch_only(x):
        chain.append(x)
        x = x.args[0]
    if isinstance(x, GNode) and x.op in _WEIGHT_T and x.args and isinstance(x.args[0], GNode) \
            and x.args[0].op == "param" and x.shape is not None and len(x.shape) == 2 \
            and (x.op in _MATRIX_T or (ops.is_data_movement(x) and ops.map_axis(x, 0)[0] == 1)):
        chain.append(x)
        x = x.args[0]
    if isinstance(x, GNode) and x.op == "param" and x.shape is not None and len(x.shape) == 2:
        chain.reverse()
        return chain, x
    return [], None


def _adds_batch_only(node: GNode) -> bool:
    """``node`` keeps its input's last two dims and only adds/keeps leading ones (a weight broadcast over a batch)."""
    src = node.args[0]
    if src.shape is None or node.shape is None or len(src.shape) < 2:
        return False
    if tuple(src.shape) == tuple(node.shape):
        return True
    return tuple(node.shape[-2:]) == tuple(src.shape[-2:]) and all(d == 1 for d in src.shape[:-2])


def _read_conv(node: GNode) -> TargetRead | None:
    op = node.op
    w = node.arg(1, "weight")
    # convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups);
    # conv_transposeNd(x, w, b, stride, padding, output_padding, groups, dilation);
    # convNd(x, w, b, stride, padding, dilation, groups)
    if op == "convolution":
        transposed = bool(node.arg(6, "transposed"))
        spatial = len(w.shape) - 2 if isinstance(w, GNode) and w.shape is not None else None
        if spatial not in (1, 2, 3):
            return None
        name = f"conv_transpose{spatial}d" if transposed else f"conv{spatial}d"
        out_pad = node.arg(7, "output_padding", 0)
        stride, pad, dil, groups = (node.arg(3, "stride", 1), node.arg(4, "padding", 0), node.arg(5, "dilation", 1),
                                    node.arg(8, "groups", 1))
    elif op.startswith("conv_transpose"):
        name = op
        stride, pad, out_pad, groups, dil = (node.arg(3, "stride", 1), node.arg(4, "padding", 0),
                                             node.arg(5, "output_padding", 0), node.arg(6, "groups", 1),
                                             node.arg(7, "dilation", 1))
    else:
        name = op
        stride, pad, dil, groups, out_pad = (node.arg(3, "stride", 1), node.arg(4, "padding", 0),
                                             node.arg(5, "dilation", 1), node.arg(6, "groups", 1), 0)
    r = row(name)
    n = r.spatial
    return TargetRead(r, node.arg(0, "input"), w, node.arg(2, "bias"), 2, groups=groups if isinstance(groups, int) else None,
                      stride=_per_dim(stride, n), padding=pad if isinstance(pad, str) else _per_dim(pad, n),
                      dilation=_per_dim(dil, n), output_padding=_per_dim(out_pad, n))


def _per_dim(v: Any, n: int) -> Any:
    vs = ops.ints(v)
    if vs is None:
        return v
    return vs * n if len(vs) == 1 else vs


# --- the matcher -----------------------------------------------------------------------------------------

@dataclass
class Reach:
    """A weighted node a BN reaches, what it reads, and the ops between them (in dataflow order)."""

    node: GNode
    read: TargetRead
    chain: list[GNode]


Moves = Callable[[GNode], bool]
Reader = Callable[[GNode], "TargetRead | None"]


def where(node: GNode) -> str:
    """How a reason names a node: its op and the module that ran it."""
    op = type(node.target).__name__ if node.op == "module" and isinstance(node.target, nn.Module) else node.op
    return f"{op} ({node.module_path})" if node.module_path else op


def live_users(node: GNode) -> list[GNode]:
    """``ops.data_users`` less the unread extra outputs of a tuple (a max-pool's indices nobody reads)."""
    return [u for u in ops.data_users(node) if not (u.op == "getitem" and u.args[1] != 0 and not u.users)]


def passes_through(node: GNode, moves: Moves) -> bool:
    """A BN's per-channel map can be followed through ``node`` (moved data, or a max-pool: checked later)."""
    return moves(node) or ops.commutes_with_positive_affine(node)


def match_after(bn: GNode, *, moves: Moves = ops.is_data_movement, read: Reader = read_torch
                ) -> tuple[Reach | None, str]:
    """The producer a BN (``bn``: its node, reading ``args[0]``) sits after, or why there is none."""
    chain: list[GNode] = []
    x = bn.args[0] if bn.args else None
    while isinstance(x, GNode) and passes_through(x, moves):
        chain.append(x)
        x = x.args[0]
    if not isinstance(x, GNode):
        return None, "no input node"
    chain.reverse()
    r = read(x)
    if r is not None:
        return Reach(x, r, chain), ""
    if x.op in ("input", "param"):
        return None, "its input is a graph input, not a Linear/Conv output"
    if ops.is_nonlinear(x):
        src = x.args[0] if x.args else None
        while isinstance(src, GNode) and passes_through(src, moves):
            src = src.args[0]
        if isinstance(src, GNode) and read(src) is not None:
            return None, f"a nonlinearity ({where(x)}) sits between {src.op} {src.module_path} and the BN"
    return None, f"its input comes from {where(x)}, not from a Linear/Conv"


def match_before(out: GNode, *, moves: Moves = ops.is_data_movement, read: Reader = read_torch
                 ) -> tuple[list[Reach] | None, str]:
    """Every consumer of a BN's output ``out`` (through data movement), or why it does not fold before them."""
    found: list[Reach] = []
    stack: list[tuple[GNode, list[GNode]]] = [(out, [])]
    while stack:
        node, chain = stack.pop()
        users = live_users(node)
        if not users:
            return None, "its output is not used"
        for u in users:
            if u.op == "output":
                return None, "its output is a model output"
            r = read(u)
            if r is not None and r.input is node:
                if sum(a is node for a in u.inputs) > 1 or any(a is node for a in (r.weight, r.bias)):
                    return None, f"its output is also a weight of {where(u)}"
                found.append(Reach(u, r, chain))
            elif r is not None:
                return None, f"its output is a weight of {where(u)}"
            elif u.args and u.args[0] is node and passes_through(u, moves):
                stack.append((u, chain + [u]))
            elif ops.is_nonlinear(u):
                return None, f"its output feeds a nonlinearity ({where(u)})"
            else:
                return None, f"its output feeds {where(u)}, not only Linear/Conv layers"
    found.sort(key=lambda f: f.node.name)
    return found, ""


# --- checks every editor shares ------------------------------------------------------------------------

def producer_reason(path: str, reach: Reach, bn: GNode, n_out: int | None, n_bn: int | None) -> str | None:
    """Why a BN after producer ``reach`` does not fold into it: the producer's output (or an op between)
    read elsewhere, its channels merged, moved off axis 1 or of another count; a one-channel BN is a
    scalar map and folds wherever its axis sits. None when it folds."""
    node, chain = reach.node, reach.chain
    for n, expected in zip([node, *chain], [*chain, bn]):
        others = [u for u in live_users(n) if u is not expected]
        if others:
            what = "output" if n is node else f"output (after {n.op})"
            return f"producer {path} {what} is also used by {where(others[0])}"
    if n_bn == 1:
        return None
    axis = channel_axis(reach.read.kind, reach.read.spatial, node.shape)
    if axis is None:
        return f"no shape information for {path} (the captured graph has no shapes)"
    axis, why = ops.track_axis(chain, axis)
    if axis is None:
        return f"between {path} and the BN: {why}"
    if axis != 1:
        return f"the BN normalizes axis 1 but {path}'s channels arrive on axis {axis}"
    if n_out != n_bn:
        return f"{path} has {n_out} output channels, the BN {n_bn}"
    return None


def consumer_channels(path: str, reach: Reach, n: int) -> tuple[ops.Channels | None, str | None]:
    """Where the BN's ``n`` channels sit in consumer ``reach``'s input (possibly merged with other axes),
    or why they cannot be followed there."""
    if n == 1:
        return ops.Channels(1), None
    ch, why = ops.track_channels(reach.chain, ops.Channels(1), n)
    if ch is None:
        return None, f"between the BN and {path}: {why}"
    src = reach.read.input
    shape = src.shape if isinstance(src, GNode) else None
    want = channel_axis(reach.read.kind, reach.read.spatial, shape)
    if want is None:
        return None, f"no shape information for {path}'s input (the captured graph has no shapes)"
    if ch.axis != want:
        return None, (f"the BN's channels arrive on axis {ch.axis} of {path}'s input, which reads channels "
                      f"on axis {want}")
    if shape[want] % (n * ch.stride):
        return None, f"{path}'s {shape[want]} input channels are not whole blocks of the BN's {n} channels"
    return ch, None


def reads_padding(padding: Any, dilation: Any, kernel_size: Any) -> bool:
    """A conv with this padding reads padded values (``"same"`` pads unless every kernel is 1)."""
    if isinstance(padding, str):
        if padding == "valid":
            return False
        return any(d * (k - 1) > 0 for d, k in zip(dilation, kernel_size))
    pads = padding if isinstance(padding, (list, tuple)) else [padding]
    return any(p != 0 for p in pads)


def before_reason(r: FoldTarget, path: str, shift: torch.Tensor, *, padding: Any, dilation: Any, kernel: Any,
                  stride: Any = None, output_padding: Any = None, padding_mode: str = "zeros") -> str | None:
    """Why a BN before target ``r`` (a conv: its attributes) is not exact, or None."""
    if r.before is None:
        return f"a BN before {path} ({r.name}) does not fold into it"
    if r.before_needs == "no_zero_padding":
        if padding_mode == "zeros" and reads_padding(padding, dilation, kernel):
            shown = repr(padding) if isinstance(padding, str) else str(tuple(padding)) \
                if isinstance(padding, (list, tuple)) else str(padding)
            return (f"consumer {path} zero-pads its input (padding={shown}): the BN shift would not reach the "
                    "padded border, so the fold would not be exact")
    elif r.before_needs == "uniform_taps":
        if not fold_math.conv_transpose_taps_uniform(stride, padding, dilation, kernel, output_padding) \
                and not bool((shift == 0).all()):
            return (f"consumer {path} is a ConvTranspose (stride={tuple(stride)}, padding={tuple(padding)}, "
                    f"kernel={tuple(kernel)}): its output positions receive different numbers of kernel taps "
                    "(borders, stride phases), so the BN's shift is not one bias there; it folds only with stride "
                    "1 and padding ≥ dilation·(kernel − 1) + output_padding, or for a BN without shift")
    return None


def commute_reason(chain: list[GNode], scale: torch.Tensor) -> str | None:
    """A max-pool between the BN and its target commutes with ``s·x + t`` only where ``s ≥ 0`` on every
    channel (max(s·x) = s·max(x)); why not, or None."""
    pools = [n for n in chain if ops.commutes_with_positive_affine(n) and n.op != "getitem"]
    if not pools:
        return None
    negative = (scale < 0).nonzero().flatten().tolist()
    if not negative:
        return None
    return (f"{where(pools[0])} sits between, and a max-pool commutes with the BN only where its scale γ/σ is "
            f"≥ 0: it is negative on {len(negative)} of {scale.numel()} channels (channel {negative[0]} first)")



# --- one BN's sites, checked: what an editor applies ------------------------------------------------------

@dataclass
class FoldSite:
    """An editor-neutral fold: the BN, the side, the targets and where the BN's channels sit in each
    target's output (after) / input (before). An editor writes ``fold(reach.read.row, position, ...,
    channels=channels[i])`` into each target's weight and bias and removes the BN."""

    norm: GNode
    position: str  # "after" | "before"
    reaches: list[Reach]
    channels: list[ops.Channels]


Own = Callable[[Reach, str], "str | None"]
Name = Callable[[Reach], str]


def _default_name(reach: Reach) -> str:
    w = reach.read.weight
    if isinstance(w, GNode) and w.param:
        return w.param.rpartition(".")[0]
    return reach.node.module_path or reach.node.name


def plan(bn: GNode, out: GNode, n_bn: int | None, scale: torch.Tensor, shift: torch.Tensor, *,
         moves: Moves = ops.is_data_movement, read: Reader = read_torch, own: Own | None = None,
         name: Name = _default_name) -> tuple[list[FoldSite], dict[str, str]]:
    """Every side one BN folds on (after first), checked as far as the graph and the BN's numbers go,
    and the reason for each side that does not. ``bn`` reads the BN's input (``args[0]``), ``out``
    carries its output; ``scale``/``shift`` are its per-channel map (``fold_math.bn_scale_shift``).
    ``own(reach, role)``: the editor's own check of a target (who owns the weight, is it shared),
    run first; ``name(reach)``: how reasons name a target. Conv attributes come from the
    ``TargetRead`` (an editor whose reader leaves them None checks exactness itself)."""
    sites: list[FoldSite] = []
    reasons: dict[str, str] = {}
    reach, why = match_after(bn, moves=moves, read=read)
    if reach is not None:
        why = (own(reach, "producer") if own else None) or _after_reason(reach, bn, n_bn, scale, name(reach))
        if why is None:
            sites.append(FoldSite(bn, "after", [reach], [ops.Channels(1)]))
    if why:
        reasons["after"] = why
    reaches, why = match_before(out, moves=moves, read=read)
    channels: list[ops.Channels] = []
    for r in reaches or []:
        why = (own(r, "consumer") if own else None) or _before_reason(r, n_bn, scale, shift, name(r), channels)
        if why:
            break
    if reaches is not None and not why:
        sites.append(FoldSite(out, "before", reaches, channels))
    elif why:
        reasons["before"] = why
    return sites, reasons


def _after_reason(reach: Reach, bn: GNode, n_bn: int | None, scale: torch.Tensor, path: str) -> str | None:
    r = reach.read
    if r.row.after is None:
        return f"a BN after {path} ({r.row.name}) does not fold into it"
    n_out = out_channels(r.kind, r.weight_shape(), r.groups or 1)
    return producer_reason(path, reach, bn, n_out, n_bn) or commute_reason(reach.chain, scale)


def _before_reason(reach: Reach, n_bn: int | None, scale: torch.Tensor, shift: torch.Tensor, path: str,
                   channels: list[ops.Channels]) -> str | None:
    r = reach.read
    shape = r.weight_shape()
    if r.kind in ("conv", "conv_transpose") and r.padding is None:
        return f"cannot read the padding of {path}"
    why = before_reason(r.row, path, shift, padding=r.padding, dilation=r.dilation,
                        kernel=shape[2:] if shape else None, stride=r.stride, output_padding=r.output_padding)
    if why:
        return why
    if n_bn is None:
        return "cannot read the BN's number of channels"
    ch, why = consumer_channels(path, reach, n_bn)
    if ch is None:
        return why
    channels.append(ch)
    return commute_reason(reach.chain, scale)
