"""Everything the command line can do, as Python functions: the CLI parses options, calls one of
these and renders what it returns; nothing a command does lives only in the CLI.

    loaded = api.load("model.pt", trust=True, input_shapes=["1,3,224,224"])
    report = api.inspect(loaded.model, loaded.example_inputs)
    folded, report = api.fold(loaded.model, loaded.example_inputs, inplace=True, inputs_file="real.pt")
    report = api.export(loaded.model, loaded.example_inputs, "m.onnx", fold=True)
    api.save(folded, "folded/", example_inputs=loaded.example_inputs)   # a recipe directory
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch.nn as nn

from .bench import measure_latency as bench  # noqa: F401 - the `bench` command
from .calibrate import calibrate, load_calibration_data, synthetic_batches  # noqa: F401
from .demo import run_demo as demo  # noqa: F401 - the `demo` command
from .errors import NormSurgeonError, VerificationError, one_line
from .find import find_norms, inspect as _inspect
from .graph import capture, eval_modes, restore_modes
from .inputs import CallArgs, as_call_args, inputs_from_shapes, int_input_bounds
from .loading import LoadedModel, check_output_path, load_model, save_model  # noqa: F401
from .onnx import ExportReport, export_onnx
from .passes.convert import ConvertReport, insert_ffn_bn, validate as validate_convert  # noqa: F401
from .passes import convert as _convert_pass
from .passes import fold as _fold_pass
from .passes.fold import FoldReport
from .recipe import describe_base, factory_base, set_base, transformers_base
from . import replay
from .replay import apply_recipe, is_dir_output, is_recipe_dir  # noqa: F401
from .verify import load_inputs_file

__all__ = ["load", "inspect", "fold", "convert", "insert_ffn_bn", "calibrate", "load_calibration_data",
           "synthetic_batches", "check_calibration_batch", "validate_convert", "export", "bench", "demo",
           "save_model", "save", "check_output", "check_recipe_base", "apply_recipe", "load_inputs_file"]

# How each norm kind shows up in an exported ONNX graph (op type, or the counting's decomposed_* key).
_ONNX_OP = {"batchnorm": "BatchNormalization", "layernorm": "LayerNormalization", "groupnorm": "GroupNormalization",
            "instancenorm": "InstanceNormalization", "rmsnorm": "RMSNormalization"}


def load(model: str | os.PathLike, *, trust: bool = False, imports: Sequence[str] = (),
         weights: str | os.PathLike | None = None, input_shapes: Sequence[str] = (),
         input_dtypes: Sequence[str] = (), need_inputs: bool = False) -> LoadedModel:
    """Load a model as every command does, with example inputs from ``input_shapes`` or the model.

    A recipe directory (``save``) is rebuilt without unpickling anything (no ``trust`` needed). The
    model remembers how it was built (``normsurgeon.recipe``), so what the passes do to it can be
    saved as a recipe. Integer inputs drawn for ``input_shapes`` stay below the size of the embedding
    that consumes them (or the config's vocabulary)."""
    if is_recipe_dir(model):
        if weights is not None:
            raise NormSurgeonError("--weights goes with a package.module:factory spec, not with a recipe directory")
        loaded = replay.load_dir(model)
    else:
        loaded = load_model(model, trust=trust, imports=imports, weights=weights)
        _remember_base(loaded, str(model))
    if input_shapes:
        loaded.example_inputs = inputs_from_shapes(input_shapes, input_dtypes)
        bounds = int_input_bounds(loaded.model, loaded.example_inputs)
        if bounds:
            loaded.example_inputs = inputs_from_shapes(
                input_shapes, input_dtypes, int_high=[bounds.get(f"input_{i}") for i in range(len(input_shapes))])
    elif input_dtypes:
        raise NormSurgeonError("--input-dtype needs --input-shape")
    if need_inputs and loaded.example_inputs is None:
        raise NormSurgeonError(f"{model}: cannot derive example inputs for this model; pass --input-shape "
                               "(e.g. --input-shape 1,3,224,224)")
    return loaded


def _remember_base(loaded: LoadedModel, spec: str) -> None:
    """Record on the model how to build it again (what a recipe's ``base`` says)."""
    if loaded.source == "transformers":
        set_base(loaded.model, transformers_base(loaded.model))
    elif loaded.source == "factory":
        set_base(loaded.model, factory_base(spec))
    elif loaded.source == "pickle":
        set_base(loaded.model, None, unknown=f"{spec} is a pickled model: how to build it is unknown")
    else:
        set_base(loaded.model, None, unknown=f"{spec} is a {loaded.source} archive: its modules cannot be rebuilt")


def check_output(path: str | os.PathLike, *, force: bool = False, inputs: Sequence = ()) -> Path:
    """Validate ``-o`` of convert/fold before any work: a recipe directory (``replay.is_dir_output``)
    or a model file (``.pt``, ``.pt2``)."""
    if is_dir_output(path):
        return replay.check_dir_output(path, force=force, inputs=inputs)
    return check_output_path(path, force=force, inputs=inputs)


def check_recipe_base(model: nn.Module, path: str | os.PathLike) -> None:
    """Before any work: a recipe output needs a base the tool can rebuild (not a pickle)."""
    if is_dir_output(path):
        try:
            describe_base(model)
        except NormSurgeonError as e:
            raise NormSurgeonError(f"-o {path}: {e}") from None


def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, force: bool = False,
         input_path: str | os.PathLike | None = None) -> Path:
    """Save as a recipe directory (``-o DIR/``, see ``replay.save``) or a ``.pt``/``.pt2`` file."""
    if is_dir_output(path):
        return replay.save(model, path, example_inputs=example_inputs, force=force, input_path=input_path)
    return save_model(model, path, example_inputs=example_inputs, force=force, input_path=input_path)


