"""`normsurgeon fold`: fold every foldable BatchNorm into its neighbours, verified."""

from __future__ import annotations

import click

from ..errors import VerificationError
from .. import api
from .common import (emit, force_option, guarded, max_shard_option, model_options, output_options, stderr,
                     tolerance_options)


@click.command("fold")
@model_options
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Where to save the folded model: DIR/ (a recipe directory: JSON + safetensors, loads without "
                   "--trust), .pt (pickled module) or .pt2 (torch.export archive); .onnx for an .onnx MODEL. "
                   "Without it: report only.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional; "
                   "'normsurgeon inputs' writes the layout).")
@click.option("--affine", is_flag=True,
              help="Also fold every pre-norm LayerNorm/RMSNorm's scale and shift into the linear layers that read "
                   "it (q/k/v, gate/up, lm_head...), leaving norms without an affine (docs/llm.md).")
@click.option("--untie", is_flag=True,
              help="With --affine: give a tied lm_head its own copy of the embedding so the final norm folds into it.")
@click.option("--stream", is_flag=True,
              help="With --affine and -o DIR/: fold a transformers directory shard by shard, never loading the "
                   "model (plan from a tiny twin of its class, each site checked on the real weights; docs/llm.md).")
@max_shard_option
@tolerance_options
@force_option
@output_options
@guarded
def fold(model, trust, imports, weights, input_shapes, input_dtypes, output, inputs_file, affine, untie, stream,
         max_shard_mb, rtol, atol, force, as_json, debug):
    """Fold the BatchNorms of MODEL into adjacent Linear/Conv layers and check the outputs still match.

    Folds BN after Conv/ConvTranspose/Linear (also through reshapes/permutes, e.g. LeViT's token
    BNs) and BN before Linear or unpadded Conv. Every BN gets a line: folded into what, or skipped
    and why. Verified on the example inputs, random ones and --inputs. Exit 1 if the folded model's
    outputs do not match (nothing written). A .pt2 (torch.export program) is folded in its own graph
    and saved as a .pt2 program; its example inputs come from the program. An .onnx file is folded in
    its own graph and verified in ONNX Runtime (inputs from the graph; --input-shape sizes its dynamic
    dims), saved as .onnx.
    """
    folded, report = api.fold(model, output=output, force=force, inputs_file=inputs_file, rtol=rtol, atol=atol,
                              trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                              input_dtypes=input_dtypes,
                              **({"affine": True} if affine else {}), **({"untie": True} if untie else {}),
                              **({"stream": True} if stream else {}),
                              **({"max_shard_mb": max_shard_mb} if max_shard_mb is not None else {}))
    emit(report, as_json)
    if not as_json and (report.passed or report.dry_run):  # a failure is said once, by the error below
        what = "program" if _is_program(folded) else "model"
        stderr.print(_note(report, what), soft_wrap=True, highlight=False, markup=False)
    if not report.passed:
        raise VerificationError(f"the folded model's outputs do not match ({report.summary()}); nothing written")


def _is_program(obj) -> bool:
    from torch.export import ExportedProgram

    return isinstance(obj, ExportedProgram)


def _note(report, what: str) -> str:
    if report.dry_run:
        return f"dry run: nothing written (pass -o FILE to save the folded {what})"
    return f"saved the folded {what} to {report.output}"
