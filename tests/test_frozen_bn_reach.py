"""Frozen batch norms of other libraries (DETR's DetrFrozenBatchNorm2d, torchvision-style
FrozenBatchNorm2d) are found and folded because their forward is proven to be a per-channel affine
map of their buffers, not because of their class name."""

import torch
import torch.nn as nn
import transformers

import normsurgeon
from normsurgeon.affine_probe import frozen_scale_shift


def _detr():
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 16, 32], depths=[2, 1, 1],
                                         layer_type="bottleneck", out_features=["stage3"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                  d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                  num_labels=3)
    model = transformers.DetrForObjectDetection(cfg).eval()
    g = torch.Generator().manual_seed(1)
    frozen = [m for m in model.modules() if type(m).__name__ == "DetrFrozenBatchNorm2d"]
    for m in frozen:  # fresh statistics are the identity: they would hide a wrong fold
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model, frozen, {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def test_detr_frozen_batch_norms_are_found_and_folded_exactly():
    model, frozen, inputs = _detr()
    assert len(frozen) == 16
    report = normsurgeon.inspect(model, inputs)
    sites = [s for s in report.sites if s.kind == "batchnorm"]
    assert len(sites) == 16
    assert all(s.calls == 1 and "frozen" in s.note and s.producer.endswith("(conv2d)") for s in sites)
    folded, fold_report = normsurgeon.fold(model, inputs)
    assert fold_report.passed and len(fold_report.folded) >= 14, fold_report.summary()
    remaining = sum(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in folded.modules())
    assert remaining == 16 - len(fold_report.folded)
    # exact: the folded model against the original, independently of the fold's own verification
    with torch.no_grad():
        want, got = model(**inputs).logits, folded(**inputs).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's forward (torchvision is not a dependency here)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n) * 0.1)
        self.register_buffer("running_mean", torch.randn(n) * 0.1)
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class NotAnAffine(TorchvisionFrozenBatchNorm2d):
    """Buffers of a BN, but a forward that is not a per-channel affine map: never a batch norm."""

    def forward(self, x):
        return super().forward(x) + 1e-3 * x * x


def _net(norm_cls):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm_cls(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_a_frozen_bn_is_proven_by_its_forward_not_its_name():
    x = torch.randn(2, 3, 10, 10)
    scale, shift = frozen_scale_shift(_net(TorchvisionFrozenBatchNorm2d)[1])
    bn = _net(TorchvisionFrozenBatchNorm2d)[1]
    want = bn.weight.double() * (bn.running_var.double() + 1e-5).rsqrt()
    assert torch.allclose(scale, want, rtol=1e-15) and scale.dtype == torch.float64
    folded, report = normsurgeon.fold(_net(TorchvisionFrozenBatchNorm2d), x)
    assert [a.path for a in report.folded] == ["1"] and report.passed
    assert isinstance(folded[1], nn.Identity)

    model = _net(NotAnAffine)
    assert frozen_scale_shift(model[1]) is None
    assert not [s for s in normsurgeon.inspect(model, x).sites if s.kind == "batchnorm"]
    _, report = normsurgeon.fold(model, x)
    assert not report.folded


def test_frozen_bns_are_not_counted_as_batchnormalization_ops(tmp_path):
    from normsurgeon import api

    x = torch.randn(2, 3, 10, 10)
    model = _net(TorchvisionFrozenBatchNorm2d)
    report = api.export(model, x, tmp_path / "m.onnx", fold=True)
    assert "BatchNormalization" not in report.norm_ops_unfolded  # the unfolded export holds a Mul and an Add
    unfolded = api.export_onnx(model, x, tmp_path / "unfolded.onnx")
    assert "BatchNormalization" not in unfolded.norm_ops


def test_rt_detr_frozen_batch_norms_fold_exactly():
    torch.manual_seed(0)
    backbone = transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    cfg = transformers.RTDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                    d_model=32, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 64],
                                    encoder_ffn_dim=64, encoder_attention_heads=2, decoder_layers=1,
                                    decoder_attention_heads=2, decoder_ffn_dim=64, num_queries=10, num_labels=3,
                                    decoder_in_channels=[32, 32, 32], num_denoising=0)
    model = transformers.RTDetrModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    frozen = {p for p, m in model.named_modules() if type(m).__name__ == "RTDetrFrozenBatchNorm2d"}
    for m in model.modules():
        if type(m).__name__ == "RTDetrFrozenBatchNorm2d" or isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    assert len(frozen) == 15
    _, report = normsurgeon.fold(model, {"pixel_values": torch.randn(2, 3, 64, 64, generator=g)})
    assert report.passed and frozen <= {a.path for a in report.folded}, report.summary()


def test_converting_a_frozen_bn_says_what_it_is():
    _, report = normsurgeon.convert(_net(TorchvisionFrozenBatchNorm2d), to="gn", example_inputs=torch.randn(2, 3, 10, 10))
    (skip,) = report.skipped
    assert skip.path == "1" and "frozen batch norm" in skip.reason and "functional" not in skip.reason
