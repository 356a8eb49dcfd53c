"""fold(affine=True): LayerNorm/RMSNorm γ/β folded into the linears that read them, on real tiny
transformers architectures (random weights, norm γ/β randomized), checked on fresh inputs of another
batch size and sequence length."""

import pytest
import torch
import torch.nn as nn

from normsurgeon import zoo_llm
from normsurgeon.passes.fold import fold

from _llm_helpers import fresh_inputs, logits, rel_err

# model -> the norms expected to stay (and a word of the reason)
PRE_NORM = {
    "llama": {}, "mistral": {}, "qwen2": {}, "phi3": {}, "gpt2_untied": {}, "opt": {}, "falcon": {},
    "gpt_neox": {}, "phi": {}, "stablelm": {}, "starcoder2": {}, "granite": {}, "vit": {},
    "gpt2": {"transformer.ln_f": "tied"}, "gemma": {"model.norm": "tied"},
}


def norm_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "norm" in n.lower() or ".ln" in n or "ln_" in n}


@pytest.mark.parametrize("name", sorted(PRE_NORM))
def test_affine_fold_every_pre_norm(name):
    model = zoo_llm.MODELS[name]()
    folded, report = fold(model, model.example_inputs(), affine=True)
    assert report.passed
    kept = PRE_NORM[name]
    actions = {a.path: a for a in report.affine_actions}
    assert actions, "no norm site matched"
    for path, a in actions.items():
        if path in kept:
            assert a.kind == "skipped" and kept[path] in a.reason
        else:
            assert a.kind == "folded", (path, a.reason)
            assert a.detail["kind"] in ("layernorm", "rmsnorm")
    kw = fresh_inputs(name)
    assert rel_err(logits(model, kw), logits(folded, kw)) < 1e-5
    # the affines really moved: every folded norm is now γ = 1 (w = 0 for 1 + w) and β = 0
    mods = dict(folded.named_modules())
    for path, a in actions.items():
        if a.kind != "folded":
            continue
        m = mods[path]
        target = 0.0 if a.detail.get("one_plus") else 1.0
        assert torch.all(m.weight == target)
        assert getattr(m, "bias", None) is None or torch.all(m.bias == 0)
        assert not torch.allclose(dict(model.named_modules())[path].weight, m.weight)


def test_gemma_one_plus_weight_becomes_zero():
    model = zoo_llm.gemma()
    folded, report = fold(model, model.example_inputs(), affine=True)
    a = next(a for a in report.folded if a.path == "model.layers.0.input_layernorm")
    assert a.detail["one_plus"] and torch.all(folded.model.layers[0].input_layernorm.weight == 0)


def test_tied_head_untied_on_request():
    model = zoo_llm.gpt2()
    folded, report = fold(model, model.example_inputs(), affine=True, untie=True)
    a = next(a for a in report.actions if a.path == "transformer.ln_f")
    assert a.kind == "folded" and a.detail["untied"] == ["lm_head"]
    assert "untied lm_head" in report.summary()
    assert folded.lm_head.weight is not folded.transformer.wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight  # the caller's model keeps its tie
    assert folded.config.tie_word_embeddings is False
    kw = fresh_inputs("gpt2")
    assert rel_err(logits(model, kw), logits(folded, kw)) < 1e-5


@pytest.mark.parametrize("name, refused, why", [
    ("bert", ["embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
              "encoder.layer.0.output.LayerNorm"], "post-norm"),
    ("gemma2", ["model.layers.0.post_attention_layernorm", "model.layers.1.post_feedforward_layernorm"],
     "post-norm"),
    ("qwen3", ["model.layers.0.self_attn.q_norm", "model.layers.1.self_attn.k_norm"], "q/k norm"),
])
def test_refusals_with_reasons(name, refused, why):
    model = zoo_llm.MODELS[name]()
    before = norm_weights(model)
    folded, report = fold(model, model.example_inputs(), affine=True)
    actions = {a.path: a for a in report.affine_actions}
    for path in refused:
        assert actions[path].kind == "skipped" and why in actions[path].reason
    after = dict(folded.named_parameters())
    for path in refused:  # refused norms keep their affine
        for n, t in before.items():
            if n.startswith(path + "."):
                assert torch.equal(after[n], t)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.ln(self.fc(self.ln(x))))


class _NonLinearReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.ln(x)))


@pytest.mark.parametrize("cls, why", [(_Shared, "called 2 times"), (_NonLinearReader, "not linear")])
def test_refused_small_models(cls, why):
    torch.manual_seed(0)
    model = cls().eval()
    zoo_llm.randomize_norms(model)
    x = torch.randn(2, 5, 8)
    folded, report = fold(model, x, affine=True)
    (a,) = report.affine_actions
    assert a.kind == "skipped" and why in a.reason
    assert torch.equal(folded(x), model(x))


def test_rank4_layernorm_is_not_mistaken_for_a_qk_norm():
    """ConvNeXt's channels-last LN sees (B, H, W, C) and feeds pwconv1 (a Linear): it folds; the
    channels-first LNs before convs are refused as non-linear readers, not as q/k norms."""
    from normsurgeon import zoo

    model = zoo.convnext()
    zoo_llm.randomize_norms(model)
    x = model.example_inputs()
    folded, report = fold(model, x, affine=True)
    actions = {a.path: a for a in report.affine_actions}
    layer = actions["convnext.encoder.stages.0.layers.0.layernorm"]
    assert layer.kind == "folded" and layer.detail["into"] == ["convnext.encoder.stages.0.layers.0.pwconv1"]
    assert all("q/k" not in (a.reason or "") for a in actions.values())
    assert report.passed
    with torch.no_grad():
        a, b = model(**x.kwargs)[0], folded(**x.kwargs)[0]
    assert rel_err(a, b) < 1e-5
