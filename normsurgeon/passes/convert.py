"""The convert pass: swap normalization layers and insert FFN BatchNorms, guided by the captured graph.

Every swap follows match -> check -> rewrite on the user's ``nn.Module`` (a deep copy unless
``inplace=True``): norm sites come from :func:`normsurgeon.find.find_norms`, FFN blocks from
``passes.ffn_bn``; the rule for each target is one file (``RULES``), and each site is either
rewritten (an ``Action``) or skipped with a human reason. The input layout of a site (its rank,
which dim is normalized) comes from the captured graph, never from guessing.

Which swaps are exact:

- ``to="frozen"`` (BN -> FrozenBatchNorm) and ``ffn_bn_init="identity"`` are function-preserving in
  eval mode. Both are verified: each site's module is checked on the inputs it received on the
  example inputs, and, when every change is exact, the whole model's outputs are compared with the
  references (``verify``); sites that deviate are rolled back and reported as skipped.
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
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..calibrate import CalibrationReport, calibrate
from ..errors import NormSurgeonError, one_line
from ..find import NormSite, find_norms
from ..graph import ModelGraph, capture, without_kv_cache
from ..inputs import CallArgs, as_call_args
from ..recipe import record
from ..loading import ExportedModel
from ..report import Action, Table, fmt_float
from ..verify import References, Tolerance, UndoLog, UndoStore, error_text, record_io, run_clean, set_module, \
    site_error, tolerance_for
from . import ffn_bn as _ffn
from . import token_sites
from .base import Applied, apply_verified
from .bn_to_frozen import BnToFrozen
from .bn_to_gn import BnToGn
from .bn_to_ln import BnToLn
from .ffn_bn import FFNBlock
from .ln_to_bn import LnToBn
from .ln_to_pn import LnToPn
from .ln_to_progressive import LnToProgressive
from .swap import Plan, SwapRule, kind_name

__all__ = ["convert", "insert_ffn_bn", "replay", "ConvertReport", "RULES", "TARGETS"]

# --to value -> the rule that implements it (one file each)
RULES: dict[str, type[SwapRule]] = {r.target: r for r in (LnToBn, LnToPn, BnToLn, BnToGn, BnToFrozen)}
# exact swaps that rewrite more than the norm (their own pass): --to value -> "module.function"
EXACT_PASSES: dict[str, str] = {"rms": "ln_to_rms.convert"}  # LayerNorm -> RMSNorm, writers centred
TARGETS = tuple(RULES) + tuple(EXACT_PASSES)
_NEW_BN_CLASSES = ("TokenBatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "PowerNorm")


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
    # new token BNs / PowerNorms: whose batch statistics they take ({"padding_aware", "mask", "note"})
    statistics: dict | None = None
    output: str | None = None  # what api.convert wrote (None: nothing)

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
            "statistics": self.statistics,
            "notes": list(self.notes),
            "output": self.output,
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
                         + (f"; whole model max abs error {fmt_float(v['max_abs_error'])}, "
                            + error_text(v["max_rel_error"], v.get("rtol", v.get("tolerance")),
                                         f"{v.get('inputs', '?')} inputs", v)
                            if v.get("max_abs_error") is not None else "")
                         + f"; {'passed' if v['passed'] else 'FAILED'}"
                         + (f"; {v['rolled_back']} site(s) rolled back" if v.get("rolled_back") else ""))
        if self.output_change is not None and not self.function_preserving:
            oc = self.output_change
            notes.append(f"output change on the example inputs (eval): max abs {fmt_float(oc['max_abs_error'])}, "
                         f"max rel {fmt_float(oc['max_rel_error'])}, cosine {oc['cosine']:.4f}"
                         + (" (vs a float32 run of the original)" if oc.get("reference") == "float32" else ""))
        if self.statistics is not None and self.statistics.get("padding_aware"):  # only models that take a mask
            notes.append(f"statistics: {self.statistics['note']}")
        notes.extend(self.notes)
        if not out:
            out.append(Table("Conversion", ["path", "reason"], []))
        out[-1].notes.extend(notes)
        return out


# --- public API --------------------------------------------------------------------------------

def check_module(model: Any) -> None:
    """convert takes an ``nn.Module``, never a torch.export program."""
    if isinstance(model, (torch.export.ExportedProgram, ExportedModel)):
        raise NormSurgeonError("convert needs the nn.Module (.pt, transformers directory or package.module:factory): "
                               "a conversion changes what the model trains, and a torch.export program (.pt2) "
                               "holds a frozen inference graph (fold and export work on it)")


def convert(model: nn.Module, to: str | None = "bn", *, example_inputs: Any = None, groups: int | None = None,
            ffn_bn: bool = False, ffn_bn_position: str = "after-first", ffn_bn_init: str = "fresh",
            calibrate_batches: Iterable[Any] | None = None, inplace: bool = False, graph: ModelGraph | None = None,
            progress: Callable[[int, int | None], None] | None = None,
            extra_inputs: Sequence[Any] = (), progressive: int | None = None, pn_warmup_steps: int = 4000,
            pn_groups: int | None = None, padding_mask: str | None = "attention_mask",
            rtol: float | None = None, atol: float | None = None, untie: bool = False
            ) -> tuple[nn.Module, ConvertReport]:
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
      ``"pn"``      LayerNorm / RMSNorm over the last dim -> ``PowerNorm`` (quadratic-mean BN; batch statistic
                    for ``pn_warmup_steps`` training steps, then the running one; ``pn_groups`` turns on the
                    authors' group scaling, which does not fold). Not exact: train it.

    progressive: with ``to="bn"``, install ``ProgressiveNorm`` (``lam * LN(x) + (1 - lam) * RepBN(x)``,
    lam 1 -> 0 over ``progressive`` training steps) instead of a BatchNorm: exact at step 0, verified.
    padding_mask: for ``bn``/``pn``, the keyword (or positional parameter) of the model's forward that
    carries the (B, T) attention mask; when the forward has it, ``nn.capture_padding_mask`` is installed
    on the returned model so token BN / PowerNorm batch statistics count real tokens only (the report's
    ``statistics`` says which). ``None``: never.
      ``"rms"``     LayerNorm -> ``nn.RMSNorm``, exactly: the affines fold into their readers and every
                    writer of the residual stream is mean-centred (``passes.ln_to_rms``; ``untie`` gives a
                    tied lm_head its own weight). Verified, rolled back as a whole if it deviates.
      ``None``      only with ``ffn_bn=True``: insert FFN BNs, convert nothing.

    ffn_bn: also insert a TokenBatchNorm into every FFN block (see :mod:`normsurgeon.passes.ffn_bn`), at
    ``ffn_bn_position`` ("after-first" | "before-second"), initialised ``ffn_bn_init``: "fresh" (for
    training) or "identity" (statistics measured on the data, affine set so that eval output is
    unchanged; verified).
    calibrate_batches: data for :func:`normsurgeon.calibrate.calibrate`, run after the conversion when
    it created BatchNorms (their running stats start at mean 0 / var 1).
    example_inputs: how to call the model (tensor, tuple, dict or CallArgs); defaults to the model's
    own ``example_inputs``. graph: a graph already captured from ``model`` (saves a capture).
    extra_inputs: the user's own inputs (``verify.load_inputs_file``); they join the whole-model check
    and the measured output change. rtol/atol: the exact swaps' tolerance (``verify.tolerance_for``;
    None: by dtype).

    The input model is left untouched unless ``inplace=True``. Module train/eval modes are kept. What
    was rewritten is recorded on the returned model (``normsurgeon.recipe``), so it can be saved as a
    recipe and rebuilt. A torch.export program (or a loaded ``.pt2``) is refused: ``NormSurgeonError``.
    """
    validate(to, groups, ffn_bn, ffn_bn_position, ffn_bn_init, progressive, pn_warmup_steps, pn_groups)
    check_module(model)
    ci = _inputs(model, example_inputs)
    if to in EXACT_PASSES:
        if ffn_bn or calibrate_batches is not None:
            raise NormSurgeonError(f"to={to!r} is an exact rewrite: it takes no ffn_bn and no calibrate_batches")
        from . import ln_to_rms

        return ln_to_rms.convert(model, ci, inplace=inplace, untie=untie, rtol=rtol, atol=atol,
                                 extra_inputs=extra_inputs)
    if untie:
        raise NormSurgeonError("untie goes with to='rms' (or fold(affine=True))")
    if graph is None:
        # a swap is not checked against the original's function: every block traced (no repeated blocks)
        graph = capture(model, ci, repeat_blocks=False)
    sites = find_norms(graph)
    report = ConvertReport(to, graph.describe())
    rule = _rule(to, groups, progressive, pn_warmup_steps, pn_groups)
    plans = _plan_norms(graph, sites, rule, report) if rule is not None else []
    blocks = []
    if ffn_bn:
        blocks, rejected = _ffn.match_ffn_blocks(graph)
        report.ffn_blocks = blocks
        for path, reason in rejected:
            report.actions.append(Action("skipped", path, {"kind": "ffn"}, reason))
    if rule is not None and not plans and not [a for a in report.actions if a.detail.get("kind") in rule.sources]:
        if not (ffn_bn and blocks):
            found = ", ".join(f"{n} {k}" for k, n in sorted(_counts(sites).items())) or "no normalization layers"
            wanted = " or ".join(kind_name(k) for k in rule.sources)
            raise NormSurgeonError(f"no {wanted} in this model (found {found}): nothing to convert to "
                                   f"{rule.target_name}")
    if ffn_bn and not blocks and to is None:
        raise NormSurgeonError("no FFN block (linear -> activation -> linear) found in this model: nothing to "
                               "insert a BatchNorm into")
    if isinstance(rule, BnToGn):
        rule.check_plans(plans)

    target = model if inplace else copy.deepcopy(model)
    run = _Conversion(target, ci, graph, report, plans, ffn_bn_position, ffn_bn_init, spill=inplace,
                      extra=[as_call_args(e) for e in extra_inputs],
                      padding_kwarg=padding_mask if to in ("bn", "pn") else None, rtol=rtol, atol=atol)
    with without_kv_cache(target):  # a user's decoder: its cache object would fail the checks' captures
        run.run(blocks, to, calibrate_batches, progress)
    token_sites.report_paths(target, report.actions)
    _record(target, report, to, groups, ffn_bn_position, ffn_bn_init, ci,
            {"progressive": progressive, "pn_warmup_steps": pn_warmup_steps, "pn_groups": pn_groups})
    return target, report


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

