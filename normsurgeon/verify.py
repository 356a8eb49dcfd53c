"""Numerical verification for every function-preserving rewrite: one place, one tolerance table.

- **inputs**: the example inputs, two random inputs like them and one at another batch size (code
  that branches on the batch size must not hide a changed path: one fewer, else one more), plus the
  user's own (``load_inputs_file``: ``--inputs`` of fold, convert and export); a random input the
  original model rejects is no check and is dropped, while the example and the user's inputs must run.
  A model of ``LEAN_BYTES`` (1 GiB) of weights or more is checked on the example and one random input
  at another batch size and sequence length only (``lean_inputs``): its forward passes cost seconds.
- **reference outputs**: the original model's outputs on those inputs, kept instead of a copy of
  the model (outputs are small; a model may be most of the machine's memory).
- **comparison**: ``ErrorStats`` (max abs error, max rel error = max abs / max |expected|) against
  ``TOLERANCE``; a model that raises is a failed check, never a skipped one.
- **undo**: ``UndoLog`` records what an in-place rewrite replaced (parameter values, child modules)
  so a rolled-back site is restored bit for bit; large tensors are spilled to a temporary file, so
  rewriting a model in place needs no second copy of it in memory.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import NormSurgeonError, one_line
from .file_tensors import PinnedFiles, source_of
from .files import read_tensors
from .float32_run import LOW_PRECISION as _LOW_PRECISION
from .float32_run import NotFloat32, dtype_name, low_precision_dtypes, run_float32
from .graph.capture import rejected
from .inputs import CallArgs, as_call_args, random_like, rename_inputs
from .outputs import ErrorStats, compare_outputs, flatten_outputs
from .report import fmt_float

# The one tolerance table: (rtol, atol) a function-preserving rewrite must meet, by the dtype the
# model computes in. The rewrite is exact in float64; rounding the new weights (or the new module's
# arithmetic) once more to a low-precision dtype is what needs the room.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (5e-3, 1e-3),
    torch.bfloat16: (1.5e-2, 1e-3),
}

# A float16/bfloat16 model is verified against a float32 run of the original (``References``): a
# rewrite passes when its own error against that reference is at most the table's rtol or FACTOR x the
# original's own error against it (both the worst over the verification inputs). An exact rewrite is
# another rounding of the same function, as far from the exact outputs as the original is give or take
# the spread of one rounding against another: measured (docs/llm.md, "Low precision"), the affine
# fold's error over the original's was 0.91-1.55 on the tiny bf16/fp16 Llama, GPT-2 and ViT of zoo_llm,
# 0.59-1.47 on nine deeper bf16 Llamas with γ spread e^N(0,1) (where the old check rolled folds back)
# and 1.06-1.11 on the 1.1B TinyLlama-shaped bf16 model. 2 leaves room over 1.55; a wrong rewrite (a γ
# folded twice, a fold into the wrong reader) moves the outputs by far more (tests/test_verify_lowprec.py).
LOW_PRECISION_FACTOR = 2.0
# ... but never more than this: a model whose low-precision outputs are that far from its own function
# (2.9e-2 for the 1.1B random-weight Llama) would otherwise let a rewrite that breaks it pass; its exact
# rewrites are then judged at this bar and may be rolled back, which is the safe side.
LOW_PRECISION_CAP = 0.1


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float | None = None  # None: the relative error alone decides

    def ok(self, stats: ErrorStats, error: str | None = None) -> bool:
        if error is not None:
            return False
        return stats.max_rel_error <= self.rtol or (self.atol is not None and stats.max_abs_error <= self.atol)


def tolerance_for(model: nn.Module, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The tolerance for ``model``: the table's entry for the least precise dtype among its floating
    parameters, or the caller's ``rtol``/``atol`` raised to at least the table's for float16/bfloat16
    (a caller asking 1e-5 of a float16 model would roll back every exact rewrite)."""
    return tolerance_for_dtypes({p.dtype for p in model.parameters() if p.is_floating_point()}, rtol, atol)


