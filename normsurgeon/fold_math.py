"""Pure math of folding an inference-mode BatchNorm into an adjacent Linear or Conv.

In the style of ``torch/nn/utils/fusion.py``, but for both directions and every conv flavour:

- *after* a producer (``BN(P(x))``): the BN's per-channel affine map ``y = s * z + t`` scales the
  producer's output channels: ``W' = s * W`` along the output-channel axis, ``b' = s * b + t``.
- *before* a consumer (``C(BN(x))``): the BN scales the consumer's input channels: ``W' = W * s``
  along the input-channel axis, and the shift becomes a bias: ``b' = b + W @ t`` (summed over input
  channels and kernel taps). For a Conv this is exact only when the conv never reads padding (a
  padded zero is not shifted by ``t``); the pass checks that, this module does not.

Everything is computed in float64 and cast back to the dtype and device of the weight it replaces,
so float16/bfloat16 models lose nothing to the fold beyond one final rounding. A missing bias is
created (zeros). Weight layouts:

- Linear ``(out, in)``; transformers' Conv1D ``(in, out)`` (a transposed Linear); Conv ``(out, in / groups, *k)``;
- ConvTranspose ``(in, out / groups, *k)``: output channel ``o = g * out_per_group + j`` lives at
  ``weight[g * in_per_group : (g + 1) * in_per_group, j]`` -- not on axis 0, and with groups > 1 not
  simply on axis 1 either.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def bn_scale_shift(running_mean: Tensor, running_var: Tensor, eps: float,
                   weight: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The inference BN as ``y = scale * x + shift`` per channel, in float64 on the stats' device.

    ``weight``/``bias`` are None for ``affine=False``.
    """
    mean = running_mean.detach().to(device=_math_device(running_mean), dtype=torch.float64)
    var = running_var.detach().to(device=mean.device, dtype=torch.float64)
    scale = torch.rsqrt(var + float(eps))
    if weight is not None:
        scale = scale * weight.detach().to(device=mean.device, dtype=torch.float64)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().to(device=mean.device, dtype=torch.float64)
    return scale, shift


