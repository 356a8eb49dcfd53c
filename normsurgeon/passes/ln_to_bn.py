"""LayerNorm / RMSNorm → BatchNorm (``--to bn``): nn modules and hand-written norm modules the finder
recognises. The last dim → ``TokenBatchNorm`` (statistics over batch × positions, any leading shape);
a channels-first LN over dim 1 → ``BatchNorm1d/2d/3d``. Affine parameters carry over. Not
function-preserving: the new BatchNorms need calibration or training.

A norm module called more than once is skipped: one BatchNorm would pool the running statistics of
differently distributed inputs (exact in training, wrong in eval).
"""

from __future__ import annotations

import torch.nn as nn

from ..find import NormSite
from ..graph import ModelGraph
from ..nn import MIN_BN_EPS, TokenBatchNorm, bn_eps, module_class
from .swap import Plan, SwapRule, copy_affine, factory_kwargs, kind_name, unreached_reason, whole_module

_BN_BY_RANK = {3: "bn1d", 4: "bn2d", 5: "bn3d"}


class LnToBn(SwapRule):
    target, target_name, sources = "bn", "BatchNorm", ("layernorm", "rmsnorm")

    def skip_other(self, site: NormSite) -> str | None:
        if site.kind in ("groupnorm", "instancenorm"):
            return f"{kind_name(site.kind)} is left as it is: the bn target converts LayerNorm and RMSNorm"
        return None

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        return plan_to_bn(graph, path, group)


