"""Export a model to ONNX, prove the file in ONNX Runtime, and count the normalization ops it holds.

- ``export_onnx`` exports with the dynamo exporter (``torch.onnx.export(dynamo=True)``) and falls back to
  the TorchScript exporter when that fails, saying why. The file is checked with ``onnx.checker``,
  verified in ONNX Runtime against the eager model and only then moved into place.
- ``verify_onnx`` runs an ONNX file in ONNX Runtime (CPU, all graph optimizations) on the example inputs,
  random inputs like them, inputs at a second batch/sequence size when those axes are dynamic, and the
  user's own inputs, and compares with the PyTorch eval outputs (``outputs.compare_outputs``).
- ``count_norm_ops`` / ``optimized_norm_ops`` count normalization ops (fused ones and decomposed
  mean/variance patterns) in a graph as exported and after ONNX Runtime's optimizations.

The library never prints; progress goes through an optional ``progress(message)`` callback.
"""

from __future__ import annotations

import contextlib
import inspect
import io as _io
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .errors import NormSurgeonError
from .inputs import CallArgs, as_call_args
from .io import check_output_path
from .graph import eval_modes, restore_modes
from .outputs import ErrorStats, compare_outputs, flatten_outputs
from .report import Table, fmt_float

__all__ = [
    "export_onnx", "verify_onnx", "count_norm_ops", "optimized_norm_ops", "load_inputs_file",
    "ExportReport", "VerifyReport", "InputCheck", "NORM_OP_TYPES", "make_session",
]

Progress = Callable[[str], None] | None

#: Weights above this many bytes are saved as external data (protobuf cannot hold more than 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2 * 1024 ** 3 - 64 * 1024 ** 2

#: Fused normalization op types, in ONNX and in ONNX Runtime's contrib domains.
NORM_OP_TYPES = (
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "GroupNorm", "SkipGroupNorm",
    "MeanVarianceNormalization", "BatchNormInternal",
)

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

