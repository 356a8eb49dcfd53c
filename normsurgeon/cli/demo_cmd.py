"""`normsurgeon demo`: the whole story on built-in models, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import contextlib
import json

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .. import api
from .common import PlainProgress, guarded, progress_console, render_table, stdout_console


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Keep the ONNX files here (default: a temporary directory).")
@click.option("--train-steps", type=click.IntRange(10, 10_000), default=150, show_default=True,
              help="Training steps of the converted BN ViT on the synthetic task (step 3).")
@click.option("--bench-runs", type=click.IntRange(10, 100_000), default=200, show_default=True,
              help="Timed runs per model in the latency comparison (step 6).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@guarded
def demo(workdir, train_steps, bench_runs, as_json, debug):
    """Find a ViT's LayerNorms, convert them to BatchNorm (+ FFN BN), train, fold, export and time it."""
    console = stdout_console()
    steps = []
    live = progress_console() if as_json else console
    # A bar only means something on a terminal; in logs and pipes it would leave stray lines: plain ones there
    plain = None if live.is_terminal else PlainProgress(console=progress_console())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=live, transient=True, disable=not live.is_terminal) as bar:
        task = bar.add_task("starting", total=1)

        def tick(what, done, total):
            bar.update(task, description=what, completed=done, total=max(total, 1))
            if plain is not None:
                plain(what, done, total)

        # closed on any exit: the story's temporary directory goes now, not when the generator is collected
        # (the command ends without Python's teardown: cli.run)
        with contextlib.closing(api.demo(workdir, train_steps=train_steps, bench_runs=bench_runs,
                                         progress=tick)) as story:
            for step in story:
                steps.append(step)
                if not as_json:  # printed through the bar's console so the live bar stays below the tables
                    bar.console.print()
                    bar.console.rule(f"[bold]{step.title}")
                    for table in step.all_tables():
                        render_table(table, bar.console)
    if as_json:
        click.echo(json.dumps({"steps": [s.to_json() for s in steps]}, indent=2, default=str))
