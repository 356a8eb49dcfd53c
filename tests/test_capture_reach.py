"""Capture as users hold their models: a transformers decoder with its KV cache on, a model whose
whole-model capture fails (Informer), and the reason of a norm that ran but could not be captured."""

import torch
import torch.nn as nn
import transformers

import normsurgeon
from normsurgeon.find import inspect
from normsurgeon.graph import capture
from normsurgeon.inputs import CallArgs


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_gpt2_with_its_cache_on_converts_every_layernorm_and_keeps_the_users_config():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    assert model.config.use_cache  # as users hold it
    ids = torch.randint(0, 100, (2, 12))
    out, report = normsurgeon.convert(model, to="pn", example_inputs=(ids,))
    assert report.capture == "export"
    assert sorted(a.path for a in report.converted) == ["h.0.ln_1", "h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "ln_f"]
    assert not report.skipped
    assert model.config.use_cache and out.config.use_cache  # the user's setting, restored on both
    assert normsurgeon.inspect(model, (ids,)).capture == "export"
    assert model.config.use_cache


def _informer():
    torch.manual_seed(0)
    cfg = transformers.InformerConfig(
        prediction_length=4, context_length=8, input_size=1, lags_sequence=[1, 2], num_time_features=1,
        d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, distil=True, use_cache=False)
    model = transformers.InformerModel(cfg).eval()
    _randomize_bn(model)
    g = torch.Generator().manual_seed(0)
    past, future = cfg.context_length + max(cfg.lags_sequence), cfg.prediction_length
    inputs = CallArgs((), dict(
        past_values=torch.randn(2, past, generator=g), past_time_features=torch.randn(2, past, 1, generator=g),
        past_observed_mask=torch.ones(2, past), future_values=torch.randn(2, future, generator=g),
        future_time_features=torch.randn(2, future, 1, generator=g)))
    return model, inputs


def test_informer_per_child_capture_reaches_the_encoder_module_lists():
    model, inputs = _informer()
    graph = capture(model, inputs)
    assert graph.method == "per-child"  # export and FX both fail on Informer
    assert not graph.failed_parts()  # encoder.layers / conv_layers are ModuleLists: never called, their children are
    report = inspect(model, graph=graph)
    assert all(s.calls == 1 for s in report.sites), [(s.path, s.note) for s in report.sites if not s.calls]
    folded, fold_report = normsurgeon.fold(model, inputs, graph=graph)
    assert [a.path for a in fold_report.folded] == ["encoder.conv_layers.0.norm"] and fold_report.passed
    _, convert_report = normsurgeon.convert(model, to="bn", example_inputs=inputs, graph=graph)
    assert len(convert_report.converted) == 9 and not convert_report.skipped


class _BranchyLayerNorm(nn.LayerNorm):
    """Data-dependent control flow inside the norm module: neither export nor FX captures it."""

    def forward(self, x):
        if float(x.sum()) > 1e9:
            x = x * 2
        return super().forward(x)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = _BranchyLayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def test_a_norm_that_ran_but_could_not_be_captured_says_so_not_unreached():
    model = _Model().eval()
    x = torch.randn(2, 5, 8)
    site = next(s for s in normsurgeon.inspect(model, x).sites if s.path == "norm")
    assert site.calls == 0 and site.note.startswith("ran, but in a part that could not be captured (norm:")
    _, report = normsurgeon.convert(model, to="bn", example_inputs=x)
    (skip,) = report.skipped
    assert skip.path == "norm" and skip.reason.startswith("ran, but in a part that could not be captured")
    assert "not reached" not in skip.reason


class _Unused(nn.Module):
    """A branch the example inputs never take, beside a root nobody can capture."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.spare = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        h = self.bn(self.conv(x))
        if float(h.sum()) > 1e9:  # data-dependent: export and FX fail, per-child capture runs
            h = self.spare(h)
        return h


def test_fold_says_never_called_for_a_part_never_run_not_uncapturable():
    model = _Unused().eval()
    _, report = normsurgeon.fold(model, torch.randn(2, 3, 8, 8))
    skip = next(a for a in report.skipped if a.path == "spare.1")
    assert skip.path == "spare.1" and "never called" in skip.reason and "could not be captured" not in skip.reason
