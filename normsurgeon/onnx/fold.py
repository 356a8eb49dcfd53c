"""Fold the BatchNormalization nodes of an ONNX model, verified in ONNX Runtime.

The rule (``onnx.fold_rule``) matches sites on the model's graph; the sites are applied to a fresh
copy of the model (``onnx_ir``), and the copy is compared in ONNX Runtime with the original on the
input sets of ``onnx.ortcheck`` (example, random, other sizes of each symbolic dim, the user's). If it
deviates beyond tolerance, the sites are re-applied in halves (as ``passes.base.apply_verified``
does for modules): groups that verify are kept, each single site that does not is rolled back with
the error it caused. A model is never edited in place: the caller's ``ModelProto`` is untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import NormSurgeonError, one_line
from ..outputs import ErrorStats
from ..passes.fold import FoldReport
from ..report import Action, Table, fmt_float
from .graph import OnnxGraph, load_ir
from .ortcheck import InputSet, Reference, derive_inputs, user_inputs
from .runtime import InputCheck
from .fold_rule import OnnxSite, match, rewrite

__all__ = ["fold_onnx", "fold_file", "OnnxFoldReport", "save_onnx", "is_onnx", "refuse_load_options"]


def is_onnx(model: Any) -> bool:
    """``model`` is an ``onnx.ModelProto`` or a path ending in ``.onnx``."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).lower().endswith(".onnx")
    import onnx

    return isinstance(model, onnx.ModelProto)


def refuse_load_options(options: Mapping[str, Any]) -> None:
    """Options that say how to build or call a PyTorch model mean nothing for an ONNX graph."""
    given = [k for k, v in options.items() if v]
    if given:
        raise NormSurgeonError(f"{', '.join(f'`{k}`' for k in given)} do(es) not apply to an ONNX model: its "
                               "inputs come from the graph (give real ones with `inputs_file`)")


@dataclass
class OnnxFoldReport(FoldReport):
    """``FoldReport`` (same JSON contract) plus which input sets proved it, in ONNX Runtime."""

    checks: list[InputCheck] = field(default_factory=list)
    atol: float | None = None
    sizes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    batchnorms_left: int | None = None

    def to_json(self) -> dict:
        d = super().to_json()
        d["verify"]["atol"] = self.atol
        d["verify"]["rule"] = "max abs error <= rtol * max |expected| + atol, per output tensor"
        d["verify"]["checks"] = [c.to_json() for c in self.checks]
        d["verify"]["dynamic_sizes"] = self.sizes
        d["batchnorms_left"] = self.batchnorms_left
        d["notes"] = self.notes
        return d

    def tables(self) -> list[Table]:
        tables = super().tables()
        if self.checks:
            t = Table("Verification in ONNX Runtime (CPU): folded vs original", ["inputs", "shapes", "max abs",
                                                                                 "max rel", "result"])
            t.rows = [c.row() for c in self.checks]
            t.notes.append(f"pass: max abs <= rtol·max|expected| + atol (rtol={self.tolerance:g}, atol={self.atol:g}), "
                           "per output tensor")
            if self.sizes:
                t.notes.append("dynamic dims (example first): " + ", ".join(
                    f"{d} {'/'.join(map(str, s))}" for d, s in self.sizes.items()))
            t.notes.extend(self.notes)
            tables.append(t)
        return tables