def tolerance_for_dtypes(dtypes: set[torch.dtype], rtol: float | None = None, atol: float | None = None
                         ) -> Tolerance:
    """``tolerance_for`` a model (or a program's state) whose floating tensors have these dtypes."""
    dtypes = dtypes or {torch.float32}
    worst = max((TOLERANCE.get(d, TOLERANCE[torch.float32]) for d in dtypes), key=lambda t: t[0])
    if rtol is None:
        return Tolerance(worst[0], worst[1] if atol is None else atol)
    low = [TOLERANCE[d] for d in dtypes if d in _LOW_PRECISION]
    return Tolerance(max([rtol] + [t[0] for t in low]), atol)


# --- inputs and reference outputs ----------------------------------------------------------------

# From this many bytes of weights a model is checked on two inputs (``lean_inputs``): each forward
# pass of a 1.1B model costs seconds on a CPU, and a fold must stay within a few passes' time.
LEAN_BYTES = 1 << 30


def lean_inputs(ci: CallArgs) -> list[list[CallArgs]]:
    """The example and one random input at another batch size and other spatial/sequence sizes,
    the smaller first (the cheaper pass), else larger: what a large model's check runs on."""
    device = next((t.device for t in ci.tensors()), None)
    batch = next((t.shape[0] for t in ci.tensors() if t.dim() > 0), None)
    batches = ([batch - 1] if batch and batch > 1 else []) + ([batch + 1] if batch else [None])
    sizes = [s for s in (other_sizes(ci, 0.75), other_sizes(ci, 1.25)) if s] or [None]
    alternatives = []
    for kw in [{"batch": b, "sizes": s} for s in sizes for b in batches] + [{"batch": b} for b in batches]:
        try:
            alternatives.append(_resized(ci, torch.Generator().manual_seed(1), **kw).to(device=device))
        except Exception:  # noqa: BLE001 - a random input is a bonus
            pass
    return [[ci]] + ([alternatives] if alternatives else [])


def candidate_inputs(ci: CallArgs, extra: Sequence[CallArgs] = ()) -> list[list[CallArgs]]:
    """The example, a random input like it, one at another batch size and one at other sizes, then
    ``extra``; each entry lists alternatives, the first the original model accepts is used.

    The other batch size is one fewer (batch 1 is where batch-dependent code most often branches, and
    a smaller batch halves what the two forward passes of a large model's check cost), or one more
    where the example has batch 1 or the model rejects the smaller one. The "other sizes" input
    covers code the example never runs (a branch taken only for a large batch, or only above some
    image size or sequence length, around a folded layer): a larger batch (``larger_batch``) with
    the spatial/sequence dims grown by a quarter (``other_sizes``), else shrunk, else the larger batch
    alone, else those sizes alone; only where the model rejects all of them is it a second random
    input of the example's shape (``References.shapes`` says which shapes were checked).
    """
    device = next((t.device for t in ci.tensors()), None)
    batch = next((t.shape[0] for t in ci.tensors() if t.dim() > 0), None)
    out = [[ci]]
    wanted: list[list[dict]] = [[{}]]
    if batch:
        wanted.append([{"batch": b} for b in ([batch - 1] if batch > 1 else []) + [batch + 1]])
    big = larger_batch(batch) if batch else None
    grown, shrunk = other_sizes(ci, 1.25), other_sizes(ci, 0.75)
    sized = [{"batch": big, "sizes": s} for s in (grown, shrunk) if big and s] + \
        ([{"batch": big}] if big else []) + [{"sizes": s} for s in (grown, shrunk) if s]
    wanted.append(sized + [{}])
    for seed, kws in enumerate(wanted, start=1):
        alternatives = []
        for kw in kws:
            try:
                alternatives.append(_resized(ci, torch.Generator().manual_seed(seed), **kw).to(device=device))
            except Exception:  # noqa: BLE001 - a random input is a bonus
                pass
        if alternatives:
            out.append(alternatives)
    return out + [[e] for e in extra]


