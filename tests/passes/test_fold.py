"""The fold pass on real architectures: coverage, every refusal, axis tracking, rollback, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from normsurgeon import fold_math, zoo
from normsurgeon.cli import main
from normsurgeon.passes.fold import fold
from normsurgeon.graph import CapturedPart, ModelGraph
from normsurgeon.graph.capture import _fx_nodes
from normsurgeon.inputs import CallArgs
from normsurgeon.loading import load_model
from normsurgeon.outputs import compare_outputs

_BN = nn.modules.batchnorm._BatchNorm
x8, img = torch.randn(4, 8), torch.randn(2, 3, 8, 8)


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics (fresh ones are an identity map and hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def bns(model: nn.Module) -> list[str]:
    """BatchNorm paths, a TokenBatchNorm by its own path (not its BatchNorm1d child's)."""
    from normsurgeon.nn import TokenBatchNorm

    tokens = {p for p, m in model.named_modules() if isinstance(m, TokenBatchNorm)}
    return [p[:-3] if p.endswith(".bn") and p[:-3] in tokens else p
            for p, m in model.named_modules() if isinstance(m, _BN)]


def rel_error(a: nn.Module, b: nn.Module, ci: CallArgs) -> float:
    with torch.no_grad():
        return compare_outputs(ci.call(a), ci.call(b)).max_rel_error


def fold_one(model: nn.Module, *args: torch.Tensor, **kw):
    """Fold a one-BN model; returns (folded, report, the BN's action)."""
    randomize(model)
    ci = CallArgs(tuple(args))
    folded, report = fold(model, ci, **kw)
    assert report.passed
    assert rel_error(model, folded, ci) <= 1e-5
    (action,) = [a for a in report.actions if a.path == "bn"]
    return folded, report, action


# --- coverage on the zoo ---------------------------------------------------------------------------

ZOO_BN = ["levit", "resnet", "mobilenet_v2", "efficientnet", "regnet", "mobilevit"]  # every BN of these folds


@pytest.mark.parametrize("name", ZOO_BN)
def test_zoo_every_batchnorm_folds_exactly(zoo_model, name):
    model, ci = zoo_model(name)
    n = len(bns(model))  # from the architecture in the installed transformers
    assert n > 0
    folded, report = fold(model, ci)
    assert report.num_norms == n and len(report.actions) == n
    assert [a.reason for a in report.skipped] == []
    assert len(report.folded) == n
    assert report.passed and report.verify.max_rel_error <= 1e-5 and report.verified_inputs == 4  # example, 2 random, 1 at another batch size
    assert bns(folded) == []
    fresh = ci.like(torch.Generator().manual_seed(7), batch=3)  # another batch size, unseen values
    assert rel_error(model, folded, fresh) <= 1e-5
    assert f"folded {n} of {n} BatchNorms" in report.summary()


def test_levit_token_bns_fold_into_their_linears_and_the_head_bn_into_the_classifier(zoo_model):
    model, ci = zoo_model("levit")
    _, report = fold(model, ci)
    by_norm = {f["norm"]: f for f in report.to_json()["folded"]}
    qkv = by_norm["levit.encoder.stages.0.layers.0.module.queries_keys_values.batch_norm"]
    assert qkv["into"] == ["levit.encoder.stages.0.layers.0.module.queries_keys_values.linear"]
    assert qkv["position"] == "after" and qkv["via"] == ["flatten"]
    head = by_norm["classifier.batch_norm"]
    assert head["into"] == ["classifier.linear"] and head["position"] == "before"
    conv = by_norm["levit.patch_embeddings.embedding_layer_1.batch_norm"]
    assert conv["into"] == ["levit.patch_embeddings.embedding_layer_1.convolution"]


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_models_without_batchnorm_report_nothing(zoo_model, name):
    model, ci = zoo_model(name)
    folded, report = fold(model, ci)
    assert report.actions == [] and report.passed
    assert report.to_json()["folded"] == [] and report.to_json()["skipped"] == []
    assert "nothing to fold" in report.summary()
    assert rel_error(model, folded, ci) == 0


def test_input_model_untouched_unless_inplace(zoo_model):
    model, ci = zoo_model("resnet")
    state, before = {k: v.clone() for k, v in model.state_dict().items()}, bns(model)
    folded, _ = fold(model, ci)
    assert folded is not model and bns(model) == before and before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    same, report = fold(model, ci, inplace=True)
    assert same is model and bns(model) == [] and report.passed


# --- the patterns ----------------------------------------------------------------------------------

class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.convt = nn.ConvTranspose2d(8, 8, 3, stride=2, groups=2)  # in == out, grouped
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=1e-2, affine=False)
        self.c1 = nn.Conv1d(8, 6, 1)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn2(self.dw(torch.tanh(self.bn1(self.convt(x)))))
        return self.bn3(self.c1(torch.tanh(y).flatten(2)))


def test_conv_transpose_depthwise_affine_free_and_conv1d_after_flatten():
    model = randomize(Convs())
    ci = CallArgs((torch.randn(2, 8, 5, 5),))
    folded, report = fold(model, ci)
    assert [(a.path, a.detail["into"]) for a in report.folded] == [
        ("bn1", ["convt"]), ("bn2", ["dw"]), ("bn3", ["c1"])]
    assert folded.dw.bias is not None  # created
    assert rel_error(model, folded, ci) <= 1e-5


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8, bias=False)

    def forward(self, x):  # x: (B, C, T)
        h = self.bn(torch.relu(x)).transpose(1, 2)
        q, k, v = self.q(h), self.k(h), self.v(h)
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v


