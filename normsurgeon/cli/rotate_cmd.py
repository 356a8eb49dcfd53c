"""`normsurgeon rotate`: rotate the residual stream by a seeded orthogonal matrix, verified."""

from __future__ import annotations

import click

from ..errors import VerificationError
from .common import (emit, force_option, guarded, max_shard_option, model_options, output_options, stderr,
                     tolerance_options)


@click.command("rotate")
@model_options
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the orthogonal matrix.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Where to save the rotated model: DIR/ (a recipe directory; a transformers model also gets a "
                   "config.json there, so from_pretrained loads it), .pt or .pt2. Without it: report only.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also verify on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional; "
                   "'normsurgeon inputs' writes the layout).")
@click.option("--stream", is_flag=True,
              help="With -o DIR/: rotate a transformers directory tensor by tensor, never loading the model (plan "
                   "from a tiny twin of its class, each tensor checked; docs/llm.md).")
@max_shard_option
@tolerance_options
@force_option
@output_options
@guarded
def rotate(model, trust, imports, weights, input_shapes, input_dtypes, seed, output, inputs_file, stream, max_shard_mb,
           rtol, atol, force, as_json, debug):
    """Rotate MODEL's residual stream by a seeded orthogonal Q (QuaRot/SpinQuant's first step).

    Embeddings and output projections write y·Q, the linears after every norm read x·Q: the outputs
    stay the same (verified) while the hidden activations are rotated. Q is a randomized Hadamard
    when the width is a power of 2, a Hadamard ⊗ a small random orthogonal matrix for 2^k·m, else a
    random orthogonal matrix. The norms must be RMSNorms
    without affine: run `fold --affine` (RMSNorm models) or `convert --to rms` (LayerNorm models)
    first; a norm that is not ready is named with what to run. Exit 1 if not rotated (nothing written).
    """
    from .. import api

    _, report = api.rotate(model, seed=seed, output=output, force=force, inputs_file=inputs_file, rtol=rtol,
                           atol=atol, trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                           input_dtypes=input_dtypes, **({"stream": True} if stream else {}),
                           **({"max_shard_mb": max_shard_mb} if max_shard_mb is not None else {}))
    emit(report, as_json)
    if not report.rotated:
        raise VerificationError(f"{report.summary()}; nothing written")
    if not as_json:
        stderr.print(f"wrote {report.output}" if report.output else
                     "dry run: nothing written (pass -o DIR/ to save the rotated model)", soft_wrap=True,
                     highlight=False, markup=False)
