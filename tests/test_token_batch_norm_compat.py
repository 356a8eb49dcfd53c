"""TokenBatchNorm holds a BatchNorm1d child (issue 16 row 12: torch's own SyncBatchNorm converter
then synchronizes it correctly, with no import-time patch). What version 1 (a BatchNorm1d subclass)
wrote still loads: its state dicts, its pickles, and recipes whose folds name the TokenBatchNorm."""

import json
import pickle

import torch
import torch.nn as nn

import normsurgeon
from normsurgeon import api, zoo
from normsurgeon.nn import TokenBatchNorm


def _random(tbn):
    with torch.no_grad():
        tbn.running_mean.uniform_(-1, 1)
        tbn.running_var.uniform_(0.5, 2)
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-0.5, 0.5)
    return tbn.eval()


def test_state_dict_keys_are_a_batchnorm1d_s_and_nested_keys_load_too():
    tbn = _random(TokenBatchNorm(5))
    assert list(tbn.state_dict()) == list(nn.BatchNorm1d(5).state_dict())
    assert [n for n, _ in tbn.named_parameters()] == ["bn.weight", "bn.bias"]
    for state in (tbn.state_dict(), {f"bn.{k}": v for k, v in tbn.state_dict().items()}):
        other = TokenBatchNorm(5).eval()
        other.load_state_dict(state)
        x = torch.randn(3, 4, 5)
        assert torch.equal(other(x), tbn(x))


def test_a_version_1_pickle_loads():
    """A version-1 TokenBatchNorm pickled as the BatchNorm1d subclass it was."""
    bn = _random(nn.BatchNorm1d(5))
    data = pickle.dumps(bn, protocol=2).replace(b"ctorch.nn.modules.batchnorm\nBatchNorm1d\n",
                                                b"cnormsurgeon.nn.token_batch_norm\nTokenBatchNorm\n")
    old = pickle.loads(data)
    assert type(old) is TokenBatchNorm and type(old.bn) is nn.BatchNorm1d
    x = torch.randn(3, 4, 5)
    assert torch.equal(old(x), bn(x.reshape(-1, 5)).view(3, 4, 5))
    assert list(old.state_dict()) == list(bn.state_dict())


def test_folds_name_the_token_batch_norm_and_its_recipe_replays(tmp_path):
    """The fold matches the BatchNorm1d child, but reports and records the TokenBatchNorm's path (as
    version 1 did, so its recipes replay) and leaves a plain Identity there."""
    torch.manual_seed(0)
    model = zoo.vit()
    ci = model.example_inputs()
    converted, _ = api.convert(model, "bn", example_inputs=ci, calibrate_batches=[ci])
    tokens = {p for p, m in converted.named_modules() if isinstance(m, TokenBatchNorm)}
    folded, report = api.fold(converted.eval(), ci)
    assert report.passed and {a.path for a in report.folded} == tokens
    assert all(isinstance(folded.get_submodule(p), nn.Identity) for p in tokens)
    out = api.save(folded, tmp_path / "r", example_inputs=ci)
    doc = json.loads((out / "recipe.json").read_text())
    fold_action = next(a for a in doc["actions"] if a["op"] == "fold")
    assert {f["norm"] for f in fold_action["folded"]} == tokens
    loaded = normsurgeon.load(out)
    assert all(isinstance(loaded.get_submodule(p), nn.Identity) for p in tokens)
    with torch.no_grad():
        torch.testing.assert_close(ci.call(loaded).logits, ci.call(folded.eval()).logits, rtol=0, atol=0)