def _math_device(t: Tensor) -> torch.device:
    """Where float64 math can run: the tensor's own device, except on backends without float64 (MPS)."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _f64(t: Tensor, like: Tensor) -> Tensor:
    return t.detach().to(device=_math_device(like), dtype=torch.float64)


def _bias64(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(n, dtype=torch.float64, device=_math_device(like))
    return _f64(bias, like)


def _back(weight64: Tensor, bias64: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (weight64.to(device=weight.device, dtype=weight.dtype),
            bias64.to(device=weight.device, dtype=bias_dtype))


def _check_channels(what: str, n: int, scale: Tensor, shift: Tensor) -> None:
    if scale.shape != (n,) or shift.shape != (n,):
        raise ValueError(f"{what} has {n} channels but the BatchNorm has {tuple(scale.shape)}")


# --- BN after a producer ---------------------------------------------------------------------------

def fold_bn_after_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """``BN(linear(x))`` as one linear: returns ``(weight, bias)``; weight is ``(out, in)``."""
    _check_channels("the Linear's output", weight.shape[0], scale, shift)
    w = _f64(weight, weight)
    s, t = _f64(scale, weight), _f64(shift, weight)
    b = _bias64(bias, weight.shape[0], weight)
    return _back(w * s[:, None], s * b + t, weight, bias)


def fold_bn_after_transposed_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
                                    ) -> tuple[Tensor, Tensor]:
    """``BN(x @ W + b)`` with ``W`` ``(in, out)`` (transformers' Conv1D): ``W[:, o] *= s[o]``, ``b' = s·b + t``."""
    nw, nb = fold_bn_after_linear(weight.t(), bias, scale, shift)
    return nw.t().contiguous(), nb


def fold_bn_after_conv(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                       transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """``BN(conv(x))`` (or ``BN(conv_transpose(x))``) as one conv: returns ``(weight, bias)``."""
    w = _f64(weight, weight)
    s, t = _f64(scale, weight), _f64(shift, weight)
    k = (1,) * (w.dim() - 2)
    if not transposed:
        out = w.shape[0]
        _check_channels("the Conv's output", out, scale, shift)
        w = w * s.view(out, 1, *k)
    else:
        in_ch, out_per_group = w.shape[0], w.shape[1]
        out = out_per_group * groups
        _check_channels("the ConvTranspose's output", out, scale, shift)
        wg = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
        wg = wg * s.view(groups, 1, out_per_group, *k)
        w = wg.reshape(w.shape)
    b = _bias64(bias, out, weight)
    return _back(w, s * b + t, weight, bias)


def fold_bn_after_conv_transpose(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                                 groups: int = 1) -> tuple[Tensor, Tensor]:
    """``BN(conv_transpose(x))`` as one ConvTranspose: ``(weight, bias)``; weight is ``(in, out / groups, *k)``."""
    return fold_bn_after_conv(weight, bias, scale, shift, groups=groups, transposed=True)


# --- BN before a consumer --------------------------------------------------------------------------

def fold_bn_before_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
                          ) -> tuple[Tensor, Tensor]:
    """``linear(BN(x))`` as one linear (exact): returns ``(weight, bias)``."""
    _check_channels("the Linear's input", weight.shape[1], scale, shift)
    w = _f64(weight, weight)
    s, t = _f64(scale, weight), _f64(shift, weight)
    b = _bias64(bias, weight.shape[0], weight)
    return _back(w * s[None, :], b + w @ t, weight, bias)


def fold_bn_before_transposed_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
                                     ) -> tuple[Tensor, Tensor]:
    """``BN(x) @ W + b`` with ``W`` ``(in, out)`` (transformers' Conv1D): ``W[i, :] *= s[i]``, ``b' = b + t @ W``."""
    nw, nb = fold_bn_before_linear(weight.t(), bias, scale, shift)
    return nw.t().contiguous(), nb


def fold_bn_before_conv(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                        groups: int = 1) -> tuple[Tensor, Tensor]:
    """``conv(BN(x))`` as one conv, exact only if the conv reads no padding: ``(weight, bias)``."""
    w = _f64(weight, weight)
    s, t = _f64(scale, weight), _f64(shift, weight)
    out, in_per_group = w.shape[0], w.shape[1]
    _check_channels("the Conv's input", in_per_group * groups, scale, shift)
    k = (1,) * (w.dim() - 2)
    wg = w.reshape(groups, out // groups, in_per_group, *w.shape[2:])
    sg = s.view(groups, 1, in_per_group, *k)
    tg = t.view(groups, 1, in_per_group, *k)
    b = _bias64(bias, out, weight)
    bias_add = (wg * tg).flatten(2).sum(2).reshape(out)
    return _back((wg * sg).reshape(w.shape), b + bias_add, weight, bias)


def fold_bn_before_conv_transpose(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                                  groups: int = 1) -> tuple[Tensor, Tensor]:
    """``conv_transpose(BN(x))`` as one ConvTranspose: ``(weight, bias)``; weight is ``(in, out / groups, *k)``.

    The scale multiplies input channel ``i`` (axis 0: exact always). The shift ``t`` adds, at an output
    position, ``Σ_i t_i · Σ W[i, o, k]`` over the kernel taps ``k`` that reach that position; it is one
    bias ``Σ_i Σ_k W[i, o, k] · t_i`` only where every output position receives every tap (stride 1 and
    ``padding ≥ dilation · (kernel − 1) + output_padding``) or where ``t`` is zero. The pass checks that.
    """
    w = _f64(weight, weight)
    s, t = _f64(scale, weight), _f64(shift, weight)
    in_ch, out_per_group = w.shape[0], w.shape[1]
    _check_channels("the ConvTranspose's input", in_ch, scale, shift)
    k = (1,) * (w.dim() - 2)
    out = out_per_group * groups
    wg = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
    tg = t.view(groups, in_ch // groups, 1, *k)
    bias_add = (wg * tg).sum(1).flatten(2).sum(2).reshape(out)
    b = _bias64(bias, out, weight)
    return _back(w * s.view(in_ch, 1, *k), b + bias_add, weight, bias)


def conv_transpose_taps_uniform(stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
                                kernel: tuple[int, ...], output_padding: tuple[int, ...]) -> bool:
    """Whether every output position of a ConvTranspose receives every kernel tap, for any input size.

    Along one dim, output ``p`` receives tap ``k`` iff ``q = (p + padding − k·dilation) / stride`` is an
    integer in ``[0, L)``. With stride > 1 neighbouring outputs receive different taps (or none); with
    stride 1 the first output needs ``padding ≥ dilation·(kernel − 1)`` and the last (``L_out =
    L − 2·padding + dilation·(kernel − 1) + output_padding``) needs ``padding ≥ dilation·(kernel − 1) +
    output_padding``; the input size ``L`` cancels.
    """
    return all(s == 1 and p >= d * (k - 1) + op
               for s, p, d, k, op in zip(stride, padding, dilation, kernel, output_padding))


def expand_channels(v: Tensor, stride: int, length: int) -> Tensor:
    """Per-channel values ``v`` (n) laid out along an axis of ``length`` whose index ``i`` holds
    channel ``(i // stride) % n`` (a channel axis merged with others by a reshape, or n = 1: a scalar)."""
    n = v.shape[0]
    if length % (n * stride):
        raise ValueError(f"an axis of {length} cannot hold {n} channels of {stride} elements each")
    return v.repeat_interleave(stride).repeat(length // (n * stride))


# (kind, position) -> the fold; the fold-target table (passes.fold_targets) names these per row.
_FOLDS = {
    ("linear", "after"): "fold_bn_after_linear", ("linear", "before"): "fold_bn_before_linear",
    ("linear_t", "after"): "fold_bn_after_transposed_linear",
    ("linear_t", "before"): "fold_bn_before_transposed_linear",
    ("conv", "after"): "fold_bn_after_conv", ("conv", "before"): "fold_bn_before_conv",
    ("conv_transpose", "after"): "fold_bn_after_conv_transpose",
    ("conv_transpose", "before"): "fold_bn_before_conv_transpose",
}
_GROUPED = {"conv", "conv_transpose"}


def fold_bn_into(kind: str, position: str, weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor,
                 *, groups: int = 1) -> tuple[Tensor, Tensor]:
    """The fold for a weighted op of ``kind`` (linear | linear_t | conv | conv_transpose) with the BN
    ``position``ed "after" it (its producer) or "before" it (its consumer): ``(weight, bias)``.

    A ConvTranspose before-fold is ``fold_bn_before_conv_transpose``: exact only where every output
    position receives every kernel tap or the shift is zero (``conv_transpose_taps_uniform``), which
    the caller checks."""
    name = _FOLDS.get((kind, position))
    if name is None:
        raise ValueError(f"no fold of a BN {position} a {kind!r} (kinds: linear, linear_t, conv, conv_transpose)")
    fn = globals()[name]
    return fn(weight, bias, scale, shift, groups=groups) if kind in _GROUPED else fn(weight, bias, scale, shift)
