"""Padding-aware statistics: token BN / PowerNorm / calibration see real tokens only, on real BERT and GPT-2."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.nn import (PowerNorm, RepBatchNorm, TokenBatchNorm, capture_padding_mask, current_padding_mask,
                            padding_mask)

C = 6


def test_masked_token_bn_is_batchnorm1d_on_the_real_rows():
    torch.manual_seed(0)
    tbn = TokenBatchNorm(C)
    with torch.no_grad():
        tbn.weight.normal_()
        tbn.bias.normal_()
    ref = nn.BatchNorm1d(C)
    ref.load_state_dict(tbn.state_dict())
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    real = mask.bool()
    for step in range(3):
        x = torch.randn(3, 4, C) * (step + 1)
        x[~real] = 50.0
        xt = x.clone().requires_grad_(True)
        xr = x[real].clone().requires_grad_(True)
        with padding_mask(mask):
            y = tbn(xt)
        yr = ref(xr)
        torch.testing.assert_close(y[real], yr, rtol=1e-6, atol=1e-6)
        g = torch.randn(yr.shape)
        (y[real] * g).sum().backward()
        (yr * g).sum().backward()
        torch.testing.assert_close(xt.grad[real], xr.grad, rtol=1e-5, atol=1e-6)
        assert torch.all(xt.grad[~real] == 0)  # padded rows feed no statistic and no loss here
    torch.testing.assert_close(tbn.running_mean, ref.running_mean)
    torch.testing.assert_close(tbn.running_var, ref.running_var)
    assert int(tbn.num_batches_tracked) == 3
    torch.testing.assert_close(tbn.weight.grad, ref.weight.grad)
    # eval ignores the mask (fixed per-channel map); no mask: exactly BatchNorm1d over every row
    tbn.eval(), ref.eval()
    ref.load_state_dict(tbn.state_dict())
    x = torch.randn(3, 4, C)
    with padding_mask(mask):
        torch.testing.assert_close(tbn(x), ref(x.reshape(-1, C)).reshape(x.shape), rtol=0, atol=0)
    tbn.train(), ref.train()
    torch.testing.assert_close(tbn(x), ref(x.reshape(-1, C)).reshape(x.shape), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2"):
        with padding_mask(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])):
            tbn(x)


def test_mask_of_another_shape_is_ignored_and_context_nests():
    tbn = TokenBatchNorm(C)
    ref = copy.deepcopy(tbn)
    x = torch.randn(5, C)  # a pooled (B, C) input under a (3, 4) mask: not its positions
    with padding_mask(torch.ones(3, 4)):
        torch.testing.assert_close(tbn(x), ref(x), rtol=0, atol=0)
        with padding_mask(None):
            assert current_padding_mask() is None
        assert current_padding_mask().shape == (3, 4)
    assert current_padding_mask() is None


def _padded_text_batch(lengths, total, vocab=100, seed=0, pad=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), total), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[i, :n] = 1
    return ids, mask


def _no_dropout(model):
    """Train mode without dropout, so that two calls are comparable."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _record_bn_inputs(model):
    seen = {}

    def hook(name):
        def f(module, args):
            seen.setdefault(name, []).append(args[0].detach().clone())
        return f
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, TokenBatchNorm)]
    return seen, handles


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_token_bn_statistics_over_real_tokens_in_transformers_models(name, zoo_model):
    """transformers BERT / GPT-2 converted to token BN, trained on a right-padded batch with its
    attention_mask: every BN's batch statistics (read from momentum-1 running stats) are those of
    its real-token inputs only, and the real-token outputs do not depend on how much padding there
    is or what the pad ids are. Without capture, the padding leaks into the statistics."""
    model, example = zoo_model(name)
    # padding_mask=None: this test installs (and removes) the hook itself
    bn_model, report = normsurgeon.convert(model, to="bn", example_inputs=example, padding_mask=None)
    bns = [m for m in bn_model.modules() if isinstance(m, TokenBatchNorm)]
    assert len(bns) == 5
    for m in bns:
        m.momentum = 1.0  # running stats = the last batch's statistics
    _no_dropout(bn_model)
    lengths = [9, 4, 6]
    ids, mask = _padded_text_batch(lengths, 12)
    ids_long, mask_long = _padded_text_batch(lengths, 16, pad=7)
    real = mask.bool()

    with capture_padding_mask(bn_model):
        seen, handles = _record_bn_inputs(bn_model)
        out = bn_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for h in handles:
            h.remove()
        for path, inputs in seen.items():
            bn = bn_model.get_submodule(path)
            x = inputs[0][real]
            torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bn.running_var, x.var(0), rtol=1e-4, atol=1e-6)
            # ... and that is not what every position would give
            assert not torch.allclose(bn.running_mean, inputs[0].reshape(-1, bn.num_features).mean(0),
                                      atol=1e-4)
        out_long = bn_model(input_ids=ids_long, attention_mask=mask_long).last_hidden_state
        torch.testing.assert_close(out_long[:, :12][real], out[real], rtol=1e-4, atol=1e-5)
    # the hooks are gone: the same call now counts the padding and the real outputs change
    out_unmasked = bn_model(input_ids=ids_long, attention_mask=mask_long).last_hidden_state
    assert not torch.allclose(out_unmasked[:, :12][real], out[real], atol=1e-3)