def larger_batch(batch: int) -> int:
    """A batch above the example's, up to 4 times it (a forward pass at most 4x the example's):
    8 for the usual examples of batch 2 to 7, batch + 1 from 8 on."""
    return max(batch + 1, min(8, 4 * batch))


def other_sizes(ci: CallArgs, factor: float) -> dict[int, int]:
    """``{size: new size}`` for the spatial/sequence dims of ``ci``: dims 2.. of floating inputs with 3
    or more dims (images, audio frames, volumes) and dim 1 of 2-d integer inputs (token ids and their
    masks); every dim of one size gets the same new size, so ids and masks stay aligned."""
    sizes = set()
    for t in ci.tensors():
        if t.is_floating_point() and t.dim() >= 3:
            sizes.update(t.shape[2:])
        elif not t.is_floating_point() and t.dim() == 2:
            sizes.add(t.shape[1])
    new = {s: max(1, round(s * factor)) for s in sizes if s > 1}
    return {s: n for s, n in new.items() if n != s}


def _resized(ci: CallArgs, generator: torch.Generator, batch: int | None = None,
             sizes: Mapping[int, int] | None = None) -> CallArgs:
    """Fresh random inputs like ``ci``, at ``batch`` and with the dims ``other_sizes`` names resized."""
    if not sizes:
        return ci.like(generator, batch=batch)
    values = []
    for name, t in zip(ci.names(), [*ci.args, *ci.kwargs.values()]):
        if not isinstance(t, torch.Tensor):
            values.append(t)
            continue
        shape = list(t.shape)
        if batch is not None and shape:
            shape[0] = batch
        if t.is_floating_point() and t.dim() >= 3:
            shape[2:] = [sizes.get(s, s) for s in shape[2:]]
        elif not t.is_floating_point() and t.dim() == 2:
            shape[1] = sizes.get(shape[1], shape[1])
        values.append(random_like(t, shape, generator))
    n = len(ci.args)
    return CallArgs(tuple(values[:n]), dict(zip(ci.names()[n:], values[n:])))


def check_input_values(ci: CallArgs, what: str) -> None:
    """Refuse verification inputs that cannot check anything: an empty tensor (batch 0) compares
    nothing, and NaN/inf in an input gives NaN/inf outputs before and after any rewrite, which would
    read as a rewrite that changed the outputs."""
    for name, t in named_tensors(ci).items():
        if t.numel() == 0:
            raise NormSurgeonError(f"{what}: input {name!r} is empty (shape {list(t.shape)}); a verification on "
                                   "it would check nothing")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NormSurgeonError(f"{what}: input {name!r} holds {bad} NaN/inf value(s); outputs computed from "
                                   "them cannot verify anything")


def _runs(model: nn.Module, ci: CallArgs, eval_mode: bool) -> bool:
    try:
        run_clean(model, ci, eval_mode=eval_mode)
    except Exception:  # noqa: BLE001 - the model rejects this input in its own dtype too
        return False
    return True


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _finite_outputs(outputs: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(o).all()) for o in outputs if o.is_floating_point())


def run_clean(model: nn.Module, ci: CallArgs, *, eval_mode: bool = False) -> list[torch.Tensor]:
    """One forward pass without side effects: no grad, a fixed RNG, BatchNorm running statistics
    restored, module modes restored (``eval_mode`` runs the model in eval)."""
    modes = [(m, m.training) for m in model.modules()] if eval_mode else []
    if eval_mode:
        model.eval()
    bn = nn.modules.batchnorm._BatchNorm
    saved = [(b, b.detach().clone()) for m in model.modules() if isinstance(m, bn) and m.training
             for b in m.buffers()]
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *ci.tensors()) if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            return [t.detach().clone() for t in flatten_outputs(ci.call(model))]
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        for m, mode in modes:
            m.training = mode


