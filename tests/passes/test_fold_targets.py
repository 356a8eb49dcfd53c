"""The fold-target table and its matcher (passes/fold_targets.py), read directly: every row's math is
checked against real torch ops, and the torch reader finds each form a weighted op takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon import fold_math
from normsurgeon.graph.capture import program_nodes
from normsurgeon.passes import fold_targets as ft


def _scale_shift(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5), torch.randn(n, generator=g, dtype=torch.float64)


def test_every_row_names_fold_math_functions_that_exist():
    for r in ft.TABLE:
        assert r.after or r.before, r.name
        for name in (r.after, r.before):
            assert name is None or callable(getattr(fold_math, name)), (r.name, name)
        assert r.kind in ("linear", "linear_t", "conv", "conv_transpose")
    assert {r.name for r in ft.rows_for_onnx("Gemm")} == {"linear", "matmul"}
    assert [r.name for r in ft.rows_for_onnx("ConvTranspose")] == [f"conv_transpose{n}d" for n in (1, 2, 3)]


@pytest.mark.parametrize("name,position,make,call", [
    ("linear", "after", lambda: torch.randn(6, 4), lambda x, w, b: F.linear(x, w, b)),
    ("linear", "before", lambda: torch.randn(6, 4), lambda x, w, b: F.linear(x, w, b)),
    ("matmul", "after", lambda: torch.randn(4, 6), lambda x, w, b: x @ w + b),
    ("matmul", "before", lambda: torch.randn(4, 6), lambda x, w, b: x @ w + b),
    ("conv2d", "after", lambda: torch.randn(6, 2, 3, 3), lambda x, w, b: F.conv2d(x, w, b, groups=2)),
    ("conv2d", "before", lambda: torch.randn(6, 2, 3, 3), lambda x, w, b: F.conv2d(x, w, b, groups=2)),
    ("conv_transpose2d", "after", lambda: torch.randn(4, 3, 3, 3),
     lambda x, w, b: F.conv_transpose2d(x, w, b, groups=2)),
    ("conv_transpose2d", "before", lambda: torch.randn(4, 3, 3, 3),
     lambda x, w, b: F.conv_transpose2d(x, w, b, padding=2, groups=2)),
])
def test_row_math_is_exact(name, position, make, call):
    r = ft.row(name)
    w = make().double()
    groups = 2 if r.grouped else 1
    n_in, n_out = ft.in_channels(r.kind, tuple(w.shape), groups), ft.out_channels(r.kind, tuple(w.shape), groups)
    b = torch.randn(n_out, dtype=torch.float64)
    s, t = _scale_shift(n_out if position == "after" else n_in)
    x = torch.randn(2, n_in, 5, 5, dtype=torch.float64) if r.kind.startswith("conv") else \
        torch.randn(3, n_in, dtype=torch.float64)
    shape = (1, -1, 1, 1) if r.kind.startswith("conv") else (1, -1)
    if position == "after":
        expected = call(x, w, b) * s.view(shape) + t.view(shape)
    else:
        expected = call(x * s.view(shape) + t.view(shape), w, b)
    nw, nb = ft.fold(r, position, w, b, s, t, groups=groups)
    assert torch.allclose(call(x, nw, nb), expected, atol=1e-10)


def test_a_row_without_a_side_refuses_it():
    with pytest.raises(ValueError, match="does not fold after a mha_in_proj"):
        ft.fold(ft.row("mha_in_proj"), "after", torch.randn(6, 2), None, *_scale_shift(6))


class Decomposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x):  # a non-contiguous 3-D input: the decomposed linear is expand + bmm
        y = self.fc(x.transpose(1, 2))
        return self.bn(y.flatten(0, 1)).reshape(y.shape)


def test_read_torch_finds_a_decomposed_linear_behind_expand_and_bmm():
    ep = torch.export.export(Decomposed().eval(), (torch.randn(2, 8, 5),), strict=False).run_decompositions()
    nodes = program_nodes(ep)
    (bmm,) = [n for n in nodes if n.op == "bmm"]
    r = ft.read_torch(bmm)
    assert r is not None and r.row.name == "linear_decomposed" and r.weight.param == "fc.weight"
    assert [n.op for n in r.weight_chain][0] in ("permute", "t") and r.bias_index is None
    (bn,) = [n for n in nodes if n.op == "_native_batch_norm_legit_no_training"]
    reach, why = ft.match_after(bn)
    assert reach is not None and reach.node is bmm, why


def test_max_pool_is_followed_and_its_sign_checked():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    ep = torch.export.export(model, (torch.randn(2, 4, 4, 4),), strict=False)
    nodes = program_nodes(ep)
    (bn,) = [n for n in nodes if n.op == "batch_norm"]
    reaches, why = ft.match_before(bn)
    assert reaches and [n.op for n in reaches[0].chain] == ["max_pool2d", "flatten"], why
    ch, why = ft.consumer_channels("3", reaches[0], 4)
    assert ch is not None and ch.stride == 4, why
    assert ft.commute_reason(reaches[0].chain, torch.tensor([1.0, 0.5, 0.0, 2.0])) is None
    why = ft.commute_reason(reaches[0].chain, torch.tensor([1.0, -0.5, 1.0, -2.0]))
    assert "negative on 2 of 4 channels (channel 1 first)" in why
