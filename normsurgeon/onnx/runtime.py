"""Prove an ONNX file in ONNX Runtime: sessions, feeding ``CallArgs`` in, comparing with PyTorch on
the example inputs, random inputs like them, a second batch/sequence size for dynamic axes and the
user's own inputs (read by ``verify.load_inputs_file``)."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import NormSurgeonError, one_line
from ..graph import eval_modes, restore_modes
from ..inputs import CallArgs, as_call_args
from ..outputs import ErrorStats, compare_outputs, flatten_outputs
from ..report import Table, fmt_float
from ..verify import load_inputs_file  # noqa: F401 - its home is verify; exported here too
from .counting import count_norm_ops

__all__ = ["verify_onnx", "optimized_norm_ops", "load_inputs_file", "make_session", "session_signature", "VerifyReport", "InputCheck"]

Progress = Callable[[str], None] | None

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _report_progress(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


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
        raise NormSurgeonError(f"{path}: ONNX Runtime cannot load it: {one_line(e)}") from e


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
                check.error = f"ONNX Runtime failed: {one_line(e)}"
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


def optimized_norm_ops(path: str | os.PathLike) -> dict[str, int]:
    """``count_norm_ops`` of the graph ONNX Runtime actually runs (CPU, ORT_ENABLE_ALL)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="normsurgeon-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(path, optimized_path=opt)
        return count_norm_ops(opt)
