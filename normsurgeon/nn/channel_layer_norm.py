"""ChannelLayerNorm: LayerNorm over dim 1 of (N, C, *) inputs (ConvNeXt's channels_first LN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import _check_batchnorm, _copy_param, _like


class ChannelLayerNorm(nn.Module):
    """LayerNorm over dim 1 (channels) at every position of an (N, C, *) input.

    What ConvNeXt calls a channels_first LayerNorm; the batch-free replacement for BatchNorm1d on
    (N, C, L) and BatchNorm2d/3d. Each sample and position is normalized over its C channels.

    Implementation: move channels last, ``F.layer_norm``, move them back. Chosen over computing
    mean/var over dim 1 by hand because (a) it exports to ONNX as ``Transpose -> LayerNormalization ->
    Transpose`` (opset >= 17): one fused, recognisable norm op that ONNX Runtime runs with its
    LayerNorm kernel, and whose transposes its layout optimizer can cancel against channels-last
    neighbours, while the hand-written form is ~8 elementwise/reduce ops no runtime fuses (their LN
    fusion looks for a reduction over the last axis); (b) ``layer_norm`` accumulates fp16/bf16 inputs
    in float32, as LayerNorm users expect; (c) graph passes (find.py) see an ``aten.layer_norm``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"ChannelLayerNorm({self.num_channels}) expects (N, {self.num_channels}, *) input, "
                             f"got shape {tuple(x.shape)}")
        y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (", bias=False" if self.elementwise_affine and self.bias is None else ""))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, *, eps: float | None = None) -> "ChannelLayerNorm":
        """A ChannelLayerNorm in place of a BatchNorm (channel dim 1).

        Carries weight/bias (BN affine=False -> ``elementwise_affine=False``; BN without bias ->
        ``bias=False``), eps (unless given), dtype, device, requires_grad and train/eval mode. The
        function changes (per-sample instead of batch statistics): fine-tune afterwards.
        """
        _check_batchnorm(bn, "ChannelLayerNorm.from_batchnorm")
        affine = bn.weight is not None
        new = cls(bn.num_features, eps=bn.eps if eps is None else eps, elementwise_affine=affine,
                  bias=bn.bias is not None, **_like(bn))
        if affine:
            _copy_param(new.weight, bn.weight)
            _copy_param(new.bias, bn.bias)
        return new.train(bn.training)
