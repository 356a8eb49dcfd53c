"""Fair verification of float16/bfloat16 models: references computed in float32 without a float32 copy
of the model, a rewrite judged by its own error against them next to the original's, wrong rewrites
still rolled back, and the fallback to the model's own dtype with its reason."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normsurgeon import zoo_llm
from normsurgeon.graph import capture
from normsurgeon.inputs import CallArgs, as_call_args
from normsurgeon.outputs import compare_outputs
from normsurgeon.passes import norm_affine
from normsurgeon.passes.base import apply_verified
from normsurgeon.passes.fold import fold
from normsurgeon.verify import (LOW_PRECISION_FACTOR, TOLERANCE, References, Tolerance, UndoStore, run_clean,
                                run_float32, tolerance_for)


def bits(model):
    return {k: (v.view(torch.uint8).clone() if v.dim() else v.clone(), v.data_ptr(), v.dtype)
            for k, v in model.state_dict(keep_vars=True).items()}


def steep_llama(dtype=torch.bfloat16):
    """A 6-layer bf16 Llama whose norms' γ spread over e^N(0, 1): deep and uneven enough that an exact
    affine fold moves the bf16 logits past the table's 1.5e-2 (the old check rolled such folds back)."""
    model = zoo_llm._build("LlamaConfig", "LlamaForCausalLM", zoo_llm._ids(), num_key_value_heads=2,
                           tie_word_embeddings=False, **{**zoo_llm._DECODER, "num_hidden_layers": 6,
                                                         "hidden_size": 64, "intermediate_size": 128})
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(torch.exp(torch.randn(p.shape, generator=g)))
    return model.to(dtype)


# --- the float32 reference -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "vit"])  # gpt2: a tied lm_head; vit: casts its input to a weight's dtype
def test_float32_reference_is_a_float32_run_and_leaves_the_model_bit_identical(name):
    model = zoo_llm.MODELS[name]().to(torch.bfloat16)
    ci = as_call_args(model.example_inputs())
    ci = CallArgs(tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in ci.args),
                  {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ci.kwargs.items()})
    before = bits(model)
    tied = [(a, b) for a, b in [(model.get_output_embeddings(), model.get_input_embeddings())] if a is not None] \
        if name == "gpt2" else []
    refs = References.record(model, ci)
    assert refs.reference == "float32" and refs.low_precision == "bfloat16" and refs.reference_note is None
    assert all(o.dtype == torch.float32 for out in refs.outputs for o in out)
    after = bits(model)
    assert after.keys() == before.keys()
    for k, (b, ptr, dtype) in before.items():
        assert after[k][2] == dtype and after[k][1] == ptr and torch.equal(after[k][0], b), k
    for head, emb in tied:
        assert head.weight is emb.weight
    # what it computed is the float32 function of these very (bf16-valued) weights, not a bf16 one
    exact = run_clean(model.float(), CallArgs(tuple(a.float() if a.is_floating_point() else a for a in ci.args),
                                              {k: v.float() if v.is_floating_point() else v
                                               for k, v in ci.kwargs.items()}))
    assert compare_outputs(exact, refs.outputs[0]).max_rel_error < 1e-5
    assert refs.original_error.max_rel_error > 1e-3  # the bf16 original is measurably off it


def test_float32_run_computes_in_float32_where_the_model_casts_to_its_weights_dtype():
    class CastsFirst(nn.Module):  # reads a child's dtype outside the child's call, as ViT and CLIP do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype)).softmax(-1).to(x.dtype) * 3

    model = CastsFirst().to(torch.bfloat16)
    x = CallArgs((torch.randn(4, 16).to(torch.bfloat16),))
    out = run_float32(model, x)[0]
    assert out.dtype == torch.float32
    assert torch.allclose(out, CastsFirst.forward(model.float(), x.args[0].float()), rtol=1e-6, atol=1e-7)


