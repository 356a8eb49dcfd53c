"""convert(to="rms"): exact LayerNorm -> RMSNorm by centring every writer of the residual stream."""

import pytest
import torch
import torch.nn as nn

from normsurgeon import zoo_llm
from normsurgeon.passes.convert import TARGETS, convert

from _llm_helpers import fresh_inputs, logits, rel_err

LN_MODELS = ["gpt2_untied", "opt", "falcon", "gpt_neox", "phi", "stablelm", "starcoder2", "vit"]


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("name", LN_MODELS)
def test_no_layernorm_left(name):
    model = zoo_llm.MODELS[name]()
    n_ln = count(model, nn.LayerNorm)
    out, report = convert(model, "rms", example_inputs=model.example_inputs())
    assert report.verify["passed"] and report.function_preserving
    assert count(out, nn.LayerNorm) == 0 and count(out, nn.RMSNorm) == n_ln
    assert len(report.converted) == n_ln and not report.skipped
    kw = fresh_inputs(name)
    assert rel_err(logits(model, kw), logits(out, kw)) < 1e-5
    assert count(model, nn.LayerNorm) == n_ln  # the caller's model is untouched


def test_gpt2_position_embeddings_centred():
    model = zoo_llm.gpt2_untied()
    out, report = convert(model, "rms", example_inputs=model.example_inputs())
    for emb in (out.transformer.wte.weight, out.transformer.wpe.weight):
        assert emb.double().mean(dim=1).abs().max() < 1e-6
    assert any("transformer.wpe" in n for n in report.notes)


def test_tied_head_refused_then_untied():
    model = zoo_llm.gpt2()
    out, report = convert(model, "rms", example_inputs=model.example_inputs())
    assert count(out, nn.LayerNorm) == 5 and not report.converted
    assert all("untie" in a.reason or "tied" in a.reason for a in report.skipped)
    out, report = convert(model, "rms", example_inputs=model.example_inputs(), untie=True)
    assert count(out, nn.LayerNorm) == 0
    kw = fresh_inputs("gpt2")
    assert rel_err(logits(model, kw), logits(out, kw)) < 1e-5


def test_bert_post_norms_refused():
    model = zoo_llm.bert()
    out, report = convert(model, "rms", example_inputs=model.example_inputs())
    assert not report.converted and len(report.skipped) == 5
    assert all("post-norm" in a.reason or "model output" in a.reason for a in report.skipped)


class _TanhWriter(nn.Module):
    """A residual stream with a non-linear writer: its mean cannot be moved out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.tanh(self.fc(h))
        return self.head(self.ln(h))


def test_non_linear_writer_refused():
    torch.manual_seed(0)
    model = _TanhWriter().eval()
    ids = torch.randint(0, 20, (2, 5))
    out, report = convert(model, "rms", example_inputs=ids)
    (a,) = report.skipped
    assert "cannot be proven centred" in a.reason and "tanh" in a.reason
    assert count(out, nn.LayerNorm) == 1


def test_rms_is_a_target_and_recipe_replays(tmp_path):
    from normsurgeon import api

    assert "rms" in TARGETS
    model = zoo_llm.opt()
    out, _ = convert(model, "rms", example_inputs=model.example_inputs())
    api.save(out, f"{tmp_path / 'rms'}/")
    back = api.load(f"{tmp_path / 'rms'}/").model
    assert count(back, nn.RMSNorm) == 5
    kw = fresh_inputs("opt")
    assert torch.equal(logits(out, kw), logits(back, kw))
