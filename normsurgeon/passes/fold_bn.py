"""Fold an inference-mode BatchNorm into an adjacent Linear/Conv: the ``nn.Module`` editor (match, check, rewrite).

What folds is decided by the shared table and matcher (``passes.fold_targets``: the rows, the walk
through data-movement ops and max-pools, the layout and exactness checks, the math), which the
``ExportedProgram`` and ONNX editors read too. This editor adds what belongs to modules: who owns a
weight (the module running the op, an MHA's packed projection), sharing, ties, hooks, and how to
replace a BN module and undo it.

- **match** (read-only): for every BatchNorm call in the graph, ``fold_targets.match_after`` walks
  *backwards* through ops that only move data (``graph.ops``: view/reshape/flatten/permute/transpose/
  contiguous/clone/unflatten, eval Dropout, Identity; max-pools) to a producer whose table row has a
  module owner (Linear, Conv, ConvTranspose, transformers Conv1D, a Linear subclass computing
  ``x @ self.weight.T + self.bias``), ``match_before`` *forwards* to the
  consumers. Returns ``NormEntry`` objects with
  candidate ``Site``s, preferred direction first; functional ``batch_norm`` calls get entries too.
  ``nn.MultiheadAttention`` runs ``F.linear`` on its own parameters: a ``Target`` records where they
  live (``in_proj_weight``/``in_proj_bias`` of the attention, or its ``out_proj``).
- **check**: the reason a site must not be folded, or None. It tracks where the channel axis goes
  through every data-movement op (never guessing it from sizes) and refuses shared modules, shared
  or tied weights, outputs used elsewhere, training-mode BNs, padded conv consumers, ...
- **rewrite**: changes the producer/consumer parameters in place (float64 math from ``fold_math``),
  replaces the BN module by ``nn.Identity`` in its parent (a functional call, which stays in the
  forward, gets identity statistics instead), and returns an ``Action``; the ``UndoLog`` learns how
  to take exactly that site back.

The pass that runs this rule with verification and rollback is ``passes.fold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.parametrize

from .. import fold_math
from ..graph import GNode, ModelGraph
from ..graph.node import paths_by_module
from ..graph import ops
from ..graph.ops import batch_norm_args
from ..report import Action
from ..verify import UndoLog
from . import bn_like
from . import fold_targets as ft

__all__ = ["Site", "Target", "NormEntry", "FoldContext", "match", "check", "rewrite", "entry_reason", "combine"]

_BN = nn.modules.batchnorm._BatchNorm

# --- data model ----------------------------------------------------------------------------------

@dataclass
class Target:
    """One Linear/Conv a BN folds into, and the data-movement ops between them."""

    path: str
    node: GNode
    read: ft.TargetRead  # its table row and operands
    chain: list[GNode]  # data-movement nodes, in dataflow order (producer→BN or BN→consumer)
    # Where the parameters live, when not in the module at ``path`` under weight/bias:
    # nn.MultiheadAttention reads its packed in-projection (in_proj_weight/in_proj_bias) and its
    # out_proj Linear's parameters with F.linear from its own forward.
    owner: str | None = None  # module holding the parameters (default: path)
    weight: str = "weight"
    bias: str = "bias"
    role: str | None = None  # "in_proj" | "out_proj" | "attention" (another projection of an MHA)

    @property
    def params_at(self) -> str:
        return self.path if self.owner is None else self.owner

    @property
    def kind(self) -> str:  # linear | linear_t (transformers Conv1D: weight (in, out)) | conv | conv_transpose
        return self.read.kind

    @property
    def row(self) -> ft.FoldTarget:
        """The table row: an MHA's packed in-projection / out_proj are rows of their own."""
        if self.role in ("in_proj", "out_proj"):
            return ft.row(f"mha_{self.role}")
        return self.read.row


