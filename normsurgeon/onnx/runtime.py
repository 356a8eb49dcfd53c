"""Prove an ONNX file in ONNX Runtime: sessions, feeding ``CallArgs`` in, comparing with PyTorch on
the example inputs, random inputs like them, a second batch/sequence size for dynamic axes and the
user's own inputs (read by ``verify.load_inputs_file``)."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import NormSurgeonError, one_line
from ..graph import eval_modes, restore_modes
from ..inputs import CallArgs, as_call_args, random_like
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

    def row(self) -> list:
        """name, shapes, max abs error, max rel error, verdict: one row of a report's table."""
        from ..report import fmt_float

        shapes = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items())
        if self.stats is None:
            return [self.name, shapes, "-", "-", f"FAIL: {self.error}"]
        return [self.name, shapes, fmt_float(self.stats.max_abs_error), fmt_float(self.stats.max_rel_error),
                "pass" if self.passed else "FAIL"]


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


def graph_axes(sess) -> dict[str, dict[int, str]]:
    """The dynamic dimensions of a session's inputs: ``{input: {axis: name}}`` (unnamed ones ``dim<axis>``)."""
    out = {}
    for spec in sess.get_inputs():
        axes = {ax: d if isinstance(d, str) and d else f"dim{ax}"
                for ax, d in enumerate(spec.shape) if not isinstance(d, int)}
        if axes:
            out[spec.name] = axes
    return out


def _resized(ci: CallArgs, sizes: Mapping[str, Mapping[int, int]], gen: torch.Generator) -> CallArgs:
    """Random tensors like ``ci``'s with other sizes on the given axes (non-tensors unchanged)."""
    names = ci.names()
    values = [*ci.args, *ci.kwargs.values()]
    out = []
    for n, v in zip(names, values):
        if isinstance(v, torch.Tensor) and sizes.get(n):
            shape = list(v.shape)
            for ax, size in sizes[n].items():
                shape[ax] = size
            v = random_like(v, shape, gen)
        out.append(v)
    k = len(ci.args)
    return CallArgs(tuple(out[:k]), dict(zip(names[k:], out[k:])))


def _shapes(ci: CallArgs) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in _named_tensors(ci).items()}


def verify_onnx(model: torch.nn.Module, example_inputs: Any, onnx_path: str | os.PathLike, *,
                rtol: float = 1e-4, atol: float = 1e-4, extra_inputs: Iterable | None = None,
                num_random: int = 3, seed: int = 0, progress: Progress = None,
                sizes: Mapping[str, Sequence[int]] | None = None) -> VerifyReport:
    """Run ``onnx_path`` in ONNX Runtime and compare with ``model`` (eval) on several input sets.

    Input sets: the example inputs, ``num_random`` random ones like them, two more at other sizes of the
    graph's dynamic dimensions (``sizes``: dimension name -> sizes; by default ``onnx.dynamic.verify_sizes``:
    batch 1 and 8, sequences within the model's position limit), and every CallArgs in ``extra_inputs``.
    Inputs that do not fit the graph raise NormSurgeonError; numerical disagreement gives ``passed=False``.
    """
    sess = make_session(onnx_path)
    return _verify(sess, model, as_call_args(example_inputs), rtol=rtol, atol=atol, extra_inputs=extra_inputs,
                   num_random=num_random, seed=seed, progress=progress, sizes=sizes)


