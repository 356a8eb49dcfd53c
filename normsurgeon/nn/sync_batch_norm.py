"""Synchronized BatchNorm for converted models: ``SyncTokenBatchNorm`` and ``convert_sync_batchnorm``.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` rebuilds every ``_BatchNorm`` as a SyncBatchNorm,
which normalizes dim 1. A :class:`TokenBatchNorm` normalizes the *last* dim of (B, T, C), so that
idiom would give a module that normalizes the token axis (an error, or silently wrong when T == C)
if a TokenBatchNorm were a BatchNorm; it holds one instead (its ``bn`` child sees (N, C)), so torch's
idiom synchronizes that child correctly. :func:`convert_sync_batchnorm` is the padding-aware version:
token BNs become :class:`SyncTokenBatchNorm` (statistics over the real tokens of every rank), every
other BN becomes torch's ``SyncBatchNorm``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NormSurgeonError
from .padding_mask import real_rows
from .token_batch_norm import TokenBatchNorm

__all__ = ["SyncTokenBatchNorm", "convert_sync_batchnorm"]


def _group_size(group) -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the backward sums the gradients over the ranks too. The statistic is
    used by every rank's loss, so d(sum of all losses)/d(this rank's share) is that sum. (torch's
    ``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated, and its
    suggested replacement has no autograd.)"""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist
        ctx.group = group
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


class SyncTokenBatchNorm(TokenBatchNorm):
    """A :class:`TokenBatchNorm` whose batch statistics are taken over every rank of a process group.

    Same layout as TokenBatchNorm (normalizes the last dim of (B, C), (B, T, C), ...), same state
    dict, same eval function; it *is* a TokenBatchNorm, so ``calibrate``, ``fold`` and ONNX export
    treat it as one. In train mode under an initialized process group with more than one rank,
    the statistics are those of the union of all ranks' inputs: per channel, the count and sum are
    all-reduced (giving the global mean), then the sum of squared deviations from that mean (two
    passes: no sum-of-squares cancellation). Both all-reduces are differentiable, so gradients equal
    those of one process on the union batch (then averaged by DDP like any gradient). Running stats
    get the global mean and unbiased variance, identical on every rank. Works with any backend and
    device (gloo on CPU, NCCL on GPU). Under a padding mask (``padding_mask``) only the real tokens
    of every rank count, as one TokenBatchNorm on the union batch would count them. Every rank must
    call forward the same number of times in train mode, as with ``nn.SyncBatchNorm``. Statistics
    are computed in float32 for half inputs.
    Without a process group (or with one rank) it is exactly TokenBatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(self._modules["bn"], _BatchNorm):  # folded or swapped: TokenBatchNorm's forward
            return super().forward(input)
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if not bn_training or _group_size(self.process_group) <= 1:
            return super().forward(input)

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        c = self.num_features
        x = input.reshape(-1, c)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        # under a padding mask the statistics are those of every rank's real tokens (padded rows are
        # normalized with them, as in TokenBatchNorm); a zero weight keeps them out of both sums
        rows = real_rows(input, c)
        weight = None if rows is None else rows.to(x.dtype).unsqueeze(1)
        real = x if weight is None else x * weight
        n_local = x.shape[0] if rows is None else int(rows.sum())
        totals = _all_reduce(torch.cat([real.sum(0), x.new_full((1,), n_local)]), self.process_group)
        count = totals[c]
        # the global count is at least the local one: only a rank with <= 1 row pays a host sync to check it
        if n_local <= 1 and int(count.item()) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(count.item())} over "
                             f"all ranks (input size {list(input.shape)} on this rank)")
        mean = totals[:c] / count
        centered = x - mean
        sq = centered * centered if weight is None else centered * centered * weight
        var = _all_reduce(sq.sum(0), self.process_group) / count
        out = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)

        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype).view(input.shape)

    @classmethod
    def from_token_batch_norm(cls, bn: TokenBatchNorm, process_group=None) -> "SyncTokenBatchNorm":
        """The synchronized version of ``bn``, *sharing* its parameters and buffers (as torch's
        ``convert_sync_batchnorm`` does, so an optimizer built before still holds the right tensors);
        takes its train/eval mode and ``qconfig``."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group=process_group, device="meta", bias=bn.bias is not None)
        new.bn = bn.bn  # the same child: the same parameters and buffers
        new.training = bn.training
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def _refuse_custom_forward(path: str, m: _BatchNorm, base) -> None:
    # A BN subclass with its own forward (a hand-written token BN that transposes, a BN with extra
    # logic) would lose that forward in a SyncBatchNorm: refuse rather than change the function.
    if type(m).forward is not base.forward:
        raise NormSurgeonError(
            f"cannot synchronize {path or '<root>'} ({type(m).__name__}): it overrides BatchNorm's forward, "
            "and a synchronized BatchNorm would drop what that forward does; synchronize it by hand")


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Synchronize every BatchNorm of a (converted) model for distributed training.

    The padding-aware counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (which
    synchronizes a TokenBatchNorm's ``bn`` child, ignoring padding masks; see docs/convert.md): each :class:`TokenBatchNorm` (converted LN,
    FFN BN) becomes a :class:`SyncTokenBatchNorm` (token layout kept), each other ``_BatchNorm``
    becomes ``torch.nn.SyncBatchNorm`` via torch's own function. Parameters and buffers are shared
    with the old modules, submodules are replaced in place, and, as in torch, the returned module is
    ``module`` itself unless ``module`` is a BN. torch's SyncBatchNorm synchronizes only on GPU-like
    devices (CUDA, XPU, HPU, ...); SyncTokenBatchNorm on any. A BN subclass that overrides forward
    is refused (``NormSurgeonError``), before anything is changed.
    """
    for path, m in module.named_modules():
        if isinstance(m, SyncTokenBatchNorm):
            _refuse_custom_forward(path, m, SyncTokenBatchNorm)
        elif isinstance(m, TokenBatchNorm):
            _refuse_custom_forward(path, m, TokenBatchNorm)
        elif isinstance(m, nn.SyncBatchNorm):
            _refuse_custom_forward(path, m, nn.SyncBatchNorm)
        elif isinstance(m, _BatchNorm):
            _refuse_custom_forward(path, m, _BatchNorm)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, TokenBatchNorm):
        return SyncTokenBatchNorm.from_token_batch_norm(module, process_group)
    if isinstance(module, _BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        new = _convert(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module
