"""Fold an inference-mode BatchNorm inside a ``torch.export`` program: the rule (match, check, rewrite).

``fold_bn`` edits the user's ``nn.Module``; a ``.pt2`` archive has no module to edit, only a graph over
lifted state. This rule rewrites that graph itself, with the same rules:

- **match** (read-only): every batch-norm node, in whatever form the program holds it
  (``graph.ops.BATCH_NORM_FORMS``), walked backwards through data-movement ops (``graph.ops``) to a
  producer (linear, conv, conv_transpose, convolution, addmm, mm) and forwards to consumers (linear,
  unpadded conv). Sites name nodes, not objects, so the same site can be applied to a fresh copy.
- **check**: a reason to skip, or None. The layout checks are ``fold_bn``'s own (``producer_layout``,
  ``consumer_layout``: the channel axis tracked through every view/reshape/permute, never guessed); a
  weight read by two nodes, a producer output used elsewhere, a nonlinearity between, a padded conv
  consumer, a training-mode batch norm are refused.
- **rewrite**: on a ``ProgramEdit`` (a fresh copy of the graph, signature and state), the
  producer's/consumer's tensors are replaced by the folded ones (``fold_math``, float64), a bias the
  fold creates becomes a new placeholder + ``InputSpec`` + state entry of its weight's kind (parameter,
  buffer or constant), the batch-norm node is removed and its now unread state dropped.

``ProgramEdit.finish()`` rebuilds an ``ExportedProgram`` with its own constructor (its verifier runs),
keeping the range constraints: dynamic dimensions stay dynamic. The pass that runs this rule with
verification and rollback (re-applying sites to fresh copies: a program is never edited in place) is
``passes.fold.fold_program``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from .. import fold_math
from ..graph import GNode, ops
from ..graph.capture import program_nodes
from ..report import Action
from .fold_bn import WEIGHTED_OPS, consumer_layout, producer_layout, reads_padding, where

__all__ = ["ProgramSite", "ProgramEntry", "ProgramEdit", "match", "rewrite", "count_batch_norms"]

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def count_batch_norms(ep: ExportedProgram) -> int:
    """Batch-norm nodes in ``ep``'s graph, every form counted."""
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._opname in ops.BATCH_NORM_FORMS)


# --- data model ----------------------------------------------------------------------------------------

@dataclass
class _Weighted:
    """What a weighted op reads: activation, weight (a state placeholder or not), bias, conv details."""

    kind: str  # linear | linear_t | conv | conv_transpose
    input: Any
    weight: Any  # the GNode holding the (out, in)/(in, out)/conv weight
    bias: Any
    bias_index: int
    view: GNode | None = None  # the transpose between a decomposed linear's weight and its addmm
    spatial: int = 0
    groups: int = 1
    padding: Any = 0
    dilation: Any = 1


@dataclass
class ProgramTarget:
    path: str
    node: str  # the weighted op's node name
    kind: str
    weight: str  # placeholder names
    bias: str | None
    bias_index: int
    groups: int
    via: list[str] = field(default_factory=list)


@dataclass
class ProgramSite:
    norm: str
    node: str  # the batch-norm node
    extra: list[str]  # getitem nodes of a tuple-returning form (removed with it)
    position: str
    targets: list[ProgramTarget]
    stats: dict[str, str | None]  # weight/bias/running_mean/running_var -> placeholder name
    eps: float

    @property
    def into(self) -> list[str]:
        return [t.path for t in self.targets]


