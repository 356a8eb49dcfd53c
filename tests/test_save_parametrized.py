"""A weight_norm model (Wav2Vec2's positional conv) cannot be pickled by torch.save: `-o out.pt` says
so in one line before any work (exit 2) and names the outputs that hold it; `-o DIR/` saves it."""

import pytest
from click.testing import CliRunner

from normsurgeon import zoo
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.loading import save_model


def test_convert_to_a_pt_file_refuses_a_parametrized_model_in_one_line(tmp_path):
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(main, ["convert", "normsurgeon.zoo:wav2vec2", "--to", "bn", "-o", str(out)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "unexpected" not in line and "Traceback" not in line
    assert "weight_norm" in line and "-o DIR/" in line and "encoder.pos_conv_embed.conv" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_save_model_of_a_parametrized_model_is_a_clear_error_and_a_recipe_saves_it(tmp_path):
    import normsurgeon

    model = zoo.wav2vec2()
    with pytest.raises(NormSurgeonError, match="parametrized"):
        save_model(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    out = normsurgeon.save(model, f"{tmp_path / 'm'}/", base="normsurgeon.zoo:wav2vec2",
                           example_inputs=model.example_inputs())  # checked: loads back bit for bit
    loaded = normsurgeon.load(out)
    assert type(loaded.model if hasattr(loaded, "model") else loaded).__name__ == "Wav2Vec2Model"