@dataclass
class References:
    """Verification inputs and the original model's outputs on them (not a copy of the model).

    For a float16/bfloat16 model the outputs are the original's computed in float32 (``run_float32``)
    and ``original_error`` is how far the original's own low-precision outputs are from them: a
    rewrite is then judged by its own error against that reference (``tolerance``), not by its
    distance from the original's rounding. ``reference`` names the dtype the outputs were computed
    in; ``reference_note`` why a low-precision model's are not float32 (its own, as before).
    """

    inputs: list[CallArgs] = field(default_factory=list)
    outputs: list[list[torch.Tensor]] = field(default_factory=list)
    eval_mode: bool = False
    user_inputs: int = 0  # how many of ``inputs`` are the user's own (they come last)
    nonfinite: int = 0  # how many kept inputs the original model maps to NaN/inf outputs
    low_precision: str | None = None  # the model's float16/bfloat16 dtype(s), if any
    reference: str | None = None  # for such a model, the dtype its reference outputs were computed in
    original_error: ErrorStats | None = None  # the low-precision original vs the float32 reference
    reference_note: str | None = None  # why a low-precision model's references are its own dtype

    @property
    def shapes(self) -> list[list[list[int]]]:
        """The shapes of every input set checked (per set, its tensors' shapes): what a verdict covers."""
        return [[list(t.shape) for t in ci.tensors()] for ci in self.inputs]

    @property
    def why_unverifiable(self) -> str | None:
        """Why a comparison fails even with nothing changed, when the model itself is the cause."""
        if not self.nonfinite:
            return None
        return (f"the original model's outputs are NaN/inf on {self.nonfinite} of {len(self.inputs)} verification "
                "inputs before any change (a BatchNorm with negative/NaN running_var?), so nothing can be verified")

    def tolerance(self, tol: Tolerance) -> Tolerance:
        """The tolerance a rewrite must meet against these references: ``tol``, or against a float32
        reference of a low-precision model, ``LOW_PRECISION_FACTOR`` times the original's own error
        where that is larger, up to ``LOW_PRECISION_CAP`` (a rewrite is another rounding of the same function; it may be as far from
        the exact outputs as the original is, with the spread of one rounding against another)."""
        if self.original_error is None:
            return tol
        bar = min(LOW_PRECISION_FACTOR * self.original_error.max_rel_error, LOW_PRECISION_CAP)
        return Tolerance(max(tol.rtol, bar), tol.atol)

    def to_json(self) -> dict:
        """What a report's ``verify`` object says about the reference (merged into it)."""
        if self.low_precision is None:
            return {}
        out: dict[str, Any] = {"reference": self.reference, "low_precision": self.low_precision}
        if self.original_error is not None:
            out["original_error"] = _finite(self.original_error.max_rel_error)
        if self.reference_note:
            out["reference_note"] = self.reference_note
        return out

    @classmethod
    def record(cls, model: nn.Module, ci: CallArgs, *, extra: Sequence[CallArgs] = (),
               eval_mode: bool = False) -> "References":
        """Run ``model`` on the candidate inputs; the example and ``extra`` (the user's) must run, the
        random ones are kept if they do. A float16/bfloat16 model runs in float32 (see the class
        docstring); where that fails, in its own dtype, and ``reference_note`` says why."""
        check_input_values(ci, "the example inputs")
        for k, e in enumerate(extra):
            check_input_values(e, f"`inputs_file` set {k + 1}")
        low = low_precision_dtypes(model)
        if not low:
            return cls._record(model, ci, extra, eval_mode, run_clean)
        name = ", ".join(dtype_name(d) for d in low)
        try:
            refs = cls._record(model, ci, extra, eval_mode, run_float32)
            refs.low_precision, refs.reference = name, "float32"
            refs._measure_original(model)
        except NotFloat32 as e:
            refs = cls._record(model, ci, extra, eval_mode, run_clean)
            refs.low_precision, refs.reference = name, name
            refs.reference_note = f"no float32 reference: {one_line(e, limit=200)}"
        return refs

    @classmethod
    def _record(cls, model: nn.Module, ci: CallArgs, extra: Sequence[CallArgs], eval_mode: bool,
                run: Callable[..., list[torch.Tensor]]) -> "References":
        refs = cls(eval_mode=eval_mode)
        size = sum(t.numel() * t.element_size() for t in model.parameters())
        candidates = lean_inputs(ci) if size >= LEAN_BYTES else candidate_inputs(ci)
        for i, alternatives in enumerate([*candidates, *[[e] for e in extra]]):
            for c in alternatives:
                try:
                    out = run(model, c, eval_mode=eval_mode)
                except NotFloat32:
                    raise
                except Exception as e:  # noqa: BLE001
                    if run is run_float32 and _runs(model, c, eval_mode):
                        # the model takes it in its own dtype: float32 is what failed (a dtype clash)
                        raise NotFloat32(one_line(e, typed=True, limit=200)) from e
                    if i == 0:
                        raise rejected(c, e) from e
                    if i >= len(candidates):
                        raise NormSurgeonError(f"`inputs_file` set {i - len(candidates) + 1}: the model rejects it "
                                               f"before any change ({one_line(e, typed=True, limit=200)})") from e
                    continue
                if not _finite_outputs(out):
                    if 0 < i < len(candidates):
                        continue  # a random input the model maps to NaN/inf checks nothing: dropped
                    refs.nonfinite += 1
                refs.inputs.append(c)
                refs.outputs.append(out)
                break
        refs.user_inputs = len(extra)
        return refs

    def _measure_original(self, model: nn.Module) -> None:
        """``original_error``: the original's own outputs against the float32 ones, worst over every input.

        On every input, not the example alone: the worst error over the inputs is a steadier figure
        than one input's (the largest input holds the most outputs). Measured on tiny bf16 Llamas, the
        folded model's worst error over the original's was 0.6-1.5 this way, but up to 2.2 against the
        example's error alone, which would roll back exact folds; it costs one low-precision forward
        pass per input, about a quarter of a float32 one on the 1.1B Llama."""
        stats = ErrorStats()
        for ci, ref in zip(self.inputs, self.outputs):
            if _finite_outputs(ref):  # else nothing to measure against (``nonfinite``: no verdict can pass)
                stats = stats.merge(compare_outputs(ref, run_clean(model, ci, eval_mode=self.eval_mode)))
        if not math.isfinite(stats.max_rel_error):
            raise NotFloat32(f"the {self.low_precision} original's outputs are NaN/inf where "
                              "float32's are not")
        self.original_error = stats

    def __len__(self) -> int:
        return len(self.inputs)

    def compare(self, model: nn.Module, *, stop_past: "Tolerance | None" = None) -> tuple[ErrorStats, str | None]:
        """``model``'s deviation from the references; (worst stats, why it could not be compared).

        ``stop_past``: stop at the first input that already fails this tolerance (the verdict cannot
        change; the stats are then those of the inputs run so far). A rollback search checks many
        groups that fail; a large model's forward passes are most of its cost.
        """
        stats = ErrorStats()
        for ci, ref in zip(self.inputs, self.outputs):
            try:
                stats = stats.merge(compare_outputs(ref, run_clean(model, ci, eval_mode=self.eval_mode)))
            except Exception as e:  # noqa: BLE001 - a rewrite that breaks the model is a failed check
                return ErrorStats(math.inf, math.inf, -1.0), f"the model fails: {one_line(e, typed=True, limit=200)}"
            if stop_past is not None and not stop_past.ok(stats):
                break
        return stats, None


