"""What every command shares: model options, loading, rendering reports, error handling."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from ..errors import NormSurgeonError, one_line

stderr = Console(stderr=True, highlight=False)


def model_options(fn: Callable) -> Callable:
    """MODEL argument plus the options that say how to load it and how to call it."""
    opts = [
        click.argument("model"),
        click.option("--trust", is_flag=True, help="Allow unpickling a .pt/.pth model (runs code from the file)."),
        click.option("--import", "imports", multiple=True, metavar="MODULE",
                     help="Import MODULE first (classes a pickle or factory needs). Repeatable."),
        click.option("--weights", type=click.Path(), default=None,
                     help="State dict (.pt/.safetensors) to load into a package.module:factory model."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="1,3,224,224",
                     help="Shape of an example input; repeat for several positional inputs."),
        click.option("--input-dtype", "input_dtypes", multiple=True, metavar="DTYPE",
                     help="dtype of the example inputs (float32, float16, bfloat16, int64...)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def output_options(fn: Callable) -> Callable:
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")(fn)
    fn = click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)
    return fn


def load_from_options(model: str, trust: bool, imports, weights, input_shapes, input_dtypes,
                      need_inputs: bool = False):
    from ..api import load

    return load(model, trust=trust, imports=imports, weights=weights, input_shapes=input_shapes,
                input_dtypes=input_dtypes, need_inputs=need_inputs)


def guarded(fn: Callable) -> Callable:
    """Turn NormSurgeonError into one line on stderr and its exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("NORMSURGEON_DEBUG") == "1" \
            or (click.get_current_context().find_root().params.get("debug", False))
        try:
            return fn(*args, **kwargs)
        except NormSurgeonError as e:
            if debug:
                traceback.print_exc()
            # messages hold user paths: "ckpt[best].pt" must print as it is, not as markup
            stderr.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, soft_wrap=True)
            sys.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a bug, but the user still gets one line
            if debug:
                traceback.print_exc()
            stderr.print(f"[bold red]error:[/] unexpected {escape(one_line(e, typed=True))} "
                         "(rerun with --debug for the traceback)", markup=True, soft_wrap=True)
            sys.exit(2)

    return wrapper


def emit(report: Any, as_json: bool, console: Console | None = None) -> None:
    """Render a report: its JSON on stdout, or its tables."""
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=_json_default))
        return
    console = console or stdout_console()
    for table in report.tables():
        render_table(table, console)


def render_table(table, console: Console) -> None:
    rt = RichTable(title=escape(table.title), title_justify="left", title_style="bold")
    for col in table.columns:
        rt.add_column(col, overflow="fold")
    for row in table.rows:
        # cells are data, not rich markup: a dynamic shape "[batch, 3, 64, 64]" would vanish as a tag
        rt.add_row(*["" if v is None else escape(str(v)) for v in row])
    if table.rows:
        console.print(rt)
    else:
        console.print(f"[bold]{escape(table.title)}[/]: none")
    for note in table.notes:  # notes name user paths ("wrote exp[/1]/out.pt"): text, not markup
        console.print(escape(str(note)), soft_wrap=True)


def _json_default(o: Any):
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def stdout_console() -> Console:
    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def say(console: Console, text: str) -> None:
    """Print ``text`` literally (paths like ``run[/final].pt`` are not rich markup)."""
    console.print(escape(text), soft_wrap=True, highlight=False)


def progress_console() -> Console:
    """Progress goes to stderr so --json output stays one clean object."""
    return stderr
