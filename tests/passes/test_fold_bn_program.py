"""The program fold rule (passes/fold_bn_program.py) and its pass (passes.fold.fold_program): folding a torch.export program itself: .pt2 in, .pt2 out, every foldable BatchNorm gone from its graph."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind

import normsurgeon
from normsurgeon import fold_math
from normsurgeon.cli import main
from normsurgeon.passes.fold import fold, fold_program
from normsurgeon.inputs import CallArgs
from normsurgeon.outputs import compare_outputs
from normsurgeon.passes.fold_bn_program import count_batch_norms

from test_fold import Consumer, MatmulBlock, NonLin, PitchTracker, UsedTwice, WeightReadTwice, randomize

img = torch.randn(2, 3, 8, 8)


def export(model: nn.Module, *args, dynamic: bool = False, **kwargs) -> torch.export.ExportedProgram:
    shapes = None
    if dynamic:
        batch = Dim("batch", min=1, max=64)
        shapes = tuple({0: batch} for _ in args)
    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)


def run(ep: torch.export.ExportedProgram, ci: CallArgs):
    with torch.no_grad():
        return ci.call(ep.module())


def rel(ep_a, ep_b, ci: CallArgs) -> float:
    return compare_outputs(run(ep_a, ci), run(ep_b, ci)).max_rel_error


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def fold_one(model: nn.Module, *args: torch.Tensor, dynamic: bool = False):
    """Export a randomized model, fold the program; returns (original, folded, report, the BN's action)."""
    ep = export(randomize(model), *args, dynamic=dynamic)
    folded, report = fold_program(ep)
    assert report.passed, report.summary()
    (action,) = [a for a in report.actions if a.path == "bn"]
    return ep, folded, report, action


def roundtrip(ep, tmp_path, name="p.pt2"):
    path = tmp_path / name
    torch.export.save(ep, path)
    return torch.export.load(path)


# --- the zoo, end to end through the CLI ----------------------------------------------------------------

ZOO_BN = ["levit", "resnet", "mobilenet_v2", "efficientnet", "regnet", "mobilevit"]


@pytest.mark.parametrize("name", ZOO_BN)
def test_zoo_pt2_folds_like_the_module_and_exports_without_batchnorm(zoo_model, name, tmp_path):
    model, ci = zoo_model(name)
    src, out = tmp_path / f"{name}.pt2", tmp_path / f"{name}_folded.pt2"
    torch.export.save(torch.export.export(model, ci.args, ci.kwargs, strict=False), src)
    code, stdout, stderr = cli("fold", src, "-o", out, "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["verify"]["passed"] and data["output"] == str(out)
    original, folded = torch.export.load(src), torch.export.load(out)
    _, module_report = fold(model, ci, verify=False)
    left = count_batch_norms(original) - len(module_report.folded)
    assert count_batch_norms(original) > 0 and count_batch_norms(folded) == left == 0
    assert sorted(f["norm"] for f in data["folded"]) == sorted(a.path for a in module_report.folded)
    fresh = ci.like(torch.Generator().manual_seed(11))
    assert rel(original, folded, fresh) <= 1e-5
    if name == "levit":  # the ONNX export is the slow part: LeViT's token BNs are what the exporter keeps
        code, stdout, stderr = cli("export", out, "-o", tmp_path / f"{name}.onnx", "--json")
        assert code == 0, stderr
        exported = json.loads(stdout)
        assert exported["verify"]["passed"] and "BatchNormalization" not in exported["norm_ops"]
    if name == "resnet":  # export --fold on a .pt2 folds the program itself
        code, stdout, stderr = cli("export", src, "--fold", "-o", tmp_path / f"{name}.onnx", "--json")
        assert code == 0, stderr
        exported = json.loads(stdout)
        assert exported["fold"]["summary"]["folded"] == len(module_report.folded)
        assert exported["verify"]["passed"] and "BatchNormalization" not in exported["norm_ops"]


@pytest.mark.parametrize("name", ZOO_BN)
def test_decomposed_zoo_program_folds_as_many_as_the_module(zoo_model, name):
    """After run_decompositions() (native batch norms, convolution, addmm/mm, expand + bmm) the program
    fold still matches the module fold's count, verified: the decomposed LeViT folds 27 of 27."""
    model, ci = zoo_model(name)
    _, module_report = fold(model, ci, verify=False)
    ep = torch.export.export(model, ci.args, ci.kwargs, strict=False).run_decompositions()
    folded, report = fold_program(ep)
    assert report.passed, report.summary()
    assert sorted(a.path for a in report.folded) == sorted(a.path for a in module_report.folded)
    assert count_batch_norms(folded) == count_batch_norms(ep) - len(module_report.folded) == 0
    if name == "levit":
        assert len(report.folded) == 27


# --- patterns -------------------------------------------------------------------------------------------

def test_created_bias_is_a_registered_parameter_and_every_consumer_accepts_the_program(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4, bias=False), nn.BatchNorm1d(4))
    ep = export(randomize(model), img, dynamic=True)
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    folded, report = fold_program(ep)
    assert [(a.path, a.detail["into"]) for a in report.folded] == [("1", ["0"]), ("5", ["4"])]
    assert report.passed and report.verified_inputs == 4  # example, 2 random, another batch size
    specs = {s.target: s for s in folded.graph_signature.input_specs}
    for target in ("0.bias", "4.bias"):
        assert specs[target].kind == InputKind.PARAMETER and isinstance(folded.state_dict[target], nn.Parameter)
        assert any(n.op == "placeholder" and n.name == specs[target].arg.name for n in folded.graph.nodes)
    assert not any(t and t.startswith(("1.", "5.")) for t in specs) and not any(k.startswith(("1.", "5."))
                                                                         for k in folded.state_dict)
    assert count_batch_norms(folded) == 0 and count_batch_norms(ep) == 2  # the input program is untouched
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items())
    loaded = roundtrip(folded, tmp_path)
    (x,) = [n for n in loaded.graph.nodes if n.op == "placeholder" and n.name == "input"]
    assert not isinstance(x.meta["val"].shape[0], int) and loaded.range_constraints  # the batch stays dynamic
    x5 = CallArgs((torch.randn(5, 3, 8, 8),))
    assert rel(ep, loaded, x5) <= 1e-5
    assert rel(ep, loaded.run_decompositions(), x5) <= 1e-5
    assert rel(ep, fold_program(loaded)[0], x5) <= 1e-5  # folding again is a no-op that verifies
    onnx = torch.onnx.export(loaded, dynamo=True)
    assert not any(n.op_type == "BatchNormalization" for n in onnx.model_proto.graph.node)


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.q, self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8, bias=False)

    def forward(self, x):  # (B, T, C) token BN, then attention-style fan-out
        y = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return torch.softmax(self.q(y) @ self.k(y).transpose(1, 2), -1) @ self.v(y)


