"""One ONNX model against another in ONNX Runtime: the inputs derived from the graph, the reference
outputs of the original, and the judgement of a rewritten copy.

Input sets: the **example** (shaped from the graph's inputs: a symbolic dim is 2 on axis 0, 16
elsewhere, unless ``dims`` names it), two **random** sets like it, each symbolic dim at **two other
sizes** (axis 0: 1 and 8; others: half and twice the example), and the **user's** sets (``--inputs``,
read by ``files.read_tensors``). Integer inputs that index a constant table (token ids into an
embedding ``Gather``) are drawn below the table's size; other integer and bool inputs are ones.
A generated set the *original* model cannot run is dropped with a note; the example and the user's
sets must run.

Judgement, per output tensor: ``max|actual - expected| <= rtol * max|expected| + atol``, with
``(rtol, atol)`` from ``verify.TOLERANCE`` for the output's dtype. The first term is the output's own
scale (relative error elementwise explodes near zero); the second is the dtype's rounding floor, so
that an output whose values are all tiny (a saturated sigmoid map ~1e-4 on random noise) is not
failed for a rounding-sized difference that only *looks* large relative to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import NormSurgeonError, one_line
from ..outputs import ErrorStats
from ..verify import TOLERANCE
from .runtime import InputCheck

__all__ = ["InputSet", "derive_inputs", "user_inputs", "Reference", "tolerance_of"]

_NP = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 5: np.int16, 3: np.int8,
       2: np.uint8, 9: np.bool_, 4: np.uint16, 12: np.uint32, 13: np.uint64}
_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
          np.dtype(np.float64): torch.float64}

BATCH_SIZES = (1, 8)


@dataclass
class InputSet:
    name: str
    feeds: dict[str, np.ndarray]
    user: bool = False

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.feeds.items()}


def _graph_inputs(proto) -> list[tuple[str, Any, list]]:
    """(name, numpy dtype, dims: int | str | None) of the real inputs (not initializers listed as inputs)."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dtype = _NP.get(t.elem_type)
        if dtype is None:
            raise NormSurgeonError(f"input {vi.name!r} has ONNX element type {t.elem_type}, which cannot be "
                                   "generated; pass `inputs_file`")
        dims: list = []
        for k, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or f"{vi.name}:{k}")
        out.append((vi.name, dtype, dims))
    return out