def _num(x: float | None) -> float | None:
    """JSON-safe float: non-finite values become null (strict JSON has no Infinity/NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


@dataclass
class InputCheck:
    """One verification run: one set of inputs through ONNX Runtime and PyTorch."""

    name: str
    shapes: dict[str, list[int]]
    stats: ErrorStats | None = None
    passed: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "shapes": self.shapes, "passed": self.passed}
        if self.stats is not None:
            d.update({k: _num(v) for k, v in self.stats.to_dict().items()})
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class VerifyReport:
    """ONNX Runtime vs PyTorch on every input set; ``passed`` only if every set passed."""

    rtol: float
    atol: float
    checks: list[InputCheck] = field(default_factory=list)
    outputs_matched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def stats(self) -> ErrorStats:
        s = ErrorStats()
        for c in self.checks:
            s = s.merge(c.stats if c.stats is not None else ErrorStats(math.inf, math.inf, -1.0))
        return s

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs_error(self) -> float:
        return self.stats.max_abs_error

    @property
    def max_rel_error(self) -> float:
        return self.stats.max_rel_error

    @property
    def cosine(self) -> float:
        return self.stats.min_cosine

    def to_json(self) -> dict:
        s = self.stats
        return {"max_abs_error": _num(s.max_abs_error), "max_rel_error": _num(s.max_rel_error),
                "cosine": _num(s.min_cosine), "passed": self.passed, "inputs_checked": len(self.checks),
                "rtol": self.rtol, "atol": self.atol, "outputs": self.outputs_matched,
                "checks": [c.to_json() for c in self.checks], "notes": self.notes}

    def table(self) -> Table:
        t = Table("Verification in ONNX Runtime (CPU, ORT_ENABLE_ALL) vs PyTorch eval",
                  ["inputs", "shapes", "max abs", "max rel", "cosine", "result"])
        for c in self.checks:
            shapes = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in c.shapes.items())
            if c.stats is None:
                t.rows.append([c.name, shapes, "-", "-", "-", f"FAIL: {c.error}"])
                continue
            t.rows.append([c.name, shapes, fmt_float(c.stats.max_abs_error), fmt_float(c.stats.max_rel_error),
                           f"{c.stats.min_cosine:.6f}", "pass" if c.passed else "FAIL"])
        s = self.stats
        verdict = "PASSED" if self.passed else "FAILED"
        t.notes.append(f"{verdict}: max abs {fmt_float(s.max_abs_error)}, max rel {fmt_float(s.max_rel_error)}, "
                       f"min cosine {s.min_cosine:.6f} over {len(self.checks)} input sets "
                       f"(pass: max abs <= atol={self.atol:g} or max rel <= rtol={self.rtol:g}; "
                       "max rel = max abs error / max |expected|, per output tensor)")
        t.notes.extend(self.notes)
        return t


@dataclass
class ExportReport:
    onnx: str
    exporter: str  # dynamo | torchscript
    opset: int | None = None
    fallback_reason: str | None = None
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    external_data: str | None = None
    weights_bytes: int = 0
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    verify: VerifyReport | None = None
    norm_ops: dict[str, int] = field(default_factory=dict)
    norm_ops_optimized: dict[str, int] = field(default_factory=dict)
    #: counts of the model before folding (set by ``normsurgeon export --fold``)
    norm_ops_unfolded: dict[str, int] | None = None
    norm_ops_unfolded_optimized: dict[str, int] | None = None
    export_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {"onnx": self.onnx, "exporter": self.exporter, "fallback_reason": self.fallback_reason,
             "opset": self.opset,
             "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
             "external_data": self.external_data, "inputs": self.inputs, "outputs": self.outputs,
             "verify": self.verify.to_json() if self.verify is not None else None,
             "norm_ops": self.norm_ops, "norm_ops_optimized": self.norm_ops_optimized}
        if self.norm_ops_unfolded is not None:
            d["norm_ops_unfolded"] = self.norm_ops_unfolded
            d["norm_ops_unfolded_optimized"] = self.norm_ops_unfolded_optimized or {}
        d["export_seconds"] = round(self.export_seconds, 3)
        d["notes"] = self.notes
        return d

    def tables(self) -> list[Table]:
        info = Table("ONNX export", ["item", "value"])
        info.rows.append(["file", self.onnx + (f" (+ external data {self.external_data})" if self.external_data else "")])
        exporter = self.exporter + (f" (fallback: dynamo failed: {self.fallback_reason})" if self.fallback_reason else "")
        info.rows.append(["exporter", exporter])
        info.rows.append(["opset", self.opset])
        for spec in self.inputs:
            info.rows.append([f"input {spec['name']}", f"{spec['dtype']} [{', '.join(map(str, spec['shape']))}]"])
        for spec in self.outputs:
            info.rows.append([f"output {spec['name']}", f"{spec['dtype']} [{', '.join(map(str, spec['shape']))}]"])
        info.rows.append(["export time", f"{self.export_seconds:.1f} s"])
        info.notes.extend(self.notes)
        tables = [info]
        if self.verify is not None:
            tables.append(self.verify.table())
        tables.append(self.norm_table())
        return tables

    def norm_table(self) -> Table:
        ops = sorted(set(self.norm_ops) | set(self.norm_ops_optimized) | set(self.norm_ops_unfolded or {})
                     | set(self.norm_ops_unfolded_optimized or {}))
        if self.norm_ops_unfolded is not None:
            t = Table("Normalization ops (before fold → after fold)",
                      ["op", "unfolded", "folded", "removed", "unfolded, ORT-optimized", "folded, ORT-optimized"])
            for op in ops:
                before, after = self.norm_ops_unfolded.get(op, 0), self.norm_ops.get(op, 0)
                t.rows.append([op, before, after, before - after,
                               (self.norm_ops_unfolded_optimized or {}).get(op, 0),
                               self.norm_ops_optimized.get(op, 0)])
        else:
            t = Table("Normalization ops", ["op", "exported", "after ORT optimization"])
            for op in ops:
                t.rows.append([op, self.norm_ops.get(op, 0), self.norm_ops_optimized.get(op, 0)])
        t.notes.append("ORT optimization = ONNX Runtime CPU, ORT_ENABLE_ALL; it may fuse ops into contrib ops "
                       "(SkipLayerNormalization...); decomposed_* = mean/variance patterns built from primitive ops.")
        return t


# --------------------------------------------------------------------------------------------------
# Counting normalization ops
# --------------------------------------------------------------------------------------------------

def _load_structure(model_or_path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise NormSurgeonError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: not a readable ONNX model: {_one_line(e)}") from e


def count_norm_ops(onnx_path_or_model) -> dict[str, int]:
    """Normalization ops in an ONNX model (path or ``onnx.ModelProto``): ``{op_type: count}``.

    Fused ops (``NORM_OP_TYPES``, any domain) are counted by type; normalizations written out in primitive
    ops are counted as ``decomposed_layernorm`` (ReduceMean → Sub → Pow/Mul → ReduceMean → Add → Sqrt) and
    ``decomposed_rmsnorm`` (Pow/Mul → ReduceMean → Add → Sqrt, no mean subtraction). Subgraphs (If/Loop)
    and local functions are counted where they are called. Only non-zero counts are returned.
    """
    model = _load_structure(onnx_path_or_model)
    functions = {(f.domain, f.name): f for f in model.functions}
    counts: Counter = Counter()
    _count_graph(model.graph.node, list(model.graph.initializer), functions, counts, depth=0)
    return dict(sorted(counts.items()))


def _count_graph(nodes, initializers, functions, counts: Counter, depth: int) -> None:
    if depth > 20:
        return
    for node in nodes:
        if node.op_type in NORM_OP_TYPES:
            counts[node.op_type] += 1
        fn = functions.get((node.domain, node.op_type))
        if fn is not None:
            _count_graph(fn.node, [], functions, counts, depth + 1)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                _count_graph(attr.g.node, list(attr.g.initializer), functions, counts, depth + 1)
            for g in attr.graphs:
                _count_graph(g.node, list(g.initializer), functions, counts, depth + 1)
    for kind, n in _decomposed_norms(nodes, initializers).items():
        counts[kind] += n


def _decomposed_norms(nodes, initializers) -> Counter:
    """Find Sqrt(ReduceMean(square(y)) + eps) and classify by whether y = x - ReduceMean(x)."""
    from onnx import numpy_helper

    producer = {out: n for n in nodes for out in n.output if out}
    consts: dict[str, np.ndarray] = {}
    for init in initializers:
        with contextlib.suppress(Exception):
            consts[init.name] = numpy_helper.to_array(init)
    for n in nodes:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                with contextlib.suppress(Exception):
                    if a.name == "value":
                        consts[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.name == "value_float":
                        consts[n.output[0]] = np.array(a.f)

    def const(name: str) -> np.ndarray | None:
        seen = 0
        while name not in consts and seen < 4:
            p = producer.get(name)
            if p is None or p.op_type not in ("Cast", "Identity") or not p.input:
                return None
            name, seen = p.input[0], seen + 1
        return consts.get(name)

    def base(name: str) -> str:
        """``name`` with Cast/Identity producers looked through."""
        for _ in range(6):
            p = producer.get(name)
            if p is None or p.op_type not in ("Cast", "Identity"):
                return name
            name = p.input[0]
        return name

    def src(name: str):
        """The node producing ``name``, looking through Cast/Identity."""
        return producer.get(base(name))

    def is_const_value(name: str, value: float) -> bool:
        c = const(name)
        return c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - value) < 1e-6

    found: Counter = Counter()
    for n in nodes:
        if n.op_type == "Sqrt":
            inner = n.input[0]
        elif n.op_type == "Pow" and len(n.input) == 2 and is_const_value(n.input[1], 0.5):
            inner = n.input[0]
        else:
            continue
        add = src(inner)
        var_name = inner
        if add is not None and add.op_type == "Add" and len(add.input) == 2:
            non_const = [i for i in add.input if const(i) is None]
            if len(non_const) != 1:
                continue
            var_name = non_const[0]
        var = src(var_name)
        if var is None or var.op_type != "ReduceMean":
            continue
        sq = src(var.input[0])
        if sq is None:
            continue
        if sq.op_type == "Pow" and len(sq.input) == 2 and is_const_value(sq.input[1], 2.0):
            centered = sq.input[0]
        elif sq.op_type == "Mul" and len(sq.input) == 2 and base(sq.input[0]) == base(sq.input[1]):
            centered = sq.input[0]
        else:
            continue
        sub = src(centered)
        if sub is not None and sub.op_type == "Sub" and len(sub.input) == 2:
            mean = src(sub.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and base(mean.input[0]) == base(sub.input[0]):
                found["decomposed_layernorm"] += 1
                continue
        found["decomposed_rmsnorm"] += 1
    return found


def optimized_norm_ops(path: str | os.PathLike) -> dict[str, int]:
    """``count_norm_ops`` of the graph ONNX Runtime actually runs (CPU, ORT_ENABLE_ALL)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="normsurgeon-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(path, optimized_path=opt)
        return count_norm_ops(opt)


