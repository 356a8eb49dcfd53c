"""What every norm-swap rule shares: the ``Plan`` a rule's check produces, the swap itself (the
rewrite: replace one module, undoably) and the helpers that read a norm site's layout.

A swap rule (``ln_to_bn``, ``bn_to_ln``, ``bn_to_gn``, ``bn_to_frozen``) subclasses ``SwapRule``
and implements ``plan(graph, path, group)``: match and check in one, returning either the reason the
site is skipped or a ``Plan`` that builds the replacement module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..find import UNCAPTURED, NormSite
from ..graph import GNode, ModelGraph
from ..graph.ops import DATA_MOVEMENT
from ..report import Action
from ..verify import UndoLog, set_module

KIND_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "batchnorm": "BatchNorm", "groupnorm": "GroupNorm",
              "instancenorm": "InstanceNorm"}


def kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, kind)


@dataclass
class Plan:
    """A checked site and how to build its replacement (``build``: old module -> new module)."""

    path: str
    kind: str
    build: Callable[[nn.Module], nn.Module]
    exact: bool
    channels: int | None
    input_shape: list[int] | None
    note: str | None = None


class SwapRule:
    """Replace norm modules of the ``sources`` kinds by the module ``target`` names."""

    target: str = ""  # the --to value
    target_name: str = ""  # what the report calls the result
    sources: tuple[str, ...] = ()  # norm kinds (find.NormSite.kind) this rule converts
    exact: bool = False  # function-preserving in eval: verified, deviating sites rolled back

    def __init__(self, groups: int | None = None) -> None:
        self.groups = groups

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        raise NotImplementedError

    def skip_other(self, site: NormSite) -> str | None:
        """The reason to report a norm of a kind this rule does not convert (None: say nothing)."""
        return None

    @staticmethod
    def rewrite(model: nn.Module, plan: Plan, undo: UndoLog) -> Action:
        """Swap the module at ``plan.path`` (``undo`` puts the old one back)."""
        old = model.get_submodule(plan.path)
        new = plan.build(old)
        set_module(model, plan.path, new, undo)
        return Action("converted", plan.path, {
            "from": type(old).__name__, "to": type(new).__name__, "kind": plan.kind, "channels": plan.channels,
            "input_shape": plan.input_shape, "exact": plan.exact, "note": plan.note})


# --- reading a site ------------------------------------------------------------------------------

def whole_module(graph: ModelGraph, site: NormSite) -> nn.Module | None:
    """The module that *is* this norm (None when the norm is part of other code)."""
    if site.source != "module" and (":" in site.path or "#" in site.path or not site.path):
        return None
    return graph.module(site.path)


def unreached_reason(group: list[NormSite]) -> str | None:
    if max(s.calls for s in group) == 0:
        ran = next((s.note for s in group if s.note and s.note.startswith(UNCAPTURED)), None)
        return f"{ran}: its input layout is unknown" if ran else \
            "not reached by the example inputs: its input layout is unknown"
    return None


def module_input_shape(site: NormSite) -> tuple | None:
    """Shape of what the norm *module* receives: the op's input, followed back through the module's
    own reshapes (TokenBatchNorm flattens (B, T, C) to (B*T, C) around its batch_norm)."""
    node = site.node
    x = node.arg(0) if isinstance(node, GNode) else None
    if not isinstance(x, GNode):
        return tuple(site.input_shape) if site.input_shape else None
    while x.call_key == node.call_key and x.op in DATA_MOVEMENT and x.inputs:
        x = x.inputs[0]
    return tuple(x.shape) if x.shape else None


def factory_kwargs(module: nn.Module, *tensors) -> dict:
    """device/dtype for a replacement: those of the first floating tensor given or owned by ``module``."""
    for t in (*tensors, *module.parameters(recurse=False), *module.buffers(recurse=False)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def copy_affine(new: nn.Module, weight, bias, offset: float = 0.0) -> None:
    with torch.no_grad():
        if new.weight is not None:
            if weight is not None:
                new.weight.copy_(weight.detach().reshape(new.weight.shape) + offset)
                new.weight.requires_grad_(weight.requires_grad)
        if getattr(new, "bias", None) is not None:
            if bias is not None:
                new.bias.copy_(bias.detach().reshape(new.bias.shape))
                new.bias.requires_grad_(bias.requires_grad)
            else:
                new.bias.zero_()
                if weight is not None:
                    new.bias.requires_grad_(weight.requires_grad)


def joined(*notes: str | None) -> str:
    return "; ".join(n for n in notes if n)


@dataclass
class BnSite:
    """A BatchNorm module site, read once for every rule that replaces BatchNorms."""

    module: nn.Module
    shape: list[int]
    rank: int
    token: bool  # channels on the last dim of a rank > 2 input (TokenBatchNorm, a subclass that transposes)
    shared_note: str | None


def read_bn_site(graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, BnSite | None]:
    """The BatchNorm module at ``path`` and the layout of its calls, or why it cannot be replaced.

    The layout is that of the module's *input*, read from the graph: a subclass may move the channels
    to dim 1 inside its forward (TokenBatchNorm reshapes (B, T, C) to (B*T, C); a hand-written token
    BN transposes), and its replacement receives what the module received."""
    site = group[0]
    module = graph.module(path) if site.source == "module" else None
    if site.source == "module" and module is not None and not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (f"{type(module).__name__} is a frozen batch norm (x * scale + shift of its buffers): it has no "
                "BatchNorm to replace (fold folds it)"), None
    if site.source != "module" or not isinstance(module, nn.modules.batchnorm._BatchNorm):
        where = site.path.split(":")[0] or "the model"
        return f"functional batch_norm call inside {where}.forward: module replacement cannot swap it", None
    reason = unreached_reason(group)
    if reason:
        return reason, None
    shapes = {module_input_shape(s) for s in group}
    if None in shapes:
        return "input shape unknown (captured without shapes: pass example inputs)", None
    ranks = {len(s) for s in shapes}
    if len(ranks) > 1:
        return (f"module called with inputs of different ranks ({sorted(ranks)}): one replacement cannot fit "
                "every call"), None
    rank = ranks.pop()
    axes = {bn_channel_axis(s, shape) for s, shape in zip(group, map(module_input_shape, group))}
    if None in axes or len(axes) > 1:
        return (f"cannot tell which dim of its input {type(module).__name__} normalizes (its forward moves the "
                "data in a way the graph cannot follow)"), None
    axis = axes.pop()
    if rank > 2 and axis not in (1, rank - 1):
        return (f"{type(module).__name__} normalizes dim {axis} of a rank-{rank} input: no replacement keeps that "
                "layout (they normalize dim 1 or the last dim)"), None
    calls = max(max(s.calls for s in group), len(group))
    shared = f"shared by {calls} calls, replaced consistently" if calls > 1 else None
    return None, BnSite(module, list(next(iter(shapes))), rank, rank > 2 and axis == rank - 1, shared)


def bn_channel_axis(site: NormSite, module_shape: tuple | None) -> int | None:
    """The channel axis of the BN module's input: the one dim its statistics are not taken over
    (``find`` follows the module's own reshapes/transposes back to its input). None when the site's
    dims are not relative to the module's input."""
    if site.dims is None or site.input_shape is None or module_shape is None \
            or tuple(site.input_shape) != tuple(module_shape):
        return None
    rank = len(module_shape)
    rest = [d for d in range(rank) if d not in {d % rank for d in site.dims}]
    return rest[0] if len(rest) == 1 else None


class FromBnRule(SwapRule):
    """A rule that replaces BatchNorm modules: reads the site once (``read_bn_site``), then ``plan_bn``."""

    sources = ("batchnorm",)
    channels_first_only = True  # the replacement normalizes dim 1: refuse a token BN (last dim)

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        reason, bn = read_bn_site(graph, path, group)
        if bn is None:
            return reason, None
        if bn.token and self.channels_first_only:
            return (f"{type(bn.module).__name__} normalizes the last dim of a rank-{bn.rank} input; "
                    f"{self.target_name} normalizes dim 1"), None
        return self.plan_bn(path, bn)

    def plan_bn(self, path: str, bn: BnSite) -> tuple[str | None, Plan | None]:
        raise NotImplementedError
