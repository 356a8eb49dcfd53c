"""Exact LayerNorm → RMSNorm (``convert(model, to="rms")``): SliceGPT's computational invariance, found
on the graph.

LayerNorm(x) = RMSNorm(x − mean(x)). If every term written into the residual stream (token and
position embeddings, cls tokens, patch-embedding convs, attention/MLP output projections and their
biases) has zero mean over the hidden axis, so has their sum, and every LayerNorm reading it
computes exactly what an RMSNorm would. The steps:

1. fold every norm's affine into its readers (``passes.norm_affine`` through ``fold(affine=True)``),
   so no LayerNorm keeps a shift β (an RMSNorm has none);
2. for each LayerNorm, walk back from its input through the residual adds (``stream.writers_of``) to
   the writers; a term that is not a linear map of weights (an activation, a computed tensor, a
   per-channel scale) means the stream cannot be proven centred: that LayerNorm stays, with the reason;
3. a writer is centred only if everything its output reaches is a stream op or a LayerNorm (which does
   not see the mean); a tied embedding/lm_head weight is refused (``untie=True``);
4. centre the writers in float64 (W − mean over the output axis, b − mean(b)) and replace each
   LayerNorm by ``nn.RMSNorm`` with the same γ and eps; verify against the original outputs, and roll
   everything back if they deviate.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import one_line
from ..find import find_norms
from ..graph import ModelGraph, capture
from ..graph.ops import data_users
from ..inputs import as_call_args
from ..norm_math import centre_output_
from ..recipe import record
from ..report import Action
from ..verify import References, UndoLog, UndoStore, set_module, tolerance_for
from .base import Applied, apply_verified
from .stream import Stream, Writer, tensor_aliases, uses, writers_of


def convert(model: nn.Module, example_inputs: Any = None, *, inplace: bool = False, untie: bool = False,
            rtol: float | None = None, atol: float | None = None, extra_inputs: Sequence[Any] = ()):
    """LayerNorm → RMSNorm, exactly; returns ``(model, ConvertReport)`` (see the module docstring)."""
    from ..errors import NormSurgeonError
    from .convert import ConvertReport, _inputs

    ci = _inputs(model, example_inputs)
    if ci is None:
        raise NormSurgeonError("convert to='rms' needs example inputs (the graph is captured by running the model)")
    work = model if inplace else copy.deepcopy(model)
    extra = [as_call_args(e) for e in extra_inputs]
    refs = References.record(work, ci, extra=extra)
    tol = refs.tolerance(tolerance_for(work, rtol, atol))  # a low-precision model: its float32 reference's bar
    folded = _fold_affines(work, ci, refs, tol, untie, spill=inplace)
    graph = capture(work, ci)
    report = ConvertReport("rms", graph.describe())
    report.notes.append(f"affines folded first: {folded.summary()}")
    refused = {a.path: a.reason for a in folded.affine_actions if a.kind != "folded"}
    actions, plan = _plan(work, graph, refused)
    with UndoStore(spill=inplace) as store:
        applied = []
        if plan["lns"]:
            undo = store.log()
            try:
                action = _rewrite(work, plan, undo)
            except Exception as e:  # noqa: BLE001 - a failed rewrite leaves the model as it was
                undo.restore()
                for p in plan["lns"]:
                    actions[p] = Action("skipped", p, {"kind": "layernorm"}, f"rewrite failed: {one_line(e)}")
                plan["lns"] = []
            else:
                applied.append(Applied("stream", plan, action, undo, redo=lambda u: _rewrite(work, plan, u),
                                       rolled_back=lambda why: Action("rolled_back", "stream", {}, why),
                                       describe="centring the residual stream"))
        verdict = apply_verified(work, applied, refs, tol, store, done="converted")
    report.verify = {"sites_checked": len(plan["lns"]), "max_site_error": None,
                     "max_abs_error": verdict.stats.max_abs_error, "max_rel_error": verdict.stats.max_rel_error,
                     "passed": verdict.passed, "tolerance": tol.rtol, "inputs": len(refs), **refs.to_json(),
                     "rolled_back": int(verdict.actions.get("stream", Action("", "")).kind == "rolled_back")}
    if applied and verdict.actions["stream"].kind == "rolled_back":
        why = verdict.actions["stream"].reason
        for p in plan["lns"]:
            actions[p] = Action("skipped", p, {"kind": "layernorm"}, why)
        plan["lns"], plan["writers"] = [], []
    report.actions = list(actions.values())
    if plan["lns"]:
        report.notes.append("centred the residual stream's writers: " + ", ".join(w.path for w in plan["writers"]))
        record(work, {"op": "ln_to_rms", "converted": [p for p in plan["lns"]],
                      "centred": [w.path for w in plan["writers"]]}, ci)
    return work, report


def _fold_affines(work: nn.Module, ci, refs: References, tol, untie: bool, spill: bool):
    """Step 1: every norm's affine into its readers (``norm_affine``), verified; BatchNorms untouched."""
    from .fold import FoldReport
    from .norm_affine import fold_all, record_action

    graph = capture(work, ci, checked=True)
    report = FoldReport(graph.describe(), tolerance=tol.rtol, verified_inputs=len(refs), reference=refs.to_json())
    with UndoStore(spill=spill) as store:
        actions, applied = fold_all(work, graph, store, untie=untie)
        verdict = apply_verified(work, applied, refs, tol, store, done="folded")
    actions.update(verdict.actions)
    report.actions = list(actions.values())
    report.verify, report.passed, report.verify_error = verdict.stats, verdict.passed, verdict.error
    record_action(work, report, ci)
    return report