def validate(to, groups, ffn_bn, position, init, progressive=None, pn_warmup_steps=4000, pn_groups=None) -> None:
    """Refuse a bad combination of options before any work (the CLI calls this too)."""
    if progressive is not None:
        if to != "bn":
            raise NormSurgeonError(f"`progressive` only goes with `to='bn'` (got `to={to!r}`)")
        if isinstance(progressive, bool) or not isinstance(progressive, int) or progressive < 0:
            raise NormSurgeonError(f"`progressive` must be a number of training steps >= 0, got {progressive!r}")
    if to != "pn" and (pn_warmup_steps != 4000 or pn_groups is not None):
        raise NormSurgeonError(f"`pn_warmup_steps`/`pn_groups` only go with `to='pn'` (got `to={to!r}`)")
    if isinstance(pn_warmup_steps, bool) or not isinstance(pn_warmup_steps, int) or pn_warmup_steps < 0:
        raise NormSurgeonError(f"`pn_warmup_steps` must be a number of training steps >= 0, got {pn_warmup_steps!r}")
    if pn_groups is not None and (isinstance(pn_groups, bool) or not isinstance(pn_groups, int) or pn_groups < 1):
        raise NormSurgeonError(f"`pn_groups` must be a positive integer, got {pn_groups!r}")
    if to is None:
        if not ffn_bn:
            raise NormSurgeonError(f"nothing to do: give a target (`to`: {'|'.join(TARGETS)}) or `ffn_bn=True`")
    elif to not in TARGETS:
        raise NormSurgeonError(f"unknown `to={to!r}`: use one of {', '.join(TARGETS)}")
    if groups is not None:
        if to != "gn":
            raise NormSurgeonError(f"`groups` only goes with `to='gn'` (got `to={to!r}`)")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise NormSurgeonError(f"`groups` must be a positive integer, got {groups!r}")
    if position not in _ffn.POSITIONS:
        raise NormSurgeonError(f"unknown `ffn_bn_position={position!r}`: use {' or '.join(_ffn.POSITIONS)}")
    if init not in _ffn.INITS:
        raise NormSurgeonError(f"unknown `ffn_bn_init={init!r}`: use {' or '.join(_ffn.INITS)}")


