"""normsurgeon.nn: replacement modules against independent references (real torch, ONNX Runtime)."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.errors import NormSurgeonError
from normsurgeon.nn import (ChannelLayerNorm, FrozenBatchNorm, TokenBatchNorm, batchnorm_to_groupnorm,
                            ffn_batchnorm, make_identity)


def _randomize_bn(bn, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=g))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _onnx(model, args, dynamic_shapes=None):
    """Export with the dynamo exporter; returns (ModelProto, onnxruntime session)."""
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    proto = prog.model_proto
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto, sess


def _run(sess, *arrays):
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), arrays)}
    return torch.from_numpy(sess.run(None, feeds)[0])


# ---------------------------------------------------------------------------------------------------
# TokenBatchNorm
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(12, 8), (3, 5, 8), (2, 3, 4, 8)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_token_batchnorm_equals_batchnorm1d_on_flattened_input(shape, momentum):
    torch.manual_seed(0)
    ref = _randomize_bn(nn.BatchNorm1d(8, momentum=momentum))
    tbn = TokenBatchNorm(8, momentum=momentum)
    tbn.load_state_dict(ref.state_dict())
    for step in range(3):  # train: batch statistics, running stats, gradients
        x = torch.randn(shape) * (step + 1) + step
        xr = x.clone().requires_grad_(True)
        xt = x.clone().requires_grad_(True)
        yr = ref(xr.reshape(-1, 8)).reshape(shape)
        yt = tbn(xt)
        assert yt.shape == x.shape
        torch.testing.assert_close(yt, yr, rtol=0, atol=0)
        g = torch.randn(shape)
        (yr * g).sum().backward()
        (yt * g).sum().backward()
        torch.testing.assert_close(xt.grad, xr.grad)
    torch.testing.assert_close(tbn.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(tbn.running_var, ref.running_var, rtol=0, atol=0)
    assert int(tbn.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    torch.testing.assert_close(tbn.weight.grad, ref.weight.grad)
    torch.testing.assert_close(tbn.bias.grad, ref.bias.grad)
    ref.eval(), tbn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(tbn(x), ref(x.reshape(-1, 8)).reshape(shape), rtol=0, atol=0)
    # eval really uses the running statistics: a per-position affine map, independent of the batch
    torch.testing.assert_close(tbn(x[:1]), tbn(x)[:1])


def test_token_batchnorm_non_contiguous_and_bad_shape():
    tbn = _randomize_bn(TokenBatchNorm(6)).eval()
    x = torch.randn(2, 6, 5).transpose(1, 2)  # (2, 5, 6), not contiguous
    assert not x.is_contiguous()
    ref = nn.BatchNorm1d(6).eval()
    ref.load_state_dict(tbn.state_dict())
    torch.testing.assert_close(tbn(x), ref(x.reshape(-1, 6)).reshape(2, 5, 6))
    with pytest.raises(ValueError, match="last dim is 6"):
        tbn(torch.randn(2, 6, 5))


def test_token_batchnorm_pickle_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), TokenBatchNorm(8, momentum=None))
    model(torch.randn(3, 7, 4))  # train: non-default running stats
    model.eval()
    x = torch.randn(2, 5, 4)
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone[1], TokenBatchNorm) and clone[1].momentum is None
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(clone.state_dict()[k], v), k


def test_token_batchnorm_torch_export_and_onnx_runtime():
    tbn = _randomize_bn(TokenBatchNorm(8)).eval()
    x = torch.randn(2, 5, 8)
    B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
    ep = torch.export.export(tbn, (x,), dynamic_shapes=({0: B, 1: T},), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("permute" in t or "transpose" in t for t in targets), targets

    import onnx
    proto, sess = _onnx(tbn, (x,), dynamic_shapes=({0: B, 1: T},))
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1
    assert not any(n.op_type == "Transpose" for n in proto.graph.node)
    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    assert ranks[bns[0].input[0]] == 2  # BN runs on the (B*T, C) view
    for shape in [(2, 5, 8), (3, 11, 8)]:  # another batch and sequence length than exported with
        x = torch.randn(shape)
        torch.testing.assert_close(_run(sess, x), tbn(x), rtol=1e-5, atol=1e-5)


def test_token_batchnorm_from_layernorm_carries_params():
    ln = nn.LayerNorm(8, eps=1e-4).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(8))
        ln.bias.copy_(torch.randn(8))
    ln.bias.requires_grad_(False)
    ln.eval()
    tbn = TokenBatchNorm.from_layernorm(ln)
    assert tbn.eps == 1e-4 and tbn.num_features == 8 and not tbn.training
    assert tbn.weight.dtype == torch.bfloat16 and tbn.running_mean.dtype == torch.bfloat16
    assert torch.equal(tbn.weight, ln.weight) and torch.equal(tbn.bias, ln.bias)
    assert tbn.weight.requires_grad and not tbn.bias.requires_grad
    assert tbn.weight.data_ptr() != ln.weight.data_ptr()
    with torch.no_grad():
        ln.weight.add_(1)
    assert not torch.equal(tbn.weight, ln.weight)  # a copy, not shared
    # default running stats (0, 1): eval is x / sqrt(1 + eps) * w + b
    x = torch.randn(2, 3, 8)
    tf = TokenBatchNorm.from_layernorm(nn.LayerNorm(8).train())
    assert tf.training
    with torch.no_grad():
        tf.weight.copy_(torch.randn(8)), tf.bias.copy_(torch.randn(8))
    tf.eval()
    torch.testing.assert_close(tf(x), x / (1 + tf.eps) ** 0.5 * tf.weight + tf.bias)


def test_token_batchnorm_from_layernorm_variants():
    no_bias = TokenBatchNorm.from_layernorm(nn.LayerNorm(4, bias=False))
    assert no_bias.affine and torch.equal(no_bias.bias, torch.zeros(4))
    assert TokenBatchNorm.from_layernorm(nn.LayerNorm(4, elementwise_affine=False)).weight is None
    with pytest.raises(NormSurgeonError, match="last dim only"):
        TokenBatchNorm.from_layernorm(nn.LayerNorm((3, 4)))


def test_token_batchnorm_from_rmsnorm():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rms = nn.RMSNorm(6, eps=None)
    with torch.no_grad():
        rms.weight.copy_(torch.arange(6.0))
    t = TokenBatchNorm.from_rmsnorm(rms)
    assert t.eps == 1e-5 and torch.equal(t.weight, torch.arange(6.0)) and torch.equal(t.bias, torch.zeros(6))

    llama = LlamaRMSNorm(6, eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(torch.arange(6.0))
    t = TokenBatchNorm.from_rmsnorm(llama)
    assert t.eps == 1e-5 and torch.equal(t.weight, torch.arange(6.0))

    gemma = GemmaRMSNorm(6, eps=1e-6)  # scales by (1 + weight)
    with torch.no_grad():
        gemma.weight.copy_(torch.arange(6.0))
    t = TokenBatchNorm.from_rmsnorm(gemma)
    assert torch.equal(t.weight, torch.arange(6.0) + 1)
    assert torch.equal(TokenBatchNorm.from_rmsnorm(gemma, weight_offset=0.0).weight, torch.arange(6.0))


# ---------------------------------------------------------------------------------------------------
# ChannelLayerNorm
# ---------------------------------------------------------------------------------------------------

def _channel_ln_reference(x, weight, bias, eps):
    """float64 mean/var over dim 1, written out (independent of F.layer_norm)."""
    x64 = x.double()
    mean = x64.mean(dim=1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(dim=1, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps)
    view = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(view)
    if bias is not None:
        y = y + bias.double().view(view)
    return y


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 7), (2, 6, 5, 3), (2, 6, 3, 4, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_channel_layernorm_matches_references(shape, affine):
    torch.manual_seed(0)
    m = ChannelLayerNorm(6, eps=1e-5, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.randn(6)), m.bias.copy_(torch.randn(6))
    x = torch.randn(shape) * 3 + 1
    y = m(x)
    assert y.shape == x.shape
    permuted = F.layer_norm(x.movedim(1, -1), (6,), m.weight, m.bias, 1e-5).movedim(-1, 1)
    torch.testing.assert_close(y, permuted)
    torch.testing.assert_close(y.double(), _channel_ln_reference(x, m.weight, m.bias, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_layernorm_half(dtype):
    m = ChannelLayerNorm(8).to(dtype)
    x = (torch.randn(2, 8, 4, 4) * 2).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(y.double(), _channel_ln_reference(x, None, None, m.eps), rtol=tol, atol=tol)


def test_channel_layernorm_from_batchnorm_and_onnx():
    bn = _randomize_bn(nn.BatchNorm2d(8, eps=1e-3))
    bn.weight.requires_grad_(False)
    bn.eval()
    m = ChannelLayerNorm.from_batchnorm(bn)
    assert m.eps == 1e-3 and not m.training
    assert torch.equal(m.weight, bn.weight) and torch.equal(m.bias, bn.bias)
    assert m.weight.data_ptr() != bn.weight.data_ptr()
    assert not m.weight.requires_grad and m.bias.requires_grad
    assert ChannelLayerNorm.from_batchnorm(nn.BatchNorm1d(4, affine=False)).weight is None
    assert ChannelLayerNorm.from_batchnorm(nn.BatchNorm1d(4, bias=False)).bias is None
    with pytest.raises(ValueError, match=r"\(N, 8, \*\)"):
        m(torch.randn(2, 4, 8, 8))

    x = torch.randn(2, 8, 5, 5)
    proto, sess = _onnx(m, (x,))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LayerNormalization") == 1, ops
    torch.testing.assert_close(_run(sess, x), m(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# FrozenBatchNorm
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (5, 6)), (nn.BatchNorm1d, (3, 6, 7)),
                                       (nn.BatchNorm2d, (2, 6, 4, 5)), (nn.BatchNorm3d, (2, 6, 3, 4, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_frozen_batchnorm_matches_batchnorm_eval(cls, shape, affine):
    bn = _randomize_bn(cls(6, eps=1e-3, affine=affine)).eval()
    frozen = FrozenBatchNorm.from_batchnorm(bn)
    assert list(frozen.parameters()) == [] and not frozen.training
    if not affine:
        assert torch.equal(frozen.weight, torch.ones(6)) and torch.equal(frozen.bias, torch.zeros(6))
    x = torch.randn(shape) * 2 + 0.5
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    frozen.train()
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)  # frozen in train mode too
    with torch.no_grad():
        bn.running_mean.add_(1)  # stats were copied, not shared
    assert not torch.allclose(frozen(x), bn(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_batchnorm_half(dtype):
    bn = _randomize_bn(nn.BatchNorm2d(6)).eval()
    frozen = FrozenBatchNorm.from_batchnorm(bn.to(dtype))
    assert frozen.running_var.dtype == dtype and frozen.weight.dtype == dtype
    x = torch.randn(2, 6, 4, 4).to(dtype)
    y = frozen(x)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(y.float(), bn(x).float(), rtol=tol, atol=tol)
    expected = F.batch_norm(x.double(), bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                            bn.bias.double(), False, 0.0, bn.eps)
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_frozen_batchnorm_state_dict_device_mode_and_errors():
    bn = _randomize_bn(nn.BatchNorm2d(4)).train()
    frozen = FrozenBatchNorm(4, eps=bn.eps)
    frozen.load_state_dict(bn.state_dict())  # a BN state dict loads (num_batches_tracked dropped)
    torch.testing.assert_close(frozen(torch.ones(1, 4, 1, 1)), FrozenBatchNorm.from_batchnorm(bn)(torch.ones(1, 4, 1, 1)))
    assert FrozenBatchNorm.from_batchnorm(bn).training
    meta = FrozenBatchNorm.from_batchnorm(nn.BatchNorm2d(4, device="meta"))
    assert meta.running_var.device.type == "meta" and meta.weight.device.type == "meta"
    clone = pickle.loads(pickle.dumps(frozen))
    assert torch.equal(clone.running_var, frozen.running_var)
    with pytest.raises(NormSurgeonError, match="track_running_stats=False"):
        FrozenBatchNorm.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(NormSurgeonError, match="expects a BatchNorm"):
        FrozenBatchNorm.from_batchnorm(nn.LayerNorm(4))


# ---------------------------------------------------------------------------------------------------
# GroupNorm, identity BN
# ---------------------------------------------------------------------------------------------------

def test_batchnorm_to_groupnorm():
    bn = _randomize_bn(nn.BatchNorm2d(6, eps=1e-4)).eval()
    bn.bias.requires_grad_(False)
    gn = batchnorm_to_groupnorm(bn, 3)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 3 and gn.eps == 1e-4 and not gn.training
    assert torch.equal(gn.weight, bn.weight) and gn.weight.data_ptr() != bn.weight.data_ptr()
    assert gn.weight.requires_grad and not gn.bias.requires_grad
    x = torch.randn(2, 6, 4, 4)
    x64 = x.double().reshape(2, 3, -1)
    ref = ((x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-4))
    ref = ref.reshape(2, 6, 4, 4) * bn.weight.double().view(1, 6, 1, 1) + bn.bias.double().view(1, 6, 1, 1)
    torch.testing.assert_close(gn(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert not batchnorm_to_groupnorm(nn.BatchNorm1d(4, affine=False), 2).affine
    half = batchnorm_to_groupnorm(nn.BatchNorm2d(4).to(torch.float16), 2)
    assert half.weight.dtype == torch.float16
    with pytest.raises(NormSurgeonError, match="4 does not divide 6 channels"):
        batchnorm_to_groupnorm(bn, 4)
    with pytest.raises(NormSurgeonError, match="positive integer"):
        batchnorm_to_groupnorm(bn, 0)


def test_ffn_batchnorm_identity_and_make_identity():
    x = torch.randn(4, 7, 16) * 3 + 2
    fresh = ffn_batchnorm(16, identity_init=True).eval()
    assert isinstance(fresh, TokenBatchNorm)
    torch.testing.assert_close(fresh(x), x, rtol=1e-6, atol=1e-6)
    plain = ffn_batchnorm(16).eval()
    assert not torch.allclose(plain(x), x, rtol=1e-6, atol=1e-6)  # default init is not the identity

    # statistics as calibration leaves them: not an identity until make_identity
    bn = ffn_batchnorm(16, identity_init=True)
    bn(x)  # train step: updates running stats
    bn.eval()
    assert not torch.allclose(bn(x), x, rtol=1e-4, atol=1e-4)
    make_identity(bn)
    torch.testing.assert_close(bn(x), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.weight, torch.sqrt(bn.running_var + bn.eps))
    torch.testing.assert_close(bn.bias, bn.running_mean)

    b2 = _randomize_bn(nn.BatchNorm2d(3)).eval()
    make_identity([b2])
    y = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(b2(y), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(NormSurgeonError, match="affine"):
        make_identity(nn.BatchNorm1d(3, affine=False))


def test_deepcopy_and_state_dict_interchange_with_batchnorm1d():
    """A TokenBatchNorm's state dict is a BatchNorm1d state dict (checkpoints stay interchangeable)."""
    tbn = _randomize_bn(TokenBatchNorm(5))
    bn = nn.BatchNorm1d(5)
    bn.load_state_dict(tbn.state_dict())
    clone = copy.deepcopy(tbn).eval()
    x = torch.randn(4, 5)
    np.testing.assert_allclose(clone(x).detach().numpy(), bn.eval()(x).detach().numpy(), rtol=0, atol=0)


def test_layernorm_eps_1e12_becomes_a_safe_batchnorm_eps():
    from normsurgeon.nn import MIN_BN_EPS, TokenBatchNorm

    ln = torch.nn.LayerNorm(8, eps=1e-12)
    assert TokenBatchNorm.from_layernorm(ln).eps == MIN_BN_EPS
    assert TokenBatchNorm.from_layernorm(torch.nn.LayerNorm(8, eps=1e-3)).eps == 1e-3
    bn = TokenBatchNorm.from_layernorm(ln).eval()
    x = torch.zeros(4, 3, 8)  # constant channels: variance 0 over the batch
    assert torch.isfinite(bn(x)).all()
