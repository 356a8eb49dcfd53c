"""FFN BatchNorm insertion in the FFN shapes of more architectures (issue 19.5): a fused gate/up
projection (Phi-3, ModernBERT's GLU), FalconLinear (x @ W.T) in a parallel attention + MLP block,
a 1x1 Conv1d FFN (SqueezeBERT), Mix-FFN with a depthwise conv between the projections (SegFormer,
GLPN, PVTv2), GRN between them (ConvNeXtV2). One BN per block, between the first projection and the
second; it trains (forward + backward) and folds back after training. Llama/Mistral keep theirs."""

import pytest
import torch
import transformers

import normsurgeon
from normsurgeon.inputs import CallArgs
from normsurgeon.nn import TokenBatchNorm
from normsurgeon.outputs import flatten_outputs

_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
_MIX = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])


def _ids():
    return CallArgs((), {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))})


def _pixels():
    return CallArgs((), {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))})


# name -> (model class, config class, config, inputs, the first projection of block {i})
ARCHS = {
    "phi3": ("Phi3Model", "Phi3Config", dict(num_key_value_heads=2, use_cache=False, **_TEXT), _ids,
             "layers.{i}.mlp.gate_up_proj"),
    "falcon": ("FalconModel", "FalconConfig", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, parallel_attn=True, use_cache=False,
                                                   new_decoder_architecture=False, bos_token_id=0, eos_token_id=0),
               _ids, "h.{i}.mlp.dense_h_to_4h"),
    "modernbert": ("ModernBertModel", "ModernBertConfig",
                   dict(cls_token_id=0, sep_token_id=0, global_attn_every_n_layers=1, local_attention=8, **_TEXT),
                   _ids, "layers.{i}.mlp.Wi"),
    "squeezebert": ("SqueezeBertModel", "SqueezeBertConfig",
                    dict(embedding_size=32, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
                         intermediate_groups=1, output_groups=1,
                         **{k: v for k, v in _TEXT.items() if k not in ("bos_token_id", "eos_token_id")}),
                    _ids, "encoder.layers.{i}.intermediate.conv1d"),
    "segformer": ("SegformerModel", "SegformerConfig", _MIX, _pixels, "stages.{i}.blocks.0.mlp.fc1"),
    "glpn": ("GLPNModel", "GLPNConfig", _MIX, _pixels, "encoder.block.{i}.0.mlp.dense1"),
    "pvt_v2": ("PvtV2Model", "PvtV2Config", _MIX, _pixels, "encoder.layers.{i}.blocks.0.mlp.dense1"),
    "convnextv2": ("ConvNextV2Model", "ConvNextV2Config", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                                               image_size=32), _pixels,
                   "encoder.stages.{i}.layers.0.pwconv1"),
    "llama": ("LlamaModel", "LlamaConfig", dict(num_key_value_heads=2, use_cache=False, **_TEXT), _ids,
              "layers.{i}.mlp.gate_proj"),
    "mistral": ("MistralModel", "MistralConfig", dict(num_key_value_heads=2, use_cache=False, **_TEXT), _ids,
                "layers.{i}.mlp.gate_proj"),
}


def _build(name):
    model_cls, config_cls, config, inputs, first = ARCHS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    return model, inputs(), first


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_one_bn_per_ffn_block_that_trains_and_folds_back(name):
    model, ci, first = _build(name)
    converted, report = normsurgeon.insert_ffn_bn(model, ci)
    firsts = [first.format(i=i) for i in range(2)]
    assert sorted(a.detail["linear"] for a in report.inserted) == firsts and not report.skipped
    bn_paths = [a.path for a in report.inserted]
    for path, linear in zip(bn_paths, firsts):
        bn = converted.get_submodule(path)
        width = converted.get_submodule(linear)[0]
        width = getattr(width, "out_features", None) or getattr(width, "out_channels", None) or width.weight.shape[0]
        assert bn.num_features == width  # right after the first projection (Phi-3: gate and up, 2 x 64)
        assert isinstance(bn, TokenBatchNorm) == (name != "squeezebert")  # a Conv1d FFN gets BatchNorm1d

    converted.train()
    loss = sum(o.float().square().mean() for o in flatten_outputs(ci.call(converted)) if o.is_floating_point())
    loss.backward()
    for path in bn_paths:
        grad = converted.get_submodule(path).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        for p in converted.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    converted.eval()  # running statistics now from a training batch: not the identity

    folded_model, fold_report = normsurgeon.fold(converted, ci)
    folded = {a.path for a in fold_report.folded}
    assert fold_report.passed
    assert set(bn_paths) <= folded  # Falcon: into FalconLinear (x @ W.T), given the bias it lacked
    with torch.no_grad():
        got, want = flatten_outputs(ci.call(folded_model)), flatten_outputs(ci.call(converted))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_squeeze_excite_gate_is_not_an_ffn():
    """1x1 convs at one position (after global pooling) gate channels: no token FFN to normalize."""
    from normsurgeon import zoo
    from normsurgeon.graph import capture
    from normsurgeon.passes.ffn_bn import find_ffn_blocks

    model = zoo.efficientnet()
    assert find_ffn_blocks(capture(model, model.example_inputs())) == []


def test_a_conv1d_ffn_bn_replays_from_its_recipe():
    """The recipe says which BN went in (BatchNorm1d after a 1x1 Conv1d), so a rebuild matches."""
    from normsurgeon.passes.convert import replay
    from normsurgeon.recipe import recipe_of

    model, ci, first = _build("squeezebert")
    converted, _ = normsurgeon.insert_ffn_bn(model, ci)
    (action,) = [a for a in recipe_of(converted).actions if a["op"] == "convert"]
    rebuilt, _, _ = _build("squeezebert")
    replay(rebuilt, action, ci)
    for i in range(2):
        path = first.format(i=i) + ".1"
        assert type(rebuilt.get_submodule(path)) is type(converted.get_submodule(path)) is torch.nn.BatchNorm1d
    rebuilt.load_state_dict(converted.state_dict())


@pytest.mark.parametrize("name", ["phi3", "squeezebert"])
def test_before_second_sits_after_the_gate_product_and_identity_init_is_exact(name):
    model, ci, _ = _build(name)
    _, report = normsurgeon.insert_ffn_bn(model, ci, position="before-second", init="identity")
    assert len(report.inserted) == 2 and not report.skipped
    assert all(a.detail["hidden"] == 64 for a in report.inserted)  # the down projection's input: H, not 2 x H
    assert report.verify["passed"]
