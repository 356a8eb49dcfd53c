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
        click.option("--trust", is_flag=True, help="Allow code from the model file: unpickling a .pt/.pth, a recipe's factory base, a .pt2's "
                     "pickled parts; the working directory becomes importable."),
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
            stderr.print(f"[bold red]error:[/] {escape(e.cli_message)}", markup=True, soft_wrap=True)  # flags
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


def force_option(fn: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Replace an existing output.")(fn)


def max_shard_option(fn: Callable) -> Callable:
    """--max-shard-mb, the same on every command that streams (fold, rotate)."""
    return click.option("--max-shard-mb", "max_shard_mb", type=float, default=None, metavar="MIB",
                        help="With --stream: the most MiB per output safetensors shard (default 256).")(fn)


def tolerance_options(fn: Callable) -> Callable:
    """--rtol/--atol, the same on every command that verifies (fold, convert, export)."""
    fn = click.option("--atol", type=click.FloatRange(min=0, min_open=True), default=None,
                      help="... or its max abs error <= atol. Default: by dtype, as --rtol (1e-6 for float32).")(fn)
    fn = click.option("--rtol", type=click.FloatRange(min=0, min_open=True), default=None,
                      help="A check passes if its max relative error (max abs error / max |expected|) <= rtol "
                           "... Default: by dtype (1e-4 float32, 5e-3 float16, 1.5e-2 bfloat16); a smaller "
                           "value is raised to those for float16/bfloat16.")(fn)
    return fn


class PlainProgress:
    """Progress for logs and pipes (stderr not a terminal): plain lines, none for quick work.

    Called as ``progress(message)``, ``progress(done, total)`` or ``progress(what, done, total)``. The
    first line comes only after ``quiet_s`` seconds, then one per new stage or per ``every_s`` seconds,
    so a CI log of a slow run shows where it is, and a fast run stays silent. ``NORMSURGEON_PROGRESS=0``
    turns them off."""

    def __init__(self, label: str = "", console: Console | None = None, quiet_s: float = 2.0,
                 every_s: float = 10.0) -> None:
        import time

        self._time = time.monotonic
        self.label, self.console = label, console or stderr
        self.quiet_s, self.every_s = quiet_s, every_s
        self.start = self._time()
        self._last_at = None
        self._last_stage = None
        self.enabled = os.environ.get("NORMSURGEON_PROGRESS", "1") != "0"

    def __call__(self, *args) -> None:
        if not self.enabled:
            return
        if len(args) == 1:
            stage, text = str(args[0]), str(args[0])
        else:
            what = args[0] if len(args) == 3 else self.label
            done, total = args[-2], args[-1]
            stage, text = what, f"{what}: {done}" + (f"/{total}" if total else "")
        now = self._time()
        elapsed = now - self.start
        if elapsed < self.quiet_s:
            return
        if stage == self._last_stage and self._last_at is not None and now - self._last_at < self.every_s:
            return
        self._last_at, self._last_stage = now, stage
        self.console.print(f"normsurgeon: {text} [{elapsed:.0f}s]", markup=False, highlight=False, soft_wrap=True)
