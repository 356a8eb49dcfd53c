"""FFN block matching on real architectures and BatchNorm insertion into them."""

import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normsurgeon import zoo
from normsurgeon.passes.convert import insert_ffn_bn
from normsurgeon.passes.ffn_bn import check, find_ffn_blocks, match_ffn_blocks
from normsurgeon.graph import capture
from normsurgeon.inputs import CallArgs
from normsurgeon.nn import TokenBatchNorm
from normsurgeon.outputs import compare_outputs


def _graph(name):
    model = zoo.MODELS[name]()
    return model, capture(model, model.example_inputs())


# name -> (first linears, second linears, hidden, gated, type of the linears)
EXPECTED = {
    "vit": (["vit.layers.{i}.mlp.fc1"], ["vit.layers.{i}.mlp.fc2"], 64, False, "Linear"),
    "bert": (["encoder.layer.{i}.intermediate.dense"], ["encoder.layer.{i}.output.dense"], 64, False, "Linear"),
    "gpt2": (["h.{i}.mlp.c_fc"], ["h.{i}.mlp.c_proj"], 128, False, "Conv1D"),
    "llama": (["layers.{i}.mlp.gate_proj"], ["layers.{i}.mlp.down_proj"], 64, True, "Linear"),
    "transformer_encoder": (["layers.{i}.linear1"], ["layers.{i}.linear2"], 64, False, "Linear"),
    "wav2vec2": (["encoder.layers.{i}.feed_forward.intermediate_dense"],
                 ["encoder.layers.{i}.feed_forward.output_dense"], 64, False, "Linear"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_finds_every_ffn_block_of_real_architectures(name):
    _, graph = _graph(name)
    firsts, seconds, hidden, gated, ltype = EXPECTED[name]
    blocks = find_ffn_blocks(graph)
    assert [b.first for b in blocks] == [firsts[0].format(i=i) for i in range(2)]
    assert [b.second for b in blocks] == [seconds[0].format(i=i) for i in range(2)]
    for b in blocks:
        assert b.hidden == hidden and b.gated == gated
        assert b.first_type == ltype and b.second_type == ltype
        assert check(b, graph, "after-first") is None and check(b, graph, "before-second") is None
    if name == "llama":
        assert [b.up for b in blocks] == [f"layers.{i}.mlp.up_proj" for i in range(2)]
        assert all("silu" in b.activation.lower() for b in blocks)
    if name == "gpt2":  # hand-written tanh GELU in transformers' NewGELUActivation
        assert all("NewGELU" in b.activation for b in blocks)


def test_models_without_ffn_and_bn_transformers_match_nothing():
    # LeViT's MLP already holds a BN between linear and activation; ResNet has no linears in blocks
    for name in ("levit", "resnet"):
        _, graph = _graph(name)
        assert find_ffn_blocks(graph) == []


class TwoUsesMLP(nn.Module):
    """The hidden activations also leave the block: a BN there would change the second use."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return self.fc2(h), h.mean()


class SharedLinearMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))) + self.fc1(x)


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(F.silu(F.linear(x, self.w1)))


def _toy(cls):
    torch.manual_seed(0)
    return cls().eval(), CallArgs((torch.randn(4, 5, 8),), {})


def test_hidden_used_elsewhere_is_rejected_with_reason():
    model, ci = _toy(TwoUsesMLP)
    blocks, rejected = match_ffn_blocks(capture(model, ci))
    assert blocks == []
    assert len(rejected) == 1 and rejected[0][0] == "fc2"
    assert "also used" in rejected[0][1]
    with pytest.raises(Exception, match="no FFN block"):
        insert_ffn_bn(model, ci)


def test_shared_and_functional_linears_are_skipped_with_reason():
    model, ci = _toy(SharedLinearMLP)
    out, report = insert_ffn_bn(model, ci)
    assert not report.inserted
    assert "called 2 times" in report.skipped[0].reason
    model, ci = _toy(FunctionalMLP)
    out, report = insert_ffn_bn(model, ci)
    assert not report.inserted and "functional call" in report.skipped[0].reason
    # before the second linear there is a module to wrap
    out, report = insert_ffn_bn(model, ci, position="before-second")
    assert [a.path for a in report.inserted] == ["fc2.0"]


@pytest.mark.parametrize("name", ["vit", "gpt2", "llama"])
@pytest.mark.parametrize("position", ["after-first", "before-second"])
def test_identity_insertion_is_exact_and_calibrated(name, position):
    model = zoo.MODELS[name]()
    ci = model.example_inputs()
    with torch.no_grad():
        ref = ci.call(model)
    out, report = insert_ffn_bn(model, ci, position=position, init="identity")
    assert len(report.inserted) == 2 and not report.skipped
    assert report.function_preserving and report.verify["passed"]
    assert report.verify["sites_checked"] == 2 and report.verify["max_site_error"] < 1e-5
    with torch.no_grad():
        stats = compare_outputs(ref, ci.call(out))
    assert stats.max_rel_error < 1e-5, stats
    for a in report.inserted:
        bn = out.get_submodule(a.path)
        assert isinstance(bn, TokenBatchNorm)
        # statistics were measured, not left at their defaults, and the affine undoes them
        assert bn.running_mean.abs().max() > 1e-3 and (bn.running_var - 1).abs().max() > 1e-3
        torch.testing.assert_close(bn.weight, torch.sqrt(bn.running_var + bn.eps))
        torch.testing.assert_close(bn.bias, bn.running_mean)
    # the input model is untouched
    assert not any(isinstance(m, TokenBatchNorm) for m in model.modules())


def test_identity_bn_is_close_to_identity_in_training_mode_too():
    """Calibrated stats make the fresh-from-identity BN a near no-op also with batch statistics."""
    model = zoo.vit()
    ci = model.example_inputs()
    out, report = insert_ffn_bn(model, ci, init="identity")
    bn = out.get_submodule(report.inserted[0].path)
    seen = {}
    bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    out.train()
    with torch.no_grad():
        ci.call(out)
    # same data as the statistics: batch stats == running stats up to the unbiased/biased variance
    assert compare_outputs(seen["x"], seen["y"]).max_rel_error < 0.05


def test_fresh_insertion_wraps_linears_predictably_and_stays_picklable():
    model = zoo.vit()
    model.train()
    out, report = insert_ffn_bn(model, model.example_inputs())
    fc1 = out.get_submodule("vit.layers.0.mlp.fc1")
    assert isinstance(fc1, nn.Sequential) and isinstance(fc1[0], nn.Linear) and isinstance(fc1[1], TokenBatchNorm)
    assert fc1[0] is not model.vit.layers[0].mlp.fc1  # a copy
    keys = set(out.state_dict())
    assert "vit.layers.0.mlp.fc1.0.weight" in keys and "vit.layers.0.mlp.fc1.1.running_mean" in keys
    assert "vit.layers.0.mlp.fc1.weight" not in keys
    assert fc1.training and fc1[1].training  # train mode carried
    assert not report.function_preserving and report.verify is None
    assert any("fresh" in n for n in report.notes)
    del out.example_inputs  # the zoo's closure, not the conversion, is what pickle refuses
    buf = io.BytesIO()
    torch.save(out, buf)
    again = pickle.loads(pickle.dumps(out))
    assert isinstance(again.vit.layers[1].mlp.fc1[1], TokenBatchNorm)


def test_gated_ffn_bn_goes_after_gate_projection():
    model = zoo.llama()
    out, report = insert_ffn_bn(model, model.example_inputs())
    assert [a.path for a in report.inserted] == ["layers.0.mlp.gate_proj.1", "layers.1.mlp.gate_proj.1"]
    assert isinstance(out.layers[0].mlp.up_proj, nn.Linear)  # up projection untouched
    assert report.inserted[0].detail["gated"] is True


def test_conv1d_of_gpt2_is_wrapped_and_runs():
    model = zoo.gpt2()
    ci = model.example_inputs()
    out, report = insert_ffn_bn(model, ci, position="before-second")
    c_proj = out.h[0].mlp.c_proj
    assert isinstance(c_proj[0], TokenBatchNorm) and type(c_proj[1]).__name__ == "Conv1D"
    assert c_proj[0].num_features == 128
    out.train()
    y = ci.call(out).last_hidden_state
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert c_proj[0].weight.grad is not None


class ConvThenMLP(nn.Module):
    """A trained-looking BN in front of an FFN: identity insertion must leave it alone."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        t = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (N, HW, 8) tokens
        return self.fc2(F.gelu(self.fc1(t)))


def test_identity_insertion_with_calibration_data_keeps_existing_bns():
    torch.manual_seed(0)
    model = ConvThenMLP().eval()
    ci = CallArgs((torch.randn(2, 3, 6, 6),), {})
    batches = [CallArgs((torch.randn(8, 3, 6, 6) * 2 + 1,), {}) for _ in range(3)]
    mean0 = model.bn.running_mean.clone()
    out, report = insert_ffn_bn(model, ci, init="identity", calibrate_batches=batches)
    assert [a.path for a in report.inserted] == ["fc1.1"] and report.verify["passed"]
    assert report.calibration is None  # calibrate() would also have recomputed self.bn
    torch.testing.assert_close(out.bn.running_mean, mean0)
    # the statistics are those of the calibration data, measured exactly (hidden = fc1 output)
    with torch.no_grad():
        hidden = torch.cat([model.fc1(model.bn(model.conv(b.args[0])).flatten(2).transpose(1, 2)).reshape(-1, 32)
                            for b in batches])
    torch.testing.assert_close(out.fc1[1].running_mean, hidden.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.fc1[1].running_var, hidden.var(0), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert compare_outputs(model(batches[0].args[0]), out(batches[0].args[0])).max_rel_error < 1e-5
