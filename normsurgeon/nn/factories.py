"""Factories: BN -> GroupNorm, the FFN BatchNorm, and making a BN an identity in eval."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NormSurgeonError
from ._common import _check_batchnorm, _copy_param, _like
from .token_batch_norm import TokenBatchNorm


def batchnorm_to_groupnorm(bn: _BatchNorm, groups: int) -> nn.GroupNorm:
    """An ``nn.GroupNorm(groups, C)`` in place of a BatchNorm: per-sample statistics over C/G channels
    (and all positions). ``groups`` must divide C (1 = LayerNorm over (C, *), C = InstanceNorm).
    Carries weight/bias (BN affine=False -> ``affine=False``; no bias -> bias 0), eps, dtype, device,
    requires_grad and mode. The function changes: fine-tune afterwards."""
    _check_batchnorm(bn, "batchnorm_to_groupnorm")
    c = bn.num_features
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise NormSurgeonError(f"GroupNorm groups must be a positive integer, got {groups!r}")
    if c % groups:
        divisors = [d for d in range(1, c + 1) if c % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise NormSurgeonError(
            f"cannot convert {type(bn).__name__}({c}) to GroupNorm with {groups} groups: {groups} does not divide "
            f"{c} channels (choose one of {shown})")
    affine = bn.weight is not None
    new = nn.GroupNorm(groups, c, eps=bn.eps, affine=affine, **_like(bn))
    if affine:
        _copy_param(new.weight, bn.weight)
        _copy_param(new.bias, bn.bias, fill=0.0)
        if bn.bias is None:
            new.bias.requires_grad_(bn.weight.requires_grad)
    return new.train(bn.training)


def make_identity(bns: _BatchNorm | Iterable[_BatchNorm]) -> None:
    """Set each BN's affine params from its running stats so that eval output == input.

    weight = sqrt(running_var + eps), bias = running_mean. Call after ``calibrate`` on the BNs a
    pass inserted (``ffn_batchnorm``), so inserting them changes nothing in eval until trained.
    """
    items = [bns] if isinstance(bns, nn.Module) else list(bns)
    for bn in items:
        _check_batchnorm(bn.bn if isinstance(bn, TokenBatchNorm) else bn, "make_identity")
        if bn.weight is None or bn.bias is None:
            raise NormSurgeonError(f"make_identity needs a BatchNorm with weight and bias (affine=True, bias=True); "
                                   f"{type(bn).__name__}({bn.num_features}) has none")
        if bn.running_mean is None or bn.running_var is None:
            raise NormSurgeonError(f"make_identity needs running statistics; {type(bn).__name__}"
                                   f"({bn.num_features}) has track_running_stats=False")
        with torch.no_grad():
            var = bn.running_var.double()
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(bn.running_mean.double())


def ffn_batchnorm(hidden: int, identity_init: bool = False, *, eps: float = 1e-5, momentum: float | None = 0.1,
                  device=None, dtype=None) -> TokenBatchNorm:
    """The BN inserted between the two Linears of a transformer FFN (Yao et al. 2021): a
    ``TokenBatchNorm(hidden)`` over the FFN's hidden width.

    ``identity_init=True`` sets weight/bias from the current (default mean 0 / var 1) running stats,
    so the fresh module is an identity in eval. Once ``calibrate`` has replaced the running stats,
    call :func:`make_identity` again to keep it an identity; for training, the default init
    (weight 1, bias 0) is the usual choice.
    """
    bn = TokenBatchNorm(hidden, eps=eps, momentum=momentum, device=device, dtype=dtype)
    if identity_init:
        make_identity(bn)
    return bn
