"""rotate(): the residual stream rotated by a seeded orthogonal Q, outputs kept, on tiny real architectures."""

import pytest
import torch

import normsurgeon
from normsurgeon import zoo_llm
from normsurgeon.norm_math import orthogonal
from normsurgeon.passes.convert import convert
from normsurgeon.passes.fold import fold
from normsurgeon.passes.rotate import rotate

from _llm_helpers import fresh_inputs, logits, rel_err

RMS_MODELS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite"]
LN_MODELS = ["gpt2", "opt", "falcon", "gpt_neox", "phi", "stablelm", "starcoder2", "vit"]


def _embedding(model):
    if hasattr(model, "vit"):
        return model.vit.embeddings.patch_embeddings.projection.weight
    return model.get_input_embeddings().weight


def _prepared(name):
    model = zoo_llm.MODELS[name]()
    x = model.example_inputs()
    if name in LN_MODELS:
        ready, report = convert(model, "rms", example_inputs=x, untie=True)
        assert report.verify["passed"] and not report.skipped
    else:
        ready, report = fold(model, x, affine=True, untie=True)
        assert report.passed and all("q/k norm" in a.reason for a in report.skipped)
    return model, ready, x


@pytest.mark.parametrize("name", RMS_MODELS + LN_MODELS)
def test_rotation_keeps_outputs(name):
    model, ready, x = _prepared(name)
    before = _embedding(ready).detach().clone()
    rotated, report = rotate(ready, x, seed=0)
    assert report.rotated, report.summary()
    assert report.seed == 0 and report.matrix == "randomized Hadamard" and report.verify.max_rel_error < 1e-4
    after = _embedding(rotated)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()  # the embedding really changed
    kw = fresh_inputs(name)
    assert rel_err(logits(model, kw), logits(rotated, kw)) < 1e-4


def test_unprepared_norms_are_named():
    model = zoo_llm.llama()
    out, report = rotate(model, model.example_inputs())
    assert not report.rotated and "still carries an affine scale" in report.refused[0].reason
    assert report.refused[0].path == "model.layers.0.input_layernorm"
    assert torch.equal(out.model.embed_tokens.weight, model.model.embed_tokens.weight)
    gpt2 = zoo_llm.gpt2_untied()
    ready, _ = fold(gpt2, gpt2.example_inputs(), affine=True)
    _, report = rotate(ready, gpt2.example_inputs())
    assert "subtracts the mean" in report.refused[0].reason and "convert" in report.refused[0].reason


def test_gemma2_post_norm_refused():
    model = zoo_llm.gemma2()
    ready, _ = fold(model, model.example_inputs(), affine=True, untie=True)
    _, report = rotate(ready, model.example_inputs())
    assert not report.rotated and "post-norm" in report.refused[0].reason


def test_width_not_power_of_two_uses_a_kronecker_q_and_seed_matters():
    def build():
        torch.manual_seed(0)
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=40, tie_word_embeddings=True,
                                       use_cache=False)
        m = transformers.LlamaForCausalLM(cfg).eval()
        zoo_llm.randomize_norms(m)
        return m
    model = build()
    x = {"input_ids": torch.randint(0, 96, (2, 5))}
    ready, _ = fold(model, x, affine=True, untie=True)
    a, report = normsurgeon.rotate(ready, x, seed=1)
    b, _ = normsurgeon.rotate(ready, x, seed=2)
    assert report.rotated and report.width == 24  # 24 = 8·3: a randomized Hadamard ⊗ a 3×3 QR
    assert report.matrix == "randomized Hadamard (8) ⊗ random orthogonal (QR, 3)"
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    kw = fresh_inputs("llama")
    assert rel_err(logits(model, kw), logits(a, kw)) < 1e-4


def test_tied_embedding_rotates_once():
    """A tied head reads with the embedding's own E·Q: the tie survives and the rotation is applied once."""
    model = zoo_llm.gemma()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # (1 + w) = 1: the final norm has nothing to fold into the tied head
    x = model.example_inputs()
    ready, report = fold(model, x, affine=True)
    rotated, r = rotate(ready, x)
    assert r.rotated, r.summary()
    assert rotated.lm_head.weight is rotated.model.embed_tokens.weight
    kw = fresh_inputs("gemma")
    assert rel_err(logits(model, kw), logits(rotated, kw)) < 1e-4
    _, r = rotate(zoo_llm.gemma(), x)  # with the final norm's γ still there, it is named
    assert not r.rotated and r.refused[0].path == "model.layers.0.input_layernorm"


@pytest.mark.parametrize("n", [8, 9, 12, 32])
def test_orthogonal(n):
    q, _ = orthogonal(n, 0)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(n, 0)[0]) and not torch.equal(q, orthogonal(n, 1)[0])


def test_the_pass_applies_the_seeds_dense_q_without_forming_it(monkeypatch):
    """Same seed, same rotation as the dense n×n Q of earlier versions, through the fast transform only."""
    import normsurgeon.norm_math as nm

    model = zoo_llm.llama()
    x = model.example_inputs()
    ready, _ = fold(model, x, affine=True, untie=True)
    n = ready.config.hidden_size
    g = torch.Generator().manual_seed(7)  # the dense Q as orthogonal() built it: Sylvester H·diag(±1)/√n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    q = h * (torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1)[None, :] / n ** 0.5
    monkeypatch.setattr(nm.Rotation, "dense", lambda self: pytest.fail("the pass formed the dense Q"))
    rotated, report = rotate(ready, x, seed=7)
    assert report.rotated and report.matrix == "randomized Hadamard"
    e, o = ready.model.embed_tokens.weight.double(), ready.model.layers[0].self_attn.o_proj.weight.double()
    up = ready.model.layers[0].mlp.up_proj.weight.double()
    for got, want in ((rotated.model.embed_tokens.weight, e @ q), (rotated.model.layers[0].self_attn.o_proj.weight,
                      q.T @ o), (rotated.model.layers[0].mlp.up_proj.weight, up @ q)):
        assert (got != want.float()).sum() <= 1  # the same float32 weights, but for a rare tie