def _index_bounds(proto) -> dict[str, int]:
    """Graph inputs used as Gather indices into a constant: the table's size along the gathered axis."""
    consts = {t.name: list(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = list(a.t.dims)
    bounds: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[0] in consts:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            dims = consts[n.input[0]]
            if dims:
                size = dims[axis % len(dims)]
                bounds[n.input[1]] = min(bounds.get(n.input[1], size), size)
    return bounds


def _random(dtype, shape, rng, bound: int | None) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    if bound is not None and bound > 0:
        return rng.integers(0, bound, size=shape).astype(dtype)
    return np.ones(shape, dtype=dtype)


def dims_from_shapes(proto, shapes: Sequence[str | Sequence[int]]) -> dict[str, int]:
    """Sizes of the graph's symbolic dims read off example shapes (``--input-shape``, one per graph
    input in order), checked against the graph's static dims."""
    from ..inputs import parse_shape

    specs = _graph_inputs(proto)
    if len(shapes) != len(specs):
        raise NormSurgeonError(f"{len(shapes)} input shape(s) given but the graph takes {len(specs)} inputs "
                               f"({', '.join(s[0] for s in specs)})")
    dims: dict[str, int] = {}
    for (name, _, ds), text in zip(specs, shapes):
        shape = parse_shape(text) if isinstance(text, str) else tuple(int(v) for v in text)
        if len(shape) != len(ds) or any(isinstance(d, int) and d != v for d, v in zip(ds, shape)):
            raise NormSurgeonError(f"input shape {list(shape)} does not fit graph input {name!r} {ds}")
        for d, v in zip(ds, shape):
            if isinstance(d, str):
                if dims.setdefault(d, v) != v:
                    raise NormSurgeonError(f"dim {d!r} is given two sizes ({dims[d]} and {v})")
    return dims


def derive_inputs(proto, *, dims: Mapping[str, int] | None = None, seed: int = 0, num_random: int = 2
                  ) -> tuple[list[InputSet], dict[str, list[int]]]:
    """The generated input sets (see the module docstring) and ``{dim name: [example, other sizes]}``."""
    specs = _graph_inputs(proto)
    bounds = _index_bounds(proto)
    dims = dict(dims or {})
    example: dict[str, int] = {}
    first_axis: dict[str, int] = {}
    for _, _, ds in specs:
        for k, d in enumerate(ds):
            if isinstance(d, str):
                first_axis.setdefault(d, k)
                example.setdefault(d, int(dims.get(d, 2 if k == 0 else 16)))
    sizes: dict[str, list[int]] = {}
    for d, e in example.items():
        if first_axis[d] == 0:
            others = [s for s in BATCH_SIZES if s != e] or [e + 1]
        else:
            others = [s for s in (max(1, e // 2), 2 * e) if s != e]
        sizes[d] = [e] + others[:2]

    def make(pick: Mapping[str, int], rng) -> dict[str, np.ndarray]:
        return {name: _random(dtype, [d if isinstance(d, int) else pick[d] for d in ds], rng, bounds.get(name))
                for name, dtype, ds in specs}

    rng = np.random.default_rng(seed)
    sets = [InputSet("example", make(example, rng))]
    for i in range(num_random):
        sets.append(InputSet(f"random {i + 1}", make(example, np.random.default_rng(seed + 1 + i))))
    for k in range(1, 3):
        pick = {d: s[min(k, len(s) - 1)] for d, s in sizes.items()}
        if pick != example:
            label = " ".join(f"{d}={v}" for d, v in pick.items() if v != example[d])
            sets.append(InputSet(label, make(pick, np.random.default_rng(seed + 10 + k))))
    return sets, sizes


def user_inputs(proto, path) -> list[InputSet]:
    """The user's input sets from a tensor file, by graph input name or in order."""
    from ..files import read_tensors

    specs = _graph_inputs(proto)
    names = [s[0] for s in specs]
    obj = read_tensors(path, "`inputs_file`")
    objs = obj if isinstance(obj, list) and obj and all(isinstance(o, Mapping) for o in obj) else [obj]
    out = []
    for i, o in enumerate(objs):
        what = f"`inputs_file` {path}" + (f" (set {i + 1})" if len(objs) > 1 else "")
        if isinstance(o, (torch.Tensor, np.ndarray)):
            o = [o]
        if isinstance(o, (list, tuple)):
            if len(o) != len(names):
                raise NormSurgeonError(f"{what}: holds {len(o)} tensors but the graph takes {len(names)} "
                                       f"({', '.join(names)}); store them by name")
            o = dict(zip(names, o))
        if not isinstance(o, Mapping) or sorted(o) != sorted(names):
            got = sorted(o) if isinstance(o, Mapping) else type(o).__name__
            raise NormSurgeonError(f"{what}: input names {got} do not match the graph's {names}")
        feeds = {}
        for name, dtype, ds in specs:
            v = o[name]
            a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if np.issubdtype(a.dtype, np.floating) != np.issubdtype(dtype, np.floating):
                raise NormSurgeonError(f"{what}: input {name!r} is {a.dtype} but the graph takes {np.dtype(dtype)}")
            if a.ndim != len(ds) or any(isinstance(d, int) and d != s for d, s in zip(ds, a.shape)):
                raise NormSurgeonError(f"{what}: input {name!r} has shape {list(a.shape)} but the graph takes "
                                       f"{ds}")
            feeds[name] = a.astype(dtype)
        out.append(InputSet(f"user inputs {i + 1}", feeds, user=True))
    return out


def session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def tolerance_of(outputs: Sequence[np.ndarray], rtol: float | None = None, atol: float | None = None
                 ) -> tuple[float, float]:
    """(rtol, atol) for these outputs: the table's entry for the least precise float dtype among them;
    a caller's ``rtol``/``atol`` replace it, raised to the table's for float16."""
    dtypes = {_TORCH.get(np.dtype(o.dtype)) for o in outputs} - {None} or {torch.float32}
    worst = max((TOLERANCE[d] for d in dtypes), key=lambda t: t[0])
    low = torch.float16 in dtypes
    r = worst[0] if rtol is None else max(rtol, worst[0]) if low else rtol
    a = worst[1] if atol is None else max(atol, worst[1]) if low else atol
    return r, a


@dataclass
class Reference:
    """The original model's outputs on every input set it runs."""

    sets: list[InputSet]
    outputs: list[list[np.ndarray]]
    rtol: float
    atol: float
    notes: list[str] = field(default_factory=list)

    @classmethod
    def record(cls, model_bytes: bytes, sets: list[InputSet], rtol: float | None = None,
               atol: float | None = None) -> "Reference":
        try:
            sess = session(model_bytes)
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"ONNX Runtime cannot load the model: {one_line(e)}") from e
        kept, outs, notes = [], [], []
        for k, s in enumerate(sets):
            try:
                outs.append(sess.run(None, s.feeds))
                kept.append(s)
            except Exception as e:  # noqa: BLE001
                if s.user or (k == 0 and not any(x.user for x in sets)):
                    what = "its example inputs" if k == 0 else s.name
                    raise NormSurgeonError(f"the original model fails in ONNX Runtime on {what} "
                                           f"({one_line(e, limit=200)}); pass inputs it accepts "
                                           "(inputs_file=, or input_shapes= for its dynamic dims)") from e
                notes.append(f"input set {s.name!r} dropped: the original model rejects it ({one_line(e, limit=120)})")
        if not kept:
            raise NormSurgeonError("the original model runs on none of the input sets")
        r, a = tolerance_of([o for o in outs[0] if np.issubdtype(o.dtype, np.floating)], rtol, atol)
        return cls(kept, outs, r, a, notes)

    def compare(self, model_bytes: bytes, *, stop_early: bool = False) -> tuple[list[InputCheck], str | None]:
        """Run the rewritten model on every set; (checks, why it could not run at all)."""
        try:
            sess = session(model_bytes)
        except Exception as e:  # noqa: BLE001
            return [], f"ONNX Runtime cannot load the rewritten model: {one_line(e, limit=200)}"
        checks = []
        for s, ref in zip(self.sets, self.outputs):
            c = InputCheck(s.name, s.shapes())
            checks.append(c)
            try:
                got = sess.run(None, s.feeds)
            except Exception as e:  # noqa: BLE001
                c.error = f"ONNX Runtime failed: {one_line(e, limit=200)}"
                if stop_early:
                    break
                continue
            try:
                c.stats, c.passed = self.judge(ref, got)
            except Exception as e:  # noqa: BLE001 - outputs that are not tensors (sequences, maps)
                c.error = f"cannot compare the outputs: {one_line(e, limit=200)}"
            if stop_early and not c.passed:
                break
        return checks, None

    def judge(self, expected: list[np.ndarray], actual: list[np.ndarray]) -> tuple[ErrorStats, bool]:
        stats, ok = ErrorStats(), True
        for e, a in zip(expected, actual):
            if e.shape != a.shape:
                return ErrorStats(math.inf, math.inf, -1.0), False
            if not np.issubdtype(e.dtype, np.floating):
                bad = float(np.any(e != a))
                stats, ok = stats.merge(ErrorStats(bad, bad, 1.0 - bad)), ok and not bad
                continue
            e64, a64 = e.astype(np.float64), a.astype(np.float64)
            if e64.size == 0:
                continue
            if not np.array_equal(np.isfinite(e64), np.isfinite(a64)) or \
                    not np.array_equal(e64[~np.isfinite(e64)], a64[~np.isfinite(a64)]):
                return ErrorStats(math.inf, math.inf, -1.0), False
            fin = np.isfinite(e64)
            diff = float(np.abs(e64 - a64)[fin].max(initial=0.0))
            scale = float(np.abs(e64)[fin].max(initial=0.0))
            rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            stats = stats.merge(ErrorStats(diff, rel, 1.0))
            ok = ok and diff <= self.rtol * scale + self.atol
        return stats, ok
