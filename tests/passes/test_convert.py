"""Norm swaps on real architectures (LN/RMSNorm <-> BN, GN, frozen), their reports, and the CLI."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from normsurgeon import zoo
from normsurgeon.calibrate import synthetic_batches
from normsurgeon.cli import main
from normsurgeon.passes.convert import convert
from normsurgeon.errors import NormSurgeonError
from normsurgeon.find import inspect
from normsurgeon.inputs import CallArgs
from normsurgeon.nn import ChannelLayerNorm, FrozenBatchNorm, TokenBatchNorm, bn_eps
from normsurgeon.outputs import compare_outputs


def _ln_like_paths(model):
    return {p for p, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("RMSNorm")}


# ------------------------------------------------------------------------------------------------
# LN / RMSNorm -> BN
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit", "bert", "gpt2", "llama", "transformer_encoder", "wav2vec2"])
def test_ln_to_bn_on_real_transformers(name):
    model = zoo.MODELS[name]()
    ci = model.example_inputs()
    before = {p: m for p, m in model.named_modules()}
    norms = _ln_like_paths(model)
    out, report = convert(model, "bn", example_inputs=ci)
    # every LN/RMS site converted or skipped with a reason; these architectures convert fully
    assert {a.path for a in report.converted} == norms
    assert not report.skipped
    for a in report.converted:
        new = out.get_submodule(a.path)
        old = before[a.path]
        assert isinstance(new, TokenBatchNorm)
        assert a.detail["from"] == type(old).__name__ and a.detail["to"] == "TokenBatchNorm"
        torch.testing.assert_close(new.weight, old.weight.detach())  # affine carried over
        if getattr(old, "bias", None) is not None:
            torch.testing.assert_close(new.bias, old.bias.detach())
        else:
            assert torch.count_nonzero(new.bias) == 0
        assert new.training == old.training
    assert report.function_preserving is False and report.verify is None
    assert any("NOT function-preserving" in n for n in report.notes)
    assert report.output_change["max_abs_error"] > 1e-3  # measured, and it did change
    # the converted model runs and the finder sees only batchnorms
    with torch.no_grad():
        ci.call(out)
    counts = inspect(out, ci).counts()
    assert set(counts) == {"batchnorm"} and counts["batchnorm"] == len(norms)
    assert not any(isinstance(m, TokenBatchNorm) for m in model.modules())  # input untouched


def test_llama_rmsnorm_pattern_carries_eps_and_weight():
    model = zoo.llama()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    out, report = convert(model, "bn", example_inputs=model.example_inputs())
    assert isinstance(out.norm, TokenBatchNorm)
    assert out.norm.eps == pytest.approx(bn_eps(model.norm.variance_epsilon))  # read, then floored
    torch.testing.assert_close(out.norm.weight, model.norm.weight.detach())


class TinyEpsNorms(nn.Module):
    """Every kind of LN/RMS the finder converts, each with an eps far below BatchNorm's default."""

    def __init__(self):
        super().__init__()
        self.module_ln = nn.LayerNorm(8, eps=1e-12)
        self.module_rms = nn.RMSNorm(8, eps=1e-12)
        self.hand = HandLN(8, eps=1e-12)
        self.cf = nn.Conv2d(8, 8, 1)
        self.cf_ln = ChannelsFirstLN(8, eps=1e-12)

    def forward(self, x):  # (N, 5, 8)
        x = self.hand(self.module_rms(self.module_ln(x)))
        y = self.cf(x.transpose(1, 2).unsqueeze(-1))  # (N, 8, 5, 1)
        return self.cf_ln(y)