def plan_to_bn(graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
    site = group[0]
    name = kind_name(site.kind)
    if site.source == "function" and whole_module(graph, site) is None:
        where = site.path.split(":")[0] or "the model"
        return (f"functional {site.kind.replace('norm', '_norm')} call inside {where}.forward: module "
                "replacement cannot swap it (wrap it in a module, or rewrite that code)"), None
    module = whole_module(graph, site)
    if module is None:
        where = site.path.split(":")[0] or "the model"
        return (f"hand-written {name} inside {where}.forward, not a module of its own: module replacement "
                "cannot swap it"), None
    reason = unreached_reason(group)
    if reason:
        return reason, None
    calls = max(s.calls for s in group)
    if calls > 1 or len(group) > 1:
        return (f"module called {max(calls, len(group))} times: one BatchNorm would pool the running "
                "statistics of differently distributed inputs (exact in training, wrong in eval)"), None
    dims, shape = site.dims, site.input_shape
    if dims is None or shape is None:
        return "input shape unknown (captured without shapes: pass example inputs)", None
    rank = len(shape)
    dims = [d + rank if d < 0 else d for d in dims]
    if len(dims) != 1:
        return (f"normalizes over dims {site.dims} of a rank-{rank} input jointly: a BatchNorm normalizes "
                "one channel dim"), None
    dim = dims[0]
    channels = int(shape[dim])
    if site.channels is not None and site.channels != channels:
        return f"channel count unclear (weight has {site.channels}, input dim {dim} has {channels})", None
    wname, bname, offset, why = _affine_of(graph, site, module, channels)
    if why:
        return why, None
    # the same floor for every source (nn modules, LlamaRMSNorm's variance_epsilon, hand-written eps):
    # a BN channel's batch variance can be ~0 where a per-sample LN variance never is (see bn_eps)
    source_eps = site.eps if site.eps is not None else 1e-5
    eps = bn_eps(source_eps)
    raised = f"eps raised from {source_eps:g} to {MIN_BN_EPS:g}" if eps != source_eps else None
    differs = "; ".join(site.differs) or None
    if dim == rank - 1:
        def build(old):
            return _token_bn(old, channels, eps, wname, bname, offset)
        note = "token BN: statistics over batch x positions"
        return None, Plan(path, site.kind, build, False, channels, shape,
                           "; ".join(filter(None, [note, raised, differs and f"source {differs}"])))
    if dim == 1 and rank in _BN_BY_RANK:
        cls = module_class(_BN_BY_RANK[rank])

        def build(old):
            return _channel_bn(cls, old, channels, eps, wname, bname, offset)
        return None, Plan(path, site.kind, build, False, channels, shape,
                           "; ".join(filter(None, [f"channels-first {name} over dim 1 -> {cls.__name__}", raised])))
    return (f"normalizes dim {dim} of a rank-{rank} input: neither the last dim (TokenBatchNorm) nor dim 1 of a "
            "rank-3/4/5 input (BatchNorm1d/2d/3d)"), None


def _affine_of(graph: ModelGraph, site: NormSite, module: nn.Module, channels: int):
    """(weight name, bias name, weight offset, reason) of a LN/RMS module's affine parameters."""
    offset = 1.0 if any("1 + weight" in d for d in site.differs) else 0.0
    params = dict(module.named_parameters(recurse=False))
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        return ("weight" if params.get("weight") is not None else None,
                "bias" if params.get("bias") is not None else None, offset, None)
    if not site.affine:
        return None, None, offset, None
    roles = _param_roles(graph, site, params)
    weight, bias = roles.get("weight"), roles.get("bias")
    if weight is None:
        weight = next((n for n in ("weight", "gamma", "scale", "a_2", "g") if n in params), None)
    if bias is None and site.kind == "layernorm":
        bias = next((n for n in ("bias", "beta", "b_2", "b") if n in params and n != weight), None)
    for n in (weight, bias):
        if n is not None and params[n].numel() != channels:
            return None, None, offset, f"affine parameter {n!r} has {params[n].numel()} values for {channels} channels"
    if weight is None:
        return None, None, offset, "cannot tell which parameter is the norm's weight"
    return weight, bias, offset, None


def _param_roles(graph: ModelGraph, site: NormSite, params: dict) -> dict[str, str]:
    """weight/bias names of a hand-written norm from how the graph uses its params
    (norm op argument 2/3, or mul: weight, add: bias)."""
    prefix = f"{site.path}." if site.path else ""
    scaled_one_plus = any("1 + weight" in d for d in site.differs)
    roles: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "param" or not node.param or not node.param.startswith(prefix):
            continue
        name = node.param[len(prefix):]
        if name not in params:
            continue
        prev, user = node, node
        for _ in range(4):  # through casts / reshapes to the op that uses it
            if len(user.users) != 1:
                break
            prev, user = user, user.users[0]
            if user.op in ("mul", "add", "layer_norm", "rms_norm", "native_layer_norm"):
                break
        if user.op in ("layer_norm", "native_layer_norm", "rms_norm"):
            idx = next((i for i, a in enumerate(user.args) if a is prev), None)
            if idx == 2:
                roles.setdefault("weight", name)
            elif idx == 3 and user.op != "rms_norm":
                roles.setdefault("bias", name)
        elif user.op == "mul":
            roles.setdefault("weight", name)
        elif user.op == "add":
            if scaled_one_plus and any(u.op == "mul" for u in user.users):
                roles.setdefault("weight", name)  # (1 + weight) * x
            else:
                roles.setdefault("bias", name)
    return roles


def _token_bn(old: nn.Module, channels: int, eps: float, wname, bname, offset: float) -> nn.Module:
    if isinstance(old, nn.LayerNorm) and len(old.normalized_shape) == 1:
        return TokenBatchNorm.from_layernorm(old)
    if hasattr(nn, "RMSNorm") and isinstance(old, nn.RMSNorm) and len(old.normalized_shape) == 1:
        return TokenBatchNorm.from_rmsnorm(old, eps=eps, weight_offset=offset)
    return _channel_bn(TokenBatchNorm, old, channels, eps, wname, bname, offset)


def _channel_bn(cls, old: nn.Module, channels: int, eps: float, wname, bname, offset: float) -> nn.Module:
    weight = getattr(old, wname) if wname else None
    bias = getattr(old, bname) if bname else None
    new = cls(channels, eps=eps, affine=weight is not None, **factory_kwargs(old, weight))
    if weight is not None:
        copy_affine(new, weight, bias, offset)
    return new.train(old.training)