def _proto(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return None


def load_proto(model: Any):
    import onnx_ir as ir

    return ir.to_proto(load_ir(model))


def fold_onnx(model: Any, *, rtol: float | None = None, atol: float | None = None, inputs_file: str | os.PathLike | None = None,
              extra_inputs: Sequence[Mapping[str, Any]] = (), dims: Mapping[str, int] | None = None,
              verify: bool = True, seed: int = 0):
    """Fold every exactly foldable BatchNormalization of ``model`` (a path or an ``onnx.ModelProto``).

    Returns ``(folded ModelProto, OnnxFoldReport)``. ``dims``: sizes of symbolic input dims for the
    example inputs (by dim name); ``inputs_file``/``extra_inputs``: the user's inputs (by graph input
    name), verified too. Without ``verify`` nothing is checked (``report.passed`` is None).
    """
    import onnx
    import onnx_ir as ir

    proto = _proto(model)
    if proto is None:
        proto = load_proto(model)
    original = proto.SerializeToString()
    ir_model = ir.from_proto(proto)
    view = OnnxGraph(ir_model)
    matched = match(view)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    report = OnnxFoldReport(capture=f"onnx (opset {opset}, {len(proto.graph.node)} nodes)")
    overridable = [v.name for v in ir_model.graph.inputs if v.is_initializer()]
    if overridable:
        report.notes.append(f"{len(overridable)} initializer(s) are also listed as graph inputs (an older exporter's "
                            "keep_initializers_as_inputs): they are read as the constants they hold, and a fold "
                            "changes their values; feeding them at run time would bypass the fold")
    sites: dict[str, OnnxSite] = {}
    for label, _, site, why in matched:
        if site is None:
            report.actions.append(Action("skipped", label, reason=why))
        else:
            sites[label] = site
            report.actions.append(_folded(site))

    def build(subset: list[OnnxSite]) -> tuple[bytes, dict[str, str]]:
        m = ir.from_proto(proto)
        nodes = list(m.graph)
        g = OnnxGraph(m, shapes=False)
        failed = {}
        for s in subset:
            try:
                rewrite(s, g, nodes)
            except Exception as e:  # noqa: BLE001 - a failed rewrite is a skipped site, never a half-edit
                failed[s.label] = f"rewrite failed: {one_line(e, typed=True)}"
                return b"", failed
        out = ir.to_proto(m)
        try:
            onnx.checker.check_model(out)
        except Exception as e:  # noqa: BLE001
            failed.update({s.label: f"the rewritten graph fails onnx.checker: {one_line(e)}" for s in subset})
            return b"", failed
        return out.SerializeToString(), failed

    order = list(sites.values())
    if not verify:
        data, failed = build(order)
        for label, why in failed.items():
            _roll_back(report, label, why)
        folded = onnx.load_from_string(data) if data else proto
        report.batchnorms_left = _count_bn(folded)
        return folded, report

    sets, sizes = derive_inputs(proto, dims=dims, seed=seed)
    if inputs_file is not None:
        sets += user_inputs(proto, inputs_file)
    for i, feeds in enumerate(extra_inputs):
        sets.append(InputSet(f"user inputs {len([s for s in sets if s.user]) + 1}", dict(feeds), user=True))
    ref = Reference.record(original, sets, rtol, atol)
    report.tolerance, report.atol, report.sizes = ref.rtol, ref.atol, sizes
    report.notes += ref.notes
    report.user_inputs = sum(1 for s in ref.sets if s.user)

    def verdict(data: bytes, stop_early: bool = False) -> tuple[list[InputCheck], str | None, bool]:
        checks, err = ref.compare(data, stop_early=stop_early)
        return checks, err, err is None and bool(checks) and all(c.passed for c in checks)

    kept: list[OnnxSite] = []
    data, failed = build(order)
    checks, err, ok = verdict(data) if data else ([], next(iter(failed.values()), None), False)
    if ok or not order:
        kept = order
    else:
        first, checks_all, err_all = _worst(checks), bool(checks), err

        def settle(group: list[OnnxSite]) -> None:
            nonlocal data
            trial = kept + group
            d, fails = build(trial)
            c, e, good = verdict(d, stop_early=True) if d else ([], None, False)
            if good:
                kept.extend(group)
                data = d
                return
            if len(group) == 1:
                s = group[0]
                if s.label in fails:  # the rewrite itself failed (or its graph did not check)
                    _roll_back(report, s.label, f"rolled back: {fails[s.label]}")
                    return
                why = e or (
                    f"max rel error {fmt_float(_worst(c).max_rel_error)} beyond tolerance on "
                    f"{next((x.name for x in c if not x.passed), '?')}")
                _roll_back(report, s.label, f"rolled back: folding into {', '.join(s.into)} changed the outputs "
                                            f"({why})")
                return
            half = len(group) // 2
            settle(group[:half])
            settle(group[half:])

        settle(order)
        data, _ = build(kept)
        if not data:  # nothing kept: the original
            data = original
        checks, err, ok = verdict(data)
        what = f"max rel error {fmt_float(first.max_rel_error)}" if checks_all else (err_all or "no result")
        report.notes.append(f"with every site folded: {what}; "
                            f"{len(order) - len(kept)} site(s) rolled back")
    report.checks = checks
    report.verify = _worst(checks)
    report.verified_inputs = len(checks)
    report.passed = ok
    report.verify_error = err
    folded = onnx.load_from_string(data)
    report.batchnorms_left = _count_bn(folded)
    return folded, report


def fold_file(model: Any, *, output: str | os.PathLike | None = None, force: bool = False,
              inputs_file: str | os.PathLike | None = None, extra_inputs: Sequence[Mapping[str, Any]] | None = None,
              rtol: float | None = None, atol: float | None = None, input_shapes: Sequence[str] = (), **kwargs: Any):
    """``api.fold`` of an ``.onnx`` path or ``ModelProto``: ``fold_onnx``, then the folded graph saved to
    ``output`` (``.onnx``; checked before any work, never the input, written only if verified).
    ``input_shapes`` (``--input-shape``, one per graph input) size the symbolic dims of the example."""
    from ..loading import check_output_path

    if input_shapes:  # --input-shape: the sizes of the graph's symbolic dims in the example inputs
        from .ortcheck import dims_from_shapes

        kwargs["dims"] = {**dims_from_shapes(_proto(model) or load_proto(model), input_shapes),
                          **kwargs.get("dims", {})}
    src = Path(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else None
    out = check_output_path(output, force=force, inputs=[src], suffixes=(".onnx",)) if output is not None else None
    folded, report = fold_onnx(model, rtol=rtol, atol=atol, inputs_file=inputs_file,
                               extra_inputs=list(extra_inputs or []), **kwargs)
    report.dry_run = out is None
    if out is not None and report.passed:
        report.output = str(save_onnx(folded, out, force=force, input_path=src))
    return folded, report


def _folded(site: OnnxSite) -> Action:
    via = [op for t in site.targets for op in t.chain]
    return Action("folded", site.label, {"into": site.into, "position": site.position, "via": via})


def _roll_back(report: OnnxFoldReport, label: str, why: str) -> None:
    for i, a in enumerate(report.actions):
        if a.path == label:
            report.actions[i] = Action("rolled_back", label, dict(a.detail), why)


def _worst(checks: list[InputCheck]) -> ErrorStats:
    s = ErrorStats()
    for c in checks:
        s = s.merge(c.stats if c.stats is not None else ErrorStats(float("inf"), float("inf"), -1.0))
    return s


def _count_bn(proto) -> int:
    return sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")


def save_onnx(proto, path: str | os.PathLike, *, force: bool = False, input_path: str | os.PathLike | None = None
              ) -> Path:
    """Write ``proto`` to ``path`` atomically (never over the input; an existing file needs ``force``)."""
    import onnx

    from ..loading import atomic_write, check_output_path

    out = check_output_path(path, force=force, inputs=[input_path], suffixes=(".onnx",))
    if proto.ByteSize() > 2 ** 31 - 1:
        raise NormSurgeonError(f"`output` {out}: the folded model is over 2 GiB; external data is not supported here yet")
    atomic_write(out, lambda tmp: onnx.save(proto, tmp))
    return out