def test_one_bn_folds_into_q_k_and_v():
    folded, _, action = fold_one(QKV(), torch.randn(2, 8, 5))
    assert action.kind == "folded" and action.detail["position"] == "before"
    assert action.detail["into"] == ["q", "k", "v"]
    assert folded.v.bias is not None


class EqualDims(nn.Module):
    """(B, C, C) tokens: a BN over dim 1 is the token axis unless the tensor is permuted first."""

    def __init__(self, permute: bool):
        super().__init__()
        self.fc, self.bn, self.permute = nn.Linear(8, 8), nn.BatchNorm1d(8), permute

    def forward(self, x):
        y = self.fc(x)
        if self.permute:
            return torch.relu(self.bn(y.permute(0, 2, 1)).permute(0, 2, 1))
        return torch.relu(self.bn(y))


def test_equal_dims_do_not_confuse_the_channel_axis():
    _, _, folded = fold_one(EqualDims(permute=True), torch.randn(2, 8, 8))
    assert folded.kind == "folded" and folded.detail["into"] == ["fc"]
    assert folded.detail["via"] == ["permute"]
    _, _, refused = fold_one(EqualDims(permute=False), torch.randn(2, 8, 8))
    assert refused.kind == "skipped"
    assert "normalizes axis 1 but fc's channels arrive on axis 2" in refused.reason


class ChannelsLast(nn.Module):
    """(B, H, W, C) with H == W == C, permuted to (B, C, H, W) by a permutation that is not its own inverse."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x).permute(0, 3, 1, 2)))


def test_channels_last_linear_then_permute_to_bn2d():
    _, _, action = fold_one(ChannelsLast(), torch.randn(2, 6, 6, 6))
    assert action.kind == "folded" and action.detail["into"] == ["fc"] and action.detail["via"] == ["permute"]


class ChannelShuffle(nn.Module):
    """ShuffleNet: channel counts match, but the view splits the channel axis and reorders channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 1, groups=2), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return torch.relu(self.bn(y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)))


def test_channel_shuffle_between_conv_and_bn_is_refused():
    _, _, action = fold_one(ChannelShuffle(), torch.randn(2, 8, 4, 4))
    assert action.kind == "skipped"
    assert "view to (2, 2, 4, 4, 4) merges or splits the channel axis 1 of (2, 8, 4, 4)" in action.reason


class TokenBN(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x.flatten(0, 1)).reshape_as(x)


class FlatBN(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x.flatten(0, 1))


class TokenModel(nn.Module):
    def __init__(self, bn_cls):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), bn_cls(8)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x)))


def test_batchnorm_subclass_reshaping_inside_its_forward():
    folded, _, action = fold_one(TokenModel(TokenBN), torch.randn(2, 5, 6))
    assert action.kind == "folded" and action.detail["into"] == ["fc"]
    assert isinstance(folded.bn, nn.Identity)
    _, _, refused = fold_one(TokenModel(FlatBN), torch.randn(2, 5, 6))
    assert refused.kind == "skipped" and "changes the shape (2, 5, 8) → (10, 8)" in refused.reason


def test_fx_graph_tied_weight_is_refused():
    """FX leaf modules carry no weight nodes: only the model-level tie check can see this."""
    model = randomize(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()))
    model.head = nn.Linear(8, 8)
    model.head.weight = model[0].weight
    ci = CallArgs((x8,))
    graph = ModelGraph(model, "fx", _fx_nodes(model, ci), [CapturedPart("", "fx")])
    folded, report = fold(model, ci, graph=graph)
    (action,) = report.actions
    assert action.kind == "skipped" and "producer 0.weight is tied to head.weight" in action.reason
    assert torch.equal(folded.head.weight, model.head.weight)


def test_fx_graph_with_leaf_modules():
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                                    nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.BatchNorm1d(10),
                                    nn.Linear(10, 4)))
    ci = CallArgs((torch.randn(2, 3, 8, 8),))
    graph = ModelGraph(model, "fx", _fx_nodes(model, ci), [CapturedPart("", "fx")])
    folded, report = fold(model, ci, graph=graph)
    assert report.capture == "fx"
    assert [(a.path, a.detail["into"], a.detail["position"]) for a in report.folded] == [
        ("1", ["0"], "after"), ("6", ["5"], "after"), ("8", ["9"], "before")]
    assert rel_error(model, folded, ci) <= 1e-5


# --- refusals: each gives its reason and the outputs still match ------------------------------------

class SharedCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x)) + self.fc(x * 2)


class Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.other = nn.Sequential(self.conv)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class NonLin(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(torch.relu(self.conv(x))))


class Tied(nn.Module):
    def __init__(self, used: bool):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.b.weight, self.used = self.a.weight, used

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        return y + self.b(x) if self.used else y


class Consumer(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=padding)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.bn = nn.Parameter(torch.randn(8, 8)), nn.BatchNorm1d(8)

    def forward(self, x):
        return torch.relu(self.bn(F.linear(x, self.w)))


@pytest.mark.parametrize("model,x,reason", [
    (SharedCall, x8, "producer fc is called 2 times (shared)"),
    (Alias, img, "producer conv is the same module as other.0 (shared)"),
    (UsedTwice, img, "producer conv output is also used by add"),
    (NonLin, img, "a nonlinearity (relu) sits between conv2d conv and the BN"),
    (lambda: Tied(used=True), x8, "producer a.weight is tied to b.weight"),
    (lambda: Tied(used=False), x8, "producer a.weight is tied to b.weight"),
    (lambda: Consumer(padding=1), img, "consumer conv zero-pads its input (padding=(1, 1))"),
    (Functional, x8, "functional linear in <root> (Functional): its weight is not owned by an nn.Linear"),
], ids=["shared-call", "alias", "output-used-twice", "nonlinearity", "tied-used", "tied-unused", "padded-consumer",
        "functional"])
