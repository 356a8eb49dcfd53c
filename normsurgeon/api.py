"""Everything the command line can do, as Python functions: the CLI parses options, calls one of
these and renders what it returns; nothing a command does lives only in the CLI.

    loaded = api.load("model.pt", trust=True, input_shapes=["1,3,224,224"])
    report = api.inspect(loaded.model, loaded.example_inputs)
    folded, report = api.fold(loaded.model, loaded.example_inputs, inplace=True, inputs_file="real.pt")
    report = api.export(loaded.model, loaded.example_inputs, "m.onnx", fold=True)
    api.save(folded, "folded/", example_inputs=loaded.example_inputs)   # a recipe directory
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch.nn as nn
from torch.export import ExportedProgram

from .bench import measure_latency as bench  # noqa: F401 - the `bench` command
from .calibrate import (CalibrationReport, calibrate, example_from_data, load_calibration_data,  # noqa: F401
                        shard_files, synthetic_batches)
from .demo import run_demo as demo  # noqa: F401 - the `demo` command
from .errors import NormSurgeonError, VerificationError, one_line
from .find import find_norms, inspect as _inspect
from .graph import capture, eval_modes, restore_modes
from .inputs import CallArgs, as_call_args, inputs_from_shapes, int_input_bounds, named_after
from .input_files import InputsReport, input_layout, save_random_inputs
from .loading import (LoadedModel, check_output_path, check_picklable, check_program_output, load_model, program_inputs,  # noqa: F401
                      program_module, save_model)
from .onnx import ExportReport, export_onnx
from .onnx import fold as _onnx_fold
from .passes.convert import ConvertReport, insert_ffn_bn, validate as validate_convert  # noqa: F401
from .passes import convert as _convert_pass
from .passes import fold as _fold_pass
from .passes.fold import FoldReport
from .recipe import describe_base, factory_base, set_base, transformers_base
from . import replay
from .replay import apply_recipe, is_dir_output, is_recipe_dir  # noqa: F401
from .verify import load_inputs_file, tolerance_for

__all__ = ["load", "inspect", "write_inputs", "fold", "convert", "rotate", "insert_ffn_bn", "calibrate", "load_calibration_data",
           "synthetic_batches", "check_calibration_batch", "calibrate_files", "recalibrate", "validate_convert",
           "export", "bench", "demo", "save_model", "save", "check_output", "check_recipe_base", "apply_recipe",
           "load_inputs_file"]

# How each norm kind shows up in an exported ONNX graph (op type, or the counting's decomposed_* key).
_ONNX_OP = {"batchnorm": "BatchNormalization", "layernorm": "LayerNormalization", "groupnorm": "GroupNormalization",
            "instancenorm": "InstanceNormalization", "rmsnorm": "RMSNormalization"}


def load(model: str | os.PathLike, *, trust: bool = False, imports: Sequence[str] = (),
         weights: str | os.PathLike | None = None, input_shapes: Sequence[str] = (),
         input_dtypes: Sequence[str] = (), need_inputs: bool = False, map_weights: bool = False) -> LoadedModel:
    """Load a model as every command does, with example inputs from ``input_shapes`` or the model.

    A recipe directory (``save``) is rebuilt without unpickling anything (``trust`` is needed only for
    a factory base other than ``normsurgeon.zoo:NAME``). The
    model remembers how it was built (``normsurgeon.recipe``), so what the passes do to it can be
    saved as a recipe. Integer inputs drawn for ``input_shapes`` stay below the size of the embedding
    that consumes them (or the config's vocabulary). ``map_weights``: a recipe directory's weights are
    views of a private mapping of its file rather than read into memory, as transformers maps a
    checkpoint (for a model whose weights are about to be copied elsewhere whole)."""
    if is_recipe_dir(model):
        if weights is not None:
            raise NormSurgeonError("`weights` goes with a package.module:factory spec, not with a recipe directory")
        loaded = replay.load_dir(model, trust=trust, imports=imports, map_weights=map_weights)
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
        raise NormSurgeonError("`input_dtypes` needs `input_shapes`")
    if loaded.example_inputs is not None and loaded.program is None:
        # a file may name a positional input by its forward parameter (pixel_values), as `inputs` writes it
        loaded.example_inputs = named_after(as_call_args(loaded.example_inputs), loaded.model)
    if need_inputs and loaded.example_inputs is None:
        raise NormSurgeonError(f"{model}: cannot derive example inputs for this model; pass `input_shapes` "
                               "(e.g. `input_shapes=['1,3,224,224']`)")
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
    """Before any work: a recipe output needs a base the tool can rebuild (not a pickle); a ``.pt``
    output, a model torch.save can pickle (no parametrized modules)."""
    if is_dir_output(path):
        try:
            describe_base(model)
        except NormSurgeonError as e:
            raise NormSurgeonError(f"`output` {path}: {e.template}") from None
    elif Path(path).suffix.lower() in (".pt", ".pth") and isinstance(model, nn.Module):
        check_picklable(model, Path(path))


def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, force: bool = False,
         input_path: str | os.PathLike | None = None, inputs: Sequence = ()) -> Path:
    """Save as a recipe directory (``-o DIR/``, see ``replay.save``) or a ``.pt``/``.pt2`` file."""
    if is_dir_output(path):
        return replay.save(model, path, example_inputs=example_inputs, force=force, input_path=input_path,
                           inputs=inputs)
    return save_model(model, path, example_inputs=example_inputs, force=force, input_path=input_path, inputs=inputs)


def _save(model: nn.Module, path: Any, mapped: Any, **kwargs: Any) -> Path:
    """``save``, into the output ``mapped_output.prepare`` began (``mapped``) where there is one."""
    if mapped is None:
        return save(model, path, **kwargs)
    return replay.save(model, path, mapped=mapped, **kwargs)


def _resolve(model: Any, example_inputs: Any, load_options: dict, *, need_inputs: bool = True):
    """A path or ``package.module:factory`` spec is loaded (``load``; a ``.pt2`` gives its program); a
    model object is used as given. Returns (model, example inputs, the file it came from)."""
    if isinstance(model, (str, os.PathLike)):
        loaded = load(model, need_inputs=need_inputs, **load_options)
        target = loaded.program if loaded.program is not None else loaded.model
        ex = example_inputs if example_inputs is not None else loaded.example_inputs
        if isinstance(target, nn.Module) and ex is not None:
            ex = named_after(as_call_args(ex), target)
        return target, ex, loaded.path, True
    given = [k for k, v in load_options.items() if v]
    if given:
        raise NormSurgeonError(f"{', '.join(f'`{k}`' for k in given)} go(es) with a model path or spec, "
                               "not with a model object")
    if isinstance(model, nn.Module) and example_inputs is not None:
        example_inputs = named_after(as_call_args(example_inputs), model)
    return model, example_inputs, None, False


def _spec_path(model: Any) -> Path | None:
    return Path(model) if isinstance(model, (str, os.PathLike)) and Path(model).exists() else None


def convert(model: nn.Module | str | os.PathLike, to: str | None = "bn", *, example_inputs: Any = None,
            output: str | os.PathLike | None = None, force: bool = False,
            inputs_file: str | os.PathLike | None = None, extra_inputs: Iterable | None = None,
            calibrate_file: str | os.PathLike | None = None, calibrate_synthetic: int | None = None,
            batch_size: int | None = None, trust: bool = False, imports: Sequence[str] = (),
            weights: str | os.PathLike | None = None, input_shapes: Sequence[str] = (),
            input_dtypes: Sequence[str] = (), **kwargs: Any) -> tuple[nn.Module, ConvertReport]:
    """``passes.convert.convert`` (its keyword arguments go there) with everything the ``convert``
    command adds: ``model`` may be a path or spec (loaded as ``load`` does with ``trust``, ``imports``,
    ``weights``, ``input_shapes``, ``input_dtypes``, and converted in place: it is ours), the user's
    inputs from ``inputs_file`` join its checks, the BatchNorms are recalibrated on ``calibrate_file``
    (or ``calibrate_synthetic`` random batches), and the result is saved to ``output`` (a recipe
    directory or ``.pt``/``.pt2``; checked before any work, never the input, an existing one only with
    ``force``). Nothing is written when the exact swaps' verification fails. ``report.output`` says
    what was written (None: nothing)."""
    ffn_bn = kwargs.get("ffn_bn", False)
    validate_convert(to, kwargs.get("groups"), ffn_bn, kwargs.get("ffn_bn_position", "after-first"),
                     kwargs.get("ffn_bn_init", "fresh"), kwargs.get("progressive"),
                     kwargs.get("pn_warmup_steps", 4000), kwargs.get("pn_groups"))
    if not ffn_bn and (kwargs.get("ffn_bn_position", "after-first") != "after-first"
                       or kwargs.get("ffn_bn_init", "fresh") != "fresh"):
        raise NormSurgeonError("`ffn_bn_position`/`ffn_bn_init` go with `ffn_bn=True`")
    if kwargs.get("untie") and to != "rms":
        raise NormSurgeonError("`untie=True` goes with `to='rms'` (or fold's `affine=True`)")
    if calibrate_file is not None and calibrate_synthetic is not None:
        raise NormSurgeonError("give either `calibrate_file` or `calibrate_synthetic`, not both")
    if calibrate_synthetic is not None and calibrate_synthetic < 1:
        raise NormSurgeonError(f"`calibrate_synthetic` must be >= 1, got {calibrate_synthetic}")
    if batch_size is not None and calibrate_file is None:
        raise NormSurgeonError("`batch_size` goes with `calibrate_file`")
    if (calibrate_file is not None or calibrate_synthetic is not None) and kwargs.get("calibrate_batches") is not None:
        raise NormSurgeonError("give either `calibrate_batches` or `calibrate_file`/`calibrate_synthetic`, not both")
    # every file this call reads: `output` never replaces or deletes one of them (saving.guard_inputs)
    read = [_spec_path(model), weights, inputs_file, calibrate_file]
    out = check_output(output, force=force, inputs=read) if output is not None else None
    model, example_inputs, input_path, owned = _resolve(
        model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                    input_dtypes=input_dtypes))
    _convert_pass.check_module(model)  # before reading files against a model convert cannot take
    if owned:
        kwargs.setdefault("inplace", True)
    if out is not None and isinstance(model, nn.Module):
        check_recipe_base(model, output)
    extra = list(extra_inputs or [])
    if inputs_file is not None:
        extra += load_inputs_file(inputs_file, named_after(_convert_pass._inputs(model, example_inputs), model))
    if calibrate_file is not None:
        ci = _convert_pass._inputs(model, example_inputs)
        kwargs["calibrate_batches"] = load_calibration_data(calibrate_file, named_after(ci, model),
                                                            batch_size=batch_size)
        check_calibration_batch(model, kwargs["calibrate_batches"][0], str(calibrate_file))
    elif calibrate_synthetic is not None:
        kwargs["calibrate_batches"] = synthetic_batches(_convert_pass._inputs(model, example_inputs),
                                                        calibrate_synthetic)
    converted, report = _convert_pass.convert(model, to, example_inputs=example_inputs, extra_inputs=extra, **kwargs)
    report.output = None
    failed = report.verify is not None and report.verify.get("passed") is False
    if out is not None and not failed:
        report.output = str(save(converted, output, example_inputs=example_inputs, force=force,
                                 input_path=input_path, inputs=read))
    return converted, report


def fold(model: nn.Module | ExportedProgram | str | os.PathLike, example_inputs: Any = None, *,
         output: str | os.PathLike | None = None, force: bool = False,
         inputs_file: str | os.PathLike | None = None, extra_inputs: Iterable | None = None,
         trust: bool = False, imports: Sequence[str] = (), weights: str | os.PathLike | None = None,
         input_shapes: Sequence[str] = (), input_dtypes: Sequence[str] = (),
         **kwargs: Any) -> tuple[nn.Module | ExportedProgram, FoldReport]:
    """``passes.fold.fold`` (its keyword arguments go there) with everything the ``fold`` command adds:
    ``model`` may be a path or spec (loaded as ``load`` does, and folded in place: it is ours; a
    ``.pt2`` is folded in its own graph), the user's inputs from ``inputs_file`` join the verification,
    and a verified result is saved to ``output`` (a recipe directory, ``.pt`` or ``.pt2``; checked before
    any work, never the input, an existing one only with ``force``). ``report.output`` says what was
    written (None: nothing), ``report.dry_run`` whether no ``output`` was asked for.

    An ``.onnx`` path or ``onnx.ModelProto`` is folded in its own graph and verified in ONNX Runtime
    (``onnx.fold.fold_file``; ``output`` is an ``.onnx``); the folded ``ModelProto`` is returned.

    ``stream=True`` (with ``affine=True``, a transformers directory and ``output=DIR/``; ``untie``,
    ``max_shard_mb``) folds the checkpoint shard by shard without loading it (``shard_stream``):
    returns (the output directory, a ``StreamReport``)."""
    if kwargs.get("untie") and not kwargs.get("affine"):
        raise NormSurgeonError("`untie=True` goes with `affine=True`")
    if "max_shard_mb" in kwargs and not kwargs.get("stream"):
        raise NormSurgeonError("`max_shard_mb` goes with `stream=True`")
    if kwargs.pop("stream", False):
        return _fold_streamed(model, output, force, kwargs, dict(
            example_inputs=example_inputs, inputs_file=inputs_file, extra_inputs=extra_inputs, trust=trust,
            imports=imports, weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes))
    if output is not None and kwargs.get("verify") is False:
        raise NormSurgeonError("`output` is written only after the fold is verified: drop `verify=False`")
    if _onnx_fold.is_onnx(model):
        if kwargs.pop("affine", False) or kwargs.pop("untie", False):
            raise NormSurgeonError("`affine=True` folds the norms of a PyTorch module, not of an .onnx graph")
        _onnx_fold.refuse_load_options(dict(imports=imports, weights=weights, input_dtypes=input_dtypes,
                                            example_inputs=example_inputs))
        return _onnx_fold.fold_file(model, output=output, force=force, inputs_file=inputs_file,
                                    extra_inputs=extra_inputs, input_shapes=input_shapes, **kwargs)
    read = [_spec_path(model), weights, inputs_file]  # `output` never replaces or deletes one of them
    out = check_output(output, force=force, inputs=read) if output is not None else None
    # an affine fold in place keeps every tensor of the model: its output's weights can be written first
    # and folded on the file's own pages (mapped_output); a BatchNorm fold removes tensors (checked below)
    keeps = bool(kwargs.get("affine") and not kwargs.get("untie") and kwargs.get("inplace", True))
    with _early_output(model, output, out, keeps) as early:
        model, example_inputs, input_path, owned = _resolve(
            model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                        input_dtypes=input_dtypes, **_mapped_load(model, output, keeps)))
        program = isinstance(model, ExportedProgram)
        if program and kwargs.get("affine"):
            raise NormSurgeonError("`affine=True` folds the norms of a module, not of a .pt2 program")
        if owned and not program:
            kwargs.setdefault("inplace", True)
        if out is not None:
            if program:
                check_program_output(out)
            else:
                check_recipe_base(model, output)
        extra = list(extra_inputs or [])
        if inputs_file is not None:
            ex = example_inputs if example_inputs is not None or not program else program_inputs(model)
            extra += load_inputs_file(inputs_file, ex)
        keeps = keeps and owned and not program \
            and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        with _output_first(model, output, out, keeps, early) as mapped:
            folded, report = _fold_pass.fold(model, example_inputs, extra_inputs=extra, **kwargs)
            report.dry_run = out is None
            if out is not None and report.passed:
                report.output = str(_save(folded, output, mapped, example_inputs=example_inputs, force=force,
                                          input_path=input_path, inputs=read))
    return folded, report


def _mapped_load(model: Any, output: Any, keeps: bool) -> dict:
    """``map_weights=True`` for ``load`` when the call will write its output first (``_output_first``) from
    a large recipe directory: its weights are then copied file to file, never read into memory."""
    from . import mapped_output

    if not keeps or output is None or not is_dir_output(output) or not isinstance(model, (str, os.PathLike)) \
            or not is_recipe_dir(model) or not mapped_output.available():
        return {}
    try:
        size = (Path(model) / replay.WEIGHTS_FILE).stat().st_size
    except OSError:
        return {}
    return {"map_weights": True} if size >= mapped_output.MIN_BYTES else {}


@contextlib.contextmanager
def _early_output(model: Any, output: Any, out: Path | None, keeps: bool) -> Iterator[Any]:
    """``mapped_output.start_early`` before the load, for a call that will write its output first
    (``_output_first``) from a directory's ``model.safetensors``, a recipe's or a transformers
    checkpoint's: the copy runs beside the load. Yields it, or None; closes it after (stopped and
    removed unless ``prepare`` took it over)."""
    early = None
    if out is not None and keeps and is_dir_output(output) and isinstance(model, (str, os.PathLike)) \
            and Path(model).is_dir():
        from . import mapped_output

        early = mapped_output.start_early(Path(model) / replay.WEIGHTS_FILE, out.resolve(), replay.WEIGHTS_FILE)
    try:
        yield early
    finally:
        if early is not None:
            early.close()


@contextlib.contextmanager
def _output_first(model: Any, output: Any, out: Path | None, keeps: bool, early: Any = None) -> Iterator[Any]:
    """``mapped_output.prepare`` for a recipe directory output of a model this call loaded and rewrites in
    place keeping every tensor (``keeps``); yields it, or None (the plain save), and closes it after:
    the model becomes plain memory again, and a directory not moved into place is removed. ``early``:
    the copy ``_early_output`` began, for ``prepare`` to take over."""
    mapped = None
    if out is not None and keeps and is_dir_output(output) and isinstance(model, nn.Module):
        from . import mapped_output

        mapped = mapped_output.prepare(model, out.resolve(), replay.WEIGHTS_FILE, early=early)
    try:
        yield mapped
    finally:
        if mapped is not None:
            mapped.close()


def _fold_streamed(model: Any, output: Any, force: bool, kwargs: dict, unused: dict):
    """``fold(DIR, affine=True, stream=True, output=OUT/)``: ``shard_stream.fold_dir`` (the plan from a
    tiny twin, the checkpoint folded shard by shard); returns (the output directory, its report)."""
    from . import shard_stream

    if not kwargs.pop("affine", False):
        raise NormSurgeonError("`stream=True` streams the norm-affine fold: pass `affine=True`")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    given = [k for k, v in {**unused, **kwargs}.items()
             if k not in ("untie", "max_shard_mb") and v is not None and v is not False and v != ()]
    if given:
        raise NormSurgeonError(f"`{given[0]}` does not go with `stream=True` (it plans on a tiny twin and checks "
                               "each site on the real weights)")
    if not isinstance(model, (str, os.PathLike)):
        raise NormSurgeonError("`stream=True` reads a transformers directory (a path), not a model object")
    return shard_stream.fold_dir(model, output=output, force=force,
                                 **{k: v for k, v in kwargs.items() if k in ("untie", "max_shard_mb")})


def inspect(model: nn.Module | str | os.PathLike, example_inputs: Any = None, *, trust: bool = False,
            imports: Sequence[str] = (), weights: str | os.PathLike | None = None, input_shapes: Sequence[str] = (),
            input_dtypes: Sequence[str] = ()):
    """Every normalization layer of ``model`` (``find.InspectReport``), and the inputs it was called with
    (``report.inputs``: name, shape, dtype; the layout ``--inputs`` and calibration files use). ``model``
    may be a path or spec (loaded as ``load`` does), an ``.onnx`` path or an ``onnx.ModelProto``
    (``onnx.inspect.inspect_onnx``: its graph's norm ops and decomposed norms)."""
    if _onnx_fold.is_onnx(model):
        _onnx_fold.refuse_load_options(dict(imports=imports, weights=weights, input_shapes=input_shapes,
                                            input_dtypes=input_dtypes, example_inputs=example_inputs))
        from .onnx.inspect import inspect_onnx

        return inspect_onnx(model)
    model, example_inputs, _, _ = _resolve(
        model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                    input_dtypes=input_dtypes), need_inputs=False)
    if isinstance(model, ExportedProgram):
        example_inputs = example_inputs if example_inputs is not None else program_inputs(model)
        model = program_module(model)
    ci = as_call_args(example_inputs) if example_inputs is not None else None
    report = _inspect(model, graph=capture(model, ci))
    report.inputs = input_layout(ci) if ci is not None else None
    return report