class TokenBN(nn.Module):
    """LeViT's pattern: a Linear on (B, T, C), BN over the flattened tokens, reshaped back."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 12), nn.BatchNorm1d(12)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(self.bn(y.flatten(0, 1)).reshape_as(y))


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 3, bias=False), nn.BatchNorm2d(3)  # equal sizes: the axis is tracked

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)))


class BNThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


class ConvT(nn.Module):
    def __init__(self):
        super().__init__()
        self.convt, self.bn = nn.ConvTranspose2d(3, 6, 3, groups=3, bias=False), nn.BatchNorm2d(6, affine=False)

    def forward(self, x):
        return self.bn(self.convt(x))


class FlattenHead(nn.Module):
    """BN → flatten → Linear: the BN's channels merged with H·W in the Linear's input."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.bn(torch.relu(x)).flatten(1))


class OneFeature(nn.Module):
    """A one-channel BN on (B, 1, L) before a Linear over L: a scalar map on any axis."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(1), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc(self.bn(torch.relu(x)))


class BNThenConvT(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.bn, self.convt = nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, **kw)

    def forward(self, x):
        return self.convt(self.bn(torch.relu(x)))


class PoolHead(nn.Module):
    """conv → ReLU → BN → max-pool → flatten → Linear: the BN folds through the pool (positive scales)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.bn(torch.relu(self.conv(x))), 2).flatten(1))


@pytest.mark.parametrize("model,x,position,into,via", [
    (FlattenHead, img, "before", ["fc"], ["flatten"]),
    (OneFeature, torch.randn(2, 1, 7), "before", ["fc"], []),
    (lambda: BNThenConvT(padding=2, groups=1), img, "before", ["convt"], []),
    (PoolHead, img, "before", ["fc"], ["max_pool2d", "flatten"]),
    (QKV, torch.randn(2, 3, 16), "before", ["k", "q", "v"], []),
    (TokenBN, torch.randn(2, 5, 6), "after", ["fc"], ["flatten"]),
    (ChannelsLast, torch.randn(2, 3, 3, 3), "after", ["fc"], ["permute"]),
    (BNThenConv, img, "before", ["conv"], []),
    (ConvT, img, "after", ["convt"], []),
], ids=["flatten-head", "one-feature", "conv-transpose-consumer", "max-pool", "qkv-fan-out", "token-bn", "permute",
        "unpadded-conv-consumer", "conv-transpose-affine-free"])
