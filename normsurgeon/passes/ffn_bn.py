"""Transformer FFN blocks: find them on the captured graph, and put a BatchNorm inside them.

Yao et al. ("Leveraging Batch Normalization for Vision Transformers", ICCV Workshops 2021) found
that a ViT whose LayerNorms are all replaced by BatchNorm diverges in training, because the FFN's
hidden activations stay un-normalized, and that a BN between the FFN's two linears fixes it. This
module does that surgery on real models.

**Matching** works on the dataflow of the captured graph, not on module names, so it finds FFNs
however they are split into modules (transformers' ViT/BERT put the first linear and activation in
one module and the second linear, dropout and residual add in another):

    first linear -> pointwise ops with at least one activation (gelu, relu, silu, a hand-written
    tanh-GELU, dropout, casts) -> second linear

and the gated form (SwiGLU/GeGLU, Llama's MLP): ``act(gate(x)) * up(x) -> down``, where gate and up
read the same tensor, or come from one fused projection split after it (Phi-3, ModernBERT). Between
the projections may also sit layout changes, a depthwise conv (Mix-FFN: SegFormer, GLPN, PVTv2) and
reductions over positions (ConvNeXtV2's GRN); a 1x1 conv over more than one position is a linear
over dim 1 (SqueezeBERT), and gets a channels-first BN. A "linear" is a leaf module whose call runs one matrix product
(``nn.Linear``, transformers' ``Conv1D`` of GPT-2 with its (in, out) weight and addmm, custom Linear
subclasses) and only reshapes around it. The hidden activations must not be used anywhere else
(else a BN there would change those other uses too).

**Insertion** wraps the linear module in ``nn.Sequential(linear, bn)`` (after the first linear,
the default: between linear1 and the activation; for a gated FFN after the gate projection) or
``nn.Sequential(bn, linear)`` (``position="before-second"``). The user's classes survive, the model
stays picklable, and state-dict keys change predictably: ``mlp.fc1.weight`` becomes
``mlp.fc1.0.weight`` and the BN's entries are ``mlp.fc1.1.*`` (``mlp.fc2.1.weight`` and
``mlp.fc2.0.*`` for before-second). The BN is a ``TokenBatchNorm`` over the hidden width: batch x
token statistics, no transposes.

``check`` refuses (with a reason) a linear module that is called more than once (one BN would be
shared by every call), registered under several paths, or a matrix product that is not a module of
its own (``F.linear`` inside forward code cannot be wrapped).

The identity initialisation (``measure_identity_stats``, ``identity_errors``) makes the insertion
exact in eval; the library entry point is :func:`normsurgeon.insert_ffn_bn` (``passes.convert``),
which runs it with its numerical verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..calibrate import RunningStats, as_positions
from ..graph import GNode, ModelGraph, ops
from ..inputs import CallArgs, as_call_args
from ..nn import make_identity
from ..verify import run_clean, run_hooked, site_error

__all__ = ["FFNBlock", "LinearUnit", "find_ffn_blocks", "match_ffn_blocks", "check", "wrap_linear",
           "unwrap_linear", "measure_identity_stats", "identity_errors", "POSITIONS", "INITS"]

POSITIONS = ("after-first", "before-second")
INITS = ("fresh", "identity")

LINEAR_OPS = {"linear", "addmm", "mm", "matmul"}
# A 1x1 convolution (SqueezeBERT's FFN is Conv1d over (B, C, T)) is a linear over channels (dim 1).
POINTWISE_CONVS = {"conv1d", "conv2d"}
_CONV_BN = {"conv1d": "bn1d", "conv2d": "bn2d"}
# A weight read transposed: FalconLinear computes x @ self.weight.T
_WEIGHT_VIEWS = ops.TRANSPOSE | ops.PERMUTE | {"numpy_T", "mT"}
ACTIVATIONS = ops.ACTIVATIONS
# What a linear module may do around its matrix product and still be a plain linear layer.
_MOVES = ops.RESHAPE | ops.IDENTITY | ops.CASTS
# Pointwise ops an FFN's activation region may hold (besides ACTIVATIONS).
_DROPOUTS = ops.DROPOUT | {"native_dropout"}
_POINTWISE = ACTIVATIONS | _DROPOUTS | ops.IDENTITY | ops.CASTS | {
    "mul", "add", "sub", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "abs", "square", "clamp", "clamp_min",
    "clamp_max", "getitem",
}
# Between the two projections, besides pointwise ops: layout changes (SegFormer's Mix-FFN goes to an
# image and back), the halves of a fused gate/up projection (Phi-3, ModernBERT: chunk), per-channel
# spatial mixing (a depthwise conv) and reductions over positions (ConvNeXtV2's GRN). None of them
# mixes channels the way attention does (activation x activation products, softmax): they are FFNs.
_SPLITS = ops.SLICE | {"chunk", "split", "split_with_sizes", "unbind", "narrow"}
_BETWEEN = _POINTWISE | ops.LAYOUT | _SPLITS | {"linalg_vector_norm", "norm", "mean", "sum", "maximum", "minimum"}
_MAX_REGION = 64


@dataclass
class LinearUnit:
    """One call of a linear-like op, with the nodes its module wraps around it."""

    path: str  # module path; "parent:linear#k" for a functional call inside other code
    op: GNode  # the matrix product
    in_node: GNode  # the tensor it reads (outside the module call)
    out_node: GNode  # the tensor it produces (last node of the module call)
    module_type: str | None
    reason: str | None = None  # why it cannot be wrapped in a Sequential (None: it can)
    bn: str = "token"  # the BN that fits its output: "token" (channels last) or "bn1d"/"bn2d" (a 1x1 conv)

    @property
    def axis(self) -> int:
        return -1 if self.bn == "token" else 1

    @property
    def out_features(self) -> int | None:
        return int(self.out_node.shape[self.axis]) if self.out_node.shape else None

    @property
    def in_features(self) -> int | None:
        return int(self.in_node.shape[self.axis]) if self.in_node.shape else None


@dataclass
class FFNBlock:
    """A feed-forward block: ``second(act(first(x)))`` or, gated, ``second(act(first(x)) * up(x))``."""

    first: str  # path of the first linear (for a gated FFN: the gate projection)
    second: str  # path of the second linear
    hidden: int  # hidden width (the BN's channels)
    activation: str  # activation module class or op name
    gated: bool = False
    up: str | None = None  # gated FFN: the up projection
    dropout: bool = False  # a dropout between the linears
    first_type: str | None = None
    second_type: str | None = None
    hidden_shape: list[int] | None = None
    units: dict = field(default_factory=dict, repr=False, compare=False)  # role -> LinearUnit
    first_width: int | None = None  # the first projection's output width when it differs (fused gate/up)
    between: list[str] = field(default_factory=list)  # what sits between the projections besides pointwise ops

    def width(self, position: str) -> int:
        """The channels of a BN at ``position``: the first projection's output, or the second's input."""
        return self.first_width or self.hidden if position == "after-first" else self.hidden

    def bn(self, position: str) -> str:
        """Which BN fits there (``wrap_linear``'s ``bn``)."""
        return self.units["first" if position == "after-first" else "second"].bn

    @property
    def path(self) -> str:
        """Innermost module holding both linears (a name for the block)."""
        a, b = self.first.split("."), self.second.split(".")
        common = []
        for x, y in zip(a, b):
            if x != y:
                break
            common.append(x)
        return ".".join(common)

    def describe(self) -> str:
        up = f"up={self.up}" if self.up else "gate and up fused in one projection"
        act = f"{self.activation} (gated, {up})" if self.gated else self.activation
        extra = "".join(f" -> {b}" for b in self.between)
        return f"{self.first} -> {act}{extra}{' -> dropout' if self.dropout else ''} -> {self.second}"

    def to_json(self) -> dict:
        return {"path": self.path, "first": self.first, "second": self.second, "up": self.up,
                "activation": self.activation, "gated": self.gated, "hidden": self.hidden,
                "dropout": self.dropout, "first_type": self.first_type, "second_type": self.second_type,
                "hidden_shape": self.hidden_shape, "first_width": self.first_width, "between": self.between}


# --- match -------------------------------------------------------------------------------------

def find_ffn_blocks(graph: ModelGraph) -> list[FFNBlock]:
    """Every FFN block of the captured graph (read-only), in graph order."""
    return match_ffn_blocks(graph)[0]


def match_ffn_blocks(graph: ModelGraph) -> tuple[list[FFNBlock], list[tuple[str, str]]]:
    """FFN blocks, plus (path, reason) for linear pairs that look like an FFN but are not one
    (hidden activations used elsewhere, ambiguous gating)."""
    units = _linear_units(graph)
    by_out = {id(u.out_node): u for u in units}
    blocks: list[FFNBlock] = []
    rejected: list[tuple[str, str]] = []
    for second in units:
        found = _match_block(second, by_out)
        if found is None:
            continue
        if isinstance(found, str):
            rejected.append((second.path, found))
        else:
            blocks.append(found)
    return blocks, rejected


def _linear_units(graph: ModelGraph) -> list[LinearUnit]:
    units = []
    counter: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in POINTWISE_CONVS:
            unit = _conv_unit(graph, node)
            if unit is not None:
                units.append(unit)
            continue
        if node.op not in LINEAR_OPS:
            continue
        data = node.arg(1) if node.op == "addmm" else node.arg(0)
        if not isinstance(data, GNode) or data.op == "param":
            continue
        if node.op in ("mm", "matmul") and not _weight_like(node.arg(1)):
            continue  # activation x activation (attention scores): not a linear layer
        path = node.module_path or ""
        module = graph.module(path)
        reason = None
        in_node, out_node = data, node
        if module is not None and path and _is_linear_module(graph, module, path, node):
            while in_node.op in _MOVES and in_node.call_key == node.call_key and in_node.inputs:
                in_node = in_node.inputs[0]
            while len(out_node.users) == 1 and out_node.users[0].op in _MOVES \
                    and out_node.users[0].call_key == node.call_key:
                out_node = out_node.users[0]
            mtype = type(module).__name__
        else:
            key = f"{path}:linear" if path else "linear"
            k = counter.get(key, 0)
            counter[key] = k + 1
            mtype = type(module).__name__ if module is not None else None
            where = f"{path}.forward" if path else "the model's forward"
            reason = (f"the matrix product is a functional call inside {where} ({mtype or 'root'}), not a "
                      "module of its own: it cannot be wrapped in nn.Sequential(linear, bn)")
            path = f"{key}#{k}"
        units.append(LinearUnit(path, node, in_node, out_node, mtype, reason))
    return units


def _conv_unit(graph: ModelGraph, node: GNode) -> LinearUnit | None:
    """A 1x1 convolution module with one group, called once as one conv op: a linear over dim 1."""
    path = node.module_path or ""
    module = graph.module(path)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups != 1 or \
            any(k != 1 for k in module.kernel_size) or any(s != 1 for s in module.stride) or \
            not (module.padding == "valid" or (isinstance(module.padding, tuple) and not any(module.padding))) or \
            not isinstance(node.arg(0), GNode) or node.shape is None:
        return None
    if len(node.shape) < 3 or all(d == 1 for d in node.shape[2:]):
        return None  # one position (a squeeze-excite gate after pooling): not a token FFN
    own = [n for n in graph.nodes if n.call_key == node.call_key and n.op not in ("param", "input", "output")]
    if not all(n is node or n.op in _MOVES for n in own):
        return None
    return LinearUnit(path, node, node.arg(0), node, type(module).__name__, bn=_CONV_BN[node.op])


def _weight_like(a: Any) -> bool:
    seen = 0
    while isinstance(a, GNode) and a.op != "param" and seen < 4 and a.op in _MOVES | _WEIGHT_VIEWS:
        a = a.inputs[0] if a.inputs else None
        seen += 1
    return isinstance(a, GNode) and a.op == "param"


def _is_linear_module(graph: ModelGraph, module: nn.Module, path: str, node: GNode) -> bool:
    """A leaf module with a 2-D weight whose call runs exactly this one matrix product."""
    if any(True for _ in module.children()):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    own = [n for n in graph.nodes if n.call_key == node.call_key and n.op not in ("param", "input", "output")]
    return all(n is node or n.op in _MOVES or _of_params(n) or _bias_add(n, node) for n in own)


def _of_params(n: GNode) -> bool:
    """A view of the module's own weight (``self.weight.T``): computed from parameters only."""
    return n.op in _WEIGHT_VIEWS and bool(n.inputs) and all(i.op == "param" for i in n.inputs)


def _bias_add(n: GNode, product: GNode) -> bool:
    """``x @ W.T + b`` written by hand: the product plus a parameter."""
    return n.op == "add" and product in n.inputs and any(i.op == "param" for i in n.inputs)


def _match_block(second: LinearUnit, by_out: dict[int, LinearUnit]) -> FFNBlock | str | None:
    start = second.in_node
    region: list[GNode] = []
    seen: set[int] = set()
    sources: list[LinearUnit] = []
    stack = [start]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        unit = by_out.get(id(n))
        if unit is not None:
            if unit is second:
                return None
            if unit not in sources:
                sources.append(unit)
            continue
        if (n.op not in _BETWEEN and not _depthwise(n)) or len(region) >= _MAX_REGION:
            return None
        region.append(n)
        stack.extend(i for i in n.inputs if i.op != "param")
    acts = [n for n in region if n.op in ACTIVATIONS]
    if not sources or not acts or len(sources) > 2:
        return None
    region_ids = {id(n) for n in region}
    # hidden activations only flow into the second linear
    inside = region_ids | {id(s.out_node) for s in sources} | _unit_entry(second)
    for n in [*region, *(s.out_node for s in sources)]:
        for u in n.users:
            if id(u) in inside:
                continue
            return (f"looks like an FFN ending in {second.path}, but its hidden activations "
                    f"(from {' and '.join(s.path for s in sources)}) are also used by {u.module_path or '(root)'} "
                    f"({u.op}): a BN there would change that use too")
    hidden = second.in_features
    split = any(n.op in _SPLITS for n in region)
    if hidden is None or any(s.out_features is None for s in sources):
        return None
    if any(s.out_features != hidden for s in sources) and not (
            len(sources) == 1 and split and sources[0].out_features % hidden == 0):
        return None
    act = acts[0]
    act_name = _activation_name(act)
    dropout = any(n.op in _DROPOUTS for n in region)
    shape = list(start.shape) if start.shape else None
    between = list(dict.fromkeys(_between_name(n) for n in reversed(region) if _depthwise(n) or n.op in _REDUCTIONS))
    if len(sources) == 1:
        first = sources[0]
        fused = first.out_features != hidden  # gate and up in one projection, split after it (Phi-3)
        gated = fused and any(n.op == "mul" and len([i for i in n.inputs if i.op != "param"]) > 1 for n in region)
        return FFNBlock(first.path, second.path, hidden, act_name, gated=gated, dropout=dropout,
                        first_type=first.module_type, second_type=second.module_type, hidden_shape=shape,
                        units={"first": first, "second": second},
                        first_width=first.out_features if fused else None, between=between)
    a, b = sources
    if a.in_node is not b.in_node:
        return None  # two linears of different inputs combined: not a gated FFN
    feeds = {id(s): _reaches_activation(s, region_ids) for s in sources}
    gates = [s for s in sources if feeds[id(s)]]
    if len(gates) != 1:
        return (f"gated FFN ending in {second.path}: cannot tell the gate from the up projection "
                f"({a.path}, {b.path} both {'feed' if gates else 'skip'} the activation)")
    gate = gates[0]
    up = b if gate is a else a
    return FFNBlock(gate.path, second.path, hidden, act_name, gated=True, up=up.path, dropout=dropout,
                    first_type=gate.module_type, second_type=second.module_type, hidden_shape=shape,
                    units={"first": gate, "up": up, "second": second})


_REDUCTIONS = {"linalg_vector_norm", "norm", "mean", "sum"}


def _depthwise(n: GNode) -> bool:
    """A depthwise convolution (one group per channel, a param weight): mixes positions, not channels."""
    if n.op not in ("conv1d", "conv2d", "conv3d"):
        return False
    w, groups = n.arg(1, "weight"), n.arg(6, "groups", 1)
    return isinstance(w, GNode) and w.op == "param" and w.shape is not None and isinstance(groups, int) \
        and groups > 1 and w.shape[0] == groups and w.shape[1] == 1


def _between_name(n: GNode) -> str:
    if _depthwise(n):
        return f"depthwise {n.op} ({n.module_path})"
    return f"{n.module_stack[-1][1]} (over positions)" if n.module_stack else f"{n.op} over positions"


def _unit_entry(unit: LinearUnit) -> set[int]:
    """The second linear's own nodes from its matrix product back to its input."""
    ids = {id(unit.op)}
    n = unit.op.arg(1) if unit.op.op == "addmm" else unit.op.arg(0)
    while isinstance(n, GNode) and n is not unit.in_node:
        ids.add(id(n))
        n = n.inputs[0] if n.inputs else None
    return ids


def _reaches_activation(unit: LinearUnit, region_ids: set[int]) -> bool:
    stack, seen = [unit.out_node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.op in ACTIVATIONS and id(n) in region_ids:
            return True
        if n.op == "mul" and n is not unit.out_node and len([i for i in n.inputs if i.op != "param"]) > 1:
            continue  # the gating product: past it both branches have met
        stack.extend(u for u in n.users if id(u) in region_ids)
    return False


def _activation_name(node: GNode) -> str:
    if node.module_stack:
        path, cls = node.module_stack[-1]
        if path == node.module_path and cls and not cls.endswith(("MLP", "Block", "Layer", "FeedForward")):
            return f"{cls} ({node.op})" if cls.lower() != node.op else cls
    return node.op


# --- check -------------------------------------------------------------------------------------

def check(block: FFNBlock, graph: ModelGraph, position: str = "after-first") -> str | None:
    """Why a BN cannot be inserted into ``block`` at ``position`` (None: it can)."""
    unit: LinearUnit = block.units["first" if position == "after-first" else "second"]
    if unit.reason:
        return unit.reason
    calls = len(graph.calls(unit.path))
    if calls > 1:
        return (f"{unit.path} is called {calls} times: wrapping it would put one BatchNorm (one set of "
                "running statistics) on every call")
    module = graph.module(unit.path)
    aliases = [p for p in graph.aliases(module) if p != unit.path]
    if aliases:
        return f"{unit.path} is the same module as {', '.join(aliases)}: wrapping one path would split them"
    return None


# --- rewrite -----------------------------------------------------------------------------------

def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def wrap_linear(model: nn.Module, path: str, hidden: int, position: str, *, identity: bool = False,
                bn: str = "token") -> tuple[str, nn.Module]:
    """Replace the linear at ``path`` by ``Sequential(linear, bn)`` (after-first) or
    ``Sequential(bn, linear)`` (before-second). ``bn``: "token" (a TokenBatchNorm over the last dim)
    or "bn1d"/"bn2d" (channels at dim 1: a 1x1 conv's). Returns (path of the new BN, the BN)."""
    from ..nn import ffn_batchnorm, make_identity, module_class

    parent, name = _parent(model, path)
    linear = getattr(parent, name)
    weight = getattr(linear, "weight", None)
    factory = {"device": weight.device, "dtype": weight.dtype} if isinstance(weight, torch.Tensor) \
        and weight.is_floating_point() else {}
    if bn == "token":
        norm = ffn_batchnorm(hidden, identity_init=identity, **factory)
    else:
        norm = module_class(bn)(hidden, **factory)
        if identity:
            make_identity(norm)
    bn = norm.train(linear.training)
    seq = nn.Sequential(linear, bn) if position == "after-first" else nn.Sequential(bn, linear)
    seq.train(linear.training)
    setattr(parent, name, seq)
    return f"{path}.{1 if position == 'after-first' else 0}", bn


def unwrap_linear(model: nn.Module, path: str, position: str) -> None:
    """Undo :func:`wrap_linear`: put the original linear module back."""
    parent, name = _parent(model, path)
    seq = getattr(parent, name)
    setattr(parent, name, seq[0] if position == "after-first" else seq[1])


# --- identity initialisation -------------------------------------------------------------------

@torch.no_grad()
def measure_identity_stats(model: nn.Module, bns: list[nn.Module], batches: list[Any]) -> None:
    """Set each BN's running stats to the exact mean/unbiased var of its inputs, measured with the
    whole model in eval and every BN in ``bns`` an identity (so each sees what it will see)."""
    make_identity(bns)
    stats = {bn: RunningStats(bn.num_features, bn.running_mean.device) for bn in bns}

    def hook(bn, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            stats[bn].add_batch(as_positions(bn, args[0].detach()))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        device = next((t.device for t in model.parameters()), None)
        calls = [as_call_args(b) for b in batches]
        if device is not None:
            calls = [c.to(device=device) for c in calls]
        for c in calls:
            run_clean(model, c, eval_mode=True)
    finally:
        for h in handles:
            h.remove()
    for bn, st in stats.items():
        if st.count:
            st.write_to(bn)
    make_identity(bns)


def identity_errors(model: nn.Module, items: list[tuple[str, nn.Module]], ci: CallArgs) -> dict[str, float]:
    """How far each identity BN in ``items`` (path, BN) moves its input, on ``ci`` (relative)."""
    errs: dict[str, float] = {}

    def hook_for(path: str):
        def hook(_m, args, out):
            errs[path] = max(errs.get(path, 0.0), site_error(args[0], out))
        return hook

    run_hooked(model, [(bn, hook_for(path)) for path, bn in items], ci)
    return errs