def test_refusals_give_their_reason_and_keep_outputs(model, x, reason):
    folded, report, action = fold_one(model(), x)
    assert action.kind == "skipped"
    assert reason in action.reason
    assert isinstance(folded.bn, _BN) and report.verify.max_rel_error == 0


class WeightReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x))) + F.linear(x, self.fc.weight)


@pytest.mark.parametrize("capture_with", ["export", "fx"])
def test_weight_also_read_outside_its_module_is_refused(capture_with):
    model = randomize(WeightReadTwice())
    ci = CallArgs((x8,))
    graph = ModelGraph(model, "fx", _fx_nodes(model, ci), [CapturedPart("", "fx")]) if capture_with == "fx" else None
    folded, report = fold(model, ci, graph=graph)
    (action,) = report.actions
    assert action.kind == "skipped" and "producer fc.weight is" in action.reason and "(shared)" in action.reason
    assert rel_error(model, folded, ci) == 0


def test_parametrized_producer_and_hooked_bn_are_refused():
    model = randomize(ConvBN())
    torch.nn.utils.parametrizations.weight_norm(model.conv)
    _, report = fold(model, CallArgs((img,)))
    assert "producer conv is parametrized" in report.actions[0].reason
    model = randomize(ConvBN())
    seen = []
    model.bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    folded, report = fold(model, CallArgs((img,)))
    assert report.actions[0].reason == "has forward hooks, which replacing it by Identity would drop"
    assert isinstance(folded.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_consumer_padding_by_copying_values_folds(mode):
    """Reflect/replicate/circular padding copies (shifted) values, so the fold stays exact."""
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    folded, report = fold(randomize(model), CallArgs((img,)))
    (action,) = report.actions
    assert action.kind == "folded" and action.detail == {"into": ["2"], "position": "before", "via": ["pad"]}
    assert rel_error(model, folded, CallArgs((img,))) <= 1e-5


class PadBetween(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.conv, self.bn, self.mode = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), mode

    def forward(self, x):
        return torch.relu(self.bn(F.pad(self.conv(x), (1, 1, 2, 0), mode=self.mode)))


def test_pad_between_producer_and_bn():
    _, _, action = fold_one(PadBetween("reflect"), img)
    assert action.kind == "folded" and action.detail["via"] == ["pad"]
    _, _, action = fold_one(PadBetween("constant"), img)  # padded zeros would be shifted by the BN
    assert action.kind == "skipped" and "its input comes from pad, not from a Linear/Conv" in action.reason


def test_unpadded_conv_consumer_folds():
    folded, _, action = fold_one(Consumer(padding=0), img)
    assert action.kind == "folded" and action.detail == {"into": ["conv"], "position": "before", "via": []}


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_training_mode_bn_is_refused_and_its_running_stats_untouched():
    model = randomize(ConvBN())
    model.bn.train()
    stats = model.bn.running_mean.clone()
    folded, report = fold(model, CallArgs((img,)))
    (action,) = report.actions
    assert action.kind == "skipped" and "training mode" in action.reason
    assert folded.bn.training and report.passed
    assert torch.equal(model.bn.running_mean, stats) and torch.equal(folded.bn.running_mean, stats)


def test_bn_without_running_stats_and_bn_never_called():
    model = randomize(ConvBN())
    model.bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    model.unused = nn.BatchNorm1d(3).eval()
    _, report = fold(model, CallArgs((img,)))
    reasons = {a.path: a.reason for a in report.actions}
    assert reasons == {"bn": "has no running statistics (track_running_stats=False): it always uses batch statistics",
                       "unused": "never called in the forward pass on the example inputs"}


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        bn = self.bn
        return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)


def test_functional_batch_norm_on_an_uncalled_modules_tensors_folds():
    """The call stays in the forward; the fold makes it an identity by resetting the tensors it reads."""
    model = randomize(FunctionalBN())
    folded, report = fold(model, CallArgs((img,)))
    reasons = {a.path: a.reason for a in report.skipped}
    assert reasons == {"bn": "not called as a module: a functional batch_norm reads its statistics "
                             "(reported on its own line)"}
    (action,) = report.folded
    assert action.path.startswith("<root>:") and action.detail["into"] == ["conv"]
    assert action.detail["functional"] and action.detail["position"] == "after"
    assert report.passed and rel_error(model, folded, CallArgs((img,))) <= 1e-5
    assert torch.equal(folded.bn.running_mean, torch.zeros(4)) and torch.equal(folded.bn.bias, torch.zeros(4))
    assert "(+1 functional batch_norm calls, 1 folded)" in report.summary()
    assert not torch.equal(model.bn.running_mean, folded.bn.running_mean)  # the input model untouched


class OwnStatsBN(nn.Module):
    """F.batch_norm on the calling module's own buffers and parameters (eval, training=False)."""

    def __init__(self, affine=True, training=False, twice=False, computed=False):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w = nn.Parameter(torch.rand(4) + 0.5) if affine else None
        self.b = nn.Parameter(torch.randn(4)) if affine else None
        self.training_arg, self.twice, self.computed = training, twice, computed

    def bn(self, y):
        rv = self.rv.abs() if self.computed else self.rv
        return F.batch_norm(y, self.rm, rv, self.w, self.b, self.training_arg, 0.0, 1e-3)

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))  # no producer: it folds into fc, after the permute
        y = self.fc(y.permute(0, 2, 3, 1))
        return y + self.bn(self.conv(x)).sum() if self.twice else y


