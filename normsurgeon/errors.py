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