# --------------------------------------------------------------------------------------------------
# ONNX Runtime sessions and feeding
# --------------------------------------------------------------------------------------------------

def make_session(path: str | os.PathLike, *, optimized_path: str | os.PathLike | None = None,
                 threads: int | None = None, sequential: bool = True):
    """A CPU ONNX Runtime session with all graph optimizations; optionally save the optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # ORT's warning about saving NCHWc-optimized models is expected here
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if _has_external_data(path):
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        Path(optimized_path).name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: ONNX Runtime cannot load it: {_one_line(e)}") from e


def _has_external_data(path) -> bool:
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data

        m = onnx.load(str(path), load_external_data=False)
        return any(uses_external_data(t) for t in m.graph.initializer)
    except Exception:  # noqa: BLE001
        return False


def session_signature(sess) -> list[dict]:
    """``[{"name", "dtype", "shape"}]`` of a session's inputs; dynamic dims are names (str) or None."""
    return [{"name": i.name, "dtype": i.type, "shape": list(i.shape)} for i in sess.get_inputs()]


def _named_tensors(ci: CallArgs) -> dict[str, torch.Tensor]:
    values = [*ci.args, *ci.kwargs.values()]
    return {n: v for n, v in zip(ci.names(), values) if isinstance(v, torch.Tensor)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        raise NormSurgeonError("bfloat16 inputs cannot be fed to ONNX Runtime from numpy; export in float32")
    return t.numpy()


def _feeds(sess, ci: CallArgs, what: str) -> dict[str, np.ndarray]:
    """Map CallArgs to the session's inputs by name, checking dtype and static dims."""
    named = _named_tensors(ci)
    feeds = {}
    for spec in sess.get_inputs():
        if spec.name not in named:
            raise NormSurgeonError(
                f"the ONNX graph takes inputs {[i.name for i in sess.get_inputs()]} but {what} has "
                f"{list(named)}: the ONNX file does not belong to this model or these inputs")
        arr = _to_numpy(named[spec.name])
        want = _ORT_TYPES.get(spec.type)
        if want is not None and arr.dtype != want:
            if np.issubdtype(arr.dtype, np.floating) == np.issubdtype(want, np.floating):
                arr = arr.astype(want)
            else:
                raise NormSurgeonError(f"{what}: input {spec.name!r} is {arr.dtype} but the ONNX graph wants "
                                       f"{spec.type}")
        if len(arr.shape) != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)):
            raise NormSurgeonError(f"{what}: input {spec.name!r} has shape {list(arr.shape)} but the ONNX graph "
                                   f"takes {spec.shape} (named dims are dynamic)")
        feeds[spec.name] = arr
    return feeds