@pytest.mark.parametrize("affine", [True, False])
def test_functional_batch_norm_on_the_modules_own_buffers_folds(affine):
    model = OwnStatsBN(affine).eval()
    ci = CallArgs((img,))
    folded, report = fold(model, ci)
    (action,) = report.actions
    assert action.kind == "folded" and action.detail == {"into": ["fc"], "position": "before", "via": ["permute"],
                                                         "functional": True}
    assert report.passed and rel_error(model, folded, ci) <= 1e-5
    assert rel_error(model, folded, ci.like(torch.Generator().manual_seed(2), batch=3)) <= 1e-5
    with torch.no_grad():  # the call is now an identity
        y = torch.randn(2, 4, 3, 3)
        assert torch.allclose(folded.bn(y), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,reason", [
    ({"training": True}, "training not the constant False"),
    ({"twice": True}, "functional batch_norm whose running_mean rm is also read elsewhere (shared)"),
    ({"computed": True}, "functional batch_norm whose running_var is computed in the forward"),
], ids=["training", "called-twice", "computed-stats"])
def test_functional_batch_norm_that_is_not_a_fixed_owned_affine_map_is_refused(kw, reason):
    model = OwnStatsBN(**kw).eval()
    ci = CallArgs((img,))
    folded, report = fold(model, ci)
    assert report.folded == [] and report.actions
    assert all(reason in a.reason for a in report.actions)
    assert rel_error(model, folded, ci) == 0


class FlattenHead(nn.Module):
    def __init__(self, channels_last=False, split=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.channels_last, self.split = channels_last, split

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))
        if self.channels_last:  # feature j of the flattened (H, W, C) tensor is channel j % C
            y = y.permute(0, 2, 3, 1)
        if self.split:  # (N, 2, 2·H·W): channel c = 2·row + (col // H·W), split over two axes
            return self.fc(y.reshape(y.shape[0], 2, -1)).flatten(1)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_bn_flatten_linear_head_folds(channels_last):
    folded, report, action = fold_one(FlattenHead(channels_last), img)
    assert action.kind == "folded" and action.detail["into"] == ["fc"] and action.detail["position"] == "before"
    assert isinstance(folded.bn, nn.Identity)


def test_channel_axis_split_before_a_linear_is_refused():
    model = FlattenHead()
    model.fc = nn.Linear(2 * 6 * 6, 5)
    model.split = True
    _, _, action = fold_one(model, img)
    assert action.kind == "skipped" and "splits the channel axis" in action.reason


class BeforeConvT(nn.Module):
    def __init__(self, scale_only=False, **kw):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, affine=not scale_only)
        self.ct = nn.ConvTranspose2d(4, 6, 3, **kw)
        self.scale_only = scale_only

    def forward(self, x):
        return self.ct(self.bn(torch.relu(x)))


@pytest.mark.parametrize("kw", [
    {"padding": 2}, {"padding": 3}, {"padding": 2, "groups": 2}, {"padding": 4, "dilation": 2},
    {"padding": 5, "dilation": 2, "output_padding": 1},
], ids=["pad=k-1", "pad>k-1", "grouped", "dilated", "dilated-output-padding"])
def test_bn_before_conv_transpose_where_every_output_gets_every_tap_folds(kw):
    x = torch.randn(2, 4, 9, 9)
    folded, _, action = fold_one(BeforeConvT(**kw), x)
    assert action.kind == "folded" and action.detail == {"into": ["ct"], "position": "before", "via": []}
    model = randomize(BeforeConvT(**kw))
    folded, _ = fold(model, CallArgs((x,)))
    for size in (9, 12):  # the condition holds for every input size
        xs = CallArgs((torch.randn(2, 4, size, size + 1),))
        assert rel_error(model, folded, xs) <= 1e-5


@pytest.mark.parametrize("kw", [{}, {"padding": 1}, {"stride": 2, "padding": 2},
                                {"padding": 4, "dilation": 2, "output_padding": 1}],
                         ids=["stride1-unpadded", "stride1-padding1", "stride2", "dilated-output-padding"])
def test_bn_shift_before_conv_transpose_with_uneven_taps_is_refused(kw):
    _, report, action = fold_one(BeforeConvT(**kw), torch.randn(2, 4, 9, 9))
    assert action.kind == "skipped" and "is a ConvTranspose" in action.reason
    assert "receive different numbers of kernel taps" in action.reason
    assert report.verify.max_rel_error == 0


def test_scale_only_bn_before_any_conv_transpose_folds():
    model = BeforeConvT(scale_only=True, stride=2, output_padding=1).eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)  # running_mean 0, no affine: a pure scale
    ci = CallArgs((torch.randn(2, 4, 5, 5),))
    folded, report = fold(model, ci)
    (action,) = report.folded
    assert action.detail["into"] == ["ct"] and report.passed
    assert rel_error(model, folded, CallArgs((torch.randn(2, 4, 7, 6),))) <= 1e-5


class ScalarBN(nn.Module):
    """BatchNorm1d(1): one channel, a scalar affine map on a (B, 1, L) tensor."""

    def __init__(self, before=False):
        super().__init__()
        self.fc, self.bn, self.before = nn.Linear(8, 6), nn.BatchNorm1d(1), before

    def forward(self, x):
        if self.before:
            return self.fc(self.bn(torch.relu(x).unsqueeze(1)))
        return torch.relu(self.bn(self.fc(x).unsqueeze(1)))


