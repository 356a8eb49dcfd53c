"""The norm-affine fold rule: a LayerNorm/RMSNorm's γ (and β) into the linear layers that read it.

match: every LayerNorm/RMSNorm site of the graph with its affine parameters (``stream.affine_of``) and
its readers (``stream.readers_of``). check: the reason a site cannot fold (post-norm, per-head q/k
norm, a reader that is not linear, a shared or tied weight, a norm called twice). rewrite: in float64,
W' = W·diag(γ), b' = b + W·β for every reader, cast back; then γ = 1 (w = 0 for a ``1 + w`` norm) and
β = 0, so the norm keeps its form (fp32 upcast included) and only its affine is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..find import NormSite, find_norms
from ..graph import ModelGraph
from ..norm_math import fold_into_reader_
from ..report import Action
from ..verify import UndoLog
from .stream import (Affine, Reader, Tensor, affine_of, hand_written_inputs, norm_input, output_of, own_tensor,
                     per_head, readers_of, tensor_aliases, uses)

KINDS = ("layernorm", "rmsnorm")


@dataclass
class AffineSite:
    norm: str
    kind: str
    affine: Affine | None
    readers: list[Reader] = field(default_factory=list)
    reason: str | None = None  # set by match when the graph already says why not
    untie: list[Reader] = field(default_factory=list)  # readers whose weight is tied and must be untied
    create_bias: list[Reader] = field(default_factory=list)  # readers that need a bias for β

    @property
    def into(self) -> list[str]:
        return [r.path for r in self.readers]


def match(model: nn.Module, graph: ModelGraph, sites: list[NormSite] | None = None) -> list[AffineSite]:
    out = []
    inputs = hand_written_inputs(graph)
    for s in sites if sites is not None else find_norms(graph):
        if s.kind not in KINDS or s.node is None:
            continue
        site = AffineSite(s.path, s.kind, affine_of(s))
        out.append(site)
        if s.calls > 1:
            site.reason = f"called {s.calls} times: its affine would have to fold into every caller's readers"
            continue
        if site.affine is None:
            site.reason = "its affine parameters cannot be read from the graph"
            continue
        if site.affine.weight is None and site.affine.bias is None:
            site.reason = "no affine to fold"
            continue
        width = s.channels
        out_node = output_of(s)
        readers, why = readers_of(out_node, width) if out_node is not None and width else ([], "unknown width")
        if why is not None and s.input_shape is not None and len(s.input_shape) >= 4 \
                and per_head(inputs.get(id(s.node)) or norm_input(s), width):
            why = ("a per-head norm (q/k norm before RoPE): its output goes to the rotary embedding and "
                   f"attention, not to a linear layer ({why})")
        for r in readers:
            r.weight = own_tensor(graph, r.node, r.weight)
            if r.bias is not None:
                r.bias = own_tensor(graph, r.node, r.bias)
        site.readers, site.reason = readers, why
    return out


def check(site: AffineSite, model: nn.Module, graph: ModelGraph, *, untie: bool = False) -> str | None:
    if site.reason is not None:
        return site.reason
    aliases = tensor_aliases(model)
    for t in (site.affine.weight, site.affine.bias):
        if t is not None and len(uses(graph, t.get(model))) > 1:
            return f"its parameter {t.name} is used by more than one op"
    site.untie, site.create_bias = [], []
    for r in site.readers:
        p = r.weight.get(model)
        names = aliases.get(id(p), [r.weight.name])
        users = uses(graph, p)
        others = [n for n in names if n != r.weight.name]
        own = [u for u in users if u.module_path == r.node.module_path]
        if len(own) > 1:
            return f"{r.path} is called {len(own)} times: its weight would fold once for every caller"
        if others or len(users) > len(own):
            if not untie:
                tied = ", ".join(others) or "another op"
                return (f"the weight of {r.path} is tied to {tied}: folding into it would change that too "
                        f"(untie=True / --untie gives {r.path} its own copy)")
            site.untie.append(r)
        if r.bias is not None and len(uses(graph, r.bias.get(model))) > 1:
            return f"the bias of {r.path} is used by more than one op"
        if site.affine.bias is not None and r.bias is None:
            mod = model.get_submodule(r.weight.owner)
            if not isinstance(mod, nn.Linear) or mod.bias is not None or r.weight.attr != "weight":
                return f"{r.path} has no bias to take the norm's shift β"
            site.create_bias.append(r)
    return None


def rewrite(site: AffineSite, model: nn.Module, undo: UndoLog) -> Action:
    aff = site.affine
    gamma_t = aff.weight.get(model) if aff.weight is not None else None
    beta_t = aff.bias.get(model) if aff.bias is not None else None
    gamma = gamma_t.detach().double() if gamma_t is not None else None
    if gamma is not None and aff.one_plus:
        gamma = gamma + 1.0
    beta = beta_t.detach().double() if beta_t is not None else None
    untied = []
    for r in site.untie:
        mod = model.get_submodule(r.weight.owner)
        old = getattr(mod, r.weight.attr)
        undo.on_restore(lambda m=mod, a=r.weight.attr, o=old: setattr(m, a, o))
        setattr(mod, r.weight.attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        untied.append(r.path)
        _untie_config(model, undo)
    created = []
    for r in site.create_bias:
        mod = model.get_submodule(r.weight.owner)
        w = mod.weight
        undo.save_param(mod, "bias")
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        r.bias = Tensor(f"{r.weight.owner}.bias" if r.weight.owner else "bias", r.weight.owner, "bias")
        created.append(r.path)
    with torch.no_grad():
        for r in site.readers:
            mod = model.get_submodule(r.weight.owner)
            w = getattr(mod, r.weight.attr)
            b = r.bias.get(model) if r.bias is not None else None
            undo.save_param(mod, r.weight.attr)
            shift = fold_into_reader_(w.detach(), gamma, beta, r.layout)
            if b is not None and shift is not None:
                bmod = model.get_submodule(r.bias.owner)
                undo.save_param(bmod, r.bias.attr)
                b.copy_(b.detach().double() + shift)
        if gamma_t is not None:
            undo.save_param(model.get_submodule(aff.weight.owner), aff.weight.attr)
            gamma_t.fill_(0.0 if aff.one_plus else 1.0)
        if beta_t is not None:
            undo.save_param(model.get_submodule(aff.bias.owner), aff.bias.attr)
            beta_t.zero_()
    detail = {"into": site.into, "position": "after", "kind": site.kind, "affine": True,
              "what": "γ and β" if beta is not None and gamma is not None else ("γ" if gamma is not None else "β")}
    if aff.one_plus:
        detail["one_plus"] = True
    if untied:
        detail["untied"] = untied
    if created:
        detail["created_bias"] = created
    return Action("folded", site.norm, detail)


def _untie_config(model: nn.Module, undo: UndoLog) -> None:
    """Untied weights must stay untied when transformers rebuilds the model from its config."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            undo.on_restore(lambda c=cfg: setattr(c, "tie_word_embeddings", True))
            cfg.tie_word_embeddings = False


