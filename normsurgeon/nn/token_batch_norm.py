"""TokenBatchNorm: BatchNorm over the last dim of (B, C), (B, T, C), (B, H, W, C) inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NormSurgeonError
from ._common import _copy_param, _like, bn_eps
from .padding_mask import real_rows

# What a TokenBatchNorm reads and writes through to its ``bn`` child: BatchNorm's own attribute
# names, so code written for a BatchNorm (fold, calibrate, user code) reads a TokenBatchNorm alike.
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_DELEGATED = frozenset(_STATE + ("num_features", "eps", "momentum", "affine", "track_running_stats"))


class TokenBatchNorm(nn.Module):
    """BatchNorm over the last dim, with statistics over every leading position (batch x tokens).

    Accepts (B, C), (B, T, C), (B, H, W, C), ... . The forward flattens the input to (-1, C) (a view
    for contiguous inputs; no transpose) and runs its child ``bn``, a plain ``nn.BatchNorm1d``, on
    it, then views the result back: exactly ``BatchNorm1d`` on ``x.reshape(-1, C)`` in train and
    eval mode, with running stats and ``momentum=None`` (cumulative average) behaving the same. It
    exports as one ``BatchNormalization`` op on a 2-D tensor between two ``Reshape`` ops.

    Why a child and not a BatchNorm subclass: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    rebuilds every BatchNorm as a SyncBatchNorm, which normalizes dim 1. The child sees (N, C), so
    torch's own converter turns it into a correct SyncBatchNorm (a subclass would become one that
    normalizes the token axis). ``weight``, ``running_var``, ``eps``... read and write the child's.
    The state dict is a BatchNorm1d's (``weight``, ``running_var``..., not ``bn.weight``): checkpoints
    and recipes of version 1 (a BatchNorm1d subclass) load unchanged, stay interchangeable with a
    BatchNorm1d's, and keys with ``bn.`` load too; version-1 pickles load as well.

    This is the norm of BN-transformers (LeViT; Yao et al. 2021): it replaces a token LayerNorm, and
    in eval it is a per-channel affine map that can be folded into the adjacent Linear (the fold
    folds its ``bn`` child, as it folds LeViT's BatchNorm1d on flattened tokens).

    Padding-aware: in training, when a padding mask is active (``normsurgeon.nn.capture_padding_mask``
    or ``padding_mask``) and matches the input's leading shape, the batch statistics (and the running
    statistics updated from them) are those of the real tokens only, exactly ``BatchNorm1d`` on
    ``x.reshape(-1, C)[mask]``; padded positions are normalized with the same statistics. Without a
    mask every position counts, as before. Synchronized padding-aware statistics need
    ``normsurgeon.nn.convert_sync_batchnorm`` (``SyncTokenBatchNorm``); after torch's converter a
    masked training step raises instead of silently using this rank's tokens only.
    """

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps, momentum, affine, track_running_stats, device=device,
                                 dtype=dtype, bias=bias)
        self._flat_state_dict()

    def _flat_state_dict(self) -> None:
        self.register_state_dict_post_hook(_flat_keys)
        self.register_load_state_dict_post_hook(_flat_missing_keys)

    def __setattr__(self, name: str, value) -> None:
        if name in _DELEGATED and "bn" in self.__dict__.get("_modules", {}):
            setattr(self._modules["bn"], name, value)
            return
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return ""  # the child says it all

    def reset_running_stats(self) -> None:
        self.bn.reset_running_stats()

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 1 or input.shape[-1] != self.num_features:
            raise ValueError(
                f"TokenBatchNorm({self.num_features}) expects an input whose last dim is {self.num_features}, "
                f"got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(self._modules["bn"], nn.modules.batchnorm._BatchNorm):
            # folded (an Identity) or swapped (a LayerNorm over C): the child maps (N, C) as it is
            return self.bn(input.reshape(-1, input.shape[-1])).view(input.shape)
        self._check_input_dim(input)
        shape = input.shape
        x = input.reshape(-1, self.num_features)
        rows = real_rows(input, self.num_features) if self.training or self.running_mean is None else None
        if rows is None:
            return self.bn(x).view(shape)
        if isinstance(self.bn, nn.SyncBatchNorm) and _distributed():
            raise NormSurgeonError(
                "TokenBatchNorm under a padding mask with a torch SyncBatchNorm child (from "
                "torch.nn.SyncBatchNorm.convert_sync_batchnorm): its statistics would cover this rank's real tokens "
                "only; use normsurgeon.nn.convert_sync_batchnorm for padding-aware synchronized statistics")
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

    # -- version 1 (a BatchNorm1d subclass) -----------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # version-1 keys ("norm.weight") are the child's now ("norm.bn.weight")
        for key in _STATE:
            old, new = prefix + key, prefix + "bn." + key
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        self.__dict__["_loading_prefix"] = prefix  # for _flat_missing_keys
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setstate__(self, state: dict) -> None:
        if "bn" not in state.get("_modules", {}):  # a version-1 pickle: its BatchNorm state becomes the child
            child = nn.BatchNorm1d(state["num_features"], state["eps"], state["momentum"], state["affine"],
                                   state["track_running_stats"], device="meta")
            child._parameters, child._buffers = state["_parameters"], state["_buffers"]
            child.training = state.get("training", True)
            state = {k: v for k, v in state.items() if k not in ("_parameters", "_buffers", "_modules")
                     and k not in _DELEGATED}
            state.update(_parameters={}, _buffers={}, _non_persistent_buffers_set=set(), _modules={"bn": child})
            super().__setstate__(state)
            self._flat_state_dict()
            return
        super().__setstate__(state)

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


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _flat_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: the child's keys (``bn.weight``) as a BatchNorm1d's (``weight``)."""
    for key in _STATE:
        nested = prefix + "bn." + key
        if nested in state_dict:
            state_dict[prefix + key] = state_dict.pop(nested)


def _flat_missing_keys(module: nn.Module, incompatible) -> None:
    """Load-state-dict post hook: missing keys named as the state dict names them (``weight``)."""
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    keys = incompatible.missing_keys
    for i, key in enumerate(keys):
        if key.startswith(prefix + "bn.") and key[len(prefix) + 3:] in _STATE:
            keys[i] = prefix + key[len(prefix) + 3:]


def _delegate(name: str) -> property:
    return property(lambda self: getattr(self._modules["bn"], name), doc=f"the ``bn`` child's ``{name}``")


for _name in sorted(_DELEGATED):
    setattr(TokenBatchNorm, _name, _delegate(_name))
