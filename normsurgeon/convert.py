"""Swap normalization layers (LayerNorm/RMSNorm <-> BatchNorm, BN -> GroupNorm or frozen BN) and
insert BatchNorms into transformer FFNs, guided by the captured graph.

Every pass follows match -> check -> rewrite on the user's ``nn.Module`` (a deep copy unless
``inplace=True``): norm sites come from :func:`normsurgeon.find.find_norms`, FFN blocks from
:func:`normsurgeon.ffn.find_ffn_blocks`, and each site is either rewritten (an ``Action``) or
skipped with a human reason. The input layout of a site (its rank, which dim is normalized) comes
from the captured graph, never from guessing.

Which swaps are exact:

- ``to="frozen"`` (BN -> FrozenBatchNorm) and ``ffn_bn_init="identity"`` are function-preserving in
  eval mode. Both are verified: each site's module is checked on the inputs it received on the
  example inputs, and the whole model's outputs are compared; a site that deviates is rolled back
  and reported as skipped.
- LN/RMSNorm -> BN, BN -> LN/ChannelLayerNorm/GroupNorm and a fresh FFN BN change the function
  (per-sample vs batch statistics). They need calibration (``calibrate_batches``) or training; the
  report says so and measures how much the outputs moved.

Shared norm modules (one module called at several places): LN -> BN skips them, because a single
BatchNorm would pool running statistics of differently distributed inputs (right in training,
where each call normalizes with its own batch statistics, wrong in eval). BN -> LN/GN replaces
them consistently (per-sample norms hold no state) when every call has the same layout; BN ->
frozen replaces them consistently (the BN already had one set of statistics: freezing is exact).

``nn.TransformerEncoderLayer`` has a fused inference fast path that reads ``norm1.weight`` or
``linear1.weight`` directly and computes LayerNorm and a plain FFN whatever modules are there; after
any swap inside such a layer its ``activation_relu_or_gelu`` flag is set to 0, which disables the
fast path (and only that; the layer still calls ``self.activation``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ffn as _ffn
from .calibrate import CalibrationReport, RunningStats, as_positions, calibrate
from .errors import NormSurgeonError
from .ffn import FFNBlock, find_ffn_blocks
from .find import DATA_MOVEMENT, NormSite, find_norms
from .graph import GNode, ModelGraph, capture
from .inputs import CallArgs, as_call_args
from .nn import ChannelLayerNorm, FrozenBatchNorm, TokenBatchNorm, batchnorm_to_groupnorm, make_identity
from .outputs import ErrorStats, compare_outputs, flatten_outputs
from .report import Action, Table, fmt_float

__all__ = ["convert", "insert_ffn_bn", "find_ffn_blocks", "ConvertReport", "calibrate", "TARGETS"]

TARGETS = ("bn", "ln", "gn", "frozen")
_TARGET_NAMES = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm", "frozen": "FrozenBatchNorm"}
_SOURCE_KINDS = {"bn": ("layernorm", "rmsnorm"), "ln": ("batchnorm",), "gn": ("batchnorm",),
                 "frozen": ("batchnorm",)}
_BN_BY_RANK = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _tolerance(dtype: torch.dtype | None) -> tuple[float, float]:
    """(rtol, atol) for exact swaps: relative to the output's largest magnitude."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-3
    if dtype == torch.float64:
        return 1e-9, 1e-12
    return 1e-4, 1e-6


# --- report ------------------------------------------------------------------------------------