class ChannelsFirstLN(nn.LayerNorm):
    """LN over dim 1 (ConvNeXt's channels-first form): becomes a BatchNorm2d."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_eps_floor_applies_to_every_ln_to_bn_site():
    from normsurgeon.nn import MIN_BN_EPS

    model = TinyEpsNorms().eval()
    out, report = convert(model, "bn", example_inputs=torch.randn(4, 5, 8))
    converted = {a.path: a for a in report.converted}
    assert set(converted) == {"module_ln", "module_rms", "hand", "cf_ln"}
    for path in converted:
        assert out.get_submodule(path).eps == MIN_BN_EPS, path
        assert "eps raised from 1e-12" in converted[path].detail["note"], converted[path].detail
    llama = zoo.llama()
    out, report = convert(llama, "bn", example_inputs=llama.example_inputs())
    assert llama.norm.variance_epsilon < MIN_BN_EPS  # LlamaRMSNorm keeps eps as variance_epsilon
    assert {m.eps for m in out.modules() if isinstance(m, TokenBatchNorm)} == {MIN_BN_EPS}


def test_convnext_channels_first_ln_becomes_batchnorm2d():
    model = zoo.convnext()
    out, report = convert(model, "bn", example_inputs=model.example_inputs())
    kinds = {a.path: a.detail["to"] for a in report.converted}
    assert kinds["convnext.embeddings.layernorm"] == "BatchNorm2d"  # LN over dim 1 of (N, C, H, W)
    assert kinds["convnext.encoder.stages.0.layers.0.layernorm"] == "TokenBatchNorm"  # last dim of NHWC
    assert kinds["convnext.layernorm"] == "TokenBatchNorm"
    bn = out.convnext.embeddings.layernorm
    torch.testing.assert_close(bn.weight, model.convnext.embeddings.layernorm.weight.detach())
    with torch.no_grad():
        out(**model.example_inputs().kwargs)


def test_transformer_encoder_fast_path_cannot_bypass_the_swap():
    """nn.TransformerEncoderLayer's fused inference path computes LayerNorm from norm1.weight."""
    model = zoo.transformer_encoder()
    x = model.example_inputs().args[0]
    out, report = convert(model, "bn", example_inputs=(x,), ffn_bn=True)
    assert any("fast path" in n for n in report.notes)
    out.eval()
    with torch.no_grad():
        fused_eligible = out(x)  # no grad: the fast path would run here if it were enabled
    with torch.enable_grad():
        slow = out(x)  # parameters require grad: the regular path
    torch.testing.assert_close(fused_eligible, slow.detach())


class HandLN(nn.Module):
    """Annotated-Transformer LayerNorm: found as a pattern, converted as a whole module."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.a_2, self.b_2, self.eps = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c)), eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.hand = HandLN(8)
        self.rms = nn.RMSNorm(8, eps=1e-5)
        self.shared = nn.LayerNorm(8)
        self.two_dims = nn.LayerNorm([5, 8])
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):  # x: (N, 5, 8)
        x = self.hand(x)
        x = self.rms(x)
        x = self.shared(x) + self.shared(self.fc(x))
        x = self.two_dims(x)
        x = F.layer_norm(x, (8,), self.w)  # functional: cannot be swapped
        return x


def test_every_site_converted_or_skipped_with_reason():
    torch.manual_seed(0)
    model = Mixed().eval()
    ci = CallArgs((torch.randn(4, 5, 8),), {})
    out, report = convert(model, "bn", example_inputs=ci)
    converted = {a.path: a.detail["to"] for a in report.converted}
    assert converted == {"hand": "TokenBatchNorm", "rms": "TokenBatchNorm"}
    torch.testing.assert_close(out.hand.weight, model.hand.a_2.detach())  # a_2 found as the weight
    torch.testing.assert_close(out.hand.bias, model.hand.b_2.detach())
    assert out.hand.eps == pytest.approx(bn_eps(1e-6))
    skipped = {a.path: a.reason for a in report.skipped}
    assert "called 2 times" in skipped["shared"] and "running statistics" in skipped["shared"]
    assert "jointly" in skipped["two_dims"]
    functional = [p for p in skipped if p not in ("shared", "two_dims")]
    assert len(functional) == 1 and "module replacement cannot swap it" in skipped[functional[0]]
    assert isinstance(out.shared, nn.LayerNorm) and isinstance(out.two_dims, nn.LayerNorm)
    with torch.no_grad():
        ci.call(out)
    js = report.to_json()
    assert {d["path"] for d in js["skipped"]} == set(skipped) and all(d["reason"] for d in js["skipped"])
    assert {"converted", "inserted", "skipped", "verify", "function_preserving", "notes"} <= set(js)
    json.dumps(js)


class SharedNorms(nn.Module):
    """``shared_ln`` and the hand-written ``hand`` are each called at two places. With ``branch``, the
    forward branches on a tensor's value: neither torch.export nor torch.fx captures the root, so
    capture falls back to per child, which exports each child on the inputs it received."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.shared_ln, self.hand, self.ln = nn.LayerNorm(8), HandLN(8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.hand(self.shared_ln(self.a(x)))
        if self.branch and float(h.sum()) > 1e9:
            h = h * 2
        return self.ln(self.hand(self.shared_ln(self.b(h) * 3 + 1)))