@dataclass
class Site:
    """A BatchNorm call and the neighbour(s) it could fold into."""

    norm: str  # the BN module's path
    node: GNode  # the batch_norm op
    position: str  # "after" (BN after its producer) | "before" (BN before its consumers)
    targets: list[Target]
    functional: bool = False  # a functional batch_norm call, not an nn.BatchNorm module
    module: nn.Module | None = None  # the BN module object a rewrite replaces (set by the pass once rewritten)

    @property
    def into(self) -> list[str]:
        return [t.path for t in self.targets]


@dataclass
class NormEntry:
    """What ``match`` found for one BatchNorm: candidate sites, or why there is none."""

    norm: str
    module: nn.Module | None
    nodes: list[GNode] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # position -> why no site matched
    reason: str | None = None  # a reason that rules out every position


class FoldContext:
    """Lookups the checks need, computed once per model."""

    def __init__(self, model: nn.Module, graph: ModelGraph) -> None:
        self.model = model
        self.graph = graph
        if graph.model is model:  # the graph's maps are this model's: build them once
            self.modules, self.paths_of = graph._modules, graph._paths_of
        else:
            self.modules = dict(model.named_modules(remove_duplicate=False))
            self.paths_of = paths_by_module(self.modules)
        self.param_names: dict[int, list[str]] = {}
        for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if p is not None:
                self.param_names.setdefault(id(p), []).append(name)
        self.calls: dict[str, set[str]] = {}
        for n in graph.nodes:
            if n.module_path is not None and n.call_key is not None and n.op not in ("param", "input", "output"):
                self.calls.setdefault(n.module_path, set()).add(n.call_key)
        self.param_users: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "param" and n.param is not None:
                self.param_users[n.param] = self.param_users.get(n.param, 0) + len(n.users)
        self.created_bias: set[tuple[int, str]] = set()  # (id(module), bias name) this pass created
        self.regions: dict[str, list[GNode]] = {}
        for n in graph.nodes:
            if n.call_key is not None and n.op not in ("param", "input", "output"):
                self.regions.setdefault(n.call_key, []).append(n)

    def module(self, path: str | None) -> nn.Module | None:
        return None if path is None else self.modules.get(path)

    def aliases(self, module: nn.Module) -> list[str]:
        """Every path ``module`` is registered under (more than one: the object is shared)."""
        return self.paths_of.get(id(module), [])


# --- graph helpers -------------------------------------------------------------------------------

def _is_data_movement(node: GNode, ctx: FoldContext) -> bool:
    return ops.is_data_movement(node, ctx.module(node.module_path))


# --- match ---------------------------------------------------------------------------------------

def match(model: nn.Module, graph: ModelGraph, ctx: FoldContext | None = None) -> list[NormEntry]:
    """Every BatchNorm of ``model`` with the sites it could fold at (read-only)."""
    ctx = ctx or FoldContext(model, graph)
    like_problems, nested = _collapse_bn_like(model, graph, ctx)
    entries: dict[int, NormEntry] = {}
    for path, m in model.named_modules():
        if (isinstance(m, _BN) or bn_like.is_bn_like(m)) and path not in nested:
            entries[id(m)] = NormEntry(path, m, reason=like_problems.get(path))
    functional: list[NormEntry] = []
    for node in graph.ops("batch_norm"):
        m = ctx.module(node.module_path)
        if node.module_path in nested:
            continue  # the inner BN of a BN-like module that could not be collapsed: its entry says why
        if id(m) in entries:
            entries[id(m)].nodes.append(node)
        else:
            functional.append(NormEntry(f"{node.module_path or '<root>'}:{node.name}", None, [node]))
    for entry in [*entries.values(), *functional]:
        if len(entry.nodes) != 1:
            continue
        node = entry.nodes[0]
        after, why = _match_after(node, entry.norm, ctx)
        if after is not None:
            entry.sites.append(after)
        else:
            entry.reasons["after"] = why
        before, why = _match_before(node, entry.norm, ctx)
        if before is not None:
            entry.sites.append(before)
        else:
            entry.reasons["before"] = why
        for site in entry.sites:
            site.functional = entry.module is None
    return list(entries.values()) + functional