class CountsCalls(nn.Module):
    """Writes into its own bf16 buffer during the forward: a float32 copy would take the write."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x) * self.calls


def test_a_model_that_writes_its_own_low_precision_tensors_falls_back_and_says_why():
    model = CountsCalls().to(torch.bfloat16)
    refs = References.record(model, CallArgs((torch.randn(3, 8, dtype=torch.bfloat16),)))
    assert refs.reference == "bfloat16" and refs.original_error is None
    assert "no float32 reference: add_ writes into a bfloat16 tensor" in refs.reference_note
    assert all(o.dtype == torch.bfloat16 for out in refs.outputs for o in out)
    assert refs.to_json() == {"reference": "bfloat16", "low_precision": "bfloat16",
                              "reference_note": refs.reference_note}
    tol = tolerance_for(model)
    assert refs.tolerance(tol) == tol  # today's check, unchanged


def test_float32_models_keep_todays_references():
    refs = References.record(nn.Linear(4, 4), CallArgs((torch.randn(2, 4),)))
    assert refs.reference is None and refs.original_error is None and refs.to_json() == {}


# --- the criterion ---------------------------------------------------------------------------------

def test_the_bar_is_factor_times_the_originals_own_error_and_never_below_the_table():
    refs = References.record(zoo_llm.llama().to(torch.bfloat16), zoo_llm.llama().example_inputs())
    table = Tolerance(*TOLERANCE[torch.bfloat16])
    own = refs.original_error.max_rel_error
    assert refs.tolerance(table) == Tolerance(max(table.rtol, LOW_PRECISION_FACTOR * own), table.atol)
    refs.original_error = dataclasses.replace(refs.original_error, max_rel_error=0.02)
    assert refs.tolerance(table).rtol == pytest.approx(LOW_PRECISION_FACTOR * 0.02)
    refs.original_error = dataclasses.replace(refs.original_error, max_rel_error=1e-4)
    assert refs.tolerance(table).rtol == table.rtol


def test_exact_folds_the_old_check_rolled_back_are_kept_against_the_float32_reference():
    model = steep_llama()
    ci = as_call_args(model.example_inputs())
    refs = References.record(model, ci)
    unverified, _ = fold(model, ci, affine=True, verify=False)
    # the old check: the folded bf16 model against the bf16 original's outputs, over the table's rtol
    old = max(compare_outputs(run_clean(model, c), run_clean(unverified, c)).max_rel_error for c in refs.inputs)
    assert old > 2 * TOLERANCE[torch.bfloat16][0]
    # ...while its own error against float32 is the original's, give or take the rounding
    assert refs.compare(unverified)[0].max_rel_error < 1.5 * refs.original_error.max_rel_error

    folded, report = fold(model, ci, affine=True)
    assert report.passed and not report.rolled_back and len(report.folded) == len(report.affine_actions) == 13
    v = report.to_json()["verify"]
    assert v["reference"] == "float32" and v["original_error"] == pytest.approx(refs.original_error.max_rel_error)
    assert v["tolerance"] == pytest.approx(LOW_PRECISION_FACTOR * v["original_error"]) and v["passed"]
    assert "vs a float32 reference (the bfloat16 original: " in report.summary()
    assert v["max_rel_error"] <= v["tolerance"]


# --- wrong rewrites still fail ---------------------------------------------------------------------

def test_a_wrong_fold_in_a_bf16_model_is_rolled_back_through_the_driver():
    """γ folded twice (into the readers, and left on the norm) and γ folded into the wrong layer's readers:
    the real rewrite, wrongly aimed, next to the right ones; only the wrong ones are rolled back."""
    model = steep_llama()
    ci = as_call_args(model.example_inputs())
    refs = References.record(model, ci)
    graph = capture(model, ci, checked=True)
    with UndoStore() as store:
        actions, applied = norm_affine.fold_all(model, graph, store)
        by_norm = {a.key: a for a in applied}
        twice = by_norm["model.layers.1.input_layernorm"]
        elsewhere = by_norm["model.layers.3.post_attention_layernorm"]
        gamma = model.get_submodule(twice.key).weight
        for a in (twice, elsewhere):  # back to the original, then the wrong rewrites instead
            a.undo.restore()
        saved = gamma.detach().clone()
        wrong_readers = dataclasses.replace(elsewhere.site, readers=by_norm["model.layers.4.post_attention_layernorm"]
                                            .site.readers)

        def fold_twice(undo):
            action = norm_affine.rewrite(twice.site, model, undo)
            with torch.no_grad():
                gamma.copy_(saved)  # the norm keeps γ too: applied twice
            return action

        wrong = [dataclasses.replace(twice, redo=fold_twice),
                 dataclasses.replace(elsewhere, site=wrong_readers,
                                     redo=lambda u: norm_affine.rewrite(wrong_readers, model, u))]
        for w in wrong:
            w.undo = store.log()
            w.redo(w.undo)
        applied = [a for a in applied if a.key not in (twice.key, elsewhere.key)] + wrong
        verdict = apply_verified(model, applied, refs, tolerance_for(model), store, done="folded")
    kinds = {k: a.kind for k, a in verdict.actions.items()}
    assert kinds.pop(twice.key) == kinds.pop(elsewhere.key) == "rolled_back"
    assert set(kinds.values()) == {"folded"} and len(kinds) == 11
    assert verdict.passed and verdict.first.max_rel_error > 10 * refs.tolerance(tolerance_for(model)).rtol
    assert torch.equal(gamma, saved)  # the rolled-back norm is as it was


def test_a_model_that_only_runs_in_its_own_dtype_falls_back_and_says_why():
    class Bf16Only(nn.Module):  # e.g. a kernel wrapper that checks its dtype
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.dtype != torch.bfloat16:
                raise TypeError(f"expects bfloat16, got {x.dtype}")
            return self.fc(x)

    model = Bf16Only().to(torch.bfloat16)
    refs = References.record(model, CallArgs((torch.randn(3, 8, dtype=torch.bfloat16),)))
    assert refs.reference == "bfloat16" and len(refs) == 4
    assert refs.reference_note.startswith("no float32 reference: TypeError: expects bfloat16, got torch.float32")


def test_a_bf16_program_folds_against_a_float32_reference():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    _, report = fold(torch.export.export(model, (x,)), (x,))
    v = report.to_json()["verify"]
    assert report.passed and len(report.folded) == 1
    assert v["reference"] == "float32" and v["original_error"] > 0 and v["max_rel_error"] <= v["tolerance"]


def test_a_bf16_rotation_and_ln_to_rms_are_judged_against_float32():
    from normsurgeon.passes.convert import convert
    from normsurgeon.passes.rotate import rotate

    model = steep_llama()
    ci = as_call_args(model.example_inputs())
    folded, _ = fold(model, ci, affine=True)
    rotated, report = rotate(folded, ci, seed=0)
    v = report.to_json()["verify"]
    assert report.rotated and v["reference"] == "float32" and v["max_rel_error"] <= v["tolerance"]
    assert v["tolerance"] == max(TOLERANCE[torch.bfloat16][0], LOW_PRECISION_FACTOR * v["original_error"])
    assert "vs a float32 reference (the bfloat16 original: " in report.summary()
    gpt2 = zoo_llm.gpt2_untied().to(torch.bfloat16)
    _, rms = convert(gpt2, "rms", example_inputs=gpt2.example_inputs())
    assert rms.verify["passed"] and rms.verify["reference"] == "float32" and "original_error" in rms.verify


def test_the_low_precision_bar_is_capped():
    """A bf16 original far from its own float32 function must not widen the bar without limit (an
    all-zero output has relative error 1)."""
    from normsurgeon.outputs import ErrorStats
    from normsurgeon.verify import LOW_PRECISION_CAP

    refs = References(original_error=ErrorStats(0.9, 0.5, 1.0))
    assert refs.tolerance(Tolerance(1.5e-2, 1e-3)).rtol == LOW_PRECISION_CAP < 1.0
    refs = References(original_error=ErrorStats(0.03, 0.02, 1.0))
    assert refs.tolerance(Tolerance(1.5e-2, 1e-3)).rtol == pytest.approx(0.04)


class CastsItsCache(nn.Module):
    """Re-stores a buffer in the dtype it sees (older rotary embeddings do), and makes a cache on its first call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("table", torch.linspace(0, 1, 8))
        self.cache = None

    def forward(self, x):
        if self.table.dtype != x.dtype:
            self.table = self.table.to(x.dtype)
        if self.cache is None:
            self.cache = torch.ones(8, dtype=x.dtype)
        return self.fc(x) * self.table + self.cache