def _match_outputs(expected: list[torch.Tensor], actual: list[np.ndarray], names: list[str]
                   ) -> tuple[list[torch.Tensor], list[np.ndarray], list[str]]:
    """Pair eager outputs with ONNX outputs in order; exporters drop None outputs, so allow a subsequence."""
    exp_shapes = [tuple(t.shape) for t in expected]
    act_shapes = [tuple(a.shape) for a in actual]
    if exp_shapes == act_shapes:
        return expected, actual, names
    if len(actual) < len(expected):
        picked, j = [], 0
        for i, s in enumerate(exp_shapes):
            if j < len(actual) and s == act_shapes[j]:
                picked.append(i)
                j += 1
        if j == len(actual):
            return [expected[i] for i in picked], actual, names
    raise NormSurgeonError(
        f"cannot match the ONNX outputs to the model's: ONNX gives {len(actual)} "
        f"({', '.join(f'{n}{list(s)}' for n, s in zip(names, act_shapes))}), PyTorch gives {len(expected)} "
        f"({', '.join(str(list(s)) for s in exp_shapes)}); the ONNX file may not belong to this model")


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------

def _seq_input_names(ci: CallArgs) -> list[str]:
    """Inputs with a sequence axis at dim 1: integer token tensors and audio ``input_values``."""
    out = []
    for name, t in _named_tensors(ci).items():
        if t.dim() >= 2 and (not t.is_floating_point() or name == "input_values"):
            out.append(name)
    return out


def _shapes(ci: CallArgs) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in _named_tensors(ci).items()}


def verify_onnx(model: torch.nn.Module, example_inputs: Any, onnx_path: str | os.PathLike, *,
                rtol: float = 1e-4, atol: float = 1e-4, extra_inputs: Iterable | None = None,
                num_random: int = 3, seed: int = 0, progress: Progress = None) -> VerifyReport:
    """Run ``onnx_path`` in ONNX Runtime and compare with ``model`` (eval) on several input sets.

    Input sets: the example inputs, ``num_random`` random ones like them, one at a second batch size if the
    graph's batch axis is dynamic, one at a second sequence length if a token/audio input's dim 1 is
    dynamic, and every CallArgs in ``extra_inputs``. Inputs that do not fit the graph raise
    NormSurgeonError; numerical disagreement gives ``passed=False``.
    """
    sess = make_session(onnx_path)
    return _verify(sess, model, as_call_args(example_inputs), rtol=rtol, atol=atol, extra_inputs=extra_inputs,
                   num_random=num_random, seed=seed, progress=progress)


def _input_sets(sess, ci: CallArgs, num_random: int, seed: int, extra: Sequence[CallArgs]) -> list[tuple[str, CallArgs]]:
    gen = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, CallArgs]] = [("example", ci)]
    sets += [(f"random {i + 1}", ci.like(gen)) for i in range(num_random)]
    specs = {s.name: list(s.shape) for s in sess.get_inputs()}
    named = _named_tensors(ci)
    graph_named = {n: t for n, t in named.items() if n in specs}
    dyn_batch = bool(graph_named) and all(
        t.dim() >= 1 and not isinstance(specs[n][0], int) for n, t in graph_named.items())
    seq_dims = {n: 1 for n in _seq_input_names(ci) if n in specs and len(specs[n]) >= 2
                and not isinstance(specs[n][1], int)}
    batch = next(iter(graph_named.values())).shape[0] if dyn_batch else None
    alt_batch = batch + 1 if batch is not None else None
    if dyn_batch:
        sets.append((f"batch={alt_batch}", ci.like(gen, batch=alt_batch)))
    if seq_dims:
        seq = named[next(iter(seq_dims))].shape[1]
        alt_seq = seq - 3 if seq > 5 else seq + 2
        label = f"seq={alt_seq}" + (f" batch={alt_batch}" if dyn_batch else "")
        sets.append((label, ci.like(gen, batch=alt_batch, seq=alt_seq, seq_dims=seq_dims)))
    for i, e in enumerate(extra):
        sets.append((f"user inputs {i + 1}", e))
    return sets


@torch.no_grad()
def _verify(sess, model: torch.nn.Module, ci: CallArgs, *, rtol: float, atol: float, extra_inputs=None,
            num_random: int = 3, seed: int = 0, progress: Progress = None) -> VerifyReport:
    extra = [as_call_args(e) for e in (extra_inputs or [])]
    report = VerifyReport(rtol=rtol, atol=atol)
    out_names = [o.name for o in sess.get_outputs()]
    modes = eval_modes(model)
    try:
        sets = _input_sets(sess, ci, num_random, seed, extra)
        for k, (label, args) in enumerate(sets):
            _report_progress(progress, f"verifying in ONNX Runtime: {label} ({k + 1}/{len(sets)})")
            feeds = _feeds(sess, args, "the example inputs" if k == 0 else f"input set {label!r}")
            check = InputCheck(label, _shapes(args))
            report.checks.append(check)
            try:
                actual = sess.run(None, feeds)
            except Exception as e:  # noqa: BLE001 - a graph that cannot run these inputs fails verification
                check.error = f"ONNX Runtime failed: {_one_line(e)}"
                if label.startswith(("batch=", "seq=")):
                    check.error += " (the axis may have been specialized to the example size during export)"
                continue
            expected = flatten_outputs(args.call(model))
            exp, act, names = _match_outputs(expected, actual, out_names)
            if not report.outputs_matched:
                report.outputs_matched = list(names)
                if len(exp) < len(expected):
                    report.notes.append(f"{len(expected) - len(exp)} of the model's {len(expected)} output tensors "
                                        "are not in the ONNX graph; compared the rest by order and shape")
            check.stats = compare_outputs(exp, act)
            check.passed = check.stats.within(rtol, atol)
    finally:
        restore_modes(modes)
    return report


