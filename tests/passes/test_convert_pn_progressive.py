"""convert --to pn, --to bn --progressive and padding-aware statistics on the zoo's BERT, GPT-2 and
ViT: each converted model trains (loss goes down), and in eval folds every norm fold can remove."""

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import normsurgeon
from normsurgeon import zoo
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.nn import PowerNorm, ProgressiveNorm, RepBatchNorm, TokenBatchNorm
from normsurgeon.passes.fold import fold

from _train_helpers import text_bytes

# the norms fold cannot remove in each architecture, and why (the rest must all fold)
STAYS = {
    "gpt2": {"ln_f": "model output"},  # final norm: its output is the model output
    "vit": {},  # even the final norm folds: through the [CLS] slice into the classifier
    # post-LN: every LN reads a residual add and feeds a residual add as well as a Linear
    "bert": {p: "add" for p in ("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
                                 "encoder.layer.0.output.LayerNorm", "encoder.layer.1.attention.output.LayerNorm",
                                 "encoder.layer.1.output.LayerNorm")},
}


def _train(model, name, steps, seed=0):
    """A few Adam steps on one batch of real data (stdlib source bytes; ViT: pixels made of them): the
    loss per step. One fixed batch, so "the loss goes down" does not depend on batch-to-batch noise."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = text_bytes()
    if name == "vit":
        head = nn.Identity()
        params = list(model.parameters())
    else:
        head = nn.Linear(32, 100)
        params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    starts = torch.randint(0, len(data) - 13, (8,), generator=gen)
    ids = torch.stack([data[s:s + 13] for s in starts.tolist()])
    model.train()
    losses = []
    for _ in range(steps):
        if name == "vit":
            pix = (ids[:, :12].float() / 50 - 1).repeat_interleave(256, 1)[:, :3072].reshape(8, 3, 32, 32)
            logits = model(pixel_values=pix).logits
            loss = nn.functional.cross_entropy(logits, ids[:, 12] % 10)
        else:
            mask = torch.ones(8, 12, dtype=torch.long)
            mask[::2, 9:] = 0  # padded rows: statistics over real tokens only
            out = model(input_ids=ids[:, :12], attention_mask=mask).last_hidden_state
            logit = head(out[:, :-1]).reshape(-1, 100)
            keep = mask[:, 1:].reshape(-1).bool()
            loss = nn.functional.cross_entropy(logit[keep], ids[:, 1:12].reshape(-1)[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check_fold(model, name, ci):
    model.eval()
    folded, report = fold(model, ci)
    assert report.passed, report.summary()
    stays = STAYS[name]
    done = {a.path for a in report.actions if a.kind == "folded"}
    skipped = {a.path: a.reason for a in report.actions if a.kind != "folded"}
    assert set(skipped) == set(stays), skipped
    for path, why in skipped.items():
        assert stays[path] in why, (path, why)
    mods = dict(folded.named_modules(remove_duplicate=False))
    assert (done or name == "bert") and all(isinstance(mods[p], nn.Identity) for p in done)
    left = [p for p, m in folded.named_modules() if isinstance(m, (PowerNorm, RepBatchNorm, ProgressiveNorm))
            and "." + p.rpartition(".")[2] not in (".rep", ".norm")]
    assert set(left) == set(stays)
    return report


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_pn_trains_and_folds(name):
    model = getattr(zoo, name)()
    ci = model.example_inputs()
    # a short run stays inside the warm-up (batch statistic, exact gradient), as the paper's early steps
    # do; the running quadratic mean is updated all along, and eval/fold use it
    conv, report = normsurgeon.convert(model, to="pn", pn_warmup_steps=100)
    assert report.converted and all(a.detail["to"] == "PowerNorm" for a in report.converted)
    assert not report.function_preserving
    assert report.to_json()["statistics"]["padding_aware"] is True  # these forwards take attention_mask
    losses = _train(conv, name, 8)
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(int(m.num_batches_tracked) == 8 for m in conv.modules() if isinstance(m, PowerNorm))
    _check_fold(conv, name, ci)


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_progressive_is_exact_at_step_0_trains_and_folds_when_finished(name):
    model = getattr(zoo, name)()
    ci = model.example_inputs()
    conv, report = normsurgeon.convert(model, to="bn", progressive=4)
    assert report.converted and all(a.detail["to"] == "ProgressiveNorm" for a in report.converted)
    # the whole-model comparison with the LN model ran and passed (it would roll back deviating sites)
    assert report.function_preserving and report.verify["passed"] is True
    assert report.verify["max_abs_error"] == 0.0
    losses = _train(conv, name, 12)  # lambda reaches 0 after 4 steps; BERT's loss bumps, then falls
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(m.finished for m in conv.modules() if isinstance(m, ProgressiveNorm))
    _check_fold(conv, name, ci)


def test_unfinished_progressive_and_group_scaled_pn_are_skipped_with_the_reason():
    model = zoo.gpt2()
    conv, _ = normsurgeon.convert(model, to="bn", progressive=100)
    _train(conv, "gpt2", 2)
    _, report = fold(conv.eval(), model.example_inputs())
    reasons = {a.path: a.reason for a in report.actions if a.kind != "folded"}
    assert "h.0.ln_1" in reasons and "still mixes in" in reasons["h.0.ln_1"]
    conv, _ = normsurgeon.convert(model, to="pn", pn_groups=4)
    _, report = fold(conv.eval(), model.example_inputs())
    assert all("group scaling" in a.reason for a in report.actions if a.path != "ln_f"), report.actions


def test_padding_aware_statistics_ignore_padded_positions():
    model = zoo.bert()
    conv, report = normsurgeon.convert(model, to="bn")
    assert report.statistics["padding_aware"] is True
    assert "real tokens" in report.tables()[-1].notes[-len(report.notes) - 1]
    ids = torch.randint(0, 100, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 6:] = 0
    other = ids.clone()
    other[:, 6:] = torch.randint(0, 100, (4, 4))  # different padding content, same real tokens
    stats = []
    for x in (ids, other):
        m = conv
        for bn in m.modules():
            if isinstance(bn, TokenBatchNorm):
                bn.reset_running_stats()
        m.train()(input_ids=x, attention_mask=mask)
        stats.append(m.embeddings.LayerNorm.running_mean.clone())
    assert torch.equal(stats[0], stats[1])
    conv2, report2 = normsurgeon.convert(model, to="bn", padding_mask=None)
    assert report2.statistics["padding_aware"] is False and "every position" in report2.statistics["note"]


def test_cli_pn_and_progressive(tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "gpt2") + "/"  # a recipe directory: the rule's options are replayed on load
    res = runner.invoke(main, ["convert", "normsurgeon.zoo:gpt2", "--to", "bn", "--progressive", "5", "--json", "-o", out])
    assert res.exit_code == 0, res.output
    j = json.loads(res.output)
    assert j["verify"]["passed"] is True and j["function_preserving"] is True
    assert {c["to"] for c in j["converted"]} == {"ProgressiveNorm"} and j["statistics"]["padding_aware"]
    from normsurgeon import api
    loaded = api.load(out).model
    prog = [m for m in loaded.modules() if isinstance(m, ProgressiveNorm)]
    assert len(prog) == 5 and all(int(m.total_steps) == 5 for m in prog)
    assert loaded.__dict__.get("_normsurgeon_padding_mask_handle")  # the hook is back
    res = runner.invoke(main, ["convert", "normsurgeon.zoo:bert", "--to", "pn", "--pn-warmup", "10", "--json"])
    assert res.exit_code == 0, res.output
    j = json.loads(res.output)
    assert {c["to"] for c in j["converted"]} == {"PowerNorm"} and j["function_preserving"] is False
    res = runner.invoke(main, ["convert", "normsurgeon.zoo:bert", "--to", "ln", "--progressive", "5"])
    assert res.exit_code == 2 and "--progressive only goes with --to bn" in res.output


def test_bad_options_are_refused():
    with pytest.raises(NormSurgeonError, match="progressive must be"):
        normsurgeon.convert(zoo.gpt2(), to="bn", progressive=-1)
    with pytest.raises(NormSurgeonError, match="only go with to='pn'"):
        normsurgeon.convert(zoo.gpt2(), to="bn", pn_groups=2)


def test_repbn_after_a_linear_folds_as_one_site_into_its_producer():
    """Linear -> RepBatchNorm -> output: x feeds both the inner BN and alpha * x, so the RepBN is one
    site (its inner ``bn`` is never folded alone) and folds into the Linear, verified."""
    lin = nn.Linear(6, 8)
    rep = RepBatchNorm(8)
    with torch.no_grad():
        rep.bn.running_mean.normal_()
        rep.bn.running_var.uniform_(0.5, 2.0)
        rep.bn.weight.normal_()
        rep.bn.bias.normal_()
        rep.alpha.fill_(0.7)
    model = nn.Sequential(lin, rep, nn.ReLU()).eval()
    x = torch.randn(4, 5, 6)
    folded, report = fold(model, x)
    assert report.passed
    assert [(a.path, a.kind, a.detail.get("position")) for a in report.actions] == [("1", "folded", "after")]
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