@dataclass
class ProgramEntry:
    norm: str
    node: GNode
    functional: bool = False
    sites: list[ProgramSite] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    reason: str | None = None


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _weighted(node: GNode) -> _Weighted | None:
    op = node.op
    if op == "linear":
        return _Weighted("linear", node.arg(0, "input"), node.arg(1, "weight"), node.arg(2, "bias"), 2)
    spec = WEIGHTED_OPS.get(op)
    if op == "convolution" or (spec is not None and spec[0] in ("conv", "conv_transpose")):
        transposed = bool(node.arg(6, "transposed")) if op == "convolution" else spec[0] == "conv_transpose"
        # convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups);
        # conv_transposeNd(x, w, b, stride, padding, output_padding, groups, dilation);
        # convNd(x, w, b, stride, padding, dilation, groups)
        if op == "convolution":
            pad, dil, groups = node.arg(4, "padding", 0), node.arg(5, "dilation", 1), node.arg(8, "groups", 1)
        elif transposed:
            pad, dil, groups = node.arg(4, "padding", 0), node.arg(7, "dilation", 1), node.arg(6, "groups", 1)
        else:
            pad, dil, groups = node.arg(4, "padding", 0), node.arg(5, "dilation", 1), node.arg(6, "groups", 1)
        w = node.arg(1, "weight")
        spatial = len(w.shape) - 2 if isinstance(w, GNode) and w.shape is not None else (spec[2] if spec else 0)
        return _Weighted("conv_transpose" if transposed else "conv", node.arg(0, "input"), w,
                         node.arg(2, "bias"), 2, None, spatial, groups if isinstance(groups, int) else -1, pad, dil)
    if op in ("addmm", "mm"):  # mm: a decomposed bias-free linear; a created bias turns it into addmm
        x, w, b = (node.arg(1, "mat1"), node.arg(2, "mat2"), node.arg(0, "input")) if op == "addmm" else (
            node.arg(0, "self"), node.arg(1, "mat2"), None)
        if _transposed_param(w):  # addmm(b, x, w.t()): a decomposed linear over its (out, in) weight
            return _Weighted("linear", x, w.args[0], b, 0, view=w)
        return _Weighted("linear_t", x, w, b, 0)
    return None


def _transposed_param(w: Any) -> bool:
    """``w`` is a 2-D state tensor with its two axes swapped (``t``/``transpose``/``permute``)."""
    return (isinstance(w, GNode) and w.op in ops.PERMUTE | ops.TRANSPOSE and ops.is_data_movement(w)
            and w.args[0].op == "param" and w.shape is not None and len(w.shape) == 2
            and ops.map_axis(w, 0)[0] == 1)


# --- match -----------------------------------------------------------------------------------------------

def match(ep: ExportedProgram) -> list[ProgramEntry]:
    """Every batch-norm node of the program with the sites it could fold at (read-only)."""
    entries: list[ProgramEntry] = []
    for node in program_nodes(ep):
        if node.op not in ops.BATCH_NORM_FORMS or not isinstance(node.target, torch._ops.OpOverload):
            continue
        args = ops.batch_norm_args(node)
        stats = {k: args.get(k) for k in ("weight", "bias", "running_mean", "running_var")}
        rm = stats["running_mean"]
        if not (isinstance(rm, GNode) and rm.op == "param"):
            entries.append(ProgramEntry(f"{node.module_path or '<root>'}:{node.name}", node, True, reason=(
                "functional batch_norm whose running statistics are not the program's state")))
            continue
        entry = ProgramEntry(_owner(rm.param), node)
        entries.append(entry)
        entry.reason = _check_norm(node, args, stats)
        if entry.reason is not None:
            continue
        out, extra, why = _norm_output(node)
        if out is None:
            entry.reason = why
            continue
        eps = float(args.get("eps", 1e-5))
        names = {k: (v.name if isinstance(v, GNode) else None) for k, v in stats.items()}
        for position, find in (("after", _match_after), ("before", _match_before)):
            targets, why = find(node if position == "after" else out)
            if targets is None:
                entry.reasons[position] = why
            else:
                entry.sites.append(ProgramSite(entry.norm, node.name, [e.name for e in extra], position,
                                               targets, names, eps))
    return entries


def _check_norm(node: GNode, args: dict, stats: dict) -> str | None:
    training = ops.BATCH_NORM_FORMS[node.op]
    if training is None:
        training = args.get("training")
    if training is not False:
        return ("in training mode: it normalizes with batch statistics (export the model after "
                "model.eval())")
    for name, v in stats.items():
        if v is None and name in ("weight", "bias"):
            continue
        if not (isinstance(v, GNode) and v.op == "param"):
            return f"its {name} is computed in the program, not read from its state"
        if len(v.users) > 1:
            return f"its {name} is read by {len(v.users)} nodes (the BatchNorm is called {len(v.users)} times)"
    if not isinstance(args.get("eps", 1e-5), (int, float)):
        return "cannot read its eps"
    return None


