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
3. **stream**: Q is ``norm_math.rotation(width, seed)``, the in-memory rotation's (a fast Walsh–Hadamard
   transform, ⊗ a small QR factor for widths 2^k·m; never an n×n matrix unless the width is odd); each
   planned tensor is loaded and rotated in place the in-memory way (``norm_math.rotate_reader_``: float64
   slices, cast back): ``x·Q`` on rows (readers ``W·Q``, embeddings, Conv1D writers, biases and position
   parameters), ``Qᵀ·x`` on columns (linear writers, Conv1D readers); every other tensor is copied through.
4. **check per tensor**: on sampled rows (columns) of every chunk, undoing the rotation of the stored
   result (Qᵀ from Q's factors) must give back the original within ``verify.TOLERANCE`` of its dtype. A
   rotation is one change of basis for the whole stream: one failed tensor refuses it all, and nothing
   is written. The whole real model is never run: the report says so.
"""

from __future__ import annotations

import gc
import math
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NormSurgeonError
from .norm_math import Rotation, rotate_reader_, rotation
from .report import Action, Table, fmt_float
from .shard_files import Checkpoint, ShardWriter, check_written, copy_small_files

SAMPLES = 8  # rows (columns) of each chunk whose rotation is undone and compared
CHUNK_BYTES = 16 << 20  # the check's chunk (as float64): SAMPLES rows of each are undone


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


def _undo_rows(q: Rotation, y: torch.Tensor) -> torch.Tensor:
    """y·Qᵀ for a few float64 rows (k, n): the inverse of ``Rotation.apply``, from Q's factors in the
    opposite order (Qᵀ = diag(s)·H/√p ⊗ Bᵀ, where the forward path applies H before diag(s) and B first);
    no n×n matrix."""
    x = y.reshape(-1, q.p, q.m).clone()
    if q.scale is not None:
        x.mul_(q.scale[:, None])
        x = Rotation(q.n, "H", scale=torch.ones(q.p, dtype=torch.float64)).apply(x)  # H ⊗ I: an unscaled transform
    if q.matrix is not None:
        x = x.reshape(-1, q.m) @ q.matrix.T
    return x.reshape(y.shape)


def rotate_tensor(ckpt: Checkpoint, name: str, how: str, q: Rotation, seed: int) -> tuple[torch.Tensor, float]:
    """``name`` rotated in place and cast back, and the worst relative error of undoing the rotation of
    the stored result on sampled rows (columns) of every chunk of ``CHUNK_BYTES`` float64 values.

    The rotation is the in-memory one's (``norm_math.rotate_reader_``: float64 slices, float32 for
    bfloat16/float16 weights, through a fast Walsh–Hadamard transform, with reused buffers), so the same
    seed gives the same tensors; the loaded
    tensor is rotated where it lies, so the peak is the tensor plus two small buffers. The originals of
    the sampled rows (columns) are kept before; the scale and the finiteness are taken chunk by chunk (on
    a whole bf16 tensor ``isfinite`` upcasts it)."""
    shape = ckpt.shape[name]
    n = q.n
    if how == "right" and shape[-1] != n:
        raise NormSurgeonError(f"the checkpoint's {name} has shape {list(shape)}: its last axis is not the width {n}")
    if how == "left" and (len(shape) != 2 or shape[0] != n):
        raise NormSurgeonError(f"the checkpoint's {name} has shape {list(shape)}: its first axis is not the width {n}")
    t = ckpt.get(name)
    rows = t.view(-1, n) if how == "right" else t.t()  # the rotated vectors as rows, a view of t
    flat = t.view(-1)
    span = max(1, CHUNK_BYTES // 8)
    scale = 0.0
    for a in range(0, flat.numel(), span):  # the original's largest magnitude, chunk by chunk as stored
        lo, hi = torch.aminmax(flat[a:a + span])
        scale = max(scale, hi.item(), -lo.item())
    g = torch.Generator().manual_seed(seed)
    step = max(1, CHUNK_BYTES // (8 * n))
    picks = []
    for a in range(0, rows.shape[0], step):
        b = min(rows.shape[0], a + step)
        pick = a + torch.randint(0, b - a, (min(SAMPLES, b - a),), generator=g)
        picks.append((pick, rows[pick].double()))
    if how == "right":
        rotate_reader_(rows, q, "out_in")  # x·Q on the rows
    else:
        rotate_reader_(t, q, "in_out")  # Qᵀ·W, over column slices as they are stored
    for a in range(0, flat.numel(), span):
        if not bool(torch.isfinite(flat[a:a + span]).all()):
            return t, math.inf
    worst = 0.0
    for pick, orig in picks:
        back = _undo_rows(q, rows[pick].double())
        worst = max(worst, (back - orig).abs().max().item())
    return t, worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)


def rotate_dir(model: Any, *, output: Any, seed: int = 0, force: bool = False,
               max_shard_mb: float = 256) -> tuple[Any, StreamRotateReport]:
    """Rotate the residual stream of the transformers directory ``model`` into ``output`` tensor by
    tensor; see the module docstring. Returns (the output directory, the report); nothing is written
    when the report says not rotated."""
    from . import twin as _twin
    from .saving import place_dir, temp_dir
    from .shard_stream import check_call, check_names
    from .verify import TOLERANCE

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise NormSurgeonError(f"`seed` must be an integer >= 0, got {seed!r}")
    src, out = check_call(model, output, force=force, max_shard_mb=max_shard_mb)
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
    q = rotation(width, seed)
    report.matrix = q.kind
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
