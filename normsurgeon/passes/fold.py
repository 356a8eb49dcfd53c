"""The fold pass: every foldable inference-mode BatchNorm folded into its neighbours, verified.

Runs the ``fold_bn`` rule (match → check → rewrite) over the model, then compares the outputs with
the original ones (``verify.References``: the example inputs, two random inputs like them and one at
another batch size, where the original model accepts it). If they deviate beyond tolerance, every
site is undone and the sites are re-applied in halves, verifying each group: a site that breaks the
model is rolled back and reported (``passes.base.apply_verified``).

Memory: the reference is the original model's *outputs*, not a copy of it. With ``inplace=True`` (the
CLI always, since it owns the model it loaded) the model is rewritten in place and the weights a
fold replaces go to an on-disk undo log, so the pass needs about one copy of the model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.export import ExportedProgram

from ..errors import NormSurgeonError, one_line
from ..find import normalizes_parameter
from ..graph import ModelGraph, capture, without_kv_cache
from ..graph.capture import NOT_CALLED
from ..inputs import CallArgs, as_call_args
from ..loading import program_inputs, program_module
from ..outputs import ErrorStats
from ..recipe import record
from ..report import Action, FoldActions, Table, fmt_float
from ..verify import References, Tolerance, UndoLog, UndoStore, error_text, run_clean, tolerance_for, \
    tolerance_for_dtypes
from . import fold_bn_program as program_rule
from . import token_sites
from .base import Applied, apply_verified
from .fold_bn import FoldContext, check, combine, entry_reason, match, rewrite

__all__ = ["fold", "fold_program", "FoldReport", "replay"]


@dataclass
class FoldReport(FoldActions):
    """Every BatchNorm of the model (folded into what, skipped why, rolled back why) + the check."""

    capture: str
    actions: list[Action] = field(default_factory=list)
    verify: ErrorStats | None = None
    verified_inputs: int = 0
    user_inputs: int = 0  # of verified_inputs, from the user (--inputs)
    tolerance: float | None = None
    passed: bool | None = None
    verify_error: str | None = None
    output: str | None = None  # what api.fold wrote (None: nothing)
    dry_run: bool | None = None  # api.fold without an output (None: not asked)
    verified_shapes: list[list[list[int]]] = field(default_factory=list)  # per input set checked, its shapes
    reference: dict = field(default_factory=dict)  # a low-precision model's reference (References.to_json)

    def shapes_note(self) -> str | None:
        """Which input sizes the verdict covers: a fold is proved for these, not for sizes never run."""
        if not self.verified_shapes:
            return None
        sets = ["+".join("x".join(map(str, s)) or "scalar" for s in shapes) for shapes in self.verified_shapes]
        return f"checked at input shapes {', '.join(dict.fromkeys(sets))}; other sizes are not proved"

    @property
    def num_norms(self) -> int:
        return sum(1 for a in self.actions if not a.detail.get("functional") and not a.detail.get("affine"))

    @property
    def affine_actions(self) -> list[Action]:
        """The LayerNorm/RMSNorm affine folds (``affine=True``; ``passes.norm_affine``)."""
        return [a for a in self.actions if a.detail.get("affine")]

    def summary(self) -> str:
        if not self.actions:
            return "no BatchNorm in this model: nothing to fold"
        if self.affine_actions:
            return self._summary_affine()
        functional = [a for a in self.actions if a.detail.get("functional")]
        folded_functional = sum(1 for a in functional if a.kind == "folded")
        text = f"folded {len(self.folded) - folded_functional} of {self.num_norms} BatchNorms"
        if functional:
            text += (f" (+{len(functional)} functional batch_norm calls, "
                     f"{folded_functional or 'not'} folded)")
        if self.rolled_back:
            text += f"; {len(self.rolled_back)} rolled back"
        if self.passed is None:
            return text + "; not verified"
        err = self.verify.max_rel_error if self.verify else None
        user = f", {self.user_inputs} of them the user's" if self.user_inputs else ""
        text += (f"; {error_text(err, self.tolerance, f'{self.verified_inputs} inputs{user}', self.reference)}: "
                 f"{'passed' if self.passed else 'FAILED'}")
        if self.verify_error:
            text += f" ({self.verify_error})"
        training = sum(1 for a in self.skipped if (a.reason or "").startswith("in training mode"))
        if training:
            # The usual slip after a training loop: say it where the user looks, not only per row.
            text += f". {training} BatchNorm(s) are in training mode: call model.eval() before folding"
        return text

    def _summary_affine(self) -> str:
        aff = self.affine_actions
        done = sum(a.kind == "folded" for a in aff)
        text = f"folded the affine of {done} of {len(aff)} LayerNorm/RMSNorm sites"
        if self.num_norms:
            text += f", {len(self.folded) - done} of {self.num_norms} BatchNorms"
        untied = sorted({p for a in aff for p in a.detail.get("untied", [])})
        if untied:
            text += f"; untied {', '.join(untied)} (its own copy of the tied weight)"
        if self.rolled_back:
            text += f"; {len(self.rolled_back)} rolled back"
        if self.passed is None:
            return text + "; not verified"
        err = self.verify.max_rel_error if self.verify else None
        return text + (f"; {error_text(err, self.tolerance, f'{self.verified_inputs} inputs', self.reference)}: "
                       f"{'passed' if self.passed else 'FAILED'}")

    def to_json(self) -> dict:
        verify: dict[str, Any] = {"max_abs_error": None, "max_rel_error": None, "passed": self.passed}
        if self.verify is not None:
            verify.update(max_abs_error=_finite(self.verify.max_abs_error),
                          max_rel_error=_finite(self.verify.max_rel_error))
        verify.update(tolerance=self.tolerance, inputs=self.verified_inputs, user_inputs=self.user_inputs,
                      shapes=self.verified_shapes, **self.reference)
        if self.verify_error:
            verify["error"] = self.verify_error
        return {
            "capture": self.capture,
            "folded": [{"norm": a.path, "into": a.detail["into"], "position": a.detail["position"],
                        "via": a.detail.get("via", []), **_affine_json(a)} for a in self.folded],
            "skipped": [{"norm": a.path, "reason": a.reason, "rolled_back": a.kind == "rolled_back",
                         **_affine_json(a)} for a in self.skipped],
            "verify": verify,
            "summary": {"batchnorms": self.num_norms, "norm_affines": len(self.affine_actions),
                        "folded": len(self.folded),
                        "skipped": len(self.skipped) - len(self.rolled_back),
                        "rolled_back": len(self.rolled_back)},
            **({} if self.dry_run is None else {"output": self.output, "dry_run": self.dry_run}),
        }

    def tables(self) -> list[Table]:
        rows = []
        for a in self.actions:
            if a.kind == "folded":
                via = " → ".join(a.detail.get("via", []))
                what = ", ".join(a.detail["into"]) + (f"  (via {via})" if via else "")
                rows.append([a.path, "folded", "affine" if a.detail.get("affine") else a.detail["position"], what])
            else:
                rows.append([a.path, a.kind.replace("_", " "), "", a.reason])
        title = "Norm folding" if self.affine_actions else "BatchNorm folding"
        table = Table(f"{title} (capture: {self.capture})",
                      ["norm" if self.affine_actions else "BatchNorm", "result", "position", "into / reason"], rows)
        table.notes.append(self.summary())
        if self.actions and self.shapes_note():
            table.notes.append(self.shapes_note())
        return [table]


def _affine_json(a: Action) -> dict:
    """A norm-affine fold's extra keys: its kind (layernorm/rmsnorm), untied weights, created biases."""
    if not a.detail.get("affine"):
        return {}
    return {"kind": a.detail["kind"], **{k: a.detail[k] for k in ("untied", "created_bias") if k in a.detail}}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def fold(model: nn.Module | ExportedProgram, example_inputs: Any = None, *, inplace: bool = False,
         verify: bool = True, rtol: float | None = None, atol: float | None = None, graph: ModelGraph | None = None,
         extra_inputs: Sequence[Any] = (), affine: bool = False, untie: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable BatchNorm of ``model`` into its neighbours; see the module docstring.

    With ``affine`` the scale γ and shift β of every pre-norm LayerNorm/RMSNorm fold into the linear
    layers that read it too (``passes.norm_affine``; reported with kind layernorm/rmsnorm), leaving
    norms without an affine; a tied lm_head is refused unless ``untie`` gives it its own weight.

    Returns ``(folded_model, report)``. ``model`` is untouched unless ``inplace=True``. With
    ``verify`` the outputs are compared with the original ones on ``example_inputs``, two random
    inputs like them and one at another batch size; sites that push the max relative error (max abs
    error / max |expected|) above ``rtol`` (or the abs error above ``atol``) are rolled back. ``rtol``
    None takes the tolerance table's entry for the model's dtype (``verify.TOLERANCE``: 1e-4 for
    float32, whose rounding alone moves a deep model's outputs by a few 1e-5 after an exact fold);
    a given ``rtol`` is raised to the table's entry for float16/bfloat16 models.
    ``extra_inputs`` (the user's data, e.g. ``verify.load_inputs_file``) join every check; the original
    model must accept them. The folds are recorded on the returned model (``normsurgeon.recipe``).

    A ``torch.export.ExportedProgram`` is folded in its own graph (``fold_program``): a new program is
    returned (never in place), and ``example_inputs`` default to the program's own.
    """
    if isinstance(model, ExportedProgram):
        if affine:
            raise NormSurgeonError("affine=True folds norm affines of an nn.Module, not of a torch.export program")
        return fold_program(model, example_inputs, verify=verify, rtol=rtol, atol=atol, extra_inputs=extra_inputs)
    if example_inputs is None:
        raise NormSurgeonError("fold needs example inputs for an nn.Module (the graph is captured by running it)")
    ci = as_call_args(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    with without_kv_cache(work):  # a user's decoder: its cache object would fail capture and verification
        return _fold_module(work, ci, verify, rtol, atol, graph, extra_inputs, inplace, affine, untie)


def _fold_module(work: nn.Module, ci: CallArgs, verify: bool, rtol: float | None, atol: float | None,
                 graph: ModelGraph | None, extra_inputs: Sequence[Any], inplace: bool, affine: bool = False,
                 untie: bool = False) -> tuple[nn.Module, FoldReport]:
    # The references run the example first: inputs the model rejects fail here, in one line, and the
    # capture need not run the model again to check them.
    refs = References.record(work, ci, extra=[as_call_args(e) for e in extra_inputs]) if verify else None
    # repeated blocks (graph.blocks) only where the outcome is verified: they stand for blocks never traced
    graph = graph if graph is not None else capture(work, ci, checked=refs is not None,
                                                    repeat_blocks=None if refs is not None else False)
    ctx = FoldContext(work, graph)
    report = FoldReport(graph.describe())
    tol = tolerance_for(work, rtol, atol)
    if refs is not None:  # a low-precision model's float32 reference: the original's own error sets the bar
        tol, report.reference = refs.tolerance(tol), refs.to_json()
    report.tolerance = tol.rtol
    if refs is not None:
        report.verified_inputs, report.user_inputs = len(refs), refs.user_inputs
        report.verified_shapes = refs.shapes

    # An in-place fold owns the model: spill replaced weights to disk instead of holding a copy.
    with UndoStore(spill=inplace) as store:
        actions, applied = _fold_all(work, graph, ctx, store)
        applied = _drop_still_running(work, ci, applied, actions, store)
        if affine:  # after the still-running check: a norm whose affine folded still runs, by design
            from .norm_affine import fold_all as _fold_affines

            more, more_applied = _fold_affines(work, graph, store, untie=untie)
            actions.update(more)
            applied += more_applied
        if refs is not None:
            verdict = apply_verified(work, applied, refs, tol, store, done="folded")
            actions.update(verdict.actions)
            report.verify, report.passed, report.verify_error = verdict.stats, verdict.passed, verdict.error
    report.actions = list(actions.values())
    token_sites.report_paths(work, report.actions)
    bn_folded = [a for a in report.folded if not a.detail.get("affine")]
    if bn_folded:
        record(work, {"op": "fold", "folded": [{"norm": a.path, "into": a.detail["into"],
                                                "position": a.detail["position"]} for a in bn_folded],
                      "verify": report.to_json()["verify"]}, ci)
    if affine:
        from .norm_affine import record_action

        record_action(work, report, ci)
    return work, report


def replay(model: nn.Module, action: dict, ci: CallArgs) -> None:
    """Redo a recorded fold on ``model`` (a rebuilt base): the same match and rewrite, at exactly the
    recorded sites, without verification (the weights that matter are loaded afterwards)."""
    want = {token_sites.site_path(model, f["norm"]): f for f in action.get("folded") or []}
    # the recipe's own inputs, which this architecture ran on when it was folded: no separate
    # forward first (on a large model it costs as much as the capture); a replay is not verified,
    # so every block is traced
    graph = capture(model, ci, checked=True, repeat_blocks=False)
    ctx = FoldContext(model, graph)
    for entry in match(model, graph, ctx):
        f = want.pop(entry.norm, None)
        if f is None:
            continue
        site = next((s for s in entry.sites if s.position == f["position"] and list(s.into) == list(f["into"])), None)
        if site is None:
            raise NormSurgeonError(f"recipe: cannot redo the fold of {entry.norm} into {', '.join(f['into'])} "
                                   f"({f['position']}) on the rebuilt model: {entry.reason or 'no such site'}")
        rewrite(site, ctx, UndoLog())
    if want:
        raise NormSurgeonError(f"recipe: the rebuilt model has no BatchNorm at {', '.join(want)} to fold")
    token_sites.unwrap(model)


def _fold_all(work: nn.Module, graph: ModelGraph, ctx: FoldContext, store: UndoStore
              ) -> tuple[dict[str, Action], list[Applied]]:
    """match → check → rewrite for every BatchNorm; the Action of each and the sites rewritten."""
    # a part never run is not a failed capture: its BNs get entry_reason's "never called"
    failed_paths = {p.path: p.error for p in graph.failed_parts() if p.error != NOT_CALLED}
    applied: list[Applied] = []
    actions: dict[str, Action] = {}
    for entry in match(work, graph, ctx):
        reason = entry.reason or entry_reason(entry, ctx, failed_paths) or bad_running_var(entry.module)
        if entry.module is None and len(entry.nodes) == 1 and normalizes_parameter(entry.nodes[0]):
            reason = ("weight standardization (batch_norm over a weight, in the forward of "
                      f"{entry.nodes[0].module_path or 'the model'}): not a normalization layer, nothing to fold")
        if reason is not None:
            actions[entry.norm] = Action("skipped", entry.norm, {"functional": entry.module is None}, reason)
            continue
        chosen, why = None, {}
        for site in entry.sites:
            r = check(site, ctx)
            if r is None:
                chosen = site
                break
            why[site.position] = r
        if chosen is None:
            actions[entry.norm] = Action("skipped", entry.norm, {"functional": entry.module is None},
                                         combine({**entry.reasons, **why}))
            continue
        undo = store.log()
        try:
            action = rewrite(chosen, ctx, undo)
        except Exception as e:  # noqa: BLE001 - a failed rewrite is a skipped site, never a half-edit
            undo.restore()
            actions[entry.norm] = Action("skipped", entry.norm, {"functional": entry.module is None},
                                         f"rewrite failed: {one_line(e, typed=True)}")
            continue
        actions[entry.norm] = action
        if entry.module is not None:  # the object the forward must no longer call (_drop_still_running)
            chosen.module = entry.module
        applied.append(Applied(entry.norm, chosen, action, undo, redo=lambda u, s=chosen: rewrite(s, ctx, u),
                               rolled_back=lambda why, s=chosen: _rolled_back(s, why),
                               describe=f"folding into {', '.join(chosen.into)}"))
    return actions, applied


def bad_running_var(module: nn.Module | None) -> str | None:
    """The skip reason of a BatchNorm whose running_var is negative or NaN in some channel: it computes
    NaN there itself, so no fold of it (or comparison through it) means anything."""
    return _bad_var(getattr(module, "running_var", None))


def _bad_var(var: Any) -> str | None:
    if not isinstance(var, torch.Tensor) or not var.is_floating_point():
        return None
    bad = int(((var < 0) | torch.isnan(var)).sum())
    if not bad:
        return None
    return (f"running_var negative/NaN in {bad} of {var.numel()} channels: this BatchNorm itself outputs NaN "
            "there (recalibrate it: normsurgeon calibrate)")


def _drop_still_running(work: nn.Module, ci: CallArgs, applied: list[Applied], actions: dict[str, Action],
                        store: UndoStore) -> list[Applied]:
    """Every "folded" must be true of the model returned: run it once with a hook on each folded BN
    module object; a BN the forward still calls (reached through a plain tuple/list attribute or a
    closure, which replacing its registered child by Identity cannot reach) has its site taken back.
    The others are re-applied on the restored model, in order, as ``apply_verified`` does."""
    watched = [a for a in applied if getattr(a.site, "module", None) is not None]
    if not watched:
        return applied
    ran: set[int] = set()
    hooks = [a.site.module.register_forward_pre_hook(lambda m, _args: ran.add(id(m))) for a in watched]
    try:
        run_clean(work, ci)  # no grad, fixed RNG, training-mode BN statistics restored
    except Exception:  # noqa: BLE001 - a model that no longer runs is the verification's to report
        return applied
    finally:
        for h in hooks:
            h.remove()
    still = [a for a in watched if id(a.site.module) in ran]
    if not still:
        return applied
    for a in reversed(applied):
        a.undo.restore()
    kept = []
    for a in applied:
        if a in still:
            actions[a.key] = a.rolled_back(
                "rolled back: the model still calls this BatchNorm after it was replaced by Identity (the forward "
                "reaches it through a reference the fold cannot replace, e.g. a plain tuple or list attribute), "
                "so its effect would be applied twice")
            continue
        undo = store.log()
        try:
            a.action = actions[a.key] = a.redo(undo)
        except Exception as e:  # noqa: BLE001 - a failed rewrite is a rolled-back site, never a half-edit
            undo.restore()
            actions[a.key] = a.rolled_back(f"rolled back: rewrite failed: {one_line(e, typed=True)}")
            continue
        a.undo = undo
        kept.append(a)
    return kept


def _rolled_back(site: Any, why: str) -> Action:
    detail = {"into": site.into, "position": site.position}
    if getattr(site, "functional", False):
        detail["functional"] = True
    return Action("rolled_back", site.norm, detail, why)


# --- a torch.export program --------------------------------------------------------------------------

def fold_program(ep: ExportedProgram, example_inputs: Any = None, *, verify: bool = True, rtol: float | None = None,
                 atol: float | None = None, extra_inputs: Sequence[Any] = ()) -> tuple[ExportedProgram, FoldReport]:
    """Fold every foldable batch norm of ``ep``'s graph (``fold_bn_program``); ``ep`` is untouched.

    Verified like ``fold``, against the same references and tolerance table. A program is not edited
    in place: the sites are applied to a fresh copy, and if the check fails they are re-applied one at
    a time to fresh copies, keeping those that verify (a site that deviates is rolled back).
    """
    ci = as_call_args(example_inputs) if example_inputs is not None else program_inputs(ep)
    report = FoldReport("torch.export program")
    dtypes = {t.dtype for t in (*ep.state_dict.values(), *ep.constants.values())
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    tol = tolerance_for_dtypes(dtypes, rtol, atol)
    report.tolerance = tol.rtol
    # another batch size is tried too: a static program rejects it, and it is left out
    refs = References.record(program_module(ep), ci, extra=[as_call_args(e) for e in extra_inputs]) if verify else None
    if refs is not None:
        tol, report.reference = refs.tolerance(tol), refs.to_json()
        report.tolerance = tol.rtol
        report.verified_inputs, report.user_inputs = len(refs), refs.user_inputs
        report.verified_shapes = refs.shapes

    actions: dict[str, Action] = {}
    chosen: list[program_rule.ProgramSite] = []
    for entry in program_rule.match(ep):
        if entry.reason is not None or not entry.sites:
            reason = entry.reason or combine(entry.reasons)
            actions[entry.norm] = Action("skipped", entry.norm, {"functional": entry.functional}, reason)
            continue
        site = entry.sites[0]  # "after" first, as in the module fold
        why = _bad_var(_program_tensor(ep, site.stats.get("running_var")))
        if why is not None:
            actions[entry.norm] = Action("skipped", entry.norm, {"functional": entry.functional}, why)
            continue
        chosen.append(site)
        actions[entry.norm] = Action("folded", site.norm)

    folded, applied = _build(ep, chosen, actions)
    if refs is not None:
        stats, err = _compare_program(folded, refs)
        if not tol.ok(stats, err) and applied:
            folded, stats, err = _keep_verified(ep, applied, actions, refs, tol)
        report.verify, report.passed, report.verify_error = stats, tol.ok(stats, err), err
    report.actions = list(actions.values())
    return folded, report


def _program_tensor(ep: ExportedProgram, placeholder: str | None) -> torch.Tensor | None:
    """The parameter, buffer or constant a placeholder of ``ep`` stands for."""
    sig = ep.graph_signature
    target = sig.inputs_to_buffers.get(placeholder) or sig.inputs_to_parameters.get(placeholder) \
        or sig.inputs_to_lifted_tensor_constants.get(placeholder)
    if target is None:
        return None
    return ep.state_dict.get(target, ep.constants.get(target))


def _build(ep: ExportedProgram, sites: list, actions: dict[str, Action]) -> tuple[ExportedProgram, list]:
    """Apply ``sites`` to a fresh copy; a site whose rewrite fails is skipped (and the copy restarted)."""
    todo = list(sites)
    while True:
        work, applied = program_rule.ProgramEdit(ep), []
        try:
            for site in todo:
                actions[site.norm] = program_rule.rewrite(site, work)
                applied.append(site)
            return work.finish(), applied
        except Exception as e:  # noqa: BLE001 - a failed rewrite is a skipped site, never a half-edit
            if not todo:
                raise NormSurgeonError(f"cannot rebuild the program: {one_line(e, typed=True)}") from e
            # a rewrite failed, or the rebuilt program does not verify: drop sites from the end
            bad = todo[len(applied)] if len(applied) < len(todo) else todo[-1]
            actions[bad.norm] = Action("skipped", bad.norm, {}, f"rewrite failed: {one_line(e, typed=True)}")
            todo.remove(bad)


def _keep_verified(ep: ExportedProgram, applied: list, actions: dict[str, Action], refs: References,
                   tol: Tolerance) -> tuple[ExportedProgram, ErrorStats, str | None]:
    """Re-apply the sites one at a time on fresh copies, keeping only those that verify."""
    kept: list = []
    folded = ep
    stats, err = _compare_program(ep, refs)
    if not tol.ok(stats, err):
        for site in applied:
            actions[site.norm] = _rolled_back(site, "rolled back: " + (
                refs.why_unverifiable or "the outputs differ even with nothing folded (the program is not "
                                         "deterministic?)"))
        return ep, stats, err
    for site in applied:
        trial, done = _build(ep, [*kept, site], actions)
        s, e = _compare_program(trial, refs) if site in done else (stats, "rewrite failed")
        if site in done and tol.ok(s, e):
            kept.append(site)
            folded, stats, err = trial, s, e
            continue
        what = e or f"max rel error {fmt_float(s.max_rel_error)} > tolerance {tol.rtol:g}"
        actions[site.norm] = _rolled_back(site, f"rolled back: folding into {', '.join(site.into)} changed the "
                                                f"outputs ({what})")
    if not kept:
        folded = _build(ep, [], actions)[0]
    return folded, stats, err


def _compare_program(ep: ExportedProgram, refs: References) -> tuple[ErrorStats, str | None]:
    try:
        model = program_module(ep)
    except Exception as e:  # noqa: BLE001 - a program that cannot be run is a failed check
        return ErrorStats(math.inf, math.inf, -1.0), f"the program does not run: {one_line(e)}"
    return refs.compare(model)
