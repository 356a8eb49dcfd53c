"""The ``normsurgeon`` command: a thin layer that parses, calls the library and renders its report."""

from __future__ import annotations

import sys

import click

from .. import __version__


class _Group(click.Group):
    """Usage errors as one line on stderr (exit 2), like every other bad input."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "normsurgeon"
            click.echo(f"error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="normsurgeon")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Find, convert, fold and export the normalization layers of PyTorch models, verified numerically.

    MODEL (every command): a transformers directory, a recipe directory (-o DIR/), a .pt2 archive, a
    .pt/.pth file (a pickled module needs --trust) or package.module:factory.
    """


def _register() -> None:
    from .bench_cmd import bench
    from .calibrate_cmd import calibrate
    from .convert_cmd import convert
    from .demo_cmd import demo
    from .export_cmd import export
    from .fold_cmd import fold
    from .inputs_cmd import inputs
    from .inspect_cmd import inspect
    from .rotate_cmd import rotate

    for cmd in (inspect, inputs, fold, convert, rotate, calibrate, export, bench, demo):
        main.add_command(cmd)


_register()


def _zoo_help() -> None:
    from ..zoo import MODELS

    main.help += f"\n\n    Built-in models: normsurgeon.zoo:NAME, NAME one of {', '.join(MODELS)}."


_zoo_help()



def run() -> None:
    """The ``normsurgeon`` command's entry point (the console script and ``python -m normsurgeon``):
    ``main``, then the process ends at once with its exit status. Python's own teardown of torch and
    transformers took 0.8–0.9 s after every command on our 2-vCPU machine, with nothing left to do by
    then: every output was written and renamed into place, every temporary file and directory removed
    (in ``finally`` blocks and context managers, never at exit). Standard output and error and the
    logging handlers are flushed first. ``main`` itself keeps Python's exit, so that click's test runner
    and other in-process callers are unaffected."""
    import logging
    import os

    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python does with sys.exit("message")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head), a full disk: output lost, as Python says
            code = code or 120
    logging.shutdown()
    os._exit(code)