def error_text(err: float | None, tolerance: float | None, inputs: str, reference: Mapping[str, Any]) -> str:
    """How a report states its whole-model check: "max rel error E (tolerance T, 4 inputs)"; for a
    low-precision model "max rel error E vs a float32 reference (the bfloat16 original: O; tolerance T,
    4 inputs)", or, where no float32 reference could be run, "max rel error E vs the bfloat16 original
    (tolerance T, 4 inputs; no float32 reference: why)". ``reference``: ``References.to_json()``."""
    tol = "-" if tolerance is None else f"{tolerance:g}"
    text = f"max rel error {fmt_float(err)}"
    ref = reference.get("reference")
    if ref == "float32":
        tol = fmt_float(tolerance)  # a measured bar, not the table's round figure
        return text + (f" vs a float32 reference (the {reference.get('low_precision', 'low-precision')} original: "
                       f"{fmt_float(reference.get('original_error'))}; tolerance {tol}, {inputs})")
    if ref is not None:
        note = reference.get("reference_note")
        return text + f" vs the {ref} original (tolerance {tol}, {inputs}" + (f"; {note})" if note else ")")
    return text + f" (tolerance {tol}, {inputs})"


def load_inputs_file(path: str | os.PathLike, example_inputs: Any) -> list[CallArgs]:
    """Read input sets from ``.pt``/``.npy``/``.npz``/``.safetensors``, keyed by input name or positional.

    Names are those of ``CallArgs.names()`` (``input_0``... for positional arguments, keyword names
    otherwise). A ``.pt`` file may also hold a list of such dicts (several input sets). Floats are cast to
    the example's dtype; ranks and dtype kinds must match the example inputs.
    """
    path = Path(path)
    ci = as_call_args(example_inputs)
    obj = read_tensors(path, "`inputs_file`")
    if isinstance(obj, list) and obj and all(isinstance(o, Mapping) for o in obj):
        sets = [(_fit_inputs(o, ci, f"`inputs_file` {path} (set {i + 1})"), f"`inputs_file` {path} (set {i + 1})")
                for i, o in enumerate(obj)]
    else:
        sets = [(_fit_inputs(obj, ci, f"`inputs_file` {path}"), f"`inputs_file` {path}")]
    for s, what in sets:
        check_input_values(s, what)  # before any work: NaN/inf or empty inputs verify nothing
    return [s for s, _ in sets]