@pytest.mark.parametrize("before", [False, True], ids=["after-linear", "before-linear"])
def test_one_feature_bn_is_a_scalar_affine_and_folds(before):
    _, _, action = fold_one(ScalarBN(before), torch.randn(4, 8))
    assert action.kind == "folded" and action.detail["into"] == ["fc"]
    assert action.detail["position"] == ("before" if before else "after")


def test_one_feature_bn_after_a_one_output_linear_folds():
    model = nn.Sequential(nn.Linear(8, 1), nn.BatchNorm1d(1), nn.Sigmoid())
    folded, report = fold(randomize(model), CallArgs((torch.randn(4, 8),)))
    assert [a.detail["into"] for a in report.folded] == [["0"]] and report.passed


# --- numerics, rollback ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_its_dtype(dtype):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10))).to(dtype)
    ci = CallArgs((torch.randn(2, 3, 8, 8, dtype=dtype),))
    folded, report = fold(model, ci)
    assert len(report.folded) == 2 and report.passed
    assert folded[0].weight.dtype == dtype and folded[0].bias.dtype == dtype
    assert report.verify.max_rel_error <= report.tolerance


class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.bn2 = nn.Linear(36, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return torch.relu(self.bn2(self.fc(torch.relu(self.bn1(self.conv(x))).flatten(1))))


def test_a_site_that_breaks_the_outputs_is_rolled_back(monkeypatch):
    model = randomize(TwoSites())
    ci = CallArgs((torch.randn(2, 3, 5, 5),))
    real = fold_math.fold_bn_after_linear

    def corrupt(*args, **kw):
        w, b = real(*args, **kw)
        return w, b + 1.0

    monkeypatch.setattr(fold_math, "fold_bn_after_linear", corrupt)
    folded, report = fold(model, ci)
    kinds = {a.path: a.kind for a in report.actions}
    assert kinds == {"bn1": "folded", "bn2": "rolled_back"}
    (rolled,) = report.rolled_back
    assert rolled.reason.startswith("rolled back: folding into fc changed the outputs (max rel error")
    assert report.passed and report.verify.max_rel_error <= 1e-5
    assert isinstance(folded.bn2, nn.BatchNorm1d) and torch.equal(folded.fc.bias, model.fc.bias)
    assert isinstance(folded.bn1, nn.Identity)
    assert report.to_json()["skipped"] == [{"norm": "bn2", "reason": rolled.reason, "rolled_back": True}]
    assert rel_error(model, folded, ci) <= 1e-5


class UsesBNAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.num_features


def test_a_site_that_breaks_the_model_is_rolled_back():
    model = randomize(UsesBNAttribute())
    folded, report = fold(model, CallArgs((img,)))
    (action,) = report.actions
    assert action.kind == "rolled_back" and "the model fails: AttributeError" in action.reason
    assert report.passed and isinstance(folded.bn, nn.BatchNorm2d)


class Drifting(nn.Module):
    """Outputs change from call to call: nothing can be verified."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.calls = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), 0

    def forward(self, x):
        self.calls += 1
        return self.bn(self.conv(x)) + self.calls


def test_unverifiable_model_fails_and_keeps_nothing():
    model = randomize(Drifting())
    folded, report = fold(model, CallArgs((img,)))
    assert report.passed is False and "FAILED" in report.summary()
    assert report.rolled_back and isinstance(folded.bn, nn.BatchNorm2d)


def test_report_json_and_table_contract(zoo_model):
    model, ci = zoo_model("levit")
    _, report = fold(model, ci)
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) >= {"capture", "folded", "skipped", "verify"}
    assert data["capture"] == "export"
    assert set(data["verify"]) >= {"max_abs_error", "max_rel_error", "passed"} and data["verify"]["passed"] is True
    assert all(set(f) >= {"norm", "into", "position"} for f in data["folded"])
    n = len(bns(model))  # every BN of LeViT folds
    (table,) = report.tables()
    assert len(table.rows) == n and len({r[0] for r in table.rows}) == n
    assert table.notes[0].startswith(f"folded {n} of {n} BatchNorms; max rel error ")


# --- CLI ---------------------------------------------------------------------------------------------

def _run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_levit_json_and_saved_model(tmp_path, zoo_model):
    out = tmp_path / "levit_folded.pt"
    code, stdout, _ = _run(["fold", "normsurgeon.zoo:levit", "-o", str(out), "--json"])
    assert code == 0
    data = json.loads(stdout)
    assert len(data["folded"]) == len(bns(zoo.levit())) and data["skipped"] == [] and data["verify"]["passed"]
    assert data["output"] == str(out) and data["dry_run"] is False
    loaded = load_model(out, trust=True)
    assert bns(loaded.model) == []
    original, ci = zoo_model("levit")
    assert rel_error(original, loaded.model, ci) <= 1e-5
    code, _, stderr = _run(["fold", "normsurgeon.zoo:levit", "-o", str(out)])
    assert code == 2 and "exists; pass --force" in stderr
    code, stdout, stderr = _run(["fold", "normsurgeon.zoo:levit", "-o", str(out), "--force"])
    assert code == 0 and "folded 27 of 27 BatchNorms" in stdout and "saved the folded model" in stderr


def test_cli_dry_run_without_output(zoo_model):
    code, stdout, stderr = _run(["fold", "normsurgeon.zoo:resnet"])
    assert code == 0 and "folded 8 of 8" in stdout and "dry run: nothing written" in stderr
    code, stdout, _ = _run(["fold", "normsurgeon.zoo:resnet", "--json"])
    assert code == 0 and json.loads(stdout)["dry_run"] is True and json.loads(stdout)["output"] is None


def test_cli_pickled_model_needs_trust_and_never_overwrites_its_input(tmp_path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    src = tmp_path / "model.pt"
    torch.save(model, src)
    args = ["fold", str(src), "--input-shape", "2,3,8,8"]
    code, _, stderr = _run(args + ["-o", str(tmp_path / "out.pt")])
    assert code == 2 and "--trust" in stderr
    code, _, stderr = _run(args + ["--trust", "-o", str(src), "--force"])
    assert code == 2 and "is the input file" in stderr
    code, _, stderr = _run(args + ["--trust", "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and "must end in" in stderr
    for name in ("out.pt", "out.pt2"):
        code, stdout, _ = _run(args + ["--trust", "-o", str(tmp_path / name), "--json"])
        assert code == 0 and json.loads(stdout)["folded"][0] == {
            "norm": "1", "into": ["0"], "position": "after", "via": []}
        folded = load_model(tmp_path / name, trust=True).model
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_cli_exit_1_when_verification_fails(tmp_path, monkeypatch):
    from normsurgeon import api
    from normsurgeon.passes.fold import fold as real_fold

    def failing(*args, **kw):
        folded, report = real_fold(*args, **kw)
        report.passed = False
        return folded, report

    monkeypatch.setattr(api._fold_pass, "fold", failing)  # the pass the command's api.fold runs
    out = tmp_path / "x.pt"
    code, _, stderr = _run(["fold", "normsurgeon.zoo:resnet", "-o", str(out)])
    assert code == 1 and "do not match" in stderr and not out.exists()


def _random_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.uniform_(-2, 2)
    return bn


def test_dataclass_output_and_hooked_producer_are_not_silently_folded():
    """A dataclass output (not a ModelOutput) sends capture to FX, whose leaf Linear hides its hook."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(8, 8), _random_bn(nn.BatchNorm1d(8))

        def forward(self, x):
            return Out(self.bn(self.lin(x)))

    model = M().eval()
    model.lin.register_forward_hook(lambda mod, inp, out: out.clamp(min=0))
    x = torch.randn(4, 8)
    folded, report = fold(model, x)
    assert "forward hooks" in report.skipped[0].reason
    assert torch.equal(folded(x).logits, model(x).logits)


def test_batch_size_branch_is_verified_too():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(8, 8), _random_bn(nn.BatchNorm1d(8))

        def forward(self, x):
            if x.shape[0] != 4:  # a path the example (batch 4) never takes
                return self.bn(x)
            return self.bn(self.lin(x))

    model = Branchy().eval()
    x = torch.randn(4, 8)
    folded, report = fold(model, x)
    assert report.folded == [] and report.rolled_back
    for batch in (3, 4, 5):
        xb = torch.randn(batch, 8)
        assert torch.allclose(folded(xb), model(xb))


def test_bias_free_linear_takes_folds_from_both_sides():
    """The first fold gives the Linear a bias the captured graph never saw; the second must still fold."""
    model = nn.Sequential(_random_bn(nn.BatchNorm1d(8)), nn.Linear(8, 6, bias=False), _random_bn(nn.BatchNorm1d(6)))
    model.eval()
    x = torch.randn(4, 8)
    folded, report = fold(model, x)
    assert len(report.folded) == 2 and report.passed
    assert bns(folded) == [] and folded[1].bias is not None
    assert torch.allclose(folded(x), model(x), atol=1e-5)


def _fold_bn_converted(name):
    """A zoo transformer converted to BN with FFN BNs, calibrated, then folded: (folded, report)."""
    from normsurgeon.calibrate import calibrate, synthetic_batches
    from normsurgeon.passes.convert import convert

    model = zoo.MODELS[name]()
    ci = model.example_inputs()
    bn_model, _ = convert(model, to="bn", example_inputs=ci, ffn_bn=True)
    calibrate(bn_model, synthetic_batches(ci, 3))
    return fold(bn_model.eval(), ci)


def test_llama_with_bn_ffn_folds_every_bn_but_the_final_norm():
    folded, report = _fold_bn_converted("llama")
    assert report.passed and [a.path for a in report.skipped] == ["norm"]  # feeds the model output
    assert len(report.folded) == 2 * 2 + 2  # per layer: input + post-attention norm; plus the FFN BNs


class Conv1DBlock(nn.Module):
    """transformers' Conv1D (weight (in, out), ``addmm``) → token BN, and a BN → Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        from normsurgeon.nn import TokenBatchNorm

        self.fc, self.bn1 = Conv1D(12, 8), TokenBatchNorm(12)  # Conv1D(nf=out, nx=in)
        self.bn2, self.proj = TokenBatchNorm(12), Conv1D(6, 12)

    def forward(self, x):  # x: (B, T, 8)
        return self.proj(self.bn2(torch.tanh(self.bn1(self.fc(x)))))


class AddmmBN(nn.Module):
    """A plain ``torch.addmm`` (no Conv1D owns the weight) between BNs."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
        self.bn1, self.bn2 = nn.BatchNorm1d(8), nn.BatchNorm1d(6)

    def forward(self, x):
        return torch.tanh(self.bn2(torch.addmm(self.b, self.bn1(x), self.w)))


def test_transformers_conv1d_folds_as_a_transposed_linear_on_both_sides():
    model = randomize(Conv1DBlock())
    with torch.no_grad():
        model.fc.bias.normal_()
        model.proj.bias.normal_()
    ci = CallArgs((torch.randn(2, 5, 8),))
    folded, report = fold(model, ci)
    assert report.passed
    assert [(a.path, a.detail["into"], a.detail["position"]) for a in report.folded] == [
        ("bn1", ["fc"], "after"), ("bn2", ["proj"], "before")]
    assert bns(folded) == []
    assert folded.fc.weight.shape == (8, 12) and folded.proj.weight.shape == (12, 6)  # layout kept
    assert rel_error(model, folded, ci) <= 1e-5
    assert rel_error(model, folded, ci.like(torch.Generator().manual_seed(3), batch=3)) <= 1e-5


def test_transposed_linear_math_matches_the_linear_math():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 6, generator=g), torch.randn(6, generator=g)  # (in, out)
    s6, t6 = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    s8, t8 = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    x = torch.randn(5, 8, generator=g)
    nw, nb = fold_math.fold_bn_after_transposed_linear(w, b, s6, t6)
    assert torch.allclose(torch.addmm(nb, x, nw), (torch.addmm(b, x, w)) * s6 + t6, atol=1e-5)
    nw, nb = fold_math.fold_bn_before_transposed_linear(w, b, s8, t8)
    assert torch.allclose(nw, w * s8[:, None]) and torch.allclose(nb, b + t8 @ w, atol=1e-6)
    assert torch.allclose(torch.addmm(nb, x, nw), torch.addmm(b, x * s8 + t8, w), atol=1e-5)