def _rule(to, groups, progressive=None, pn_warmup_steps=4000, pn_groups=None) -> SwapRule | None:
    if to is None:
        return None
    if progressive is not None:
        return LnToProgressive(steps=progressive)
    if to == "pn":
        return LnToPn(warmup_steps=pn_warmup_steps, group_num=pn_groups)
    return RULES[to](groups)


def _inputs(model: nn.Module, example_inputs: Any) -> CallArgs:
    if example_inputs is not None:
        return as_call_args(example_inputs)
    from ..loading import getattr_inputs

    ci = getattr_inputs(model)
    if ci is None:
        raise NormSurgeonError("convert needs example inputs (the input layout of every norm comes from the "
                               "captured graph); pass `example_inputs` or `input_shapes`")
    return ci


def _counts(sites: list[NormSite]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sites:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


# --- plan: match + check -----------------------------------------------------------------------

def _plan_norms(graph: ModelGraph, sites: list[NormSite], rule: SwapRule, report: ConvertReport) -> list[Plan]:
    by_path: dict[str, list[NormSite]] = {}
    for s in sites:
        by_path.setdefault(s.path, []).append(s)
    plans = []
    for path, group in by_path.items():
        site = group[0]
        if site.kind not in rule.sources:
            reason = rule.skip_other(site)
            if reason:
                report.actions.append(Action("skipped", path, {"kind": site.kind}, reason))
            continue
        reason, plan = rule.plan(graph, path, group)
        if plan is not None:
            others = [p for p in graph.aliases(graph.module(path)) if p != path]
            if others:
                reason, plan = (f"the same module is also registered as {', '.join(others)}; replacing one path "
                                "would split them"), None
        if plan is None:
            report.actions.append(Action("skipped", path, {"kind": site.kind, "source": site.source}, reason))
        else:
            plans.append(plan)
    return plans


# --- rewrite + verify --------------------------------------------------------------------------

@dataclass
class _Inserted:
    block: FFNBlock
    linear: str  # path of the wrapped linear
    bn_path: str
    bn: nn.Module
    wrapper: nn.Module  # the nn.Sequential(linear, bn) now at ``linear``


@dataclass
class _Conversion:
    """One conversion run, step by step (``run``): swap, insert, smoke-run, calibrate, identity
    statistics, per-site checks, whole-model check. Every rewrite keeps its undo log."""

    target: nn.Module
    ci: CallArgs
    graph: ModelGraph
    report: ConvertReport
    plans: list[Plan]
    position: str
    init: str
    spill: bool = False
    extra: list[CallArgs] = field(default_factory=list)
    padding_kwarg: str | None = None
    rtol: float | None = None
    atol: float | None = None
    swapped: dict[str, tuple[Plan, UndoLog]] = field(default_factory=dict)
    inserted: list[_Inserted] = field(default_factory=list)
    site_errors: list[float] = field(default_factory=list)

    def run(self, blocks: list[FFNBlock], to: str | None, calibrate_batches, progress) -> ConvertReport:
        self.tol = tolerance_for(self.target, self.rtol, self.atol)
        exact_plans = [p for p in self.plans if p.exact]
        self.refs = References.record(self.target, self.ci, extra=self.extra, eval_mode=True)
        recorded = record_io(self.target, [p.path for p in exact_plans], self.ci) if exact_plans else {}
        with UndoStore(spill=self.spill) as self.store:
            self._swap_norms()
            self._insert_ffn_bns(blocks)
            _disable_fastpath(self.target, [a.path for a in self.report.actions
                                            if a.kind in ("converted", "inserted")], self.report)
            self._smoke_run()
            batches = list(calibrate_batches) if calibrate_batches is not None else None
            self._calibrate(batches, progress)
            if self.inserted and self.init == "identity":
                self._identity_ffn_bns(batches)
            self._check_exact_sites(recorded)
            self._check_whole_model()
        self._padding_mask()
        _add_statements(self.report, to, self.init, batches is not None)
        return self.report

    # steps ---------------------------------------------------------------------------------------

    def _swap_norms(self) -> None:
        for plan in self.plans:
            undo = self.store.log()
            try:
                action = SwapRule.rewrite(self.target, plan, undo)
            except NormSurgeonError as e:
                undo.restore()
                self.report.actions.append(Action("skipped", plan.path, {"kind": plan.kind}, str(e)))
                continue
            self.swapped[plan.path] = (plan, undo)
            self.report.actions.append(action)

    def _insert_ffn_bns(self, blocks: list[FFNBlock]) -> None:
        for block in blocks:
            reason = _ffn.check(block, self.graph, self.position)
            linear = block.first if self.position == "after-first" else block.second
            if reason:
                self.report.actions.append(Action("skipped", linear, {"kind": "ffn", "block": block.path}, reason))
                continue
            width, kind = block.width(self.position), block.bn(self.position)
            bn_path, bn = _ffn.wrap_linear(self.target, linear, width, self.position,
                                           identity=self.init == "identity", bn=kind)
            self.inserted.append(_Inserted(block, linear, bn_path, bn, self.target.get_submodule(linear)))
            self.report.actions.append(Action("inserted", bn_path, {
                "block": block.path, "linear": linear, "position": self.position, "hidden": width,
                "init": self.init, "activation": block.activation, "gated": block.gated,
                **({"bn": kind} if kind != "token" else {})}))

    def _unwrap(self, item: _Inserted, reason: str) -> None:
        _ffn.unwrap_linear(self.target, item.linear, self.position)
        _rollback(self.report, item.bn_path, reason)

    def _smoke_run(self) -> None:
        """Does the converted model still run? If not, FFN BNs go first; the swaps alone must run."""
        try:
            run_clean(self.target, self.ci, eval_mode=True)
            return
        except Exception as e:  # noqa: BLE001
            if not self.inserted:
                raise NormSurgeonError(f"the converted model fails on its example inputs: "
                                       f"{one_line(e, typed=True)}") from e
            why = one_line(e, typed=True, limit=160)
        for item in self.inserted:
            self._unwrap(item, f"rolled back: the model fails with this BN inserted ({why})")
        self.inserted = []
        run_clean(self.target, self.ci, eval_mode=True)  # raises if the norm swaps alone break it

    def _padding_mask(self) -> None:
        """New token norms take batch statistics: over real tokens when the forward gets a padding mask."""
        from ..nn import PowerNorm, ProgressiveNorm, TokenBatchNorm, capture_padding_mask

        kinds = (TokenBatchNorm, PowerNorm, ProgressiveNorm)
        new = [a.path for a in self.report.actions if a.kind in ("converted", "inserted")
               and isinstance(self.target.get_submodule(a.path), kinds)]
        if not new:
            return
        kw = self.padding_kwarg
        try:
            params = inspect.signature(self.target.forward).parameters if kw else {}
        except (TypeError, ValueError):
            params = {}
        if kw and kw in params:
            capture_padding_mask(self.target, kwarg=kw)
            self.report.statistics = {
                "padding_aware": True, "mask": kw,
                "note": f"over real tokens only when the model is called with {kw} (a padding-mask hook is "
                        "installed on the model; calibrate uses it too)"}
        else:
            self.report.statistics = {
                "padding_aware": False, "mask": None,
                "note": "statistics include every position (the model's forward takes no "
                        f"{kw or 'padding mask'} argument; use normsurgeon.nn.padding_mask(mask) to give one)"}

    def _calibrate(self, batches: list | None, progress) -> None:
        if batches is None:
            return
        report = self.report
        new_bns = any(a.kind == "converted" and a.detail["to"] in _NEW_BN_CLASSES for a in report.actions) \
            or bool(self.inserted and self.init == "fresh")
        # identity FFN BNs get their statistics in _identity_ffn_bns (eval mode, exact); calibrate() is
        # for BNs that start from placeholder statistics, and it recalibrates every BN of the model
        if not new_bns:
            report.notes.append("identity FFN BatchNorms: statistics measured on the calibration data"
                                if self.inserted and self.init == "identity" else
                                "calibration skipped: the conversion created no BatchNorm with running statistics")
            return
        try:
            report.calibration = calibrate(self.target, batches, progress=progress)
        except NormSurgeonError:
            raise
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"calibration failed: the model rejects a calibration batch: "
                                   f"{one_line(e, typed=True)}") from e
        cal = report.calibration
        report.notes.append(f"recalibrated {cal.recalibrated} BatchNorm(s) on {cal.batches} batch(es) "
                            f"({cal.samples} samples)")
        new_paths = {a.path for a in report.actions if a.kind in ("converted", "inserted")}
        older = [n["path"] for n in cal.norms if n["path"] not in new_paths]
        if older:
            report.notes.append(f"calibration also recomputed the statistics of {len(older)} BatchNorm(s) the "
                                f"model had before the conversion (e.g. {older[0]})")

    def _identity_ffn_bns(self, batches: list | None) -> None:
        """Statistics of each identity FFN BN's input (model in eval), affine = identity; each BN
        checked on its real input."""
        _ffn.measure_identity_stats(self.target, [i.bn for i in self.inserted], batches or [self.ci])
        errs = _ffn.identity_errors(self.target, [(i.bn_path, i.bn) for i in self.inserted], self.ci)
        keep = []
        for item in self.inserted:
            err = errs.get(item.bn_path, float("inf"))
            self.site_errors.append(err)
            if err > self.tol.rtol:
                self._unwrap(item, f"rolled back: identity BN changed its input by {fmt_float(err)} "
                                   f"(relative; tolerance {self.tol.rtol:g})")
            else:
                keep.append(item)
        self.inserted = keep

    def _check_exact_sites(self, recorded: dict) -> None:
        """Each exact swap (frozen BN) against the old module's eval output on the same input."""
        for path, (plan, undo) in list(self.swapped.items()):
            if not plan.exact or path not in recorded:
                continue
            x, y = recorded[path]
            new = self.target.get_submodule(path)
            mode = new.training
            try:
                with torch.no_grad():
                    err = site_error(y, new.eval()(x))
            finally:
                new.train(mode)
            self.site_errors.append(err)
            if err > self.tol.rtol:
                undo.restore()
                del self.swapped[path]
                _rollback(self.report, path, f"rolled back: {type(new).__name__} deviates from the original by "
                                             f"{fmt_float(err)} (relative; tolerance {self.tol.rtol:g})")

    def _check_whole_model(self) -> None:
        """Compare the whole model with the references when every change is exact (a changed function
        has nothing to be compared with); the sites that break it are rolled back."""
        report, tol = self.report, self.tol
        exact_swaps = [(p, plan, undo) for p, (plan, undo) in self.swapped.items() if plan.exact]
        identity = self.inserted if self.init == "identity" else []
        all_exact = not any(a.kind == "converted" and not a.detail.get("exact") for a in report.actions) and \
            not (self.inserted and self.init == "fresh")
        report.function_preserving = all_exact
        change, _ = self.refs.compare(self.target)
        report.output_change = {**change.to_dict(), "inputs": len(self.refs), "user_inputs": self.refs.user_inputs,
                                **self.refs.to_json()}
        tol = self.refs.tolerance(tol)  # a low-precision model's float32 reference: the original's error sets the bar
        rolled = _rolled_count(report)
        if not (exact_swaps or identity or rolled):
            return
        verify = {"sites_checked": len(self.site_errors), "max_site_error": max(self.site_errors, default=0.0),
                  "inputs": len(self.refs), "user_inputs": self.refs.user_inputs,
                  "rtol": tol.rtol, "atol": tol.atol, "rolled_back": rolled, "max_abs_error": None,
                  "max_rel_error": None, "passed": None, **self.refs.to_json()}
        report.verify = verify
        if not all_exact:
            # Other swaps change the function: the whole model has no reference to meet. Only the
            # per-site checks ran, and "passed" (a whole-model verdict) stays None.
            verify["whole_model"] = "not compared: other changes in this conversion are not function-preserving"
            return
        applied = [self._applied_swap(path, plan, undo) for path, plan, undo in exact_swaps] + \
            [self._applied_insert(item) for item in identity]
        verdict = apply_verified(self.target, applied, self.refs, Tolerance(tol.rtol, tol.atol), self.store,
                                 done="converted")
        for a in applied:
            final = verdict.actions[a.key]
            if final is not a.action:
                _rollback(report, a.key, final.reason or "rolled back")
        kept = {k for k, v in verdict.actions.items() if v.kind != "skipped"}
        self.inserted = [i for i in self.inserted if i.bn_path in kept or i not in identity]
        verify.update(max_abs_error=verdict.stats.max_abs_error, max_rel_error=verdict.stats.max_rel_error,
                      cosine=verdict.stats.min_cosine, passed=verdict.passed, rolled_back=_rolled_count(report))
        if verdict.first is not None:
            verify["deviation_before_rollback"] = verdict.first.to_dict()
            report.output_change = verdict.stats.to_dict()

    def _applied_swap(self, path: str, plan: Plan, undo: UndoLog) -> Applied:
        new = self.target.get_submodule(path)
        action = next(a for a in self.report.actions if a.path == path and a.kind == "converted")

        def redo(u: UndoLog) -> Action:
            set_module(self.target, path, new, u)
            return action
        return Applied(path, plan, action, undo, redo, lambda why: Action("skipped", path, {}, why),
                       describe=f"{action.detail['to']} at {path}")

    def _applied_insert(self, item: _Inserted) -> Applied:
        action = next(a for a in self.report.actions if a.path == item.bn_path and a.kind == "inserted")
        linear = self.target.get_submodule(item.linear)[0 if self.position == "after-first" else 1]
        undo = self.store.log()
        undo.on_restore(lambda: set_module(self.target, item.linear, linear))

        def redo(u: UndoLog) -> Action:
            set_module(self.target, item.linear, item.wrapper, u)
            return action
        return Applied(item.bn_path, item, action, undo, redo, lambda why: Action("skipped", item.bn_path, {}, why),
                       describe=f"the BatchNorm at {item.bn_path}")


