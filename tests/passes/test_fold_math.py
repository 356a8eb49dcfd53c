"""fold_math against real torch modules: every conv/convT flavour, linear both ways, dtypes, eps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon import fold_math as fm
from normsurgeon.graph.ops import map_axis_through_reshape


def _bn(cls, n, *, affine=True, eps=1e-5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = cls(n, affine=affine, eps=eps).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))
    return bn


def _scale_shift(bn):
    return fm.bn_scale_shift(bn.running_mean, bn.running_var, bn.eps,
                             bn.weight if bn.affine else None, bn.bias if bn.affine else None)


def _rel(expected, actual):
    e, a = expected.detach().double(), actual.detach().double()
    return float((e - a).abs().max() / e.abs().max())


def _set(module, weight, bias):
    with torch.no_grad():
        module.weight.copy_(weight)
        if module.bias is None:
            module.bias = nn.Parameter(bias)
        else:
            module.bias.copy_(bias)


_BN_FOR = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_SIZE = {1: (2, None, 11), 2: (2, None, 9, 8), 3: (2, None, 6, 5, 7)}


def _input(dim, channels, seed=1):
    shape = list(_SIZE[dim])
    shape[1] = channels
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONV_CASES = [
    # dim, in, out, kwargs
    (1, 4, 6, dict(kernel_size=3)),
    (1, 6, 6, dict(kernel_size=3, groups=6, bias=False)),  # depthwise
    (2, 4, 8, dict(kernel_size=3, padding=1)),
    (2, 4, 8, dict(kernel_size=3, stride=2, bias=False)),
    (2, 6, 9, dict(kernel_size=3, groups=3, dilation=2, padding=2)),  # grouped + dilated
    (2, 8, 8, dict(kernel_size=3, groups=8, padding=1)),  # depthwise
    (2, 4, 12, dict(kernel_size=(1, 3), groups=4, padding="same", bias=False)),  # depth multiplier 3
    (3, 4, 6, dict(kernel_size=2, stride=(1, 2, 1))),
    (3, 6, 6, dict(kernel_size=3, groups=3, bias=False)),
]


@pytest.mark.parametrize("dim,cin,cout,kw", CONV_CASES)
def test_bn_after_conv(dim, cin, cout, kw):
    torch.manual_seed(0)
    conv = _CONV[dim](cin, cout, **kw).eval()
    bn = _bn(_BN_FOR[dim], cout)
    x = _input(dim, cin)
    expected = bn(conv(x))
    w, b = fm.fold_bn_after_conv(conv.weight, conv.bias, *_scale_shift(bn), groups=conv.groups)
    _set(conv, w, b)
    assert _rel(expected, conv(x)) < 1e-6


CONVT_CASES = [
    (1, 5, 7, dict(kernel_size=3, stride=2)),
    (1, 6, 6, dict(kernel_size=3, groups=3, bias=False)),
    (2, 8, 8, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),  # in == out
    (2, 8, 8, dict(kernel_size=2, stride=2, groups=2, bias=False)),  # in == out, grouped
    (2, 4, 8, dict(kernel_size=3, groups=2, dilation=2)),  # grouped, in != out
    (2, 6, 6, dict(kernel_size=3, groups=6, padding=1)),  # depthwise transposed
    (3, 4, 4, dict(kernel_size=2, stride=2)),
    (3, 4, 6, dict(kernel_size=3, groups=2, bias=False)),
]


@pytest.mark.parametrize("dim,cin,cout,kw", CONVT_CASES)
def test_bn_after_conv_transpose(dim, cin, cout, kw):
    torch.manual_seed(0)
    conv = _CONVT[dim](cin, cout, **kw).eval()
    bn = _bn(_BN_FOR[dim], cout)
    x = _input(dim, cin)
    expected = bn(conv(x))
    w, b = fm.fold_bn_after_conv(conv.weight, conv.bias, *_scale_shift(bn), transposed=True, groups=conv.groups)
    assert w.shape == conv.weight.shape
    _set(conv, w, b)
    assert _rel(expected, conv(x)) < 1e-6


def test_conv_transpose_in_equals_out_scales_the_output_axis():
    """With in == out channels, scaling weight axis 0 has the right shape and the wrong result."""
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 6, 3).eval()
    bn = _bn(nn.BatchNorm2d, 6)
    scale, shift = _scale_shift(bn)
    x = _input(2, 6)
    expected = bn(conv(x))
    wrong = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)  # the mistake: axis 0 is *input*
    w, _ = fm.fold_bn_after_conv(conv.weight, conv.bias, scale, shift, transposed=True)
    assert not torch.allclose(w.double(), wrong.to(w.dtype).double())
    _set(conv, w, fm.fold_bn_after_conv(conv.weight, conv.bias, scale, shift, transposed=True)[1])
    assert _rel(expected, conv(x)) < 1e-6


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [False, True])
def test_bn_after_linear(bias, tokens):
    torch.manual_seed(0)
    lin = nn.Linear(10, 7, bias=bias).eval()
    bn = _bn(nn.BatchNorm1d, 7)
    x = torch.randn(3, 5, 10) if tokens else torch.randn(4, 10)
    expected = bn(lin(x).flatten(0, 1)).reshape(3, 5, 7) if tokens else bn(lin(x))
    _set(lin, *fm.fold_bn_after_linear(lin.weight, lin.bias, *_scale_shift(bn)))
    assert _rel(expected, lin(x)) < 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_bn_before_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 10, bias=bias).eval()
    bn = _bn(nn.BatchNorm1d, 7)
    x = torch.randn(4, 7)
    expected = lin(bn(x))
    _set(lin, *fm.fold_bn_before_linear(lin.weight, lin.bias, *_scale_shift(bn)))
    assert _rel(expected, lin(x)) < 1e-6


@pytest.mark.parametrize("dim,cin,cout,kw", [
    (1, 4, 6, dict(kernel_size=3)),
    (2, 6, 9, dict(kernel_size=3, groups=3, stride=2, bias=False)),
    (2, 8, 8, dict(kernel_size=3, groups=8, dilation=2)),  # depthwise
    (2, 4, 12, dict(kernel_size=1, groups=4)),
    (3, 4, 6, dict(kernel_size=2, groups=2)),
])
def test_bn_before_unpadded_conv(dim, cin, cout, kw):
    torch.manual_seed(0)
    conv = _CONV[dim](cin, cout, **kw).eval()
    bn = _bn(_BN_FOR[dim], cin)
    x = _input(dim, cin)
    expected = conv(bn(x))
    _set(conv, *fm.fold_bn_before_conv(conv.weight, conv.bias, *_scale_shift(bn), groups=conv.groups))
    assert _rel(expected, conv(x)) < 1e-6


def test_bn_before_padded_conv_is_not_exact():
    """Why the pass refuses it: padded zeros are not shifted, so the border differs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1).eval()
    bn = _bn(nn.BatchNorm2d, 4)
    x = _input(2, 4)
    expected = conv(bn(x))
    _set(conv, *fm.fold_bn_before_conv(conv.weight, conv.bias, *_scale_shift(bn)))
    got = conv(x)
    assert torch.allclose(expected[..., 1:-1, 1:-1], got[..., 1:-1, 1:-1], atol=1e-5)
    assert _rel(expected, got) > 1e-2


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_affine_and_eps(affine, eps):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, bias=False).eval()
    bn = _bn(nn.BatchNorm2d, 5, affine=affine, eps=eps)
    x = _input(2, 3)
    expected = bn(conv(x))
    _set(conv, *fm.fold_bn_after_conv(conv.weight, conv.bias, *_scale_shift(bn)))
    assert _rel(expected, conv(x)) < 1e-6
    # the wrong eps is visible: the test can fail
    wrong = fm.bn_scale_shift(bn.running_mean, bn.running_var, 1e-5 if eps != 1e-5 else 1e-1)
    assert not torch.allclose(wrong[0], fm.bn_scale_shift(bn.running_mean, bn.running_var, eps)[0])


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_keeps_dtype_and_is_close(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).eval()
    bn = _bn(nn.BatchNorm1d, 8)
    x = torch.randn(4, 16)
    expected = bn(lin(x)).double()  # float32 reference of the original model
    lin_lp, bn_lp = lin.to(dtype), bn.to(dtype)
    w, b = fm.fold_bn_after_linear(lin_lp.weight, lin_lp.bias, *_scale_shift(bn_lp))
    assert w.dtype == dtype and b.dtype == dtype
    _set(lin_lp, w, b)
    assert _rel(expected, lin_lp(x.to(dtype))) < tol
    conv = nn.Conv2d(4, 6, 3).eval().to(dtype)
    w, b = fm.fold_bn_before_conv(conv.weight, None, *_scale_shift(_bn(nn.BatchNorm2d, 4).to(dtype)))
    assert w.dtype == dtype and b.dtype == dtype and b.shape == (6,)


