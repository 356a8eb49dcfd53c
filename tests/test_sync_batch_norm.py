"""Synchronized BatchNorm for converted models (issue 12, item 10).

Real torch.distributed: 2 processes over gloo (CPU), started by tests/_dist_helpers.run_ranks. Each
worker also computes the single-process reference on the union batch and asserts equality; an
assertion in a worker fails the test through spawn.
"""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normsurgeon import zoo
from normsurgeon.calibrate import calibrate
from normsurgeon.passes.convert import convert
from normsurgeon.errors import NormSurgeonError
from normsurgeon.nn import SyncTokenBatchNorm, TokenBatchNorm, convert_sync_batchnorm

from _dist_helpers import WORLD, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")


def _close(a, b, what, atol=1e-10, rtol=1e-8):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {err}"


# -- exactness: 2 ranks == one process on the union batch ---------------------------------------------

C = T = 5  # tokens == channels: the case torch's idiom gets silently wrong


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, C), TokenBatchNorm(C, momentum=0.1), nn.GELU(), nn.Linear(C, C),
                          TokenBatchNorm(C, momentum=None, bias=False), nn.Linear(C, 3)).double()
    with torch.no_grad():  # non-trivial affine, so weight/bias gradients are tested too
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def _batches():
    gen = torch.Generator().manual_seed(1)
    # unequal rank shares (3 and 2 samples), the second input offset so that means matter
    return [torch.randn(5, T, C, generator=gen, dtype=torch.float64) * 2 + 3 for _ in range(3)]


SPLIT = (3, 2)


def _exact_worker(rank):
    ref = _small_model()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    assert [type(m) for m in model if isinstance(m, TokenBatchNorm)] == [SyncTokenBatchNorm] * 2
    assert model[4].bias is None  # bias=False kept
    lo = sum(SPLIT[:rank])
    hi = lo + SPLIT[rank]
    for step, union in enumerate(_batches()):
        xs = union[lo:hi].clone().requires_grad_(True)
        xu = union.clone().requires_grad_(True)
        out = model(xs)
        out_ref = ref(xu)
        _close(out, out_ref[lo:hi], f"step {step} output")
        # loss of the union = sum of the ranks' losses; a non-uniform weight makes every
        # gradient path (through mean and variance) matter
        w = torch.linspace(-1, 2, 3, dtype=torch.float64)
        (out.pow(2) * w).sum().backward()
        (out_ref.pow(2) * w).sum().backward()
        _close(xs.grad, xu.grad[lo:hi], f"step {step} input grad")
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            _close(g, p_ref.grad, f"step {step} grad of {name}")
        for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
            _close(b.double(), b_ref.double(), f"step {step} buffer {name}")
        model.zero_grad()
        ref.zero_grad()
    # one value per channel over all ranks cannot be normalized: every rank raises, none hangs
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model[1](torch.randn(1 - rank, C, dtype=torch.float64))
    # eval: the running statistics alone, identical on both ranks
    model.eval()
    ref.eval()
    x = _batches()[0]
    _close(model(x), ref(x), "eval output")


def test_two_ranks_equal_one_process_on_the_union_batch(tmp_path):
    run_ranks(_exact_worker, tmp_path)


# -- a converted ViT trains under DDP -------------------------------------------------------------------

STEPS = 3
BATCH = 4  # per rank


def _vit_bn():
    torch.manual_seed(0)
    model = zoo.vit()
    bn_vit, report = convert(model, "bn", example_inputs=model.example_inputs(), ffn_bn=True)
    assert len(report.converted) == 5 and len(report.inserted) == 2
    return bn_vit.train()


def _vit_data(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (WORLD * BATCH,), generator=gen)


def _ddp_worker(rank):
    ref = _vit_bn()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    assert sum(isinstance(m, SyncTokenBatchNorm) for m in model.modules()) == 7
    assert not any(type(m) is TokenBatchNorm for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model)
    # SGD: its update is linear in the gradient, so float rounding stays at rounding size (Adam's
    # first step is lr * sign(grad), which turns rounding noise on a near-zero gradient into lr)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    lo, hi = rank * BATCH, (rank + 1) * BATCH
    for step in range(STEPS):
        x, y = _vit_data(step)
        loss = nn.functional.cross_entropy(ddp(pixel_values=x[lo:hi]).logits, y[lo:hi])
        opt.zero_grad()
        loss.backward()
        assert math.isfinite(loss.item())
        opt.step()
        if rank == 0:  # the reference once (the ranks are compared with each other below)
            # one process on the union batch: DDP averages the ranks' gradients, which equals the
            # gradient of the mean loss over the union when the BN statistics are the union's
            loss_ref = nn.functional.cross_entropy(ref(pixel_values=x).logits, y)
            opt_ref.zero_grad()
            loss_ref.backward()
            for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
                _close(p.grad, p_ref.grad, f"step {step} grad of {name}", atol=1e-6, rtol=1e-4)
            opt_ref.step()
    if rank == 0:
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            _close(p, p_ref, f"parameter {name} after {STEPS} steps", atol=1e-5, rtol=1e-4)
        for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
            _close(b.double(), b_ref.double(), f"buffer {name} after {STEPS} steps", atol=2e-5, rtol=1e-4)
    # the ranks agree exactly (DDP synchronizes gradients, the BNs their statistics)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        other = t.detach().clone()
        dist.broadcast(other, src=0)
        assert torch.equal(other, t.detach()), f"{name} differs between ranks"