@pytest.mark.parametrize("method", ["export", "fx", "per-child"])
def test_shared_norm_refused_under_every_capture(method):
    from normsurgeon.graph import capture

    model = SharedNorms(branch=method == "per-child").eval()
    ci = CallArgs((torch.randn(4, 5, 8),), {})
    graph = capture(model, None if method == "fx" else ci)  # fx: the capture used without inputs
    assert graph.method == method
    calls = {}
    for s in inspect(model, graph=graph).sites:
        calls.setdefault(s.path, []).append(s.calls)
    assert calls == {"shared_ln": [2, 2], "hand": [2, 2], "ln": [1]}  # one site per call, each call counted
    out, report = convert(model, "bn", example_inputs=ci, graph=graph)
    skipped = {a.path: a.reason for a in report.skipped}
    for path in ("shared_ln", "hand"):
        assert "called 2 times" in skipped[path] and "running statistics" in skipped[path], skipped
    assert isinstance(out.shared_ln, nn.LayerNorm) and isinstance(out.hand, HandLN)
    if method != "fx":  # fx has no shapes without inputs: ln is skipped for that, with its reason
        assert [a.path for a in report.converted] == ["ln"]


def test_ln_to_bn_calibrates_when_given_data():
    model = zoo.vit()
    ci = model.example_inputs()
    batches = synthetic_batches(ci, 3, seed=1)
    out, report = convert(model, "bn", example_inputs=ci, calibrate_batches=batches)
    assert report.calibration is not None and report.calibration.recalibrated == len(_ln_like_paths(model))
    bn = out.vit.layers[0].layernorm_before
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    # on the data it was calibrated on, BN in eval is close to BN with batch statistics
    assert any("calibrated" in n for n in report.notes)


def test_no_norms_of_the_kind_is_a_clear_error():
    model = zoo.resnet()
    with pytest.raises(NormSurgeonError, match="no LayerNorm or RMSNorm"):
        convert(model, "bn", example_inputs=model.example_inputs())
    vit = zoo.vit()
    with pytest.raises(NormSurgeonError, match="no BatchNorm"):
        convert(vit, "frozen", example_inputs=vit.example_inputs())
    with pytest.raises(NormSurgeonError, match="unknown to="):
        convert(vit, "batchnorm", example_inputs=vit.example_inputs())


