"""Replacement normalization modules, small and composable (in the spirit of timm's ``layers/``).

Pure ``nn.Module`` code: no graph capture, no model surgery. ``convert.py`` decides where these go;
this file only defines what they compute and how they are built from the module they replace.

- :class:`TokenBatchNorm`   BatchNorm over the last dim of (B, C), (B, T, C), (B, H, W, C) inputs.
- :class:`ChannelLayerNorm` LayerNorm over dim 1 of (N, C, *) inputs ("channels_first" LN).
- :class:`FrozenBatchNorm`  BN as a fixed per-channel scale/shift from buffers (any rank, channel dim 1).
- :func:`batchnorm_to_groupnorm`, :func:`ffn_batchnorm`, :func:`make_identity`.

Rules every ``from_*`` constructor follows:

- affine parameters are *copied* (never shared with the source), with the source's dtype, device and
  ``requires_grad``; the new module takes the source's train/eval mode;
- a source without affine parameters gives a new module without them where the new class supports
  that (``TokenBatchNorm(affine=False)``, ``ChannelLayerNorm(elementwise_affine=False)``,
  ``GroupNorm(affine=False)``); :class:`FrozenBatchNorm` always holds weight/bias buffers, so there
  they are 1 and 0. A source with a weight but no bias gets a zero bias where the new class needs one.

See docs/modules.md for when to use which and what each becomes in ONNX.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import NormSurgeonError

__all__ = [
    "TokenBatchNorm", "ChannelLayerNorm", "FrozenBatchNorm",
    "batchnorm_to_groupnorm", "ffn_batchnorm", "make_identity",
]


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


# ---------------------------------------------------------------------------------------------------
# TokenBatchNorm
# ---------------------------------------------------------------------------------------------------

# LayerNorms often use eps=1e-12 (BERT, ViT). A per-sample LN variance is never near zero, but a BN
# channel's variance over the batch can be (a constant channel, a CLS-only feature), and 1e-12 then
# divides by ~1e-6: use BatchNorm's own default as the floor.
MIN_BN_EPS = 1e-5


def bn_eps(eps: float) -> float:
    return max(float(eps), MIN_BN_EPS)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last dim, with statistics over every leading position (batch x tokens).

    Accepts (B, C), (B, T, C), (B, H, W, C), ... . The forward flattens the input to (-1, C) (a view
    for contiguous inputs; no transpose), runs ``BatchNorm1d`` and views the result back, so it is
    exactly ``BatchNorm1d`` on ``x.reshape(-1, C)`` in train and eval mode, with running stats and
    ``momentum=None`` (cumulative average) behaving the same. It exports as one
    ``BatchNormalization`` op on a 2-D tensor between two ``Reshape`` ops.

    This is the norm of BN-transformers (LeViT; Yao et al. 2021): it replaces a token LayerNorm, and
    in eval it is a per-channel affine map that can be folded into the adjacent Linear.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 1 or input.shape[-1] != self.num_features:
            raise ValueError(
                f"TokenBatchNorm({self.num_features}) expects an input whose last dim is {self.num_features}, "
                f"got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        shape = input.shape
        out = super().forward(input.reshape(-1, self.num_features))
        return out.view(shape)

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


# ---------------------------------------------------------------------------------------------------
# ChannelLayerNorm
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# FrozenBatchNorm
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

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
        _check_batchnorm(bn, "make_identity")
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