def _collapse_bn_like(model: nn.Module, graph: ModelGraph, ctx: FoldContext) -> tuple[dict[str, str], set[str]]:
    """BN-like modules (``passes.bn_like``) become one token-BN-shaped site each; ctx follows the graph."""
    nested = bn_like.inside_bn_like(model)
    if not any(bn_like.is_bn_like(m) for m in ctx.modules.values()):
        return {}, nested
    problems = bn_like.collapse(model, graph)
    for node in graph.ops("batch_norm"):
        if node.call_key is not None and node.call_key.endswith("#bn_like"):
            ctx.regions[node.call_key] = [n for n in graph.nodes if n.call_key == node.call_key]
            ctx.calls[node.module_path] = {node.call_key}
    return problems, nested


def _read(node: GNode) -> ft.TargetRead | None:
    """A weighted op whose table row a module can own (the program-only forms are not this editor's).

    A Linear subclass's own ``x @ self.weight.T + self.bias`` is a matmul and an add: read at either
    node (the BN sits after the add, or feeds the matmul), with the add's parameter as its bias."""
    if node.op == "add":
        for mm in node.args[:2]:
            if isinstance(mm, GNode) and mm.op == "matmul":
                r = _read(mm)
                return r if r is not None and r.bias is not None and _bias_add(mm)[0] is node else None
        return None
    r = ft.read_torch(node)
    if r is None or r.row.module is None:
        return None
    if r.row.name == "linear_matmul":
        r.bias = _bias_add(node)[1]
    return r


def _bias_add(mm: GNode) -> tuple[GNode | None, GNode | None]:
    """The ``add(mm, b)`` that is the only reader of matmul ``mm``, in the same module, with ``b`` a 1-D
    parameter (a Linear's bias), and ``b``; (None, None) otherwise."""
    users = ft.live_users(mm)
    if len(users) != 1:
        return None, None
    u = users[0]
    if u.op != "add" or len(u.args) != 2 or u.kwargs.get("alpha", 1) != 1 or u.module_path != mm.module_path:
        return None, None
    b = u.args[1] if u.args[0] is mm else u.args[0]
    if isinstance(b, GNode) and b.op == "param" and b.shape is not None and len(b.shape) == 1:
        return u, b
    return None, None


def _target(reach: ft.Reach, ctx: FoldContext) -> Target:
    """The Linear/Conv ``reach`` runs, with where its parameters live."""
    node = reach.node
    path = node.module_path or ""
    t = Target(path, node, reach.read, reach.chain)
    if node.op == "linear" and isinstance(ctx.module(node.module_path), nn.MultiheadAttention):
        w = node.arg(1, "weight")
        name = w.param if isinstance(w, GNode) and w.op == "param" else None
        if name == _join(path, "in_proj_weight"):  # q = k = v: one packed projection
            t.owner, t.role = path, "in_proj"
            t.weight, t.bias = ft.row("mha_in_proj").params
        elif name == _join(path, "out_proj.weight"):
            t.path = t.owner = _join(path, "out_proj")
            t.role = "out_proj"
        else:  # a slice of in_proj_weight, or a separate q/k/v_proj_weight
            t.role = "attention"
    return t


def _match_after(bn_node: GNode, norm_path: str, ctx: FoldContext) -> tuple[Site | None, str]:
    reach, why = ft.match_after(bn_node, moves=lambda n: _is_data_movement(n, ctx), read=_read)
    return (Site(norm_path, bn_node, "after", [_target(reach, ctx)]), "") if reach is not None else (None, why)


def _match_before(bn_node: GNode, norm_path: str, ctx: FoldContext) -> tuple[Site | None, str]:
    reaches, why = ft.match_before(bn_node, moves=lambda n: _is_data_movement(n, ctx), read=_read)
    if reaches is None:
        return None, why
    return Site(norm_path, bn_node, "before", [_target(r, ctx) for r in reaches]), ""


