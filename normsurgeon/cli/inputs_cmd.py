"""`normsurgeon inputs`: write input files in the layout every command reads (random stand-ins)."""

from __future__ import annotations

import click

from .. import api
from ..zoo import MODELS
from .common import emit, force_option, guarded, model_options, output_options


@click.command("inputs")
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="FILE.pt",
              help="The .pt file to write; with --shards N, '{rank}' in the name is the shard (calib-{rank}.pt).")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Samples per file (default: the example inputs' batch).")
@click.option("--shards", type=click.IntRange(1), default=1, show_default=True,
              help="Write this many files, one per torchrun rank.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random values.")
@force_option
@output_options
@guarded
def inputs(model, trust, imports, weights, input_shapes, input_dtypes, output, batch, shards, seed, force, as_json,
           debug):
    """Write random inputs for MODEL in the layout --inputs, --data and --calibrate read.

    The file holds a dict: each input's name (a positional one by its forward parameter, e.g.
    pixel_values or x) -> a tensor, batch first. Put your real data in the same layout; these random
    values let every command run (calibration statistics from them are meaningless).
    """
    emit(api.write_inputs(model, output, batch=batch, shards=shards, seed=seed, force=force, trust=trust,
                          imports=imports, weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes),
         as_json)


inputs.help += f"\n\n    Built-in models: normsurgeon.zoo:NAME, NAME one of {', '.join(MODELS)}."
