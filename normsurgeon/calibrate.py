"""Recompute BatchNorm running statistics from data ("BN recalibration").

After a norm swap (LayerNorm -> TokenBatchNorm, an inserted FFN BN) the running statistics are
placeholders (mean 0, var 1); after pruning, quantization or a domain change they are stale.
``calibrate`` sets every BN's running mean/variance (and every PowerNorm's running quadratic mean)
to the *exact* statistics of that norm's inputs over all the data, those inputs computed by the
eval model with every norm upstream already calibrated: whatever the batch sizes, and across all
ranks under ``torch.distributed``, the result is the one of a single process on the union.

Why stages: a BN in train mode normalizes with its batch's statistics, so the inputs of the BNs
after it depend on how the data was batched (a converted ViT calibrated in batches of 16 and of 32
differed by up to 0.7% in its running variances). Here the norms are calibrated in stages by depth
(``norm_depth``): a pass over the data measures the norms whose upstream norms are all fixed, then
fixes them; the next pass measures the next depth. Each batch's forward stops as soon as the
pass's norms have seen it (the per-batch call counts of the first pass tell when).

How a pass measures: a forward pre-hook per norm accumulates, per channel and in float64, the
count, mean and sum of squared deviations (M2) of each batch's input, merged batch by batch with
Chan et al.'s parallel formula (stable: no sum-of-squares cancellation). Under an initialized
process group the per-rank (count, mean, M2) of the pass's norms are all-gathered in one collective
and merged in rank order, so every rank sets identical values before the next pass. BN's own
cumulative average (``momentum=None``) weights each *batch* equally, which is only exact for equal
batch sizes; the hooks do not have that flaw. The model runs in eval throughout, so SyncBatchNorm
and SyncTokenBatchNorm run locally (no collective inside the forward).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import NormSurgeonError
from .files import read_tensors
from .inputs import CallArgs, as_call_args
from .nn import PowerNorm, TokenBatchNorm
from .nn.padding_mask import capture_padding_mask, real_rows
from .report import Table

__all__ = ["calibrate", "CalibrationReport", "load_calibration_data", "synthetic_batches", "shard_files",
           "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 32


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------

@dataclass
class CalibrationReport:
    """What ``calibrate`` did. ``batches``/``samples`` count all ranks; ``norms`` lists each
    recalibrated BN with the number of values per channel it was calibrated on (``positions``,
    batch x spatial/token positions, all ranks) and how often it ran (``calls``)."""

    batches: int = 0
    samples: int = 0
    world_size: int = 1
    #: passes over the data: one per depth of norms (see ``calibrate``)
    passes: int = 0
    norms: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    #: set by ``api.calibrate_files`` / ``api.recalibrate``: the files this rank read, where the model went
    files: list[str] = field(default_factory=list)
    output: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def recalibrated(self) -> int:
        return len(self.norms)

    def to_json(self) -> dict:
        d = {"recalibrated": self.recalibrated, "batches": self.batches, "samples": self.samples,
             "world_size": self.world_size, "passes": self.passes, "norms": [dict(n) for n in self.norms],
             "skipped": [dict(s) for s in self.skipped]}
        if self.files:
            d["files"] = list(self.files)
        if self.output is not None or self.notes:
            d["output"] = self.output
            d["notes"] = list(self.notes)
        return d

    def tables(self) -> list[Table]:
        notes = [f"{self.recalibrated} BatchNorm(s) recalibrated on {self.batches} batch(es), {self.samples} sample(s)"
                 + (f" across {self.world_size} ranks" if self.world_size > 1 else "")
                 + (f", in {self.passes} pass(es) (one per depth of norms)" if self.passes > 1 else "")]
        notes.extend(self.notes)
        main = Table("Recalibrated BatchNorms", ["path", "kind", "channels", "positions", "calls"],
                     [[n["path"], n["kind"], n["channels"], n["positions"], n["calls"]] for n in self.norms], notes)
        out = [main]
        if self.skipped:
            out.append(Table("Not recalibrated", ["path", "reason"], [[s["path"], s["reason"]] for s in self.skipped]))
        return out


# ---------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------

class RunningStats:
    """Per-channel count / mean / M2 in float64, merged with Chan's formula."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0.0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)
        self.calls = 0

    def add(self, n: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def add_batch(self, x2d: torch.Tensor) -> None:
        """x2d: (positions, C) in any float dtype."""
        self.calls += 1
        n = x2d.shape[0]
        if n == 0:
            return
        x = x2d.to(torch.float64)
        mean = x.mean(dim=0)
        m2 = (x - mean).square().sum(dim=0)
        self.add(float(n), mean, m2)

    def write_to(self, bn: _BatchNorm) -> None:
        """Set ``bn``'s running statistics to these exact ones (unbiased variance, as BN keeps)."""
        var = self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)
        bn.running_mean.copy_(self.mean)
        bn.running_var.copy_(var)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(self.calls)

    def pack(self) -> torch.Tensor:
        head = torch.tensor([self.count, float(self.calls)], dtype=torch.float64, device=self.mean.device)
        return torch.cat([head, self.mean, self.m2])

    @classmethod
    def unpack(cls, flat: torch.Tensor, channels: int) -> "RunningStats":
        s = cls(channels, flat.device)
        s.count = float(flat[0])
        s.calls = int(flat[1])
        s.mean = flat[2:2 + channels].clone()
        s.m2 = flat[2 + channels:2 + 2 * channels].clone()
        return s