def fold_all(model: nn.Module, graph: ModelGraph, store, *, untie: bool = False):
    """match → check → rewrite for every LayerNorm/RMSNorm: their Actions and the sites rewritten
    (``passes.base.Applied``, for ``apply_verified``)."""
    from ..errors import one_line
    from .base import Applied

    actions: dict[str, Action] = {}
    applied: list[Applied] = []
    for site in match(model, graph):
        reason = check(site, model, graph, untie=untie)
        if reason is not None:
            actions[site.norm] = Action("skipped", site.norm, {"kind": site.kind, "affine": True}, reason)
            continue
        undo = store.log()
        try:
            action = rewrite(site, model, undo)
        except Exception as e:  # noqa: BLE001 - a failed rewrite is a skipped site, never a half-edit
            undo.restore()
            actions[site.norm] = Action("skipped", site.norm, {"kind": site.kind, "affine": True},
                                        f"rewrite failed: {one_line(e, typed=True)}")
            continue
        actions[site.norm] = action
        applied.append(Applied(site.norm, site, action, undo, redo=lambda u, s=site: rewrite(s, model, u),
                               rolled_back=lambda why, s=site: Action("rolled_back", s.norm,
                                                                      {"kind": s.kind, "affine": True,
                                                                       "into": s.into}, why),
                               describe=f"folding the affine into {', '.join(site.into)}"))
    return actions, applied


def record_action(model: nn.Module, report, ci) -> None:
    """Record what changed the model's structure (untied weights, created biases) for a recipe; the
    folded values themselves travel in the weights."""
    from ..recipe import record

    folded = [a for a in report.affine_actions if a.kind == "folded"]
    if not folded:
        return
    record(model, {"op": "norm_affine",
                   "folded": [{"norm": a.path, "into": a.detail["into"]} for a in folded],
                   "untied": sorted({p for a in folded for p in a.detail.get("untied", [])}),
                   "created_bias": sorted({p for a in folded for p in a.detail.get("created_bias", [])})}, ci)


def replay(model: nn.Module, action: dict, ci) -> None:
    """Redo the structural part of a recorded affine fold on a rebuilt base: untie the weights and create
    the biases it did (the folded values are loaded with the weights afterwards)."""
    from ..errors import NormSurgeonError

    undo = UndoLog()
    for path in action.get("untied") or []:
        mod = model.get_submodule(path)
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise NormSurgeonError(f"recipe: the rebuilt model has no weight at {path} to untie")
        mod.weight = nn.Parameter(mod.weight.detach().clone())
        _untie_config(model, undo)
    for path in action.get("created_bias") or []:
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.Linear):
            raise NormSurgeonError(f"recipe: {path} of the rebuilt model is not a linear layer")
        if mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype))
