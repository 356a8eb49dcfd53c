"""Latency of ONNX models in ONNX Runtime (CPU), measured fairly against each other.

One session per model, the same inputs for all, runs interleaved round-robin (the starting model rotates
every round) so that clock, thermal and cache drift hit every model equally. Reported: median and spread
(p10/p90, IQR) per model, the ratio of each median to the first model's, and the *paired* ratios: in
each round every model runs once, back to back, so ``time / first model's time in the same round`` cancels
load that hits the whole round. Their median is the comparison; their p10-p90 interval is how much a
single round can disagree with it. When that interval contains 1.0 the first model was faster in at
least 10% of the rounds and slower in at least 10%: the difference shown is within the run-to-run noise
and the report says so (``within_noise``) instead of letting a ratio read as a result.

Threads: one ONNX Runtime intra-op thread by default (``DEFAULT_THREADS``). Ratios, not absolute
speed, are what bench reports, and one thread gives the stable ones: with 2 threads on a 2-vCPU
machine, LeViT-128S at batch 1 measured 17-22 ms (median over repeated runs) with paired ratios
spread 0.75-1.33, against 10 ms and +-2% with one thread: the extra thread competes with the OS and
every other process for the same cores (ORT's pool threads also spin while they wait), so any
contention becomes latency. ``threads=N`` measures the deployment setting; the report notes when N is
not below the number of CPUs available to the process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import NormSurgeonError
from .inputs import CallArgs
from .errors import one_line as _one_line
from .onnx import count_norm_ops, make_session
from .onnx.runtime import _ORT_TYPES
from .outputs import compare_outputs
from .report import Table, fmt_float

__all__ = ["measure_latency", "BenchReport", "ModelTiming", "load_named_arrays", "DEFAULT_THREADS",
           "available_cpus"]

#: ONNX Runtime intra-op threads when the caller does not choose (see the module docstring for why 1).
DEFAULT_THREADS = 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class ModelTiming:
    onnx: str
    times_ms: list[float] = field(default_factory=list, repr=False)
    ratio: float = 1.0
    norm_ops: dict[str, int] = field(default_factory=dict)
    #: max abs / max rel difference of this model's outputs from the first model's (same inputs); None if
    #: the outputs cannot be compared (different number or shapes)
    vs_first: dict | None = None
    #: per round: this model's time / the first model's time in the same round (all 1.0 for the first model)
    paired_ratios: list[float] = field(default_factory=list, repr=False)
    is_first: bool = False

    def _paired_pct(self, q: float) -> float:
        return float(np.percentile(self.paired_ratios, q)) if self.paired_ratios else float("nan")

    @property
    def paired_ratio(self) -> float:
        """Median over rounds of the paired ratio: the comparison with the first model."""
        return self._paired_pct(50)

    @property
    def paired_p10(self) -> float:
        return self._paired_pct(10)

    @property
    def paired_p90(self) -> float:
        return self._paired_pct(90)

    @property
    def paired_iqr(self) -> float:
        return self._paired_pct(75) - self._paired_pct(25)

    @property
    def within_noise(self) -> bool | None:
        """True when the p10-p90 interval of the paired ratios contains 1.0: the difference from the first
        model is smaller than the run-to-run spread. None for the first model (nothing to compare)."""
        if self.is_first or not self.paired_ratios:
            return None
        return bool(self.paired_p10 <= 1.0 <= self.paired_p90)

    def _pct(self, q: float) -> float:
        return float(np.percentile(self.times_ms, q)) if self.times_ms else float("nan")

    @property
    def median_ms(self) -> float:
        return self._pct(50)

    @property
    def p10_ms(self) -> float:
        return self._pct(10)

    @property
    def p90_ms(self) -> float:
        return self._pct(90)

    @property
    def iqr_ms(self) -> float:
        return self._pct(75) - self._pct(25)

    def to_json(self) -> dict:
        return {"onnx": self.onnx, "median_ms": round(self.median_ms, 4), "p10_ms": round(self.p10_ms, 4),
                "p90_ms": round(self.p90_ms, 4), "iqr_ms": round(self.iqr_ms, 4),
                "min_ms": round(min(self.times_ms), 4) if self.times_ms else None,
                "mean_ms": round(float(np.mean(self.times_ms)), 4) if self.times_ms else None,
                "ratio": round(self.ratio, 4), "runs": len(self.times_ms),
                "paired_ratio": _round(self.paired_ratio), "paired_p10": _round(self.paired_p10),
                "paired_p90": _round(self.paired_p90), "paired_iqr": _round(self.paired_iqr),
                "within_noise": self.within_noise, "norm_ops": self.norm_ops, "vs_first": self.vs_first}


def _round(x: float) -> float | None:
    return None if x != x else round(x, 4)  # NaN (no runs) -> null: JSON has no NaN


@dataclass
class BenchReport:
    models: list[ModelTiming]
    inputs: dict[str, dict]  # name -> {"shape", "dtype"}
    threads: int
    warmup: int
    runs: int
    seed: int
    ort_version: str = ""
    #: True when ``threads`` is DEFAULT_THREADS because the caller chose none
    threads_default: bool = False
    #: CPUs available to the process when it ran
    cpus: int = 0

    @property
    def notes(self) -> list[str]:
        """What the reader must know before trusting the figures (also in the JSON and the table)."""
        notes = []
        names = self._names()
        noisy = [n for n, m in zip(names, self.models) if m.within_noise]
        if noisy:
            notes.append(f"within noise, cannot tell apart from the first model: {', '.join(noisy)}. The p10–p90 "
                         "interval of the paired ratios contains 1.0: the round-to-round spread is wider than the "
                         "difference shown (at least one round in ten went the other way), so do not read the "
                         "ratio as a speed-up or slow-down. A quieter machine, 1 thread or larger inputs narrow "
                         "the spread; more --runs do not.")
        if self.threads > 1 and self.cpus and self.threads >= self.cpus:
            notes.append(f"{self.threads} threads on {self.cpus} available CPUs: the threads compete with the OS and "
                         "other processes for every core, which makes timings slower and unstable; "
                         "--threads 1 gives stable ratios")
        return notes

    def _names(self) -> list[str]:
        names = [Path(m.onnx).name for m in self.models]
        if len(set(names)) < len(names):  # same file names in different folders: keep the paths
            names = [m.onnx for m in self.models]
        return names

    def to_json(self) -> dict:
        return {"models": [m.to_json() for m in self.models], "inputs": self.inputs, "threads": self.threads,
                "threads_default": self.threads_default, "cpus": self.cpus,
                "warmup": self.warmup, "runs": self.runs, "seed": self.seed, "onnxruntime": self.ort_version,
                "notes": self.notes}

    def tables(self) -> list[Table]:
        shapes = ", ".join(f"{n} {v['dtype']}[{'x'.join(map(str, v['shape']))}]" for n, v in self.inputs.items())
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        if self.threads_default:
            threads += " (default; --threads N to change)"
        t = Table(f"Latency in ONNX Runtime {self.ort_version} (CPU, {threads}, {self.runs} runs "
                  f"after {self.warmup} warm-up, interleaved)",
                  ["model", "median ms", "p10–p90 ms", "IQR ms", "ratio vs first", "paired ratio (p10–p90)",
                   "norm ops", "max abs diff vs first"])
        names = self._names()
        for i, m in enumerate(self.models):
            ops = ", ".join(f"{k} {v}" for k, v in m.norm_ops.items()) or "-"
            diff = "-" if i == 0 else ("not comparable" if m.vs_first is None else fmt_float(m.vs_first["max_abs_error"]))
            paired = "-" if i == 0 else f"{m.paired_ratio:.3f} ({m.paired_p10:.3f}–{m.paired_p90:.3f})"
            if m.within_noise:
                paired += " within noise"
            t.rows.append([names[i], f"{m.median_ms:.3f}", f"{m.p10_ms:.3f}–{m.p90_ms:.3f}", f"{m.iqr_ms:.3f}",
                           f"{m.ratio:.3f}", paired, ops, diff])
        t.notes.append(f"inputs: {shapes}")
        t.notes.append("ratio = median / median of the first model (below 1 = faster). paired ratio = median over "
                       "rounds of time / the first model's time in the same round, (p10–p90) its spread over rounds; "
                       "'within noise' when that interval contains 1.0. Models run round-robin on the same inputs, "
                       "so drift affects all of them alike; compare ratios, not absolute times across machines.")
        t.notes.extend(self.notes)
        return [t]


def load_named_arrays(path: str | os.PathLike) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Arrays by input name (.npz/.pt/.safetensors) or positional (.npy, .npz arr_0..., a .pt list/tensor)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NormSurgeonError(f"`inputs_file` {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return [np.load(str(path), allow_pickle=False)]
        if suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as z:
                keys = list(z.keys())
                if keys and all(k.startswith("arr_") for k in keys):
                    return [z[f"arr_{i}"] for i in range(len(keys))]
                return {k: z[k] for k in keys}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file
            return dict(load_file(str(path)))
        if suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                return [obj.numpy()]
            if isinstance(obj, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in obj):
                return [t.numpy() for t in obj]
            if isinstance(obj, Mapping) and all(isinstance(t, torch.Tensor) for t in obj.values()):
                return {k: t.numpy() for k, t in obj.items()}
            raise NormSurgeonError(f"`inputs_file` {path}: expected tensors by input name, got {type(obj).__name__}")
    except NormSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"`inputs_file` {path}: cannot read: {_one_line(e)}") from e
    raise NormSurgeonError(f"`inputs_file` {path}: unknown format {suffix or '(no suffix)'}; use .npy, .npz, .pt "
                           "or .safetensors")


def _describe(path: str, sig: list) -> str:
    return f"{path} takes " + ", ".join(f"{i.name} {i.type.replace('tensor(', '').rstrip(')')}{list(i.shape)}"
                                        for i in sig)


def _resolve_shapes(paths: Sequence[str], sigs: list[list], dims: Mapping[str, int]) -> dict[str, tuple]:
    """One concrete shape per input that every model accepts; error if their signatures differ."""
    ref = sigs[0]
    names = [i.name for i in ref]
    for path, sig in zip(paths[1:], sigs[1:]):
        if sorted(i.name for i in sig) != sorted(names):
            raise NormSurgeonError(f"the models take different inputs: {_describe(paths[0], ref)}; "
                                   f"{_describe(path, sig)}")
    shapes = {}
    for k, spec in enumerate(ref):
        per_model = [next(i for i in sig if i.name == spec.name) for sig in sigs]
        if any(p.type != spec.type for p in per_model) or any(len(p.shape) != len(spec.shape) for p in per_model):
            raise NormSurgeonError(f"input {spec.name!r} differs between models: "
                                   + "; ".join(_describe(p, s) for p, s in zip(paths, sigs)))
        shape = []
        for d in range(len(spec.shape)):
            static = {p.shape[d] for p in per_model if isinstance(p.shape[d], int)}
            if len(static) > 1:
                raise NormSurgeonError(f"input {spec.name!r} dim {d} differs between models ({sorted(static)}): "
                                       + "; ".join(_describe(p, s) for p, s in zip(paths, sigs)))
            if static:
                shape.append(static.pop())
                continue
            named = next((p.shape[d] for p in per_model if isinstance(p.shape[d], str)), None)
            if named is not None and named in dims:
                shape.append(int(dims[named]))
            else:
                shape.append(1 if d == 0 else 16)
        shapes[spec.name] = tuple(shape)
    return shapes


def _random_feeds(sig: list, shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in sig:
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is None:
            raise NormSurgeonError(f"input {spec.name!r} has type {spec.type}, which bench cannot generate; "
                                   "pass `inputs_file`")
        shape = shapes[spec.name]
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:  # token ids, masks, type ids: 1 is valid for all of them
            feeds[spec.name] = np.ones(shape, dtype=dtype)
    return feeds


def _given_feeds(given: Any, sig: list, paths: Sequence[str], sigs: list[list]) -> dict[str, np.ndarray]:
    if isinstance(given, CallArgs):
        values = [*given.args, *given.kwargs.values()]
        given = {n: v for n, v in zip(given.names(), values) if hasattr(v, "shape")}
    if isinstance(given, (list, tuple)):
        if len(given) != len(sig):
            raise NormSurgeonError(f"{len(given)} input arrays given but {_describe(paths[0], sig)}")
        given = dict(zip([i.name for i in sig], given))
    if not isinstance(given, Mapping):
        raise NormSurgeonError(f"inputs must be arrays by input name, not {type(given).__name__}")
    feeds = {}
    names = [i.name for i in sig]
    if sorted(given) != sorted(names):
        raise NormSurgeonError(f"the inputs are named {sorted(given)} but {_describe(paths[0], sig)}")
    for name, v in given.items():
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        spec = next(i for i in sig if i.name == name)
        want = _ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != want:
            if np.issubdtype(arr.dtype, np.floating) != np.issubdtype(want, np.floating):
                raise NormSurgeonError(f"input {name!r} is {arr.dtype} but the models take {spec.type}")
            arr = arr.astype(want)
        for path, s in zip(paths, sigs):
            ms = next(i for i in s if i.name == name).shape
            if len(ms) != arr.ndim or any(isinstance(d, int) and d != a for d, a in zip(ms, arr.shape)):
                raise NormSurgeonError(f"input {name!r} has shape {list(arr.shape)} but {_describe(path, s)}")
        feeds[name] = arr
    return feeds


def measure_latency(paths: Sequence[str | os.PathLike], inputs: Any = None, threads: int | None = None, warmup: int = 5,
                    runs: int = 50, seed: int = 0, *, dims: Mapping[str, int] | None = None,
                    progress: Callable[[str], None] | None = None) -> BenchReport:
    """Median latency of each ONNX model on the same inputs, interleaved; ratios against the first model.

    ``inputs``: arrays/tensors by input name (or positional, or a CallArgs); by default random floats and
    all-ones integer inputs (valid token ids and masks) shaped from the models' input signature, with
    dynamic dims from ``dims`` (by dim name) or 1 for dim 0 and 16 otherwise. ``threads``: ONNX Runtime
    intra-op threads per session, ``None`` = ``DEFAULT_THREADS`` (1; see the module docstring).
    Each model after the first gets the paired ratios against it, their spread and ``within_noise``.
    """
    import onnxruntime as ort

    paths = [str(p) for p in paths]
    if not paths:
        raise NormSurgeonError("bench needs at least one .onnx file")
    threads_default = threads is None
    if threads is None:
        threads = DEFAULT_THREADS
    if runs < 1 or warmup < 0 or threads < 1:
        raise NormSurgeonError("`runs` and `threads` must be at least 1, `warmup` at least 0")
    for p in paths:
        if not Path(p).is_file():
            raise NormSurgeonError(f"{p}: no such file")
    sessions = []
    for i, p in enumerate(paths):
        if progress:
            progress(f"loading {p} ({i + 1}/{len(paths)})")
        sessions.append(make_session(p, threads=threads))
    sigs = [s.get_inputs() for s in sessions]
    if inputs is not None:
        feeds = _given_feeds(inputs, sigs[0], paths, sigs)
        if len(sigs) > 1:  # still check that the models agree on dtypes and ranks
            _resolve_shapes(paths, sigs, {})
    else:
        shapes = _resolve_shapes(paths, sigs, dims or {})
        feeds = _random_feeds(sigs[0], shapes, seed)

    timings = [ModelTiming(p, norm_ops=count_norm_ops(p)) for p in paths]
    first_out = None
    for i, (sess, t) in enumerate(zip(sessions, timings)):
        try:
            out = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"{t.onnx}: ONNX Runtime cannot run these inputs: {_one_line(e)}") from e
        if i == 0:
            first_out = out
        else:
            try:
                t.vs_first = {k: v for k, v in compare_outputs(first_out, out).to_dict().items() if k != "cosine"}
            except ValueError:
                t.vs_first = None
    n = len(sessions)
    for r in range(warmup):
        if progress:
            progress(f"warm-up {r + 1}/{warmup}")
        for sess in sessions:
            sess.run(None, feeds)
    for r in range(runs):
        if progress and (r % 10 == 0 or r == runs - 1):
            progress(f"run {r + 1}/{runs}")
        for k in range(n):
            j = (r + k) % n
            t0 = time.perf_counter()
            sessions[j].run(None, feeds)
            timings[j].times_ms.append((time.perf_counter() - t0) * 1e3)
    base = timings[0].median_ms
    first = np.asarray(timings[0].times_ms)
    timings[0].is_first = True
    for t in timings:
        t.ratio = t.median_ms / base if base > 0 else float("nan")
        # element r of every list was timed in round r, back to back with the others
        t.paired_ratios = (np.asarray(t.times_ms) / first).tolist()
    inputs_desc = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    return BenchReport(timings, inputs_desc, threads, warmup, runs, seed, ort.__version__,
                       threads_default=threads_default, cpus=available_cpus())
