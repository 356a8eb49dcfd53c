"""A ViT converted to pure BatchNorm (LN -> token BN + a BN in every FFN, Yao et al. 2021) trains,
calibrates and folds.

Task: 10 classes, each a fixed random 3x32x32 prototype; a sample is its class prototype plus noise
of the same scale. A tiny transformers ViT learns it on CPU in a few hundred steps.
"""

import math

import torch
import torch.nn as nn

from normsurgeon import zoo
from normsurgeon.calibrate import calibrate
from normsurgeon.passes.convert import convert
from normsurgeon.find import inspect
from normsurgeon.inputs import CallArgs
from normsurgeon.nn import TokenBatchNorm
from normsurgeon.outputs import compare_outputs

STEPS = 300
BATCH = 16


def _task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, generator=gen)

    def batch(n, gen=gen):
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = prototypes[labels] + torch.randn(n, 3, 32, 32, generator=gen)
        return images, labels
    return batch


def test_bn_vit_trains_calibrates_and_folds():
    torch.manual_seed(0)
    model = zoo.vit()
    ci = model.example_inputs()
    bn_vit, report = convert(model, "bn", example_inputs=ci, ffn_bn=True)
    assert len(report.converted) == 5 and len(report.inserted) == 2
    assert not any(isinstance(m, nn.LayerNorm) for m in bn_vit.modules())
    assert sum(isinstance(m, TokenBatchNorm) for m in bn_vit.modules()) == 7

    batch = _task()
    bn_vit.train()
    opt = torch.optim.AdamW(bn_vit.parameters(), lr=2e-3, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        x, y = batch(BATCH)
        logits = bn_vit(pixel_values=x).logits
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()), f"loss became {loss.item()} at step {len(losses)}"
        losses.append(loss.item())
    start, end = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert start > 1.8  # ~ln(10) at the start
    assert end < 0.2 * start, (start, end)
    assert all(torch.isfinite(p).all() for p in bn_vit.parameters())
    assert all(torch.isfinite(b).all() for b in bn_vit.buffers())

    # exact statistics for eval, then eval accuracy on fresh data
    cal = calibrate(bn_vit, [CallArgs((), {"pixel_values": batch(32)[0]}) for _ in range(4)])
    assert cal.recalibrated == 7
    bn_vit.eval()
    x, y = batch(128)
    with torch.no_grad():
        acc = (bn_vit(pixel_values=x).logits.argmax(-1) == y).float().mean().item()
    assert acc > 0.9, acc

    # fold the BNs away: every one of them folds into a neighbouring Linear, outputs unchanged
    from normsurgeon import fold
    folded, fold_report = fold(bn_vit, ci)
    assert len(fold_report.folded) == 7, fold_report.to_json()
    with torch.no_grad():
        ref = bn_vit(pixel_values=x).logits
        got = folded(pixel_values=x).logits
    stats = compare_outputs(ref, got)
    assert stats.max_rel_error < 1e-4, stats
    assert "batchnorm" not in inspect(folded, ci).counts()