# --------------------------------------------------------------------------------------------------
# User inputs from a file
# --------------------------------------------------------------------------------------------------

def load_inputs_file(path: str | os.PathLike, example_inputs: Any) -> list[CallArgs]:
    """Read input sets from ``.pt``/``.npy``/``.npz``/``.safetensors``, keyed by input name or positional.

    Names are those of ``CallArgs.names()`` (``input_0``... for positional arguments, keyword names
    otherwise). A ``.pt`` file may also hold a list of such dicts (several input sets). Floats are cast to
    the example's dtype; ranks and dtype kinds must match the example inputs.
    """
    path = Path(path)
    ci = as_call_args(example_inputs)
    if not path.is_file():
        raise NormSurgeonError(f"--inputs {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(str(path), allow_pickle=False))
        elif suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as z:
                keys = list(z.keys())
                if keys and all(re.fullmatch(r"arr_\d+", k) for k in keys):
                    obj = [torch.from_numpy(z[f"arr_{i}"]) for i in range(len(keys))]
                else:
                    obj = {k: torch.from_numpy(z[k]) for k in keys}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            raise NormSurgeonError(f"--inputs {path}: unknown format {suffix or '(no suffix)'}; "
                                   "use .pt, .npy, .npz or .safetensors")
    except NormSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"--inputs {path}: cannot read: {_one_line(e)}") from e
    if isinstance(obj, list) and obj and all(isinstance(o, Mapping) for o in obj):
        return [_fit_inputs(o, ci, f"--inputs {path} (set {i + 1})") for i, o in enumerate(obj)]
    return [_fit_inputs(obj, ci, f"--inputs {path}")]


