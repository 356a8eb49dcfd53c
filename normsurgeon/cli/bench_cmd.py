"""`normsurgeon bench`: latency of ONNX models in ONNX Runtime, interleaved, as ratios to the first."""

from __future__ import annotations

import click

from ..errors import NormSurgeonError
from .common import emit, guarded, output_options
from .export_cmd import _status


def _parse_dims(values) -> dict[str, int]:
    dims = {}
    for v in values:
        name, sep, num = v.partition("=")
        if not sep or not name or not num.strip().isdigit() or int(num) < 1:
            raise NormSurgeonError(f"--dim {v!r}: expected NAME=SIZE, e.g. --dim batch=8")
        dims[name.strip()] = int(num)
    return dims


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="ONNX Runtime intra-op threads per model [default: 1, which gives stable ratios; "
                   "the output says which was used].")
@click.option("--runs", type=click.IntRange(1, 1_000_000), default=50, show_default=True,
              help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(0, 100_000), default=5, show_default=True,
              help="Untimed runs per model first.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=SIZE",
              help="Size of a dynamic input dim by its name (default: 1 for dim 0, 16 otherwise). Repeatable.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None,
              help="Inputs to time on (.npy/.npz/.pt/.safetensors, by input name) instead of random ones.")
@output_options
@guarded
def bench(models, threads, runs, warmup, seed, dims, inputs_file, as_json, debug):
    """Time ONNX MODELS (same inputs) in ONNX Runtime on CPU; report medians and ratios to the first.

    Runs are interleaved round-robin so drift affects all models alike; each model's paired ratios
    (time / the first model's in the same round) come with their p10-p90 spread, and a difference
    smaller than that spread is reported as within noise.
    """
    from ..bench import load_named_arrays, measure_latency

    parsed = _parse_dims(dims)
    inputs = load_named_arrays(inputs_file) if inputs_file else None
    with _status() as progress:
        report = measure_latency(models, inputs=inputs, threads=threads, warmup=warmup, runs=runs, seed=seed,
                                 dims=parsed, progress=progress)
    emit(report, as_json)
