"""``rotate(DIR, seed=N, stream=True, output=OUT/)``: the residual-stream rotation of a transformers
directory without loading the model, tensor by tensor, planned on a tiny twin as ``shard_stream`` plans
the affine fold.

1. **plan on the twin**: ``passes.rotate``'s plan of the twin (its norms, readers with their layouts,
   writers with their kinds; the same refusals: LayerNorms, post-norms, non-linear writers...), proven
   by the twin's verified rotation with the same seed.
2. **the real norms must be affine-free**: the twin's fresh norms are; the checkpoint's γ must be all 1
   (0 for ``1 + w`` norms) and β all 0, else the norm is named with what to run first (``fold --affine
   --stream``). Names and ranks as in ``shard_stream.check_names``; every rotated axis must be the real
   width.
3. **stream**: Q is ``norm_math.orthogonal(width, seed)`` (the in-memory rotation's Q); each planned tensor
   is rotated in float64 chunks (``x·Q`` over row chunks: readers ``W·Q``, embeddings, Conv1D writers,
   biases and position parameters; ``Qᵀ·x`` over column chunks: linear writers, Conv1D readers) and cast
   back; every other tensor is copied through.
4. **check per tensor**: on sampled rows (columns) of every rotated chunk, undoing the rotation of the
   stored result must give back the original within ``verify.TOLERANCE`` of its dtype. A rotation is one
   change of basis for the whole stream: one failed tensor refuses it all, and nothing is written. The
   whole real model is never run: the report says so.
"""

from __future__ import annotations

import gc
import math
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NormSurgeonError
from .report import Action, Table, fmt_float
from .shard_files import Checkpoint, ShardWriter, check_written, copy_small_files

SAMPLES = 8  # rows (columns) of each chunk whose rotation is undone and compared
CHUNK_BYTES = 16 << 20


@dataclass
class StreamRotateReport:
    """``passes.rotate.RotateReport``'s keys for a streamed rotation, plus the twin's proof and the
    per-tensor check."""

    seed: int
    capture: str = "tiny twin"
    width: int | None = None
    matrix: str | None = None
    norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    refused: list[Action] = field(default_factory=list)
    twin: dict = field(default_factory=dict)
    max_rel_error: float | None = None  # the per-tensor check's worst
    tolerance: float | None = None
    passed: bool | None = None
    output: str | None = None
    shards: int = 0
    rotated_tensors: int = 0

    @property
    def rotated(self) -> bool:
        return bool(self.passed) and not self.refused

    def summary(self) -> str:
        if self.refused:
            return f"not rotated: {self.refused[0].path}: {self.refused[0].reason}"
        return (f"streamed: rotated the residual stream (width {self.width}, {self.matrix}, seed {self.seed}) through "
                f"{len(self.norms)} norms, {len(self.readers)} readers, {len(self.writers)} writers "
                f"({self.rotated_tensors} tensors); plan proven on a tiny twin of {self.twin.get('class')} (max rel "
                f"error {fmt_float(self.twin.get('max_rel_error'))}); every rotated tensor checked by undoing its "
                f"rotation (max rel error {fmt_float(self.max_rel_error)}, tolerance {self.tolerance:g}); the whole "
                "real model was not run")

    def to_json(self) -> dict:
        return {"capture": self.capture, "seed": self.seed, "width": self.width, "matrix": self.matrix,
                "rotated": self.rotated, "norms": self.norms, "readers": self.readers, "writers": self.writers,
                "refused": [{"path": a.path, "reason": a.reason} for a in self.refused],
                "verify": {"max_rel_error": self.max_rel_error, "passed": self.passed, "tolerance": self.tolerance,
                           "local": True, "whole_model_run": False},
                "stream": {"twin": self.twin, "shards": self.shards, "rotated_tensors": self.rotated_tensors,
                           "whole_model_run": False},
                "output": self.output}

    def tables(self) -> list[Table]:
        rows = [[p, "norm"] for p in self.norms] + [[p, "reader (W·Q)"] for p in self.readers] + \
               [[p, "writer (y·Q)"] for p in self.writers] + [[a.path, f"refused: {a.reason}"] for a in self.refused]
        return [Table(f"Residual-stream rotation, streamed (plan: {self.capture})", ["path", "role"], rows,
                      [self.summary()])]


@dataclass
class _Plan:
    transforms: dict[str, str]  # twin tensor name -> "right" (x·Q on the last axis) | "left" (Qᵀ·x on the first)
    aliases: dict[str, list[str]]  # twin tensor name -> all its names
    affines: list[tuple[str, str | None, str | None, bool]]  # (norm, γ, β, one_plus)
    roles: tuple[list[str], list[str], list[str]]  # norms, readers, writers (the report's lists)


