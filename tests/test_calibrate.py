"""normsurgeon.calibrate: exact BN statistics, mode handling, torch.distributed, data loading."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from _dist_helpers import run_ranks

from normsurgeon import zoo
from normsurgeon.calibrate import (CalibrationReport, calibrate, load_calibration_data,
                                   synthetic_batches)
from normsurgeon.errors import NormSurgeonError
from normsurgeon.inputs import CallArgs
from normsurgeon.nn import TokenBatchNorm, ffn_batchnorm, make_identity


def _bns(model):
    """Every BN by the path calibrate reports: a TokenBatchNorm, not its BatchNorm1d child."""
    children = {id(m.bn) for m in model.modules() if isinstance(m, TokenBatchNorm)}
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, _BatchNorm) and id(m) not in children) or isinstance(m, TokenBatchNorm)]


def expected_stats(model, batches):
    """Independent expectation (exact calibration's definition): BN after BN in call order, run every
    batch through the eval model with the BNs before it already set, capture its inputs, set its
    mean and unbiased variance (float64, torch's own) and go on."""
    model = copy.deepcopy(model).eval()

    def run(b):
        with torch.no_grad():
            b.call(model) if isinstance(b, CallArgs) else model(b)

    order = []
    hooks = [bn.register_forward_pre_hook(lambda mod, a, name=name: order.append(name) if name not in order else None)
             for name, bn in _bns(model)]
    for b in batches:
        run(b)
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    out = {}
    for name in order:
        bn = mods[name]
        if not bn.track_running_stats:
            continue
        xs = []

        def hook(mod, args):
            x = args[0].detach().double()
            c = mod.num_features
            xs.append(x.reshape(-1, c) if isinstance(mod, TokenBatchNorm) else x.movedim(1, -1).reshape(-1, c))
        h = bn.register_forward_pre_hook(hook)
        for b in batches:
            run(b)
        h.remove()
        x = torch.cat(xs)
        out[name] = (x.mean(0), x.var(0, unbiased=True), len(xs))
        with torch.no_grad():
            bn.running_mean.copy_(out[name][0])
            bn.running_var.copy_(out[name][1])
    return out


def assert_calibrated(model, expected, rtol=1e-5, atol=1e-6):
    for name, bn in _bns(model):
        mean, var, calls = expected[name]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=rtol, atol=atol, msg=f"{name} mean")
        torch.testing.assert_close(bn.running_var.double(), var, rtol=rtol, atol=atol, msg=f"{name} var")
        assert int(bn.num_batches_tracked) == calls, name


def pixel_batches(sizes, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [CallArgs((), {"pixel_values": torch.randn(b, 3, size, size, generator=g) * 2 + 0.5}) for b in sizes]


# ---------------------------------------------------------------------------------------------------
# calibrate on real models
# ---------------------------------------------------------------------------------------------------

def test_calibrate_resnet_exact_with_unequal_batches():
    model = zoo.resnet()
    model.resnet.encoder.train()  # a mixed train/eval state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    momenta = {n: m.momentum for n, m in _bns(model)}
    batches = pixel_batches([3, 5, 2, 6])
    expected = expected_stats(model, batches)

    # the naive approach (BN's own cumulative average, as torch.optim.swa_utils.update_bn) is not
    # exact for unequal batch sizes: this test tells the two apart
    naive = copy.deepcopy(model)
    naive.eval()
    for _, bn in _bns(naive):
        bn.reset_running_stats(), bn.train()
        bn.momentum = None
    with torch.no_grad():
        for b in batches:
            b.call(naive)
    assert any(not torch.allclose(bn.running_var.double(), expected[n][1], rtol=1e-3)
               for n, bn in _bns(naive))

    progress = []
    report = calibrate(model, batches, progress=lambda done, total: progress.append((done, total)))
    assert_calibrated(model, expected)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: m.momentum for n, m in _bns(model)} == momenta
    assert progress == [(i, 4 * report.passes) for i in range(1, 4 * report.passes + 1)]
    assert report.recalibrated == len(_bns(model)) and report.batches == 4 and report.samples == 16
    assert report.norms[0]["positions"] > 0 and report.skipped == []
    js = report.to_json()
    assert js["recalibrated"] == report.recalibrated and js["norms"][0]["path"] == report.norms[0]["path"]
    assert report.tables()[0].rows and len(report.tables()[0].rows) == report.recalibrated


def test_calibrate_vit_with_token_batchnorm():
    model = zoo.vit()
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.LayerNorm):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], TokenBatchNorm.from_layernorm(mod))
            swapped += 1
    assert swapped >= 5
    batches = synthetic_batches(model.example_inputs(), 3, seed=1, batch_size=3) + \
        synthetic_batches(model.example_inputs(), 2, seed=2, batch_size=5)
    expected = expected_stats(model, batches)
    report = calibrate(model, iter(batches))  # a plain iterator: no length known
    assert report.recalibrated == swapped and report.samples == 19
    assert_calibrated(model, expected)
    tbn = next(m for _, m in _bns(model))
    assert report.norms[0]["positions"] == 19 * 17  # batch x tokens (16 patches + CLS)
    assert not torch.allclose(tbn.running_var, torch.ones_like(tbn.running_var))
    assert not model.training


