"""FrozenBatchNorm: BN as a fixed per-channel scale/shift from buffers (any rank, channel dim 1)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NormSurgeonError
from ._common import _check_batchnorm


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (nothing trainable).

    Computes ``x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` per channel (dim 1), for inputs of any rank >= 2 — the
    eval-mode function of BatchNorm1d/2d/3d — in both train and eval mode (like torchvision's
    FrozenBatchNorm2d, any rank). scale/shift are computed in float32 (at least) and cast to the
    input dtype, so fp16/bf16 models stay close to BN's own float32 accumulation. In ONNX it is a
    ``Mul`` and an ``Add`` (constant-folded), which runtimes fuse into a preceding Conv.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BatchNorm state dict loads as-is: its step counter means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift), in float32 or wider."""
        dt = torch.promote_types(self.running_var.dtype, torch.float32)
        scale = self.weight.to(dt) * torch.rsqrt(self.running_var.to(dt) + self.eps)
        shift = self.bias.to(dt) - self.running_mean.to(dt) * scale
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm({self.num_features}) expects (N, {self.num_features}, *) input, "
                             f"got shape {tuple(x.shape)}")
        scale, shift = self.scale_shift()
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> "FrozenBatchNorm":
        """Freeze a BatchNorm: copies its running stats and affine params (affine=False -> 1 and 0),
        dtype, device and train/eval mode. Equals ``bn`` in eval mode. BN without running stats
        (``track_running_stats=False``) always uses batch statistics and has nothing to freeze."""
        _check_batchnorm(bn, "FrozenBatchNorm.from_batchnorm")
        if bn.running_mean is None or bn.running_var is None:
            raise NormSurgeonError(
                f"cannot freeze {type(bn).__name__}({bn.num_features}) with track_running_stats=False: "
                "it has no running statistics (it always normalizes with batch statistics)")
        new = cls(bn.num_features, eps=bn.eps, device=bn.running_var.device, dtype=bn.running_var.dtype)
        with torch.no_grad():
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                new.weight.copy_(bn.weight.detach())
            if bn.bias is not None:
                new.bias.copy_(bn.bias.detach())
        return new.train(bn.training)
