"""`normsurgeon rotate`: rotate the residual stream by a seeded orthogonal matrix, verified."""

from __future__ import annotations

import click

from ..errors import NormSurgeonError, VerificationError
from .common import emit, guarded, load_from_options, model_options, output_options, stderr


@click.command("rotate")
@model_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the orthogonal matrix.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Where to save the rotated model: DIR/ (a recipe directory; a transformers model also gets a "
                   "config.json there, so from_pretrained loads it), .pt or .pt2. Without it: report only.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional).")
@click.option("--rtol", type=float, default=None,
              help="Largest accepted max relative error; default: the tolerance table by dtype (1e-4 float32).")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@output_options
@guarded
def rotate(model, trust, imports, weights, input_shapes, input_dtypes, seed, output, inputs_file, rtol, force,
           as_json, debug):
    """Rotate MODEL's residual stream by a seeded orthogonal Q (QuaRot/SpinQuant's first step).

    Embeddings and output projections write y·Q, the linears after every norm read x·Q: the outputs
    stay the same (verified) while the hidden activations are rotated. Q is a randomized Hadamard
    when the width is a power of 2, else a random orthogonal matrix. The norms must be RMSNorms
    without affine: run `fold --affine` (RMSNorm models) or `convert --to rms` (LayerNorm models)
    first; a norm that is not ready is named with what to run. Exit 1 if not rotated.
    """
    from .. import api

    if seed < 0:
        raise NormSurgeonError("--seed must be >= 0")
    if rtol is not None and rtol <= 0:
        raise NormSurgeonError("--rtol must be positive")
    out_path = api.check_output(output, force=force, inputs=[model]) if output is not None else None
    loaded = load_from_options(model, trust, imports, weights, input_shapes, input_dtypes, need_inputs=True)
    if loaded.program is not None:
        raise NormSurgeonError("rotate works on a module, not on a .pt2 program")
    if output is not None:
        api.check_recipe_base(loaded.model, output)
    extra = api.load_inputs_file(inputs_file, loaded.example_inputs) if inputs_file else []
    rotated, report = api.rotate(loaded.model, loaded.example_inputs, seed=seed, inplace=True, rtol=rtol,
                                 extra_inputs=extra)
    if report.rotated and out_path is not None:
        api.save(rotated, output, example_inputs=loaded.example_inputs, force=force, input_path=loaded.path)
    emit(report, as_json)
    if not report.rotated:
        raise VerificationError(f"{report.summary()}; nothing written")
    if not as_json:
        stderr.print(f"saved the rotated model to {out_path}" if out_path is not None else
                     "dry run: no output written (pass -o DIR/ to save the rotated model)", soft_wrap=True,
                     highlight=False)