# --- check ---------------------------------------------------------------------------------------

@dataclass
class _Stats:
    """The tensors of one BN call: its module's, or the ones a functional ``batch_norm`` reads."""

    num_features: int
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _stats(site: Site, ctx: FoldContext) -> _Stats:
    bn = ctx.module(site.norm)
    if isinstance(bn, _BN):
        return _Stats(bn.num_features, bn.running_mean, bn.running_var, bn.weight if bn.affine else None,
                      bn.bias if bn.affine else None, _bn_eps(site.node, bn))
    if bn_like.is_bn_like(bn):  # x * scale + shift is a BN with mean 0, var 1, eps 0
        scale, shift = bn_like.scale_shift(bn)
        return _Stats(scale.numel(), torch.zeros_like(scale), torch.ones_like(scale), scale, shift, 0.0)
    args = _bn_args(site.node)
    t = {k: None if args.get(k) is None else _tensor(ctx, args[k].param)
         for k in ("running_mean", "running_var", "weight", "bias")}
    return _Stats(t["running_mean"].shape[0], t["running_mean"], t["running_var"], t["weight"], t["bias"],
                  float(args["eps"]))


def _tensor(ctx: FoldContext, qualname: str) -> torch.Tensor | None:
    owner, _, name = qualname.rpartition(".")
    mod = ctx.module(owner)
    return getattr(mod, name, None) if mod is not None else None


def check(site: Site, ctx: FoldContext) -> str | None:
    """Why ``site`` must not be folded, or None when the fold is exact and safe."""
    bn = ctx.module(site.norm)
    why = _check_norm(bn, site.node, ctx) if isinstance(bn, _BN) or bn_like.is_bn_like(bn) \
        else _check_functional(site.node, ctx)
    if why:
        return why
    stats = _stats(site, ctx)
    for t in site.targets:
        why = _check_target(t, site, stats, ctx)
        if why:
            return why
    return None


def _check_functional(node: GNode, ctx: FoldContext) -> str | None:
    """A functional ``batch_norm`` folds only where it is a fixed affine map of tensors nothing else
    reads: the call stays in the user's forward, so the fold turns it into an identity by resetting
    those tensors (mean 0, var 1, weight √(1 + eps), bias 0)."""
    args = _bn_args(node)
    if args is None:
        return "cannot read the arguments of its batch_norm op"
    if args.get("training") is not False:
        return "functional batch_norm with training not the constant False: it may normalize with batch statistics"
    for name in ("running_mean", "running_var"):
        if args.get(name) is None:
            return "functional batch_norm without running statistics: it normalizes with batch statistics"
    if not isinstance(args.get("eps"), (int, float)):
        return "functional batch_norm whose eps is not a constant"
    for name in ("running_mean", "running_var", "weight", "bias"):
        v = args.get(name)
        if v is None:
            continue
        if not isinstance(v, GNode) or v.op != "param" or v.param is None:
            return (f"functional batch_norm whose {name} is computed in the forward, not a parameter or buffer: "
                    "the fold could not make the call an identity")
        t = _tensor(ctx, v.param)
        if t is None or not t.is_floating_point():
            return f"functional batch_norm whose {name} ({v.param}) is not a floating-point tensor of the model"
        names = ctx.param_names.get(id(t), [])
        if len(names) > 1:
            others = ", ".join(n for n in names if n != v.param)
            return f"functional batch_norm whose {name} {v.param} is tied to {others}"
        if ctx.param_users.get(v.param, 0) != 1:
            return (f"functional batch_norm whose {name} {v.param} is also read elsewhere (shared): making this call "
                    "an identity would change the other use")
    return None


