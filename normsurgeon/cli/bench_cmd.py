"""`normsurgeon bench` (not implemented yet)."""

import click

from ..errors import NormSurgeonError
from .common import guarded


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--debug", is_flag=True, hidden=True)
@guarded
def bench(debug: bool) -> None:
    """(not implemented yet)"""
    raise NormSurgeonError("'bench' is not implemented yet")