def test_converted_vit_trains_under_ddp_with_two_processes(tmp_path):
    run_ranks(_ddp_worker, tmp_path)


# -- the torch idiom fails loudly -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_vit():
    return _vit_bn()


def test_torch_idiom_synchronizes_a_token_batch_norm_correctly(converted_vit):
    """issue 16 row 12: no import-time patch of torch; its own converter turns each TokenBatchNorm's
    BatchNorm1d child (which sees (N, C)) into a SyncBatchNorm, and the model computes what it did."""
    bn_vit = copy.deepcopy(converted_vit).eval()
    x = zoo.vit().example_inputs()
    with torch.no_grad():
        expected = x.call(bn_vit).logits
    out = nn.SyncBatchNorm.convert_sync_batchnorm(bn_vit)
    assert out is bn_vit
    tokens = [m for m in bn_vit.modules() if isinstance(m, TokenBatchNorm)]
    assert len(tokens) == 7 and all(type(m.bn) is nn.SyncBatchNorm for m in tokens)
    with torch.no_grad():
        assert torch.equal(x.call(bn_vit).logits, expected)


@pytest.mark.parametrize("train", [False, True])
def test_torch_idiom_keeps_the_token_axis_when_tokens_equal_channels(train):
    """T == C is where a SyncBatchNorm in place of the token BN would silently normalize the token axis."""
    torch.manual_seed(0)
    for cls in (TokenBatchNorm, SyncTokenBatchNorm):
        model = nn.Sequential(nn.Linear(6, 6), cls(6))
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
        model.train(train)
        ref = copy.deepcopy(model)
        x = torch.randn(4, 6, 6)
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert type(model[1]) is cls and type(model[1].bn) is nn.SyncBatchNorm
        assert torch.equal(model(x), ref(x))
        assert torch.equal(model[1].running_var, ref[1].running_var)


def test_import_leaves_torch_and_sys_path_alone():
    code = ("import sys, torch; before = (torch.nn.SyncBatchNorm.__dict__['convert_sync_batchnorm'], list(sys.path));"
            "import normsurgeon, normsurgeon.api, normsurgeon.nn;"
            "after = (torch.nn.SyncBatchNorm.__dict__['convert_sync_batchnorm'], list(sys.path));"
            "assert before[0] is after[0], 'torch patched'; assert before[1] == after[1], 'sys.path changed'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_torch_idiom_unchanged_for_plain_batch_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    out = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    assert type(model[1]) is nn.SyncBatchNorm and type(model[2][0]) is nn.SyncBatchNorm
    assert isinstance(TokenBatchNorm(4).bn, _BatchNorm)  # fold/calibrate/quantization see its BN child


def test_convert_sync_batchnorm_shares_state_and_keeps_the_eval_function():
    torch.manual_seed(0)
    tb = TokenBatchNorm(6, affine=False, momentum=None)
    model = nn.Sequential(nn.Linear(6, 6), TokenBatchNorm(6), nn.Linear(6, 6), tb, nn.BatchNorm1d(5)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 5, 6)
    expected = model(x)
    old = model[1]
    out = convert_sync_batchnorm(model)
    assert out is model
    assert [type(m) for m in model] == [nn.Linear, SyncTokenBatchNorm, nn.Linear, SyncTokenBatchNorm,
                                        nn.SyncBatchNorm]
    assert model[1].weight is old.weight and model[1].running_mean is old.running_mean
    assert model[3].weight is None and model[3].momentum is None and not model[3].training
    assert torch.equal(model(x), expected)
    # a root BN is returned as a new module, as in torch
    root = convert_sync_batchnorm(TokenBatchNorm(6))
    assert type(root) is SyncTokenBatchNorm and root.training
    # without a process group it is exactly TokenBatchNorm in train mode too
    a, b = TokenBatchNorm(6), convert_sync_batchnorm(TokenBatchNorm(6))
    assert torch.equal(a(x), b(x)) and torch.equal(a.running_var, b.running_var)


def test_convert_sync_batchnorm_refuses_a_bn_with_its_own_forward():
    class TransposedBN(nn.BatchNorm1d):  # a hand-written token BN
        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), TransposedBN(4))
    with pytest.raises(NormSurgeonError, match=r"2 \(TransposedBN\).*overrides"):
        convert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm1d  # nothing changed


def test_calibrate_runs_sync_token_batch_norm_locally():
    torch.manual_seed(0)
    model = convert_sync_batchnorm(nn.Sequential(nn.Linear(4, 4), TokenBatchNorm(4)))
    batches = [torch.randn(3, 7, 4) for _ in range(2)]
    calibrate(model, batches)
    h = torch.cat([model[0](b).reshape(-1, 4) for b in batches]).detach()
    _close(model[1].running_mean.double(), h.mean(0).double(), "running mean", atol=1e-6)
    _close(model[1].running_var.double(), h.var(0).double(), "running var", atol=1e-6)


def test_synchronized_vit_calibrates_and_folds_like_a_token_bn_vit(converted_vit):
    from normsurgeon.passes.fold import fold
    bn_vit = convert_sync_batchnorm(copy.deepcopy(converted_vit))
    gen = torch.Generator().manual_seed(0)
    calibrate(bn_vit, [{"pixel_values": torch.randn(8, 3, 32, 32, generator=gen)} for _ in range(2)])
    folded, report = fold(bn_vit.eval(), zoo.vit().example_inputs())
    assert len(report.folded) == 7 and report.num_norms == 7
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
