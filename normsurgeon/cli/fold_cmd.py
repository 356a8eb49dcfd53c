"""`normsurgeon fold`: fold every foldable BatchNorm into its neighbours, verified."""

from __future__ import annotations

import click

from ..errors import NormSurgeonError, VerificationError
from .. import api
from ..loading import check_program_output
from .common import emit, guarded, load_from_options, model_options, output_options, stderr


@click.command("fold")
@model_options
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Where to save the folded model: DIR/ (a recipe directory: JSON + safetensors, loads without "
                   "--trust), .pt (pickled module) or .pt2 (torch.export archive). Without it: report only.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional).")
@click.option("--rtol", type=float, default=None,
              help="Largest accepted max relative error (max abs error / max |expected output|); a fold "
                   "that exceeds it is rolled back. Default: the tolerance table by dtype (1e-4 float32, "
                   "5e-3 float16, 1.5e-2 bfloat16); a smaller value is raised to those for float16/bfloat16.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.option("--affine", is_flag=True,
              help="Also fold every pre-norm LayerNorm/RMSNorm's scale and shift into the linear layers that read "
                   "it (q/k/v, gate/up, lm_head...), leaving norms without an affine (docs/llm.md).")
@click.option("--untie", is_flag=True,
              help="With --affine: give a tied lm_head its own copy of the embedding so the final norm folds into it.")
@output_options
@guarded
def fold(model, trust, imports, weights, input_shapes, input_dtypes, output, inputs_file, rtol, force, affine, untie,
         as_json, debug):
    """Fold the BatchNorms of MODEL into adjacent Linear/Conv layers and check the outputs still match.

    Folds BN after Conv/ConvTranspose/Linear (also through reshapes/permutes, e.g. LeViT's token
    BNs) and BN before Linear or unpadded Conv. Every BN gets a line: folded into what, or skipped
    and why. Verified on the example inputs, random ones and --inputs. Exit 1 if the folded model's
    outputs do not match. A .pt2 (torch.export program) is folded in its own graph and saved as a .pt2
    program; its example inputs come from the program.
    """
    if rtol is not None and rtol <= 0:
        raise NormSurgeonError("--rtol must be positive")
    if untie and not affine:
        raise NormSurgeonError("--untie goes with --affine")
    out_path = None
    if output is not None:
        out_path = api.check_output(output, force=force, inputs=[model])
    loaded = load_from_options(model, trust, imports, weights, input_shapes, input_dtypes, need_inputs=True)
    if loaded.program is not None and out_path is not None:
        check_program_output(out_path)  # before any work, like every output check
    elif output is not None:
        api.check_recipe_base(loaded.model, output)
    extra = api.load_inputs_file(inputs_file, loaded.example_inputs) if inputs_file else []
    # a .pt2 folds in its own graph (a new program, saved as .pt2); a module in place (the CLI owns it)
    target = loaded.program if loaded.program is not None else loaded.model
    if affine and loaded.program is not None:
        raise NormSurgeonError("--affine folds the norms of a module, not of a .pt2 program")
    more = {"affine": True, "untie": untie} if affine else {}
    folded, report = api.fold(target, loaded.example_inputs, inplace=True, rtol=rtol, extra_inputs=extra, **more)
    if report.passed and out_path is not None:
        api.save(folded, output, example_inputs=loaded.example_inputs, force=force, input_path=loaded.path)
    if as_json:
        payload = report.to_json()
        payload["output"] = str(out_path) if (out_path is not None and report.passed) else None
        payload["dry_run"] = out_path is None
        emit(_Json(payload), True)
    else:
        emit(report, False)
        if report.passed or out_path is None:  # a failure is said once, by the error below
            stderr.print(_note(report, out_path, "program" if loaded.program is not None else "model"),
                         soft_wrap=True, highlight=False)
    if not report.passed:
        raise VerificationError(f"the folded model's outputs do not match ({report.summary()}); nothing written")


def _note(report, out_path, what: str) -> str:
    if out_path is None:
        return f"dry run: no output written (pass -o FILE to save the folded {what})"
    if report.passed:
        return f"saved the folded {what} to {out_path}"
    return "verification failed: nothing written"


class _Json:
    def __init__(self, payload: dict) -> None:
        self.payload = payload

    def to_json(self) -> dict:
        return self.payload