def _check_norm(bn: nn.Module | None, node: GNode, ctx: FoldContext) -> str | None:
    path = node.module_path
    like = bn_like.is_bn_like(bn)
    if like:
        why = bn_like.not_foldable_reason(bn)
        if why:
            return why
    elif not isinstance(bn, _BN):
        return "not an nn.BatchNorm module"
    if bn.training:
        return "in training mode: it normalizes with batch statistics (call model.eval() first)"
    if not like and (bn.running_mean is None or bn.running_var is None):
        return "has no running statistics (track_running_stats=False): it always uses batch statistics"
    paths = ctx.aliases(bn)
    if len(paths) > 1:
        return f"the same BatchNorm object is registered under {len(paths)} paths ({', '.join(paths)})"
    if bn._forward_hooks or bn._forward_pre_hooks or getattr(bn, "_forward_hooks_with_kwargs", None):
        return "has forward hooks, which replacing it by Identity would drop"
    calls = ctx.calls.get(path, set())
    if len(calls) > 1:
        return f"called {len(calls)} times in the forward pass"
    if not node.leaf_module:
        args = _bn_args(node)
        if args is None:
            return "cannot read the arguments of its batch_norm op"
        for name in ("running_mean", "running_var", "weight", "bias"):
            v = args.get(name)
            own = getattr(bn, name)
            if v is None and own is None:
                continue
            if not isinstance(v, GNode) or v.op != "param" or v.param != _join(path, name):
                return f"its batch_norm op does not use the module's own {name}"
        if args.get("training") is True:
            return "its batch_norm op runs in training mode"
    return _check_region(node, ctx)


def _bn_args(node: GNode) -> dict | None:
    return batch_norm_args(node)


def _bn_eps(node: GNode, bn: nn.Module) -> float:
    args = _bn_args(node) if not node.leaf_module else None
    eps = args.get("eps") if args else None
    return float(eps) if isinstance(eps, (int, float)) else float(bn.eps)


def _check_region(node: GNode, ctx: FoldContext) -> str | None:
    """The BN module's forward must become the identity once its batch_norm op is folded away."""
    region = ctx.regions.get(node.call_key, [node]) if node.call_key is not None else [node]
    region = [n for n in region if n.op not in ops.SHAPE_ONLY]
    if region == [node]:
        return None
    members = set(map(id, region))
    extra = [n for n in region if n is not node and not _is_data_movement(n, ctx)]
    if extra:
        return f"its forward does more than batch_norm ({', '.join(sorted({n.op for n in extra}))})"
    inputs, outputs = [], []
    for n in region:
        src = n.args[0] if n.args else None
        if isinstance(src, GNode) and id(src) not in members and src not in inputs:
            inputs.append(src)
        if any(id(u) not in members for u in n.users):
            outputs.append(n)
    if len(inputs) != 1 or len(outputs) != 1:
        return "its forward is not a single chain from one input to one output"
    x, y = inputs[0], outputs[0]
    if x.shape is None or y.shape is None or any(n.shape is None for n in region if n.op in ops.RESHAPE):
        return "no shape information for its forward"
    if tuple(x.shape) != tuple(y.shape):
        return (f"its forward changes the shape {tuple(x.shape)} → {tuple(y.shape)}: it cannot be "
                "replaced by Identity")
    if all(n is node or n.op in ops.RESHAPE | ops.IDENTITY for n in region):
        # Reshapes keep the row-major order and batch_norm keeps the shape: same shape in and out is
        # the identity, without tracing an index tensor the size of the activation (a TokenBatchNorm
        # of a large model: millions of elements, for each of its BNs).
        return None
    env = {id(x): torch.arange(math.prod(x.shape), dtype=torch.int64).reshape(x.shape)}
    for n in region:
        env[id(n)] = ops.apply_move(n, env[id(n.args[0])])
    if not torch.equal(env[id(y)], env[id(x)]):
        return "its forward rearranges the data: it cannot be replaced by Identity"
    return None


