"""Rotate the residual stream by a seeded orthogonal Q (QuaRot/SpinQuant's first step), verified.

An RMSNorm without affine commutes with an orthogonal Q (‖xQ‖ = ‖x‖), so if every writer of the
stream writes y·Q instead of y (embeddings E·Q, output projections Qᵀ·W, their biases b·Q, cls tokens
and position parameters p·Q, patch convs over their output channels) and every linear reading a
norm's output reads x·Q (W·Q), the model computes the same function while its hidden activations are
rotated: outliers spread over all channels, which is what rotation-based quantization wants.

Found on the graph like the other norm passes (``passes.stream``). Refused, naming the norm: a norm
that still carries an affine (``fold(affine=True)`` first) or subtracts the mean (``convert(to="rms")``
first), a norm whose output goes anywhere but linear layers, a writer that is not linear, a tensor
whose roles need two different rotations. Q: a randomized Hadamard when the width is a power of 2,
a randomized Hadamard ⊗ a small random orthogonal matrix for 2^k·m, a random orthogonal matrix from a
QR for an odd width (``norm_math.orthogonal``); the math is float64 (float32 sums for bfloat16/float16
weights: ``norm_math.rotation_dtype``), cast back. The Hadamard is applied as a fast Walsh–Hadamard
transform, slice by slice in place (``norm_math.Rotation``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..errors import NormSurgeonError, one_line
from ..find import NormSite, find_norms
from ..graph import GNode, ModelGraph, capture
from ..graph.ops import data_users
from ..inputs import as_call_args
from ..norm_math import Rotation, rotate_reader_, rotate_writer_, rotation
from ..outputs import ErrorStats
from ..recipe import record
from ..report import Action, Table
from ..verify import References, UndoLog, UndoStore, error_text, tolerance_for
from .base import Applied, apply_verified
from .stream import (Reader, Stream, Writer, affine_of, hand_written_inputs, output_of, own_tensor, per_head,
                     readers_of, tensor_aliases, uses, writers_of)


@dataclass
class RotateReport:
    """The rotation: which norms, readers and writers it went through, the seed, the check."""

    capture: str
    seed: int
    width: int | None = None
    matrix: str | None = None  # randomized Hadamard | random orthogonal (QR) | randomized Hadamard (p) ⊗ ...
    norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    refused: list[Action] = field(default_factory=list)  # the norms (or tensors) that stop the rotation
    verify: ErrorStats | None = None
    tolerance: float | None = None
    verified_inputs: int = 0
    passed: bool | None = None
    verify_error: str | None = None
    output: str | None = None  # what the facade wrote (api.rotate), None: nothing
    reference: dict = field(default_factory=dict)  # a low-precision model's reference (References.to_json)

    @property
    def rotated(self) -> bool:
        return bool(self.passed) and not self.refused

    def summary(self) -> str:
        if self.refused:
            return f"not rotated: {self.refused[0].path}: {self.refused[0].reason}"
        err = self.verify.max_rel_error if self.verify else None
        return (f"rotated the residual stream (width {self.width}, {self.matrix}, seed {self.seed}) through "
                f"{len(self.norms)} norms, {len(self.readers)} readers, {len(self.writers)} writers; "
                f"{error_text(err, self.tolerance, f'{self.verified_inputs} inputs', self.reference)}: "
                f"{'passed' if self.passed else 'FAILED'}" + (f" ({self.verify_error})" if self.verify_error else ""))

    def to_json(self) -> dict:
        v = self.verify
        return {"capture": self.capture, "seed": self.seed, "width": self.width, "matrix": self.matrix,
                "rotated": self.rotated, "norms": self.norms, "readers": self.readers, "writers": self.writers,
                "refused": [{"path": a.path, "reason": a.reason} for a in self.refused],
                "verify": {"max_abs_error": _finite(v.max_abs_error) if v else None,
                           "max_rel_error": _finite(v.max_rel_error) if v else None,
                           "passed": self.passed, "tolerance": self.tolerance, "inputs": self.verified_inputs,
                           **self.reference,
                           **({"error": self.verify_error} if self.verify_error else {})},
                "output": self.output}

    def tables(self) -> list[Table]:
        rows = [[p, "norm"] for p in self.norms] + [[p, "reader (W·Q)"] for p in self.readers] + \
               [[p, "writer (y·Q)"] for p in self.writers]
        rows += [[a.path, f"refused: {a.reason}"] for a in self.refused]
        return [Table(f"Residual-stream rotation (capture: {self.capture})", ["path", "role"], rows,
                      [self.summary()])]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class _Plan:
    width: int
    norms: list[str]
    readers: list[Reader]
    writers: list[Writer]


def rotate(model: nn.Module, example_inputs: Any = None, *, seed: int = 0, inplace: bool = False,
           rtol: float | None = None, atol: float | None = None,
           extra_inputs: Sequence[Any] = ()) -> tuple[nn.Module, RotateReport]:
    """Rotate ``model``'s residual stream by a seeded orthogonal matrix; see the module docstring.

    Returns ``(model, report)``; ``model`` is untouched unless ``inplace=True``. Nothing is rotated when
    a norm or tensor refuses (``report.refused`` says which and why) or when the rotated model's outputs
    deviate beyond the tolerance (``verify.TOLERANCE``; ``rtol``/``atol`` as in ``fold``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise NormSurgeonError(f"seed must be an integer >= 0, got {seed!r}")
    if example_inputs is None:
        raise NormSurgeonError("rotate needs example inputs (the graph is captured by running the model)")
    ci = as_call_args(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    refs = References.record(work, ci, extra=[as_call_args(e) for e in extra_inputs])
    graph = capture(work, ci, checked=True)
    report = RotateReport(graph.describe(), seed)
    tol = refs.tolerance(tolerance_for(work, rtol, atol))  # a low-precision model: its float32 reference's bar
    report.tolerance, report.verified_inputs, report.reference = tol.rtol, len(refs), refs.to_json()
    plan = _plan(work, graph, report)
    if plan is None:
        report.passed = False
        return work, report
    q = rotation(plan.width, seed)
    report.matrix = q.kind
    report.width = plan.width
    report.norms = plan.norms
    report.readers = sorted({r.path for r in plan.readers})
    report.writers = [w.path for w in plan.writers]
    with UndoStore(spill=inplace) as store:
        undo = store.log()
        try:
            action = _rewrite(work, plan, q, undo)
        except Exception as e:  # noqa: BLE001 - a failed rewrite leaves the model as it was
            undo.restore()
            report.refused.append(Action("skipped", "(rotation)", {}, f"rewrite failed: {one_line(e, typed=True)}"))
            report.passed = False
            return work, report
        applied = [Applied("stream", plan, action, undo, redo=lambda u: _rewrite(work, plan, q, u),
                           rolled_back=lambda why: Action("rolled_back", "stream", {}, why),
                           describe="rotating the residual stream")]
        verdict = apply_verified(work, applied, refs, tol, store, done="rotated")
    report.verify, report.passed, report.verify_error = verdict.stats, verdict.passed, verdict.error
    final = verdict.actions["stream"]
    if final.kind == "rolled_back":
        report.refused.append(Action("rolled_back", "(rotation)", {}, final.reason))
        report.passed = False
        return work, report
    record(work, {"op": "rotate", "seed": seed, "width": plan.width, "matrix": report.matrix,
                  "norms": plan.norms}, ci)
    return work, report


def replay(model: nn.Module, action: dict, ci: Any) -> None:
    """A rotation changes values only, never structure: the weights loaded afterwards carry it."""


def _affine_reason(site: NormSite, model: nn.Module) -> str | None:
    aff = affine_of(site)
    if aff is None:
        return "its affine parameters cannot be read from the graph"
    if site.kind == "layernorm" or aff.subtracts_mean:
        return "still subtracts the mean (a LayerNorm): convert(to='rms') / convert --to rms first"
    if aff.weight is not None:
        w = aff.weight.get(model)
        if not bool(torch.all(w == (0.0 if aff.one_plus else 1.0))):
            return "still carries an affine scale γ: fold(affine=True) / fold --affine first"
    if aff.bias is not None and bool(torch.any(aff.bias.get(model) != 0)):
        return "still carries a shift β: fold(affine=True) / fold --affine first"
    return None


def _plan(model: nn.Module, graph: ModelGraph, report: RotateReport) -> _Plan | None:
    inputs = hand_written_inputs(graph)
    stream = Stream()
    norms, readers, widths, entries = [], [], set(), set()
    for site in find_norms(graph):
        if site.kind not in ("layernorm", "rmsnorm"):
            continue
        x = site.node.arg(0) if site.node is not None and site.node.op in ("layer_norm", "rms_norm",
                                                                         "native_layer_norm") \
            else inputs.get(id(site.node))
        if site.channels and per_head(x, site.channels):
            continue  # per-head q/k norms live inside attention, not on the stream
        if site.node is None:
            report.refused.append(Action("skipped", site.path, {}, site.note or "not captured"))
            continue
        why = _affine_reason(site, model)
        if why is not None and site.node is not None and site.channels:
            _, post = readers_of(output_of(site), site.channels)
            if post is not None and post.startswith("post-norm"):
                why = f"{post}; its affine cannot fold, so the stream cannot rotate through it"
        if why is not None:
            report.refused.append(Action("skipped", site.path, {}, why))
            continue
        if site.calls > 1:
            report.refused.append(Action("skipped", site.path, {}, f"called {site.calls} times"))
            continue
        x = site.node.arg(0) if site.node.op in ("layer_norm", "rms_norm", "native_layer_norm") \
            else inputs.get(id(site.node))
        width = site.channels
        if not isinstance(x, GNode) or not width:
            report.refused.append(Action("skipped", site.path, {}, "its input cannot be found on the graph"))
            continue
        found, why = readers_of(output_of(site), width)
        if why is None:
            why = writers_of(x, width, stream)
            why = why and f"its input: {why}"
        if why is not None:
            report.refused.append(Action("skipped", site.path, {}, why))
            continue
        for r in found:
            r.weight = own_tensor(graph, r.node, r.weight)
        readers += found
        norms.append(site.path)
        widths.add(width)
        entries |= {id(u) for u in data_users(x)}
    if report.refused:
        return None
    if not norms:
        report.refused.append(Action("skipped", "(model)", {}, "no LayerNorm/RMSNorm reads a residual stream"))
        return None
    if len(widths) != 1:
        report.refused.append(Action("skipped", "(model)", {}, f"the norms have different widths {sorted(widths)}"))
        return None
    why = _conflicts(model, graph, readers, stream, entries)
    if why is not None:
        report.refused.append(Action("skipped", why[0], {}, why[1]))
        return None
    return _Plan(widths.pop(), norms, readers, stream.writers)


def _conflicts(model, graph, readers, stream, entries) -> tuple[str, str] | None:
    """Every tensor gets one rotation, every writer's output reaches only the stream and its norms."""
    # what each tensor must become; a tensor with two roles (a tied embedding and lm_head: E·Q both
    # ways) is fine only when both need the same transform
    role: dict[int, tuple[str, str, int]] = {}  # id -> (transform, path, roles)
    aliases = tensor_aliases(model)
    claims = [(r.weight.get(model), "right" if r.layout == "out_in" else "left", r.path) for r in readers]
    claims += [(w.weight.get(model), _writer_transform(w), w.path) for w in stream.writers]
    for t, how, path in claims:
        prev = role.get(id(t))
        if prev is not None and prev[0] != how:
            names = ", ".join(aliases.get(id(t), [path]))
            return path, f"its weight plays two roles that need different rotations ({names})"
        role[id(t)] = (how, path, (prev[2] if prev else 0) + 1)
    for t, _, path in claims:
        if len(uses(graph, t)) > role[id(t)][2]:
            return path, "its weight is also used by an op that is not rotated (a module called twice?)"
    for w in stream.writers:
        if w.bias is not None and len(uses(graph, w.bias.get(model))) > 1:
            return w.path, "its bias is used by more than one op"
        stack, seen = [w.node], set()
        while stack:
            n = stack.pop()
            for u in data_users(n):
                if id(u) in seen or id(u) in entries:
                    continue
                seen.add(id(u))
                if id(u) in stream.nodes:
                    stack.append(u)
                    continue
                return w.path, f"its output also reaches {u.module_path or '(root)'} ({u.op}), which is not rotated"
    return None


def _writer_transform(w: Writer) -> str:
    if w.kind == "embedding" or (w.kind == "linear" and w.layout == "in_out"):
        return "right"
    if w.kind == "linear":
        return "left"
    return w.kind


def _rewrite(model: nn.Module, plan: _Plan, q: Rotation, undo: UndoLog) -> Action:
    done: set[int] = set()
    with torch.no_grad():
        for w in plan.writers:
            t = w.weight.get(model)
            b = w.bias.get(model) if w.bias is not None else None
            if id(t) not in done:
                undo.save_param(model.get_submodule(w.weight.owner), w.weight.attr)
                rotate_writer_(t.detach(), q, w.kind, w.layout)
                done.add(id(t))
            if b is not None:
                undo.save_param(model.get_submodule(w.bias.owner), w.bias.attr)
                b.copy_(q.to(b.device).apply(b.detach().double()))
        for r in plan.readers:
            t = r.weight.get(model)
            if id(t) in done:
                continue  # a tied head: the embedding's E·Q is the reader's W·Q
            undo.save_param(model.get_submodule(r.weight.owner), r.weight.attr)
            rotate_reader_(t.detach(), q, r.layout)
            done.add(id(t))
    return Action("rotated", "stream")
