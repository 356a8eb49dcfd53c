"""TokenBatchNorm: BatchNorm over the last dim of (B, C), (B, T, C), (B, H, W, C) inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NormSurgeonError
from . import _sync_guard
from ._common import _copy_param, _like, bn_eps
from .padding_mask import real_rows


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dim, with statistics over every leading position (batch x tokens).

    Accepts (B, C), (B, T, C), (B, H, W, C), ... . The forward flattens the input to (-1, C) (a view
    for contiguous inputs; no transpose), runs ``BatchNorm1d`` and views the result back, so it is
    exactly ``BatchNorm1d`` on ``x.reshape(-1, C)`` in train and eval mode, with running stats and
    ``momentum=None`` (cumulative average) behaving the same. It exports as one
    ``BatchNormalization`` op on a 2-D tensor between two ``Reshape`` ops.

    This is the norm of BN-transformers (LeViT; Yao et al. 2021): it replaces a token LayerNorm, and
    in eval it is a per-channel affine map that can be folded into the adjacent Linear.

    Padding-aware: in training, when a padding mask is active (``normsurgeon.nn.capture_padding_mask``
    or ``padding_mask``) and matches the input's leading shape, the batch statistics (and the running
    statistics updated from them) are those of the real tokens only, exactly ``BatchNorm1d`` on
    ``x.reshape(-1, C)[mask]``; padded positions are normalized with the same statistics. Without a
    mask every position counts, as before.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 1 or input.shape[-1] != self.num_features:
            raise ValueError(
                f"TokenBatchNorm({self.num_features}) expects an input whose last dim is {self.num_features}, "
                f"got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        shape = input.shape
        x = input.reshape(-1, self.num_features)
        rows = real_rows(input, self.num_features) if self.training or self.running_mean is None else None
        if rows is None:
            return super().forward(x).view(shape)
        return self._masked_forward(x, rows).view(shape)

    def _masked_forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """BatchNorm1d's training computation with statistics from ``x[rows]`` only."""
        real = x[rows]
        n = real.shape[0]
        if n < 2:
            raise ValueError(f"TokenBatchNorm({self.num_features}): the padding mask leaves {n} real token(s) in "
                             "the batch; batch statistics need at least 2")
        acc = torch.promote_types(x.dtype, torch.float32)  # as BatchNorm: accumulate in float32 at least
        var, mean = torch.var_mean(real.to(acc), dim=0, correction=0)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
        out = (x.to(acc) - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, *, momentum: float | None = 0.1) -> "TokenBatchNorm":
        """A TokenBatchNorm in place of a LayerNorm over the last dim.

        The LN's weight/bias become the BN's weight/bias (LN without bias: BN bias 0; LN without
        affine: ``affine=False``); eps is kept. Running stats start at mean 0 / var 1, so the function
        changes: calibrate (``normsurgeon.calibrate``) or train before using it in eval. eps is raised
        to at least ``MIN_BN_EPS`` (see ``bn_eps``).
        """
        shape = tuple(getattr(ln, "normalized_shape", ()))
        if len(shape) != 1:
            raise NormSurgeonError(
                f"TokenBatchNorm can replace a LayerNorm over the last dim only; this one normalizes over "
                f"{shape} (normalized_shape must have one entry)")
        weight = getattr(ln, "weight", None)
        bias = getattr(ln, "bias", None)
        affine = weight is not None
        new = cls(shape[0], eps=bn_eps(ln.eps), momentum=momentum, affine=affine, **_like(ln))
        if affine:
            _copy_param(new.weight, weight)
            _copy_param(new.bias, bias, fill=0.0)
            if bias is None:
                new.bias.requires_grad_(weight.requires_grad)
        return new.train(ln.training)

    @classmethod
    def from_rmsnorm(cls, norm: nn.Module, *, weight_offset: float | None = None, eps: float | None = None,
                     momentum: float | None = 0.1) -> "TokenBatchNorm":
        """A TokenBatchNorm in place of an RMSNorm over the last dim.

        Works with ``torch.nn.RMSNorm`` and the transformers family (``LlamaRMSNorm``, ``T5LayerNorm``:
        a ``weight`` and ``variance_epsilon``/``eps``). The RMS weight becomes the BN weight, the BN
        bias is 0. ``weight_offset`` is added to the weight: Gemma-style norms scale by
        ``1 + weight``; ``None`` picks 1.0 for classes whose name starts with "Gemma", else 0.0.
        eps: the norm's eps, or 1e-5 when it has none (``nn.RMSNorm(eps=None)``).
        Running stats start at mean 0 / var 1: calibrate or train before eval.
        """
        weight = getattr(norm, "weight", None)
        if isinstance(norm, nn.RMSNorm):
            shape = tuple(norm.normalized_shape)
        elif weight is not None:
            shape = tuple(weight.shape)
        else:
            raise NormSurgeonError(f"cannot tell the feature size of {type(norm).__name__}: it has no weight")
        if len(shape) != 1:
            raise NormSurgeonError(
                f"TokenBatchNorm can replace an RMSNorm over the last dim only; this one normalizes over {shape}")
        if eps is None:
            eps = getattr(norm, "eps", None)
            if eps is None:
                eps = getattr(norm, "variance_epsilon", None)
            if eps is None:
                eps = 1e-5
        if weight_offset is None:
            weight_offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
        affine = weight is not None
        new = cls(shape[0], eps=bn_eps(float(eps)), momentum=momentum, affine=affine, **_like(norm))
        if affine:
            _copy_param(new.weight, weight)
            if weight_offset:
                with torch.no_grad():
                    new.weight.add_(weight_offset)
            _copy_param(new.bias, None, fill=0.0)
            new.bias.requires_grad_(weight.requires_grad)
        return new.train(norm.training)


# torch's nn.SyncBatchNorm.convert_sync_batchnorm would make a TokenBatchNorm normalize the token
# axis: refuse it loudly from the moment a TokenBatchNorm can exist (see _sync_guard).
_sync_guard.install()