def _input_sets(sess, ci: CallArgs, num_random: int, seed: int, extra: Sequence[CallArgs],
                sizes: Mapping[str, Sequence[int]], axes: Mapping[str, Mapping[int, str]]
                ) -> list[tuple[str, CallArgs]]:
    gen = torch.Generator().manual_seed(seed)
    sets: list[tuple[str, CallArgs]] = [("example", ci)]
    sets += [(f"random {i + 1}", ci.like(gen)) for i in range(num_random)]
    named = _named_tensors(ci)
    axes = {n: a for n, a in axes.items() if n in named}
    dims = list(dict.fromkeys(d for a in axes.values() for d in a.values() if sizes.get(d)))
    # every dynamic dimension at each of its sizes: set k takes the k-th size of each
    for k in range(max((len(sizes[d]) for d in dims), default=0)):
        pick = {d: sizes[d][min(k, len(sizes[d]) - 1)] for d in dims}
        label = " ".join(f"{d}={pick[d]}" for d in dims)
        resize = {n: {ax: pick[d] for ax, d in a.items() if d in pick} for n, a in axes.items()}
        sets.append((label, _resized(ci, resize, gen)))
    for i, e in enumerate(extra):
        sets.append((f"user inputs {i + 1}", e))
    return sets


@torch.no_grad()
def _verify(sess, model: torch.nn.Module, ci: CallArgs, *, rtol: float, atol: float, extra_inputs=None,
            num_random: int = 3, seed: int = 0, progress: Progress = None,
            sizes: Mapping[str, Sequence[int]] | None = None,
            axes: Mapping[str, Mapping[int, str]] | None = None) -> VerifyReport:
    from .dynamic import sequence_limit, verify_sizes

    extra = [as_call_args(e) for e in (extra_inputs or [])]
    if axes is None:
        axes = graph_axes(sess)
    if sizes is None:
        sizes = verify_sizes(axes, _named_tensors(ci), sequence_limit(model))
    report = VerifyReport(rtol=rtol, atol=atol)
    out_names = [o.name for o in sess.get_outputs()]
    modes = eval_modes(model)
    try:
        sets = _input_sets(sess, ci, num_random, seed, extra, sizes, axes)
        for k, (label, args) in enumerate(sets):
            _report_progress(progress, f"verifying in ONNX Runtime: {label} ({k + 1}/{len(sets)})")
            feeds = _feeds(sess, args, "the example inputs" if k == 0 else f"input set {label!r}")
            check = InputCheck(label, _shapes(args))
            report.checks.append(check)
            try:
                actual = sess.run(None, feeds)
            except Exception as e:  # noqa: BLE001 - a graph that cannot run these inputs fails verification
                check.error = f"ONNX Runtime failed: {one_line(e)}"
                if k > num_random and not label.startswith("user inputs"):
                    check.error += " (the axis may have been specialized to the example size during export)"
                continue
            try:
                expected = flatten_outputs(args.call(model))
            except Exception as e:  # noqa: BLE001 - a model that refuses these sizes fails this check
                if k == 0:
                    raise NormSurgeonError(f"the model fails on its example inputs: {one_line(e, typed=True)}") from e
                check.error = f"PyTorch rejects these inputs: {one_line(e, typed=True)}"
                continue
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


def _check_fits(extra: Sequence[CallArgs], ci: CallArgs, axes: Mapping[str, Mapping[int, str]]) -> None:
    """User inputs may differ from the example only on the axes that are exported dynamic."""
    ex = _named_tensors(ci)
    for i, e in enumerate(extra):
        for n, t in _named_tensors(e).items():
            ref = ex.get(n)
            if ref is None:
                raise NormSurgeonError(f"user input set {i + 1}: unknown input {n!r}; the model takes {list(ex)}")
            free = set(axes.get(n, {}))
            if t.dim() != ref.dim() or any(a != b for d, (a, b) in enumerate(zip(t.shape, ref.shape)) if d not in free):
                hint = (f" (dynamic: {', '.join(f'dim {ax} ({d})' for ax, d in axes[n].items())})" if free
                        else " (every dimension of it is static in this export)")
                raise NormSurgeonError(f"user input set {i + 1}: input {n!r} has shape {list(t.shape)} but the "
                                       f"export is for {list(ref.shape)}{hint}")


def optimized_norm_ops(path: str | os.PathLike) -> dict[str, int]:
    """``count_norm_ops`` of the graph ONNX Runtime actually runs (CPU, ORT_ENABLE_ALL)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="normsurgeon-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        make_session(path, optimized_path=opt)
        return count_norm_ops(opt)
