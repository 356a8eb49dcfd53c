"""Fold an inference-mode BatchNorm inside a ``torch.export`` program: the ExportedProgram editor.

``fold_bn`` edits the user's ``nn.Module``; a ``.pt2`` archive has no module to edit, only a graph over
lifted state. This editor rewrites that graph itself. What to fold is decided by the shared table and
matcher (``passes.fold_targets``), the same rows the module and ONNX editors read:

- **match** (read-only): every batch-norm node, in whatever form the program holds it
  (``graph.ops.BATCH_NORM_FORMS``); ``fold_targets.match_after``/``match_before`` walk through
  data-movement ops (and max-pools) to the producer and the consumers, ``read_torch`` recognizing every
  row's forms (``linear``, ``convNd``/``convolution`` incl. ConvTranspose and groups, ``addmm``/``mm``/
  ``bmm`` over a transposed weight after ``run_decompositions()``, transformers' Conv1D, ``x @ W``).
  Sites name nodes, not objects, so the same site can be applied to a fresh copy.
- **check** (done in match: the program holds the numbers): a weight or bias read by two nodes or
  computed in the program, a training-mode batch norm, and the table's shared checks
  (``producer_reason``, ``consumer_channels``: merged channels and one-channel BNs included,
  ``before_reason``: padded convs and the ConvTranspose rule, ``commute_reason``: max-pool signs).
- **rewrite**: on a ``ProgramEdit`` (a fresh copy of the graph, signature and state), the
  producer's/consumer's tensors are replaced by the folded ones (``fold_targets.fold``: ``fold_math``,
  float64), a bias the fold creates becomes a new placeholder + ``InputSpec`` + state entry of its
  weight's kind (parameter, buffer or constant; ``mm`` becomes ``addmm``, a ``bmm``/``matmul`` gets an
  ``add``), the batch-norm node is removed and its now unread state dropped.

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
from . import fold_targets as ft
from .fold_targets import where

__all__ = ["ProgramSite", "ProgramEntry", "ProgramEdit", "match", "rewrite", "count_batch_norms"]

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def count_batch_norms(ep: ExportedProgram) -> int:
    """Batch-norm nodes in ``ep``'s graph, every form counted."""
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._opname in ops.BATCH_NORM_FORMS)


# --- data model ----------------------------------------------------------------------------------------

@dataclass
class ProgramTarget:
    path: str
    node: str  # the weighted op's node name
    kind: str
    weight: str  # placeholder names
    bias: str | None
    bias_index: int | None  # None: the op takes no bias (mm, bmm, matmul): the fold adds one
    groups: int
    via: list[str] = field(default_factory=list)
    row: str = "linear"  # the fold_targets row
    stride: int = 1  # channels merged with the axes after them (before-folds: ops.Channels.stride)


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


# --- match -----------------------------------------------------------------------------------------------

def match(ep: ExportedProgram) -> list[ProgramEntry]:
    """Every batch-norm node of the program with the sites it folds at (checked: see the module docstring)."""
    entries: list[ProgramEntry] = []
    state = _state_by_placeholder(ep)
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
        tensors = {k: state.get(v) for k, v in names.items()}
        scale, shift = fold_math.bn_scale_shift(tensors["running_mean"], tensors["running_var"], eps,
                                                tensors["weight"], tensors["bias"])
        n_bn = rm.shape[0] if rm.shape else None
        sites, entry.reasons = ft.plan(node, out, n_bn, scale, shift, own=_own, name=_path)
        for site in sites:
            targets = [_target(r, ch) for r, ch in zip(site.reaches, site.channels)]
            entry.sites.append(ProgramSite(entry.norm, node.name, [e.name for e in extra], site.position,
                                           targets, names, eps))
    return entries