def _plan(model: nn.Module, graph: ModelGraph, refused: dict[str, str | None]) -> tuple[dict[str, Action], dict]:
    actions: dict[str, Action] = {}
    candidates: list[tuple[str, nn.LayerNorm, Stream]] = []
    stream_nodes: set[int] = set()
    for site in find_norms(graph):
        if site.kind != "layernorm":
            continue
        mod = graph.module(site.path)
        if type(mod) is not nn.LayerNorm or site.node is None or site.node.op not in ("layer_norm",
                                                                                       "native_layer_norm"):
            actions[site.path] = Action("skipped", site.path, {"kind": "layernorm"},
                                        "not an nn.LayerNorm module (a functional or hand-written LayerNorm)")
            continue
        if site.calls > 1:
            actions[site.path] = Action("skipped", site.path, {"kind": "layernorm"}, f"called {site.calls} times")
            continue
        if len(mod.normalized_shape) != 1:
            actions[site.path] = Action("skipped", site.path, {"kind": "layernorm"}, "normalizes more than one dim")
            continue
        stream = Stream()
        why = writers_of(site.node.arg(0), int(mod.normalized_shape[0]), stream)
        if why is None:  # a LayerNorm that stays one does not see the mean: its stream may still be centred
            stream_nodes |= stream.nodes
        if mod.bias is not None and bool(torch.any(mod.bias != 0)):
            actions[site.path] = Action("skipped", site.path, {"kind": "layernorm"},
                                        "its shift β is still there (an RMSNorm has none); the affine fold refused "
                                        f"it: {refused.get(site.path) or 'unknown reason'}")
            continue
        if why is not None:
            actions[site.path] = Action("skipped", site.path, {"kind": "layernorm"},
                                        f"its input cannot be proven centred: {why}")
            continue
        candidates.append((site.path, mod, stream))
    ln_ops = {id(n) for n in graph.nodes if n.op in ("layer_norm", "native_layer_norm")}
    aliases = tensor_aliases(model)
    bad: dict[int, str] = {}
    for _, _, stream in candidates:
        for w in stream.writers:
            why = _writer_reason(graph, model, w, stream_nodes, ln_ops, aliases)
            if why is not None:
                bad[id(w.node)] = why
    lns, writers, seen = [], [], set()
    for path, mod, stream in candidates:
        reasons = [bad[id(w.node)] for w in stream.writers if id(w.node) in bad]
        if reasons:
            actions[path] = Action("skipped", path, {"kind": "layernorm"}, f"a writer cannot be centred: {reasons[0]}")
            continue
        lns.append(path)
        actions[path] = Action("converted", path, {"from": "LayerNorm", "to": "RMSNorm", "kind": "layernorm"})
        for w in stream.writers:
            key = id(w.weight.get(model))
            if key not in seen:
                seen.add(key)
                writers.append(w)
    return actions, {"lns": lns, "writers": writers}


def _writer_reason(graph: ModelGraph, model: nn.Module, w: Writer, stream_nodes: set[int], ln_ops: set[int],
                   aliases: dict[int, list[str]]) -> str | None:
    t = w.weight.get(model)
    if len(aliases.get(id(t), [])) > 1 or len(uses(graph, t)) > 1:
        names = ", ".join(aliases.get(id(t), [w.weight.name]))
        return f"{w.path}'s weight is shared ({names}): untie=True / --untie gives the head its own copy"
    if w.bias is not None and len(uses(graph, w.bias.get(model))) > 1:
        return f"{w.path}'s bias is used by more than one op"
    stack, seen = [w.node], set()
    while stack:
        n = stack.pop()
        for u in data_users(n):
            if id(u) in seen:
                continue
            seen.add(id(u))
            if id(u) in ln_ops and u.arg(0) is n:
                continue
            if id(u) in stream_nodes:
                stack.append(u)
                continue
            return f"the output of {w.path} also reaches {u.module_path or '(root)'} ({u.op}), which sees its mean"
    return None


def _rewrite(model: nn.Module, plan: dict, undo: UndoLog) -> Action:
    with torch.no_grad():
        for w in plan["writers"]:
            t = w.weight.get(model)
            b = w.bias.get(model) if w.bias is not None else None
            undo.save_param(model.get_submodule(w.weight.owner), w.weight.attr)
            centre_output_(t.detach(), w.kind, w.layout)
            if b is not None:
                undo.save_param(model.get_submodule(w.bias.owner), w.bias.attr)
                b.copy_(b.detach().double() - b.detach().double().mean())
    for path in plan["lns"]:
        set_module(model, path, rms_from(model.get_submodule(path)), undo)
    return Action("converted", "stream")


def rms_from(ln: nn.LayerNorm) -> nn.RMSNorm:
    ref = ln.weight if ln.weight is not None else None
    rms = nn.RMSNorm(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                     device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    if ln.weight is not None:
        with torch.no_grad():
            rms.weight.copy_(ln.weight)
    return rms.train(ln.training)


def replay(model: nn.Module, action: dict, ci: Any) -> None:
    """Redo a recorded conversion on a rebuilt base: the same LayerNorms become RMSNorms (the centred
    writers and folded affines are loaded with the weights afterwards)."""
    from ..errors import NormSurgeonError

    for path in action.get("converted") or []:
        try:
            ln = model.get_submodule(path)
        except AttributeError:
            ln = None
        if not isinstance(ln, nn.LayerNorm):
            raise NormSurgeonError(f"recipe: the rebuilt model has no LayerNorm at {path} to make an RMSNorm")
        set_module(model, path, rms_from(ln))
