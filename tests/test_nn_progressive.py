"""RepBatchNorm and ProgressiveNorm against independent references (real torch, ONNX Runtime, zoo models)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.errors import NormSurgeonError
from normsurgeon.nn import ProgressiveNorm, RepBatchNorm

C = 8


def _ln(seed=0):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(C)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(C) + 0.5)
        ln.bias.copy_(torch.randn(C))
    return ln


def _onnx_session(model, x):
    import onnxruntime as ort
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
        prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: B, 1: T},), verbose=False)
    ops = [n.op_type for n in prog.model_proto.graph.node]
    return ops, ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort(sess, x):
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_repbn_is_batchnorm_plus_scaled_identity_and_its_eval_affine_is_exact():
    ln = _ln()
    rep = RepBatchNorm.from_layernorm(ln, alpha=0.7)
    ref = nn.BatchNorm1d(C)
    ref.load_state_dict(rep.bn.state_dict())
    x = torch.randn(3, 5, C, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = rep(x)
    yr = ref(xr.reshape(-1, C)).reshape(x.shape) + 0.7 * xr
    torch.testing.assert_close(y, yr)
    g = torch.randn(x.shape)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(rep.alpha.grad, (g * x.detach()).sum().reshape(1))
    for _ in range(3):
        rep(torch.randn(4, 6, C) * 2 + 1)
    rep.eval()
    scale, shift = rep.eval_scale_shift()
    x = torch.randn(2, 4, C)
    # independent reference: F.batch_norm with the running statistics, plus alpha * x
    ref_eval = F.batch_norm(x.reshape(-1, C), rep.bn.running_mean, rep.bn.running_var, rep.bn.weight,
                            rep.bn.bias, False, 0.0, rep.bn.eps).reshape(x.shape) + rep.alpha * x
    torch.testing.assert_close(rep(x), ref_eval)
    torch.testing.assert_close(x * scale + shift, ref_eval, rtol=1e-6, atol=1e-6)
    ops, sess = _onnx_session(rep, x)
    assert "LayerNormalization" not in ops, ops
    for shape in ((2, 4, C), (6, 1, C)):
        x = torch.randn(shape)
        torch.testing.assert_close(_ort(sess, x), rep(x), rtol=1e-5, atol=1e-5)


def test_step0_is_exactly_the_layernorm_then_mixes_linearly_then_only_repbn():
    ln = _ln()
    pn = ProgressiveNorm.from_layernorm(ln.train(), steps=4)
    x = torch.randn(3, 5, C)
    assert pn.lam == 1.0 and not pn.finished
    assert torch.equal(pn(x), ln(x))  # step 0, training: bit-for-bit the LN
    assert int(pn.step) == 1 and pn.lam == 0.75
    # mid schedule: lam * LN(x) + (1 - lam) * RepBN(x), RepBN in the same mode
    pn.train()
    rep_ref = RepBatchNorm.from_layernorm(ln)
    rep_ref.load_state_dict(pn.rep.state_dict())
    y = pn(x)
    torch.testing.assert_close(y, 0.75 * ln(x) + 0.25 * rep_ref(x))
    calls = []
    pn.norm.register_forward_hook(lambda *a: calls.append(1))
    pn(x), pn(x)  # steps 2, 3: lam 0.5, 0.25
    assert len(calls) == 2 and int(pn.step) == 4 and pn.finished
    calls.clear()
    pn(x)
    assert calls == [] and int(pn.step) == 5 and pn.lam == 0.0  # lam stays 0, LN no longer runs
    pn.eval()
    torch.testing.assert_close(pn(x), pn.rep(x), rtol=0, atol=0)
    scale, shift = pn.eval_scale_shift()
    torch.testing.assert_close(pn(x), x * scale + shift, rtol=1e-6, atol=1e-6)
    # the source LN is untouched and not shared
    assert pn.norm is not ln and pn.norm.weight.data_ptr() != ln.weight.data_ptr()
    assert pn.rep.bn.weight.data_ptr() != ln.weight.data_ptr()


def test_eval_step0_equals_layernorm_and_unfinished_is_not_foldable():
    ln = _ln().eval()
    pn = ProgressiveNorm.from_layernorm(ln, steps=10)
    assert not pn.training
    x = torch.randn(2, 3, C)
    assert torch.equal(pn(x), ln(x))
    with pytest.raises(NormSurgeonError, match="not a fixed affine"):
        pn.eval_scale_shift()
    assert ProgressiveNorm.from_layernorm(ln, steps=0).finished
    with pytest.raises(NormSurgeonError):
        ProgressiveNorm.from_layernorm(ln, steps=-1)


def test_from_rmsnorm_transformers_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    rms = LlamaRMSNorm(C, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    pn = ProgressiveNorm.from_norm(rms, steps=3)
    assert type(pn.norm) is LlamaRMSNorm
    x = torch.randn(2, 3, C)
    assert torch.equal(pn.train()(x), rms(x))
    assert torch.equal(pn.rep.bn.weight, rms.weight) and torch.equal(pn.rep.bn.bias, torch.zeros(C))


def test_state_dict_resumes_the_schedule_and_pickles():
    pn = ProgressiveNorm.from_layernorm(_ln(), steps=10).train()
    x = torch.randn(2, 3, C)
    for _ in range(4):
        pn(x)
    state = pn.state_dict()
    assert int(state["step"]) == 4 and int(state["total_steps"]) == 10
    fresh = ProgressiveNorm.from_layernorm(_ln(1), steps=99)
    fresh.load_state_dict(state)
    assert fresh.lam == pytest.approx(0.6) and pn.lam == pytest.approx(0.6)
    pn.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), pn(x), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(pn))
    torch.testing.assert_close(clone(x), pn(x), rtol=0, atol=0)


@pytest.mark.parametrize("steps_done", [3, 10])
def test_onnx_export_mid_schedule_and_finished(steps_done):
    pn = ProgressiveNorm.from_layernorm(_ln(), steps=10).train()
    for _ in range(steps_done):
        pn(torch.randn(4, 5, C) * 3 + 1)
    pn.eval()
    x = torch.randn(2, 4, C)
    ops, sess = _onnx_session(pn, x)
    assert ("LayerNormalization" in ops) == (steps_done < 10), ops
    for shape in ((2, 4, C), (3, 7, C)):
        x = torch.randn(shape)
        torch.testing.assert_close(_ort(sess, x), pn(x), rtol=1e-5, atol=1e-5)


def test_progressive_vit_starts_exactly_as_the_ln_model_and_trains():
    """The zoo's transformers ViT with every LayerNorm progressive: at step 0 the outputs are the LN
    model's, bit for bit; it then trains through the schedule into pure RepBN (loss goes down)."""
    from _train_helpers import swap_norms
    from normsurgeon import zoo
    ln_model = zoo.vit()
    model = zoo.vit()
    n = swap_norms(model, lambda ln: ProgressiveNorm.from_layernorm(ln, steps=30))
    assert n == 5
    x = ln_model.example_inputs().kwargs["pixel_values"]
    assert torch.equal(model(pixel_values=x).logits, ln_model(pixel_values=x).logits)
    model.train()
    assert torch.equal(model(pixel_values=x).logits, ln_model.train()(pixel_values=x).logits)  # no dropout
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 3, 32, 32, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(45):
        labels = torch.randint(0, 10, (16,), generator=gen)
        out = model(pixel_values=protos[labels] + torch.randn(16, 3, 32, 32, generator=gen)).logits
        loss = F.cross_entropy(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    norms = [m for m in model.modules() if isinstance(m, ProgressiveNorm)]
    assert all(m.finished for m in norms)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    model.eval()
    for m in norms:  # once finished, every norm is its RepBN's per-channel affine
        scale, shift = m.eval_scale_shift()
        h = torch.randn(2, 5, m.rep.num_features)
        torch.testing.assert_close(m(h), h * scale + shift, rtol=1e-5, atol=1e-5)