def _norm_output(node: GNode) -> tuple[GNode | None, list[GNode], str]:
    """The node carrying the normalized tensor (a tuple-returning form's ``getitem 0``)."""
    if node.shape is not None or not node.users or all(u.op != "getitem" for u in node.users):
        return node, [], ""
    out, extra = None, []
    for u in node.users:
        if u.op != "getitem":
            return None, [], f"its result feeds {where(u)} as a tuple"
        if u.args[1] == 0:
            out = u
        elif u.users:
            return None, [], f"its saved statistics (output {u.args[1]}) are used by {where(u.users[0])}"
        extra.append(u)
    if out is None:
        return None, [], "its output is not used"
    return out, extra, ""


def _match_after(bn: GNode) -> tuple[list[ProgramTarget] | None, str]:
    chain: list[GNode] = []
    x = bn.args[0] if bn.args else None
    while isinstance(x, GNode) and ops.is_data_movement(x):
        chain.append(x)
        x = x.args[0]
    if not isinstance(x, GNode):
        return None, "no input node"
    chain.reverse()
    w = _weighted(x)
    if w is not None:
        t = _target(x, w, "producer", chain)
        if isinstance(t, str):
            return None, t
        why = _check_producer(x, w, t, chain, bn)
        return (None, why) if why else ([t], "")
    if x.op in ("input", "param"):
        return None, "its input is a graph input, not a Linear/Conv output"
    if ops.is_nonlinear(x):
        src = x.args[0] if x.args else None
        while isinstance(src, GNode) and ops.is_data_movement(src):
            src = src.args[0]
        if isinstance(src, GNode) and _weighted(src) is not None:
            return None, f"a nonlinearity ({where(x)}) sits between {src.op} {src.module_path} and the BN"
    return None, f"its input comes from {where(x)}, not from a Linear/Conv"


def _match_before(out: GNode) -> tuple[list[ProgramTarget] | None, str]:
    found: list[tuple[GNode, _Weighted, list[GNode]]] = []
    stack: list[tuple[GNode, list[GNode]]] = [(out, [])]
    while stack:
        node, chain = stack.pop()
        users = ops.data_users(node)
        if not users:
            return None, "its output is not used"
        for u in users:
            w = _weighted(u) if u.op != "output" else None
            if u.op == "output":
                return None, "its output is a model output"
            if w is not None and w.input is node:
                if any(a is node for a in (w.weight, w.bias, w.view)):
                    return None, f"its output is also a weight of {where(u)}"
                found.append((u, w, chain))
            elif u.args and u.args[0] is node and ops.is_data_movement(u):
                stack.append((u, chain + [u]))
            elif ops.is_nonlinear(u):
                return None, f"its output feeds a nonlinearity ({where(u)})"
            else:
                return None, f"its output feeds {where(u)}, not only Linear/Conv layers"
    targets = []
    for u, w, chain in sorted(found, key=lambda f: f[0].name):
        t = _target(u, w, "consumer", chain)
        if isinstance(t, str):
            return None, t
        why = _check_consumer(u, w, t, chain, out)
        if why:
            return None, why
        targets.append(t)
    return targets, ""


# --- check ------------------------------------------------------------------------------------------------

def _target(node: GNode, w: _Weighted, role: str, chain: list[GNode]) -> ProgramTarget | str:
    """The target's placeholders, or why its weight/bias cannot be rewritten in the program's state."""
    where = node.module_path or "<root>"
    if not (isinstance(w.weight, GNode) and w.weight.op == "param"):
        return f"{role} {node.op} in {where}: its weight is computed in the program, not read from its state"
    path = _owner(w.weight.param)
    readers = len(w.weight.users) + (len(w.view.users) - 1 if w.view is not None else 0)
    if readers > 1:
        return f"{role} {path}.weight is read by {readers} nodes (shared)"
    if w.weight.dtype is not None and not w.weight.dtype.is_floating_point:
        return f"{role} {path}.weight is not floating point"
    if w.bias is not None:
        if not (isinstance(w.bias, GNode) and w.bias.op == "param"):
            return f"{role} {path}: its bias is computed in the program, not read from its state"
        if len(w.bias.users) > 1:
            return f"{role} {path}'s bias is read by {len(w.bias.users)} nodes (shared)"
    if w.kind == "linear_t" and (w.weight.shape is None or len(w.weight.shape) != 2):
        return f"{role} {path}: addmm with a weight that is not 2-D"
    if node.op == "addmm" and (node.arg(3, "beta", 1) != 1 or node.arg(4, "alpha", 1) != 1):
        return f"{role} {path}: its addmm scales with beta/alpha"
    if w.groups < 1:
        return f"{role} {path}: cannot read its groups"
    return ProgramTarget(path, node.name, w.kind, w.weight.name, w.bias.name if w.bias is not None else None,
                         w.bias_index, w.groups, [n.op for n in chain])