def test_patterns_fold_exactly(model, x, position, into, via):
    ep, folded, report, action = fold_one(model(), x, dynamic=True)
    assert action.kind == "folded" and action.detail["position"] == position
    assert sorted(action.detail["into"]) == into and action.detail["via"] == via
    assert count_batch_norms(folded) == 0
    assert rel(ep, folded, CallArgs((torch.randn(3, *x.shape[1:]),))) <= 1e-5


class BufferWeights(nn.Module):
    """Frozen weights held as buffers: the bias the fold creates must be a buffer too (placeholders stay grouped)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(F.conv2d(x, self.w)))


def test_created_bias_takes_the_kind_of_its_weight(tmp_path):
    ep, folded, report, action = fold_one(BufferWeights(), img)
    assert action.kind == "folded" and action.detail["into"] == [""]
    kinds = [(s.kind, s.target) for s in folded.graph_signature.input_specs]
    assert kinds[:2] == [(InputKind.BUFFER, "w"), (InputKind.BUFFER, "bias")]
    assert rel(ep, roundtrip(folded, tmp_path), CallArgs((img,))) <= 1e-5


class BothSides(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0, self.fc, self.bn = nn.BatchNorm1d(8), nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(self.bn0(torch.relu(x)))))


def test_a_bias_free_linear_takes_folds_from_both_sides():
    ep, folded, report, action = fold_one(BothSides(), torch.randn(4, 8), dynamic=True)
    assert [(a.path, a.detail["position"]) for a in report.folded] == [("bn0", "before"), ("bn", "after")]
    assert count_batch_norms(folded) == 0
    assert [s.target for s in folded.graph_signature.input_specs].count("fc.bias") == 1
    assert rel(ep, folded, CallArgs((torch.randn(7, 8),))) <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_x_at_weight_dot_t_folds_in_a_program_like_the_module(bias):
    """A Linear subclass's ``x @ self.weight.T`` (FalconLinear) exports as matmul over numpy_T: a linear."""
    ep = export(randomize(MatmulBlock(bias=bias)), torch.randn(5, 8), dynamic=True)
    folded, report = fold_program(ep)
    assert report.passed, report.summary()
    # a BN after the bias add is the module editor's (it reads the add as the Linear's bias): not here
    assert [(a.path, a.detail["into"], a.detail["position"]) for a in report.folded] == [
        ("bn1", ["fc"], "after"), ("bn2", ["proj"], "before")][int(bias):]
    assert count_batch_norms(folded) == int(bias)
    assert rel(ep, folded, CallArgs((torch.randn(3, 8),))) <= 1e-5


@pytest.mark.parametrize("model,x,reason", [
    (WeightReadTwice, torch.randn(4, 8), "producer fc.weight is read by 2 nodes (shared)"),
    (UsedTwice, img, "producer conv output is also used by add"),
    (NonLin, img, "a nonlinearity (relu) sits between conv2d conv and the BN"),
    (lambda: Consumer(padding=1), img, "consumer conv zero-pads its input (padding=(1, 1))"),
    (lambda: BNThenConvT(stride=2), img, "receive different numbers of kernel taps"),
], ids=["weight-read-twice", "output-used-twice", "nonlinearity", "padded-consumer", "conv-transpose-stride"])
def test_refusals_give_the_module_folds_reasons(model, x, reason):
    ep, folded, report, action = fold_one(model(), x)
    assert action.kind == "skipped" and reason in action.reason
    assert count_batch_norms(folded) == 1 and report.verify.max_rel_error == 0


def test_pitch_tracker_program_folds_its_last_bn_through_max_pool_like_the_module():
    model, x = randomize(PitchTracker()), torch.randn(2, 1, 32)
    ep = export(model, x).run_decompositions()  # max_pool1d decomposes to max_pool2d_with_indices + getitem
    folded, report = fold_program(ep)
    assert [a.path for a in report.folded] == ["blocks.2.2"] and report.passed
    assert all("zero-pads its input" in a.reason for a in report.skipped) and len(report.skipped) == 2
    assert rel(ep, folded, CallArgs((torch.randn(2, 1, 32),))) <= 1e-5  # a static batch: reshape(x.shape[0])


def test_training_mode_batch_norm_is_refused():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    ep = export(model, img)
    folded, report = fold_program(ep, verify=False)
    (action,) = report.actions
    assert action.kind == "skipped" and action.reason.startswith("in training mode")
    assert count_batch_norms(folded) == 1


