"""Export a model to ONNX (dynamo exporter, TorchScript fallback), check it with ``onnx.checker``,
verify it in ONNX Runtime (``onnx.runtime``) and count its normalization ops (``onnx.counting``).

The file is moved into place only after it verified, or with ``keep_failed=True``: a failed export
never sits at the output path looking like a good one.
"""

from __future__ import annotations

import contextlib
import inspect
import io as _io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import NormSurgeonError, one_line
from ..graph import eval_modes, restore_modes
from ..inputs import CallArgs, as_call_args
from ..saving import check_output_path, place_file, temp_dir
from ..outputs import flatten_outputs
from ..report import Table
from .counting import count_norm_ops, load_structure
from .dynamic import dynamic_axes as _default_axes, sequence_limit, verify_sizes
from .runtime import (Progress, VerifyReport, _check_fits, _named_tensors, _report_progress, _resized,
                      _verify, graph_axes, make_session)

__all__ = ["export_onnx", "ExportReport", "EXTERNAL_DATA_THRESHOLD"]

#: Weights above this many bytes are saved as external data (protobuf cannot hold more than 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2 * 1024 ** 3 - 64 * 1024 ** 2


@dataclass
class ExportReport:
    onnx: str
    exporter: str  # dynamo | torchscript
    opset: int | None = None
    fallback_reason: str | None = None
    #: the dimensions left dynamic in the file, ``{input: {axis: "batch" | "sequence"}}``
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    #: the sizes of each dynamic dimension verification ran besides the example's
    dynamic_sizes: dict[str, list[int]] = field(default_factory=dict)
    #: why the export has static shapes (``--static``, or the dynamic export that failed); None if dynamic
    static_reason: str | None = None
    external_data: str | None = None
    weights_bytes: int = 0
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    verify: VerifyReport | None = None
    norm_ops: dict[str, int] = field(default_factory=dict)
    norm_ops_optimized: dict[str, int] = field(default_factory=dict)
    #: ``api.export(fold=True)``: the fold report, and the unfolded model's norms counted on its captured
    #: graph by the ONNX op each exports as (the model is exported once, folded)
    fold: Any = None
    norm_ops_unfolded: dict[str, int] | None = None
    export_seconds: float = 0.0
    written: bool = True  # False: verification failed and the file was not moved into place
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {"onnx": self.onnx, "exporter": self.exporter, "fallback_reason": self.fallback_reason,
             "opset": self.opset,
             "dynamic": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
             "dynamic_sizes_verified": self.dynamic_sizes, "static_reason": self.static_reason,
             "external_data": self.external_data, "inputs": self.inputs, "outputs": self.outputs,
             "verify": self.verify.to_json() if self.verify is not None else None,
             "norm_ops": self.norm_ops, "norm_ops_optimized": self.norm_ops_optimized}
        if self.norm_ops_unfolded is not None:
            d["norm_ops_unfolded"] = self.norm_ops_unfolded
        d["written"] = self.written
        d["export_seconds"] = round(self.export_seconds, 3)
        d["notes"] = self.notes
        if self.fold is not None:
            d["fold"] = self.fold.to_json()
        return d

    def tables(self) -> list[Table]:
        info = Table("ONNX export", ["item", "value"])
        info.rows.append(["file", self.onnx + (f" (+ external data {self.external_data})" if self.external_data else "")])
        exporter = self.exporter + (f" (fallback: dynamo failed: {self.fallback_reason})" if self.fallback_reason else "")
        info.rows.append(["exporter", exporter])
        info.rows.append(["opset", self.opset])
        dims = sorted({d for a in self.dynamic_axes.values() for d in a.values()})
        info.rows.append(["dynamic dims", ", ".join(f"{d} (verified at {', '.join(map(str, self.dynamic_sizes.get(d, [])))})"
                                                   for d in dims) if dims else f"none: {self.static_reason}"])
        for spec in self.inputs:
            info.rows.append([f"input {spec['name']}", f"{spec['dtype']} [{', '.join(map(str, spec['shape']))}]"])
        for spec in self.outputs:
            info.rows.append([f"output {spec['name']}", f"{spec['dtype']} [{', '.join(map(str, spec['shape']))}]"])
        info.rows.append(["export time", f"{self.export_seconds:.1f} s"])
        info.notes.extend(self.notes)
        tables = self.fold.tables() if self.fold is not None else []
        tables.append(info)
        if self.verify is not None:
            tables.append(self.verify.table())
        tables.append(self.norm_table())
        return tables

    def norm_table(self) -> Table:
        ops = sorted(set(self.norm_ops) | set(self.norm_ops_optimized) | set(self.norm_ops_unfolded or {}))
        if self.norm_ops_unfolded is not None:
            t = Table("Normalization ops (before fold → after fold)",
                      ["op", "model before fold", "folded, exported", "folded, ORT-optimized"])
            for op in ops:
                t.rows.append([op, self.norm_ops_unfolded.get(op, 0), self.norm_ops.get(op, 0),
                               self.norm_ops_optimized.get(op, 0)])
            t.notes.append("model before fold = its norms counted on the captured PyTorch graph, by the ONNX op "
                           "each exports as (the exporter may itself fold a BatchNorm that directly follows a Conv)")
        else:
            t = Table("Normalization ops", ["op", "exported", "after ORT optimization"])
            for op in ops:
                t.rows.append([op, self.norm_ops.get(op, 0), self.norm_ops_optimized.get(op, 0)])
        t.notes.append("ORT optimization = ONNX Runtime CPU, ORT_ENABLE_ALL; it may fuse ops into contrib ops "
                       "(SkipLayerNormalization...); decomposed_* = mean/variance patterns built from primitive ops.")
        return t


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
    return f"{type(e).__name__}: {one_line(e)}"


