"""`normsurgeon export`: export to ONNX, verify in ONNX Runtime, count the normalization ops."""

from __future__ import annotations

import contextlib

import click
from rich.markup import escape

from ..errors import VerificationError
from .common import (PlainProgress, emit, force_option, guarded, model_options, output_options, progress_console,
                     tolerance_options)


@contextlib.contextmanager
def _status(enabled: bool = True):
    """A spinner on stderr on a terminal, plain lines for slow work otherwise (``PlainProgress``);
    yields a callback that updates its text."""
    console = progress_console()
    if not enabled:
        yield lambda message: None
        return
    if not console.is_terminal:
        yield PlainProgress()
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
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional; "
                   "'normsurgeon inputs' writes the layout).")
@click.option("--random-inputs", "num_random", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Random input sets to verify on, besides the example inputs.")
@tolerance_options
@force_option
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

    with _status() as progress:
        try:
            # a .pt2 goes as its program: --fold folds the program's own graph; a loaded model is folded in
            # place (the command owns it: no second copy in memory)
            report = api.export(model, None, output, fold=do_fold, inputs_file=inputs_file, opset=opset,
                                static=static, trust=trust, imports=imports, weights=weights,
                                input_shapes=input_shapes, input_dtypes=input_dtypes,
                                # an absent flag is None: dynamic where possible, static with a note otherwise
                                dynamic_batch=dynamic_batch or None, dynamic_seq=dynamic_seq or None,
                                rtol=rtol, atol=atol, num_random=num_random, force=force,
                                progress=progress, exporter=exporter, keep_failed=keep_failed)
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
            f"({', '.join(failed)}): max abs {v.max_abs_error:.3g} > atol {v.atol:g} and max rel "
            f"{v.max_rel_error:.3g} > rtol {v.rtol:g} ({where})")
