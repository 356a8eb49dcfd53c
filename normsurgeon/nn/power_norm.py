"""PowerNorm (Shen et al., "PowerNorm: Rethinking Batch Normalization in Transformers", ICML 2020).

A BatchNorm for token features (last dim of (B, C) / (B, T, C) inputs) that NLP training tolerates:

- no mean subtraction: x is divided by its quadratic mean (second moment) per channel, taken over
  batch x positions (only real tokens when a padding mask is active, see ``padding_mask``);
- during the first ``warmup_steps`` training steps the batch's quadratic mean is used, with its exact
  gradient; afterwards the *running* quadratic mean of the previous steps (``running_phi``, an EMA
  updated every training step) is used, with the paper's approximate backward (Algorithm 1):

      x_hat' = dL/dx_hat - nu * x_hat,       dL/dx = x_hat' / psi,
      nu <- nu * (1 - (1 - a_bkw) * Gamma) + (1 - a_bkw) * Lambda,
      Gamma = mean(x_hat^2),  Lambda = mean(x_hat * dL/dx_hat)   (per channel, over real tokens)

  ``nu`` (``ema_gz``) stands in for the batch term mean(x_hat * dL/dx_hat) that the exact gradient of
  a batch-statistic norm has: with stationary statistics nu converges to Lambda / Gamma and the
  approximate gradient to the exact one (tests/test_nn_power.py checks that).
- optional group scaling (``group_num``): as in the authors' fairseq code, each token is first
  divided by the quadratic mean of its channel groups (a per-token RMS norm over C / group_num
  channels). Off by default; with it on only the per-channel affine part is a fixed map in eval.

In eval it is ``x * scale + shift`` per channel (``eval_scale_shift``): it folds like a BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NormSurgeonError
from .padding_mask import real_rows
from .token_batch_norm import TokenBatchNorm

__all__ = ["PowerNorm", "GroupScaling"]


class GroupScaling(nn.Module):
    """Divide each token by the quadratic mean of its channel group (the authors' GroupScaling1D)."""

    def __init__(self, num_features: int, group_num: int, eps: float = 1e-5) -> None:
        super().__init__()
        if group_num < 1 or num_features % group_num:
            raise NormSurgeonError(f"group_num must divide the {num_features} channels, got {group_num}")
        self.num_features, self.group_num, self.eps = num_features, group_num, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(*x.shape[:-1], self.group_num, self.num_features // self.group_num)
        return (g * torch.rsqrt(g.square().mean(dim=-1, keepdim=True) + self.eps)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, group_num={self.group_num}, eps={self.eps}"


class _PowerFunction(torch.autograd.Function):
    """z = x / sqrt(phi + eps) on (N, C) rows, with the PowerNorm backward.

    ``exact``: phi is this batch's quadratic mean over ``rows`` and the backward is its exact
    gradient, (g - z * Lambda) / s on real rows (Lambda summed over *all* rows: every output depends
    on s), g / s on padded rows. Otherwise phi is the running statistic and the backward uses ``nu``
    for Lambda (the paper's approximation). Both update nu in place.
    """

    @staticmethod
    def forward(ctx, x, phi, nu, rows, n_real, eps, alpha_bkw, exact):
        s = torch.sqrt(phi + eps)
        z = x / s
        ctx.save_for_backward(z, s, rows)
        ctx.nu, ctx.n_real, ctx.alpha_bkw, ctx.exact = nu, n_real, alpha_bkw, exact
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, s, rows = ctx.saved_tensors
        nu, n = ctx.nu, ctx.n_real
        gz = (g * z).sum(dim=0) / n
        zr = z if rows.numel() == 0 else z[rows]
        gamma = zr.square().sum(dim=0) / n
        c = gz if ctx.exact else nu.to(g.dtype)
        corr = z * c
        if rows.numel():
            corr = corr * rows.unsqueeze(1).to(g.dtype)
        gx = (g - corr) / s
        with torch.no_grad():
            a = ctx.alpha_bkw
            nu.mul_(1 - (1 - a) * gamma.to(nu.dtype)).add_((1 - a) * gz.to(nu.dtype))
        return gx, None, None, None, None, None, None, None


class PowerNorm(nn.Module):
    """PowerNorm over the last dim of (B, C), (B, T, C), ... inputs (see the module docstring).

    Args:
        num_features: C.
        eps: added to the quadratic mean.
        alpha_fwd: EMA factor of the running quadratic mean, ``phi <- a * phi + (1 - a) * batch``
            (the paper's 0.9; note it is 1 - BatchNorm's ``momentum``).
        alpha_bkw: EMA factor of the backward statistic nu (the paper's 0.9).
        affine: learnable per-channel weight and bias.
        warmup_steps: training steps that use the batch statistic (exact gradient) before the running
            one takes over. The authors set it to the learning-rate warm-up (4000 updates).
        group_num: None (default) for no group scaling, else the number of channel groups.

    Buffers: ``running_phi`` (C,) running quadratic mean, ``ema_gz`` (C,) the backward's nu,
    ``num_batches_tracked`` training steps seen (drives the warm-up; saved with the state dict).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 affine: bool = True, warmup_steps: int = 4000, group_num: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps = num_features, eps
        self.alpha_fwd, self.alpha_bkw, self.warmup_steps = alpha_fwd, alpha_bkw, int(warmup_steps)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.group_scaling = GroupScaling(num_features, group_num, eps) if group_num else None
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("ema_gz", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, "
                f"affine={self.affine}, warmup_steps={self.warmup_steps}")

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.num_batches_tracked.zero_()

    def eval_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) of the eval map ``x -> x * scale + shift`` (float32 or wider).

        With group scaling on, this is the map applied *after* ``self.group_scaling``: only that part
        is a fixed per-channel affine (foldable); the group scaling stays a per-token op.
        """
        dt = torch.promote_types(self.running_phi.dtype, torch.float32)
        scale = torch.rsqrt(self.running_phi.to(dt) + self.eps)
        shift = torch.zeros_like(scale)
        if self.affine:
            scale = scale * self.weight.detach().to(dt)
            shift = self.bias.detach().to(dt)
        return scale, shift

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 1 or input.shape[-1] != self.num_features:
            raise ValueError(f"PowerNorm({self.num_features}) expects an input whose last dim is "
                             f"{self.num_features}, got shape {tuple(input.shape)}")
        x = input if self.group_scaling is None else self.group_scaling(input)
        if not self.training:
            scale = torch.rsqrt(self.running_phi + self.eps)
            if self.affine:
                return x * (scale * self.weight) + self.bias
            return x * scale
        shape = x.shape
        x2 = x.reshape(-1, self.num_features)
        rows = real_rows(input, self.num_features)
        real = x2 if rows is None else x2[rows]
        n = real.shape[0]
        if n < 1:
            raise ValueError(f"PowerNorm({self.num_features}): the padding mask leaves no real token in the batch")
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            batch_phi = real.detach().square().mean(dim=0)
            exact = int(self.num_batches_tracked) <= self.warmup_steps
            phi = batch_phi if exact else self.running_phi.clone()
            self.running_phi.mul_(self.alpha_fwd).add_((1 - self.alpha_fwd) * batch_phi.to(self.running_phi.dtype))
        no_rows = torch.empty(0, dtype=torch.bool, device=x2.device)
        z = _PowerFunction.apply(x2, phi.to(x2.dtype), self.ema_gz, no_rows if rows is None else rows, n,
                                 self.eps, self.alpha_bkw, exact)
        if self.affine:
            z = z * self.weight + self.bias
        return z.view(shape)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def _from_token_bn(cls, bn: TokenBatchNorm, **kwargs) -> "PowerNorm":
        like = {"device": bn.running_mean.device, "dtype": bn.running_mean.dtype}
        new = cls(bn.num_features, eps=bn.eps, affine=bn.affine, **kwargs, **like)
        if bn.affine:
            with torch.no_grad():
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        return new.train(bn.training)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, **kwargs) -> "PowerNorm":
        """A PowerNorm in place of a LayerNorm over the last dim: weight/bias copied (as
        ``TokenBatchNorm.from_layernorm``: no bias -> 0, no affine -> ``affine=False``), eps raised to
        at least 1e-5, train/eval mode kept. ``kwargs``: alpha_fwd, alpha_bkw, warmup_steps, group_num.
        The running quadratic mean starts at 1: train (or calibrate) before eval."""
        return cls._from_token_bn(TokenBatchNorm.from_layernorm(ln), **kwargs)

    @classmethod
    def from_rmsnorm(cls, norm: nn.Module, *, weight_offset: float | None = None, eps: float | None = None,
                     **kwargs) -> "PowerNorm":
        """A PowerNorm in place of an RMSNorm (torch or transformers family): weight copied (Gemma's
        ``1 + weight`` included, see ``TokenBatchNorm.from_rmsnorm``), bias 0."""
        bn = TokenBatchNorm.from_rmsnorm(norm, weight_offset=weight_offset, eps=eps)
        return cls._from_token_bn(bn, **kwargs)
