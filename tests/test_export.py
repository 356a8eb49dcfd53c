"""ONNX export, ONNX Runtime verification and norm-op counting, on real architectures from the zoo."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from normsurgeon import zoo
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError, VerificationError
from normsurgeon.find import inspect
from normsurgeon.onnx import export as onnx_export
from normsurgeon.onnx import (count_norm_ops, export_onnx, load_inputs_file, optimized_norm_ops,
                                     verify_onnx)


# ---------------------------------------------------------------------------------------------- models

class Branchy(torch.nn.Module):
    """Data-dependent control flow: torch.export refuses it, the TorchScript tracer bakes in one branch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.lin(x))
        return -self.lin(x)


def branchy():
    torch.manual_seed(0)
    model = Branchy().eval()
    model.example_inputs = lambda: (torch.ones(2, 4),)
    return model


class _Eig(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x).real


class NoOnnx(torch.nn.Module):
    """An op neither exporter can convert, inside a named submodule."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Sequential(torch.nn.Identity(), _Eig())

    def forward(self, x):
        return self.head(x)


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    model = zoo.vit()
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    report = export_onnx(model, model.example_inputs(), path)
    return model, path, report


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    model = zoo.bert()
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    report = export_onnx(model, model.example_inputs(), path)  # dynamic batch and sequence by default
    return model, path, report


def layernorms(model):
    """The model's LayerNorm modules: what the exported graph should hold as LayerNormalization ops."""
    return sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------- export

def test_resnet_export_verifies_and_exporter_folds_conv_bn(tmp_path):
    model = zoo.resnet()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    report = export_onnx(model, model.example_inputs(), tmp_path / "r.onnx")
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.verify.passed and report.verify.max_abs_error < 1e-4
    assert len(report.verify.checks) == 6  # example + 3 random + batch 1 and 8
    # every BN of this ResNet follows a Conv: the dynamo exporter folds them all
    assert report.norm_ops.get("BatchNormalization", 0) == 0
    onnx.checker.check_model(str(tmp_path / "r.onnx"))
    data = report.to_json()
    assert data["onnx"] == str(tmp_path / "r.onnx") and data["exporter"] == "dynamo"
    assert {"max_abs_error", "max_rel_error", "cosine", "passed", "inputs_checked"} <= set(data["verify"])
    assert data["verify"]["inputs_checked"] == 6
    assert data["dynamic"] == {"pixel_values": {"0": "batch"}} and data["static_reason"] is None
    assert data["dynamic_sizes_verified"] == {"batch": [1, 8]}
    assert data["outputs"][0]["name"] == "logits"
    json.dumps(data)  # plain JSON
    assert not list(tmp_path.glob(".r.onnx.*")), "temporary files left behind"


def test_vit_export_counts_layernorms_and_ort_fusions(vit_export):
    model, path, report = vit_export
    assert report.verify.passed
    assert report.norm_ops == {"LayerNormalization": layernorms(model)}
    # ORT fuses residual Add + LayerNorm into SkipLayerNormalization; the total stays the same
    assert report.norm_ops_optimized.get("SkipLayerNormalization", 0) >= 1
    assert sum(report.norm_ops_optimized.values()) == layernorms(model)
    assert count_norm_ops(path) == report.norm_ops
    assert optimized_norm_ops(path) == report.norm_ops_optimized
    titles = [t.title for t in report.tables()]
    assert any("Verification" in t for t in titles) and any("Normalization ops" in t for t in titles)


