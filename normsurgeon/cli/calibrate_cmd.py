"""`normsurgeon calibrate`: recompute BatchNorm statistics exactly from data, on one process or under torchrun."""

from __future__ import annotations

import click

from .common import PlainProgress, emit, force_option, guarded, model_options, output_options, progress_console


@click.command("calibrate")
@model_options
@click.option("--data", "data", multiple=True, required=True, metavar="FILE",
              help="Calibration data (.pt/.npy/.npz/.safetensors, as 'normsurgeon inputs' lays it out); "
                   "repeatable. Under torchrun '{rank}' and '{world_size}' in the name are replaced "
                   "(calib-{rank}.pt), or the ranks share the files. A model without example inputs takes "
                   "its inputs' shapes from the data.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Re-batch the data to this size (default: batches as stored, a single tensor by 32).")
@click.option("--max-batches", type=click.IntRange(0), default=None, help="Stop after this many batches per rank.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="auto: this rank's GPU (LOCAL_RANK) if CUDA is available, else the CPU.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Write the recalibrated model: DIR/ (a recipe directory: JSON + safetensors, loads without "
                   "--trust), .pt (pickled module) or .pt2 (torch.export archive); rank 0 writes it.")
@force_option
@output_options
@guarded
def calibrate(model, trust, imports, weights, input_shapes, input_dtypes, data, batch_size, max_batches, device,
              output, force, as_json, debug):
    """Recompute the running mean/variance of every BatchNorm in MODEL exactly from --data.

    Each BatchNorm gets the exact mean and unbiased variance of its inputs over all the data (merged in
    float64, whatever the batch sizes). Under `torchrun --nproc-per-node N` each rank reads its own shard,
    the statistics merge exactly across ranks (gloo on the CPU, NCCL on GPUs), and only rank 0 writes
    the model and the report; the other ranks exit 0 quietly.
    """
    from .. import api

    with _BatchProgress(progress_console()) as progress:
        report, rank = api.recalibrate(model, list(data), output, trust=trust, imports=imports, weights=weights,
                                       input_shapes=input_shapes, input_dtypes=input_dtypes, batch_size=batch_size,
                                       max_batches=max_batches, device=device, force=force, progress=progress)
    if rank == 0:
        emit(report, as_json)


class _BatchProgress:
    """``progress(done, total)`` for calibration batches: a bar on stderr on a terminal, plain lines
    for slow work otherwise (``PlainProgress``); rank 0 alone is handed it."""

    def __init__(self, console) -> None:
        self.console = console
        self._bar = None
        self._task = None

    def __enter__(self):
        if not self.console.is_terminal:
            return PlainProgress("calibrating: batches", self.console)
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("calibrating: batches"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("calibrate", total=total)
        self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