def test_missing_bias_is_created_and_channels_checked():
    conv = nn.Conv2d(3, 5, 1, bias=False)
    bn = _bn(nn.BatchNorm2d, 5)
    w, b = fm.fold_bn_after_conv(conv.weight, None, *_scale_shift(bn))
    assert b.shape == (5,) and b.dtype == conv.weight.dtype
    with pytest.raises(ValueError, match="channels"):
        fm.fold_bn_after_conv(conv.weight, None, *_scale_shift(_bn(nn.BatchNorm2d, 4)))
    with pytest.raises(ValueError, match="channels"):
        fm.fold_bn_before_linear(nn.Linear(5, 3).weight, None, *_scale_shift(bn.__class__(4).eval()))


def test_map_axis_through_reshape():
    # LeViT: (B, T, C) -> flatten(0, 1) -> (B*T, C); equal sizes do not confuse it
    assert map_axis_through_reshape((2, 16, 32), (32, 32), 2) == 1
    assert map_axis_through_reshape((2, 16, 32), (32, 32), 1) is None  # merged with the batch
    assert map_axis_through_reshape((4, 4, 4), (16, 4), 2) == 1
    assert map_axis_through_reshape((4, 4, 4), (4, 16), 0) == 0
    assert map_axis_through_reshape((4, 4, 4), (4, 16), 1) is None
    assert map_axis_through_reshape((2, 8, 3, 3), (2, 8, 9), 1) == 1  # flatten spatial dims
    assert map_axis_through_reshape((2, 8, 9), (2, 8, 3, 3), 1) == 1
    assert map_axis_through_reshape((2, 1, 8), (2, 8), 2) == 1  # squeeze
    assert map_axis_through_reshape((2, 8), (2, 8, 1), 1) == 1  # unsqueeze
