"""The norm surgery through the CLI: a transformers directory in, a directory plain transformers loads out."""

import json

import pytest
import torch
from click.testing import CliRunner

from normsurgeon import zoo_llm
from normsurgeon.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fold_affine_llama_dir_reloads_in_plain_transformers(tmp_path):
    import transformers

    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    r = run("fold", src, "--affine", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert {f["kind"] for f in payload["folded"]} == {"rmsnorm"} and len(payload["folded"]) == 5
    assert (tmp_path / "out" / "config.json").is_file()
    before = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.all(after.model.norm.weight == 1)  # the folded weights, not the original ones
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    a, b = _logits(before, ids), _logits(after, ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5
    # the recipe directory still loads in normsurgeon (and replays the affine fold's structure)
    r = run("inspect", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output


def test_untie_needs_affine(tmp_path):
    src = tmp_path / "gpt2"
    zoo_llm.gpt2().save_pretrained(src)
    r = run("fold", src, "--untie")
    assert r.exit_code == 2 and "--untie goes with --affine" in r.output


def test_tied_gpt2_untie_dir(tmp_path):
    """ln_f's β needs a bias on lm_head that GPT-2's config cannot describe: the recipe directory
    carries it (and rebuilds it), no config.json is written for plain transformers."""
    from normsurgeon import api

    src = tmp_path / "gpt2"
    model = zoo_llm.gpt2()
    model.save_pretrained(src)
    r = run("fold", src, "--affine", "--untie", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    (ln_f,) = [f for f in payload["folded"] if f["norm"] == "transformer.ln_f"]
    assert ln_f["untied"] == ["lm_head"] and ln_f["created_bias"] == ["lm_head"]
    assert not (tmp_path / "out" / "config.json").exists()
    after = api.load(f"{tmp_path / 'out'}/").model
    assert after.lm_head.weight is not after.transformer.wte.weight and after.lm_head.bias is not None
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))
    a, b = _logits(model, ids), _logits(after, ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5


def test_convert_to_rms_cli(tmp_path):
    r = run("convert", "--help")
    assert "rms" in r.output and "--untie" in r.output
    src = tmp_path / "neox"
    model = zoo_llm.gpt_neox()
    model.save_pretrained(src)
    r = run("convert", src, "--to", "rms", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert len(payload["converted"]) == 5 and payload["verify"]["passed"]
    assert {c["to"] for c in payload["converted"]} == {"RMSNorm"}
    assert not (tmp_path / "out" / "config.json").exists()  # RMSNorm is not GPT-NeoX's class: recipe only
    r = run("convert", src, "--to", "bn", "--untie")
    assert r.exit_code == 2 and "--untie goes with --to rms" in r.output


def test_fold_then_rotate_llama_dir_reloads(tmp_path):
    import transformers

    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    assert run("fold", src, "--affine", "-o", f"{tmp_path / 'folded'}/").exit_code == 0
    r = run("rotate", f"{tmp_path / 'folded'}/", "--seed", "3", "-o", f"{tmp_path / 'rot'}/", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["rotated"] and payload["seed"] == 3 and payload["verify"]["max_rel_error"] < 1e-4
    before = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rot").eval()
    assert not torch.allclose(before.model.embed_tokens.weight, after.model.embed_tokens.weight, atol=1e-3)
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    a, b = _logits(before, ids), _logits(after, ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4


def test_rotate_refuses_unprepared_model(tmp_path):
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    r = run("rotate", src, "-o", f"{tmp_path / 'rot'}/")
    assert r.exit_code == 1 and "fold --affine first" in r.output
    assert not (tmp_path / "rot").exists()


def test_python_save_of_an_affine_folded_llama_loads_in_plain_transformers(tmp_path):
    """`normsurgeon.save` writes the same directory as `-o DIR/`: config.json included."""
    import normsurgeon
    import transformers

    model = zoo_llm.llama()
    x = model.example_inputs()
    folded, report = normsurgeon.fold(model, x, affine=True)
    assert report.passed and report.folded
    normsurgeon.save(folded, tmp_path / "d/")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        want = model(**x.kwargs).logits if hasattr(x, "kwargs") else model(*x).logits
        got = plain(**x.kwargs).logits if hasattr(x, "kwargs") else plain(*x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_large_models_save_is_checked_without_a_second_copy(tmp_path, monkeypatch):
    """From ``verify.LEAN_BYTES`` of weights, the save's round trip rebuilds on the meta device and reads
    the file back tensor by tensor (lowered here so a tiny Llama shows it); a weight that differs from
    the file is caught."""
    import normsurgeon
    import normsurgeon.verify as verify
    from normsurgeon import replay
    from normsurgeon.errors import NormSurgeonError

    monkeypatch.setattr(verify, "LEAN_BYTES", 0)
    rebuilt = []
    monkeypatch.setattr(replay, "load_dir", lambda *a, **k: rebuilt.append(a) or pytest.fail("full reload"))
    model = zoo_llm.llama()
    x = model.example_inputs()
    folded, report = normsurgeon.fold(model, x, affine=True)
    assert report.passed
    out = normsurgeon.save(folded, tmp_path / "d/")
    assert not rebuilt
    monkeypatch.undo()
    back = normsurgeon.load(out)
    with torch.no_grad():
        torch.testing.assert_close(back(**x.kwargs).logits, folded(**x.kwargs).logits, rtol=0, atol=0)
        folded.lm_head.weight[3, 4] += 1.0
    monkeypatch.setattr(verify, "LEAN_BYTES", 0)
    with pytest.raises(NormSurgeonError, match="lm_head.weight differs"):
        replay._check_without_copy(folded, out, out)


def test_a_large_models_lean_round_trip_catches_what_the_weights_do_not_show(tmp_path, monkeypatch):
    """An eps changed on the live model is not in its weights: the lean check compares every module's
    class, description, plain attributes and buffers with the rebuilt one and refuses the save."""
    import normsurgeon
    import normsurgeon.verify as verify
    from normsurgeon.errors import NormSurgeonError

    monkeypatch.setattr(verify, "LEAN_BYTES", 0)
    model = zoo_llm.llama()
    x = model.example_inputs()
    folded, report = normsurgeon.fold(model, x, affine=True)
    folded.model.norm.variance_epsilon = 0.5
    with pytest.raises(NormSurgeonError, match="model.norm"):
        normsurgeon.save(folded, tmp_path / "d/")
    assert not (tmp_path / "d").exists()