def named_tensors(ci: CallArgs) -> dict[str, torch.Tensor]:
    values = [*ci.args, *ci.kwargs.values()]
    return {n: v for n, v in zip(ci.names(), values) if isinstance(v, torch.Tensor)}


def _fit_inputs(obj: Any, ci: CallArgs, what: str) -> CallArgs:
    import numpy as np

    named = named_tensors(ci)
    names = list(named)
    shown = {n: f for f, n in zip(ci.file_names(), ci.names())}  # how the user's file names them
    if isinstance(obj, torch.Tensor):
        obj = [obj]
    if isinstance(obj, (list, tuple)):
        if len(obj) != len(names):
            raise NormSurgeonError(f"{what}: holds {len(obj)} tensors but the model takes {len(names)} "
                                   f"({', '.join(shown[n] for n in names)}); store them by name")
        obj = dict(zip(names, obj))
    if not isinstance(obj, Mapping):
        raise NormSurgeonError(f"{what}: expected tensors by input name, got {type(obj).__name__}")
    obj = rename_inputs(obj, ci)
    unknown = [k for k in obj if k not in named]
    missing = [n for n in names if n not in obj]
    if unknown or missing:
        raise NormSurgeonError(f"{what}: input names {sorted(shown.get(k, k) for k in obj)} do not match the "
                               f"model's {[shown[n] for n in names]}"
                               + (f" (unknown: {unknown})" if unknown else "")
                               + (f" (missing: {[shown[n] for n in missing]})" if missing else ""))
    fitted = {}
    for n, ex in named.items():
        t = obj[n]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        if t.is_floating_point() != ex.is_floating_point():
            raise NormSurgeonError(f"{what}: input {shown[n]!r} is {t.dtype} but the model takes {ex.dtype}")
        if t.dim() != ex.dim():
            raise NormSurgeonError(f"{what}: input {shown[n]!r} has shape {list(t.shape)}; the model takes "
                                   f"{ex.dim()}-d inputs like {list(ex.shape)}")
        fitted[n] = t.to(device=ex.device, dtype=ex.dtype)
    values = [*ci.args, *ci.kwargs.values()]
    out = [fitted.get(n, v) for n, v in zip(ci.names(), values)]
    k = len(ci.args)
    return CallArgs(tuple(out[:k]), dict(zip(list(ci.kwargs), out[k:])))