def test_bert_dynamic_batch_and_seq_by_default(bert_export):
    model, path, report = bert_export
    assert report.inputs == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert report.dynamic_axes == {"input_ids": {0: "batch", 1: "sequence"}}
    # two other sizes of each dynamic dim; sequences stay within max_position_embeddings (32)
    assert report.dynamic_sizes == {"batch": [1, 8], "sequence": [6, 24]}
    shapes = {c.name: c.shapes["input_ids"] for c in report.verify.checks}
    assert shapes["batch=1 sequence=6"] == [1, 6] and shapes["batch=8 sequence=24"] == [8, 24]
    assert report.verify.passed, report.verify.to_json()
    assert [o["name"] for o in report.outputs] == ["last_hidden_state", "pooler_output"]
    assert report.norm_ops == {"LayerNormalization": layernorms(model)}


def test_levit_keeps_its_batchnorms(tmp_path):
    model = zoo.levit()
    sites = [s for s in inspect(model, model.example_inputs()).sites if s.kind == "batchnorm"]
    kept = [s for s in sites if not s.producer.endswith("(conv2d)")]
    assert kept and len(kept) < len(sites)
    report = export_onnx(model, model.example_inputs(), tmp_path / "levit.onnx")
    assert report.verify.passed
    # LeViT's token BNs (Linear -> reshape -> BN) and its head BN survive both the exporter and ONNX
    # Runtime; the exporter folds those right after a Conv (as for ResNet above)
    assert report.norm_ops == {"BatchNormalization": len(kept)}
    assert report.norm_ops_optimized == {"BatchNormalization": len(kept)}


def test_transformer_encoder_batch_and_sequence_from_batch_first(tmp_path):
    model = zoo.transformer_encoder()  # nn.TransformerEncoder, batch_first=True: (B, T, C)
    report = export_onnx(model, model.example_inputs(), tmp_path / "te.onnx", dynamic_seq=True)
    assert report.inputs[0]["shape"] == ["batch", "sequence", 32]
    assert [c.shapes["input_0"] for c in report.verify.checks[-2:]] == [[1, 5, 32], [8, 20, 32]]
    assert report.verify.passed
    assert report.norm_ops == {"LayerNormalization": layernorms(model)}
    static = export_onnx(model, model.example_inputs(), tmp_path / "te2.onnx", static=True, num_random=0)
    assert static.inputs[0]["shape"] == [2, 10, 32] and static.dynamic_axes == {}
    assert static.static_reason.startswith("--static") and len(static.verify.checks) == 1
    vit = zoo.vit()
    with pytest.raises(NormSurgeonError, match="no sequence input"):
        export_onnx(vit, vit.example_inputs(), tmp_path / "v.onnx", dynamic_seq=True)


def test_fallback_to_torchscript_is_reported_and_verification_catches_the_baked_branch(tmp_path):
    model = branchy()
    report = export_onnx(model, model.example_inputs(), tmp_path / "b.onnx")
    assert report.exporter == "torchscript"
    assert "data-dependent" in report.fallback_reason
    assert any("TracerWarning" in n for n in report.notes)
    by_name = {c.name: c for c in report.verify.checks}
    assert by_name["example"].passed  # the traced branch is right for the example inputs ...
    assert not report.verify.passed  # ... and wrong for random inputs whose sum is negative
    # a failed export never sits at the output path looking like a good one (issue 12.4) ...
    assert not (tmp_path / "b.onnx").exists() and not report.written
    assert not list(tmp_path.iterdir())  # ... nor its temporary directory
    assert any("nothing written" in n for n in report.notes)
    kept = export_onnx(model, model.example_inputs(), tmp_path / "b.onnx", keep_failed=True, num_random=1)
    assert not kept.verify.passed and kept.written and (tmp_path / "b.onnx").exists()


def test_export_failing_with_both_exporters_names_the_op_and_module(tmp_path):
    with pytest.raises(NormSurgeonError) as e:
        export_onnx(NoOnnx().eval(), torch.randn(2, 3, 3), tmp_path / "x.onnx")
    msg = str(e.value)
    assert "dynamo and torchscript" in msg
    assert "aten.linalg_eig" in msg and "head.1 (_Eig)" in msg
    assert "--opset" in msg and "--debug" in msg
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.iterdir())