# --- recipe: record and replay ------------------------------------------------------------------

def _record(model: nn.Module, report: ConvertReport, to: str | None, groups: int | None, position: str,
            init: str, ci: CallArgs, options: dict | None = None) -> None:
    """What this conversion rewrote, site by site (rolled-back sites are not in it): ``replay`` redoes
    exactly these sites, never re-deciding which to keep."""
    if not (report.converted or report.inserted):
        return
    cal = report.calibration
    record(model, {
        "op": "convert", "to": to if report.converted else None, "groups": groups,
        # the rule's options (progressive / PowerNorm) and whether a padding-mask hook went on
        **{k: v for k, v in (options or {}).items() if v is not None},
        "padding_mask": (report.statistics or {}).get("mask"),
        "swapped": [a.path for a in report.converted],
        "ffn_bn": {"position": position, "init": init,
                   "sites": [{"linear": a.detail["linear"], "hidden": a.detail["hidden"],
                              **({"bn": a.detail["bn"]} if "bn" in a.detail else {})} for a in report.inserted]}
        if report.inserted else None,
        "function_preserving": report.function_preserving, "verify": report.verify,
        "output_change": report.output_change,
        "calibration": {"batches": cal.batches, "samples": cal.samples} if cal is not None else None,
    }, ci)