# ------------------------------------------------------------------------------------------------
# BN -> LN / GN / frozen
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "levit"])
def test_bn_to_frozen_is_exact(name):
    model = zoo.MODELS[name]()
    ci = model.example_inputs()
    bns = {p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    with torch.no_grad():
        ref = ci.call(model)
    out, report = convert(model, "frozen", example_inputs=ci)
    assert {a.path for a in report.converted} == bns and not report.skipped
    assert all(isinstance(out.get_submodule(p), FrozenBatchNorm) for p in bns)
    assert report.function_preserving and report.verify["passed"]
    assert report.verify["sites_checked"] == len(bns) and report.verify["max_site_error"] < 1e-5
    with torch.no_grad():
        stats = compare_outputs(ref, ci.call(out))
    assert stats.max_rel_error < 1e-5
    assert report.verify["max_rel_error"] == pytest.approx(stats.max_rel_error, abs=1e-7)


def test_frozen_site_that_deviates_is_rolled_back(monkeypatch):
    model = zoo.resnet()
    ci = model.example_inputs()
    bad = "resnet.encoder.stages.1.layers.0.layer.1.normalization"
    real = FrozenBatchNorm.from_batchnorm.__func__

    def broken(cls, bn):
        frozen = real(cls, bn)
        if bn is broken.target:
            with torch.no_grad():
                frozen.bias.add_(0.5)  # a wrong shift: must be caught and undone
        return frozen

    monkeypatch.setattr(FrozenBatchNorm, "from_batchnorm", classmethod(broken))
    work = copy.deepcopy(model)
    broken.target = work.get_submodule(bad)
    out, report = convert(work, "frozen", example_inputs=ci, inplace=True)
    assert isinstance(out.get_submodule(bad), nn.BatchNorm2d)
    skipped = {a.path: a.reason for a in report.skipped}
    assert list(skipped) == [bad] and "rolled back" in skipped[bad]
    assert report.verify["rolled_back"] == 1 and report.verify["passed"]
    assert len(report.converted) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - 1
    with torch.no_grad():
        assert compare_outputs(ci.call(model), ci.call(out)).max_rel_error < 1e-5


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "levit"])
@pytest.mark.parametrize("to", ["ln", "gn"])
def test_bn_to_ln_and_gn_run_and_carry_state(name, to):
    model = zoo.MODELS[name]()
    ci = model.example_inputs()
    model.train()
    first = next(p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    model.get_submodule(first).weight.requires_grad_(False)
    before = dict(model.named_modules())
    out, report = convert(model, to, example_inputs=ci)
    assert not report.skipped and not report.function_preserving
    inspect_counts = inspect(out, ci).counts()
    assert "batchnorm" not in inspect_counts
    for a in report.converted:
        old, new = before[a.path], out.get_submodule(a.path)
        assert new.training  # train mode carried
        assert new.weight.dtype == old.weight.dtype
        torch.testing.assert_close(new.weight.detach(), old.weight.detach())
        assert new.weight.requires_grad == old.weight.requires_grad
        if to == "gn":
            assert isinstance(new, nn.GroupNorm) and new.num_groups == 1
        elif len(a.detail["input_shape"]) == 2:  # LeViT's BatchNorm1d on flattened (N, C)
            assert isinstance(new, nn.LayerNorm) and a.detail["from"] == "BatchNorm1d"
        else:
            assert isinstance(new, ChannelLayerNorm)
    assert out.get_submodule(first).weight.requires_grad is False
    loss = sum(t.float().sum() for t in ci.call(out).values() if isinstance(t, torch.Tensor))
    loss.backward()  # trains
    assert torch.isfinite(loss)


def test_gn_groups_checked_before_any_work():
    model = zoo.resnet()
    with pytest.raises(NormSurgeonError, match="does not divide"):
        convert(model, "gn", groups=3, example_inputs=model.example_inputs())
    out, report = convert(model, "gn", groups=4, example_inputs=model.example_inputs())
    assert all(out.get_submodule(a.path).num_groups == 4 for a in report.converted)
    with pytest.raises(NormSurgeonError, match="groups only goes with to=.gn."):
        convert(model, "ln", groups=4, example_inputs=model.example_inputs())


class BNZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_nc = nn.BatchNorm1d(6)
        self.bn_ncl = nn.BatchNorm1d(6)
        self.shared = nn.BatchNorm1d(6)
        self.stateless = nn.BatchNorm1d(6, track_running_stats=False)
        self.token = TokenBatchNorm(6)

    def forward(self, x):  # (N, 6, 4)
        y = self.bn_ncl(x)
        y = self.shared(y) + self.shared(y * 2)
        y = self.stateless(y)
        z = self.token(y.transpose(1, 2))  # channels last
        return self.bn_nc(z.mean(1))


def test_bn_layouts_from_the_graph():
    torch.manual_seed(0)
    model = BNZoo().eval()
    ci = CallArgs((torch.randn(3, 6, 4),), {})
    out, report = convert(model, "ln", example_inputs=ci)
    assert isinstance(out.bn_nc, nn.LayerNorm)  # (N, C)
    assert isinstance(out.bn_ncl, ChannelLayerNorm)  # (N, C, L)
    assert isinstance(out.shared, ChannelLayerNorm)  # shared, stateless target: replaced consistently
    assert isinstance(out.token, nn.LayerNorm)  # token BN over the last dim -> LN over the last dim
    assert "shared by 2 calls" in next(a for a in report.converted if a.path == "shared").detail["note"]
    out2, report2 = convert(model, "frozen", example_inputs=ci)
    skipped = {a.path: a.reason for a in report2.skipped}
    assert "track_running_stats=False" in skipped["stateless"]
    # a TokenBatchNorm holds a BatchNorm1d on (N, C): that child freezes exactly (issue 16 row 12)
    assert "token" not in skipped and isinstance(out2.token.bn, FrozenBatchNorm)
    assert "token" in {a.path for a in report2.converted}
    assert isinstance(out2.shared, FrozenBatchNorm) and report2.verify["passed"]


class TransposedBN(nn.BatchNorm1d):
    """A token BN written by hand: BatchNorm1d over the channels of a (B, T, C) input."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class HandTokenBN(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.tbn = TransposedBN(c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x):  # (B, T, C)
        y = self.tbn(self.fc(x))
        return self.bn(y.transpose(1, 2))  # a plain BN on (B, C, T)


def _trained_stats(model, ci):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            ci.call(model)
    return model.eval()


@pytest.mark.parametrize("tokens", [4, 6])  # 6 = C: the wrong axis would even have the right size
def test_bn_subclass_that_transposes_keeps_its_layout(tokens):
    torch.manual_seed(0)
    ci = CallArgs((torch.randn(3, tokens, 6),), {})
    model = _trained_stats(HandTokenBN(), ci)
    site = next(s for s in inspect(model, ci).sites if s.path == "tbn")
    assert (site.input_shape, site.dims) == ([3, tokens, 6], [0, 1])  # channels on the last dim of its input
    # frozen / gn normalize dim 1: that site is skipped with the reason, the plain BN still converts
    for to, cls in (("frozen", FrozenBatchNorm), ("gn", nn.GroupNorm)):
        out, report = convert(model, to, example_inputs=ci)
        skipped = {a.path: a.reason for a in report.skipped}
        assert set(skipped) == {"tbn"} and "last dim" in skipped["tbn"] and "dim 1" in skipped["tbn"], skipped
        assert isinstance(out.tbn, TransposedBN) and isinstance(out.bn, cls)
    # ln: the same layout, LN over the channels (the last dim) of each position
    out, report = convert(model, "ln", example_inputs=ci)
    assert isinstance(out.tbn, nn.LayerNorm) and out.tbn.normalized_shape == (6,)
    x = ci.args[0]
    with torch.no_grad():
        h = model.fc(x)
        torch.testing.assert_close(out.tbn(h), F.layer_norm(h, (6,), model.tbn.weight, model.tbn.bias, model.tbn.eps))


def test_cli_frozen_on_a_transposing_bn_subclass(tmp_path):
    torch.manual_seed(0)
    ci = CallArgs((torch.randn(3, 4, 6),), {})
    path = tmp_path / "m.pt"
    torch.save(_trained_stats(HandTokenBN(), ci), path)
    r = _cli(["convert", str(path), "--trust", "--input-shape", "3,4,6", "--to", "frozen", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [c["path"] for c in data["converted"]] == ["bn"] and data["verify"]["passed"]
    assert [s["path"] for s in data["skipped"]] == ["tbn"]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_convert_json_and_round_trip(tmp_path):
    out = tmp_path / "vit_bn.pt"
    r = _cli(["convert", "normsurgeon.zoo:vit", "--to", "bn", "--ffn-bn", "--calibrate-synthetic", "2",
              "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    vit = zoo.vit()
    lns, ffns = len(_ln_like_paths(vit)), vit.config.num_hidden_layers  # one FFN per encoder layer
    assert len(js["converted"]) == lns and len(js["inserted"]) == ffns and js["skipped"] == []
    assert all({"path", "from", "to"} <= set(d) for d in js["converted"])
    assert js["function_preserving"] is False and js["calibration"]["recalibrated"] == lns + ffns
    assert out.is_file()
    r = _cli(["inspect", str(out), "--trust", "--json"])
    assert r.exit_code == 0, r.output
    kinds = {n["kind"] for n in json.loads(r.stdout)["norms"]}
    assert kinds == {"batchnorm"}
    # a converted .pt loads without --trust? no: it is a pickled module
    r = _cli(["inspect", str(out)])
    assert r.exit_code == 2 and "--trust" in r.stderr


def test_cli_frozen_reports_verification(tmp_path):
    r = _cli(["convert", "normsurgeon.zoo:resnet", "--to", "frozen"])
    assert r.exit_code == 0, r.output
    assert "verified" in r.stdout and "passed" in r.stdout and "nothing written" in r.stdout


def test_cli_identity_ffn_with_calibration_file(tmp_path):
    data = tmp_path / "calib.pt"
    torch.save({"pixel_values": torch.randn(6, 3, 32, 32)}, data)
    r = _cli(["convert", "normsurgeon.zoo:vit", "--ffn-bn", "--ffn-bn-init", "identity", "--calibrate", str(data),
              "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["function_preserving"] is True and js["verify"]["passed"] is True
    assert len(js["inserted"]) == 2 and js["converted"] == []


@pytest.mark.parametrize("args, message", [
    (["--to", "batchnorm"], "Invalid value for '--to'"),  # choices from the swap registry
    (["--to", "gn", "--groups", "3"], "does not divide"),
    (["--to", "frozen"], "no BatchNorm"),
    (["--to", "bn", "--groups", "2"], "--groups only goes with --to gn"),
    (["--to", "bn", "--ffn-bn-position", "middle", "--ffn-bn"], "unknown --ffn-bn-position"),
    ([], "give a target (--to"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args, message):
    model = "normsurgeon.zoo:vit" if "frozen" in args else "normsurgeon.zoo:resnet"
    out = tmp_path / "out.pt"
    r = _cli(["convert", model, *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_calibration_data_fails_before_work(tmp_path):
    data = tmp_path / "calib.pt"
    torch.save({"pixel_values": torch.randn(6, 3, 16, 16)}, data)  # model takes 32x32
    out = tmp_path / "out.pt"
    r = _cli(["convert", "normsurgeon.zoo:vit", "--to", "bn", "--calibrate", str(data), "-o", str(out)])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "calibration data" in lines[0]
    assert not out.exists()


def test_cli_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    r = _cli(["convert", "normsurgeon.zoo:resnet", "--to", "frozen", "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"


class GemmaStyleRMS(nn.Module):
    """Hand-written RMSNorm scaling by (1 + weight), computed in float32."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(c) * 0.1), 1e-6

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class RMSThenLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rms, self.fc, self.ln = GemmaStyleRMS(8), nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.fc(self.rms(x)))