def as_positions(bn: _BatchNorm, x: torch.Tensor, token: bool = False) -> torch.Tensor:
    """The BN input as (positions, C): channels last for TokenBatchNorm, dim 1 for every other BN.
    A TokenBatchNorm (or its ``bn`` child: ``token``) under an active padding mask (see
    ``normsurgeon.nn.padding_mask``) counts its real tokens only, as its own batch statistics do."""
    if token or isinstance(bn, TokenBatchNorm):
        rows = real_rows(x, bn.num_features)
        x2d = x.reshape(-1, bn.num_features)
        return x2d if rows is None else x2d[rows]
    if x.dim() == 2:
        return x
    return x.transpose(0, 1).reshape(bn.num_features, -1).t()


def _distributed(group) -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gather_stats(stats: list[RunningStats], channels: list[int], group) -> tuple[list[RunningStats], int]:
    """Merge every rank's stats in rank order (identical result on every rank)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    # Collectives need a tensor on the backend's device (gloo: CPU, nccl: CUDA).
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    size = torch.tensor([float(sum(2 + 2 * c for c in channels))], dtype=torch.float64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    if any(float(s) != float(size) for s in sizes):
        raise NormSurgeonError("calibration under torch.distributed: the ranks' models hold different BatchNorms "
                               f"(statistics sizes {[int(s) for s in sizes]}); every rank must calibrate the same model")
    local = torch.cat([s.pack().to(device) for s in stats]) if stats else torch.zeros(0, dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    merged = [RunningStats(c, torch.device("cpu")) for c in channels]
    for flat in parts:
        offset = 0
        for m, c in zip(merged, channels):
            r = RunningStats.unpack(flat[offset:offset + 2 + 2 * c].cpu(), c)
            offset += 2 + 2 * c
            m.add(r.count, r.mean, r.m2)
            m.calls += r.calls
    return merged, world


def _allreduce_counts(values: list[int], group) -> list[int]:
    import torch.distributed as dist
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


# ---------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------

def _batch_size(call: CallArgs) -> int:
    tensors = call.tensors()
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def _model_device(model: nn.Module) -> torch.device | None:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


class _Target:
    """One norm to calibrate: a ``_BatchNorm`` with running statistics (mean, unbiased variance) or a
    PowerNorm (running quadratic mean), with what ``calibrate`` saves to restore it."""

    def __init__(self, path: str, module: nn.Module, token: bool = False) -> None:
        self.path, self.module = path, module
        self.token = token  # a TokenBatchNorm's BatchNorm1d child: its input is the flattened tokens
        self.power = isinstance(module, PowerNorm)
        self.channels = module.num_features
        names = ("running_phi", "num_batches_tracked") if self.power else \
            ("running_mean", "running_var", "num_batches_tracked")
        self.saved = {n: getattr(module, n).clone() for n in names if getattr(module, n, None) is not None}
        self.stats = RunningStats(self.channels, self.saved[names[0]].device)
        self.depth: int | None = None

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not self.power:
            return as_positions(m, x, token=self.token)
        rows = real_rows(x, self.channels)
        if m.group_scaling is not None:  # PowerNorm's statistic is taken after its group scaling
            x = m.group_scaling(x)
        x2d = x.reshape(-1, self.channels)
        return x2d if rows is None else x2d[rows]

    def write(self, st: RunningStats) -> None:
        if not self.power:
            st.write_to(self.module)
            return
        # the quadratic mean E[x^2] = M2 / n + mean^2: a sum of non-negative terms, no cancellation.
        # num_batches_tracked drives PowerNorm's warm-up (training steps): calibration leaves it alone.
        self.module.running_phi.copy_(st.m2 / st.count + st.mean.square())

    def restore(self) -> None:
        with torch.no_grad():
            for n, v in self.saved.items():
                getattr(self.module, n).copy_(v)


def _targets(model: nn.Module, report: CalibrationReport) -> list[_Target]:
    out = []
    # a TokenBatchNorm's statistics live in its BatchNorm1d child, which sees the flattened tokens;
    # reported under the TokenBatchNorm's path
    token_children = {id(m.bn): name for name, m in model.named_modules() if isinstance(m, TokenBatchNorm)}
    for name, m in model.named_modules():
        path = token_children.get(id(m), name) or "<root>"
        if isinstance(m, PowerNorm):
            out.append(_Target(path, m))
        elif not isinstance(m, _BatchNorm):
            continue
        elif not m.track_running_stats or m.running_mean is None or m.running_var is None:
            report.skipped.append({"path": path,
                                   "reason": "track_running_stats=False: it always uses batch statistics"})
        elif isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
            report.skipped.append({"path": path, "reason": "lazy BatchNorm not initialized yet"})
        else:
            out.append(_Target(path, m, token=id(m) in token_children))
    return out


class _StageDone(Exception):
    """Raised from a norm's hook once every norm of the stage has seen this batch: the rest of the
    forward cannot change the stage's statistics. An ``Exception``, so that torch runs the
    ``always_call`` hooks on the way out (the padding-mask hook restores the mask); model code that
    swallows it only makes the forward run on, counted no further."""


def _collective_device(group) -> torch.device:
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")


def _agree_depths(depths: list[int | None], group) -> list[int | None]:
    """Every rank's depths merged (the largest wins: a rank whose first batch took another path
    cannot put a norm before one it depends on), so that all ranks run the same stages."""
    import torch.distributed as dist
    device = _collective_device(group)
    n = torch.tensor([float(len(depths))], dtype=torch.float64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    if any(float(s) != float(n) for s in sizes):
        raise NormSurgeonError("calibration under torch.distributed: the ranks' models hold different numbers of "
                               f"norms ({[int(s) for s in sizes]}); every rank must calibrate the same model")
    t = torch.tensor([-1.0 if d is None else float(d) for d in depths], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [None if v < 0 else int(v) for v in t.tolist()]


def _stages(targets: list[_Target]) -> list[list[_Target]]:
    """Targets grouped by depth, shallowest first; norms no probe reached go last (by then every
    norm they could depend on is fixed)."""
    known = sorted({t.depth for t in targets if t.depth is not None})
    stages = [[t for t in targets if t.depth == d] for d in known]
    late = [t for t in targets if t.depth is None]
    return stages + ([late] if late else [])


def calibrate(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None,
              progress: Callable[[int, int | None], None] | None = None, group=None) -> CalibrationReport:
    """Recompute the running statistics of every BatchNorm (and PowerNorm) in ``model`` from ``batches``.

    Every ``_BatchNorm`` with running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, TokenBatchNorm,
    subclasses) gets running_mean = the exact mean and running_var = the exact unbiased variance of
    its inputs over all batches (and all ranks of ``group`` when torch.distributed is initialized:
    then every rank must call ``calibrate``), those inputs computed by the model in eval mode with
    every norm upstream already calibrated: the statistics the eval model will see on this data,
    the same whatever the batch sizes and however the data is split across ranks. A PowerNorm gets
    ``running_phi`` = the exact quadratic mean of its input (its ``num_batches_tracked``, the
    warm-up clock, is kept). ``num_batches_tracked`` of a BN becomes the number of times it ran.

    This takes one pass over the data per *depth* of norms (norms with no path between them share
    a pass; see ``norm_depth``), each pass stopping a batch's forward as soon as the pass's norms
    have seen it, plus one probe forward: a chain of D norms costs about D / 2 forward passes over
    the data. A one-shot iterator is read into a list first.

    The whole model runs in eval (dropout off, SyncBatchNorms local); afterwards each module's
    training flag is restored; on an error the original statistics are restored too. A norm that no
    batch reached keeps its statistics (listed as skipped).

    ``batches``: iterable of CallArgs, tensors, tuples of tensors or dicts of keyword tensors; they
    are moved to the model's device; a batch with an ``attention_mask`` (keyword or positional, 2-D,
    nonzero at real tokens) calibrates the token BatchNorms and PowerNorms on its real tokens only.
    ``max_batches`` stops each pass early. ``progress(done, total)`` is called after each batch of
    each pass (``total``: batches x passes, None when unknown).
    """
    from .norm_depth import norm_depths

    if max_batches is not None and max_batches < 0:
        raise NormSurgeonError(f"max_batches must be >= 0, got {max_batches}")
    report = CalibrationReport()
    targets = _targets(model, report)

    if iter(batches) is batches:  # a one-shot iterator: every pass needs the data again
        batches = list(itertools.islice(batches, max_batches))  # type: ignore[arg-type]
    n_total = None
    if hasattr(batches, "__len__"):
        n_total = len(batches)  # type: ignore[arg-type]
        if max_batches is not None:
            n_total = min(n_total, max_batches)
    elif max_batches is not None:
        n_total = max_batches
    device = _model_device(model)

    def each_batch():
        for item in itertools.islice(batches, max_batches):
            call = as_call_args(item)
            yield call.to(device=device) if device is not None else call

    distributed = _distributed(group)
    modes = {m: m.training for m in model.modules()}
    by_module = {t.module: t for t in targets}
    handles = []
    ok = False
    state = {"stage": set(), "seen": {}, "need": None, "done": False}

    def hook(m, args, kwargs):
        if state["done"]:
            return
        t = by_module[m]
        state["seen"][t] = state["seen"].get(t, 0) + 1
        if t not in state["stage"]:
            return
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            t.stats.add_batch(t.positions(x.detach()))
        need = state["need"]
        if need is not None and all(state["seen"].get(s, 0) >= need.get(s, 0) for s in state["stage"]):
            state["done"] = True
            raise _StageDone

    try:
        model.eval()
        handles.append(capture_padding_mask(model))
        with torch.no_grad():
            first = next(iter(each_batch()), None)
            if first is not None and targets:
                depths, traced = norm_depths(model, [t.module for t in targets], lambda: first.call(model))
            else:
                depths, traced = [None] * len(targets), True
            if distributed:
                depths = _agree_depths(depths, group)
            for t, d in zip(targets, depths):
                t.depth = d
            stages = _stages(targets)
            report.passes = len(stages)
            if not traced:
                report.notes.append("the data flow between the norms could not be traced: one pass per norm, "
                                    "in call order")
            for t in targets:
                handles.append(t.module.register_forward_pre_hook(hook, with_kwargs=True))

            calls: list[dict] = []  # per batch: how often each norm ran (recorded in the first pass)
            done = 0
            total = None if n_total is None else n_total * len(stages)
            n_batches = n_samples = 0
            for k, stage in enumerate(stages):
                state["stage"] = set(stage)
                for i, call in enumerate(each_batch()):
                    state["seen"], state["done"] = {}, False
                    state["need"] = calls[i] if k > 0 and i < len(calls) else None
                    if state["need"] is None or any(state["need"].get(t, 0) for t in stage):
                        try:
                            call.call(model)
                        except _StageDone:
                            pass
                    if k == 0:
                        calls.append(dict(state["seen"]))
                        n_batches += 1
                        n_samples += _batch_size(call)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                merged = [t.stats for t in stage]
                if distributed:
                    merged, report.world_size = _gather_stats(merged, [t.channels for t in stage], group)
                for t, st in zip(stage, merged):
                    t.stats = st
                    if st.count == 0:
                        continue
                    if st.count == 1 and not t.power:
                        raise NormSurgeonError(
                            f"{t.path}: the calibration data gives it a single value per channel (a BatchNorm on "
                            "(N, C) input sees one per sample), and a variance needs 2 or more; calibrate on more "
                            "than a single sample")
                    t.write(st)  # fixed before the next pass: the norms downstream see it
            if not stages:  # no norm to calibrate: the data is only counted
                for call in each_batch():
                    n_batches += 1
                    n_samples += _batch_size(call)
        for h in handles:
            h.remove()
        handles.clear()
        if distributed:
            n_batches, n_samples = _allreduce_counts([n_batches, n_samples], group)
        report.batches, report.samples = n_batches, n_samples
        for t in targets:
            st = t.stats
            if st.count == 0:
                t.restore()
                report.skipped.append({"path": t.path, "reason": "no calibration batch reached it"})
                continue
            report.norms.append({"path": t.path, "kind": type(t.module).__name__, "channels": t.channels,
                                 "positions": int(st.count), "calls": st.calls})
        ok = True
    finally:
        for h in handles:
            h.remove()
        if not ok:
            for t in targets:
                t.restore()
        for m, mode in modes.items():
            m.training = mode
    return report


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def shard_files(data: str | Path | list, rank: int = 0, world_size: int = 1) -> list[Path]:
    """The calibration files of one rank.

    ``{rank}`` and ``{world_size}`` in a name are replaced (``calib-{rank}.pt``): each rank reads the
    files its own names give. Without ``{rank}``, several ranks share the list: rank r reads files
    r, r + world_size, ... (so the ranks together read every file once), which needs at least one
    file per rank. One process reads them all.
    """
    names = [str(data)] if isinstance(data, (str, Path)) else [str(d) for d in data]
    if not names:
        raise NormSurgeonError("no calibration data given")
    names = [n.replace("{world_size}", str(world_size)) for n in names]
    if any("{rank}" in n for n in names):
        if not all("{rank}" in n for n in names):
            raise NormSurgeonError("calibration data: put {rank} in every file name or in none "
                                   f"(got {', '.join(names)})")
        return [Path(n.replace("{rank}", str(rank))) for n in names]
    if world_size > 1:
        if len(names) < world_size:
            raise NormSurgeonError(
                f"calibration data: {len(names)} file(s) for {world_size} ranks; give at least one file per rank "
                "or name the shards with {rank} (e.g. calib-{rank}.pt)")
        return [Path(n) for n in names[rank::world_size]]
    return [Path(n) for n in names]


def synthetic_batches(example_inputs: Any, n: int, seed: int = 0, batch_size: int | None = None) -> list[CallArgs]:
    """``n`` random batches shaped like ``example_inputs`` (``batch_size`` overrides the batch dim).
    Calibrating on noise only makes sense for smoke tests and for checking a pipeline end to end."""
    example = as_call_args(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    return [example.like(gen, batch=batch_size) for _ in range(n)]


def _slots(example: CallArgs) -> list[tuple[str, torch.Tensor]]:
    """(name, example tensor) for each tensor input, in CallArgs.names() order, named as files name
    them (``CallArgs.file_names``: a positional input by its forward parameter when known)."""
    values = [*example.args, *example.kwargs.values()]
    return [(n, v) for n, v in zip(example.file_names(), values) if isinstance(v, torch.Tensor)]


def _assign(data: Any, slots: list[tuple[str, torch.Tensor]], where: str) -> dict[str, list[torch.Tensor]]:
    """Map loaded data onto the model's tensor inputs: slot name -> list of chunks (dataset dim first)."""
    names = [n for n, _ in slots]
    if isinstance(data, torch.Tensor):
        if len(slots) != 1:
            raise NormSurgeonError(f"calibration data {where} is a single tensor, but the model takes {len(slots)} "
                                   f"tensor inputs ({', '.join(names)}); save a dict name -> tensor instead")
        return {names[0]: [data]}
    if isinstance(data, Mapping):
        if not data:
            raise NormSurgeonError(f"calibration data {where} is empty")
        bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise NormSurgeonError(f"calibration data {where}: entries {bad} are not tensors")
        if len(slots) == 1 and len(data) == 1:
            return {names[0]: [next(iter(data.values()))]}
        # a positional input may also go by its position (input_0), as --inputs files name it
        data = {(names[int(k[6:])] if k.startswith("input_") and k[6:].isdigit() and int(k[6:]) < len(names)
                 and k not in names else k): v for k, v in data.items()}
        missing = [n for n in names if n not in data]
        extra = [k for k in data if k not in names]
        if missing or extra:
            raise NormSurgeonError(
                f"calibration data {where} has inputs {sorted(data)} but the model takes {names}"
                + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
        return {n: [data[n]] for n in names}
    if isinstance(data, (list, tuple)):
        if not data:
            raise NormSurgeonError(f"calibration data {where} is an empty list")
        if all(isinstance(v, torch.Tensor) for v in data):
            if len(slots) > 1:
                if len(data) != len(slots):
                    raise NormSurgeonError(
                        f"calibration data {where} is a list of {len(data)} tensors, but the model takes "
                        f"{len(slots)} tensor inputs ({', '.join(names)})")
                return {n: [t] for n, t in zip(names, data)}
            return {names[0]: list(data)}  # a list of batches for a single-input model
        if all(isinstance(v, (Mapping, list, tuple)) for v in data):
            out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            for i, item in enumerate(data):
                part = _assign(item, slots, f"{where}[{i}]")
                for n in names:
                    out[n].extend(part[n])
            return out
    raise NormSurgeonError(f"calibration data {where} must hold a tensor, a list of tensors or a dict of tensors, "
                           f"not {type(data).__name__}")


def _fit(name: str, t: torch.Tensor, ex: torch.Tensor, where: str) -> torch.Tensor:
    feat = tuple(ex.shape[1:])
    if t.dim() != ex.dim() or tuple(t.shape[1:]) != feat:
        raise NormSurgeonError(
            f"calibration data {where}: input {name!r} has shape {tuple(t.shape)}, which does not fit the model "
            f"input {name!r} (expected (N, {', '.join(map(str, feat))}) with N samples, like the example "
            f"{tuple(ex.shape)})")
    if ex.is_floating_point():
        if not (t.is_floating_point()):
            raise NormSurgeonError(
                f"calibration data {where}: input {name!r} has dtype {t.dtype} but the model input is {ex.dtype}; "
                "convert (and normalize) it to floating point first")
        return t.to(ex.dtype)
    if ex.dtype == torch.bool:
        return t.to(torch.bool)
    if t.is_floating_point():
        raise NormSurgeonError(f"calibration data {where}: input {name!r} has dtype {t.dtype} but the model input "
                               f"is {ex.dtype} (integer ids expected)")
    return t.to(ex.dtype)


def load_calibration_data(path: str | Path, example_inputs: Any, batch_size: int | None = None) -> list[CallArgs]:
    """Calibration batches from a file, checked against the model's example inputs.

    Formats: ``.pt``/``.pth`` (a tensor, a list of tensors, or a dict name -> tensor, loaded with
    ``weights_only=True``), ``.npy`` (one array), ``.npz`` and ``.safetensors`` (name -> array).
    Every tensor has the example input's rank with a leading dataset dim and the same feature shape.
    Names are the example's keyword names (``pixel_values``...) or ``input_0``... for positional
    inputs; a model with one tensor input takes a single tensor or a one-entry file of any name. A
    list of tensors is a list of batches (single-input model) or one tensor per positional input.

    Splitting: with ``batch_size`` all data is concatenated and split into batches of that size;
    without it, a list of batches is kept as given and a single tensor is split into batches of
    ``DEFAULT_BATCH_SIZE``. A trailing batch of one sample joins the previous batch (BatchNorm on
    (N, C) input cannot train on one sample). Floating data is cast to the example's dtype;
    integer data for a floating input is refused (normalize images first).
    """
    path = Path(path)
    if not path.is_file():
        raise NormSurgeonError(f"calibration data {path} does not exist")
    if batch_size is not None and batch_size < 1:
        raise NormSurgeonError(f"batch size must be >= 1, got {batch_size}")
    example = as_call_args(example_inputs)
    slots = _slots(example)
    if not slots:
        raise NormSurgeonError("the model's example inputs hold no tensor to calibrate with")
    where = str(path)
    chunks = _assign(read_tensors(path, "calibration data", npz_positional=False), slots, where)
    examples = dict(slots)
    fitted = {n: [_fit(n, t, examples[n], where) for t in ts] for n, ts in chunks.items()}

    counts = {n: [int(t.shape[0]) for t in ts] for n, ts in fitted.items()}
    first = next(iter(counts.values()))
    for n, c in counts.items():
        if c != first:
            raise NormSurgeonError(f"calibration data {where}: inputs have different numbers of samples "
                                   f"({', '.join(f'{k}: {sum(v)}' for k, v in counts.items())})")
    if sum(first) == 0:
        raise NormSurgeonError(f"calibration data {where} holds no samples")

    explicit = len(first) > 1 and batch_size is None
    if explicit:
        per_slot = {n: [t for t in ts if t.shape[0]] for n, ts in fitted.items()}
    else:
        size = batch_size or DEFAULT_BATCH_SIZE
        per_slot = {}
        for n, ts in fitted.items():
            full = torch.cat(ts) if len(ts) > 1 else ts[0]
            parts = list(torch.split(full, size))
            if len(parts) > 1 and parts[-1].shape[0] == 1:
                parts[-2] = torch.cat([parts[-2], parts[-1]])
                parts.pop()
            per_slot[n] = parts

    n_batches = len(next(iter(per_slot.values())))
    nargs = len(example.args)
    names = example.names()
    batches = []
    for i in range(n_batches):
        values = [per_slot[n][i] if n in per_slot else v
                  for n, v in zip(example.file_names(), [*example.args, *example.kwargs.values()])]
        batches.append(CallArgs(tuple(values[:nargs]), dict(zip(names[nargs:], values[nargs:]))))
    return batches


def example_from_data(path: str | Path, model: nn.Module) -> CallArgs:
    """Example inputs for a model that declares none (a plain factory): two samples of the calibration
    data, which are the model's inputs. A tensor (or a list of batches) is the one positional input; a
    dict calls the model by keyword, except that a single entry is the one positional input."""
    from .inputs import named_after

    where = str(path)
    data = read_tensors(Path(path), "calibration data", npz_positional=False)
    if isinstance(data, (list, tuple)) and data and all(isinstance(v, torch.Tensor) for v in data):
        data = data[0]
    if isinstance(data, Mapping) and len(data) == 1:
        data = next(iter(data.values()))
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise NormSurgeonError(f"calibration data {where} holds no samples")
        return named_after(CallArgs((data[:2],), {}), model)
    if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) and v.dim() for v in data.values()):
        return CallArgs((), {k: v[:2] for k, v in data.items()})
    raise NormSurgeonError(f"calibration data {where}: cannot tell the model's inputs from it; pass `input_shapes`")
