"""`normsurgeon convert`: swap normalization layers, insert FFN BatchNorms, recalibrate."""

from __future__ import annotations

import click

from ..errors import VerificationError
from ..passes.convert import EXACT_PASSES, RULES, TARGETS
from ..passes.swap import kind_name
from .common import (PlainProgress, emit, force_option, guarded, model_options, output_options, progress_console,
                     tolerance_options)

# --to: the swap registry, one entry per rule (as --exporter lists its choices)
_TARGETS = ", ".join([f"{t} ({'/'.join(kind_name(k) for k in r.sources)} -> {r.target_name})" for t, r in RULES.items()]
                     + [f"{t} ({EXACT_PASSES[t].split('.')[0].replace('_to_', ' -> ').upper()}, exact: affines folded, "
                        "residual stream centred)" for t in EXACT_PASSES])


@click.command("convert")
@model_options
@click.option("--to", "to", type=click.Choice(list(TARGETS)), default=None, help=f"Target: {_TARGETS}.")
@click.option("--untie", is_flag=True,
              help="With --to rms: give a tied lm_head its own copy of the embedding (the final norm folds into "
                   "it and the embedding can be centred).")
@click.option("--groups", type=int, default=None, metavar="G",
              help="Groups for --to gn (default 1); must divide every BatchNorm's channels.")
@click.option("--progressive", type=int, default=None, metavar="STEPS",
              help="With --to bn: lambda*LN(x) + (1-lambda)*RepBN(x), lambda 1 -> 0 over STEPS training steps "
                   "(exact at step 0, verified).")
@click.option("--pn-warmup", type=int, default=4000, metavar="N",
              help="With --to pn: training steps that use the batch statistic before the running one (default 4000).")
@click.option("--pn-groups", type=int, default=None, metavar="G",
              help="With --to pn: the authors' group scaling with G channel groups (off by default; does not fold).")
@click.option("--no-padding-mask", is_flag=True,
              help="bn/pn: do not hook the model's attention_mask into the token norms' batch statistics.")
@click.option("--ffn-bn", is_flag=True, help="Insert a BatchNorm into every FFN block (Yao et al. 2021).")
@click.option("--ffn-bn-position", default="after-first", metavar="after-first|before-second",
              help="Where the FFN BatchNorm goes: after the first linear (default) or before the second.")
@click.option("--ffn-bn-init", default="fresh", metavar="fresh|identity",
              help="fresh (for training, default) or identity (exact in eval: calibrated stats, identity affine).")
@click.option("--calibrate", "calibrate_file", type=click.Path(), default=None, metavar="FILE",
              help="Recalibrate the BatchNorms on this data (.pt/.npy/.npz/.safetensors) after converting.")
@click.option("--calibrate-synthetic", type=int, default=None, metavar="N",
              help="Recalibrate on N random batches shaped like the example inputs (smoke tests only).")
@click.option("--batch-size", type=int, default=None, help="Re-batch the --calibrate data to this size.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also check on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional; "
                   "'normsurgeon inputs' writes the layout).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write the converted model: DIR/ (a recipe directory: JSON + safetensors, loads without "
                   "--trust), .pt (pickle) or .pt2 (torch.export archive).")
@tolerance_options
@force_option
@output_options
@guarded
def convert(model, trust, imports, weights, input_shapes, input_dtypes, to, groups, progressive, pn_warmup,
            pn_groups, no_padding_mask, ffn_bn, ffn_bn_position, ffn_bn_init, calibrate_file, calibrate_synthetic,
            batch_size, inputs_file, output, rtol, atol, force, untie, as_json, debug):
    """Convert the normalization layers of MODEL.

    \b
    --to bn      LayerNorm / RMSNorm -> TokenBatchNorm (BatchNorm over the last dim, any leading shape)
                 or BatchNorm1d/2d/3d for a channels-first LayerNorm; affine parameters carry over
    --to bn --progressive STEPS
                 LayerNorm -> ProgressiveNorm (LN blended into a RepBN over STEPS training steps;
                 exact at step 0, verified)
    --to pn      LayerNorm / RMSNorm -> PowerNorm (Shen et al. 2020)
    --to ln      BatchNorm -> LayerNorm on (N, C), ChannelLayerNorm (LN over dim 1) otherwise
    --to gn      BatchNorm -> GroupNorm(G, C)
    --to frozen  BatchNorm -> FrozenBatchNorm: exact in eval, verified, deviating sites rolled back
    --to rms     LayerNorm -> RMSNorm, exact: norm affines folded into the linears that read them,
                 every writer of the residual stream mean-centred (docs/llm.md); verified
    --ffn-bn     also put a BatchNorm inside every transformer FFN block

    Only frozen BNs and --ffn-bn-init identity preserve the function; every other swap needs
    calibration (--calibrate) or training. Every site is reported as converted, inserted or skipped
    with a reason. Without -o nothing is written; -o DIR/ writes a recipe that every command (and
    normsurgeon.load) rebuilds without unpickling.
    """
    from .. import api

    with _Progress(enabled=calibrate_file is not None or calibrate_synthetic is not None) as progress:
        converted, report = api.convert(
            model, to, output=output, force=force, inputs_file=inputs_file, calibrate_file=calibrate_file,
            calibrate_synthetic=calibrate_synthetic, batch_size=batch_size, trust=trust, imports=imports,
            weights=weights, input_shapes=input_shapes, input_dtypes=input_dtypes, groups=groups, ffn_bn=ffn_bn,
            ffn_bn_position=ffn_bn_position, ffn_bn_init=ffn_bn_init, progress=progress, progressive=progressive,
            pn_warmup_steps=pn_warmup, pn_groups=pn_groups, rtol=rtol, atol=atol,
            padding_mask=None if no_padding_mask else "attention_mask",
            **({"untie": True} if untie else {}))
    failed = report.verify is not None and report.verify.get("passed") is False
    if not failed:
        report.notes.append(f"wrote {report.output}" if report.output else
                            "nothing written (no -o given; -o FILE saves the converted model)")
    emit(report, as_json)
    if failed:
        raise VerificationError("verification failed even after rolling back the exact swaps; nothing written")


class _Progress:
    """A rich progress bar on stderr for calibration; a callable ``progress(done, total)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return None
        if not progress_console().is_terminal:
            return PlainProgress("calibrating: batches")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=progress_console(), transient=False)
        self._bar.__enter__()
        self._task = self._bar.add_task("calibrate", total=None)
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