def _check_target(t: Target, site: Site, stats: _Stats, ctx: FoldContext) -> str | None:
    node, position = t.node, site.position
    kind, cls = t.kind, t.read.row.owner_class()
    caller_path = node.module_path or ""
    caller = ctx.module(node.module_path)  # the module whose forward runs the op
    path = t.path
    role = "producer" if position == "after" else "consumer"
    if t.role is not None:
        why = _check_attention(t, role, caller)
        if why:
            return why
        mod = ctx.module(t.params_at)
    elif kind == "linear_t":
        mod = caller
        if cls is None or not isinstance(mod, cls):
            owner = type(mod).__name__ if mod is not None else "the model"
            return (f"addmm in {path or '<root>'} ({owner}) is not a transformers Conv1D's forward: no "
                    "module owns its weight as a Linear")
        if node.arg(3, "beta", 1) != 1 or node.arg(4, "alpha", 1) != 1:
            return f"{role} {path}: its addmm scales with beta/alpha, not the plain Conv1D forward"
        if getattr(mod, "weight", None) is None or mod.weight.dim() != 2:
            return f"{role} {path} has no 2-D weight"
    elif not isinstance(caller, cls):
        owner = type(caller).__name__ if caller is not None else "the model"
        return (f"functional {node.op} in {path or '<root>'} ({owner}): its weight is not owned by an "
                f"nn.{cls.__name__}")
    else:
        mod = caller
    calls = ctx.calls.get(caller_path, set())
    if len(calls) > 1:
        return f"{role} {caller_path} is called {len(calls)} times (shared): folding would change every call"
    for m, where in ((caller, caller_path), (mod, t.params_at)):
        paths = ctx.aliases(m)
        if len(paths) > 1:
            return f"{role} {where} is the same module as {', '.join(p for p in paths if p != where)} (shared)"
        if torch.nn.utils.parametrize.is_parametrized(m):
            return f"{role} {where} is parametrized: its weight is computed in the forward"
        if m._forward_hooks or m._forward_pre_hooks:
            # An FX leaf hides what a hook does to the output or input; the fold would move past it.
            return f"{role} {where} has forward hooks, which may change what the fold assumes it computes"
        if m is mod:
            break
    for pname in (t.weight, t.bias):
        p = getattr(mod, pname, None)
        if p is None:
            continue
        names = ctx.param_names.get(id(p), [])
        if len(names) > 1:
            qual = _join(t.params_at, pname)
            return f"{role} {qual} is tied to {', '.join(n for n in names if n != qual)}"
        if not p.is_floating_point():
            return f"{role} {path}.{pname} is not floating point"
    if not node.leaf_module:
        for v, pname in ((t.read.weight, t.weight), (t.read.bias, t.bias)):
            own = getattr(mod, pname)
            if v is None and own is None:
                continue
            if v is None and pname == t.bias and (id(mod), pname) in ctx.created_bias:
                continue  # an earlier fold in this pass gave it the bias the captured graph lacks
            if v is None:
                return f"{role} {path} does not use its own {pname} in the forward"
            if not isinstance(v, GNode) or v.op != "param":
                return f"{role} {path}.{pname} is computed in the forward (parametrized?)"
            if v.param != _join(t.params_at, pname):
                return f"{role} {path}.{pname} is tied to {v.param}"
            if len(v.users) > 1:
                return f"{role} {path}.{pname} is used by {len(v.users)} ops (shared)"
    for n in t.read.weight_chain:  # W.T read elsewhere too: the fold would change that reader
        if len(n.users) > 1:
            return f"{role} {path}.{t.weight} is read through {n.op} by {len(n.users)} ops (shared)"
    if t.row.name == "linear_matmul" and getattr(mod, t.bias, None) is None:
        why = _adds_a_bias(mod, role, path)
        if why:
            return why
    for pname in (t.weight, t.bias):
        # a leaf-module op reads its weight without a param node; any other read is a second use
        uses = ctx.param_users.get(_join(t.params_at, pname), 0) - (0 if node.leaf_module else 1)
        if getattr(mod, pname, None) is not None and uses > 0:
            return f"{role} {_join(t.params_at, pname)} is also read outside {caller_path or '<root>'} (shared)"
    n = stats.num_features
    scale, shift = fold_math.bn_scale_shift(stats.running_mean, stats.running_var, stats.eps, stats.weight,
                                            stats.bias)
    why = ft.commute_reason(t.chain, scale)  # a max-pool between: every scale >= 0
    if why:
        return why
    n_in, n_out = _in_out(t, mod)
    if position == "after":
        return ft.producer_reason(path, ft.Reach(node, t.read, t.chain), site.node, n_out, n)
    if kind in ("conv", "conv_transpose"):
        why = ft.before_reason(t.row, path, shift, padding=mod.padding, dilation=mod.dilation,
                               kernel=mod.kernel_size, stride=mod.stride,
                               output_padding=getattr(mod, "output_padding", None), padding_mode=mod.padding_mode)
        if why:
            return why
    return _consumer_channels(t, n)[1]