def test_one_plus_weight_rmsnorm_gets_the_offset():
    torch.manual_seed(0)
    model = RMSThenLN().eval()
    out, report = convert(model, "bn", example_inputs=(torch.randn(2, 3, 8),))
    assert {a.path for a in report.converted} == {"rms", "ln"}
    torch.testing.assert_close(out.rms.weight, model.rms.weight.detach() + 1)
    assert out.rms.eps == bn_eps(1e-6)
    assert "eps raised from 1e-06" in next(a for a in report.converted if a.path == "rms").detail["note"]  # read


def test_dtype_and_train_mode_carry_over_in_bfloat16():
    torch.manual_seed(0)
    model = RMSThenLN().to(torch.bfloat16).train()
    out, report = convert(model, "bn", example_inputs=(torch.randn(2, 3, 8, dtype=torch.bfloat16),))
    for path in ("rms", "ln"):
        bn = out.get_submodule(path)
        assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.bfloat16 and bn.training
    assert out(torch.randn(4, 3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("to", ["bn", "frozen"])
def test_every_module_keeps_its_own_train_eval_mode(to):
    """The model in eval with one module left in training mode (a BN, a dropout): after the
    calibration check, the conversion and the calibration, each module is in the mode it was."""
    from normsurgeon import api

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5), nn.LayerNorm(8), nn.Dropout(0.1), nn.Linear(8, 8),
                          nn.LayerNorm(8)).eval()
    model[1].train()  # (N, 5, 8): BatchNorm1d over dim 1
    model[3].train()
    ci = CallArgs((torch.randn(4, 5, 8),), {})
    batches = synthetic_batches(ci, 2, seed=1)
    api.check_calibration_batch(model, batches[0], "data.pt")  # what `convert --calibrate` runs first
    assert [m.training for m in model] == [False, True, False, True, False, False]
    out, report = api.convert(model, to, example_inputs=ci, calibrate_batches=batches, inplace=True)
    assert report.converted
    # (a TokenBatchNorm's BatchNorm1d child "2.bn" follows its parent)
    modes = {path: m.training for path, m in out.named_modules() if path and not path.endswith(".bn")}
    assert all(m.training == out.get_submodule(p[:-3]).training for p, m in out.named_modules() if p.endswith(".bn"))
    assert modes == {"0": False, "1": True, "2": False, "3": True, "4": False, "5": False}, modes


