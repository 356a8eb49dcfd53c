"""Helpers every replacement module's ``from_*`` constructor shares (see ``normsurgeon.nn``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NormSurgeonError

def _copy_param(dst: nn.Parameter | None, src: torch.Tensor | None, fill: float | None = None) -> None:
    """Copy ``src`` (or ``fill`` when ``src`` is None) into ``dst`` and take src's requires_grad."""
    if dst is None:
        return
    with torch.no_grad():
        if src is not None:
            dst.copy_(src.detach().reshape(dst.shape))
        elif fill is not None:
            dst.fill_(fill)
    if isinstance(src, nn.Parameter):
        dst.requires_grad_(src.requires_grad)


def _like(src: nn.Module) -> dict:
    """dtype/device of a module's first parameter or buffer (floating), for factory kwargs."""
    for t in (*src.parameters(recurse=False), *src.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _check_batchnorm(bn: nn.Module, what: str) -> None:
    if not isinstance(bn, _BatchNorm):
        raise NormSurgeonError(f"{what} expects a BatchNorm module, got {type(bn).__name__}")


# LayerNorms often use eps=1e-12 (BERT, ViT). A per-sample LN variance is never near zero, but a BN
# channel's variance over the batch can be (a constant channel, a CLS-only feature), and 1e-12 then
# divides by ~1e-6: use BatchNorm's own default as the floor.
MIN_BN_EPS = 1e-5


def bn_eps(eps: float) -> float:
    return max(float(eps), MIN_BN_EPS)