def _adds_a_bias(mod: nn.Module, role: str, path: str) -> str | None:
    """A bias-less Linear subclass running ``x @ self.weight.T``: the fold gives it a bias, which only
    helps if its forward then adds it. Proved on a probe row (the graph shows only the bias-less
    branch); ``mod`` is left as it was."""
    w = mod.weight
    x = torch.linspace(-1.0, 1.0, w.shape[1], dtype=w.dtype, device=w.device).unsqueeze(0)
    b = torch.linspace(1.0, 2.0, w.shape[0], dtype=w.dtype, device=w.device)
    try:
        with torch.no_grad():
            plain = mod(x)
            mod.bias = nn.Parameter(b, requires_grad=False)
            biased = mod(x)
    except Exception as e:  # noqa: BLE001 - any failure means the forward does not take a bias
        return f"{role} {path} has no bias and its forward fails with one ({type(e).__name__})"
    finally:
        mod.bias = None
    try:
        torch.testing.assert_close(biased, plain + b)
    except AssertionError:
        return f"{role} {path} has no bias, and its forward does not add one given it: the fold needs a bias"
    return None


def _in_out(t: Target, mod: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a target."""
    w = getattr(mod, t.weight)
    if t.kind == "linear":
        return w.shape[1], w.shape[0]
    if t.kind == "linear_t":
        return w.shape[0], w.shape[1]
    return mod.in_channels, mod.out_channels


def _consumer_channels(t: Target, n: int) -> tuple[ops.Channels | None, str | None]:
    """Where the BN's ``n`` channels sit in the consumer's input (possibly merged with other axes)."""
    return ft.consumer_channels(t.path, ft.Reach(t.node, t.read, t.chain), n)


def _check_attention(t: Target, role: str, mha: nn.Module) -> str | None:
    """nn.MultiheadAttention folds where its forward reads whole parameters: the packed in-projection
    (q, k and v are the same tensor) before it, ``out_proj`` after it."""
    if t.role == "attention":
        if not mha._qkv_same_embed_dim:
            return (f"{role} {t.path} (MultiheadAttention with kdim/vdim != embed_dim) reads the BN only as its "
                    "query, or key/value: separate q/k/v_proj_weight with biases sliced from in_proj_bias, "
                    "which the fold does not edit")
        return (f"{role} {t.path} (MultiheadAttention) reads the BN as its query, or key and value, not as all three "
                "(cross-attention): the projection it reaches is a slice of the packed in_proj_weight, which the "
                "fold does not edit")
    if (t.role == "in_proj") != (role == "consumer"):
        return f"{role} {t.path}: the BN is on the wrong side of MultiheadAttention's {t.role}"
    if t.role == "out_proj" and not isinstance(mha.out_proj, nn.Linear):
        return f"{role} {t.path} is not an nn.Linear"
    return None


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- rewrite -------------------------------------------------------------------------------------

def rewrite(site: Site, ctx: FoldContext, undo: UndoLog) -> Action:
    """Fold ``site`` into the model's modules; ``undo`` learns how to take it back."""
    stats = _stats(site, ctx)
    scale, shift = fold_math.bn_scale_shift(stats.running_mean, stats.running_var, stats.eps, stats.weight,
                                            stats.bias)
    for t in site.targets:
        mod = ctx.module(t.params_at)
        w, b = getattr(mod, t.weight), getattr(mod, t.bias)
        ch = _consumer_channels(t, stats.num_features)[0] if site.position == "before" else None
        nw, nb = ft.fold(t.row, site.position, w, b, scale, shift, groups=getattr(mod, "groups", 1), channels=ch)
        undo.save_param(mod, t.weight)
        undo.save_param(mod, t.bias)
        if b is None:
            ctx.created_bias.add((id(mod), t.bias))
        _set_param(mod, t.weight, nw, w)
        _set_param(mod, t.bias, nb, w)
        if t.role == "in_proj" and mod.out_proj.bias is None:
            # The fused eval path (torch._native_multi_head_attention) runs once in_proj_bias exists and
            # needs out_proj.bias too: a zero bias changes nothing else.
            out = mod.out_proj
            undo.save_param(out, "bias")
            ctx.created_bias.add((id(out), "bias"))
            _set_param(out, "bias", torch.zeros(out.weight.shape[0], dtype=out.weight.dtype,
                                                device=out.weight.device), out.weight)
    detail: dict[str, Any] = {"into": site.into, "position": site.position,
                              "via": [n.op for n in site.targets[0].chain] if len(site.targets) == 1 else []}
    bn = ctx.module(site.norm)
    if isinstance(bn, _BN) or bn_like.is_bn_like(bn):
        parent_path, _, name = site.norm.rpartition(".")
        parent = ctx.module(parent_path)
        undo.save_child(parent, name)
        setattr(parent, name, nn.Identity())
    else:
        _make_identity(site, stats, ctx, undo)
        detail["functional"] = True
    return Action("folded", site.norm, detail)


def _make_identity(site: Site, stats: _Stats, ctx: FoldContext, undo: UndoLog) -> None:
    """A functional batch_norm stays in the forward: reset the tensors it reads so it computes x."""
    args = _bn_args(site.node)
    for name in ("running_mean", "running_var", "weight", "bias"):
        v = args.get(name)
        if v is not None:
            owner, _, attr = v.param.rpartition(".")
            undo.save_param(ctx.module(owner), attr)
    with torch.no_grad():
        stats.running_mean.zero_()
        if stats.weight is not None:  # x / √(1 + eps) · √(1 + eps)
            stats.running_var.fill_(1.0)
            stats.weight.fill_(math.sqrt(1.0 + stats.eps))
        else:  # x / √((1 − eps) + eps)
            stats.running_var.fill_(1.0 - stats.eps)
        if stats.bias is not None:
            stats.bias.zero_()


def _set_param(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    p = getattr(module, name)
    if p is None:
        setattr(module, name, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        with torch.no_grad():
            p.copy_(value)


def entry_reason(entry: NormEntry, ctx: FoldContext, failed_paths: dict[str, str | None]) -> str | None:
    if not entry.nodes:
        for path, error in failed_paths.items():
            if entry.norm == path or entry.norm.startswith(path + "."):
                return f"in a part that could not be captured ({error})"
        if ctx.param_users.get(_join(entry.norm, "running_mean"), 0):
            return "not called as a module: a functional batch_norm reads its statistics (reported on its own line)"
        return "never called in the forward pass on the example inputs"
    if len(entry.nodes) > 1:
        return f"called {len(entry.nodes)} times in the forward pass"
    if entry.module is None:
        why = _check_functional(entry.nodes[0], ctx)
    else:
        why = _check_norm(entry.module, entry.nodes[0], ctx)
    if why:
        return why
    if not entry.sites:
        return combine(entry.reasons)
    return None


def combine(why: dict[str, str]) -> str:
    parts = []
    if "after" in why:
        parts.append(f"no producer to fold into: {why['after']}")
    if "before" in why:
        parts.append(f"no consumer to fold into: {why['before']}")
    return "; ".join(parts) or "no foldable neighbour"


