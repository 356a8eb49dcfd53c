"""verify.py: the undo log (in memory and spilled to disk), the tolerance table, reference outputs."""

import copy

import pytest
import torch
import torch.nn as nn

from normsurgeon import fold_math
from normsurgeon.inputs import CallArgs
from normsurgeon.passes.fold import fold
from normsurgeon.verify import TOLERANCE, References, Tolerance, UndoLog, UndoStore, tolerance_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spill", [False, True])
def test_undo_restores_every_bit(dtype, spill):
    lin = nn.Linear(1024, 512).to(dtype)  # 1 MiB or more: spilled to the temporary file when asked
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with UndoStore(spill=spill) as store:
        undo = store.log()
        undo.save_param(lin, "weight")
        undo.save_param(lin, "bias")
        with torch.no_grad():
            lin.weight.mul_(3).add_(1)
            lin.bias.zero_()
        undo.restore()
    for k, v in lin.state_dict().items():
        assert torch.equal(v.view(torch.uint8), before[k].view(torch.uint8))


def test_undo_of_a_created_parameter_removes_it():
    lin = nn.Linear(4, 4, bias=False)
    undo = UndoLog()
    undo.save_param(lin, "bias")
    lin.bias = nn.Parameter(torch.ones(4))
    undo.restore()
    assert lin.bias is None


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(512, 1024)  # 2 MiB of weights: spilled when folding in place
        self.bn = nn.BatchNorm1d(1024)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_in_place_fold_rolls_back_from_the_spilled_log_bit_for_bit(monkeypatch):
    model = Big().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    original = copy.deepcopy(model)
    real = fold_math.fold_bn_after_linear
    monkeypatch.setattr(fold_math, "fold_bn_after_linear", lambda *a, **k: (lambda w, b: (w, b + 1.0))(*real(*a, **k)))
    folded, report = fold(model, CallArgs((torch.randn(4, 512),)), inplace=True)
    assert folded is model and report.passed and [a.kind for a in report.actions] == ["rolled_back"]
    assert torch.equal(model.fc.weight, original.fc.weight) and torch.equal(model.fc.bias, original.fc.bias)
    assert isinstance(model.bn, nn.BatchNorm1d)


def test_one_tolerance_table_for_every_pass():
    half = nn.Linear(2, 2).half()
    assert tolerance_for(half).rtol == TOLERANCE[torch.float16][0]  # convert's default
    assert tolerance_for(half, rtol=1e-5).rtol == TOLERANCE[torch.float16][0]  # fold's --rtol, raised
    assert tolerance_for(nn.Linear(2, 2), rtol=1e-5).rtol == 1e-5


def test_references_keep_outputs_not_the_model_and_drop_inputs_the_model_rejects():
    class FixedBatch(nn.Module):
        def forward(self, x):
            assert x.shape[0] == 2
            return x * 2

    refs = References.record(FixedBatch(), CallArgs((torch.randn(2, 3),)))
    assert len(refs) == 3  # example + 2 random; batch 3 is rejected by the model itself
    assert all(isinstance(o, list) and isinstance(o[0], torch.Tensor) for o in refs.outputs)
    stats, err = refs.compare(FixedBatch())
    assert err is None and stats.max_abs_error == 0


def test_the_other_batch_size_is_one_fewer_else_one_more():
    class NoSingleBatch(nn.Module):
        def forward(self, x):
            assert x.shape[0] > 1
            return x * 2

    batches = [c.args[0].shape[0] for c in References.record(nn.Identity(), CallArgs((torch.randn(2, 3),))).inputs]
    # batch 1: where batch-dependent code branches, and the cheapest check; then a larger batch
    # (issue 16 row 11: code taken only for big batches)
    assert batches == [2, 2, 1, 8]
    batches = [c.args[0].shape[0] for c in References.record(NoSingleBatch(), CallArgs((torch.randn(2, 3),))).inputs]
    assert batches == [2, 2, 3, 8]  # the model rejects batch 1: still another batch size
    batches = [c.args[0].shape[0] for c in References.record(nn.Identity(), CallArgs((torch.randn(1, 3),))).inputs]
    assert batches == [1, 1, 2, 4]


def test_a_check_told_its_tolerance_stops_at_the_first_failing_input_and_only_then():
    class Counting(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale, self.calls = scale, 0

        def forward(self, x):
            self.calls += 1
            return x * self.scale

    refs = References.record(Counting(1.0), CallArgs((torch.randn(2, 3),)))
    assert len(refs) == 4
    tol = Tolerance(1e-5)
    wrong = Counting(2.0)
    stats, err = refs.compare(wrong, stop_past=tol)
    assert wrong.calls == 1 and not tol.ok(stats, err)  # the verdict after one input cannot change
    right = Counting(1.0)
    stats, err = refs.compare(right, stop_past=tol)
    assert right.calls == 4 and tol.ok(stats, err)  # a passing check runs every input
    wrong = Counting(2.0)
    refs.compare(wrong)
    assert wrong.calls == 4  # without a tolerance: the worst error over every input


def test_a_large_model_is_checked_on_the_example_and_one_input_of_other_sizes(monkeypatch):
    # 1 GiB of weights makes a model "large"; the threshold is lowered so a tiny model shows the policy
    import normsurgeon.verify as v
    from normsurgeon.inputs import CallArgs

    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 4))
    ci = CallArgs((torch.randint(0, 50, (2, 16)),), {})
    assert len(v.References.record(model, ci)) == 4
    monkeypatch.setattr(v, "LEAN_BYTES", 0)
    refs = v.References.record(model, ci)
    assert refs.shapes == [[[2, 16]], [[1, 12]]]