def ops(ep) -> set[str]:
    return {n.target._opname for n in ep.graph.nodes if n.op == "call_function" and hasattr(n.target, "_opname")}


def test_decomposed_program_folds_its_native_batch_norms():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(288, 4, bias=False), nn.BatchNorm1d(4), nn.Linear(4, 2),
                                    nn.BatchNorm1d(2)))
    ep = export(model, img, dynamic=True).run_decompositions()
    assert {"_native_batch_norm_legit_no_training", "convolution", "addmm", "mm"} <= ops(ep)
    folded, report = fold_program(ep)
    assert report.passed and len(report.folded) == 3 and count_batch_norms(folded) == 0
    assert "mm" not in ops(folded)  # the bias-free linear got its bias: mm became addmm
    assert rel(ep, folded, CallArgs((torch.randn(3, 3, 8, 8),))) <= 1e-5


def test_a_site_that_breaks_the_outputs_is_rolled_back(monkeypatch):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(288, 4), nn.BatchNorm1d(4)))
    real = fold_math.fold_bn_after_linear

    def corrupt(*args, **kw):
        w, b = real(*args, **kw)
        return w, b + 1.0

    monkeypatch.setattr(fold_math, "fold_bn_after_linear", corrupt)
    ep = export(model, img)
    folded, report = fold_program(ep)
    assert {a.path: a.kind for a in report.actions} == {"1": "folded", "5": "rolled_back"}
    assert report.rolled_back[0].reason.startswith("rolled back: folding into 4 changed the outputs")
    assert report.passed and count_batch_norms(folded) == 1 and rel(ep, folded, CallArgs((img,))) <= 1e-5


def test_a_rewrite_that_raises_is_skipped_and_the_rest_still_folds(monkeypatch):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(288, 4), nn.BatchNorm1d(4)))

    def broken(*args, **kw):
        raise ValueError("no")

    monkeypatch.setattr(fold_math, "fold_bn_after_linear", broken)
    ep = export(model, img)
    folded, report = fold_program(ep)
    assert {a.path: a.kind for a in report.actions} == {"1": "folded", "5": "skipped"}
    assert report.skipped[0].reason == "rewrite failed: ValueError: no"
    assert report.passed and count_batch_norms(folded) == 1 and rel(ep, folded, CallArgs((img,))) <= 1e-5


# --- inputs, API, CLI ---------------------------------------------------------------------------------------

def test_inputs_come_from_the_program_when_it_saved_none(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    ep = export(model, img, dynamic=True)
    ep._example_inputs = None
    src, out = tmp_path / "bare.pt2", tmp_path / "bare_folded.pt2"
    torch.export.save(ep, src)
    assert torch.export.load(src).example_inputs is None
    code, stdout, stderr = cli("fold", src, "-o", out, "--json")  # no --input-shape
    assert code == 0, stderr
    data = json.loads(stdout)
    assert len(data["folded"]) == 1 and data["verify"]["inputs"] == 4
    assert count_batch_norms(torch.export.load(out)) == 0


def test_api_fold_takes_a_program_and_returns_one():
    ep = export(randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))), torch.randn(4, 8))
    folded, report = normsurgeon.fold(ep)
    assert isinstance(folded, torch.export.ExportedProgram) and report.passed and count_batch_norms(folded) == 0
    assert report.to_json()["folded"] == [{"norm": "1", "into": ["0"], "position": "after", "via": []}]


def test_cli_module_in_program_out_and_convert_refuses_a_program(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    src, out = tmp_path / "m.pt", tmp_path / "m.pt2"
    torch.save(model, src)
    code, _, stderr = cli("fold", src, "--trust", "--input-shape", "2,3,8,8", "-o", out)
    assert code == 0, stderr
    assert count_batch_norms(torch.export.load(out)) == 0
    code, _, stderr = cli("convert", out, "--to", "ln")
    assert code == 2 and stderr.strip().count("\n") == 0 and "convert needs the nn.Module" in stderr
    with pytest.raises(normsurgeon.NormSurgeonError, match="convert needs the nn.Module"):
        normsurgeon.convert(torch.export.load(out), to="ln")  # the Python API refuses as the CLI does
    code, _, stderr = cli("fold", out, "-o", tmp_path / "again.pt")
    assert code == 2 and "saved as .pt2" in stderr and not (tmp_path / "again.pt").exists()
    code, _, stderr = cli("fold", out, "-o", tmp_path / "again.pt2")
    assert code == 0 and f"saved the folded program to {tmp_path / 'again.pt2'}" in " ".join(stderr.split())
