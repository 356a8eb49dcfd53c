"""A module whose forward is exactly one norm op (plus casts) is that norm: OLMo's OlmoLayerNorm
(F.layer_norm without affine, upcast to float32 and back) is replaced whole."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import normsurgeon
from normsurgeon.nn import TokenBatchNorm


def test_olmo_layernorms_convert_5_of_5():
    torch.manual_seed(0)
    cfg = transformers.OlmoConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = transformers.OlmoModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    paths = [p for p, m in model.named_modules() if type(m).__name__ == "OlmoLayerNorm"]
    assert len(paths) == 5
    converted, report = normsurgeon.convert(model, to="bn", example_inputs=(ids,))
    assert sorted(a.path for a in report.converted) == sorted(paths) and not report.skipped
    for p in paths:
        bn = converted.get_submodule(p)
        assert isinstance(bn, TokenBatchNorm) and not bn.affine  # OLMo's LN has no affine
    converted.train()
    converted(ids).last_hidden_state.square().mean().backward()  # it trains


class NormTimesTwo(nn.Module):
    """F.layer_norm and more: not a norm module of its own, so module replacement must not swap it."""

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],)) * 2


def test_a_module_doing_more_than_one_norm_op_is_not_replaced():
    model = nn.Sequential(nn.Linear(8, 8), NormTimesTwo(), nn.Linear(8, 4)).eval()
    _, report = normsurgeon.convert(model, to="bn", example_inputs=torch.randn(2, 5, 8))
    (skip,) = report.skipped
    assert "module replacement cannot swap it" in skip.reason and not report.converted
