"""BatchNorm → LayerNorm (``--to ln``): ``nn.LayerNorm`` on (N, C) inputs and for TokenBatchNorm,
``ChannelLayerNorm`` (LN over dim 1 at each position) otherwise. Not function-preserving."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import module_class
from .swap import BnSite, FromBnRule, Plan, copy_affine, factory_kwargs, joined


class BnToLn(FromBnRule):
    target, target_name = "ln", "LayerNorm"
    channels_first_only = False  # a token BN becomes a LayerNorm over the last dim

    def plan_bn(self, path: str, bn: BnSite) -> tuple[str | None, Plan | None]:
        channels = bn.module.num_features
        if bn.rank == 2 or bn.token:
            note = "LayerNorm over the last dim" + (" (token BN)" if bn.token else "")
            return None, Plan(path, "batchnorm", bn_to_layernorm, False, channels, bn.shape,
                              joined(note, bn.shared_note))
        return None, Plan(path, "batchnorm", lambda old: module_class("channel_ln").from_batchnorm(old), False,
                          channels, bn.shape, joined("LayerNorm over dim 1 at each position", bn.shared_note))


def bn_to_layernorm(bn: _BatchNorm) -> nn.LayerNorm:
    affine = bn.weight is not None
    new = nn.LayerNorm(bn.num_features, eps=bn.eps, elementwise_affine=affine,
                       bias=bn.bias is not None or not affine, **factory_kwargs(bn))
    if affine:
        copy_affine(new, bn.weight, bn.bias)
    return new.train(bn.training)