def test_addmm_not_owned_by_a_conv1d_is_refused():
    model = randomize(AddmmBN())
    ci = CallArgs((torch.randn(4, 8),))
    folded, report = fold(model, ci)
    assert report.passed and report.folded == []
    reasons = {a.path: a.reason for a in report.skipped}
    assert "is not a transformers Conv1D's forward" in reasons["bn1"]
    assert "is not a transformers Conv1D's forward" in reasons["bn2"]
    assert rel_error(model, folded, ci) == 0


class MatmulLinear(nn.Linear):
    """A Linear computing its own forward, as transformers' FalconLinear: a matmul and an add, not linear."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class BiasIgnoringLinear(nn.Linear):
    def forward(self, x):
        return x @ self.weight.T


class MatmulBlock(nn.Module):
    def __init__(self, linear=MatmulLinear, bias=True):
        super().__init__()
        self.fc, self.bn1 = linear(8, 12, bias=bias), nn.BatchNorm1d(12)
        self.bn2, self.proj = nn.BatchNorm1d(12), linear(12, 6, bias=bias)

    def forward(self, x):
        return self.proj(self.bn2(torch.tanh(self.bn1(self.fc(x)))))


class MatmulNotALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.bn = nn.Parameter(torch.randn(6, 8)), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(x @ self.w.T)


@pytest.mark.parametrize("bias", [True, False])
def test_a_linear_subclass_computing_x_at_w_t_folds_on_both_sides(bias):
    model = randomize(MatmulBlock(bias=bias))
    ci = CallArgs((torch.randn(5, 8),))
    folded, report = fold(model, ci)
    assert report.passed
    assert [(a.path, a.detail["into"], a.detail["position"]) for a in report.folded] == [
        ("bn1", ["fc"], "after"), ("bn2", ["proj"], "before")]
    assert bns(folded) == [] and folded.fc.weight.shape == (12, 8)  # the Linear's (out, in) layout kept
    assert type(folded.fc) is MatmulLinear and folded.fc.bias is not None  # given the bias it lacked
    assert rel_error(model, folded, ci) <= 1e-5
    assert rel_error(model, folded, ci.like(torch.Generator().manual_seed(3), batch=3)) <= 1e-5


def test_x_at_w_t_without_a_linear_owner_or_a_bias_it_adds_is_refused():
    model = randomize(MatmulNotALinear())
    folded, report = fold(model, CallArgs((torch.randn(4, 8),)))
    assert report.passed and report.folded == []
    assert "not owned by an nn.Linear" in report.skipped[0].reason
    model = randomize(MatmulBlock(BiasIgnoringLinear, bias=False))
    ci = CallArgs((torch.randn(5, 8),))
    folded, report = fold(model, ci)
    assert report.passed and report.folded == []
    reasons = {a.path: a.reason for a in report.skipped}
    assert "does not add one given it" in reasons["bn1"] and "does not add one given it" in reasons["bn2"]
    assert model.fc.bias is None and folded.fc.bias is None  # the probe left it as it was
    assert rel_error(model, folded, ci) == 0


def test_gpt2_with_bn_folds_into_its_conv1d_layers():
    folded, report = _fold_bn_converted("gpt2")
    assert report.passed and report.verify.max_rel_error <= 1e-5
    assert [a.path for a in report.skipped] == ["ln_f"]  # feeds the model output
    into = {a.path: (a.detail["into"], a.detail["position"]) for a in report.folded}
    n_layers = len(folded.h)
    assert len(into) == 3 * n_layers
    for i in range(n_layers):
        assert into[f"h.{i}.ln_1"] == ([f"h.{i}.attn.c_attn"], "before")
        assert into[f"h.{i}.ln_2"] == ([f"h.{i}.mlp.c_fc.0"], "before")
        assert into[f"h.{i}.mlp.c_fc.1"] == ([f"h.{i}.mlp.c_fc.0"], "after")
    assert bns(folded) == ["ln_f"]


def test_a_bn_module_whose_forward_moves_data_folds_only_if_the_moves_cancel():
    class TokenBN(nn.BatchNorm1d):  # (N, T, C) → BN over C; the moves cancel
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    class Scrambling(nn.BatchNorm1d):  # same shape in and out, but the tokens come back transposed
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2).transpose(1, 2).reshape(x.shape)

    for bn_cls, folds in [(TokenBN, True), (Scrambling, False)]:
        model = nn.Sequential(nn.Linear(6, 6), _random_bn(bn_cls(6))).eval()
        x = torch.randn(2, 6, 6)
        folded, report = fold(model, x)
        assert report.passed and bool(report.folded) == folds, report.skipped
        if not folds:
            assert "rearranges the data" in report.skipped[0].reason
        assert torch.allclose(folded(x), model(x), atol=1e-5)


class TupleCalled(nn.Module):
    """Issue 19 item 7: conv and BN registered in a ModuleList, called through a plain tuple attribute."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)])
        self.pair = (self.layers[0], self.layers[1])  # a plain attribute: replacing layers[1] cannot reach it

    def forward(self, x):
        conv, bn = self.pair
        return self.layers[3](self.layers[2](torch.relu(bn(conv(x)))))