def test_positional_attention_mask_and_exception_safety(zoo_model):
    model, example = zoo_model("bert")
    bn_model, _ = normsurgeon.convert(model, to="bn", example_inputs=example, padding_mask=None)
    _no_dropout(bn_model)
    ids, mask = _padded_text_batch([5, 3], 8)
    handle = capture_padding_mask(bn_model)
    assert capture_padding_mask(bn_model).remove() is None  # second install is a no-op
    torch.manual_seed(0)
    kw = bn_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pos = bn_model(ids, mask).last_hidden_state  # BertModel.forward(input_ids, attention_mask, ...)
    torch.testing.assert_close(pos, kw)
    with pytest.raises(Exception):
        bn_model(input_ids=ids[:, :4], attention_mask=mask)  # mismatched shapes: the forward raises
    assert current_padding_mask() is None  # ... and leaves no mask behind
    buf = io.BytesIO()
    torch.save(bn_model, buf)  # hooks are picklable objects
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    torch.testing.assert_close(clone(input_ids=ids, attention_mask=mask).last_hidden_state, kw)
    handle.remove()
    assert not torch.allclose(bn_model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()],
                              kw[mask.bool()], atol=1e-3)


def test_calibrate_uses_real_tokens_only(zoo_model):
    """normsurgeon.calibrate on padded batches with attention_mask: running stats = exact mean and
    unbiased variance of each BN's inputs at real positions over all batches."""
    model, example = zoo_model("gpt2")
    bn_model, _ = normsurgeon.convert(model, to="bn", example_inputs=example)
    batches = []
    for seed, lengths in enumerate(([7, 3, 5], [2, 8], [6, 6, 1, 4])):
        ids, mask = _padded_text_batch(lengths, 10, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask})
    seen, handles = _record_bn_inputs(bn_model)
    report = normsurgeon.calibrate(bn_model, batches)
    for h in handles:
        h.remove()
    assert report.recalibrated == 5
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for entry in report.norms:
        assert entry["positions"] == n_real
        bn = bn_model.get_submodule(entry["path"])
        # calibration passes the data once per depth of BNs; the last pass runs every BN with the
        # final statistics upstream, so its inputs there are those it was calibrated on
        last = seen[entry["path"]][-len(batches):]
        x = torch.cat([inp[b["attention_mask"].bool()] for inp, b in zip(last, batches)]).double()
        torch.testing.assert_close(bn.running_mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), x.var(0), rtol=1e-4, atol=1e-6)
    assert current_padding_mask() is None
    # without a mask every position counts, as before
    report = normsurgeon.calibrate(bn_model, [{"input_ids": b["input_ids"]} for b in batches])
    assert report.norms[0]["positions"] == sum(b["input_ids"].numel() for b in batches)


def test_powernorm_and_repbn_in_bert_are_padding_aware_and_train(zoo_model):
    """BERT with PowerNorm (and with RepBN) in place of its LayerNorms: real-token outputs of a
    padded batch do not depend on the padding, and it trains on padded text (loss goes down)."""
    from _train_helpers import swap_norms, text_bytes
    for make in (lambda ln: PowerNorm.from_layernorm(ln, warmup_steps=10),
                 lambda ln: RepBatchNorm.from_layernorm(ln)):
        model, _ = zoo_model("bert")
        assert swap_norms(model, make) == 5
        _no_dropout(model)
        capture_padding_mask(model)
        ids, mask = _padded_text_batch([9, 4, 6], 12)
        ids_long, mask_long = _padded_text_batch([9, 4, 6], 16, pad=3)
        snapshot = copy.deepcopy(model)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out_long = snapshot(input_ids=ids_long, attention_mask=mask_long).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(out_long[:, :12][real], out[real], rtol=1e-4, atol=1e-5)

        data = text_bytes()
        head = nn.Linear(32, 100)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(40):
            lengths = torch.randint(4, 17, (8,), generator=gen).tolist()
            starts = torch.randint(0, len(data) - 20, (8,), generator=gen).tolist()
            ids = torch.zeros(8, 16, dtype=torch.long)
            mask = torch.zeros(8, 16, dtype=torch.long)
            for i, (s, n) in enumerate(zip(starts, lengths)):
                ids[i, :n] = data[s:s + n]
                mask[i, :n] = 1
            # masked-token prediction: predict each real byte from a copy with 30% of bytes hidden
            hide = (torch.rand(ids.shape, generator=gen) < 0.3) & mask.bool()
            inp = ids.masked_fill(hide, 1)
            h = model(input_ids=inp, attention_mask=mask).last_hidden_state
            loss = nn.functional.cross_entropy(head(h)[hide], ids[hide])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