class _Net(nn.Module):
    """Dropout before a BN, a token BN, and a BatchNorm1d on (B, C) with few values per channel."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.tbn = TokenBatchNorm(16)
        self.fc2 = nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(4)
        self.spare = nn.BatchNorm1d(4)  # never called
        self.drop_modes = []

    def forward(self, x):
        h = self.tbn(self.drop(self.fc1(x)))
        self.drop_modes.append(self.drop.training)
        return self.bn(self.fc2(torch.relu(h)).mean(1))


def test_calibrate_dropout_stays_off_and_modes_restored():
    torch.manual_seed(0)
    model = _Net().train()  # user's model in train mode: dropout on outside calibration
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(b, 5, 8, generator=g) for b in (3, 2, 4)]
    spare_mean = model.spare.running_mean.clone()
    expected = expected_stats(model, batches)
    report = calibrate(model, batches)
    assert set(model.drop_modes) == {False}
    assert all(m.training for m in model.modules())
    assert model.tbn.momentum == 0.1
    for name in ("tbn", "bn"):
        mean, var, _ = expected[name]
        torch.testing.assert_close(getattr(model, name).running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(model, name).running_var.double(), var, rtol=1e-5, atol=1e-6)
    # 9 samples for bn: unbiased (n-1) variance, clearly different from the biased one
    assert not torch.allclose(model.bn.running_var.double(), expected["bn"][1] * 8 / 9, rtol=1e-3)
    assert torch.equal(model.spare.running_mean, spare_mean)
    assert [s["path"] for s in report.skipped] == ["spare"]
    assert report.recalibrated == 2 and report.batches == 3 and report.samples == 9


def test_calibrate_max_batches_errors_and_skips():
    torch.manual_seed(0)
    model = _Net().eval()
    model.tbn.momentum = 0.3
    untracked = nn.BatchNorm1d(4, track_running_stats=False)
    model.add_module("untracked", untracked.eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 5, 8, generator=g) for _ in range(5)]
    calls = []
    report = calibrate(model, batches, max_batches=2, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (2 * report.passes, 2 * report.passes) and report.batches == 2
    exp = expected_stats(model, batches[:2])
    torch.testing.assert_close(model.tbn.running_mean.double(), exp["tbn"][0], rtol=1e-5, atol=1e-6)
    assert any(s["path"] == "untracked" and "track_running_stats" in s["reason"] for s in report.skipped)

    # a failing batch leaves statistics, momentum and modes as they were
    model.load_state_dict(before)
    bad = batches[:2] + [torch.randn(4, 5, 7)]
    with pytest.raises(RuntimeError):
        calibrate(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.tbn.momentum == 0.3 and not any(m.training for m in model.modules())

    # BatchNorm1d on (N, C) has no variance from one sample overall: a clear error, not torch's;
    # batches of one sample are fine (the model runs in eval, statistics merge across batches)
    with pytest.raises(NormSurgeonError, match="single sample"):
        calibrate(model, [torch.randn(1, 5, 8)])
    report = calibrate(model, [torch.randn(1, 5, 8) for _ in range(3)])
    assert report.recalibrated == 2 and model.bn.num_batches_tracked == 3


def test_calibrate_syncbatchnorm_single_process_and_ffn_identity():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU())
    ffn = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
    model = nn.ModuleDict({"inner": inner, "ffn": ffn}).eval()

    def run(m, x):
        return m["ffn"](m["inner"](x).flatten(2).transpose(1, 2))

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return run(self.m, x)

    wrapped = Wrap(model).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 3, 6, 6, generator=g) for b in (2, 3)]
    calibrate(wrapped, batches)
    assert "forward" not in inner[1].__dict__  # the temporary local forward is gone
    exp = expected_stats(wrapped, batches)
    torch.testing.assert_close(inner[1].running_var.double(), exp["m.inner.1"][1], rtol=1e-5, atol=1e-6)

    # insert an identity-initialised FFN BN, calibrate it, make it an identity again: eval unchanged
    x = torch.randn(2, 3, 6, 6)
    before = wrapped(x)
    ffn.insert(2, ffn_batchnorm(12, identity_init=True).eval())
    calibrate(wrapped, batches)
    bn = ffn[2]
    assert not torch.allclose(bn.running_var, torch.ones(12), atol=1e-2)
    assert not torch.allclose(wrapped(x), before, atol=1e-3)  # stats changed -> no longer identity
    make_identity(bn)
    torch.testing.assert_close(wrapped(x), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# torch.distributed
# ---------------------------------------------------------------------------------------------------

def _dist_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                         nn.SyncBatchNorm(6), nn.Flatten(2), nn.Linear(4, 8), TokenBatchNorm(8)).eval()


def _dist_batches(rank):
    g = torch.Generator().manual_seed(100 + rank)
    sizes = [(3, 5), (4, 2, 6)][rank]  # different data, batch sizes and number of batches per rank
    return [torch.randn(b, 3, 6, 6, generator=g) * (rank + 1) + rank for b in sizes]


def _dist_worker(rank, out_dir):
    model = _dist_model()
    report = calibrate(model, _dist_batches(rank))
    torch.save({"state": model.state_dict(), "report": report.to_json()}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_calibrate_distributed_equals_single_process_on_union(tmp_path):
    run_ranks(_dist_worker, tmp_path, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in results[0]["state"].items():  # every rank ends with identical statistics
        assert torch.equal(v, results[1]["state"][k]), k
    assert results[0]["report"]["world_size"] == 2
    assert results[0]["report"]["batches"] == 5 and results[0]["report"]["samples"] == 20

    union = _dist_batches(0) + _dist_batches(1)
    single = _dist_model()
    expected = expected_stats(single, union)
    calibrate(single, union)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(results[0]["state"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    dist_model = _dist_model()
    dist_model.load_state_dict(results[0]["state"])
    assert_calibrated(dist_model, expected)


# ---------------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------------

def _pixels_example(batch=2):
    return CallArgs((), {"pixel_values": torch.randn(batch, 3, 8, 8)})


def test_load_pt_tensor_splits_into_batches(tmp_path):
    data = torch.randn(70, 3, 8, 8, dtype=torch.float64)
    torch.save(data, tmp_path / "d.pt")
    batches = load_calibration_data(tmp_path / "d.pt", _pixels_example())
    assert [b.kwargs["pixel_values"].shape[0] for b in batches] == [32, 32, 6]
    assert all(b.kwargs["pixel_values"].dtype == torch.float32 for b in batches)
    torch.testing.assert_close(torch.cat([b.kwargs["pixel_values"] for b in batches]), data.float())
    sizes = [b.kwargs["pixel_values"].shape[0] for b in load_calibration_data(tmp_path / "d.pt", _pixels_example(), 23)]
    assert sizes == [23, 23, 24]  # a trailing single sample joins the previous batch


def test_load_pt_list_and_dict(tmp_path):
    parts = [torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    torch.save(parts, tmp_path / "list.pt")
    batches = load_calibration_data(tmp_path / "list.pt", _pixels_example())
    assert [b.kwargs["pixel_values"].shape[0] for b in batches] == [4, 3]  # batches kept as given
    assert torch.equal(batches[1].kwargs["pixel_values"], parts[1])
    assert len(load_calibration_data(tmp_path / "list.pt", _pixels_example(), batch_size=7)) == 1

    example = CallArgs((torch.randn(2, 5), torch.randint(0, 9, (2, 4))), {})
    torch.save({"input_0": torch.randn(6, 5), "input_1": torch.randint(0, 9, (6, 4), dtype=torch.int32)},
               tmp_path / "dict.pt")
    batches = load_calibration_data(tmp_path / "dict.pt", example, batch_size=3)
    assert len(batches) == 2 and batches[0].args[1].dtype == torch.int64 and batches[0].args[0].shape == (3, 5)
    torch.save([torch.randn(6, 5), torch.randint(0, 9, (6, 4))], tmp_path / "pos.pt")
    assert len(load_calibration_data(tmp_path / "pos.pt", example, batch_size=2)) == 3

    torch.save({"input_0": torch.randn(6, 5)}, tmp_path / "missing.pt")
    with pytest.raises(NormSurgeonError, match="missing"):
        load_calibration_data(tmp_path / "missing.pt", example)
    torch.save({"input_0": torch.randn(6, 5), "input_1": torch.randint(0, 9, (5, 4))}, tmp_path / "uneven.pt")
    with pytest.raises(NormSurgeonError, match="different numbers of samples"):
        load_calibration_data(tmp_path / "uneven.pt", example)


def test_load_numpy_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    arr = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "d.npy", arr)
    np.savez(tmp_path / "d.npz", arr)  # stored as arr_0: a one-input model takes any name
    np.savez(tmp_path / "named.npz", pixel_values=arr)
    save_file({"pixel_values": torch.from_numpy(arr)}, str(tmp_path / "d.safetensors"))
    for name in ("d.npy", "d.npz", "named.npz", "d.safetensors"):
        batches = load_calibration_data(tmp_path / name, _pixels_example(), batch_size=4)
        assert [b.kwargs["pixel_values"].shape[0] for b in batches] == [4, 4, 2], name
        np.testing.assert_array_equal(torch.cat([b.kwargs["pixel_values"] for b in batches]).numpy(), arr)


def test_load_rejects_bad_data(tmp_path):
    torch.save(torch.randn(10, 3, 16, 16), tmp_path / "size.pt")
    with pytest.raises(NormSurgeonError, match=r"does not fit the model input.*expected \(N, 3, 8, 8\)"):
        load_calibration_data(tmp_path / "size.pt", _pixels_example())
    torch.save(torch.randn(3, 8, 8), tmp_path / "rank.pt")
    with pytest.raises(NormSurgeonError, match=r"shape \(3, 8, 8\), which does not fit"):
        load_calibration_data(tmp_path / "rank.pt", _pixels_example())
    np.save(tmp_path / "u8.npy", np.zeros((4, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(NormSurgeonError, match="uint8"):
        load_calibration_data(tmp_path / "u8.npy", _pixels_example())
    torch.save({"obj": CalibrationReport()}, tmp_path / "pickled.pt")
    with pytest.raises(NormSurgeonError, match="cannot read"):
        load_calibration_data(tmp_path / "pickled.pt", _pixels_example())
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(NormSurgeonError, match="unknown format"):
        load_calibration_data(tmp_path / "d.csv", _pixels_example())
    with pytest.raises(NormSurgeonError, match="does not exist"):
        load_calibration_data(tmp_path / "nope.pt", _pixels_example())


def test_loaded_data_calibrates_a_zoo_model(tmp_path):
    model = zoo.mobilenet_v2()
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "d.npy", (torch.randn(11, 3, 32, 32, generator=g)).numpy())
    batches = load_calibration_data(tmp_path / "d.npy", model.example_inputs(), batch_size=4)
    assert [b.kwargs["pixel_values"].shape[0] for b in batches] == [4, 4, 3]
    expected = expected_stats(model, batches)
    report = calibrate(model, batches)
    assert report.samples == 11
    assert_calibrated(model, expected, rtol=1e-4, atol=1e-5)


def test_synthetic_batches():
    ex = zoo.bert().example_inputs()
    a = synthetic_batches(ex, 3, seed=5, batch_size=4)
    b = synthetic_batches(ex, 3, seed=5, batch_size=4)
    assert len(a) == 3 and a[0].kwargs["input_ids"].shape == (4, 12)
    assert all(torch.equal(x.kwargs["input_ids"], y.kwargs["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0].kwargs["input_ids"], a[1].kwargs["input_ids"])