def write_inputs(model: nn.Module | str | os.PathLike, output: str | os.PathLike, example_inputs: Any = None, *,
           batch: int | None = None, shards: int = 1, seed: int = 0, force: bool = False, trust: bool = False,
           imports: Sequence[str] = (), weights: str | os.PathLike | None = None, input_shapes: Sequence[str] = (),
           input_dtypes: Sequence[str] = ()) -> InputsReport:
    """Write random inputs for ``model`` in the layout its input files take (``--inputs``, ``--data``,
    ``--calibrate``): a ``.pt`` dict, one tensor per input name, ``batch`` samples (default: the
    example's). A template for real data, and stand-ins to try every command. With ``shards`` > 1,
    ``output`` names one file per rank with ``{rank}`` (``calib-{rank}.pt``), as ``torchrun`` reads them."""
    model, example_inputs, input_path, _ = _resolve(
        model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                    input_dtypes=input_dtypes))
    if isinstance(model, ExportedProgram):
        example_inputs = example_inputs if example_inputs is not None else program_inputs(model)
    return save_random_inputs(as_call_args(example_inputs), output, batch=batch, shards=shards, seed=seed, force=force,
                              input_path=input_path, inputs=[weights])


def rotate(model: nn.Module | str | os.PathLike, example_inputs: Any = None, *, seed: int = 0,
           output: str | os.PathLike | None = None, force: bool = False,
           inputs_file: str | os.PathLike | None = None, extra_inputs: Iterable | None = None,
           trust: bool = False, imports: Sequence[str] = (), weights: str | os.PathLike | None = None,
           input_shapes: Sequence[str] = (), input_dtypes: Sequence[str] = (), **kwargs: Any):
    """``passes.rotate.rotate`` (its keyword arguments go there): the residual stream rotated by a
    seeded orthogonal matrix, verified, with what the ``rotate`` command adds: ``model`` may be a path
    or spec (loaded as ``load`` does, rotated in place: it is ours), the user's inputs from
    ``inputs_file`` join the check, and a rotated model is saved to ``output`` (checked before any work,
    never the input, an existing one only with ``force``; a recipe directory of a transformers model
    also gets its ``config.json``). ``report.output`` says what was written (None: nothing).

    ``stream=True`` (a transformers directory, ``output=DIR/``, ``max_shard_mb``) rotates the checkpoint
    tensor by tensor without loading it (``shard_rotate``): returns (the output directory, its report)."""
    from .passes.rotate import rotate as _rotate

    if seed < 0:
        raise NormSurgeonError(f"`seed` must be >= 0, got {seed}")
    if "max_shard_mb" in kwargs and not kwargs.get("stream"):
        raise NormSurgeonError("`max_shard_mb` goes with `stream=True`")
    if kwargs.pop("stream", False):
        return _rotate_streamed(model, seed, output, force, kwargs, dict(
            example_inputs=example_inputs, inputs_file=inputs_file, extra_inputs=extra_inputs, trust=trust,
            imports=imports, weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes))
    read = [_spec_path(model), weights, inputs_file]  # `output` never replaces or deletes one of them
    out = check_output(output, force=force, inputs=read) if output is not None else None
    keeps = kwargs.get("inplace", True)  # a rotation keeps every tensor
    with _early_output(model, output, out, keeps) as early:
        model, example_inputs, input_path, owned = _resolve(
            model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                        input_dtypes=input_dtypes, **_mapped_load(model, output, keeps)))
        if isinstance(model, ExportedProgram):
            raise NormSurgeonError("rotate works on a module, not on a .pt2 program")
        if owned:
            kwargs.setdefault("inplace", True)
        if out is not None:
            check_recipe_base(model, output)
        extra = list(extra_inputs or [])
        if inputs_file is not None:
            extra += load_inputs_file(inputs_file, example_inputs)
        with _output_first(model, output, out, owned and kwargs.get("inplace"), early) as mapped:
            rotated, report = _rotate(model, example_inputs, seed=seed, extra_inputs=extra, **kwargs)
            report.output = None
            if out is not None and report.rotated:
                report.output = str(_save(rotated, output, mapped, example_inputs=example_inputs, force=force,
                                          input_path=input_path, inputs=read))
    return rotated, report


