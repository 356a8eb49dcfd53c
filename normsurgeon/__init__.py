"""normsurgeon: find, convert, fold and export normalization layers of PyTorch models, verified."""

__version__ = "0.1.0"

from .errors import NormSurgeonError, VerificationError  # noqa: E402
from .inputs import CallArgs  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .outputs import compare_outputs, flatten_outputs  # noqa: E402

__all__ = [
    "__version__", "NormSurgeonError", "VerificationError", "CallArgs",
    "load_model", "save_model", "compare_outputs", "flatten_outputs",
]
