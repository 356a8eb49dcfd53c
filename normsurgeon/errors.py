"""Errors the CLI turns into one clear line and an exit code.

Library code raises these for anything the *user* can fix (bad path, bad shape, missing --trust).
Anything else is a bug and keeps its traceback.
"""


class NormSurgeonError(Exception):
    """Bad usage or bad input: the CLI prints the message and exits 2."""

    exit_code = 2


class VerificationError(NormSurgeonError):
    """A numerical check failed: the CLI exits 1."""

    exit_code = 1


def one_line(e: BaseException | str, *, typed: bool = False, limit: int = 300) -> str:
    """The first non-empty line of an error (ANSI colours stripped), for a one-line report or message.

    ``typed`` prefixes the exception's class name (``ValueError: ...``) where the text alone would not
    say what kind of failure it was.
    """
    import re

    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() if ln.strip()]
    name = type(e).__name__ if isinstance(e, BaseException) else "error"
    text = (lines[0].strip() if lines else ("" if typed else name))[:limit]
    return f"{name}: {text}" if typed else text