def _plan_twin(config: Any, cls: type, seed: int, report: StreamRotateReport):
    from . import twin as _twin
    from .find import find_norms
    from .inputs import inputs_from_hf_config
    from .passes import rotate as rotate_pass
    from .passes.rotate import RotateReport
    from .passes.stream import affine_of, tensor_aliases
    from .shard_stream import capture_twin, twin_names

    model = _twin.build(config, cls)  # fresh norms: γ = 1, β = 0, as a folded checkpoint's
    ci = inputs_from_hf_config(model.config)
    if ci is None:
        raise NormSurgeonError(f"{cls.__name__}: cannot derive inputs for its tiny twin")
    names, ranks = twin_names(model)
    graph = capture_twin(model, ci, cls)
    twin_report = RotateReport(graph.describe(), seed)
    plan = rotate_pass._plan(model, graph, twin_report)  # the rotation's own plan: same matcher, same refusals
    if plan is None:
        report.refused = twin_report.refused
        return None, names, ranks
    if any(w.kind not in ("embedding", "linear", "param") for w in plan.writers):
        w = next(w for w in plan.writers if w.kind not in ("embedding", "linear", "param"))
        report.refused.append(Action("skipped", w.path, {}, f"a {w.kind} writer: the streamed rotation handles "
                                                          "embeddings, linear layers and parameters"))
        return None, names, ranks
    aliases = {n: group for group in tensor_aliases(model).values() for n in group}
    transforms: dict[str, str] = {}

    def claim(name: str, how: str) -> None:
        if transforms.get(name, how) != how:
            raise NormSurgeonError(f"internal: {name} would be rotated two ways")
        transforms[name] = how

    for r in plan.readers:
        claim(r.weight.name, "right" if r.layout == "out_in" else "left")
    for w in plan.writers:
        claim(w.weight.name, "left" if w.kind == "linear" and w.layout == "out_in" else "right")
        if w.bias is not None:
            claim(w.bias.name, "right")
    affines = []
    for site in find_norms(graph):
        if site.path in plan.norms:
            aff = affine_of(site)
            affines.append((site.path, aff.weight.name if aff.weight is not None else None,
                            aff.bias.name if aff.bias is not None else None, aff.one_plus))
    _, proof = rotate_pass.rotate(model, ci, seed=seed)  # the proof: the twin's verified rotation
    err = proof.verify.max_rel_error if proof.verify is not None else None
    report.twin = {"class": cls.__name__, "layers": getattr(model.config, "num_hidden_layers", None),
                   "hidden_size": getattr(model.config, "hidden_size", None), "width": plan.width,
                   "max_rel_error": err if err is None or math.isfinite(err) else None,
                   "tolerance": proof.tolerance, "passed": proof.rotated}
    if not proof.rotated:
        report.refused = proof.refused or [Action("skipped", "(twin)", {}, "the twin's rotation failed verification")]
        return None, names, ranks
    roles = (plan.norms, sorted({r.path for r in plan.readers}), [w.path for w in plan.writers])
    return _Plan(transforms, aliases, affines, roles), names, ranks


def _real_names(plan: _Plan, ckpt: Checkpoint) -> dict[str, str]:
    """checkpoint name -> transform (a tied group is stored, and rotated, once)."""
    out: dict[str, str] = {}
    for name, how in plan.transforms.items():
        stored = [n for n in plan.aliases.get(name, [name]) if n in ckpt.file]
        if not stored:
            raise NormSurgeonError(f"the checkpoint has no tensor for {name}")
        for n in stored:
            if out.get(n, how) != how:
                raise NormSurgeonError(f"{n}: its roles need two different rotations; refused")
            out[n] = how
    return out


def _check_affine_free(plan: _Plan, ckpt: Checkpoint) -> tuple[Action | None, int | None]:
    """The real norms must carry no affine; returns the first refusal, or the width."""
    width = None
    for norm, gamma, beta, one_plus in plan.affines:
        for name, want, what in ((gamma, 0.0 if one_plus else 1.0, "an affine scale γ"), (beta, 0.0, "a shift β")):
            if name is None:
                continue
            t = ckpt.get(name)
            width = width or t.shape[-1]
            if not bool(torch.all(t == want)):
                return Action("skipped", norm, {}, f"still carries {what}: fold(affine=True, stream=True) / "
                                                   "fold --affine --stream first"), None
    return None, width


