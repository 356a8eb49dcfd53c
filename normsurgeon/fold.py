"""Compatibility name for ``normsurgeon.passes.fold`` (scripts that import ``normsurgeon.fold.fold``);
new code imports ``normsurgeon.fold`` (the function) or ``normsurgeon.passes.fold``."""

from .graph.ops import map_axis_through_reshape  # noqa: F401
from .passes.fold import FoldReport, fold  # noqa: F401
