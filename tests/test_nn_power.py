"""PowerNorm against independent references: forward, running statistics, both backwards, eval, ONNX."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from normsurgeon.errors import NormSurgeonError
from normsurgeon.nn import PowerNorm, padding_mask

C = 6


def _pn(**kw):
    torch.manual_seed(0)
    pn = PowerNorm(C, dtype=torch.float64, **kw)
    with torch.no_grad():
        pn.weight.copy_(torch.rand(C, dtype=torch.float64) + 0.5)
        pn.bias.copy_(torch.randn(C, dtype=torch.float64))
    return pn


def _batch(step, shape=(4, 5, C)):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step % 3) + 0.5


def test_warmup_is_batch_quadratic_mean_with_exact_gradient():
    pn = _pn(warmup_steps=5)
    phi = torch.ones(C, dtype=torch.float64)
    for step in range(3):
        x = _batch(step).requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        g = torch.randn(x.shape, dtype=torch.float64)
        y = pn(x)
        (y * g).sum().backward()
        # reference: plain autograd through the batch statistic, written from the formula
        w, b = pn.weight.detach(), pn.bias.detach()
        ms = xr.reshape(-1, C).square().mean(0)
        ref = xr / torch.sqrt(ms + pn.eps) * w + b
        (ref * g).sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
        phi = 0.9 * phi + 0.1 * ms.detach()
        torch.testing.assert_close(pn.running_phi, phi, rtol=1e-12, atol=0)
    assert int(pn.num_batches_tracked) == 3
    # no mean subtraction: a constant positive input maps to weight + bias (x / |x| = 1), not to bias
    pn2 = _pn(warmup_steps=5)
    torch.testing.assert_close(pn2(torch.full((3, C), 2.0, dtype=torch.float64)),
                               (pn2.weight + pn2.bias).detach().expand(3, C), atol=1e-5, rtol=0)


def test_after_warmup_uses_running_statistic_and_the_papers_backward():
    """Steps > warm-up: forward divides by the running quadratic mean of the *previous* steps, and the
    gradient is Algorithm 1 of the paper, checked against a re-implementation of its equations."""
    pn = _pn(warmup_steps=2, alpha_fwd=0.8, alpha_bkw=0.7)
    phi = torch.ones(C, dtype=torch.float64)
    nu = torch.zeros(C, dtype=torch.float64)
    for step in range(6):
        x = _batch(step).requires_grad_(True)
        g = torch.randn(x.shape, dtype=torch.float64)
        y = pn(x)
        (y * g).sum().backward()
        x2 = x.detach().reshape(-1, C)
        batch = x2.square().mean(0)
        warm = step < 2
        psi = torch.sqrt((batch if warm else phi) + pn.eps)
        xhat = x2 / psi
        torch.testing.assert_close(y.detach().reshape(-1, C), xhat * pn.weight.detach() + pn.bias.detach(),
                                   rtol=1e-12, atol=1e-12)
        gx_hat = g.reshape(-1, C) * pn.weight.detach()
        lam = (xhat * gx_hat).mean(0)
        gam = xhat.square().mean(0)
        gx = (gx_hat - (lam if warm else nu) * xhat) / psi
        torch.testing.assert_close(x.grad.reshape(-1, C), gx, rtol=1e-10, atol=1e-12)
        nu = nu * (1 - 0.3 * gam) + 0.3 * lam
        phi = 0.8 * phi + 0.2 * batch
        torch.testing.assert_close(pn.ema_gz, nu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(pn.running_phi, phi, rtol=1e-12, atol=0)
    # the weight/bias gradients are ordinary autograd: sum(g * x_hat), sum(g)
    assert pn.weight.grad is not None and pn.bias.grad is not None


def test_approximate_backward_converges_to_the_exact_gradient():
    """With stationary data (same batch, same upstream gradient) psi -> the batch quadratic mean and
    nu -> Lambda / Gamma = Lambda * (m + eps) / m, so the approximate gradient approaches the exact
    gradient of the batch-statistic norm. EMA factors 0.9 shrink the error by 0.9 per step
    (0.9^300 ~ 2e-14); what remains is the eps term, ~eps / m relative (m ~ 1 here): 1e-4 bounds it."""
    pn = _pn(warmup_steps=0)
    x0 = _batch(0)
    g = torch.randn(x0.shape, dtype=torch.float64)
    for _ in range(300):
        x = x0.clone().requires_grad_(True)
        (pn(x) * g).sum().backward()
    xr = x0.clone().requires_grad_(True)
    ref = xr / torch.sqrt(xr.reshape(-1, C).square().mean(0) + pn.eps) * pn.weight.detach() + pn.bias.detach()
    (ref * g).sum().backward()
    err = (x.grad - xr.grad).abs().max() / xr.grad.abs().max()
    assert err < 1e-4, float(err)
    # ... and it is an approximation, not the exact gradient, early on
    pn2 = _pn(warmup_steps=0)
    x = x0.clone().requires_grad_(True)
    (pn2(x) * g).sum().backward()
    assert (x.grad - xr.grad).abs().max() / xr.grad.abs().max() > 1e-2


@pytest.mark.parametrize("warmup", [10, 0])
def test_padding_mask_statistics_over_real_tokens_only(warmup):
    pn = _pn(warmup_steps=warmup)
    x = _batch(0, (3, 5, C))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    x_pad = x.clone()
    x_pad[mask == 0] = 1e3  # garbage in padded positions must not reach the statistics
    xa = x_pad.clone().requires_grad_(True)
    g = torch.randn(x.shape, dtype=torch.float64)
    with padding_mask(mask):
        y = pn(xa)
    (y * g).sum().backward()
    real = mask.bool()
    ms = x[real].square().mean(0)
    torch.testing.assert_close(pn.running_phi, 0.9 + 0.1 * ms, rtol=1e-12, atol=0)
    if warmup:
        # exact gradient of the masked batch-statistic norm, by autograd on the reference
        xr = x_pad.clone().requires_grad_(True)
        s = torch.sqrt(xr[real].square().mean(0) + pn.eps)
        ref = xr / s * pn.weight.detach() + pn.bias.detach()
        (ref * g).sum().backward()
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-9, atol=1e-12)
    else:
        # approximate backward: padded rows get g / psi only (they do not feed the statistic)
        psi = torch.sqrt(torch.ones(C, dtype=torch.float64) + pn.eps)
        torch.testing.assert_close(xa.grad[~real], (g * pn.weight.detach())[~real] / psi)


def test_eval_is_a_per_channel_affine_and_exports_to_onnx_runtime():
    import onnxruntime as ort
    pn = _pn(warmup_steps=1).float()
    for step in range(4):
        pn(_batch(step).float())
    pn.eval()
    scale, shift = pn.eval_scale_shift()
    x = torch.randn(2, 7, C)
    torch.testing.assert_close(pn(x), x * scale + shift)
    torch.testing.assert_close(pn(x[:1]), pn(x)[:1])  # eval: independent of the batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
        prog = torch.onnx.export(pn, (x,), dynamo=True, dynamic_shapes=({0: B, 1: T},), verbose=False)
    ops = [n.op_type for n in prog.model_proto.graph.node]
    assert "LayerNormalization" not in ops and "ReduceMean" not in ops, ops
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((2, 7, C), (5, 3, C)):
        x = torch.randn(shape)
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(out, pn(x), rtol=1e-5, atol=1e-5)


def test_group_scaling_matches_the_authors_formula():
    pn = _pn(warmup_steps=3, group_num=2)
    x = _batch(0)
    gs = x.reshape(4, 5, 2, 3)
    gs = (gs / torch.sqrt(gs.square().mean(-1, keepdim=True) + pn.eps)).reshape(x.shape)
    y = pn(x)
    ms = gs.reshape(-1, C).square().mean(0)
    torch.testing.assert_close(y, gs / torch.sqrt(ms + pn.eps) * pn.weight + pn.bias)
    pn.eval()
    scale, shift = pn.eval_scale_shift()  # the affine after the group scaling
    torch.testing.assert_close(pn(x), pn.group_scaling(x) * scale + shift)
    with pytest.raises(NormSurgeonError, match="divide"):
        PowerNorm(C, group_num=4)


def test_from_layernorm_and_rmsnorm_copy_not_share():
    ln = nn.LayerNorm(C, eps=1e-12)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    pn = PowerNorm.from_layernorm(ln.eval(), warmup_steps=7, group_num=3)
    assert pn.eps == 1e-5 and pn.warmup_steps == 7 and pn.group_scaling is not None and not pn.training
    assert torch.equal(pn.weight, ln.weight) and pn.weight.data_ptr() != ln.weight.data_ptr()
    assert torch.equal(pn.bias, ln.bias)
    rms = nn.RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    pr = PowerNorm.from_rmsnorm(rms)
    assert torch.equal(pr.weight, rms.weight) and torch.equal(pr.bias, torch.zeros(C)) and pr.eps == 1e-5
    assert PowerNorm.from_layernorm(nn.LayerNorm(C, elementwise_affine=False)).weight is None
    with pytest.raises(NormSurgeonError, match="last dim"):
        PowerNorm.from_layernorm(nn.LayerNorm([2, 3]))


def test_state_dict_and_pickle_keep_the_schedule():
    pn = _pn(warmup_steps=2)
    for step in range(3):
        (pn(_batch(step).requires_grad_(True)).sum()).backward()
    fresh = PowerNorm(C, dtype=torch.float64, warmup_steps=2)
    fresh.load_state_dict(pn.state_dict())
    assert int(fresh.num_batches_tracked) == 3 and torch.equal(fresh.ema_gz, pn.ema_gz)
    clone = pickle.loads(pickle.dumps(pn))
    x = _batch(9)
    torch.testing.assert_close(clone(x), copy.deepcopy(pn)(x))
    buf = io.BytesIO()
    torch.save(pn.state_dict(), buf)


def test_powernorm_gpt2_trains_on_real_text():
    """The transformers GPT-2 of the zoo with every LayerNorm a PowerNorm (warm-up 10 steps, so both
    backwards run) learns next-byte prediction on a standard-library source file: loss goes down."""
    from _train_helpers import next_byte_loss_curve, swap_norms
    from normsurgeon import zoo
    model = zoo.gpt2()
    n = swap_norms(model, lambda ln: PowerNorm.from_layernorm(ln, warmup_steps=10))
    assert n == 5
    losses = next_byte_loss_curve(model, steps=40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
