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
from normsurgeon.nn import ChannelLayerNorm, FrozenBatchNorm, TokenBatchNorm
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
    assert out.norm.eps == pytest.approx(model.norm.variance_epsilon)
    torch.testing.assert_close(out.norm.weight, model.norm.weight.detach())


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
    assert out.hand.eps == pytest.approx(1e-6)
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


def test_ln_to_bn_calibrates_when_given_data():
    model = zoo.vit()
    ci = model.example_inputs()
    batches = synthetic_batches(ci, 3, seed=1)
    out, report = convert(model, "bn", example_inputs=ci, calibrate_batches=batches)
    assert report.calibration is not None and report.calibration.recalibrated == 5
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
    with pytest.raises(NormSurgeonError, match="unknown --to"):
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
    assert len(report.converted) == 7
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
    with pytest.raises(NormSurgeonError, match="--groups only goes with --to gn"):
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
    assert "normalizes dim 1" in skipped["token"]
    assert isinstance(out2.shared, FrozenBatchNorm) and report2.verify["passed"]


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
    assert len(js["converted"]) == 5 and len(js["inserted"]) == 2 and js["skipped"] == []
    assert all({"path", "from", "to"} <= set(d) for d in js["converted"])
    assert js["function_preserving"] is False and js["calibration"]["recalibrated"] == 7
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
    (["--to", "batchnorm"], "unknown --to"),
    (["--to", "gn", "--groups", "3"], "does not divide"),
    (["--to", "frozen"], "no BatchNorm"),
    (["--to", "bn", "--groups", "2"], "--groups only goes with --to gn"),
    (["--to", "bn", "--ffn-bn-position", "middle", "--ffn-bn"], "unknown --ffn-bn-position"),
    ([], "give --to"),
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
    assert out.rms.eps == pytest.approx(1e-6)


def test_dtype_and_train_mode_carry_over_in_bfloat16():
    torch.manual_seed(0)
    model = RMSThenLN().to(torch.bfloat16).train()
    out, report = convert(model, "bn", example_inputs=(torch.randn(2, 3, 8, dtype=torch.bfloat16),))
    for path in ("rms", "ln"):
        bn = out.get_submodule(path)
        assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.bfloat16 and bn.training
    assert out(torch.randn(4, 3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


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
