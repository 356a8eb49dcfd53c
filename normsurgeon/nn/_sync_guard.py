"""Make ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` refuse models that hold a TokenBatchNorm.

Why: torch's idiom rebuilds every ``_BatchNorm`` as a ``SyncBatchNorm``, which normalizes dim 1. For
a TokenBatchNorm on (B, T, C) that is the token axis: an error at the first forward ("running_mean
should contain T elements not C") or, when T == C, a model that silently computes something else.

How: when this module is imported (``token_batch_norm`` imports it, so this is in place before any
TokenBatchNorm can exist, also one unpickled from a checkpoint), the classmethod on
``nn.SyncBatchNorm`` is wrapped once. The wrapper scans the whole module tree *before* torch changes
anything and raises a ``NormSurgeonError`` naming ``normsurgeon.nn.convert_sync_batchnorm`` when it
finds a TokenBatchNorm; otherwise it calls torch's function unchanged (same arguments, same result),
so models without a TokenBatchNorm, subclasses of SyncBatchNorm and torch's own recursion behave as
before.

Alternatives rejected: TokenBatchNorm must stay an ``isinstance`` of ``_BatchNorm`` (fold, calibrate,
torch.ao quantization and export all rely on it), so it cannot hide from torch's isinstance test;
a check in the converted module's forward is impossible (it is torch's SyncBatchNorm); a global
buffer-registration hook would fire on partial conversions (after torch had already replaced other
BNs of the model in place) and miss a TokenBatchNorm without running stats or affine parameters.
"""

from __future__ import annotations

import functools

from torch import nn

from ..errors import NormSurgeonError

_MARK = "__normsurgeon_token_bn_guard__"

# torch's function, unwrapped: what the guard delegates to, and what convert_sync_batchnorm uses for
# the BNs that are not TokenBatchNorms.
_TORCH_CONVERT = getattr(nn.SyncBatchNorm.convert_sync_batchnorm, _MARK, None) or \
    nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"].__func__


def torch_convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """torch's ``nn.SyncBatchNorm.convert_sync_batchnorm``, without the guard."""
    return _TORCH_CONVERT(nn.SyncBatchNorm, module, process_group)


def _token_batch_norms(module: nn.Module) -> list[str]:
    from .token_batch_norm import TokenBatchNorm
    return [name or "<root>" for name, m in module.named_modules() if isinstance(m, TokenBatchNorm)]


@functools.wraps(_TORCH_CONVERT)
def _guarded(cls, module, process_group=None):
    found = _token_batch_norms(module) if isinstance(module, nn.Module) else []
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise NormSurgeonError(
            f"torch.nn.SyncBatchNorm.convert_sync_batchnorm would turn {len(found)} TokenBatchNorm(s) ({shown}) into "
            "SyncBatchNorm, which normalizes dim 1 (the token axis) instead of the last dim; use "
            "normsurgeon.nn.convert_sync_batchnorm(model, process_group) instead")
    return _TORCH_CONVERT(cls, module, process_group)


def install() -> None:
    """Wrap torch's classmethod once (idempotent, also across a reload of this module)."""
    if getattr(nn.SyncBatchNorm.convert_sync_batchnorm, _MARK, None) is None:
        setattr(_guarded, _MARK, _TORCH_CONVERT)
        nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(_guarded)