def replay(model: nn.Module, action: dict, ci: CallArgs) -> None:
    """Redo a recorded conversion on ``model`` (a rebuilt base), in place: the rule of ``--to`` plans the
    recorded sites on a fresh capture and the same swap rewrites them; FFN BatchNorms are wrapped in
    at the recorded linears. Nothing is verified or calibrated: the weights are loaded afterwards."""
    to, swapped, ffn = action.get("to"), action.get("swapped") or [], action.get("ffn_bn")
    if swapped:
        if to not in RULES:
            raise NormSurgeonError(f"recipe: unknown convert target {to!r} (written by a newer normsurgeon?)")
        rule = _rule(to, action.get("groups"), action.get("progressive"), action.get("pn_warmup_steps", 4000),
                     action.get("pn_groups"))
        # the recipe's own inputs, which this architecture ran on when it was converted: no separate
        # forward first (on a large model it costs as much as the capture); a replay is not verified,
        # so every block is traced
        graph = capture(model, ci, checked=True, repeat_blocks=False)
        by_path: dict[str, list[NormSite]] = {}
        for s in find_norms(graph):
            by_path.setdefault(s.path, []).append(s)
        for path in map(lambda p: token_sites.site_path(model, p), swapped):
            if path not in by_path:
                raise NormSurgeonError(f"recipe: convert --to {to}: the rebuilt model has no norm at {path}")
            reason, plan = rule.plan(graph, path, by_path[path])
            if plan is None:
                raise NormSurgeonError(f"recipe: convert --to {to}: cannot redo {path} on the rebuilt model: {reason}")
            SwapRule.rewrite(model, plan, UndoLog())
    sites = (ffn or {}).get("sites") or []
    for site in sites:
        _ffn.wrap_linear(model, site["linear"], int(site["hidden"]), ffn["position"], identity=ffn["init"] == "identity",
                         bn=site.get("bn", "token"))
    token_sites.unwrap(model)
    paths = list(swapped) + [site["linear"] for site in sites]
    _disable_fastpath(model, paths, ConvertReport(to, "replay"))
    if action.get("padding_mask"):
        from ..nn import capture_padding_mask
        capture_padding_mask(model, kwarg=action["padding_mask"])


