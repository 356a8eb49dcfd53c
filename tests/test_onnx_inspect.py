"""`inspect` of .onnx graphs: fused norm ops and decomposed LayerNorm/RMSNorm, each with its axes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from normsurgeon import api


def _export(module, x, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], **kw)
    return path


class HandWritten(torch.nn.Module):
    """Two hand-written LayerNorms: ConvNeXt's channels-first one (mean over dim 1) and
    ``w * (x - u) / sqrt(var + eps)`` over the last dim (affine Mul before the Div)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.w2 = torch.nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        v = (x - u).pow(2).mean(1, keepdim=True)
        a = self.w * ((x - u) / torch.sqrt(v + 1e-6))
        u2 = x.mean(-1, keepdim=True)
        v2 = (x - u2).pow(2).mean(-1, keepdim=True)
        return a + self.w2 * (x - u2) / torch.sqrt(v2 + 1e-5)


class Rms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n = torch.nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        return self.n(x)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_channels_first_layernorm_reports_dim_1(tmp_path, exporter):
    kw = dict(dynamo=False, opset_version=17, dynamic_axes={"x": {0: "batch"}}) if exporter == "torchscript" \
        else dict(dynamo=True)
    path = _export(HandWritten(), torch.randn(2, 8, 4, 4), tmp_path / "h.onnx", **kw)
    report = api.inspect(path)
    assert [(s.kind, s.source, s.dims) for s in report.sites] == [("layernorm", "pattern", [-3]),
                                                                   ("layernorm", "pattern", [-1])]
    first, second = report.sites
    assert first.channels == 8 and "channels-first" in first.note
    assert second.channels == 4 and first.eps == pytest.approx(1e-6) and second.eps == pytest.approx(1e-5)


def test_rmsnorm_with_reciprocal_dynamo(tmp_path):
    path = _export(Rms(), torch.randn(2, 5, 16), tmp_path / "rms.onnx", dynamo=True, optimize=False)
    assert any(n.op_type == "Reciprocal" for n in onnx.load(str(path)).graph.node)
    (site,) = api.inspect(path).sites
    assert (site.kind, site.source, site.dims, site.channels) == ("rmsnorm", "pattern", [-1], 16)


def test_layernorm_op_and_decomposed_export(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(2, 3, 8)
    fused = api.inspect(_export(m, x, tmp_path / "ln17.onnx", dynamo=False, opset_version=17))
    decomposed = api.inspect(_export(m, x, tmp_path / "ln16.onnx", dynamo=False, opset_version=16))
    assert [(s.kind, s.source, s.dims, s.module_type) for s in fused.sites] == [
        ("layernorm", "op", [-1], "LayerNormalization")]
    assert [(s.kind, s.source, s.dims) for s in decomposed.sites] == [("layernorm", "pattern", [-1])]


def _graph(nodes, inits, shape, opset):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_fused_ops_with_their_axes():
    c = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "b", "m", "v")]
    w = numpy_helper.from_array(np.ones([4, 5, 5], np.float32), "w")
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["h"], name="bn"),
             helper.make_node("LayerNormalization", ["h", "w"], ["l"], axis=1, name="ln_axis1"),
             helper.make_node("RMSNormalization", ["l", "w"], ["y"], axis=-3, name="rms")]
    report = api.inspect(_graph(nodes, c + [w], ["N", 4, 5, 5], 23))
    got = {s.path: (s.kind, s.dims, s.channels) for s in report.sites}
    assert got == {"bn": ("batchnorm", [0, 2, 3], 4), "ln_axis1": ("layernorm", [-3, -2, -1], 100),
                   "rms": ("rmsnorm", [-3, -2, -1], 100)}
    assert "together" in report.sites[1].note
    assert report.inputs == [{"name": "x", "shape": ["N", 4, 5, 5], "dtype": "float32"}]


def test_levit_batchnorms_and_cli_json(tmp_path):
    from click.testing import CliRunner

    from normsurgeon import zoo
    from normsurgeon.cli import main

    model = zoo.levit()
    x = model.example_inputs().kwargs["pixel_values"]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(pixel_values=x).logits

    path = _export(Logits(), x, tmp_path / "levit.onnx", dynamo=False, opset_version=17,
                   training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    res = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["capture"].startswith("onnx")
    bns = [n for n in out["norms"] if n["kind"] == "batchnorm"]
    assert len(bns) == 27 and all({"path", "kind", "source"} <= set(n) for n in out["norms"])
    assert bns[0]["dims"] == [0, 2, 3] and bns[4]["dims"] == [0]  # a conv BN, then a token BN on [B*N, C]
