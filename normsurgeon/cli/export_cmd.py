"""`normsurgeon export`: export to ONNX, verify in ONNX Runtime, count the normalization ops."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click
from rich.markup import escape

from ..errors import VerificationError
from .common import emit, guarded, load_from_options, model_options, output_options, progress_console


@contextlib.contextmanager
def _status(enabled: bool = True):
    """A spinner on stderr (only on a terminal); yields a callback that updates its text."""
    console = progress_console()
    if not enabled or not console.is_terminal:
        yield lambda message: None
        return
    with console.status("starting") as status:
        yield lambda message: status.update(escape(message))  # "loading run[/final].pt": text, not markup


@click.command("export")
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--fold", "do_fold", is_flag=True, help="Fold BatchNorms into neighbouring layers first.")
@click.option("--opset", type=click.IntRange(7, 30), default=None, help="ONNX opset (default: the exporter's).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto = dynamo, falling back to TorchScript when dynamo fails.")
@click.option("--static", is_flag=True,
              help="Keep every dimension at the example's size (default: batch and token sequence are dynamic).")
@click.option("--dynamic-batch", is_flag=True,
              help="Require a dynamic batch: fail instead of falling back to static shapes.")
@click.option("--dynamic-seq", is_flag=True,
              help="Require a dynamic sequence (token inputs): fail instead of falling back to static shapes.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None,
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional).")
@click.option("--random-inputs", "num_random", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Random input sets to verify on, besides the example inputs.")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="Pass if max relative error (max abs error / max |expected|) <= rtol ...")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="... or max abs error <= atol.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--keep-failed", is_flag=True,
              help="Write the .onnx even when its verification fails (for inspection); default: nothing written.")
@output_options
@guarded
def export(model, trust, imports, weights, input_shapes, input_dtypes, output, do_fold, opset, exporter,
           static, dynamic_batch, dynamic_seq, inputs_file, num_random, rtol, atol, force, keep_failed, as_json, debug):
    """Export MODEL to ONNX and prove it in ONNX Runtime.

    The batch dimension and the sequence dimension of token inputs are dynamic (--static: the example's
    shapes); a model that cannot export them dynamic is exported static, and the report says why.
    Verifies the file against PyTorch on the example inputs, random ones, two other sizes of each dynamic
    dimension (batch 1 and 8; two sequence lengths within the model's limit) and --inputs; counts
    normalization ops as exported and after ONNX Runtime's optimizations.
    Exit 1 when verification fails; the file is then not written unless --keep-failed. With --fold, a fold
    whose own verification fails is not exported (exit 1).
    """
    from .. import api
    from ..saving import check_output_path

    model_path = Path(model) if Path(model).exists() else None
    read = [model_path, weights, inputs_file]  # files this command reads: -o never replaces them
    check_output_path(output, force=force, inputs=read, suffixes=(".onnx",))  # fail before loading
    with _status() as progress:
        progress(f"loading {model}")
        loaded = load_from_options(model, trust, imports, weights, input_shapes, input_dtypes, need_inputs=True)
        try:
            # the CLI owns the model it loaded: fold it in place (no second copy in memory)
            # a .pt2 goes as its program: --fold folds the program's own graph
            target = loaded.program if loaded.program is not None else loaded.model
            report = api.export(target, loaded.example_inputs, output, fold=do_fold, inplace=True,
                                inputs_file=inputs_file, opset=opset, static=static,
                                # an absent flag is None: dynamic where possible, static with a note otherwise
                                dynamic_batch=dynamic_batch or None, dynamic_seq=dynamic_seq or None,
                                rtol=rtol, atol=atol, num_random=num_random, force=force,
                                progress=progress, exporter=exporter, input_path=loaded.path,
                                keep_failed=keep_failed)
        except VerificationError as e:
            if getattr(e, "report", None) is not None:
                emit(e.report, as_json)
            raise
    emit(report, as_json)
    v = report.verify
    if v is not None and not v.passed:
        failed = [c.name for c in v.checks if not c.passed]
        where = "the file was written for inspection" if report.written else \
            "nothing written; --keep-failed writes it for inspection"
        raise VerificationError(
            f"{output} disagrees with PyTorch in ONNX Runtime on {len(failed)} of {len(v.checks)} input sets "
            f"({', '.join(failed)}): max abs {v.max_abs_error:.3g} > atol {atol:g} and max rel "
            f"{v.max_rel_error:.3g} > rtol {rtol:g} ({where})")
