"""BiT's WeightStandardizedConv2d runs F.batch_norm over its conv weight: weight standardization,
not a BatchNorm layer. inspect lists it apart, and export's norm_ops_unfolded counts what the
ONNX file of the unfolded model holds (the standardization is a constant of the weights)."""

import torch
import transformers

import normsurgeon
from normsurgeon import api


def _bit():
    torch.manual_seed(0)
    cfg = transformers.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="preactivation",
                                 num_groups=2)
    model = transformers.BitModel(cfg).eval()
    return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


def test_bit_weight_standardization_is_not_a_batchnorm(tmp_path):
    model, inputs = _bit()
    convs = [p for p, m in model.named_modules() if type(m).__name__ == "WeightStandardizedConv2d"]
    report = normsurgeon.inspect(model, inputs)
    assert report.counts() == {"groupnorm": 7}
    assert report.weight_standardization == convs and len(convs) == 9
    assert report.to_json()["weight_standardization"] == convs
    assert any("weight standardization" in n for n in report.tables()[0].notes)

    export = api.export(model, inputs, tmp_path / "bit.onnx", fold=True)
    in_file = normsurgeon.count_norm_ops(tmp_path / "bit.onnx")
    assert "BatchNormalization" not in export.norm_ops_unfolded and "BatchNormalization" not in in_file
    assert all("weight standardization" in a.reason for a in export.fold.skipped)
