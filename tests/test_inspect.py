"""inspect finds every normalization layer of real architectures, whatever wrote them."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normsurgeon import zoo
from normsurgeon.find import NORM_MODULES, inspect
from normsurgeon.graph import capture
from normsurgeon.inputs import CallArgs


def expected_norm_modules(model):
    """Norm modules by type, independent of the finder: torch norm classes and *RMSNorm classes."""
    torch_norms = tuple(cls for cls, _ in NORM_MODULES)
    return {path for path, m in model.named_modules()
            if isinstance(m, torch_norms) or type(m).__name__.endswith("RMSNorm")}


def expected_counts(model):
    """Norm modules per kind, from the modules' classes (the architectures' definitions in the
    installed transformers), not from the finder."""
    out = {}
    for path in expected_norm_modules(model):
        m = model.get_submodule(path)
        kind = next((k for cls, k in NORM_MODULES if isinstance(m, cls)), "rmsnorm")
        out[kind] = out.get(kind, 0) + 1
    return out


# model -> the kinds of norm its architecture has
KINDS = {
    "vit": {"layernorm"}, "levit": {"batchnorm"}, "resnet": {"batchnorm"}, "mobilenet_v2": {"batchnorm"},
    "convnext": {"layernorm"}, "efficientnet": {"batchnorm"}, "regnet": {"batchnorm"},
    "mobilevit": {"batchnorm", "layernorm"}, "bert": {"layernorm"}, "gpt2": {"layernorm"}, "llama": {"rmsnorm"},
    "wav2vec2": {"layernorm"}, "transformer_encoder": {"layernorm"},
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_finds_every_norm_of_real_architectures(name):
    model = zoo.MODELS[name]()
    report = inspect(model, model.example_inputs())
    assert report.capture == "export"
    modules = expected_norm_modules(model)
    reached = {s.path for s in report.sites if s.source in ("module", "pattern") and s.calls >= 1}
    assert modules <= reached, f"not found: {sorted(modules - reached)}"
    expected = expected_counts(model)
    assert set(expected) == KINDS[name]
    assert report.counts() == expected  # one site per norm module, nothing else taken for a norm
    for site in report.sites:
        assert site.input_shape, site.path
        assert site.channels and site.channels > 0, site.path
        if site.kind == "batchnorm":
            assert site.track_running_stats is True


def test_convnext_channels_first_layernorm_is_dim_1():
    model = zoo.convnext()
    sites = {s.path: s for s in inspect(model, model.example_inputs()).sites}
    stem = sites["convnext.embeddings.layernorm"]
    assert stem.dims == [-3] and len(stem.input_shape) == 4 and stem.input_shape[1] == stem.channels
    assert "channels-first" in stem.note
    block = sites["convnext.encoder.stages.0.layers.0.layernorm"]
    assert block.dims == [-1] and block.input_shape[-1] == block.channels


def test_llama_rmsnorm_found_as_pattern_with_its_differences():
    model = zoo.llama()
    sites = inspect(model, model.example_inputs()).sites
    assert {s.module_type for s in sites} == {"LlamaRMSNorm"}
    for s in sites:
        assert (s.kind, s.source, s.dims, s.eps) == ("rmsnorm", "pattern", [-1], 1e-6)
        assert "computes in float32 (upcast)" in s.differs


class AnnotatedLayerNorm(nn.Module):
    """The annotated Transformer's LayerNorm: unbiased std, eps added to std."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.a_2, self.b_2, self.eps = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features)), eps

    def forward(self, x):
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class VarianceLayerNorm(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        v = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / torch.sqrt(v + 1e-5) * self.weight + self.bias


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class OnePlusWeightRMSNorm(nn.Module):  # Gemma style
    def __init__(self, dim):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(dim)), 1e-6

    def forward(self, x):
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.annotated = AnnotatedLayerNorm(16)
        self.varln = VarianceLayerNorm(16)
        self.gemma = OnePlusWeightRMSNorm(16)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cfln = ChannelsFirstLayerNorm(8)
        self.ln_weight = nn.Parameter(torch.ones(16))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x, img):
        h = self.gemma(self.varln(self.annotated(self.proj(x))))
        h = F.layer_norm(h, (16,), self.ln_weight, None, 1e-5) + h
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)  # inline RMS norm, no module
        c = self.cfln(self.conv(img))
        c = F.batch_norm(c, self.rm, self.rv, None, None, False, 0.1, 1e-3)
        return h, F.group_norm(c, 4)


