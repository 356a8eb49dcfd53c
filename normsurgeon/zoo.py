"""Small real architectures with random weights, usable as ``normsurgeon.zoo:NAME`` factory specs.

They are the models of nobody here: transformers' own implementations built from small configs,
so tests, examples and ``make demo`` run offline in seconds. Each factory returns an eval-mode model
whose ``example_inputs`` attribute gives inputs that fit it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .inputs import CallArgs


def _hf(config_cls: str, model_cls: str, inputs: Callable[[], CallArgs], seed: int = 0, **config):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**config)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    model = getattr(transformers, model_cls)(cfg).eval()
    model.example_inputs = inputs
    _randomize_norm_stats(model)
    return model


def _randomize_norm_stats(model: torch.nn.Module) -> None:
    """Fresh BNs have mean 0 / var 1 and affine 1/0, which would hide folding mistakes."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


class _Inputs:
    """Seeded example inputs; a class, not a lambda, so zoo models stay picklable (torch.save)."""

    def __init__(self, name: str | None, shape: tuple, vocab: int | None = None) -> None:
        self.name, self.shape, self.vocab = name, tuple(shape), vocab

    def __call__(self) -> CallArgs:
        gen = torch.Generator().manual_seed(0)
        if self.vocab is None:
            t = torch.randn(*self.shape, generator=gen)
        else:
            t = torch.randint(0, self.vocab, self.shape, generator=gen)
        return CallArgs((t,), {}) if self.name is None else CallArgs((), {self.name: t})


def _pixels(c=3, size=32, batch=2):
    return _Inputs("pixel_values", (batch, c, size, size))


def _ids(vocab=100, seq=12, batch=2):
    return _Inputs("input_ids", (batch, seq), vocab)


def vit():
    return _hf("ViTConfig", "ViTForImageClassification", _pixels(size=32), image_size=32, patch_size=8,
               hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=10)


def levit():
    return _hf("LevitConfig", "LevitForImageClassification", _pixels(size=64), image_size=64,
               hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
               mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=10)


def resnet():
    return _hf("ResNetConfig", "ResNetForImageClassification", _pixels(size=32), embedding_size=16,
               hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=10)


def mobilenet_v2():
    return _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", _pixels(size=32), image_size=32,
               depth_multiplier=0.25, num_labels=10)


def convnext():
    return _hf("ConvNextConfig", "ConvNextForImageClassification", _pixels(size=32), image_size=32,
               hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)


def efficientnet():
    return _hf("EfficientNetConfig", "EfficientNetForImageClassification", _pixels(size=32), image_size=32,
               width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=10)


def regnet():
    return _hf("RegNetConfig", "RegNetForImageClassification", _pixels(size=32), embedding_size=16,
               hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)


def mobilevit():
    return _hf("MobileViTConfig", "MobileViTForImageClassification", _pixels(size=32), image_size=32,
               hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)


def bert():
    return _hf("BertConfig", "BertModel", _ids(), vocab_size=100, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)


def gpt2():
    return _hf("GPT2Config", "GPT2Model", _ids(), vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
               bos_token_id=0, eos_token_id=0)


def llama():
    return _hf("LlamaConfig", "LlamaModel", _ids(), vocab_size=100, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)


def wav2vec2():
    return _hf("Wav2Vec2Config", "Wav2Vec2Model",
               _Inputs("input_values", (2, 800)),
               hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)


def transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    model.example_inputs = _Inputs(None, (2, 10, 32))
    return model


def llama_lm():
    """A tiny LlamaForCausalLM (untied head) whose norm scales are randomized (``zoo_llm.llama``): the
    model of the README's norm-surgery tour."""
    from .zoo_llm import llama as _llama

    return _llama()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "vit": vit, "levit": levit, "resnet": resnet, "mobilenet_v2": mobilenet_v2, "convnext": convnext,
    "efficientnet": efficientnet, "regnet": regnet, "mobilevit": mobilevit, "bert": bert, "gpt2": gpt2,
    "llama": llama, "llama_lm": llama_lm, "wav2vec2": wav2vec2, "transformer_encoder": transformer_encoder,
}