def convert(model: nn.Module, to: str | None = "bn", *, example_inputs: Any = None,
            inputs_file: str | os.PathLike | None = None, extra_inputs: Iterable | None = None,
            **kwargs: Any) -> tuple[nn.Module, ConvertReport]:
    """``passes.convert.convert`` (keyword arguments go there), with the user's inputs from
    ``inputs_file`` (``--inputs``) joining its checks."""
    extra = list(extra_inputs or [])
    if inputs_file is not None:
        extra += load_inputs_file(inputs_file, _convert_pass._inputs(model, example_inputs))
    return _convert_pass.convert(model, to, example_inputs=example_inputs, extra_inputs=extra, **kwargs)


def fold(model: nn.Module, example_inputs: Any, *, inputs_file: str | os.PathLike | None = None,
         extra_inputs: Iterable | None = None, **kwargs: Any) -> tuple[nn.Module, FoldReport]:
    """``passes.fold.fold`` (keyword arguments go there), with the user's inputs from ``inputs_file``
    (``--inputs``) joining its verification."""
    extra = list(extra_inputs or [])
    if inputs_file is not None:
        extra += load_inputs_file(inputs_file, example_inputs)
    return _fold_pass.fold(model, example_inputs, extra_inputs=extra, **kwargs)


def inspect(model: nn.Module, example_inputs: Any = None):
    """Every normalization layer of ``model`` (``find.InspectReport``)."""
    return _inspect(model, graph=capture(model, as_call_args(example_inputs) if example_inputs is not None else None))


def check_calibration_batch(model: nn.Module, batch: CallArgs, where: str) -> None:
    """One calibration batch through the model (eval) before any work: wrong data fails fast, in one line."""
    import torch

    modes = eval_modes(model)
    try:
        with torch.no_grad():
            batch.call(model)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"calibration data {where}: the model rejects it "
                               f"({one_line(e, typed=True, limit=200)})") from e
    finally:
        restore_modes(modes)


def export(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, fold: bool = False,
           fold_rtol: float = 1e-5, inplace: bool = False, inputs_file: str | os.PathLike | None = None,
           extra_inputs: Iterable | None = None, progress=None, **export_kwargs: Any) -> ExportReport:
    """Export ``model`` to ONNX, verified in ONNX Runtime (``onnx.export_onnx``; keyword arguments go
    there); with ``fold`` the BatchNorms are folded first and the fold report is ``report.fold``.

    The fold is verified against the original model by the fold pass; if that verification fails,
    nothing is exported and ``VerificationError`` is raised (its ``report`` is the fold report). The
    norm ops of the unfolded model are counted on its captured graph (``report.norm_ops_unfolded``),
    so the model is exported once. ``model`` is folded in place only with ``inplace=True``.
    """
    ci = as_call_args(example_inputs)
    extra = list(extra_inputs or [])
    if inputs_file is not None:
        extra += load_inputs_file(inputs_file, ci)
    fold_report: FoldReport | None = None
    unfolded = None
    if fold:
        if progress is not None:
            progress("folding")
        graph = capture(model, ci)
        unfolded = norm_ops_on_graph(find_norms(graph))
        model, fold_report = _fold_pass.fold(model, ci, graph=graph, inplace=inplace, rtol=fold_rtol,
                                             extra_inputs=extra)
        if fold_report.passed is False:
            err = VerificationError(f"the folded model's outputs do not match ({fold_report.summary()}); "
                                    "nothing exported")
            err.report = fold_report
            raise err
    report = export_onnx(model, ci, path, extra_inputs=extra, progress=progress, **export_kwargs)
    if fold_report is not None:
        report.fold = fold_report
        report.norm_ops_unfolded = unfolded
        report.notes.append("ONNX verified against the folded PyTorch model; the fold itself was verified "
                            "against the original (see the fold report)")
    return report


def norm_ops_on_graph(sites) -> dict[str, int]:
    """Norm sites counted by the ONNX op each exports as (hand-written ones as decomposed_* patterns)."""
    counts: dict[str, int] = {}
    for s in sites:
        key = f"decomposed_{s.kind}" if s.source == "pattern" else _ONNX_OP.get(s.kind, s.kind)
        counts[key] = counts.get(key, 0) + 1
    return counts
