"""Keep torch's noise about an attempt we expect may fail off the user's terminal.

When ``torch.export`` meets data-dependent control flow it prints the partial graph (hundreds of
lines of ``def forward(self, arg0_1 ...``) to ``sys.stderr``, logs warnings through handlers of its
own that write to stderr, and raises Python warnings. A capture attempt that fails is reported in
one line (``errors.one_line`` of the exception); everything else it said is collected here instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())
        if record.exc_info:  # torch logs a traceback before raising on a bad .pt2: the caller may read it
            self.sink.append(logging.Formatter().formatException(record.exc_info))


@contextlib.contextmanager
def quiet_torch(sink: list[str] | None = None) -> Iterator[list[str]]:
    """Within the block, torch's prints, log records and warnings go to ``sink`` (a list of strings,
    returned by the context manager), not to the terminal."""
    sink = sink if sink is not None else []
    # torch gives several of its loggers ("torch", "torch.export", ...) their own stderr handler,
    # bound to the stream that existed when it was made: redirecting sys.stderr does not reach them.
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    loggers = [lg for lg in map(logging.getLogger, names) if lg.handlers or lg.name == "torch"]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    collect = _Collect(sink)
    printed = io.StringIO()
    for lg in loggers:
        lg.handlers, lg.propagate = [collect], False
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield sink
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        sink.extend(str(w.message) for w in caught)
        if printed.getvalue().strip():
            sink.append(printed.getvalue())