def rotate_tensor(ckpt: Checkpoint, name: str, how: str, q: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
    """``name`` rotated in float64 chunks and cast back, and the worst relative error of undoing the
    rotation of the stored result on sampled rows (columns) of every chunk.

    The float64 work buffers are allocated once per tensor and reused (``out=``): a fresh pair per chunk
    let glibc's heap grow by hundreds of MiB over one large tensor (measured: +250 MiB for ten 16 MiB
    GEMMs), which is the peak memory this mode exists to bound."""
    shape, dtype = ckpt.shape[name], ckpt.dtype[name]
    n = q.shape[0]
    g = torch.Generator().manual_seed(seed)
    worst, scale, finite = 0.0, 0.0, True
    step = max(1, CHUNK_BYTES // (8 * n))
    if how == "right":
        if shape[-1] != n:
            raise NormSurgeonError(f"the checkpoint's {name} has shape {list(shape)}: its last axis is not the width {n}")
        flat = ckpt.get(name).reshape(-1, n) if len(shape) != 2 else None
        rows = flat.shape[0] if flat is not None else shape[0]
        out = torch.empty(rows, n, dtype=dtype)
        w64 = torch.empty(min(step, rows), n, dtype=torch.float64)
        y64 = torch.empty_like(w64)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            w, y = w64[:b - a], y64[:b - a]
            w.copy_(flat[a:b] if flat is not None else ckpt.rows(name, a, b))
            torch.mm(w, q, out=y)
            out[a:b] = y
            finite = finite and bool(torch.isfinite(out[a:b]).all())  # per chunk: on a whole bf16 tensor it upcasts
            pick = torch.randint(0, b - a, (min(SAMPLES, b - a),), generator=g)
            back = out[a:b][pick].double() @ q.T
            worst = max(worst, (back - w[pick]).abs().max().item())
            scale = max(scale, w.max().item(), -w.min().item())
        out = out.reshape(shape)
    else:
        if len(shape) != 2 or shape[0] != n:
            raise NormSurgeonError(f"the checkpoint's {name} has shape {list(shape)}: its first axis is not the width {n}")
        t = ckpt.get(name)
        out = torch.empty(shape, dtype=dtype)
        w64 = torch.empty(n, min(step, shape[1]), dtype=torch.float64)
        y64 = torch.empty_like(w64)
        for a in range(0, shape[1], step):
            b = min(shape[1], a + step)
            w, y = w64[:, :b - a], y64[:, :b - a]
            w.copy_(t[:, a:b])
            torch.mm(q.T, w, out=y)
            out[:, a:b] = y
            finite = finite and bool(torch.isfinite(out[:, a:b]).all())
            pick = torch.randint(0, b - a, (min(SAMPLES, b - a),), generator=g)
            back = q @ out[:, a:b][:, pick].double()
            worst = max(worst, (back - w[:, pick]).abs().max().item())
            scale = max(scale, w.max().item(), -w.min().item())
        del t
    if not finite:
        return out, math.inf
    return out, worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)


def rotate_dir(model: Any, *, output: Any, seed: int = 0, force: bool = False,
               max_shard_mb: float = 256) -> tuple[Any, StreamRotateReport]:
    """Rotate the residual stream of the transformers directory ``model`` into ``output`` tensor by
    tensor; see the module docstring. Returns (the output directory, the report); nothing is written
    when the report says not rotated."""
    from . import twin as _twin
    from .norm_math import orthogonal
    from .saving import place_dir, temp_dir
    from .shard_stream import check_names, check_output, check_source
    from .verify import TOLERANCE

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise NormSurgeonError(f"`seed` must be an integer >= 0, got {seed!r}")
    src = check_source(model)
    out = check_output(src, output, force=force)
    if not isinstance(max_shard_mb, (int, float)) or isinstance(max_shard_mb, bool) or not max_shard_mb > 0:
        raise NormSurgeonError(f"`max_shard_mb` must be a positive number of MiB, not {max_shard_mb!r}")
    config, cls = _twin.read_config(src)
    ckpt = Checkpoint(src)
    report = StreamRotateReport(seed, capture=f"tiny twin of {cls.__name__}")
    plan, names, ranks = _plan_twin(config, cls, seed, report)
    gc.collect()
    if plan is None:
        report.passed = False
        return out, report
    check_names(names, ranks, ckpt, cls.__name__)
    refusal, width = _check_affine_free(plan, ckpt)
    if refusal is not None or width is None:
        report.refused.append(refusal or Action("skipped", "(model)", {}, "the norms' width cannot be read"))
        report.passed = False
        return out, report
    todo = _real_names(plan, ckpt)
    report.norms, report.readers, report.writers = plan.roles
    q, report.matrix = orthogonal(width, seed)
    report.width = width
    report.tolerance = max(TOLERANCE.get(ckpt.dtype[n], TOLERANCE[torch.float32])[0] for n in todo)
    tmp = temp_dir(out)
    try:
        writer = ShardWriter(tmp, int(max_shard_mb * 2 ** 20))
        worst = 0.0
        for i, name in enumerate(ckpt.names):
            if name not in todo:
                writer.add(name, ckpt.get(name))
                continue
            writer.make_room(ckpt.nbytes(name))  # the shard being gathered goes out before the new tensor is made
            t, err = rotate_tensor(ckpt, name, todo[name], q, seed + i)
            worst = max(worst, err)
            tol = TOLERANCE.get(ckpt.dtype[name], TOLERANCE[torch.float32])[0]
            if not err <= tol:
                why = "a non-finite amount" if not math.isfinite(err) else f"{err:.2e}"
                report.refused.append(Action("rolled_back", name, {}, f"undoing its rotation differs from the original "
                                                                      f"by {why} (relative; tolerance {tol:g})"))
                report.passed = False
                report.max_rel_error = err if math.isfinite(err) else None
                return out, report
            writer.add(name, t)
            report.rotated_tensors += 1
            del t
        report.shards = writer.finish()
        copy_small_files(src, tmp, untied=False)
        check_written(tmp, {n: (ckpt.shape[n], ckpt.dtype[n]) for n in ckpt.names})
        place_dir(tmp, out, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report.max_rel_error = worst
    report.passed = True
    report.output = str(out)
    return out, report