def _state_by_placeholder(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    out = {}
    for spec in ep.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.target is not None:
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if isinstance(t, torch.Tensor):
                out[spec.arg.name] = t
    return out


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


def _path(reach: ft.Reach) -> str:
    w = reach.read.weight
    return _owner(w.param) if isinstance(w, GNode) and w.op == "param" else (reach.node.module_path or "<root>")


def _own(reach: ft.Reach, role: str) -> str | None:
    """Why the target's weight/bias cannot be rewritten in the program's state (read elsewhere, computed)."""
    node, w = reach.node, reach.read
    if not (isinstance(w.weight, GNode) and w.weight.op == "param"):
        return (f"{role} {node.op} in {node.module_path or '<root>'}: its weight is computed in the program, not "
                "read from its state")
    path = _path(reach)
    readers = max([len(w.weight.users), *(len(n.users) for n in w.weight_chain)])
    if readers > 1:
        return f"{role} {path}.weight is read by {readers} nodes (shared)"
    if w.weight.dtype is not None and not w.weight.dtype.is_floating_point:
        return f"{role} {path}.weight is not floating point"
    if w.bias is not None:
        if not (isinstance(w.bias, GNode) and w.bias.op == "param"):
            return f"{role} {path}: its bias is computed in the program, not read from its state"
        if len(w.bias.users) > 1:
            return f"{role} {path}'s bias is read by {len(w.bias.users)} nodes (shared)"
    if w.groups is None or w.groups < 1:
        return f"{role} {path}: cannot read its groups"
    return None


def _target(reach: ft.Reach, ch: ops.Channels) -> ProgramTarget:
    w = reach.read
    return ProgramTarget(_path(reach), reach.node.name, w.kind, w.weight.name,
                         w.bias.name if w.bias is not None else None, w.bias_index, w.groups,
                         [n.op for n in reach.chain], w.row.name, ch.stride)


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
        self.added_bias: dict[str, str] = {}  # bmm/matmul node -> the bias placeholder its new ``add`` reads

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
        bias_node = _bias_arg(work, op, t.bias_index)  # an earlier site may have given it one
        w, b = work.tensor(t.weight), work.tensor(bias_node.name if bias_node is not None else None)
        nw, nb = ft.fold(ft.row(t.row), site.position, w, b, scale, shift, groups=t.groups,
                         channels=ops.Channels(1, t.stride))
        work.set_tensor(t.weight, nw)
        if bias_node is None:
            target = _owner(work._spec(t.weight).target)
            _set_bias_arg(work, op, t.bias_index, work.add_like(t.weight, f"{target}.bias" if target else "bias", nb))
        else:
            work.set_tensor(bias_node.name, nb)
    work.remove_norm(site)
    via = site.targets[0].via if len(site.targets) == 1 else []
    return Action("folded", site.norm, {"into": site.into, "position": site.position, "via": via})


def _bias_arg(work: ProgramEdit, op: torch.fx.Node, index: int | None) -> torch.fx.Node | None:
    if op.name in work.added_bias:  # a bmm/matmul an earlier site gave an ``add``
        return work.nodes[work.added_bias[op.name]]
    if op.target is torch.ops.aten.addmm.default:
        index = 0
    if index is None:
        return None
    b = op.args[index] if index < len(op.args) else op.kwargs.get("bias")
    return b if isinstance(b, torch.fx.Node) else None


def _set_bias_arg(work: ProgramEdit, op: torch.fx.Node, index: int | None, value: torch.fx.Node) -> None:
    if op.target is torch.ops.aten.mm.default:  # mm(x, w) + b is addmm(b, x, w)
        op.target, op.args = torch.ops.aten.addmm.default, (value, *op.args)
        return
    if index is None:  # bmm / matmul: no bias argument, add one after it (broadcast over the last axis)
        with work.gm.graph.inserting_after(op):
            add = work.gm.graph.call_function(torch.ops.aten.add.Tensor, (op, value))
        op.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        add.meta.update({k: v for k, v in op.meta.items() if k in ("val", "nn_module_stack", "stack_trace",
                                                                   "source_fn_stack", "tensor_meta")})
        work.nodes[add.name] = add
        work.added_bias[op.name] = value.name
        work.renames[op.name] = add.name
        return
    if index < len(op.args):
        op.update_arg(index, value)
    elif "bias" in op.kwargs or len(op.args) < index:
        op.update_kwarg("bias", value)
    else:
        op.args = (*op.args, value)