def test_large_models_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    model = zoo.transformer_encoder()
    report = export_onnx(model, model.example_inputs(), tmp_path / "te.onnx", num_random=1)
    assert report.external_data == "te.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["te.onnx", "te.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "te.onnx"))
    from onnx.external_data_helper import uses_external_data
    stored = onnx.load(str(tmp_path / "te.onnx"), load_external_data=False)
    assert any(uses_external_data(t) for t in stored.graph.initializer)
    assert report.verify.passed
    assert verify_onnx(model, model.example_inputs(), tmp_path / "te.onnx", num_random=0).passed


def test_output_rules(tmp_path, vit_export):
    model, path, _ = vit_export
    with pytest.raises(NormSurgeonError, match="exists; pass force=True"):
        export_onnx(model, model.example_inputs(), path)
    with pytest.raises(NormSurgeonError, match="must end in .onnx"):
        export_onnx(model, model.example_inputs(), tmp_path / "m.pt")
    with pytest.raises(NormSurgeonError, match="does not exist"):
        export_onnx(model, model.example_inputs(), tmp_path / "nope" / "m.onnx")


# ---------------------------------------------------------------------------------------------- verify

def test_tampered_onnx_fails_verification(tmp_path, vit_export):
    model, path, _ = vit_export
    inputs = model.example_inputs()
    assert verify_onnx(model, inputs, path, num_random=1).passed
    m = onnx.load(str(path))
    target = max((i for i in m.graph.initializer if i.data_type == TensorProto.FLOAT),
                 key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(target).copy()
    target.CopyFrom(numpy_helper.from_array(arr * 1.5 + 0.1, target.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(m, str(tampered))
    report = verify_onnx(model, inputs, tampered, num_random=1)
    assert not report.passed
    assert report.max_abs_error > 1e-4 and report.max_rel_error > 1e-4
    assert report.to_json()["passed"] is False


def test_onnx_of_another_model_is_rejected(bert_export):
    _, bert_path, _ = bert_export
    resnet = zoo.resnet()
    with pytest.raises(NormSurgeonError, match="does not belong"):
        verify_onnx(resnet, resnet.example_inputs(), bert_path)


def test_user_inputs_from_files(tmp_path, bert_export):
    model, path, _ = bert_export
    inputs = model.example_inputs()
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(5))
    np.savez(tmp_path / "in.npz", input_ids=ids.numpy())
    extra = load_inputs_file(tmp_path / "in.npz", inputs)
    report = verify_onnx(model, inputs, path, extra_inputs=extra, num_random=0)
    assert report.checks[-1].name == "user inputs 1" and report.checks[-1].shapes["input_ids"] == [1, 20]
    assert report.passed
    torch.save({"pixel_values": torch.randn(1, 3, 32, 32)}, tmp_path / "wrong.pt")
    with pytest.raises(NormSurgeonError, match="do not match the model's"):
        load_inputs_file(tmp_path / "wrong.pt", inputs)
    np.save(tmp_path / "rank.npy", np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(NormSurgeonError, match="2-d inputs"):
        load_inputs_file(tmp_path / "rank.npy", inputs)


def test_user_inputs_must_fit_static_export(tmp_path):
    model = zoo.transformer_encoder()
    bad = (torch.randn(3, 10, 32),)
    with pytest.raises(NormSurgeonError, match="every dimension of it is static"):
        export_onnx(model, model.example_inputs(), tmp_path / "te.onnx", extra_inputs=[bad], static=True)
    with pytest.raises(NormSurgeonError, match=r"dim 1 \(sequence\)"):
        export_onnx(model, model.example_inputs(), tmp_path / "te.onnx", extra_inputs=[(torch.randn(3, 10, 8),)])
    assert not (tmp_path / "te.onnx").exists()


# ---------------------------------------------------------------------------------------------- counting

def _decomposed_graph() -> onnx.ModelProto:
    d = 8
    inits = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, dtype=np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, d).astype(np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(d, dtype=np.float32), "beta"),
             numpy_helper.from_array(np.ones(4, dtype=np.float32), "bn_scale"),
             numpy_helper.from_array(np.zeros(4, dtype=np.float32), "bn_bias")]
    n = helper.make_node
    nodes = [
        # LayerNorm written out: ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div
        n("ReduceMean", ["x", "axes"], ["mu"]), n("Sub", ["x", "mu"], ["d"]), n("Pow", ["d", "two"], ["d2"]),
        n("ReduceMean", ["d2", "axes"], ["var"]), n("Add", ["var", "eps"], ["ve"]), n("Sqrt", ["ve"], ["sd"]),
        n("Div", ["d", "sd"], ["nrm"]), n("Mul", ["nrm", "gamma"], ["ng"]), n("Add", ["ng", "beta"], ["ln"]),
        # RMSNorm written out (Llama style): x*x -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul
        n("Mul", ["ln", "ln"], ["sq"]), n("ReduceMean", ["sq", "axes"], ["ms"]), n("Add", ["ms", "eps"], ["mse"]),
        n("Sqrt", ["mse"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]), n("Mul", ["ln", "inv"], ["rn"]),
        n("Mul", ["rn", "gamma"], ["y0"]),
        # a Sqrt that is no normalization
        n("Abs", ["y0"], ["a"]), n("Sqrt", ["a"], ["y1"]),
        # a fused BatchNormalization (channels = dim 1)
        n("BatchNormalization", ["y1", "bn_scale", "bn_bias", "bn_bias", "bn_scale"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_count_norm_ops_finds_decomposed_norms(tmp_path):
    model = _decomposed_graph()
    expected = {"BatchNormalization": 1, "decomposed_layernorm": 1, "decomposed_rmsnorm": 1}
    assert count_norm_ops(model) == expected
    onnx.save(model, str(tmp_path / "d.onnx"))
    assert count_norm_ops(tmp_path / "d.onnx") == expected
    # ONNX Runtime fuses the written-out LayerNorm into one LayerNormalization, not this RMSNorm variant
    assert optimized_norm_ops(tmp_path / "d.onnx") == {"BatchNormalization": 1, "LayerNormalization": 1,
                                                        "decomposed_rmsnorm": 1}


def test_count_norm_ops_inside_subgraphs():
    inner = helper.make_graph([helper.make_node("LayerNormalization", ["x", "s"], ["o"], axis=-1)], "then", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 4])])
    outer = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(outer, opset_imports=[helper.make_opsetid("", 18)])
    assert count_norm_ops(model) == {"LayerNormalization": 2}


def test_count_norm_ops_bad_file(tmp_path):
    (tmp_path / "x.onnx").write_text("not onnx")
    with pytest.raises(NormSurgeonError, match="not a readable ONNX model"):
        count_norm_ops(tmp_path / "x.onnx")


# ---------------------------------------------------------------------------------------------- CLI

def _one_error_line(result) -> str:
    err = result.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_export_json(tmp_path):
    out = tmp_path / "r.onnx"
    result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:resnet", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert data["onnx"] == str(out) and data["exporter"] == "dynamo"
    assert data["verify"]["passed"] is True and data["verify"]["max_abs_error"] < 1e-4
    assert data["norm_ops"] == {} and isinstance(data["norm_ops_optimized"], dict)
    assert out.is_file()


def test_cli_export_refuses_existing_output(tmp_path):
    out = tmp_path / "r.onnx"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:resnet", "-o", str(out)])
    assert result.exit_code == 2
    assert "--force" in _one_error_line(result)
    assert out.read_bytes() == b"keep me"


def test_cli_export_unwritable_dir(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(locked)
                            else real_access(p, mode, *a, **k))
    try:
        result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:resnet", "-o", str(locked / "r.onnx")])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2
    assert "not writable" in _one_error_line(result)
    assert not list(locked.iterdir())


def test_cli_export_exit_1_when_verification_fails(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    out = tmp_path / "b.onnx"
    result = CliRunner().invoke(main, ["export", "test_export:branchy", "-o", str(out), "--json"])
    assert result.exit_code == 1, result.output + result.stderr
    data = json.loads(result.stdout)
    assert data["verify"]["passed"] is False and data["exporter"] == "torchscript"
    assert data["written"] is False and not out.exists()
    assert "disagrees with PyTorch" in _one_error_line(result) and "nothing written" in _one_error_line(result)
    result = CliRunner().invoke(main, ["export", "test_export:branchy", "-o", str(out), "--keep-failed"])
    assert result.exit_code == 1 and out.exists()
    assert "written for inspection" in _one_error_line(result)


def test_cli_export_bad_inputs_file(tmp_path):
    bad = tmp_path / "in.npz"
    np.savez(bad, input_ids=np.zeros((2, 12), dtype=np.int64))
    result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:resnet", "-o", str(tmp_path / "r.onnx"),
                                       "--inputs", str(bad)])
    assert result.exit_code == 2
    assert "do not match the model's ['pixel_values']" in _one_error_line(result)
    assert not (tmp_path / "r.onnx").exists()


