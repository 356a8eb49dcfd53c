"""Errors the CLI turns into one clear line and an exit code.

Library code raises these for anything the *user* can fix (bad path, bad shape, missing trust=True).
Anything else is a bug and keeps its traceback.

A message names an option once, in backticks, by its Python keyword: ``"pass `force=True` to
replace it"``. ``str(error)`` is the Python wording (``pass force=True to replace it``), what a
library caller can act on; ``error.cli_message`` is the command line's (``pass --force to replace
it``), which the CLI prints. ``FLAGS`` says which flag each keyword is.
"""

import re

#: keyword argument of the library -> the CLI's flag for it
FLAGS = {
    "force": "--force", "trust": "--trust", "output": "-o", "inputs_file": "--inputs", "input_shapes": "--input-shape",
    "input_dtypes": "--input-dtype", "weights": "--weights", "imports": "--import", "to": "--to",
    "groups": "--groups", "progressive": "--progressive", "pn_warmup_steps": "--pn-warmup", "pn_groups": "--pn-groups",
    "ffn_bn": "--ffn-bn", "ffn_bn_position": "--ffn-bn-position", "ffn_bn_init": "--ffn-bn-init",
    "calibrate_file": "--calibrate", "calibrate_synthetic": "--calibrate-synthetic", "batch_size": "--batch-size",
    "rtol": "--rtol", "atol": "--atol", "data": "--data", "device": "--device", "keep_failed": "--keep-failed",
    "max_batches": "--max-batches", "fold": "--fold", "static": "--static", "runs": "--runs",
    "threads": "--threads", "warmup": "--warmup",
    "dynamic_batch": "--dynamic-batch", "dynamic_seq": "--dynamic-seq", "num_random": "--random-inputs",
    "affine": "--affine", "untie": "--untie", "seed": "--seed",
    "stream": "--stream", "max_shard_mb": "--max-shard-mb",
}

_QUOTES = "[]'\""
_OPTION = re.compile(r"`(\w+)(?:=([^`]*))?`")


def python_form(template: str) -> str:
    """The message as a Python caller reads it: keyword arguments, backticks dropped."""
    return _OPTION.sub(lambda m: m.group(0)[1:-1] if m.group(1) in FLAGS else m.group(0), template)


def cli_form(template: str) -> str:
    """The message as a command-line user reads it: ```force=True``` -> ``--force``, ```to='bn'``` -> ``--to bn``."""
    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in FLAGS:
            return m.group(0)
        if value is None or value == "True":
            return FLAGS[name]
        return f"{FLAGS[name]} {value.strip(_QUOTES)}"
    return _OPTION.sub(flag, template)


class NormSurgeonError(Exception):
    """Bad usage or bad input: the CLI prints ``cli_message`` and exits 2."""

    exit_code = 2

    def __init__(self, message: str = "", *args) -> None:
        self.template = str(message)
        super().__init__(python_form(self.template), *args)

    @property
    def cli_message(self) -> str:
        return cli_form(self.template)

    def prefixed(self, prefix: str) -> "NormSurgeonError":
        """The same error with ``prefix`` in front of both wordings (e.g. ``rank 1: ``)."""
        err = type(self)(prefix + self.template)
        err.__dict__.update({k: v for k, v in self.__dict__.items() if k != "template"})
        return err


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
