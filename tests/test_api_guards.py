"""Guards at the facade's seams: no output may replace a file the call reads, no work before a refusal
the call could have made first, and errors that name the problem rather than a Python attribute."""

import pytest
import torch
from torch import nn

from normsurgeon import api, zoo
from normsurgeon.errors import NormSurgeonError


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_write_inputs_never_replaces_the_weights_file(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(zoo.vit().state_dict(), weights)
    before = weights.read_bytes()
    with pytest.raises(NormSurgeonError, match="input"):
        api.write_inputs("normsurgeon.zoo:vit", weights, weights=weights, force=True)
    assert weights.read_bytes() == before


def test_convert_of_a_program_with_an_inputs_file_is_refused_as_such(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_small(), (x,)), pt2)
    inputs = tmp_path / "x.pt"
    torch.save({"x": x}, inputs)
    with pytest.raises(NormSurgeonError, match="convert needs the nn.Module"):
        api.convert(pt2, to="frozen", inputs_file=inputs)


def test_fold_refuses_an_output_it_would_not_verify(tmp_path):
    out = tmp_path / "out.pt"
    with pytest.raises(NormSurgeonError, match="verif"):
        api.fold(_small(), torch.randn(2, 3, 8, 8), output=out, verify=False)
    assert not out.exists()


def test_recalibrate_refuses_a_shard_as_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for r in range(2):
        torch.save({"x": torch.randn(4, 3, 8, 8)}, tmp_path / f"calib-{r}.pt")
    before = (tmp_path / "calib-1.pt").read_bytes()
    with pytest.raises(NormSurgeonError, match="shards"):
        api.recalibrate("normsurgeon.zoo:resnet", "calib-{rank}.pt", "calib-1.pt", force=True)
    assert (tmp_path / "calib-1.pt").read_bytes() == before


def test_recalibrate_refuses_an_unrebuildable_recipe_before_calibrating(tmp_path):
    model = tmp_path / "m.pt"
    torch.save(_small(), model)
    data = tmp_path / "d.pt"
    torch.save({"input_0": torch.randn(4, 3, 8, 8)}, data)
    calls = []
    with pytest.raises(NormSurgeonError, match="output"):
        api.recalibrate(model, data, tmp_path / "out/", trust=True, progress=lambda *a: calls.append(a))
    assert calls == []  # refused before any batch ran
