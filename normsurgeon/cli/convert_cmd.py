"""`normsurgeon convert`: swap normalization layers, insert FFN BatchNorms, recalibrate."""

from __future__ import annotations


import click

from ..errors import NormSurgeonError, VerificationError
from .common import emit, guarded, load_from_options, model_options, output_options, progress_console


@click.command("convert")
@model_options
@click.option("--to", "to", default=None, metavar="bn|pn|ln|gn|frozen|rms",
              help="Target: bn (LayerNorm/RMSNorm -> BatchNorm), pn (LayerNorm/RMSNorm -> PowerNorm), "
                   "ln (BatchNorm -> LayerNorm), "
                   "gn (BatchNorm -> GroupNorm), frozen (BatchNorm -> FrozenBatchNorm, exact), "
                   "rms (LayerNorm -> RMSNorm, exact: affines folded, residual stream centred).")
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
@click.option("--batch-size", type=int, default=None, help="Batch size for --calibrate data.")
@click.option("--inputs", "inputs_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also check on these inputs (.pt/.npy/.npz/.safetensors, by input name or positional).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write the converted model: DIR/ (a recipe directory: JSON + safetensors, loads without "
                   "--trust), .pt (pickle) or .pt2 (torch.export archive).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@output_options
@guarded
def convert(model, trust, imports, weights, input_shapes, input_dtypes, to, groups, progressive, pn_warmup,
            pn_groups, no_padding_mask, ffn_bn, ffn_bn_position, ffn_bn_init, calibrate_file, calibrate_synthetic,
            batch_size, inputs_file, output, force, untie, as_json, debug):
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

    # options first: nothing is loaded or computed for a bad command line
    if to is None and not ffn_bn:
        raise NormSurgeonError("give --to bn|pn|ln|gn|frozen|rms (and/or --ffn-bn)")
    if untie and to != "rms":
        raise NormSurgeonError("--untie goes with --to rms")
    api.validate_convert(to, groups, ffn_bn, ffn_bn_position, ffn_bn_init, progressive, pn_warmup, pn_groups)
    if not ffn_bn and (ffn_bn_position != "after-first" or ffn_bn_init != "fresh"):
        raise NormSurgeonError("--ffn-bn-position/--ffn-bn-init go with --ffn-bn")
    if calibrate_file is not None and calibrate_synthetic is not None:
        raise NormSurgeonError("give either --calibrate FILE or --calibrate-synthetic N, not both")
    if calibrate_synthetic is not None and calibrate_synthetic < 1:
        raise NormSurgeonError(f"--calibrate-synthetic must be >= 1, got {calibrate_synthetic}")
    if batch_size is not None and calibrate_file is None:
        raise NormSurgeonError("--batch-size goes with --calibrate FILE")
    out_path = api.check_output(output, force=force, inputs=[model]) if output else None

    loaded = load_from_options(model, trust, imports, weights, input_shapes, input_dtypes, need_inputs=True)
    if output:
        api.check_recipe_base(loaded.model, output)
    extra = api.load_inputs_file(inputs_file, loaded.example_inputs) if inputs_file else []
    batches = None
    if calibrate_file is not None:
        batches = api.load_calibration_data(calibrate_file, loaded.example_inputs, batch_size=batch_size)
        api.check_calibration_batch(loaded.model, batches[0], calibrate_file)
    elif calibrate_synthetic is not None:
        batches = api.synthetic_batches(loaded.example_inputs, calibrate_synthetic)

    with _Progress(enabled=batches is not None) as progress:
        converted, report = api.convert(loaded.model, to, example_inputs=loaded.example_inputs, groups=groups,
                                          ffn_bn=ffn_bn, ffn_bn_position=ffn_bn_position, ffn_bn_init=ffn_bn_init,
                                          calibrate_batches=batches, inplace=True, progress=progress,
                                          extra_inputs=extra,
                                          progressive=progressive, pn_warmup_steps=pn_warmup, pn_groups=pn_groups,
                                          padding_mask=None if no_padding_mask else "attention_mask",
                                          **({"untie": True} if untie else {}))
    if report.verify is not None and report.verify.get("passed") is False:
        emit(report, as_json)
        raise VerificationError("verification failed even after rolling back the exact swaps; nothing written")
    if out_path is not None:
        api.save(converted, output, example_inputs=loaded.example_inputs, force=force, input_path=loaded.path)
        report.notes.append(f"wrote {out_path}")
    else:
        report.notes.append("report only: no -o given, nothing written")
    emit(report, as_json)


class _Progress:
    """A rich progress bar on stderr for calibration; a callable ``progress(done, total)``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._task = None

    def __enter__(self):
        if not self.enabled:
            return None
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
