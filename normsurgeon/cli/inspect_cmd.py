"""`normsurgeon inspect`: list every normalization layer of a model, and the inputs it takes."""

from __future__ import annotations

import click

from .. import api
from .common import emit, guarded, model_options, output_options


@click.command("inspect")
@model_options
@output_options
@guarded
def inspect(model, trust, imports, weights, input_shapes, input_dtypes, as_json, debug):
    """List every normalization layer of MODEL: nn modules, functional calls and hand-written norms.

    MODEL is a transformers directory, a recipe directory (convert/fold -o DIR/), a .pt2 archive, an .onnx file,
    a .pt/.pth file (pickled modules need --trust) or package.module:factory (built-in models:
    'normsurgeon --help'). The report ends with the model's inputs (name, shape, dtype): the layout
    of --inputs and calibration files ('normsurgeon inputs' writes one).
    """
    emit(api.inspect(model, trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                     input_dtypes=input_dtypes), as_json)
