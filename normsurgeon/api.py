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
from torch.export import ExportedProgram

from .bench import measure_latency as bench  # noqa: F401 - the `bench` command
from .calibrate import (CalibrationReport, calibrate, load_calibration_data, shard_files,  # noqa: F401
                        synthetic_batches)
from .demo import run_demo as demo  # noqa: F401 - the `demo` command
from .errors import NormSurgeonError, VerificationError, one_line
from .find import find_norms, inspect as _inspect
from .graph import capture, eval_modes, restore_modes
from .inputs import CallArgs, as_call_args, inputs_from_shapes, int_input_bounds
from .loading import LoadedModel, check_output_path, load_model, program_inputs, program_module, save_model  # noqa: F401
from .onnx import ExportReport, export_onnx
from .passes.convert import ConvertReport, insert_ffn_bn, validate as validate_convert  # noqa: F401
from .passes import convert as _convert_pass
from .passes import fold as _fold_pass
from .passes.fold import FoldReport
from .recipe import describe_base, factory_base, set_base, transformers_base
from . import replay
from .replay import apply_recipe, is_dir_output, is_recipe_dir  # noqa: F401
from .verify import load_inputs_file

__all__ = ["load", "inspect", "fold", "convert", "rotate", "insert_ffn_bn", "calibrate", "load_calibration_data",
           "synthetic_batches", "check_calibration_batch", "calibrate_files", "recalibrate", "validate_convert",
           "export", "bench", "demo", "save_model", "save", "check_output", "check_recipe_base", "apply_recipe",
           "load_inputs_file"]

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
        out = replay.save(model, path, example_inputs=example_inputs, force=force, input_path=input_path)
        # a transformers model whose classes survived: plain from_pretrained loads the directory too
        from .hf_dir import write_config

        write_config(model, out)
        return out
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


def rotate(model: nn.Module, example_inputs: Any, *, seed: int = 0, inputs_file: str | os.PathLike | None = None,
           extra_inputs: Iterable | None = None, **kwargs: Any):
    """``passes.rotate.rotate``: the residual stream rotated by a seeded orthogonal matrix, verified
    (keyword arguments go there); the user's inputs from ``inputs_file`` join the check."""
    from .passes.rotate import rotate as _rotate

    extra = list(extra_inputs or [])
    if inputs_file is not None:
        extra += load_inputs_file(inputs_file, example_inputs)
    return _rotate(model, example_inputs, seed=seed, extra_inputs=extra, **kwargs)


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


def calibrate_files(model: nn.Module, example_inputs: Any, data: str | os.PathLike | Sequence, *,
                    batch_size: int | None = None, max_batches: int | None = None, progress=None,
                    group=None) -> CalibrationReport:
    """Recompute ``model``'s BatchNorm statistics exactly from tensor files (``calibrate.calibrate``).

    Under an initialized ``torch.distributed`` process group every rank calls this; each reads its own
    shard (``calibrate.shard_files``: ``{rank}`` / ``{world_size}`` in the names, or its share of a list)
    and the statistics merge exactly across ranks. A rank that cannot read or run its shard makes every
    rank raise before any statistics change (no rank is left waiting in a collective).
    ``max_batches`` counts this rank's batches.
    """
    import torch.distributed as dist

    from .distributed import failed_ranks

    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if on else (0, 1)
    error: NormSurgeonError | None = None
    files: list = []
    batches: list[CallArgs] = []
    try:
        files = shard_files(data, rank, world)
        for f in files:
            batches += load_calibration_data(f, example_inputs, batch_size=batch_size)
        device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
        first = batches[0].to(device=device) if device is not None else batches[0]
        check_calibration_batch(model, first, str(files[0]))
    except NormSurgeonError as e:
        error = e
    failed = failed_ranks(error is None, group)
    if error is not None:
        if world > 1:
            raise type(error)(f"rank {rank}: {error}") from error
        raise error
    if failed:
        raise NormSurgeonError(f"rank(s) {', '.join(map(str, failed))} of {world} could not use their calibration "
                               "data (their error is on their stderr); nothing calibrated")
    report = calibrate(model, batches, max_batches=max_batches, progress=progress, group=group)
    report.files = [str(f) for f in files]
    return report


def recalibrate(model: str | os.PathLike, data: str | os.PathLike | Sequence, output: str | os.PathLike, *,
                trust: bool = False, imports: Sequence[str] = (), weights: str | os.PathLike | None = None,
                input_shapes: Sequence[str] = (), input_dtypes: Sequence[str] = (),
                batch_size: int | None = None, max_batches: int | None = None, device: str = "auto",
                force: bool = False, progress=None) -> tuple[CalibrationReport, int]:
    """The ``calibrate`` command: load ``model``, recalibrate it on ``data`` and save it to ``output``.

    Under ``torchrun`` the process group is initialized from its environment (NCCL on GPUs, gloo on the
    CPU; ``device`` ``auto`` takes this rank's GPU when there is one), each rank reads its own shard and
    only rank 0 writes ``output`` (atomically; never the model's own file; an existing file needs
    ``force``). Returns the report and this process's rank.
    """
    from .distributed import process_group

    model_path = Path(model) if Path(model).exists() else None
    out = check_output(output, force=force, inputs=[model_path])  # every rank: fail before any work
    with process_group(device) as ranks:
        loaded = load(model, trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                      input_dtypes=input_dtypes, need_inputs=True)
        loaded.model.to(ranks.device)
        report = calibrate_files(loaded.model, loaded.example_inputs, data, batch_size=batch_size,
                                 max_batches=max_batches, progress=progress if ranks.rank == 0 else None)
        if ranks.rank == 0:
            loaded.model.to("cpu")
            # a recipe directory (-o DIR/) keeps the recipe the model carries; its weights are the new statistics
            out = save(loaded.model, output, example_inputs=loaded.example_inputs, force=force, input_path=loaded.path)
            report.output = str(out)
            report.notes.append(f"wrote {out}" + (f" (rank 0 of {ranks.world_size})" if ranks.distributed else ""))
    return report, ranks.rank


def export(model: nn.Module | ExportedProgram, example_inputs: Any, path: str | os.PathLike, *, fold: bool = False,
           fold_rtol: float | None = None, inplace: bool = False, inputs_file: str | os.PathLike | None = None,
           extra_inputs: Iterable | None = None, progress=None, **export_kwargs: Any) -> ExportReport:
    """Export ``model`` to ONNX, verified in ONNX Runtime (``onnx.export_onnx``; keyword arguments go
    there); with ``fold`` the BatchNorms are folded first and the fold report is ``report.fold``.

    The fold is verified against the original model by the fold pass; if that verification fails,
    nothing is exported and ``VerificationError`` is raised (its ``report`` is the fold report). The
    norm ops of the unfolded model are counted on its captured graph (``report.norm_ops_unfolded``),
    so the model is exported once. ``model`` is folded in place only with ``inplace=True``. An
    ``ExportedProgram`` (``LoadedModel.program``) is exported as it is or, with ``fold``, its own graph is
    folded first (``passes.fold.fold_program``); its example inputs default to the program's own.
    """
    program = model if isinstance(model, ExportedProgram) else None
    if program is not None:
        model = program_module(program)
    ci = as_call_args(example_inputs) if example_inputs is not None or program is None else program_inputs(program)
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
        if program is not None:  # a .pt2: its own graph is folded, a new program exported
            folded, fold_report = _fold_pass.fold_program(program, ci, rtol=fold_rtol, extra_inputs=extra)
            model = program_module(folded)
        else:
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