def _rolled_count(report: ConvertReport) -> int:
    """Sites rolled back in this run, each counted once (never plans that were not built)."""
    return sum(1 for a in report.actions if a.kind == "skipped" and a.detail.get("rolled_back"))


def _rollback(report: ConvertReport, path: str, reason: str) -> None:
    for i, a in enumerate(report.actions):
        if a.path == path and a.kind in ("converted", "inserted"):
            detail = {k: v for k, v in a.detail.items() if k in ("kind", "from", "to", "block", "linear")}
            detail.setdefault("kind", "ffn" if a.kind == "inserted" else detail.get("kind"))
            report.actions[i] = Action("skipped", path, {**detail, "rolled_back": True}, reason)
            return


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


def _add_statements(report: ConvertReport, to: str | None, init: str, calibrated: bool) -> None:
    changed = [a for a in report.converted if not a.detail.get("exact")]
    if changed:
        kinds = sorted({f"{a.detail['from']} -> {a.detail['to']}" for a in changed})
        if to in ("bn", "pn"):
            report.notes.append(
                f"NOT function-preserving: {', '.join(kinds)} normalizes with batch statistics instead of per-sample "
                "ones. " + ("The new BatchNorms were calibrated on the data given; " if calibrated else
                            "The new BatchNorms start with running mean 0 / var 1: calibrate them (`calibrate_file`) or ")
                + "train before relying on eval outputs.")
        else:
            report.notes.append(
                f"NOT function-preserving: {', '.join(kinds)} normalizes each sample instead of using batch "
                "statistics; fine-tune the model afterwards.")
    if any(a.detail.get("to") == "ProgressiveNorm" for a in report.converted):
        report.notes.append("ProgressiveNorm: lambda falls from 1 to 0 over the training steps (counted in each module, "
                            "saved with it); once it reaches 0 only the RepBN runs and fold removes it")
    if any(a.detail.get("to") == "PowerNorm" for a in report.converted):
        report.notes.append("PowerNorm: its running quadratic mean starts at 1 and is set by training or by "
                            "calibration (exactly); in eval it folds like a BatchNorm")
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
