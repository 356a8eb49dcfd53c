"""`normsurgeon inspect`: list every normalization layer of a model."""

from __future__ import annotations

import click

from .. import api
from .common import emit, guarded, load_from_options, model_options, output_options


@click.command("inspect")
@model_options
@output_options
@guarded
def inspect(model, trust, imports, weights, input_shapes, input_dtypes, as_json, debug):
    """List every normalization layer of MODEL: nn modules, functional calls and hand-written norms.

    MODEL is a transformers directory, a recipe directory (convert/fold -o DIR/), a .pt2 archive,
    a .pt/.pth file (pickled modules need --trust) or package.module:factory.
    """
    loaded = load_from_options(model, trust, imports, weights, input_shapes, input_dtypes)
    emit(api.inspect(loaded.model, loaded.example_inputs), as_json)