def _dynamic_summary(e: BaseException) -> str:
    """Why torch.export refused a dynamic dimension, in one line."""
    text = _strip_ansi(str(e))
    m = re.search(r"tracing inferred a static shape of (\d+) for dimension (\S+?)\.?\s*$", text, re.M)
    if m:
        return f"the model's code fixes {m.group(2)} to {m.group(1)}"
    m = re.search(r"Not all values of (\S+) .*?are valid because (.+?)$", text, re.M)
    if m:
        return f"{m.group(1)}: {m.group(2)}"[:300]
    return _exc_summary(e)


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
            text = one_line(str(w.message))
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
    """torch.export ``dynamic_shapes`` keyed by forward's parameter names.

    Axis names (strings) become ``Dim.DYNAMIC`` in the ONNX exporter, which keeps them as the graph's
    dimension names and, unlike ``Dim.AUTO``, fails instead of silently specializing an axis.
    """

    def spec(name: str):
        a = axes.get(name)
        return dict(a) if a else None

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


_DYNAMIC_FAILURE = re.compile(r"Dim\.(?:DYNAMIC|AUTO)|dynamic_shapes|[Cc]onstraints? [Vv]iolat|specializ|"
                              r"inferred a static shape|guard", re.S)


def _attempts(order: list[str], axes: dict, fallback: bool) -> list[tuple[str, dict]]:
    """(exporter, dynamic axes) to try in turn: each exporter dynamic, and static after a dynamic failure."""
    out = []
    for name in order:
        out.append((name, axes))
        if axes and fallback:
            out.append((name, {}))
    return out


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *, verify: bool = True,
                opset: int | None = None, static: bool = False, dynamic_batch: bool | None = None,
                dynamic_seq: bool | None = None,
                rtol: float = 1e-4, atol: float = 1e-4, extra_inputs: Iterable | None = None,
                num_random: int = 3, force: bool = False, progress: Progress = None,
                exporter: str = "auto", input_path: str | os.PathLike | None = None,
                seed: int = 0, keep_failed: bool = False) -> ExportReport:
    """Export ``model`` to ``path`` (.onnx), check it, verify it in ONNX Runtime and count its norm ops.

    ``exporter``: ``auto`` (dynamo, then TorchScript if dynamo fails), ``dynamo`` or ``torchscript``.

    Dimensions (``onnx.dynamic``): by default dim 0 of every input is a dynamic ``batch`` and the
    sequence axis of token inputs a dynamic ``sequence``; verification then also runs each at two
    other sizes (batch 1 and 8, sequences within the model's position limit). An export that fails
    with dynamic dimensions is redone with the example's static shapes, and ``report.static_reason``
    says why. ``static=True`` keeps the example shapes; ``dynamic_batch`` / ``dynamic_seq``: False
    keeps that axis static, True requires it (an error instead of the static fallback).

    Weights above 2 GB go to ``<path>.data``. The output is written atomically; an existing file needs
    ``force``; ``input_path`` (the model's own file) is never overwritten. A failed verification does
    not raise (see ``report.verify.passed``), and the file is then left out of ``path``
    (``report.written`` is False) unless ``keep_failed``: nothing at the output path may pass for a
    good export.
    """
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise NormSurgeonError(f"unknown exporter {exporter!r}: use auto, dynamo or torchscript")
    if static and (dynamic_batch or dynamic_seq):
        raise NormSurgeonError("`static=True` contradicts `dynamic_batch=True`/`dynamic_seq=True`")
    out = check_output_path(path, force=force, inputs=[input_path], suffixes=(".onnx",))
    ci = _signature_order(model, as_call_args(example_inputs))
    named = _named_tensors(ci)
    if not named:
        raise NormSurgeonError("the example inputs hold no tensors; nothing to export")
    input_names = list(named)
    axes: dict[str, dict[int, str]] = {}
    if not static:
        axes = _default_axes(model, named, batch=dynamic_batch is not False, sequence=dynamic_seq is not False)
    if dynamic_seq and not any("sequence" in a.values() for a in axes.values()):
        raise NormSurgeonError("`dynamic_seq=True`: no sequence input (token ids, attention masks, input_values, "
                               f"inputs_embeds) among {input_names}; only the batch axis can be dynamic here")
    required = bool(dynamic_batch or dynamic_seq)
    notes: list[str] = []
    if axes and not required:
        axes = _accepted_axes(model, ci, axes, verify_sizes(axes, named, sequence_limit(model)), seed, notes)
    extra = [as_call_args(e) for e in (extra_inputs or [])]
    _check_fits(extra, ci, axes)

    export_ci = ci
    small = {n: [ax for ax in a if named[n].shape[ax] < 2] for n, a in axes.items()}
    if any(small.values()):  # torch.export specializes sizes 0 and 1: trace dynamic axes at size 2
        gen = torch.Generator().manual_seed(seed)
        export_ci = _resized(ci, {n: {ax: 2 for ax in a} for n, a in small.items() if a}, gen)
        notes.append("traced at size 2 on the dynamic axes (size 1 would be specialized by torch.export)")
    if static:
        static_reason = "--static: every dimension has the example's size"
    elif not axes and notes:
        static_reason = notes[-1]
    elif not axes:
        static_reason = "the example inputs have no batch or sequence axis to make dynamic"
    else:
        static_reason = None

    weights = _weights_bytes(model)
    big = weights > EXTERNAL_DATA_THRESHOLD
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    errors: dict[str, BaseException] = {}
    dynamic_errors: dict[str, BaseException] = {}
    logs: dict[str, str] = {}
    caught: list[str] = []
    modes = eval_modes(model)
    tmpdir = temp_dir(out)  # removed by the next run if this one is killed; the umask applies
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                output_names = _output_names(export_ci.call(model))
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"the model fails on its example inputs: {type(e).__name__}: "
                                       f"{one_line(e)}") from e
        output_names = [n if output_names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(output_names)]
        dest = tmpdir / out.name
        used = used_axes = None
        for name, try_axes in _attempts(order, axes, fallback=not required):
            if not try_axes and axes and name not in dynamic_errors:
                continue  # this exporter failed for another reason than the dynamic axes: static fails too
            _report_progress(progress, f"exporting with the {name} exporter"
                             + (" (static shapes)" if axes and not try_axes else ""))
            for f in tmpdir.iterdir():
                f.unlink()
            captured = _Captured()
            try:
                with _quiet(caught) as captured:
                    (_export_dynamo if name == "dynamo" else _export_torchscript)(
                        model, export_ci if try_axes else ci, dest, opset=opset, input_names=input_names,
                        output_names=output_names, dynamic_axes=try_axes, big=big)
                data_name = _consolidate_external(dest, big)
                import onnx
                onnx.checker.check_model(str(dest))
            except Exception as e:  # noqa: BLE001 - any exporter failure moves on to the next attempt
                if try_axes and _DYNAMIC_FAILURE.search(_strip_ansi(str(e)) + captured.text):
                    dynamic_errors[name] = e
                else:
                    errors[name] = e
                    logs[name] = captured.text
                continue
            used, used_axes = name, try_axes
            break
        if used is None:
            errors = {**dynamic_errors, **errors}
            raise NormSurgeonError(_explain_failure(errors, opset, logs)) from next(iter(errors.values()))
        export_seconds = time.perf_counter() - t0

        report = ExportReport(onnx=str(out), exporter=used, external_data=data_name, weights_bytes=weights,
                              export_seconds=export_seconds, static_reason=static_reason)
        if not used_axes:
            notes = [n for n in notes if not n.startswith("traced at size 2")]
        if axes and not used_axes:
            why = _dynamic_summary(dynamic_errors[used])
            report.static_reason = f"the {used} exporter failed with dynamic dimensions: {why}"
            notes.append(f"exported with the example's static shapes ({_describe_axes(axes)} fixed): the {used} "
                         f"exporter failed with dynamic dimensions ({why}); --static skips trying")
        if "dynamo" in errors or ("dynamo" in dynamic_errors and used != "dynamo"):
            report.fallback_reason = _exc_summary(errors.get("dynamo") or dynamic_errors["dynamo"])
        report.notes.extend(notes)
        # inputs sharing "batch"/"sequence" share one symbol; the exporter warns that it keeps one name
        caught = [w for w in caught if "shares the same shape constraints" not in w]
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
        report.dynamic_axes = {n: {ax: d for ax, d in a.items() if used_axes.get(n, {}).get(ax) == d}
                               for n, a in graph_axes(sess).items()}
        report.dynamic_axes = {n: a for n, a in report.dynamic_axes.items() if a}
        lost = {n: {ax: d for ax, d in a.items() if ax not in report.dynamic_axes.get(n, {})}
                for n, a in used_axes.items()}
        lost = {n: a for n, a in lost.items() if a}
        if lost:
            report.notes.append(f"the {used} exporter fixed {_describe_axes(lost)} to the example's size")
        report.dynamic_sizes = verify_sizes(report.dynamic_axes, named, sequence_limit(model))
        if verify:
            report.verify = _verify(sess, model, ci, rtol=rtol, atol=atol, extra_inputs=extra,
                                    num_random=num_random, seed=seed, progress=progress,
                                    sizes=report.dynamic_sizes, axes=report.dynamic_axes)
        del sess
        shutil.rmtree(opt_path.parent)

        wrong_sizes = _failed_only_at_other_sizes(report.verify, num_random, len(extra))
        if wrong_sizes and not required:
            static_report = _static_after_wrong_sizes(wrong_sizes, locals_=dict(
                model=model, example_inputs=ci, path=path, verify=verify, opset=opset, rtol=rtol, atol=atol,
                extra_inputs=extra, num_random=num_random, force=force, progress=progress, exporter=used,
                input_path=input_path, seed=seed, keep_failed=keep_failed))
            if static_report is not None:
                return static_report

        if report.verify is not None and not report.verify.passed and not keep_failed:
            report.written = False
            report.notes.append(f"verification failed: nothing written to {out} (keep_failed / --keep-failed "
                                "writes it for inspection)")
            return report
        _report_progress(progress, f"writing {out}")
        if data_name:
            data_out = out.parent / data_name
            if data_out.exists() and not force:
                raise NormSurgeonError(f"{data_out} exists; pass `force=True` to replace it")
            place_file(tmpdir / data_name, data_out, force=force)
        place_file(dest, out, force=force)  # without force: another run's file is not replaced
        return report
    finally:
        restore_modes(modes)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _accepted_axes(model, ci: CallArgs, axes: dict[str, dict[int, str]], sizes: dict[str, list[int]], seed: int,
                   notes: list[str]) -> dict[str, dict[int, str]]:
    """The dynamic dimensions whose other sizes the PyTorch model itself accepts.

    A model may refuse them (a ``.pt2`` program guards its example shapes; a model may hard-code its
    batch): such a dimension stays static, with a note, instead of an export that cannot be verified.
    """
    gen = torch.Generator().manual_seed(seed)
    rejected: dict[str, str] = {}
    modes = eval_modes(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for dim, dim_sizes in sizes.items():
                for size in dim_sizes:
                    resize = {n: {ax: size for ax, d in a.items() if d == dim} for n, a in axes.items()}
                    try:
                        _resized(ci, resize, gen).call(model)
                    except Exception as e:  # noqa: BLE001 - any refusal keeps this dimension static
                        rejected[dim] = f"{dim}={size}: {type(e).__name__}: {one_line(e)}"[:300]
                        break
    finally:
        restore_modes(modes)
    if not rejected:
        return axes
    for dim, why in rejected.items():
        notes.append(f"{dim} kept static: the PyTorch model rejects other sizes ({why})")
    kept = {n: {ax: d for ax, d in a.items() if d not in rejected} for n, a in axes.items()}
    return {n: a for n, a in kept.items() if a}


def _failed_only_at_other_sizes(verify: VerifyReport | None, num_random: int, n_extra: int) -> list:
    """The failed checks when only those at other sizes of the dynamic dimensions failed, else []."""
    if verify is None or verify.passed:
        return []
    checks = verify.checks
    sized = checks[1 + num_random:len(checks) - n_extra]
    if not sized or not all(c.passed for c in checks[:1 + num_random]) or \
            not all(c.passed for c in checks[len(checks) - n_extra:]):
        return []
    return [c for c in sized if not c.passed]


def _static_after_wrong_sizes(failed: list, locals_: dict) -> ExportReport | None:
    """Export again with static shapes, after the dynamic file disagreed with PyTorch at other sizes
    (a model whose code takes another path for them, e.g. at batch 1). None if the static export
    cannot take the user's inputs either."""
    what = "; ".join(f"{c.name}: " + (c.error or f"max abs error {c.stats.max_abs_error:.3g}") for c in failed)
    try:
        report = export_onnx(static=True, **locals_)
    except NormSurgeonError:
        return None
    report.static_reason = f"the dynamic export disagrees with PyTorch at other sizes ({what})"
    report.notes.insert(0, f"exported with the example's static shapes: the dynamic export disagreed with PyTorch "
                           f"at other sizes ({what}); --dynamic-batch/--dynamic-seq keep the dynamic file and fail")
    return report


def _describe_axes(axes: dict[str, dict[int, str]]) -> str:
    return ", ".join(f"{n} dim {ax} ({d})" for n, a in axes.items() for ax, d in a.items())


def _opset(path: Path) -> int | None:
    m = load_structure(path)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