def test_an_in_place_undo_reads_a_loaded_weight_back_from_its_file(tmp_path):
    """A weight the model was loaded with is not spilled: the undo reads it from the input file, after
    checking the file holds its exact bytes; one changed since loading is spilled as before."""
    from normsurgeon import zoo_llm
    from normsurgeon.loading import load_model

    zoo_llm.llama().save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m")).model
    head, layer = model.lm_head, model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight.mul_(2)  # no longer what the file holds
    want_head, want_layer = head.weight.detach().clone(), layer.weight.detach().clone()
    with UndoStore(spill=True) as store:
        log = store.log()
        log.spill_bytes = 0
        log.save_param(head, "weight")
        log.save_param(layer, "weight")
        assert store._spill._file.tell() == layer.weight.numel() * layer.weight.element_size()  # only up_proj
        with torch.no_grad():
            head.weight.zero_()
            layer.weight.zero_()
        log.restore()
    assert torch.equal(head.weight, want_head) and torch.equal(layer.weight, want_layer)


def test_a_rollback_from_an_input_file_that_changed_meanwhile_refuses_or_reads_the_pinned_file(tmp_path):
    """The undo reads through a descriptor opened when it recorded: a directory renamed or deleted
    meanwhile still rolls back exactly; a file rewritten in place is refused in one line."""
    import shutil

    from normsurgeon import zoo_llm
    from normsurgeon.errors import NormSurgeonError
    from normsurgeon.loading import load_model

    for change in ("delete", "rewrite"):
        src = tmp_path / change
        zoo_llm.llama().save_pretrained(src)
        model = load_model(str(src)).model
        head = model.lm_head
        want = head.weight.detach().clone()
        with UndoStore(spill=True) as store:
            log = store.log()
            log.spill_bytes = 0
            log.save_param(head, "weight")
            assert store._spill._file.tell() == 0  # read back from the file, not spilled
            with torch.no_grad():
                head.weight.mul_(3)
            if change == "delete":
                shutil.rmtree(src)
                log.restore()
                assert torch.equal(head.weight, want)
            else:
                other = zoo_llm.llama()
                with torch.no_grad():
                    other.lm_head.weight.mul_(-1)
                other.save_pretrained(src)  # a new file at the same path: the pinned one is read
                log.restore()
                assert torch.equal(head.weight, want)
    # a file truncated in place under a pinned descriptor is refused, never half-read
    src = tmp_path / "inplace"
    zoo_llm.llama().save_pretrained(src)
    model = load_model(str(src)).model
    with UndoStore(spill=True) as store:
        log = store.log()
        log.spill_bytes = 0
        log.save_param(model.lm_head, "weight")
        with open(src / "model.safetensors", "r+b") as f:
            f.truncate(100)
        with pytest.raises(NormSurgeonError, match="changed while the model was being rewritten"):
            log.restore()


def test_a_weight_whose_input_file_is_gone_is_spilled(tmp_path):
    import shutil

    from normsurgeon import zoo_llm
    from normsurgeon.loading import load_model

    src = tmp_path / "m"
    zoo_llm.llama().save_pretrained(src)
    model = load_model(str(src)).model
    want = model.lm_head.weight.detach().clone()
    shutil.move(src, tmp_path / "moved")
    with UndoStore(spill=True) as store:
        log = store.log()
        log.spill_bytes = 0
        log.save_param(model.lm_head, "weight")
        assert store._spill._file.tell() > 0
        with torch.no_grad():
            model.lm_head.weight.zero_()
        log.restore()
    assert torch.equal(model.lm_head.weight, want)


def test_a_file_holds_a_tensor_compared_window_by_window_through_a_mapping_or_reads(tmp_path, monkeypatch):
    # the proof that lets an undo read a weight back from its file: every byte counts, in any window;
    # a file too short is a False (never a mapping past its end); a file that cannot be mapped is read
    import mmap
    import os

    from normsurgeon import file_tensors as ft

    t = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    raw = bytearray(b"head" + t.numpy().tobytes())
    path = tmp_path / "w.bin"
    path.write_bytes(raw)
    where = ft.FileSlice(path, 4, 4 + len(raw) - 4, "F32", (1000,))
    real_map = mmap.mmap
    for mapping in (True, False):  # windows of the buffer's 1024 bytes: four, the last a short one
        if not mapping:
            monkeypatch.setattr(mmap, "mmap", lambda *a, **k: (_ for _ in ()).throw(OSError("no mmap here")))
        assert where.holds(t, bytearray(1024)), mapping
        for at in (0, 1500, 3999):  # a byte changed in the first, a middle and the last window
            u = t.clone()
            u.view(torch.uint8)[at] ^= 1
            assert not where.holds(u, bytearray(1024)), (mapping, at)
    monkeypatch.setattr(mmap, "mmap", real_map)
    with open(path, "r+b") as f:
        f.truncate(2000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not ft.fd_holds(fd, where, t, bytearray(1024))
    finally:
        os.close(fd)
