"""fold_math against real torch modules: every conv/convT flavour, linear both ways, dtypes, eps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon import fold_math as fm
from normsurgeon.graph.ops import Channels, map_axis_through_reshape, map_channels_through_reshape


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


def _channel_of(shape, axis):
    """The channel index of every element of an arange tensor of ``shape`` with channels on ``axis``."""
    idx = torch.arange(shape[axis]).view([-1 if d == axis else 1 for d in range(len(shape))])
    return idx.expand(shape).contiguous()


@pytest.mark.parametrize("in_shape,axis,out_shape", [
    ((2, 4, 6, 6), 1, (2, 144)),  # flatten(1): feature j is channel j // 36
    ((2, 6, 6, 4), 3, (2, 144)),  # channels last, then flatten: j % 4
    ((2, 4, 3), 1, (8, 3)),  # merged with the batch
    ((2, 4, 6, 6), 1, (2, 4, 36)),
    ((2, 4, 6, 6), 1, (2, 2, 72)),  # split over two axes: None
    ((2, 4, 6, 6), 1, (2, 8, 18)),  # split: channel depends on two axes of the result
    ((2, 4, 6, 6), 1, (12, 24)),  # 24 = 4 channels x 6 elements? no: 24 splits a channel block of 36
])
def test_map_channels_through_reshape_against_an_index_tensor(in_shape, axis, out_shape):
    """Whatever the function answers must be what the data says (and None only where no axis holds it)."""
    n = in_shape[axis]
    channels = _channel_of(in_shape, axis).reshape(out_shape)
    got = map_channels_through_reshape(in_shape, out_shape, Channels(axis), n)
    holders = []
    for a, size in enumerate(out_shape):
        first = channels.movedim(a, 0).reshape(size, -1)
        if (first == first[:, :1]).all():
            holders.append(a)
    if got is None:
        assert holders == []
    else:
        i = torch.arange(out_shape[got.axis])
        expected = ((i // got.stride) % n).view([-1 if d == got.axis else 1 for d in range(len(out_shape))])
        assert torch.equal(channels, expected.expand(out_shape))


def test_expand_channels():
    v = torch.tensor([1.0, 2.0])
    assert fm.expand_channels(v, 3, 12).tolist() == [1, 1, 1, 2, 2, 2] * 2
    assert fm.expand_channels(torch.tensor([5.0]), 1, 4).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError):
        fm.expand_channels(v, 3, 10)


@pytest.mark.parametrize("stride,padding,dilation,kernel,output_padding", [
    (s, p, d, k, op) for s in (1, 2, 3) for d in (1, 2) for k in (1, 2, 3) for p in range(0, 6)
    for op in range(0, max(s, d)) if op < max(s, d)
])
def test_conv_transpose_taps_uniform_matches_what_the_data_says(stride, padding, dilation, kernel, output_padding):
    """Every output position receives every tap iff a ones-kernel on a ones-input gives kernel everywhere."""
    ct = nn.ConvTranspose1d(1, 1, kernel, stride=stride, padding=padding, dilation=dilation,
                            output_padding=output_padding, bias=False)
    with torch.no_grad():
        ct.weight.fill_(1.0)
    claimed = fm.conv_transpose_taps_uniform((stride,), (padding,), (dilation,), (kernel,), (output_padding,))
    seen = []
    for length in (6, 7, 11):
        try:
            y = ct(torch.ones(1, 1, length))
        except RuntimeError:  # output size would be < 1
            continue
        seen.append(bool((y == kernel).all()))
    if seen:
        assert all(s == claimed for s in seen)


@pytest.mark.parametrize("kw", [dict(padding=2), dict(padding=2, groups=2), dict(padding=4, dilation=2, bias=False),
                                dict(stride=2, padding=1)])
def test_bn_before_conv_transpose(kw):
    """Exact where every output position receives every tap; the scale part always (shift 0)."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(4, 6, 3, **kw).eval()
    bn = _bn(nn.BatchNorm2d, 4)
    x = _input(2, 4)
    scale, shift = _scale_shift(bn)
    uniform = fm.conv_transpose_taps_uniform(ct.stride, ct.padding, ct.dilation, ct.kernel_size, ct.output_padding)
    expected = ct(bn(x))
    w, b = ct.weight.detach().clone(), None if ct.bias is None else ct.bias.detach().clone()
    _set(ct, *fm.fold_bn_before_conv_transpose(w, b, scale, shift, groups=ct.groups))
    assert (_rel(expected, ct(x)) < 1e-6) == uniform
    expected = F.conv_transpose2d(x * scale.float().view(1, -1, 1, 1), w, b, stride=ct.stride, padding=ct.padding,
                                  dilation=ct.dilation, groups=ct.groups)
    _set(ct, *fm.fold_bn_before_conv_transpose(w, b, scale, torch.zeros_like(shift), groups=ct.groups))
    assert _rel(expected, ct(x)) < 1e-6


@pytest.mark.parametrize("groups", [1, 2])
def test_fold_bn_into_sends_each_kind_and_side_to_its_own_formula(groups):
    """(ConvTranspose, before) is the ConvTranspose formula (input channels on axis 0), not the Conv one."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(4, 6, 3, padding=2, groups=groups).eval()
    bn = _bn(nn.BatchNorm2d, 4)
    x = _input(2, 4)
    expected = ct(bn(x))
    _set(ct, *fm.fold_bn_into("conv_transpose", "before", ct.weight.detach().clone(), ct.bias.detach().clone(),
                              *_scale_shift(bn), groups=groups))
    assert _rel(expected, ct(x)) < 1e-6
    with pytest.raises(ValueError, match="no fold of a BN before a 'pool'"):
        fm.fold_bn_into("pool", "before", ct.weight, None, *_scale_shift(bn))
