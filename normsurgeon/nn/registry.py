"""Target name → replacement module class: the one place a new replacement module is announced.

A new module is one file in ``normsurgeon/nn/`` plus one line here; the conversion rules in
``normsurgeon/passes/`` look their classes up by these names.
"""

from __future__ import annotations

from torch import nn

from .channel_layer_norm import ChannelLayerNorm
from .frozen_batch_norm import FrozenBatchNorm
from .power_norm import PowerNorm
from .progressive_norm import ProgressiveNorm, RepBatchNorm
from .token_batch_norm import TokenBatchNorm

MODULES: dict[str, type[nn.Module]] = {
    "token_bn": TokenBatchNorm,  # BN over the last dim of (B, [T, ...,] C)
    "bn1d": nn.BatchNorm1d, "bn2d": nn.BatchNorm2d, "bn3d": nn.BatchNorm3d,  # channels-first BN by rank
    "ln": nn.LayerNorm,  # LN over the last dim
    "rms": nn.RMSNorm,  # exact LN -> RMSNorm once the residual stream is centred (passes/ln_to_rms.py)
    "channel_ln": ChannelLayerNorm,  # LN over dim 1 at each position
    "gn": nn.GroupNorm,
    "frozen_bn": FrozenBatchNorm,  # BN as a fixed scale/shift
    "pn": PowerNorm,  # quadratic-mean BN over the last dim (Shen et al. 2020)
    "rep_bn": RepBatchNorm,  # token BN + alpha * x (SLAB)
    "progressive": ProgressiveNorm,  # lam * LN(x) + (1 - lam) * RepBN(x), lam 1 -> 0 (SLAB)
}


def module_class(name: str) -> type[nn.Module]:
    return MODULES[name]
