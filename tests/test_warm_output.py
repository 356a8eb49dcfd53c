"""The weights file written into pages allocated while the pass ran (``warm_output``): the same file
safetensors' own ``save_model`` writes, and nothing left behind whatever happens."""

import json
import os

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from normsurgeon import warm_output, zoo_llm
from normsurgeon.cli import main
from normsurgeon.saving import TMP_PREFIX


class Mixed(nn.Module):
    """Tied weights, several dtypes, a 0-dim and a bool buffer, an empty tensor."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight
        self.proj = nn.Linear(5, 3).to(torch.bfloat16)
        self.register_buffer("scale", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("steps", torch.arange(4, dtype=torch.int64))
        self.register_buffer("nothing", torch.zeros(0, 3))


def _file_state(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("prefill", [0, 10, 1 << 16])  # a warm file shorter, a bit and much longer than needed
def test_written_into_a_warm_file_as_save_model_writes_it(tmp_path, prefill):
    torch.manual_seed(0)
    model = Mixed()
    save_model(model, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    warm = warm_output.WarmFile(tmp_path / "out", prefill)
    warm._thread.join()
    assert warm.path.stat().st_size == prefill
    warm_output.save_weights(model, tmp_path / "got.safetensors", {"format": "pt"}, warm)
    assert not warm.path.exists()
    ref_meta, ref = _file_state(tmp_path / "ref.safetensors")
    got_meta, got = _file_state(tmp_path / "got.safetensors")
    assert got_meta == ref_meta and "head.weight" in got_meta  # the tied name, dropped as save_model drops it
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape and torch.equal(ref[k], got[k]), k
    # the same bytes for the same tensors: only the order of the header's entries may differ
    assert os.path.getsize(tmp_path / "got.safetensors") == os.path.getsize(tmp_path / "ref.safetensors")
    assert load_file(str(tmp_path / "got.safetensors")).keys() == ref.keys()


def test_without_a_warm_file_safetensors_writes(tmp_path):
    model = Mixed()
    warm_output.save_weights(model, tmp_path / "w.safetensors", {"format": "pt"})
    assert _file_state(tmp_path / "w.safetensors")[1].keys() == Mixed().state_dict().keys() - {"head.weight"}


def test_warming_fills_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(warm_output, "WARM_BYTES", 0)
    model = Mixed()
    with warm_output.warming(tmp_path / "out", model) as warm:
        assert warm is not None and warm.path.parent == tmp_path and warm.path.name.startswith(TMP_PREFIX)
        warm._thread.join()
        assert warm.path.stat().st_size == warm_output.state_bytes(model) + warm_output._SLACK
    assert not warm.path.exists()  # never taken: removed
    monkeypatch.setattr(warm_output, "WARM_BYTES", 1 << 40)
    with warm_output.warming(tmp_path / "out", model) as warm:
        assert warm is None  # small models write directly
    with warm_output.warming(None, model) as warm:
        assert warm is None


def test_state_bytes_counts_tied_weights_once():
    m = Mixed()
    assert warm_output.state_bytes(m) == sum(t.numel() * t.element_size() for t in m.state_dict().values()) \
        - m.head.weight.numel() * 4


def _no_temp(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_fold_affine_dir_through_a_warm_file(tmp_path, monkeypatch):
    """The CLI's fold -o with every model warm: the directory reloads in plain transformers with the
    folded model's logits, the weights file is the warm file moved into place, nothing stays behind."""
    import transformers

    monkeypatch.setattr(warm_output, "WARM_BYTES", 0)
    taken = []
    real_take = warm_output.WarmFile.take
    monkeypatch.setattr(warm_output.WarmFile, "take",
                        lambda self: taken.append(os.stat(self.path).st_ino) or real_take(self))
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    r = CliRunner().invoke(main, ["fold", str(src), "--affine", "-o", f"{tmp_path / 'out'}/", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["folded"]) == 5
    assert taken == [os.stat(tmp_path / "out" / "model.safetensors").st_ino]
    assert _no_temp(tmp_path) == []
    before = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = before(input_ids=ids).logits, after(input_ids=ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_nothing_left_behind_when_nothing_is_written(tmp_path, monkeypatch):
    """A rotate the model refuses writes no output, and its warm file goes too."""
    monkeypatch.setattr(warm_output, "WARM_BYTES", 0)
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)  # γ still in the norms: rotate refuses before changing anything
    r = CliRunner().invoke(main, ["rotate", str(src), "-o", f"{tmp_path / 'out'}/"])
    assert r.exit_code == 1, r.output
    assert not (tmp_path / "out").exists() and _no_temp(tmp_path) == []