def test_cli_export_fold(tmp_path):
    out = tmp_path / "levit.onnx"
    result = CliRunner().invoke(main, ["export", "normsurgeon.zoo:levit", "-o", str(out), "--fold", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in zoo.levit().modules())
    assert data["norm_ops_unfolded"] == {"BatchNormalization": bns}  # counted on the graph, not exported twice
    assert data["norm_ops"].get("BatchNormalization", 0) == bns - data["fold"]["summary"]["folded"]
    assert data["verify"]["passed"] and data["fold"]["verify"]["passed"]


def test_export_fold_exports_once(tmp_path, monkeypatch):
    from normsurgeon import api
    from normsurgeon.onnx import export as export_mod

    calls = []
    real = export_mod._export_dynamo

    def counting(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(export_mod, "_export_dynamo", counting)
    model = zoo.resnet()
    report = api.export(model, model.example_inputs(), tmp_path / "r.onnx", fold=True, num_random=0)
    assert len(calls) == 1 and report.fold.passed and report.verify.passed


class Drifting(torch.nn.Module):
    """Conv -> BN whose output drifts with every call (a counter buffer): no two runs agree, so the
    fold's verification fails for real (even with nothing folded)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x)) + self.calls


def drifting():
    torch.manual_seed(0)
    model = Drifting().eval()
    model.example_inputs = lambda: (torch.randn(2, 3, 4, 4),)
    return model


def test_cli_export_fold_honours_the_folds_verification(tmp_path, monkeypatch):
    """Issue 12.1: a fold whose own verification failed must not be exported (exit 1, nothing written)."""
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    out = tmp_path / "d.onnx"
    result = CliRunner().invoke(main, ["export", "test_export:drifting", "-o", str(out), "--fold", "--json"])
    assert result.exit_code == 1, result.output + result.stderr
    data = json.loads(result.stdout)  # the fold report, as `fold --json` prints it
    assert data["verify"]["passed"] is False and data["summary"]["rolled_back"] == 1
    assert "do not match" in _one_error_line(result) and not out.exists()
    with pytest.raises(VerificationError):
        from normsurgeon import api
        api.export(drifting(), drifting().example_inputs(), tmp_path / "d.onnx", fold=True)
    assert not out.exists()


def test_export_leaves_module_modes_alone(tmp_path):
    model = zoo.transformer_encoder()
    model.layers[1].train()  # a user's mixed modes survive export and verification
    export_onnx(model, model.example_inputs(), tmp_path / "te.onnx", num_random=0)
    assert not model.training and model.layers[1].training and not model.layers[0].training