def _out_channels(w: _Weighted) -> int | None:
    s = w.weight.shape
    if s is None:
        return None
    return {"linear": s[0], "linear_t": s[-1], "conv": s[0], "conv_transpose": s[1] * w.groups}[w.kind]


def _in_channels(w: _Weighted) -> int | None:
    s = w.weight.shape
    if s is None:
        return None
    return {"linear": s[1], "linear_t": s[0], "conv": s[1] * w.groups, "conv_transpose": s[0]}[w.kind]


def _bn_channels(bn: GNode) -> int | None:
    rm = ops.batch_norm_args(bn).get("running_mean")
    return rm.shape[0] if isinstance(rm, GNode) and rm.shape else None


def _check_producer(node: GNode, w: _Weighted, t: ProgramTarget, chain: list[GNode], bn: GNode) -> str | None:
    return producer_layout(t.path, node, chain, bn, w.kind, w.spatial, _out_channels(w), _bn_channels(bn))


def _check_consumer(node: GNode, w: _Weighted, t: ProgramTarget, chain: list[GNode], out: GNode) -> str | None:
    kernel = w.weight.shape[2:] if w.weight.shape is not None else [2] * w.spatial
    dilation = w.dilation if isinstance(w.dilation, (list, tuple)) else [w.dilation] * w.spatial
    zero_padded = w.kind == "conv" and reads_padding(w.padding, dilation, kernel)
    bn = out if out.op in ops.BATCH_NORM_FORMS else out.args[0]
    return consumer_layout(t.path, w.input, chain, w.kind, w.spatial, _in_channels(w), _bn_channels(bn),
                           padding=str(w.padding) if zero_padded else None)


# --- rewrite ------------------------------------------------------------------------------------------------

def _copy(obj: Any) -> Any:
    with warnings.catch_warnings():  # torch's own deprecation noise from copying pytree specs
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)