def test_hand_written_and_functional_norms():
    report = inspect(Mixed().eval(), (torch.randn(2, 5, 16), torch.randn(2, 3, 8, 8)))
    by_path = {s.path: s for s in report.sites}
    a = by_path["annotated"]
    assert (a.kind, a.source, a.dims, a.eps) == ("layernorm", "pattern", [-1], 1e-6)
    assert "unbiased std (divides by N-1)" in a.differs and "eps added to std, not to variance" in a.differs
    v = by_path["varln"]
    assert (v.kind, v.source, v.affine, v.differs) == ("layernorm", "pattern", True, [])
    g = by_path["gemma"]
    assert g.kind == "rmsnorm" and "scales by (1 + weight)" in g.differs
    cf = by_path["cfln"]
    assert (cf.kind, cf.dims, cf.channels) == ("layernorm", [-3], 8) and "channels-first" in cf.note
    assert by_path["layer_norm#0"].source == "function"
    assert by_path["batch_norm#0"].kind == "batchnorm" and by_path["batch_norm#0"].eps == 1e-3
    assert by_path["group_norm#0"].kind == "groupnorm"
    inline = by_path["rmsnorm#0"]
    assert (inline.kind, inline.source, inline.affine) == ("rmsnorm", "pattern", False)
    assert report.counts() == {"layernorm": 4, "rmsnorm": 2, "batchnorm": 1, "groupnorm": 1}


def test_mean_without_normalization_is_not_a_norm():
    class Pool(nn.Module):
        def forward(self, x):
            return x - x.mean(-1, keepdim=True) + x.pow(2).mean(-1, keepdim=True)

    assert inspect(Pool(), torch.randn(2, 4, 8)).sites == []


def test_shared_norm_module_reports_calls_and_unreached_modules_are_listed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.unused = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.ln(self.ln(x))

    sites = {s.path: s for s in inspect(M(), torch.randn(2, 8)).sites}
    assert sites["ln"].calls == 2
    assert sites["unused"].calls == 0 and "not called" in sites["unused"].note


def test_subclass_of_layernorm_normalizing_dim_1():
    class CFLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                self.eps).permute(0, 3, 1, 2)

    site = inspect(CFLayerNorm(6), torch.randn(2, 6, 4, 4)).sites[0]
    assert (site.source, site.dims, site.input_shape) == ("module", [-3], [2, 6, 4, 4])


def test_capture_falls_back_per_child_and_says_what_failed():
    class Untraceable(nn.Module):
        """Data-dependent Python control flow: neither torch.export nor torch.fx can capture the root."""

        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            h = self.block(x)
            if float(h.sum()) > 1e9:  # .item()-style control flow on values
                h = h * 2
            return self.bn(h)

    model = Untraceable().eval()
    graph = capture(model, CallArgs((torch.randn(4, 8),)))
    assert graph.method == "per-child"
    assert [m for m, _ in graph.attempts][:2] == ["export", "fx"]
    report = inspect(model, graph=graph)
    assert {s.path for s in report.sites} == {"block.1", "bn"}
    assert all(s.calls == 1 for s in report.sites)


def test_fx_capture_without_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    report = inspect(model)
    assert report.capture == "fx"
    assert [(s.path, s.kind) for s in report.sites] == [("1", "batchnorm")]


def test_token_batchnorm_reports_the_module_input_and_its_channel_axis():
    from normsurgeon.nn import TokenBatchNorm

    model = nn.Sequential(nn.Linear(8, 6), TokenBatchNorm(6)).eval()
    site = inspect(model, torch.randn(2, 5, 8)).sites[0]
    assert (site.kind, site.input_shape, site.dims, site.channels) == ("batchnorm", [2, 5, 6], [0, 1], 6)
    assert site.producer == "0 (linear)"


def test_frozen_batchnorm_after_convert_is_listed():
    from normsurgeon.passes.convert import convert

    model = zoo.resnet()
    frozen, _ = convert(model, to="frozen", example_inputs=model.example_inputs())
    report = inspect(frozen, model.example_inputs())
    assert report.counts() == {"batchnorm": 8}
    for site in report.sites:
        assert site.module_type == "FrozenBatchNorm" and site.calls == 1 and "frozen" in site.note
        assert len(site.input_shape) == 4 and site.input_shape[1] == site.channels


class EveryTorchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lazy = nn.LazyBatchNorm2d()
        self.sync = nn.SyncBatchNorm(3)
        self.inorm = nn.InstanceNorm2d(3, affine=True)
        self.gn = nn.GroupNorm(1, 3)
        self.rms = nn.RMSNorm(8)
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x, t):
        x = self.gn(self.inorm(self.sync(self.lazy(x))))
        return x, F.rms_norm(self.rms(t), (8,), self.w, 1e-6), F.instance_norm(x)


