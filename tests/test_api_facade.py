"""The public facade: one signature per verb (the command's), Python wording in Python errors."""

from pathlib import Path

import pytest
import torch

import normsurgeon
from normsurgeon import api, zoo
from normsurgeon.errors import NormSurgeonError


def test_the_verbs_are_the_apis():
    assert normsurgeon.fold is api.fold and normsurgeon.convert is api.convert
    assert normsurgeon.export is api.export and normsurgeon.inspect is api.inspect
    assert not (Path(normsurgeon.__file__).parent / "fold.py").exists()  # no module hides behind the function
    assert normsurgeon.__version__ == "0.3.0"


def test_python_errors_name_keywords_the_cli_names_flags(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"x")
    model = zoo.resnet()
    with pytest.raises(NormSurgeonError) as err:
        normsurgeon.fold(model, model.example_inputs(), output=out)
    assert "pass force=True to replace it" in str(err.value) and "--" not in str(err.value)
    assert "pass --force to replace it" in err.value.cli_message and "-o " in err.value.cli_message
    with pytest.raises(NormSurgeonError, match="groups only goes with to='gn'") as err:
        normsurgeon.convert(zoo.vit(), to="bn", groups=2)
    assert "--groups only goes with --to gn" in err.value.cli_message


def test_fold_from_a_spec_saves_and_says_what_it_wrote(tmp_path):
    folded, report = normsurgeon.fold("normsurgeon.zoo:resnet", output=tmp_path / "r.pt")
    assert report.passed and report.output == str(tmp_path / "r.pt") and report.dry_run is False
    assert report.to_json()["output"] == str(tmp_path / "r.pt")
    assert isinstance(torch.load(tmp_path / "r.pt", weights_only=False), torch.nn.Module)
    _, again = normsurgeon.fold("normsurgeon.zoo:resnet", output=tmp_path / "r.pt", force=True)
    assert again.output == str(tmp_path / "r.pt")
    _, dry = normsurgeon.fold(zoo.resnet(), zoo.resnet().example_inputs())
    assert dry.output is None and dry.dry_run is True
    with pytest.raises(NormSurgeonError, match="trust go"):
        normsurgeon.fold(zoo.resnet(), zoo.resnet().example_inputs(), trust=True)