class _ThreeBNs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c3, self.c = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.c(self.c3(self.b(self.c2(self.a(self.c1(x))))))


class _WrongAtOtherBatch(nn.Module):
    """Right on the example's batch size (so its per-site check passes), wrong at any other."""

    def __init__(self, inner, batch):
        super().__init__()
        self.inner, self.batch = inner, batch

    def forward(self, x):
        y = self.inner(x)
        return y if x.shape[0] == self.batch else y + 1.0


def test_rolled_back_count_counts_each_rolled_back_site_once(monkeypatch):
    """Issue 12.3: sites rolled back by their own check and by the whole-model check are each counted
    once, and sites the whole-model check keeps are not counted at all."""
    model = _ThreeBNs().eval()
    for bn in (model.a, model.b, model.c):
        _randomize(bn)
    x = torch.randn(2, 3, 5, 5)
    real = FrozenBatchNorm.from_batchnorm.__func__

    def build(cls, bn):
        frozen = real(cls, bn)
        if bn is work.a:
            with torch.no_grad():
                frozen.bias.add_(0.5)  # wrong everywhere: caught by the per-site check
        if bn is work.b:
            return _WrongAtOtherBatch(frozen, 2)  # caught only by the whole-model check (batch 3 input)
        return frozen

    monkeypatch.setattr(FrozenBatchNorm, "from_batchnorm", classmethod(build))
    work = copy.deepcopy(model)
    out, report = convert(work, "frozen", example_inputs=(x,), inplace=True)
    rolled = [a.path for a in report.skipped if a.detail.get("rolled_back")]
    assert sorted(rolled) == ["a", "b"]
    assert report.verify["rolled_back"] == 2 and report.verify["passed"] is True
    assert isinstance(out.c, FrozenBatchNorm) and isinstance(out.a, nn.BatchNorm2d)


def test_frozen_with_fresh_ffn_bn_never_reports_an_unmade_check_as_passed():
    """Issue 12.2: a fresh FFN BN changes the function, so no whole-model comparison is possible; the
    frozen sites are checked one by one, and the report must not say the model "passed"."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.bn(x))))

    model = Block().eval()
    _randomize(model.bn)
    out, report = convert(model, "frozen", example_inputs=(torch.randn(4, 8),), ffn_bn=True)
    assert [a.path for a in report.converted] == ["bn"] and len(report.inserted) == 1
    assert not report.function_preserving
    assert report.verify["sites_checked"] == 1 and report.verify["max_site_error"] < 1e-5
    assert report.verify["passed"] is None and "not compared" in report.verify["whole_model"]
    assert "passed" not in " ".join(n for t in report.tables() for n in t.notes)


def _randomize(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn
