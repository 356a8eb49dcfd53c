"""Exact calibration whatever the batching (issue 19, items 8 and 11).

Each norm's statistics must come from its inputs computed by the eval model with every norm upstream
already calibrated: the same for batches of 1, 16 or 32, and for one process or two (gloo) on the
union. The expectation here is computed independently: one norm at a time in call order, a full
pass over the data each, with torch's own mean / var in float64.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from _dist_helpers import run_ranks

from normsurgeon import zoo
from normsurgeon.calibrate import calibrate
from normsurgeon.nn import PowerNorm, SyncTokenBatchNorm, TokenBatchNorm, padding_mask
from normsurgeon.nn.padding_mask import current_padding_mask
from normsurgeon.passes.convert import convert


def _norms(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, PowerNorm) or (isinstance(m, _BatchNorm) and m.track_running_stats)]


def _positions(m, x, mask):
    if isinstance(m, (TokenBatchNorm, PowerNorm)):
        if isinstance(m, PowerNorm) and m.group_scaling is not None:
            x = m.group_scaling(x)
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.bool()].double()
        return x.reshape(-1, m.num_features).double()
    return x.movedim(1, -1).reshape(-1, m.num_features).double()


def sequential_expectation(model, batches, masks=None):
    """Norm after norm in call order: capture its inputs over every batch (eval model, the norms
    before it already set), set its statistics, go on. Returns the calibrated copy."""
    model = copy.deepcopy(model).eval()
    order = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=n: order.append(name) if name not in order else None)
             for n, m in _norms(model)]
    with torch.no_grad():
        model(**batches[0])
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    for name in order:
        m = mods[name]
        xs = []
        for i, b in enumerate(batches):
            mask = None if masks is None else masks[i]
            h = m.register_forward_pre_hook(lambda mod, a: xs.append(_positions(mod, a[0], mask)))
            with torch.no_grad():
                model(**b)
            h.remove()
        x = torch.cat(xs)
        with torch.no_grad():
            if isinstance(m, PowerNorm):
                m.running_phi.copy_(x.square().mean(0))
            else:
                m.running_mean.copy_(x.mean(0))
                m.running_var.copy_(x.var(0, unbiased=True))
    return model


def _stats(model):
    out = {}
    for n, m in _norms(model):
        if isinstance(m, PowerNorm):
            out[n + ".phi"] = m.running_phi.double().clone()
        else:
            out[n + ".mean"] = m.running_mean.double().clone()
            out[n + ".var"] = m.running_var.double().clone()
    return out


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def _bn_vit():
    torch.manual_seed(0)
    model = zoo.vit()
    bn_vit, report = convert(model, "bn", example_inputs=model.example_inputs(), ffn_bn=True)
    assert len(report.converted) == 5 and len(report.inserted) == 2
    return bn_vit.eval()


def _pixels(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5


def test_converted_vit_calibrates_the_same_for_batches_of_1_16_32():
    model = _bn_vit()
    data = _pixels()
    results = {}
    for size in (1, 16, 32):
        m = copy.deepcopy(model)
        report = calibrate(m, [{"pixel_values": x} for x in data.split(size)])
        assert report.recalibrated == 7 and report.samples == 32 and report.batches == 32 // size
        results[size] = (_stats(m), report.passes)
    want = _stats(sequential_expectation(model, [{"pixel_values": data}]))
    for size in (1, 16, 32):
        _assert_same(results[size][0], want)
    for a, b in ((1, 32), (16, 32)):  # and with each other, to 1e-5 relative
        for k in want:
            x, y = results[a][0][k], results[b][0][k]
            rel = ((x - y).abs() / y.abs().clamp_min(1e-3)).max().item()
            assert rel < 1e-5, (a, b, k, rel)
    assert {p for _, p in results.values()} == {7}  # a chain of 7 token BNs: one pass per depth


def test_resnet_calibrates_independent_bns_in_one_pass_and_restores_modes():
    model = zoo.resnet()
    model.resnet.encoder.train()
    modes = {n: m.training for n, m in model.named_modules()}
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(b, 3, 32, 32, generator=g)} for b in (3, 1, 5)]
    want = _stats(sequential_expectation(model, batches))
    progress = []
    report = calibrate(model, batches, progress=lambda d, t: progress.append((d, t)))
    _assert_same(_stats(model), want)
    n_bns = len(_norms(model))
    # the shortcut BN and the first BN of its block read the same input: they share a pass
    assert report.recalibrated == n_bns and report.passes < n_bns
    assert progress[-1] == (3 * report.passes, 3 * report.passes)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert report.to_json()["passes"] == report.passes


def test_power_norm_running_quadratic_mean_is_calibrated_on_real_tokens():
    torch.manual_seed(0)
    bert = zoo.bert()
    ids = bert.example_inputs().kwargs["input_ids"]
    pn, report = convert(bert, "pn", example_inputs=bert.example_inputs())
    pns = [m for m in pn.modules() if isinstance(m, PowerNorm)]
    assert len(pns) >= 3
    pn.eval()
    warm = [int(m.num_batches_tracked) for m in pns]
    g = torch.Generator().manual_seed(2)
    batches, masks = [], []
    for b, lengths in ((3, (12, 7, 4)), (2, (9, 12))):
        x = torch.randint(0, 100, (b, ids.shape[1]), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": x, "attention_mask": mask})
        masks.append(mask)
    want = _stats(sequential_expectation(pn, batches, masks))
    cal = calibrate(pn, batches)
    assert cal.recalibrated == len(pns)
    _assert_same(_stats(pn), want)
    assert not torch.allclose(pns[0].running_phi, torch.ones_like(pns[0].running_phi))
    assert [int(m.num_batches_tracked) for m in pns] == warm  # the warm-up clock is not calibration's
    assert current_padding_mask() is None  # passes cut short leave no mask behind

    # convert --to pn --calibrate: the same statistics, set inside the conversion
    pn2, report2 = convert(bert, "pn", example_inputs=bert.example_inputs(), calibrate_batches=batches)
    assert report2.calibration is not None and report2.calibration.recalibrated == len(pns)
    _assert_same(_stats(pn2), want)


# -- two processes (gloo) against one ------------------------------------------------------------------

def _calibrate_worker(rank, tmp):
    model = _bn_vit()
    data = _pixels()
    # rank 0: its 12 samples one by one; rank 1: the other 20 in batches of 16 and 4
    mine = list(data[:12].split(1)) if rank == 0 else list(data[12:].split(16))
    report = calibrate(model, [{"pixel_values": x} for x in mine])
    torch.save({"stats": _stats(model), "report": report.to_json()}, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_with_other_batchings_equal_one_process_at_batch_32(tmp_path):
    run_ranks(_calibrate_worker, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in got[0]["stats"].items():
        assert torch.equal(v, got[1]["stats"][k]), k  # every rank sets the same statistics
    rep = got[0]["report"]
    assert (rep["world_size"], rep["samples"], rep["batches"], rep["passes"]) == (2, 32, 14, 7)
    single = _bn_vit()
    calibrate(single, [{"pixel_values": _pixels()}])
    _assert_same(got[0]["stats"], _stats(single))


C = 6


def _sync_mask_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, C, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = 1e3  # padding far off: counting it would move mean and variance a lot
    return x, mask


def _sync_mask_worker(rank, tmp):
    x, mask = _sync_mask_data()
    lo, hi = (0, 2) if rank == 0 else (2, 5)
    torch.manual_seed(0)
    bn = SyncTokenBatchNorm(C, momentum=None).double().train()
    xs = x[lo:hi].clone().requires_grad_(True)
    with padding_mask(mask[lo:hi]):
        out = bn(xs)
    out[mask[lo:hi]].square().sum().backward()
    torch.save({"out": out.detach(), "grad": xs.grad, "mean": bn.running_mean, "var": bn.running_var},
               os.path.join(tmp, f"sync{rank}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_sync_token_batch_norm_counts_only_real_tokens_of_every_rank(tmp_path):
    run_ranks(_sync_mask_worker, tmp_path, str(tmp_path))
    got = [torch.load(tmp_path / f"sync{r}.pt", weights_only=True) for r in range(2)]
    x, mask = _sync_mask_data()
    ref = TokenBatchNorm(C, momentum=None).double().train()
    xu = x.clone().requires_grad_(True)
    with padding_mask(mask):
        out = ref(xu)
    out[mask].square().sum().backward()
    for r, (lo, hi) in enumerate(((0, 2), (2, 5))):
        torch.testing.assert_close(got[r]["out"], out.detach()[lo:hi], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[r]["grad"], xu.grad[lo:hi], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[r]["mean"], ref.running_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[r]["var"], ref.running_var, rtol=1e-9, atol=1e-9)


class _Untraceable(nn.Module):
    """A chain of two BNs whose forward refuses to run under a dispatch mode (as some custom ops do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        if _get_current_dispatch_mode() is not None:
            raise RuntimeError("no dispatch modes here")
        return self.b(torch.relu(self.a(x)) * 2)


def test_untraceable_model_is_calibrated_one_norm_per_pass_in_call_order():
    model = _Untraceable().eval()
    g = torch.Generator().manual_seed(3)
    data = torch.randn(12, 3, generator=g) * 3 + 1
    report = calibrate(model, [{"x": t} for t in data.split(5)])
    assert report.passes == 2 and any("could not be traced" in n for n in report.notes)
    _assert_same(_stats(model), _stats(sequential_expectation(model, [{"x": data}])))


TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_cli_under_torchrun_equals_one_process_whatever_the_batching(tmp_path):
    """`torchrun ... calibrate` on a converted ViT, rank 0 with 12 batches of 1, rank 1 with batches of
    16 and 4: the written statistics equal one process calibrating all 32 samples in one batch."""
    from normsurgeon.loading import save_model

    model = _bn_vit()
    save_model(model, tmp_path / "vit_bn.pt", example_inputs=model.example_inputs())
    data = _pixels()
    torch.save(list(data[:12].split(1)), tmp_path / "c-0.pt")
    torch.save(list(data[12:].split(16)), tmp_path / "c-1.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "normsurgeon", "calibrate",
                          str(tmp_path / "vit_bn.pt"), "--trust", "--data", str(tmp_path / "c-{rank}.pt"),
                          "-o", str(tmp_path / "out.pt"), "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert (report["world_size"], report["samples"], report["batches"], report["passes"]) == (2, 32, 14, 7)
    single = _bn_vit()
    calibrate(single, [{"pixel_values": data}])
    _assert_same(_stats(torch.load(tmp_path / "out.pt", weights_only=False)), _stats(single))