class ProgramEdit:
    """A fresh, editable copy of the program's graph, signature and state."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.gm = _copy(ep.graph_module)
        for old, new in zip(ep.graph.nodes, self.gm.graph.nodes):
            new.name = old.name  # the copy renames nodes that shadow builtins ("input"); the signature names them
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.input_specs = copy.deepcopy(list(ep.graph_signature.input_specs))
        self.output_specs = copy.deepcopy(list(ep.graph_signature.output_specs))
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self.renames: dict[str, str] = {}
        self.folded_norms: list[str] = []

    def _spec(self, name: str) -> InputSpec:
        return next(s for s in self.input_specs if isinstance(s.arg, TensorArgument) and s.arg.name == name)

    def _store(self, spec: InputSpec) -> dict:
        in_state = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
        return self.state_dict if in_state else self.constants

    def tensor(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        spec = self._spec(name)
        return self._store(spec)[spec.target]

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        spec = self._spec(name)
        store = self._store(spec)
        old = store[spec.target]
        # a new object: the input program's tensors are never written to
        store[spec.target] = (nn.Parameter(value, requires_grad=old.requires_grad)
                              if isinstance(old, nn.Parameter) else value)

    def add_like(self, after: str, target: str, value: torch.Tensor) -> torch.fx.Node:
        """A new placeholder next to ``after``'s, of its kind (parameter, buffer, constant), registered in
        the signature and the state: placeholders stay grouped by kind, as the program's verifier expects."""
        taken = {s.target for s in self.input_specs} | set(self.state_dict) | set(self.constants)
        while target in taken:
            target += "_folded"
        anchor = self.nodes[after]
        with self.gm.graph.inserting_after(anchor):
            node = self.gm.graph.placeholder("p_" + target.replace(".", "_"))
        val = anchor.meta.get("val")
        fake_mode = getattr(val, "fake_mode", None)
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode is not None else value
        self.nodes[node.name] = node
        like = self._spec(after)
        spec = InputSpec(like.kind, TensorArgument(node.name), target, like.persistent)
        self.input_specs.insert(self.input_specs.index(like) + 1, spec)
        old = self.tensor(after)
        self._store(spec)[target] = (nn.Parameter(value, requires_grad=old.requires_grad)
                                     if isinstance(old, nn.Parameter) else value)
        return node

    def remove_norm(self, site: ProgramSite) -> None:
        bn = self.nodes[site.node]
        extra = [self.nodes[n] for n in site.extra]
        out = next((e for e in extra if e.args[1] == 0), bn)
        src = bn.args[0]
        out.replace_all_uses_with(src)
        self.renames[out.name] = src.name
        for n in [*extra, bn]:
            self.gm.graph.erase_node(n)
            del self.nodes[n.name]
        self.folded_norms.append(site.norm)

    def finish(self) -> ExportedProgram:
        """The edited copy as a new ``ExportedProgram`` (its constructor verifies it)."""
        dead = {f"{p}.{s}" if p else s for p in self.folded_norms for s in _BN_STATE}
        for spec in list(self.input_specs):
            node = self.nodes.get(spec.arg.name) if isinstance(spec.arg, TensorArgument) else None
            if node is not None and spec.target in dead and not node.users:
                self.gm.graph.erase_node(node)
                del self.nodes[node.name]
                self.input_specs.remove(spec)
                self._store(spec).pop(spec.target, None)
        for spec in self.output_specs:
            if isinstance(spec.arg, TensorArgument):
                spec.arg = TensorArgument(self._renamed(spec.arg.name))
        call_graph = _copy(self.ep.module_call_graph)
        for entry in call_graph:
            sig = entry.signature
            if sig is not None:
                sig.outputs = [TensorArgument(self._renamed(a.name)) if isinstance(a, TensorArgument) else a
                               for a in sig.outputs]
        self.gm.graph.lint()
        self.gm.recompile()
        return ExportedProgram(
            root=self.gm, graph=self.gm.graph,
            graph_signature=ExportGraphSignature(self.input_specs, self.output_specs),
            state_dict=self.state_dict, range_constraints=_copy(self.ep.range_constraints),
            module_call_graph=call_graph, example_inputs=self.ep.example_inputs, constants=self.constants,
            verifiers=self.ep.verifiers)

    def _renamed(self, name: str) -> str:
        while name in self.renames:
            name = self.renames[name]
        return name


def rewrite(site: ProgramSite, work: ProgramEdit) -> Action:
    """Fold ``site`` into ``work``'s copy of the program."""
    s = {k: work.tensor(v) for k, v in site.stats.items()}
    scale, shift = fold_math.bn_scale_shift(s["running_mean"], s["running_var"], site.eps, s["weight"], s["bias"])
    for t in site.targets:
        op = work.nodes[t.node]
        bias_node = _bias_arg(op, t.bias_index)  # an earlier site may have given it one
        w, b = work.tensor(t.weight), work.tensor(bias_node.name if bias_node is not None else None)
        nw, nb = fold_math.fold_bn_into(t.kind, site.position, w, b, scale, shift, groups=t.groups)
        work.set_tensor(t.weight, nw)
        if bias_node is None:
            target = _owner(work._spec(t.weight).target)
            _set_bias_arg(op, t.bias_index, work.add_like(t.weight, f"{target}.bias" if target else "bias", nb))
        else:
            work.set_tensor(bias_node.name, nb)
    work.remove_norm(site)
    via = site.targets[0].via if len(site.targets) == 1 else []
    return Action("folded", site.norm, {"into": site.into, "position": site.position, "via": via})


def _bias_arg(op: torch.fx.Node, index: int) -> torch.fx.Node | None:
    if op.target is torch.ops.aten.mm.default:
        return None
    b = op.args[index] if index < len(op.args) else op.kwargs.get("bias")
    return b if isinstance(b, torch.fx.Node) else None


def _set_bias_arg(op: torch.fx.Node, index: int, value: torch.fx.Node) -> None:
    if op.target is torch.ops.aten.mm.default:  # mm(x, w) + b is addmm(b, x, w)
        op.target, op.args = torch.ops.aten.addmm.default, (value, *op.args)
        return
    if index < len(op.args):
        op.update_arg(index, value)
    elif "bias" in op.kwargs or len(op.args) < index:
        op.update_kwarg("bias", value)
    else:
        op.args = (*op.args, value)