def test_a_bn_the_forward_still_calls_is_not_reported_folded():
    model = TupleCalled().eval()  # fresh statistics: nearly the identity, so outputs alone would not tell
    folded, report = fold(model, CallArgs((torch.randn(2, 3, 8, 8),)))
    kinds = {a.path: a.kind for a in report.actions}
    assert kinds == {"layers.1": "rolled_back", "layers.3": "folded"}, report.summary()
    assert "still calls this BatchNorm" in report.rolled_back[0].reason
    assert isinstance(folded.layers[1], nn.BatchNorm2d) and isinstance(folded.layers[3], nn.Identity)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(folded.pair[0].weight, model.pair[0].weight)  # the conv it would have folded into: restored
    assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6) and report.passed


class PitchTracker(nn.Module):
    """Issue 19 item 10, a CREPE-like pitch tracker: (conv → ReLU → BN → max-pool) × 3, then
    permute → reshape → Linear. The last BN reaches the classifier through the max-pool."""

    def __init__(self, channels=(1, 8, 8, 6), length=32):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(a, b, 5, padding=2), nn.ReLU(), nn.BatchNorm1d(b), nn.MaxPool1d(2))
            for a, b in zip(channels, channels[1:]))
        self.fc = nn.Linear(channels[-1] * length // 8, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.fc(x.permute(0, 2, 1).reshape(x.shape[0], -1))


def test_a_bn_folds_through_max_pool_where_every_scale_is_positive():
    model = randomize(PitchTracker())  # γ in [0.5, 1.5): every scale γ/σ is positive
    x = CallArgs((torch.randn(2, 1, 32),))
    folded, report = fold(model, x)
    kinds = {a.path: a.kind for a in report.actions}
    assert kinds == {"blocks.0.2": "skipped", "blocks.1.2": "skipped", "blocks.2.2": "folded"}, report.summary()
    (done,) = report.folded
    assert done.detail["into"] == ["fc"] and done.detail["via"] == ["max_pool1d", "permute", "reshape"]
    for a in report.skipped:  # the others sit before zero-padded convs (and after a ReLU): refused, rightly
        assert "zero-pads its input" in a.reason and "a nonlinearity" in a.reason
    assert report.passed and isinstance(folded.blocks[2][2], nn.Identity)
    y = torch.randn(5, 1, 32)
    assert torch.allclose(folded(y), model(y), rtol=1e-5, atol=1e-5)


def test_a_negative_scale_does_not_commute_with_max_pool():
    model = randomize(PitchTracker())
    with torch.no_grad():
        model.blocks[2][2].weight[3] = -0.7  # one channel's scale negative: max(s·x) is s·min(x) there
    folded, report = fold(model, CallArgs((torch.randn(2, 1, 32),)))
    (last,) = [a for a in report.actions if a.path == "blocks.2.2"]
    assert last.kind == "skipped" and "negative on 1 of 6 channels (channel 3 first)" in last.reason
    assert "max_pool1d" in last.reason and not report.folded


@pytest.mark.parametrize("pool,position,via", [
    (nn.AdaptiveMaxPool2d(2), "before", ["adaptive_max_pool2d", "getitem", "flatten"]),  # (values, indices)
    (nn.MaxPool2d(2, padding=1), "before", ["max_pool2d", "flatten"]),  # the −∞ padding commutes too
])
def test_max_pool_forms_fold_in_module_and_program(pool, position, via):
    from normsurgeon.passes.fold import fold_program

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), pool, nn.Flatten(),
                                    nn.LazyLinear(3)))
    x = CallArgs((torch.randn(2, 3, 9, 9),))
    model(*x.args)  # materialize the lazy Linear
    folded, report = fold(model, x)
    (done,) = report.folded
    assert done.detail["position"] == position and done.detail["via"] == via and report.passed
    ep = torch.export.export(model, x.args, strict=False)
    for program in (ep, ep.run_decompositions()):
        _, preport = fold_program(program)
        assert [a.path for a in preport.folded] == ["2"] and preport.passed


def test_a_bn_after_max_pool_folds_into_the_conv_before_it():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU()))
    folded, report = fold(model, CallArgs((torch.randn(2, 3, 9, 9),)))
    (done,) = report.folded
    assert done.detail == {"into": ["0"], "position": "after", "via": ["max_pool2d"]} and report.passed
