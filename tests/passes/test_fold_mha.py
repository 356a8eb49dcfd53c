"""Folding BatchNorms into torch's own attention (``nn.MultiheadAttention``).

``nn.MultiheadAttention`` keeps its q/k/v projection as one packed ``in_proj_weight`` (3E, E) read by
``F.linear`` from inside the attention module, and its output projection ``out_proj`` is a Linear
it never calls (``F.linear(x, out_proj.weight, out_proj.bias)``). In eval under ``no_grad`` it takes a
fused fast path (``torch._native_multi_head_attention``) that reads the same four parameters; with
grad enabled it runs the decomposed path. A fold must be right on both.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.calibrate import calibrate, synthetic_batches
from normsurgeon.inputs import CallArgs
from normsurgeon.outputs import compare_outputs
from normsurgeon.passes.fold import fold

from test_fold import bns, randomize

D = 16


class PreNormBlock(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h)[0]  # need_weights=True (the default): another slow path
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class HandWritten(nn.Module):
    """A pre-norm transformer whose final norm is the model output."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(PreNormBlock(), PreNormBlock())
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(self.blocks(x))


class Encoder(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(self.enc(x))


def _converted(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, CallArgs]:
    ci = CallArgs((x,))
    bn_model, _ = normsurgeon.convert(model.eval(), to="bn", example_inputs=ci)
    calibrate(bn_model, synthetic_batches(ci, 3))
    return bn_model.eval(), ci


def _both_paths_match(model: nn.Module, folded: nn.Module, x: torch.Tensor, monkeypatch) -> int:
    """Outputs agree with grad enabled (decomposed attention) and under no_grad (the fused fast path,
    where its conditions hold); returns how many fast-path calls the no_grad run made."""
    calls = []
    native = torch._native_multi_head_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", counting)
    for fresh in (x, torch.randn(3, *x.shape[1:])):
        assert compare_outputs(model(fresh), folded(fresh)).max_rel_error <= 1e-5  # grad enabled
        with torch.no_grad():
            assert compare_outputs(model(fresh), folded(fresh)).max_rel_error <= 1e-5
    return len(calls)


def test_hand_written_pre_norm_transformer_folds_every_bn_but_the_final_one(monkeypatch):
    torch.manual_seed(0)
    model, ci = _converted(HandWritten(), torch.randn(2, 5, D))
    folded, report = fold(model, ci)
    assert report.passed and report.verify.max_rel_error <= 1e-5
    assert [(a.path, a.reason) for a in report.skipped] == [("norm", report.skipped[0].reason)]
    assert "model output" in report.skipped[0].reason
    into = {a.path: (a.detail["into"], a.detail["position"]) for a in report.folded}
    assert into == {"blocks.0.ln1": (["blocks.0.attn"], "before"), "blocks.0.ln2": (["blocks.0.fc1"], "before"),
                    "blocks.1.ln1": (["blocks.1.attn"], "before"), "blocks.1.ln2": (["blocks.1.fc1"], "before")}
    assert bns(folded) == ["norm"]
    assert _both_paths_match(model, folded, ci.args[0], monkeypatch) > 0  # the fast path did run


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_layer_norm_first_folds_every_bn_but_the_final_one(batch_first, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 5, D) if batch_first else torch.randn(5, 2, D)
    model, ci = _converted(Encoder(batch_first), x)
    folded, report = fold(model, ci)
    assert report.passed and report.verify.max_rel_error <= 1e-5
    assert [a.path for a in report.skipped] == ["norm"]
    into = {a.path: a.detail["into"] for a in report.folded}
    assert into == {f"enc.layers.{i}.{n}": [f"enc.layers.{i}.{t}"] for i in range(2)
                    for n, t in (("norm1", "self_attn"), ("norm2", "linear1"))}
    fast = _both_paths_match(model, folded, x, monkeypatch)
    assert (fast > 0) == batch_first  # the MHA fast path needs batch_first


class AttnThenBN(nn.Module):
    """A BN right after the attention's output: it folds into ``out_proj`` (a Linear producer)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.bn0 = nn.BatchNorm1d(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, bias=bias)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, x):  # x: (B, T, D)
        h = self.bn0(torch.relu(x).transpose(1, 2)).transpose(1, 2)
        y = self.attn(h, h, h, need_weights=False)[0]
        return torch.relu(self.bn(y.transpose(1, 2)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_bn_before_and_after_attention_fold_into_in_proj_and_out_proj(bias, monkeypatch):
    model = randomize(AttnThenBN(bias))
    x = torch.randn(2, 5, D)
    folded, report = fold(model, CallArgs((x,)))
    assert report.passed
    assert {a.path: (a.detail["into"], a.detail["position"]) for a in report.folded} == {
        "bn0": (["attn"], "before"), "bn": (["attn.out_proj"], "after")}
    assert bns(folded) == []
    # a created in_proj_bias makes the fast path possible; it needs out_proj.bias too
    assert folded.attn.in_proj_bias is not None and folded.attn.out_proj.bias is not None
    assert _both_paths_match(model, folded, x, monkeypatch) > 0
    assert model.attn.in_proj_bias is None or bias  # the input model is untouched


class CrossAttention(nn.Module):
    def __init__(self, kdim=None):
        super().__init__()
        self.bn = nn.BatchNorm1d(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, x, memory):
        q = self.bn(torch.relu(x).transpose(1, 2)).transpose(1, 2)
        return self.attn(q, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("kdim", [None, 8], ids=["packed", "separate-weights"])
def test_bn_feeding_only_the_query_is_refused_with_its_reason(kdim):
    model = randomize(CrossAttention(kdim))
    ci = CallArgs((torch.randn(2, 5, D), torch.randn(2, 3, kdim or D)))
    folded, report = fold(model, ci)
    (action,) = report.actions
    assert action.kind == "skipped" and "MultiheadAttention" in action.reason
    assert "query" in action.reason
    assert compare_outputs(ci.call(model), ci.call(folded)).max_rel_error == 0


class SharedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.attn = nn.BatchNorm1d(D), nn.MultiheadAttention(D, 2, batch_first=True)

    def forward(self, x):
        h = self.bn(torch.relu(x).transpose(1, 2)).transpose(1, 2)
        return self.attn(h, h, h)[0] + self.attn(x, x, x)[0]


def test_attention_called_twice_is_refused():
    model = randomize(SharedAttention())
    folded, report = fold(model, CallArgs((torch.randn(2, 5, D),)))
    (action,) = report.actions
    assert action.kind == "skipped" and "attn is called 2 times (shared)" in action.reason
