"""The user's data in verification (`--inputs` on fold and convert) and integer inputs the tool draws."""

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from normsurgeon import api
from normsurgeon.cli import main
from normsurgeon.inputs import CallArgs, int_input_bounds

MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Branchy(nn.Module):
        """Large images take a second pass through the same BatchNorm: a path the 16x16 example never takes."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.5, 0.5)
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.uniform_(0.5, 1.5)
            self.eval()
            self.example_inputs = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if x.shape[-1] > 16:
                y = self.bn(y)
            return self.head(y)


    class SmallVocab(nn.Module):
        """An embedding with 20 rows and no example inputs of its own."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(20, 8)
            self.norm = nn.LayerNorm(8)
            self.out = nn.Linear(8, 4)

        def forward(self, ids):
            return self.out(self.norm(self.emb(ids)))


    def branchy():
        return Branchy()


    def small_vocab():
        return SmallVocab().eval()


    def plain_cnn():
        """A CNN factory as users write them: no example inputs anywhere."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        return model.eval()
''')


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "ns_user_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_verifies_on_the_users_inputs(user_models):
    torch.save({"input_0": torch.randn(3, 3, 16, 16)}, user_models / "real.pt")
    result = run("fold", "ns_user_models:branchy", "--inputs", "real.pt", "--json")
    assert result.exit_code == 0, result.output
    verify = json.loads(result.output)["verify"]
    assert verify["passed"] is True and verify["user_inputs"] == 1 and verify["inputs"] == 5


def test_fold_caught_by_data_that_takes_another_path(user_models):
    # the example (16x16) never reaches the second BN call; the check at other sizes (20x20) does
    result = run("fold", "ns_user_models:branchy", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["folded"] == [] and [8, 3, 20, 20] in [s[0] for s in doc["verify"]["shapes"]]
    # so do the user's 32x32 images, and the fold is rolled back with the error it caused
    torch.save([{"input_0": torch.randn(1, 3, 32, 32)}, {"input_0": torch.randn(2, 3, 32, 32)}],
               user_models / "real.pt")
    result = run("fold", "ns_user_models:branchy", "--inputs", "real.pt", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["folded"] == [] and doc["summary"]["rolled_back"] == 1
    assert "changed the outputs" in doc["skipped"][0]["reason"]
    assert doc["verify"]["user_inputs"] == 2
    result = run("fold", "ns_user_models:branchy", "--inputs", "real.pt")
    assert "2 of them the user's" in result.output


def test_user_inputs_the_model_rejects_are_an_error(user_models):
    torch.save({"input_0": torch.randn(1, 5, 16, 16)}, user_models / "bad.pt")
    for cmd in ("fold", "convert"):
        extra = ["--to", "frozen"] if cmd == "convert" else []
        result = run(cmd, "ns_user_models:branchy", *extra, "--inputs", "bad.pt")
        assert result.exit_code == 2, result.output
        assert "--inputs set 1: the model rejects it" in result.output and "Traceback" not in result.output


def test_convert_counts_the_users_inputs(user_models):
    torch.save({"input_0": torch.randn(1, 3, 32, 32)}, user_models / "real.pt")
    result = run("convert", "ns_user_models:branchy", "--to", "frozen", "--inputs", "real.pt", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["verify"]["passed"] is True and doc["verify"]["user_inputs"] == 1
    assert doc["output_change"]["user_inputs"] == 1


def test_drawn_ids_stay_below_the_embedding_size(user_models):
    # ids drawn from [0, 100) would index past the 20 rows ("index out of range in self")
    for cmd in (["inspect"], ["convert", "--to", "bn"], ["fold"]):
        result = run(*cmd, "ns_user_models:small_vocab", "--input-shape", "2,12", "--input-dtype", "int64")
        assert result.exit_code == 0, result.output
    loaded = api.load("ns_user_models:small_vocab", input_shapes=["4,50"], input_dtypes=["int64"])
    ids = loaded.example_inputs.args[0]
    assert int(ids.max()) < 20 and int(ids.max()) > 10


def test_int_bounds_follow_the_consuming_embedding(zoo_model):
    model, _ = zoo_model("bert")
    ci = CallArgs((), {"input_ids": torch.randint(0, 500, (2, 8)), "token_type_ids": torch.randint(0, 5, (2, 8))})
    assert int_input_bounds(model, ci) == {"input_ids": 100, "token_type_ids": 2}


def test_a_named_file_fits_inputs_given_by_shape(user_models, zoo_model):
    """--input-shape gives a positional input; a file names it by the forward parameter it binds to."""
    zoo_model("resnet")[0].save_pretrained(user_models / "hf_resnet")
    torch.save({"pixel_values": torch.randn(3, 3, 64, 64)}, user_models / "real.pt")
    result = run("fold", "hf_resnet", "--input-shape", "1,3,64,64", "--inputs", "real.pt", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["verify"]["user_inputs"] == 1
    # a plain factory: forward(x) -> "x"; the positional name input_0 still works
    for name in ("x", "input_0"):
        torch.save({name: torch.randn(3, 3, 16, 16)}, user_models / "real.pt")
        result = run("fold", "ns_user_models:branchy", "--inputs", "real.pt", "--json")
        assert result.exit_code == 0, result.output + result.stderr
    torch.save({"pixels": torch.randn(3, 3, 16, 16)}, user_models / "real.pt")
    result = run("fold", "ns_user_models:branchy", "--inputs", "real.pt")
    assert result.exit_code == 2 and "['x']" in result.stderr, result.stderr  # the name the user can use


def test_calibrate_takes_a_plain_factorys_inputs_from_the_data(user_models):
    torch.save({"x": torch.randn(12, 3, 16, 16) * 3 + 1}, user_models / "calib.pt")
    result = run("calibrate", "ns_user_models:plain_cnn", "--data", "calib.pt", "-o", "cal.pt", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout)["samples"] == 12
    bn = torch.load(user_models / "cal.pt", weights_only=False)[1]
    assert abs(float(bn.running_mean.mean())) > 0.01  # statistics of the data, not the fresh 0/1


def test_inputs_command_writes_the_layout_every_command_reads(user_models):
    result = run("inputs", "ns_user_models:branchy", "--batch", "5", "--shards", "2", "-o", "c-{rank}.pt", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert data["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert data["files"] == ["c-0.pt", "c-1.pt"]
    shards = [torch.load(user_models / f, weights_only=True) for f in data["files"]]
    assert all(list(s) == ["x"] and s["x"].shape == (5, 3, 16, 16) for s in shards)
    assert not torch.equal(shards[0]["x"], shards[1]["x"])
    result = run("fold", "ns_user_models:branchy", "--inputs", "c-0.pt")
    assert result.exit_code == 0, result.stderr
    result = run("inputs", "ns_user_models:branchy", "-o", "c-0.pt")  # never replaced silently
    assert result.exit_code == 2 and "--force" in result.stderr