def run_hooked(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], ci: CallArgs) -> None:
    """One clean eval forward pass (``run_clean``) with forward hooks on some modules, removed after."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    try:
        run_clean(model, ci, eval_mode=True)
    finally:
        for h in handles:
            h.remove()


def record_io(model: nn.Module, paths: list[str], ci: CallArgs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and eval output of the first call of each module at ``paths`` on ``ci`` (per-site checks)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(p: str) -> Callable:
        def hook(_m, args, out):
            if p not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[p] = (args[0].detach().clone(), out.detach().clone())
        return hook

    run_hooked(model, [(model.get_submodule(p), hook_for(p)) for p in paths], ci)
    return seen


def site_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest absolute deviation relative to the expected tensor's largest magnitude (one module)."""
    e, a = expected.double(), actual.double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    diff = float((e - a).abs().max()) if e.numel() else 0.0
    if diff != diff:  # NaN
        return math.inf
    return diff / scale if scale > 0 else diff


# --- undo ------------------------------------------------------------------------------------------

class _Spill:
    """Bytes of replaced tensors in an anonymous temporary file (gone when closed or collected)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        self.pinned = PinnedFiles()  # input files a rollback reads weights back from

    def put(self, t: torch.Tensor) -> tuple[int, torch.Size, torch.dtype, torch.device]:
        self._file.seek(0, 2)
        offset = self._file.tell()
        cpu = t.detach().to("cpu").contiguous()
        self._file.write(memoryview(cpu.view(torch.uint8).reshape(-1).numpy()))
        return offset, t.shape, t.dtype, t.device

    def get(self, where: tuple[int, torch.Size, torch.dtype, torch.device]) -> torch.Tensor:
        offset, shape, dtype, device = where
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._file.seek(offset)
        data = bytearray(self._file.read(n))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape).to(device)

    def close(self) -> None:
        self._file.close()
        self.pinned.close()


class UndoLog:
    """What one rewrite replaced, restored last-in first-out by ``restore()``.

    Tensors of ``spill_bytes`` or more go to a temporary file instead of memory: an in-place fold
    of a large model then holds one copy of its weights, not two. A tensor whose exact bytes are in
    the file the model was loaded from (``file_tensors.register``) is not copied at all: its undo
    reads it back from there.
    """

    spill_bytes = 1 << 20

    def __init__(self, spill: "_Spill | None" = None) -> None:
        self._steps: list[Callable[[], None]] = []
        self._spill = spill

    def save_param(self, module: nn.Module, name: str) -> None:
        p = getattr(module, name)
        if p is None:
            self._steps.append(lambda: setattr(module, name, None))
            return
        if self._spill is not None and p.numel() * p.element_size() >= self.spill_bytes:
            src = source_of(p)
            back = self._spill.pinned.pin(src, p) if src is not None else None
            if back is not None:  # the input file holds these very bytes: no copy needed
                self._steps.append(back)
                return
            where = self._spill.put(p)
            self._steps.append(lambda: _copy_into(p, self._spill.get(where)))
        else:
            saved = p.detach().clone()
            self._steps.append(lambda: _copy_into(p, saved))

    def save_child(self, parent: nn.Module, name: str) -> None:
        old = getattr(parent, name)
        self._steps.append(lambda: setattr(parent, name, old))

    def on_restore(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def restore(self) -> None:
        for step in reversed(self._steps):
            step()
        self._steps.clear()


class UndoStore:
    """Where the undo logs of one pass keep spilled tensors; ``log()`` makes one log per site."""

    def __init__(self, spill: bool = False) -> None:
        self._spill = _Spill() if spill else None

    def log(self) -> UndoLog:
        return UndoLog(self._spill)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()

    def __enter__(self) -> "UndoStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _copy_into(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value)


def set_module(model: nn.Module, path: str, new: nn.Module, undo: UndoLog | None = None) -> nn.Module:
    """Replace the submodule at ``path``; ``undo`` learns how to put the old one back. Returns the old one."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if undo is not None:
        undo.save_child(parent, name)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old