def test_lazy_sync_instance_group_rms_modules_and_functions():
    model = EveryTorchNorm()
    inputs = (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8))
    model(*inputs)  # materialize the lazy BN
    sites = {s.path: s for s in inspect(model.eval(), inputs).sites}
    assert {p: (s.kind, s.source) for p, s in sites.items()} == {
        "lazy": ("batchnorm", "module"), "sync": ("batchnorm", "module"), "inorm": ("instancenorm", "module"),
        "gn": ("groupnorm", "module"), "rms": ("rmsnorm", "module"),
        "rms_norm#0": ("rmsnorm", "function"), "instance_norm#0": ("instancenorm", "function")}
    assert sites["inorm"].dims == [2, 3] and sites["gn"].dims == [1, 2, 3] and sites["lazy"].channels == 3
    assert sites["rms_norm#0"].eps == 1e-6 and sites["rms"].dims == [-1]


def _ids():
    return CallArgs((), {"input_ids": torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))})


def _pixels(size=32):
    return CallArgs((), {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))})


MORE = {  # name -> (config class, model class, config kwargs, inputs, expected counts)
    "t5": ("T5Config", "T5EncoderModel", dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=2, decoder_start_token_id=0), _ids, {"rmsnorm": 3}),
    "mistral": ("MistralConfig", "MistralModel", dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), _ids, {"rmsnorm": 3}),
    "gemma": ("GemmaConfig", "GemmaModel", dict(vocab_size=100, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16), _ids, {"rmsnorm": 3}),
    "bloom": ("BloomConfig", "BloomModel", dict(vocab_size=100, hidden_size=32, n_layer=1, n_head=2), _ids,
              {"layernorm": 4}),
    "swin": ("SwinConfig", "SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
             num_heads=[1, 2], window_size=4), _pixels, {"layernorm": 7}),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
               num_attention_heads=2), _pixels, {"layernorm": 3}),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2Model", dict(image_size=32, hidden_sizes=[16, 32], depths=[1, 1],
                   num_stages=2), _pixels, {"layernorm": 5}),
    "mobilenet_v1": ("MobileNetV1Config", "MobileNetV1Model", dict(image_size=32, depth_multiplier=0.25), _pixels,
                     {"batchnorm": 27}),
}


@pytest.mark.parametrize("name", sorted(MORE))
def test_finds_every_norm_of_more_architectures(name):
    import transformers

    config_cls, model_cls, kwargs, inputs, expected = MORE[name]
    config = getattr(transformers, config_cls)(**kwargs)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    report = inspect(model, inputs())
    modules = expected_norm_modules(model)
    assert modules <= {s.path for s in report.sites if s.calls >= 1}
    assert report.counts() == expected
    if name == "gemma":
        assert all("scales by (1 + weight)" in s.differs for s in report.sites)


class BranchOnValue(nn.Module):
    """Branches on a tensor's value: torch.export fails (data-dependent control flow) and so does
    torch.fx; the per-child capture takes over."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.fc(x)
        if float(h.sum()) > 1e9:
            h = h * 2
        return self.ln(h)


def test_failed_capture_attempts_say_one_line_each_and_print_nothing(capfd):
    import logging
    import warnings

    class Sink(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    sink = Sink()
    torch_logger = logging.getLogger("torch")  # torch's own handlers write to stderr directly
    torch_logger.addHandler(sink)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = inspect(BranchOnValue(), torch.randn(2, 5, 8))
    finally:
        torch_logger.removeHandler(sink)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out + err)[:2000]
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in sink.records if r.levelno >= logging.WARNING] == []
    assert report.capture.startswith("per-child")
    attempts = dict(report.attempts)
    assert "data-dependent" in attempts["export"] and "Proxy" in attempts["fx"]
    assert all("\n" not in e and len(e) < 300 for e in attempts.values())
    lines = [n.split()[0] for t in report.tables() for n in t.notes if " failed: " in n]
    assert lines == ["export", "fx"]  # one line per failed attempt (per-child worked: not one of them)


class FunctionalBN(nn.Module):
    """``F.batch_norm`` with running statistics and no affine: FX records it with torch's functional
    argument order (running_mean second), export with aten's (weight second)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, None, None, False, 0.1, 1e-3)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["fx", "export"])
def test_functional_batch_norm_fields_in_both_argument_orders(with_inputs):
    """Issue 12.6: one batch_norm argument parser for aten and F.batch_norm orders."""
    model = FunctionalBN().eval()
    report = inspect(model, torch.randn(2, 4, 3) if with_inputs else None)
    assert report.capture == ("export" if with_inputs else "fx")
    (site,) = report.sites
    assert (site.kind, site.source, site.affine, site.track_running_stats, site.eps) == \
        ("batchnorm", "function", False, True, 1e-3)
