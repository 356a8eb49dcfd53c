"""Tiny language-model and ViT architectures for the norm-affine surgery (``normsurgeon.zoo_llm:NAME``).

transformers' own implementations from small configs with random weights, as in ``zoo``, but with
every LayerNorm/RMSNorm's scale and shift randomized too: a fresh norm has γ = 1, β = 0, which would
hide a fold that forgot them.
"""

from __future__ import annotations

from typing import Callable

import torch

from .zoo import _Inputs

_DECODER = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64)


def _build(config_cls: str, model_cls: str, inputs: _Inputs, **config) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_norms(model)
    model.example_inputs = inputs
    return model


def randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Every 1-D ``weight``/``bias`` of a module whose class name says it normalizes: γ around 1, β around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1:
                w.add_(torch.randn(w.shape, generator=g) * 0.3)
            if isinstance(b, torch.Tensor) and b.dim() == 1:
                b.add_(torch.randn(b.shape, generator=g) * 0.3)


def _ids(vocab: int = 96, seq: int = 10, batch: int = 2) -> _Inputs:
    return _Inputs("input_ids", (batch, seq), vocab)


def llama():
    return _build("LlamaConfig", "LlamaForCausalLM", _ids(), num_key_value_heads=2, tie_word_embeddings=False,
                  **_DECODER)


def mistral():
    return _build("MistralConfig", "MistralForCausalLM", _ids(), num_key_value_heads=2, tie_word_embeddings=False,
                  **_DECODER)


def qwen2():
    return _build("Qwen2Config", "Qwen2ForCausalLM", _ids(), num_key_value_heads=2, tie_word_embeddings=False,
                  **_DECODER)


def qwen3():
    return _build("Qwen3Config", "Qwen3ForCausalLM", _ids(), num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=False, **_DECODER)


def phi3():
    return _build("Phi3Config", "Phi3ForCausalLM", _ids(), num_key_value_heads=4, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0, **_DECODER)


def gpt2(tied: bool = True):
    return _build("GPT2Config", "GPT2LMHeadModel", _ids(), vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                  n_positions=64, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)


def gpt2_untied():
    return gpt2(tied=False)


def opt():
    return _build("OPTConfig", "OPTForCausalLM", _ids(), vocab_size=96, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                  tie_word_embeddings=False, pad_token_id=1)


def falcon():
    return _build("FalconConfig", "FalconForCausalLM", _ids(), vocab_size=96, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, tie_word_embeddings=False)


def gpt_neox():
    return _build("GPTNeoXConfig", "GPTNeoXForCausalLM", _ids(), tie_word_embeddings=False, **_DECODER)


def phi():
    return _build("PhiConfig", "PhiForCausalLM", _ids(), tie_word_embeddings=False, **_DECODER)


def stablelm():
    return _build("StableLmConfig", "StableLmForCausalLM", _ids(), num_key_value_heads=2,
                  tie_word_embeddings=False, **_DECODER)


def starcoder2():
    return _build("Starcoder2Config", "Starcoder2ForCausalLM", _ids(), num_key_value_heads=2,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **_DECODER)


def gemma():
    return _build("GemmaConfig", "GemmaForCausalLM", _ids(), num_key_value_heads=2, head_dim=8, **_DECODER)


def gemma2():
    return _build("Gemma2Config", "Gemma2ForCausalLM", _ids(), num_key_value_heads=2, head_dim=8, **_DECODER)


def granite():
    return _build("GraniteConfig", "GraniteForCausalLM", _ids(), num_key_value_heads=2, tie_word_embeddings=False,
                  embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0, **_DECODER)


def bert():
    return _build("BertConfig", "BertModel", _ids(), vocab_size=96, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def vit():
    return _build("ViTConfig", "ViTForImageClassification", _Inputs("pixel_values", (2, 3, 32, 32)), image_size=32,
                  patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  num_labels=10)


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3, "phi3": phi3, "gpt2": gpt2,
    "gpt2_untied": gpt2_untied, "opt": opt, "falcon": falcon, "gpt_neox": gpt_neox, "phi": phi,
    "stablelm": stablelm, "starcoder2": starcoder2, "gemma": gemma, "gemma2": gemma2, "granite": granite,
    "bert": bert, "vit": vit,
}
