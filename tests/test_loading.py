"""Loading every supported format, the --trust rule, and writes that never lose anything."""

import pytest
import torch
import torch.nn as nn

from normsurgeon import zoo
from normsurgeon.errors import NormSurgeonError
from normsurgeon.inputs import CallArgs, inputs_from_shapes, parse_shape
from normsurgeon.loading import load_model, save_model
from normsurgeon.outputs import compare_outputs, flatten_outputs


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_transformers_directory_loads_offline_with_derived_inputs(tmp_path):
    model = zoo.vit()
    model.save_pretrained(tmp_path / "vit")
    loaded = load_model(tmp_path / "vit")
    assert loaded.source == "transformers"
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    assert set(loaded.example_inputs.kwargs) == {"pixel_values"}
    assert loaded.example_inputs.kwargs["pixel_values"].shape[1:] == (3, 32, 32)
    ci = loaded.example_inputs
    assert compare_outputs(ci.call(model), ci.call(loaded.model)).max_abs_error == 0


def test_transformers_text_model_gets_input_ids(tmp_path):
    model = zoo.bert()
    model.save_pretrained(tmp_path / "bert")
    loaded = load_model(tmp_path / "bert")
    ids = loaded.example_inputs.kwargs["input_ids"]
    assert ids.dtype == torch.int64 and int(ids.max()) < 100


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(NormSurgeonError, match="without config.json"):
        load_model(tmp_path)


def test_corrupt_transformers_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NormSurgeonError, match="cannot read config"):
        load_model(tmp_path)


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(tiny_cnn(), path)
    with pytest.raises(NormSurgeonError, match="trust=True"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert isinstance(loaded.model, nn.Sequential) and loaded.source == "pickle"


def test_state_dict_file_points_to_factory_and_weights(tmp_path):
    path = tmp_path / "sd.pt"
    model = zoo.resnet()
    torch.save(model.state_dict(), path)
    with pytest.raises(NormSurgeonError, match="state dict"):
        load_model(path)
    loaded = load_model("normsurgeon.zoo:resnet", weights=path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])


def test_safetensors_weights_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    model = zoo.resnet()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_model("normsurgeon.zoo:resnet", weights=tmp_path / "w.safetensors")
    assert torch.equal(next(loaded.model.parameters()), next(model.parameters()))
    with pytest.raises(NormSurgeonError, match="does not fit"):
        load_model("normsurgeon.zoo:vit", weights=tmp_path / "w.safetensors")


def test_pt2_archive_loads_without_trust(tmp_path):
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    save_model(model, tmp_path / "m.pt2", example_inputs=(x,))
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.source == "pt2"
    assert loaded.example_inputs.args[0].shape == x.shape
    assert torch.allclose(loaded.model(x), model(x), atol=1e-6)


@pytest.mark.parametrize("content, match", [
    (b"garbage", "not a torch file"),
    (b"PK\x03\x04 truncated zip", "not a readable torch file|not a torch file"),
])
def test_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(NormSurgeonError, match=match):
        load_model(path, trust=True)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(NormSurgeonError, match="unknown model format"):
        load_model(tmp_path / "m.txt")
    with pytest.raises(NormSurgeonError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(NormSurgeonError, match="cannot import"):
        load_model("no_such_package_xyz.models:build")


def test_save_refuses_to_overwrite_input_or_existing_file(tmp_path):
    model = tiny_cnn()
    src = tmp_path / "in.pt"
    torch.save(model, src)
    before = src.read_bytes()
    with pytest.raises(NormSurgeonError, match="never overwrites its input"):
        save_model(model, src, force=True, input_path=src)
    assert src.read_bytes() == before
    out = tmp_path / "out.pt"
    save_model(model, out)
    with pytest.raises(NormSurgeonError, match="pass force=True"):
        save_model(model, out)
    save_model(model, out, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_failed_save_leaves_nothing_behind(tmp_path):
    class Unpicklable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fn = lambda x: x  # lambdas cannot be pickled

    with pytest.raises(Exception):
        save_model(Unpicklable(), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_output_path_checks(tmp_path):
    with pytest.raises(NormSurgeonError, match="does not exist"):
        save_model(tiny_cnn(), tmp_path / "nodir" / "x.pt")
    with pytest.raises(NormSurgeonError, match="must end in"):
        save_model(tiny_cnn(), tmp_path / "x.onnx")


def test_parse_shapes_and_outputs():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) == parse_shape("1x3x224x224")
    with pytest.raises(NormSurgeonError):
        parse_shape("1,a")
    ci = inputs_from_shapes(["2,3", "2,4"], ["float32", "int64"])
    assert ci.args[0].dtype == torch.float32 and ci.args[1].dtype == torch.int64
    out = {"a": torch.ones(2), "b": (torch.zeros(1), None, [torch.ones(3)])}
    assert [t.shape[0] for t in flatten_outputs(out)] == [2, 1, 3]
    stats = compare_outputs(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    assert stats.max_abs_error == 0.5 and stats.max_rel_error == 0.25


def test_like_keeps_token_ids_valid():
    ci = CallArgs((), {"input_ids": torch.tensor([[5, 99, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    other = ci.like(generator=torch.Generator().manual_seed(1), batch=4)
    assert other.kwargs["input_ids"].shape == (4, 3) and int(other.kwargs["input_ids"].max()) < 100
    assert bool((other.kwargs["attention_mask"] == 1).all())
