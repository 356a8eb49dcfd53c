"""Compatibility name for ``normsurgeon.onnx`` (kept for ``bench.py`` and existing imports); new code
imports from ``normsurgeon.onnx``."""

from .errors import one_line as _one_line  # noqa: F401
from .onnx import *  # noqa: F401,F403
from .onnx import __all__  # noqa: F401
from .onnx.runtime import _ORT_TYPES  # noqa: F401