@dataclass
class ConvertReport:
    """What ``convert``/``insert_ffn_bn`` did at every site (``actions``), whether the result computes
    the same function (``function_preserving``), and the numbers behind that claim."""

    to: str | None
    capture: str
    actions: list[Action] = field(default_factory=list)
    verify: dict | None = None  # exact swaps only: per-site and whole-model check
    function_preserving: bool = True
    output_change: dict | None = None  # whole-model output before vs after, measured on the example inputs
    calibration: CalibrationReport | None = None
    ffn_blocks: list[FFNBlock] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "converted"]

    @property
    def inserted(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "inserted"]

    @property
    def skipped(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "skipped"]

    def to_json(self) -> dict:
        return {
            "to": self.to,
            "capture": self.capture,
            "converted": [{"path": a.path, **a.detail} for a in self.converted],
            "inserted": [{"path": a.path, **a.detail} for a in self.inserted],
            "skipped": [{"path": a.path, "reason": a.reason, **a.detail} for a in self.skipped],
            "verify": self.verify,
            "function_preserving": self.function_preserving,
            "output_change": self.output_change,
            "calibration": self.calibration.to_json() if self.calibration is not None else None,
            "ffn_blocks": [b.to_json() for b in self.ffn_blocks],
            "notes": list(self.notes),
        }

    def tables(self) -> list[Table]:
        out = []
        if self.converted:
            out.append(Table("Converted", ["path", "from", "to", "input", "notes"],
                             [[a.path, a.detail.get("from"), a.detail.get("to"),
                               "x".join(map(str, a.detail.get("input_shape") or [])) or "-",
                               a.detail.get("note") or ""] for a in self.converted]))
        if self.inserted:
            out.append(Table("Inserted FFN BatchNorms", ["path", "ffn block", "position", "hidden", "init"],
                             [[a.path, a.detail.get("block"), a.detail.get("position"), a.detail.get("hidden"),
                               a.detail.get("init")] for a in self.inserted]))
        if self.skipped:
            out.append(Table("Skipped", ["path", "kind", "reason"],
                             [[a.path, a.detail.get("kind", "-"), a.reason] for a in self.skipped]))
        notes = [f"capture: {self.capture}"]
        notes.append(f"{len(self.converted)} converted, {len(self.inserted)} inserted, {len(self.skipped)} skipped")
        if self.verify is not None:
            v = self.verify
            notes.append(f"verified (exact swaps, eval mode): {v['sites_checked']} site(s) checked, max site error "
                         f"{fmt_float(v['max_site_error'])}"
                         + (f"; whole model max abs error {fmt_float(v['max_abs_error'])}, max rel error "
                            f"{fmt_float(v['max_rel_error'])}" if v.get("max_abs_error") is not None else "")
                         + f"; {'passed' if v['passed'] else 'FAILED'}"
                         + (f"; {v['rolled_back']} site(s) rolled back" if v.get("rolled_back") else ""))
        if self.output_change is not None and not self.function_preserving:
            oc = self.output_change
            notes.append(f"output change on the example inputs (eval): max abs {fmt_float(oc['max_abs_error'])}, "
                         f"max rel {fmt_float(oc['max_rel_error'])}, cosine {oc['cosine']:.4f}")
        notes.extend(self.notes)
        if not out:
            out.append(Table("Conversion", ["path", "reason"], []))
        out[-1].notes.extend(notes)
        return out


# --- public API --------------------------------------------------------------------------------