def test_a_float32_run_leaves_no_float32_tensor_on_the_model():
    model = CastsItsCache().to(torch.bfloat16)
    table = model.table
    x = CallArgs((torch.randn(3, 8, dtype=torch.bfloat16),))
    assert run_float32(model, x)[0].dtype == torch.float32
    assert model.table is table and model.cache is None  # the float32 run's table and cache are gone
    refs = References.record(model, x)
    assert refs.reference == "float32" and model.table is table
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values())


class SetsData(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        self.fc.weight.data = self.fc.weight.data.clamp(-1, 1)
        return self.fc(x)


def test_a_forward_that_sets_data_falls_back_and_says_why():
    model = SetsData().to(torch.bfloat16)
    refs = References.record(model, CallArgs((torch.randn(3, 8, dtype=torch.bfloat16),)))
    assert refs.reference == "bfloat16" and "sets .data of a bfloat16 tensor" in refs.reference_note


def test_a_large_head_is_upcast_a_block_of_rows_at_a_time_and_an_embedding_after_its_gather(monkeypatch):
    """No float32 copy of a whole vocabulary matrix (262 MB for a 1.1B Llama's head): the same float32
    outputs, computed from blocks of rows of the head and from the gathered rows of the embedding."""
    from normsurgeon import float32_run

    class Lm(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(300, 16)
            self.head = nn.Linear(16, 300)

        def forward(self, ids):
            h = torch.tanh(self.emb(ids))
            # the same head twice, once called with keywords
            return self.head(h) + F.linear(h, weight=self.head.weight, bias=self.head.bias)

    torch.manual_seed(0)
    model = Lm().to(torch.bfloat16)
    monkeypatch.setattr(float32_run, "ROWS_BYTES", 16 * 4 * 7)  # 7 rows of the head at a time
    upcast = []
    scratch, to_float32 = float32_run._Float32Mode._scratch, float32_run._to_float32
    monkeypatch.setattr(float32_run._Float32Mode, "_scratch",
                        lambda self, i, t: upcast.append(tuple(t.shape)) or scratch(self, i, t))
    monkeypatch.setattr(float32_run, "_to_float32", lambda v: (
        upcast.append(tuple(v.shape)) if float32_run._is_low(v) else None) or to_float32(v))
    ids = torch.randint(0, 300, (2, 5))
    got = run_float32(model, CallArgs((ids,)))[0]
    want = Lm.forward(copy.deepcopy(model).float(), ids)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() < 1e-5
    assert (300, 16) not in upcast  # neither table was copied whole


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_float32_linears_go_through_onednn_only_at_full_precision(monkeypatch, precision):
    """oneDNN's linear computes a verification input's few rows about twice as fast as F.linear (the
    1.1B Llama's float32 forward: 0.5-0.85 s against 1.6 s); both the blocked head and a small weight
    take it, with float32 results; at "medium" float32 matmul precision F.linear stays (oneDNN may then
    round operands to bf16, and a reference must not)."""
    from normsurgeon import float32_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 400, bias=False)).to(torch.bfloat16)
    monkeypatch.setattr(float32_run, "ROWS_BYTES", 24 * 4 * 50)  # the head in blocks of 50 rows
    calls = []
    onednn = float32_run._ONEDNN_LINEAR
    monkeypatch.setattr(float32_run, "_ONEDNN_LINEAR", lambda x, w, *a: calls.append(tuple(w.shape)) or onednn(x, w, *a))
    x = torch.randn(3, 7, 32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = run_float32(model, CallArgs((x,)))[0]
    finally:
        torch.set_float32_matmul_precision(before)
    want = copy.deepcopy(model).double()(x.double())
    assert got.dtype == torch.float32 and ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    assert calls == ([(24, 32)] + [(50, 24)] * 8 if precision == "highest" else [])
    # where autograd records, F.linear (oneDNN's op has no backward: its input would get no gradient)
    xg = torch.randn(2, 32, requires_grad=True)
    float32_run._linear32(xg, torch.randn(5, 32), None).sum().backward()
    assert xg.grad is not None and len(calls) == (9 if precision == "highest" else 0)


class LazyTable(nn.Module):
    """Makes a table and a counter on its first call (a rotary cache keyed by length, say)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if getattr(self, "seq_cached", 0) < x.shape[0]:
            self.table = torch.ones(8, dtype=x.dtype)
            self.seq_cached = x.shape[0]
        return self.fc(x) * self.table


def test_a_float32_run_takes_back_everything_it_added_not_half_of_it():
    model = LazyTable().to(torch.bfloat16)
    x = CallArgs((torch.randn(2, 8, dtype=torch.bfloat16),))
    run_float32(model, x)
    assert not hasattr(model, "seq_cached") and not hasattr(model, "table")
    assert model(*x.args).dtype == torch.bfloat16  # the next forward makes its own, in its own dtype


class ClampsThrough(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how = nn.Linear(8, 8), how

    def forward(self, x):
        w = self.fc.weight.data if self.how == "data" else self.fc.weight.detach()
        w.clamp_(-0.1, 0.1)
        return self.fc(x)


@pytest.mark.parametrize("how", ["data", "detach"])
def test_an_in_place_write_through_data_or_detach_falls_back_and_says_why(how):
    model = ClampsThrough(how).to(torch.bfloat16)
    refs = References.record(model, CallArgs((torch.randn(3, 8, dtype=torch.bfloat16),)))
    assert refs.reference == "bfloat16" and "clamp_ writes into a bfloat16 tensor" in refs.reference_note


def test_reading_a_detached_weight_still_computes_in_float32():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x @ self.fc.weight.detach().t()

    model = Reads().to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = run_float32(model, CallArgs((x,)))[0]
    assert out.dtype == torch.float32
    assert torch.allclose(out, x.float() @ model.fc.weight.float().t(), rtol=1e-6, atol=1e-6)