def _fit_inputs(obj: Any, ci: CallArgs, what: str) -> CallArgs:
    named = _named_tensors(ci)
    names = list(named)
    if isinstance(obj, torch.Tensor):
        obj = [obj]
    if isinstance(obj, (list, tuple)):
        if len(obj) != len(names):
            raise NormSurgeonError(f"{what}: holds {len(obj)} tensors but the model takes {len(names)} "
                                   f"({', '.join(names)}); store them by name")
        obj = dict(zip(names, obj))
    if not isinstance(obj, Mapping):
        raise NormSurgeonError(f"{what}: expected tensors by input name, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in named]
    missing = [n for n in names if n not in obj]
    if unknown or missing:
        raise NormSurgeonError(f"{what}: input names {sorted(obj)} do not match the model's {names}"
                               + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
    fitted = {}
    for n, ex in named.items():
        t = obj[n]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        if t.is_floating_point() != ex.is_floating_point():
            raise NormSurgeonError(f"{what}: input {n!r} is {t.dtype} but the model takes {ex.dtype}")
        if t.dim() != ex.dim():
            raise NormSurgeonError(f"{what}: input {n!r} has shape {list(t.shape)}; the model takes "
                                   f"{ex.dim()}-d inputs like {list(ex.shape)}")
        fitted[n] = t.to(ex.dtype)
    values = [*ci.args, *ci.kwargs.values()]
    out = [fitted.get(n, v) for n, v in zip(ci.names(), values)]
    k = len(ci.args)
    return CallArgs(tuple(out[:k]), dict(zip(list(ci.kwargs), out[k:])))


def _check_fits(extra: Sequence[CallArgs], ci: CallArgs, dyn_batch: bool, seq_names: Sequence[str]) -> None:
    """User inputs may differ from the example only on the axes that are exported dynamic."""
    ex = _named_tensors(ci)
    for i, e in enumerate(extra):
        for n, t in _named_tensors(e).items():
            ref = ex.get(n)
            if ref is None:
                raise NormSurgeonError(f"user input set {i + 1}: unknown input {n!r}; the model takes {list(ex)}")
            free = ({0} if dyn_batch else set()) | ({1} if n in seq_names else set())
            if t.dim() != ref.dim() or any(a != b for d, (a, b) in enumerate(zip(t.shape, ref.shape)) if d not in free):
                hint = "" if free else " (export with --dynamic-batch/--dynamic-seq to allow other sizes)"
                raise NormSurgeonError(f"user input set {i + 1}: input {n!r} has shape {list(t.shape)} but the "
                                       f"export is for {list(ref.shape)}{hint}")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def _report_progress(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def _one_line(e: BaseException | str) -> str:
    text = _strip_ansi(str(e)).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _exc_summary(e: BaseException) -> str:
    """The cause of an exporter exception in one line (the dynamo exporter wraps it in a long text)."""
    text = _strip_ansi(str(e))
    m = re.search(r"## Exception summary\s*\n+(.+?)(?:\n\s*\n|$)", text, re.S)
    if m:
        first = m.group(1).strip().splitlines()[0]
        first = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", first)
        return first[:300]
    return f"{type(e).__name__}: {_one_line(e)}"


def _failed_op(text: str) -> str | None:
    text = _strip_ansi(text)
    for pat in (r"No ONNX function found for <OpOverload\(op='([\w.]+)'",
                r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]",
                r"operator '([\w:.]+)'", r"\b((?:aten|prims)(?:::|\.)\w+)"):
        m = re.search(pat, text)
        if m:
            return m.group(1).replace("::", ".")
    return None


def _failed_module(text: str, op: str | None) -> str | None:
    """The module path of the failing node in a TorchScript IR dump (``scope: A::/B::attr/C::attr``)."""
    if not op:
        return None
    needle = op.replace(".", "::", 1)
    for line in _strip_ansi(text).splitlines():
        if needle + "(" in line and "scope:" in line:
            scope = line.split("scope:", 1)[1].split("#")[0].strip()
            parts = [p for p in scope.split("/") if p]
            if parts and parts[0].startswith(f"{__name__}._Positional::"):
                parts = parts[1:]  # our adapter around the model
            if not parts:
                return None
            cls = parts[-1].split("::")[0].rsplit(".", 1)[-1]
            attr = parts[-1].split("::", 1)[1] if "::" in parts[-1] and len(parts) > 1 else ""
            return f"{attr or '<top>'} ({cls})"
    return None


def _explain_failure(errors: dict[str, BaseException], opset: int | None, logs: dict[str, str]) -> str:
    # the TorchScript exporter prints its IR dump (with module scopes) instead of raising it
    texts = {k: str(e) + "\n" + logs.get(k, "") for k, e in errors.items()}
    ops = list(dict.fromkeys(o for o in (_failed_op(t) for t in texts.values()) if o))
    op = " / ".join(ops) if ops else None
    module = next((m for m in (_failed_module(t, _failed_op(t)) for t in texts.values()) if m), None)
    parts = []
    if op:
        parts.append(f"operator {op}" + (f" in module {module}" if module else "") + " has no ONNX conversion"
                     + (f" at opset {opset}" if opset else ""))
    for name, e in errors.items():
        parts.append(f"{name}: {_exc_summary(e)}")
    tried = " and ".join(errors)
    tips = []
    tips.append("try another --opset (e.g. 17 or 18)" if opset is None else f"try another --opset than {opset}")
    if len(errors) == 1:
        other = "torchscript" if "dynamo" in errors else "dynamo"
        tips.append(f"--exporter {other}")
    tips.append("replace or wrap the failing op in the model")
    tips.append("rerun with --debug for the traceback")
    return f"ONNX export failed with {tried}: " + "; ".join(parts) + ". To fix: " + ", ".join(tips)


class _Captured:
    """What an exporter printed while quieted (Python and native), for error messages."""

    def __init__(self) -> None:
        self.text = ""


@contextlib.contextmanager
def _quiet(caught: list[str]):
    """Keep exporter chatter (prints, logs, warnings, native IR dumps) off stdout and stderr.

    Warnings are appended to ``caught``; everything printed is kept in the yielded ``_Captured``.
    """
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                                               "torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = _io.StringIO()
    captured = _Captured()
    try:
        with warnings.catch_warnings(record=True) as ws, contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf), _native_stdout_to(captured):
            warnings.simplefilter("always")
            yield captured
    finally:
        captured.text = buf.getvalue() + captured.text
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        for w in locals().get("ws") or []:
            text = _one_line(str(w.message))
            msg = f"{w.category.__name__}: {text if len(text) < 160 else text[:157] + '...'}"
            if msg not in caught and not issubclass(w.category, (DeprecationWarning, FutureWarning)):
                caught.append(msg)


@contextlib.contextmanager
def _native_stdout_to(captured: _Captured):
    """Native code (the TorchScript exporter's IR dumps) writes to fd 1: send it to a file meanwhile."""
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as f:
        try:
            with contextlib.suppress(Exception):
                sys.__stdout__.flush()
            os.dup2(f.fileno(), 1)
            yield
        finally:
            with contextlib.suppress(Exception):
                import ctypes
                ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            f.seek(0)
            captured.text += f.read(1 << 20).decode("utf-8", "replace")


class _Positional(torch.nn.Module):
    """Calls ``model`` from positional tensors in ``CallArgs.names()`` order, returning flat outputs.

    The TorchScript exporter binds keyword arguments positionally (which breaks on transformers' forward
    wrappers) and cannot name dict outputs; this adapter gives it a plain signature.
    """

    def __init__(self, model: torch.nn.Module, ci: CallArgs):
        super().__init__()
        self.model = model
        self._template = [*ci.args, *ci.kwargs.values()]
        self._is_tensor = [isinstance(v, torch.Tensor) for v in self._template]
        self._n_args = len(ci.args)
        self._keys = list(ci.kwargs)

    def forward(self, *tensors):
        it = iter(tensors)
        values = [next(it) if is_t else v for v, is_t in zip(self._template, self._is_tensor)]
        args = values[: self._n_args]
        kwargs = dict(zip(self._keys, values[self._n_args:]))
        return tuple(flatten_outputs(self.model(*args, **kwargs)))


def _signature_order(model: torch.nn.Module, ci: CallArgs) -> CallArgs:
    """Keyword arguments in the order of ``forward``'s signature (exporters order graph inputs that way)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ci
    rank = {p: i for i, p in enumerate(params)}
    keys = sorted(ci.kwargs, key=lambda k: rank.get(k, len(rank)))
    return CallArgs(ci.args, {k: ci.kwargs[k] for k in keys})


def _dynamic_shapes(model: torch.nn.Module, ci: CallArgs, axes: dict[str, dict[int, str]]):
    """torch.export ``dynamic_shapes`` keyed by forward's parameter names."""
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def spec(name: str):
        a = axes.get(name)
        if not a:
            return None
        return {ax: dims.setdefault(dn, Dim(dn)) for ax, dn in a.items()}

    sig = inspect.signature(model.forward)
    bound = sig.bind(*ci.args, **ci.kwargs)
    positional_names = {id(v): n for n, v in zip(ci.names(), [*ci.args, *ci.kwargs.values()])}
    out: dict[str, Any] = {}
    for pname, value in bound.arguments.items():
        kind = sig.parameters[pname].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            out[pname] = tuple(spec(positional_names.get(id(v), "")) if isinstance(v, torch.Tensor) else None
                               for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            out[pname] = {k: spec(k) if isinstance(v, torch.Tensor) else None for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            out[pname] = spec(positional_names.get(id(value), pname))
        else:
            out[pname] = None
    return out


def _output_names(out: Any, prefix: str = "") -> list[str]:
    """Names for the tensors of ``flatten_outputs(out)``, in the same order: dict keys where there are any."""
    if isinstance(out, torch.Tensor):
        return [prefix or "output"]
    if isinstance(out, dict):
        return [n for k, v in out.items() for n in _output_names(v, f"{prefix}_{k}" if prefix else str(k))]
    if isinstance(out, (tuple, list)):
        return [n for i, v in enumerate(out) for n in _output_names(v, f"{prefix or 'output'}_{i}")]
    if hasattr(out, "to_tuple"):
        return _output_names(out.to_tuple(), prefix)
    return []


def _weights_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _export_dynamo(model, ci: CallArgs, dest: Path, *, opset, input_names, output_names, dynamic_axes,
                   big: bool) -> None:
    kwargs = {}
    if dynamic_axes:
        kwargs["dynamic_shapes"] = _dynamic_shapes(model, ci, dynamic_axes)
    program = torch.onnx.export(model, ci.args, None, kwargs=ci.kwargs, dynamo=True, verbose=False,
                                opset_version=opset, input_names=input_names, output_names=output_names, optimize=True,
                                external_data=big, **kwargs)
    program.save(str(dest), external_data=big)


def _export_torchscript(model, ci: CallArgs, dest: Path, *, opset, input_names, output_names, dynamic_axes,
                        big: bool) -> None:
    tensors = tuple(_named_tensors(ci).values())
    torch.onnx.export(_Positional(model, ci), tensors, str(dest), dynamo=False, verbose=False,
                      opset_version=opset, input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes or None,
                      do_constant_folding=True)


def _consolidate_external(dest: Path, big: bool) -> str | None:
    """Keep external data in one ``<name>.data`` file next to the model (or none for small models)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(str(dest), load_external_data=False)
    external = [t for t in m.graph.initializer if uses_external_data(t)]
    data_name = dest.name + ".data"
    locations = {dict((e.key, e.value) for e in t.external_data).get("location") for t in external}
    if external and locations == {data_name}:
        return data_name
    if not external and not big:
        return None
    m = onnx.load(str(dest), load_external_data=True)
    for f in dest.parent.iterdir():
        if f != dest:
            f.unlink()
    onnx.save_model(m, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return data_name


def _dtype_name(t: str) -> str:
    return t.replace("tensor(", "").replace(")", "")


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *, verify: bool = True,
                opset: int | None = None, dynamic_batch: bool = False, dynamic_seq: bool = False,
                rtol: float = 1e-4, atol: float = 1e-4, extra_inputs: Iterable | None = None,
                num_random: int = 3, force: bool = False, progress: Progress = None,
                exporter: str = "auto", input_path: str | os.PathLike | None = None,
                seed: int = 0) -> ExportReport:
    """Export ``model`` to ``path`` (.onnx), check it, verify it in ONNX Runtime and count its norm ops.

    ``exporter``: ``auto`` (dynamo, then TorchScript if dynamo fails), ``dynamo`` or ``torchscript``.
    ``dynamic_batch`` makes dim 0 of every input dynamic; ``dynamic_seq`` makes dim 1 of integer token
    inputs and ``input_values`` dynamic. Weights above 2 GB go to ``<path>.data``. The output is written
    atomically; an existing file needs ``force``; ``input_path`` (the model's own file) is never
    overwritten. A failed verification does not raise: see ``report.verify.passed``.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise NormSurgeonError(f"unknown exporter {exporter!r}: use auto, dynamo or torchscript")
    out = check_output_path(path, force=force, inputs=[input_path], suffixes=(".onnx",))
    ci = _signature_order(model, as_call_args(example_inputs))
    named = _named_tensors(ci)
    if not named:
        raise NormSurgeonError("the example inputs hold no tensors; nothing to export")
    input_names = list(named)
    seq_names = _seq_input_names(ci)
    if dynamic_seq and not seq_names:
        raise NormSurgeonError("--dynamic-seq: no sequence input (integer token ids or input_values) among "
                               f"{input_names}; only --dynamic-batch applies to this model")
    axes: dict[str, dict[int, str]] = {}
    for n, t in named.items():
        a = {}
        if dynamic_batch and t.dim() >= 1:
            a[0] = "batch"
        if dynamic_seq and n in seq_names:
            a[1] = "seq"
        if a:
            axes[n] = a
    extra = [as_call_args(e) for e in (extra_inputs or [])]
    _check_fits(extra, ci, dynamic_batch, seq_names if dynamic_seq else [])

    notes: list[str] = []
    export_ci = ci
    if axes:  # torch.export specializes sizes 0 and 1; trace dynamic axes at a size >= 2
        small_batch = dynamic_batch and any(t.dim() >= 1 and t.shape[0] < 2 for t in named.values())
        small_seq = dynamic_seq and any(named[n].shape[1] < 2 for n in seq_names)
        if small_batch or small_seq:
            export_ci = ci.like(torch.Generator().manual_seed(seed), batch=2 if small_batch else None,
                                seq=2 if small_seq else None, seq_dims={n: 1 for n in seq_names})
            notes.append("traced at batch/sequence size 2 (size 1 would be specialized by torch.export)")

    weights = _weights_bytes(model)
    big = weights > EXTERNAL_DATA_THRESHOLD
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    errors: dict[str, BaseException] = {}
    logs: dict[str, str] = {}
    caught: list[str] = []
    modes = eval_modes(model)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                output_names = _output_names(export_ci.call(model))
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"the model fails on its example inputs: {type(e).__name__}: "
                                       f"{_one_line(e)}") from e
        output_names = [n if output_names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(output_names)]
        dest = tmpdir / out.name
        used = None
        for name in order:
            _report_progress(progress, f"exporting with the {name} exporter")
            for f in tmpdir.iterdir():
                f.unlink()
            captured = _Captured()
            try:
                with _quiet(caught) as captured:
                    (_export_dynamo if name == "dynamo" else _export_torchscript)(
                        model, export_ci, dest, opset=opset, input_names=input_names, output_names=output_names,
                        dynamic_axes=axes, big=big)
                data_name = _consolidate_external(dest, big)
                import onnx
                onnx.checker.check_model(str(dest))
            except Exception as e:  # noqa: BLE001 - any exporter failure moves on to the next exporter
                errors[name] = e
                logs[name] = captured.text
                continue
            used = name
            break
        if used is None:
            raise NormSurgeonError(_explain_failure(errors, opset, logs)) from next(iter(errors.values()))
        export_seconds = time.perf_counter() - t0

        report = ExportReport(onnx=str(out), exporter=used, external_data=data_name, weights_bytes=weights,
                              dynamic_axes=axes, export_seconds=export_seconds)
        if "dynamo" in errors:
            report.fallback_reason = _exc_summary(errors["dynamo"])
        report.notes.extend(notes)
        report.notes.extend(f"exporter warning: {w}" for w in caught[:5])
        if len(caught) > 5:
            report.notes.append(f"... and {len(caught) - 5} more exporter warnings")

        report.opset = _opset(dest)
        report.norm_ops = count_norm_ops(dest)
        opt_path = tmpdir / "ort-optimized" / "optimized.onnx"
        opt_path.parent.mkdir()
        _report_progress(progress, "optimizing in ONNX Runtime")
        sess = make_session(dest, optimized_path=opt_path)
        report.norm_ops_optimized = count_norm_ops(opt_path)
        report.inputs = [{"name": i.name, "dtype": _dtype_name(i.type), "shape": list(i.shape)} for i in sess.get_inputs()]
        report.outputs = [{"name": o.name, "dtype": _dtype_name(o.type), "shape": list(o.shape)} for o in sess.get_outputs()]
        if verify:
            report.verify = _verify(sess, model, ci, rtol=rtol, atol=atol, extra_inputs=extra,
                                    num_random=num_random, seed=seed, progress=progress)
        del sess
        shutil.rmtree(opt_path.parent)

        _report_progress(progress, f"writing {out}")
        if data_name:
            data_out = out.parent / data_name
            if data_out.exists() and not force:
                raise NormSurgeonError(f"{data_out} exists; pass --force to replace it")
            os.replace(tmpdir / data_name, data_out)
        os.replace(dest, out)
        return report
    finally:
        restore_modes(modes)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _opset(path: Path) -> int | None:
    m = _load_structure(path)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def norm_ops_of_model(model: torch.nn.Module, example_inputs: Any, *, opset: int | None = None,
                      exporter: str = "auto") -> tuple[dict[str, int], dict[str, int]]:
    """(exported, ORT-optimized) norm-op counts of ``model``, exported to a temporary file, not verified."""
    with tempfile.TemporaryDirectory(prefix="normsurgeon-count-") as tmp:
        rep = export_onnx(model, example_inputs, Path(tmp) / "model.onnx", verify=False, opset=opset,
                          exporter=exporter)
        return rep.norm_ops, rep.norm_ops_optimized