def convert(model: nn.Module, to: str | None = "bn", *, example_inputs: Any = None, groups: int | None = None,
            ffn_bn: bool = False, ffn_bn_position: str = "after-first", ffn_bn_init: str = "fresh",
            calibrate_batches: Iterable[Any] | None = None, inplace: bool = False, graph: ModelGraph | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> tuple[nn.Module, ConvertReport]:
    """Convert the normalization layers of ``model``; returns (converted model, ConvertReport).

    to:
      ``"bn"``      LayerNorm / RMSNorm (nn modules and hand-written modules the finder recognises) ->
                    ``TokenBatchNorm`` over the last dim (any leading shape), or ``BatchNorm1d/2d/3d`` for
                    a channels-first LN over dim 1. Affine parameters carry over. Not exact.
      ``"ln"``      BatchNorm -> ``nn.LayerNorm`` on (N, C) inputs (and for TokenBatchNorm), else
                    ``ChannelLayerNorm`` (LN over dim 1 at each position). Not exact.
      ``"gn"``      BatchNorm -> ``nn.GroupNorm(groups, C)`` (``groups`` defaults to 1; must divide every
                    C). Not exact.
      ``"frozen"``  BatchNorm -> ``FrozenBatchNorm`` (running stats as buffers). Exact in eval; verified,
                    deviating sites rolled back.
      ``None``      only with ``ffn_bn=True``: insert FFN BNs, convert nothing.

    ffn_bn: also insert a TokenBatchNorm into every FFN block (see :mod:`normsurgeon.ffn`), at
    ``ffn_bn_position`` ("after-first" | "before-second"), initialised ``ffn_bn_init``: "fresh" (for
    training) or "identity" (statistics measured on the data, affine set so that eval output is
    unchanged; verified).
    calibrate_batches: data for :func:`normsurgeon.calibrate.calibrate`, run after the conversion when
    it created BatchNorms (their running stats start at mean 0 / var 1).
    example_inputs: how to call the model (tensor, tuple, dict or CallArgs); defaults to the model's
    own ``example_inputs``. graph: a graph already captured from ``model`` (saves a capture).

    The input model is left untouched unless ``inplace=True``. Module train/eval modes are kept.
    """
    _validate(to, groups, ffn_bn, ffn_bn_position, ffn_bn_init)
    ci = _inputs(model, example_inputs)
    if graph is None:
        graph = capture(model, ci)
    sites = find_norms(graph)
    report = ConvertReport(to, graph.describe())
    plans = _plan_norms(graph, sites, to, groups, report) if to is not None else []
    blocks = []
    if ffn_bn:
        blocks, rejected = _ffn.match_ffn_blocks(graph)
        report.ffn_blocks = blocks
        for path, reason in rejected:
            report.actions.append(Action("skipped", path, {"kind": "ffn"}, reason))
    if to is not None and not plans and not [a for a in report.actions if a.detail.get("kind") in _SOURCE_KINDS[to]]:
        if not (ffn_bn and blocks):
            found = ", ".join(f"{n} {k}" for k, n in sorted(_counts(sites).items())) or "no normalization layers"
            wanted = " or ".join(_kind_name(k) for k in _SOURCE_KINDS[to])
            raise NormSurgeonError(f"no {wanted} in this model (found {found}): nothing to convert to "
                                   f"{_TARGET_NAMES[to]}")
    if ffn_bn and not blocks and to is None:
        raise NormSurgeonError("no FFN block (linear -> activation -> linear) found in this model: nothing to "
                               "insert a BatchNorm into")
    if to == "gn":
        _check_groups(plans, groups or 1)

    target = model if inplace else copy.deepcopy(model)
    return _run(model, target, ci, graph, plans, blocks, report, to=to, ffn_bn_position=ffn_bn_position,
                ffn_bn_init=ffn_bn_init, calibrate_batches=calibrate_batches, progress=progress)


def insert_ffn_bn(model: nn.Module, example_inputs: Any = None, *, position: str = "after-first",
                  init: str = "fresh", inplace: bool = False, graph: ModelGraph | None = None,
                  calibrate_batches: Iterable[Any] | None = None,
                  progress: Callable[[int, int | None], None] | None = None) -> tuple[nn.Module, ConvertReport]:
    """Insert a TokenBatchNorm into every FFN block of ``model`` (Yao et al. 2021) and nothing else.

    ``position``: "after-first" (between the first linear and the activation; gated FFNs: after the
    gate projection) or "before-second" (on the second linear's input). ``init``: "fresh" (weight 1,
    bias 0, running stats 0/1: for training) or "identity" (running stats measured on
    ``calibrate_batches`` or the example inputs with the model in eval, then weight =
    sqrt(var + eps) and bias = mean, so eval output is unchanged: verified, sites that deviate are
    rolled back). Returns (model, ConvertReport)."""
    return convert(model, None, example_inputs=example_inputs, ffn_bn=True, ffn_bn_position=position,
                   ffn_bn_init=init, calibrate_batches=calibrate_batches, inplace=inplace, graph=graph,
                   progress=progress)


# --- validation --------------------------------------------------------------------------------

def _validate(to, groups, ffn_bn, position, init) -> None:
    if to is None:
        if not ffn_bn:
            raise NormSurgeonError("nothing to do: give a target (--to bn|ln|gn|frozen) or --ffn-bn")
    elif to not in TARGETS:
        raise NormSurgeonError(f"unknown --to {to!r}: use one of {', '.join(TARGETS)}")
    if groups is not None:
        if to != "gn":
            raise NormSurgeonError(f"--groups only goes with --to gn (got --to {to})")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise NormSurgeonError(f"--groups must be a positive integer, got {groups!r}")
    if position not in _ffn.POSITIONS:
        raise NormSurgeonError(f"unknown --ffn-bn-position {position!r}: use {' or '.join(_ffn.POSITIONS)}")
    if init not in _ffn.INITS:
        raise NormSurgeonError(f"unknown --ffn-bn-init {init!r}: use {' or '.join(_ffn.INITS)}")


def _inputs(model: nn.Module, example_inputs: Any) -> CallArgs:
    if example_inputs is not None:
        return as_call_args(example_inputs)
    from .io import getattr_inputs

    ci = getattr_inputs(model)
    if ci is None:
        raise NormSurgeonError("convert needs example inputs (the input layout of every norm comes from the "
                               "captured graph); pass example_inputs= / --input-shape")
    return ci


def _check_groups(plans: list["_Plan"], groups: int) -> None:
    bad = [(p.path, p.channels) for p in plans if p.channels is not None and p.channels % groups]
    if bad:
        shown = ", ".join(f"{path} (C={c})" for path, c in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise NormSurgeonError(f"--groups {groups} does not divide the channels of {shown}; choose a G that "
                               "divides every C (1 always does)")


def _counts(sites: list[NormSite]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sites:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def _kind_name(kind: str) -> str:
    return {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "batchnorm": "BatchNorm", "groupnorm": "GroupNorm",
            "instancenorm": "InstanceNorm"}.get(kind, kind)


# --- plan: match + check -----------------------------------------------------------------------

@dataclass
class _Plan:
    path: str
    kind: str
    build: Callable[[nn.Module], nn.Module]  # old module -> new module
    exact: bool
    channels: int | None
    input_shape: list[int] | None
    note: str | None = None


def _plan_norms(graph: ModelGraph, sites: list[NormSite], to: str, groups: int | None,
                report: ConvertReport) -> list[_Plan]:
    by_path: dict[str, list[NormSite]] = {}
    for s in sites:
        by_path.setdefault(s.path, []).append(s)
    aliases: dict[int, list[str]] = {}
    for p, m in graph.model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(p)
    plans = []
    wanted = _SOURCE_KINDS[to]
    for path, group in by_path.items():
        site = group[0]
        if site.kind not in wanted:
            if to == "bn" and site.kind in ("groupnorm", "instancenorm"):
                report.actions.append(Action("skipped", path, {"kind": site.kind},
                                             f"{_kind_name(site.kind)} is left as it is: --to bn converts "
                                             "LayerNorm and RMSNorm"))
            continue
        reason, plan = (_plan_to_bn(graph, path, group) if to == "bn" else _plan_from_bn(graph, path, group, to, groups))
        if plan is not None:
            module = graph.module(path)
            others = [p for p in aliases.get(id(module), []) if p != path]
            if others:
                reason, plan = (f"the same module is also registered as {', '.join(others)}; replacing one path "
                                "would split them"), None
        if plan is None:
            report.actions.append(Action("skipped", path, {"kind": site.kind, "source": site.source}, reason))
        else:
            plans.append(plan)
    return plans


def _whole_module(graph: ModelGraph, site: NormSite) -> nn.Module | None:
    """The module that *is* this norm (None when the norm is part of other code)."""
    if site.source != "module" and (":" in site.path or "#" in site.path or not site.path):
        return None
    return graph.module(site.path)


def _unreached_reason(group: list[NormSite]) -> str | None:
    calls = max(s.calls for s in group)
    if calls == 0:
        return "not reached by the example inputs: its input layout is unknown"
    return None


def _plan_to_bn(graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, _Plan | None]:
    site = group[0]
    name = _kind_name(site.kind)
    if site.source == "function" and _whole_module(graph, site) is None:
        where = site.path.split(":")[0] or "the model"
        return (f"functional {site.kind.replace('norm', '_norm')} call inside {where}.forward: module "
                "replacement cannot swap it (wrap it in a module, or rewrite that code)"), None
    module = _whole_module(graph, site)
    if module is None:
        where = site.path.split(":")[0] or "the model"
        return (f"hand-written {name} inside {where}.forward, not a module of its own: module replacement "
                "cannot swap it"), None
    reason = _unreached_reason(group)
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
    eps = site.eps if site.eps is not None else 1e-5
    differs = "; ".join(site.differs) or None
    if dim == rank - 1:
        def build(old):
            return _token_bn(old, channels, eps, wname, bname, offset)
        note = "token BN: statistics over batch x positions"
        return None, _Plan(path, site.kind, build, False, channels, shape,
                           "; ".join(filter(None, [note, differs and f"source {differs}"])))
    if dim == 1 and rank in _BN_BY_RANK:
        cls = _BN_BY_RANK[rank]

        def build(old):
            return _channel_bn(cls, old, channels, eps, wname, bname, offset)
        return None, _Plan(path, site.kind, build, False, channels, shape,
                           f"channels-first {name} over dim 1 -> {cls.__name__}")
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


def _factory(module: nn.Module, *tensors) -> dict:
    for t in (*tensors, *module.parameters(recurse=False), *module.buffers(recurse=False)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _copy_affine(new: nn.Module, weight, bias, offset: float = 0.0) -> None:
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


def _token_bn(old: nn.Module, channels: int, eps: float, wname, bname, offset: float) -> nn.Module:
    if isinstance(old, nn.LayerNorm) and len(old.normalized_shape) == 1:
        return TokenBatchNorm.from_layernorm(old)
    if hasattr(nn, "RMSNorm") and isinstance(old, nn.RMSNorm) and len(old.normalized_shape) == 1:
        return TokenBatchNorm.from_rmsnorm(old, eps=eps, weight_offset=offset)
    return _channel_bn(TokenBatchNorm, old, channels, eps, wname, bname, offset)


def _channel_bn(cls, old: nn.Module, channels: int, eps: float, wname, bname, offset: float) -> nn.Module:
    weight = getattr(old, wname) if wname else None
    bias = getattr(old, bname) if bname else None
    new = cls(channels, eps=eps, affine=weight is not None, **_factory(old, weight))
    if weight is not None:
        _copy_affine(new, weight, bias, offset)
    return new.train(old.training)


def _plan_from_bn(graph: ModelGraph, path: str, group: list[NormSite], to: str,
                  groups: int | None) -> tuple[str | None, _Plan | None]:
    site = group[0]
    module = graph.module(path) if site.source == "module" else None
    if site.source != "module" or not isinstance(module, _BatchNorm):
        where = site.path.split(":")[0] or "the model"
        return (f"functional batch_norm call inside {where}.forward: module replacement cannot swap it"), None
    reason = _unreached_reason(group)
    if reason:
        return reason, None
    shapes = {_module_input_shape(s) for s in group}
    if None in shapes:
        return "input shape unknown (captured without shapes: pass example inputs)", None
    ranks = {len(s) for s in shapes}
    if len(ranks) > 1:
        return (f"module called with inputs of different ranks ({sorted(ranks)}): one replacement cannot fit "
                "every call"), None
    rank = ranks.pop()
    shape = list(next(iter(shapes)))
    calls = max(max(s.calls for s in group), len(group))
    shared_note = f"shared by {calls} calls, replaced consistently" if calls > 1 else None
    channels = module.num_features
    token = isinstance(module, TokenBatchNorm) and rank > 2
    cls_name = type(module).__name__
    if to == "ln":
        if rank == 2 or token:
            note = "LayerNorm over the last dim" + (" (token BN)" if token else "")
            return None, _Plan(path, "batchnorm", _bn_to_layernorm, False, channels, shape,
                               "; ".join(filter(None, [note, shared_note])))
        return None, _Plan(path, "batchnorm", lambda old: ChannelLayerNorm.from_batchnorm(old), False, channels,
                           shape, "; ".join(filter(None, ["LayerNorm over dim 1 at each position", shared_note])))
    if token:
        return (f"{cls_name} normalizes the last dim of a rank-{rank} input; "
                f"{'GroupNorm' if to == 'gn' else 'FrozenBatchNorm'} normalizes dim 1"), None
    if to == "gn":
        g = groups or 1

        def build(old, _g=g):
            return batchnorm_to_groupnorm(old, _g)
        return None, _Plan(path, "batchnorm", build, False, channels, shape,
                           "; ".join(filter(None, [f"GroupNorm({g}, {channels})", shared_note])))
    # frozen
    if not module.track_running_stats or module.running_mean is None:
        return (f"{cls_name}({channels}) has track_running_stats=False: no running statistics to freeze "
                "(it always normalizes with batch statistics)"), None
    note = "frozen running stats" + (" (was in train mode: now uses running stats in training too)"
                                     if module.training else "")
    return None, _Plan(path, "batchnorm", FrozenBatchNorm.from_batchnorm, True, channels, shape,
                       "; ".join(filter(None, [note, shared_note])))


def _module_input_shape(site: NormSite) -> tuple | None:
    """Shape of what the norm *module* receives: the op's input, followed back through the module's
    own reshapes (TokenBatchNorm flattens (B, T, C) to (B*T, C) around its batch_norm)."""
    node = site.node
    x = node.arg(0) if isinstance(node, GNode) else None
    if not isinstance(x, GNode):
        return tuple(site.input_shape) if site.input_shape else None
    while x.call_key == node.call_key and x.op in DATA_MOVEMENT and x.inputs:
        x = x.inputs[0]
    return tuple(x.shape) if x.shape else None


def _bn_to_layernorm(bn: _BatchNorm) -> nn.LayerNorm:
    affine = bn.weight is not None
    new = nn.LayerNorm(bn.num_features, eps=bn.eps, elementwise_affine=affine,
                       bias=bn.bias is not None or not affine, **_factory(bn))
    if affine:
        _copy_affine(new, bn.weight, bn.bias)
    return new.train(bn.training)


# --- rewrite + verify --------------------------------------------------------------------------

def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _disable_fastpath(model: nn.Module, paths: Iterable[str], report: ConvertReport) -> None:
    """nn.TransformerEncoderLayer's fused inference path ignores swapped modules: turn it off."""
    done = set()
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts)):
            anc_path = ".".join(parts[:i])
            try:
                anc = model.get_submodule(anc_path) if anc_path else model
            except AttributeError:
                continue
            if isinstance(anc, nn.TransformerEncoderLayer) and anc.activation_relu_or_gelu and id(anc) not in done:
                anc.activation_relu_or_gelu = 0
                done.add(id(anc))
    if done:
        report.notes.append(f"disabled the fused inference fast path of {len(done)} nn.TransformerEncoderLayer(s): "
                            "it computes LayerNorm and a plain FFN from the modules' weights, whatever the modules are")


@torch.no_grad()
def _eval_outputs(model: nn.Module, calls: list[CallArgs]) -> list[list[torch.Tensor]]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return [[t.detach().clone() for t in flatten_outputs(ci.call(model))] for ci in calls]
    finally:
        for m, mode in modes.items():
            m.training = mode


def _compare(ref: list, out: list) -> ErrorStats:
    stats = ErrorStats()
    for a, b in zip(ref, out):
        stats = stats.merge(compare_outputs(a, b))
    return stats


def _site_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest absolute deviation relative to the expected tensor's largest magnitude."""
    e, a = expected.double(), actual.double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    diff = float((e - a).abs().max()) if e.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def _record_io(model: nn.Module, paths: list[str], ci: CallArgs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and eval output of the first call of each module at ``paths``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for p in paths:
        def hook(_m, args, out, _p=p):
            if _p not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[_p] = (args[0].detach().clone(), out.detach().clone())
        handles.append(model.get_submodule(p).register_forward_hook(hook))
    try:
        _eval_outputs(model, [ci])
    finally:
        for h in handles:
            h.remove()
    return seen


def _verification_inputs(model: nn.Module, ci: CallArgs) -> list[CallArgs]:
    """The example, two random inputs like it and one at another batch size (as fold checks), keeping
    those the unconverted model accepts."""
    batch = next((t.shape[0] for t in ci.tensors() if t.dim() > 0), None)
    device = next((t.device for t in ci.tensors()), None)
    out = [ci]
    for seed, kw in enumerate([{}, {}] + ([{"batch": batch + 1}] if batch else []), start=1):
        try:
            candidate = ci.like(torch.Generator().manual_seed(seed), **kw).to(device=device)
            _eval_outputs(model, [candidate])
        except Exception:  # noqa: BLE001 - an input the model rejects is no check
            continue
        out.append(candidate)
    return out


def _run(original: nn.Module, target: nn.Module, ci: CallArgs, graph: ModelGraph, plans: list[_Plan],
         blocks: list[FFNBlock], report: ConvertReport, *, to: str | None, ffn_bn_position: str, ffn_bn_init: str,
         calibrate_batches, progress) -> tuple[nn.Module, ConvertReport]:
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), torch.float32)
    rtol, atol = _tolerance(dtype)
    exact_plans = [p for p in plans if p.exact]
    checks = _verification_inputs(target, ci)
    ref = _eval_outputs(target, checks)
    recorded = _record_io(target, [p.path for p in exact_plans], ci) if exact_plans else {}

    # norm swaps
    undo: dict[str, nn.Module] = {}
    for plan in plans:
        old = target.get_submodule(plan.path)
        try:
            new = plan.build(old)
        except NormSurgeonError as e:
            report.actions.append(Action("skipped", plan.path, {"kind": plan.kind}, str(e)))
            continue
        _set_module(target, plan.path, new)
        undo[plan.path] = old
        report.actions.append(Action("converted", plan.path, {
            "from": type(old).__name__, "to": type(new).__name__, "kind": plan.kind, "channels": plan.channels,
            "input_shape": plan.input_shape, "exact": plan.exact, "note": plan.note}))

    # FFN BN insertion
    inserted: list[tuple[FFNBlock, str, str, nn.Module]] = []  # (block, linear path, bn path, bn)
    for block in blocks:
        reason = _ffn.check(block, graph, ffn_bn_position)
        linear_path = block.first if ffn_bn_position == "after-first" else block.second
        if reason:
            report.actions.append(Action("skipped", linear_path, {"kind": "ffn", "block": block.path}, reason))
            continue
        bn_path, bn = _ffn.wrap_linear(target, linear_path, block.hidden, ffn_bn_position,
                                       identity=ffn_bn_init == "identity")
        inserted.append((block, linear_path, bn_path, bn))
        report.actions.append(Action("inserted", bn_path, {
            "block": block.path, "linear": linear_path, "position": ffn_bn_position, "hidden": block.hidden,
            "init": ffn_bn_init, "activation": block.activation, "gated": block.gated}))
    _disable_fastpath(target, [a.path for a in report.actions if a.kind in ("converted", "inserted")], report)

    # does the converted model still run?
    try:
        _eval_outputs(target, [ci])
    except Exception as e:  # noqa: BLE001
        if not inserted:
            raise NormSurgeonError(f"the converted model fails on its example inputs: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}") from e
        for block, lin, bn_path, _ in inserted:
            _ffn.unwrap_linear(target, lin, ffn_bn_position)
            _rollback(report, bn_path, f"rolled back: the model fails with this BN inserted ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:160] if str(e) else ''})")
        inserted = []
        _eval_outputs(target, [ci])  # raises if the norm swaps alone break it

    new_bns = any(a.kind == "converted" and a.detail["to"] in ("TokenBatchNorm", "BatchNorm1d", "BatchNorm2d",
                                                               "BatchNorm3d") for a in report.actions)
    new_bns = new_bns or (inserted and ffn_bn_init == "fresh")
    batches = list(calibrate_batches) if calibrate_batches is not None else None
    if batches is not None:
        # identity FFN BNs get their statistics below (eval mode, exact); calibrate() is for BNs that
        # start from placeholder statistics, and it recalibrates every BN of the model
        if new_bns:
            try:
                report.calibration = calibrate(target, batches, progress=progress)
            except NormSurgeonError:
                raise
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"calibration failed: the model rejects a calibration batch: "
                                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            report.notes.append(f"recalibrated {report.calibration.recalibrated} BatchNorm(s) on "
                                f"{report.calibration.batches} batch(es) ({report.calibration.samples} samples)")
            new_paths = {a.path for a in report.actions if a.kind in ("converted", "inserted")}
            older = [n["path"] for n in report.calibration.norms if n["path"] not in new_paths]
            if older:
                report.notes.append(f"calibration also recomputed the statistics of {len(older)} BatchNorm(s) the "
                                    f"model had before the conversion (e.g. {older[0]})")
        elif inserted and ffn_bn_init == "identity":
            report.notes.append("identity FFN BatchNorms: statistics measured on the calibration data")
        else:
            report.notes.append("calibration skipped: the conversion created no BatchNorm with running statistics")

    # identity FFN BNs: statistics of their inputs with the model in eval, then affine = identity
    site_errors: list[float] = []
    rolled = 0
    if inserted and ffn_bn_init == "identity":
        data = batches if batches else [ci]
        _identity_stats(target, [bn for *_, bn in inserted], data)
        errs = _identity_errors(target, [(p, bn) for _, _, p, bn in inserted], ci)
        keep = []
        for item in inserted:
            err = errs.get(item[2], float("inf"))
            site_errors.append(err)
            if err > rtol:
                _ffn.unwrap_linear(target, item[1], ffn_bn_position)
                _rollback(report, item[2], f"rolled back: identity BN changed its input by {fmt_float(err)} "
                                           f"(relative; tolerance {rtol:g})")
                rolled += 1
            else:
                keep.append(item)
        inserted = keep

    # frozen BNs: each new module against the old BN's eval output on the same input
    for plan in exact_plans:
        if plan.path not in undo or plan.path not in recorded:
            continue
        x, y = recorded[plan.path]
        new = target.get_submodule(plan.path)
        with torch.no_grad():
            mode = new.training
            new.eval()
            err = _site_error(y, new(x))
            new.train(mode)
        site_errors.append(err)
        if err > rtol:
            _set_module(target, plan.path, undo.pop(plan.path))
            _rollback(report, plan.path, f"rolled back: FrozenBatchNorm deviates from the BN by {fmt_float(err)} "
                                         f"(relative; tolerance {rtol:g})")
            rolled += 1

    exact_done = bool(inserted and ffn_bn_init == "identity") or any(
        a.kind == "converted" and a.detail.get("exact") for a in report.actions)
    all_exact = not any(a.kind == "converted" and not a.detail.get("exact") for a in report.actions) and \
        not (inserted and ffn_bn_init == "fresh")
    report.function_preserving = all_exact
    out = _eval_outputs(target, checks)
    change = _compare(ref, out)
    report.output_change = change.to_dict()
    if exact_done or rolled:
        verify = {"sites_checked": len(site_errors), "max_site_error": max(site_errors, default=0.0),
                  "rtol": rtol, "atol": atol, "rolled_back": rolled, "max_abs_error": None,
                  "max_rel_error": None, "passed": True}
        if all_exact:
            verify.update(max_abs_error=change.max_abs_error, max_rel_error=change.max_rel_error,
                          cosine=change.min_cosine)
            if not change.within(rtol, atol):
                # every site passed alone but the whole model moved: undo all exact sites
                for item in inserted:
                    _ffn.unwrap_linear(target, item[1], ffn_bn_position)
                    _rollback(report, item[2], "rolled back: whole-model output deviated "
                                               f"({fmt_float(change.max_rel_error)} relative)")
                for plan in exact_plans:
                    if plan.path in undo:
                        _set_module(target, plan.path, undo.pop(plan.path))
                        _rollback(report, plan.path, "rolled back: whole-model output deviated "
                                                     f"({fmt_float(change.max_rel_error)} relative)")
                out = _eval_outputs(target, checks)
                after = _compare(ref, out)
                verify.update(rolled_back=rolled + len(inserted) + len(exact_plans),
                              max_abs_error=after.max_abs_error, max_rel_error=after.max_rel_error,
                              passed=after.within(rtol, atol), deviation_before_rollback=change.to_dict())
                report.output_change = after.to_dict()
        report.verify = verify

    _add_statements(report, to, ffn_bn_init, batches is not None)
    return target, report


def _rollback(report: ConvertReport, path: str, reason: str) -> None:
    for i, a in enumerate(report.actions):
        if a.path == path and a.kind in ("converted", "inserted"):
            detail = {k: v for k, v in a.detail.items() if k in ("kind", "from", "to", "block", "linear")}
            detail.setdefault("kind", "ffn" if a.kind == "inserted" else detail.get("kind"))
            report.actions[i] = Action("skipped", path, {**detail, "rolled_back": True}, reason)
            return


@torch.no_grad()
def _identity_stats(model: nn.Module, bns: list[_BatchNorm], batches: list[Any]) -> None:
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
        _eval_outputs(model, calls)
    finally:
        for h in handles:
            h.remove()
    for bn, st in stats.items():
        if st.count:
            st.write_to(bn)
    make_identity(bns)


def _identity_errors(model: nn.Module, items: list[tuple[str, nn.Module]], ci: CallArgs) -> dict[str, float]:
    errs: dict[str, float] = {}
    handles = []
    for path, bn in items:
        def hook(_m, args, out, _p=path):
            errs[_p] = max(errs.get(_p, 0.0), _site_error(args[0], out))
        handles.append(bn.register_forward_hook(hook))
    try:
        _eval_outputs(model, [ci])
    finally:
        for h in handles:
            h.remove()
    return errs


def _add_statements(report: ConvertReport, to: str | None, init: str, calibrated: bool) -> None:
    changed = [a for a in report.converted if not a.detail.get("exact")]
    if changed:
        kinds = sorted({f"{a.detail['from']} -> {a.detail['to']}" for a in changed})
        if to == "bn":
            report.notes.append(
                f"NOT function-preserving: {', '.join(kinds)} normalizes with batch statistics instead of per-sample "
                "ones. " + ("The new BatchNorms were calibrated on the data given; " if calibrated else
                            "The new BatchNorms start with running mean 0 / var 1: calibrate them (--calibrate) or ")
                + "train before relying on eval outputs.")
        else:
            report.notes.append(
                f"NOT function-preserving: {', '.join(kinds)} normalizes each sample instead of using batch "
                "statistics; fine-tune the model afterwards.")
    if any(a.detail.get("init") == "fresh" for a in report.inserted):
        report.notes.append("the inserted FFN BatchNorms are fresh (weight 1, bias 0): they change the function; "
                            "train (or use --ffn-bn-init identity for an exact insertion into a trained model).")
    if report.inserted:
        pos = report.inserted[0].detail["position"]
        report.notes.append(
            "FFN BatchNorms live in nn.Sequential wrappers: " +
            ("state-dict keys LINEAR.weight become LINEAR.0.weight, the BN is LINEAR.1.*" if pos == "after-first"
             else "state-dict keys LINEAR.weight become LINEAR.1.weight, the BN is LINEAR.0.*"))
    if report.function_preserving and (report.converted or report.inserted) and report.verify is not None \
            and report.verify.get("passed"):
        report.notes.append("function-preserving in eval mode: verified on the example inputs")
