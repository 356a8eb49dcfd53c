"""The ``normsurgeon`` command: a thin layer that parses, calls the library and renders its report."""

from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="normsurgeon")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Find, convert, fold and export the normalization layers of PyTorch models, verified numerically."""


def _register() -> None:
    from .bench_cmd import bench
    from .convert_cmd import convert
    from .demo_cmd import demo
    from .export_cmd import export
    from .fold_cmd import fold
    from .inspect_cmd import inspect

    for cmd in (inspect, fold, convert, export, bench, demo):
        main.add_command(cmd)


_register()