def _rotate_streamed(model: Any, seed: int, output: Any, force: bool, kwargs: dict, unused: dict):
    """``rotate(DIR, stream=True, output=OUT/)``: ``shard_rotate.rotate_dir`` (the plan from a tiny twin,
    the checkpoint rotated tensor by tensor); returns (the output directory, its report)."""
    from . import shard_rotate

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    given = [k for k, v in {**unused, **kwargs}.items()
             if k != "max_shard_mb" and v is not None and v is not False and v != ()]
    if given:
        raise NormSurgeonError(f"`{given[0]}` does not go with `stream=True` (it plans on a tiny twin and checks "
                               "each tensor on the real weights)")
    if not isinstance(model, (str, os.PathLike)):
        raise NormSurgeonError("`stream=True` reads a transformers directory (a path), not a model object")
    return shard_rotate.rotate_dir(model, output=output, seed=seed, force=force,
                                   **{k: v for k, v in kwargs.items() if k == "max_shard_mb"})


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
    ``max_batches`` counts this rank's batches. Without ``example_inputs`` (a factory that declares
    none) the data say what the inputs are (``calibrate.example_from_data``).
    """
    import torch.distributed as dist

    from .distributed import AGREED, failed_ranks

    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if on else (0, 1)
    error: NormSurgeonError | None = None
    files: list = []
    batches: list[CallArgs] = []
    try:
        files = shard_files(data, rank, world)
        if example_inputs is None:
            example_inputs = example_from_data(files[0], model)
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
            err = error.prefixed(f"rank {rank}: ")
            setattr(err, AGREED, True)  # every rank raises here: they leave the process group together
            raise err from error
        raise error
    if failed:
        err = NormSurgeonError(f"rank(s) {', '.join(map(str, failed))} of {world} could not use their calibration "
                               "data (their error is on their stderr); nothing calibrated")
        setattr(err, AGREED, True)
        raise err
    report = calibrate(model, batches, max_batches=max_batches, progress=progress, group=group)
    report.files = [str(f) for f in files]
    report.example_inputs = example_inputs  # what the model was called with (not in the JSON)
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
    read = [model_path, weights, *([data] if isinstance(data, (str, os.PathLike)) else data)]
    _refuse_shard_output(output, read)
    out = check_output(output, force=force, inputs=read)  # every rank: fail before any work
    with process_group(device) as ranks:
        loaded = load(model, trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                      input_dtypes=input_dtypes)  # without example inputs, the data's own
        check_recipe_base(loaded.model, output)  # before the work, as fold and convert do
        loaded.model.to(ranks.device)
        report = calibrate_files(loaded.model, loaded.example_inputs, data, batch_size=batch_size,
                                 max_batches=max_batches, progress=progress if ranks.rank == 0 else None)
        if ranks.rank == 0:
            loaded.model.to("cpu")
            # a recipe directory (-o DIR/) keeps the recipe the model carries; its weights are the new statistics
            out = save(loaded.model, output, example_inputs=report.example_inputs, force=force,
                       input_path=loaded.path, inputs=read)
            report.output = str(out)
            report.notes.append(f"wrote {out}" + (f" (rank 0 of {ranks.world_size})" if ranks.distributed else ""))
    return report, ranks.rank


def _refuse_shard_output(output: str | os.PathLike, read: Sequence) -> None:
    """A ``{rank}`` data pattern names files that do not all exist here (other ranks' shards): the
    output may be none of them."""
    import re

    for src in read:
        text = str(src) if isinstance(src, (str, os.PathLike)) else ""
        if "{rank}" not in text:
            continue
        pattern = re.escape(text).replace(re.escape("{rank}"), r"\d+")
        if re.fullmatch(pattern, str(output)) or re.fullmatch(pattern, str(Path(output).resolve())):
            raise NormSurgeonError(f"`output` {output} is one of the `data` shards ({text}); normsurgeon never "
                                   "overwrites its inputs")


def export(model: nn.Module | ExportedProgram | str | os.PathLike, example_inputs: Any, path: str | os.PathLike, *,
           fold: bool = False, fold_rtol: float | None = None, inplace: bool = False,
           inputs_file: str | os.PathLike | None = None, extra_inputs: Iterable | None = None, progress=None,
           trust: bool = False, imports: Sequence[str] = (), weights: str | os.PathLike | None = None,
           input_shapes: Sequence[str] = (), input_dtypes: Sequence[str] = (), **export_kwargs: Any) -> ExportReport:
    """Export ``model`` to ONNX, verified in ONNX Runtime (``onnx.export_onnx``; keyword arguments go
    there); with ``fold`` the BatchNorms are folded first and the fold report is ``report.fold``.

    The fold is verified against the original model by the fold pass; if that verification fails,
    nothing is exported and ``VerificationError`` is raised (its ``report`` is the fold report). The
    norm ops of the unfolded model are counted on its captured graph (``report.norm_ops_unfolded``),
    so the model is exported once. ``model`` is folded in place only with ``inplace=True``. An
    ``ExportedProgram`` (``LoadedModel.program``) is exported as it is or, with ``fold``, its own graph is
    folded first (``passes.fold.fold_program``); its example inputs default to the program's own.
    ``model`` may be a path or spec: loaded as ``load`` does (after ``path`` is checked), and then
    folded in place (it is ours).
    """
    if isinstance(model, (str, os.PathLike)):
        check_output_path(path, force=export_kwargs.get("force", False),
                          inputs=[_spec_path(model), weights, inputs_file], suffixes=(".onnx",))  # before loading
        if progress is not None:
            progress(f"loading {model}")
    model, example_inputs, input_path, owned = _resolve(
        model, example_inputs, dict(trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                                    input_dtypes=input_dtypes))
    if owned:
        inplace = True
        export_kwargs.setdefault("input_path", input_path)
    program = model if isinstance(model, ExportedProgram) else None
    if program is not None:
        model = program_module(program)
    ci = as_call_args(example_inputs) if example_inputs is not None or program is None else program_inputs(program)
    # rtol/atol None: the tolerance table by dtype, as fold and convert take it
    tol = tolerance_for(model, export_kwargs.pop("rtol", None), export_kwargs.pop("atol", None))
    export_kwargs["rtol"] = tol.rtol
    export_kwargs["atol"] = tol.atol if tol.atol is not None else tolerance_for(model).atol
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
                                    "nothing written")
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
        if s.note and s.note.startswith("frozen"):
            continue  # x * scale + shift of buffers: a Mul and an Add in ONNX, no norm op
        key = f"decomposed_{s.kind}" if s.source == "pattern" else _ONNX_OP.get(s.kind, s.kind)
        counts[key] = counts.get(key, 0) + 1
    return counts
