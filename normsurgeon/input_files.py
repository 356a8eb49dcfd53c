"""Input files in the layout every command reads (``--inputs``, ``--data``, ``--calibrate``): a ``.pt``
dict, one tensor per input, named as ``CallArgs.file_names`` names them (a positional input by the
forward parameter it binds to). ``save_random_inputs`` writes random ones shaped like a model's example
inputs: a template for real data, and stand-ins that let every command run in an empty directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import NormSurgeonError
from .inputs import CallArgs
from .report import Table


def input_layout(ci: CallArgs) -> list[dict]:
    """Each tensor input: ``{"name", "shape", "dtype"}`` (dim 0 is the batch)."""
    values = [*ci.args, *ci.kwargs.values()]
    return [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for n, v in zip(ci.file_names(), values) if isinstance(v, torch.Tensor)]


@dataclass
class InputsReport:
    """What ``save_random_inputs`` wrote: the layout (``input_layout``) and the files."""

    inputs: list[dict]
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "files": list(self.files)}

    def tables(self) -> list[Table]:
        rows = [[i["name"], "x".join(map(str, i["shape"])), i["dtype"]] for i in self.inputs]
        table = Table("Model inputs (dim 0: batch)", ["name", "shape", "dtype"], rows)
        table.notes.append(f"wrote {', '.join(self.files)}: random values in this layout (a dict name -> tensor; "
                           "put real data in the same layout)")
        return [table]


def save_random_inputs(ci: CallArgs, output: str | os.PathLike, *, batch: int | None = None, shards: int = 1,
                 seed: int = 0, force: bool = False, input_path: str | os.PathLike | None = None,
                 inputs: Sequence[str | os.PathLike | None] = ()) -> InputsReport:
    """Random tensors like ``ci`` (``batch`` samples each; integer inputs stay below the example's
    largest id) saved as ``{name: tensor}`` to ``output``; with ``shards`` > 1 one file per rank, the
    rank put where ``output`` says ``{rank}``. Every file is checked before any is written, and none
    may replace ``input_path`` or ``inputs`` (files the caller read)."""
    from .loading import atomic_write, check_output_path

    if batch is not None and batch < 1:
        raise NormSurgeonError(f"`batch` must be >= 1, got {batch}")
    if shards < 1:
        raise NormSurgeonError(f"`shards` must be >= 1, got {shards}")
    text = str(output)
    if shards > 1 and "{rank}" not in text:
        raise NormSurgeonError(f"`output` {text}: several shards need '{{rank}}' in the name (calib-{{rank}}.pt)")
    paths = [Path(text.replace("{rank}", str(r))) for r in range(shards)]
    for p in paths:
        check_output_path(p, force=force, inputs=[input_path, *inputs], suffixes=(".pt",))
    if len(set(paths)) != len(paths):
        raise NormSurgeonError(f"`output` {text}: the shards would share a file")
    gen = torch.Generator().manual_seed(seed)
    names = ci.file_names()
    for p in paths:
        drawn = ci.like(gen, batch=batch)
        values = [*drawn.args, *drawn.kwargs.values()]
        tensors = {n: v for n, v in zip(names, values) if isinstance(v, torch.Tensor)}
        atomic_write(p, lambda tmp, t=tensors: torch.save(t, tmp), force=force)
    return InputsReport(input_layout(ci), [str(p) for p in paths])
