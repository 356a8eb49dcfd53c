"""`fold --affine --stream -o OUT/`: a transformers directory folded shard by shard from a tiny twin's plan
(normsurgeon/shard_stream.py, normsurgeon/twin.py). Real transformers models from tiny configs, saved with
save_pretrained; the outputs are loaded with plain transformers."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from normsurgeon import shard_stream, twin, zoo_llm
from normsurgeon.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _logits(d, ids, **kw):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _tensors(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


IDS = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(5))


def _wide_llama(hidden=128):
    """Not the twin's width (hidden 128, 8 heads / 2 kv heads, head_dim 16 explicit): the twin differs."""
    import transformers

    torch.manual_seed(0)
    heads = hidden // 16
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                   num_key_value_heads=2 if heads % 2 == 0 else 1,
                                   head_dim=16, intermediate_size=256, vocab_size=200, max_position_embeddings=64,
                                   tie_word_embeddings=False, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    zoo_llm.randomize_norms(model)
    return model


def test_streamed_sharded_llama_matches_in_memory_fold(tmp_path):
    src = tmp_path / "llama"
    _wide_llama().save_pretrained(src, max_shard_size="200KB")
    assert (src / "model.safetensors.index.json").is_file()
    before = _digest(src)
    r = run("fold", src, "--affine", "--stream", "--max-shard-mb", "0.15", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert len(rep["folded"]) == 5 and not rep["skipped"] and rep["stream"]["twin"]["folded"] == 5
    assert rep["stream"]["twin"]["hidden_size"] == 64  # planned on a narrower twin
    assert rep["verify"]["whole_model_run"] is False and rep["verify"]["max_rel_error"] < 1e-6
    assert rep["stream"]["shards"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert _digest(src) == before  # the input is never written
    r = run("fold", src, "--affine", "-o", f"{tmp_path / 'mem'}/")
    assert r.exit_code == 0, r.output
    orig, streamed, mem = (_logits(d, IDS) for d in (src, tmp_path / "out", tmp_path / "mem"))
    assert _rel(streamed, mem) < 1e-5 and _rel(orig, streamed) < 1e-5
    out, orig = _tensors(tmp_path / "out"), _tensors(src)
    assert out.keys() == orig.keys() and torch.all(out["model.norm.weight"] == 1)  # folded, not copied
    assert not torch.equal(out["lm_head.weight"], orig["lm_head.weight"])
    assert torch.equal(out["model.layers.1.self_attn.o_proj.weight"], orig["model.layers.1.self_attn.o_proj.weight"])


def test_untied_head_of_a_tied_one_plus_model(tmp_path):
    """Gemma: RMSNorm computes x·(1 + w) and lm_head is tied to the embedding. Without --untie the final
    norm is refused with the in-memory fold's reason; with it lm_head gets its own folded tensor."""
    src = tmp_path / "gemma"
    zoo_llm.gemma().save_pretrained(src)
    r = run("fold", src, "--affine", "--stream", "-o", f"{tmp_path / 'tied'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    (norm,) = [s for s in rep["skipped"] if s["norm"] == "model.norm"]
    assert "tied" in norm["reason"] and "--untie" in norm["reason"] and len(rep["folded"]) == 4
    r = run("fold", src, "--affine", "--untie", "--stream", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    (norm,) = [f for f in rep["folded"] if f["norm"] == "model.norm"]
    assert norm["untied"] == ["lm_head"] and len(rep["folded"]) == 5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    w = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.all(w["model.norm.weight"] == 0) and "lm_head.weight" in w
    assert torch.equal(w["model.embed_tokens.weight"], load_file(src / "model.safetensors")["model.embed_tokens.weight"])
    assert _rel(_logits(src, IDS), _logits(tmp_path / "out", IDS)) < 1e-5


def test_post_norms_are_skipped_with_reasons_and_the_dir_is_valid(tmp_path):
    src = tmp_path / "gemma2"
    zoo_llm.gemma2().save_pretrained(src)
    r = run("fold", src, "--affine", "--stream", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    post = [s for s in rep["skipped"] if "post_" in s["norm"]]
    assert len(post) == 4 and all("residual" in s["reason"] or "post-norm" in s["reason"] for s in post)
    assert {f["norm"] for f in rep["folded"]} == {f"model.layers.{i}.{n}" for i in range(2)
                                                  for n in ("input_layernorm", "pre_feedforward_layernorm")}
    assert _rel(_logits(src, IDS), _logits(tmp_path / "out", IDS)) < 1e-5


def test_a_site_that_overflows_in_its_dtype_rolls_back(tmp_path):
    """float16 weights, a final-norm γ of 3e4 on one channel and lm_head weights of 4 there: W·diag(γ) is
    1.2e5, past float16's 65504. The twin (random γ) cannot see it; the local check on the real weights
    does: that site is written as it was, the others fold."""
    model = zoo_llm.llama().half()
    with torch.no_grad():
        model.model.norm.weight[0] = 3e4
        model.lm_head.weight[:, 0] = 4.0
    src = tmp_path / "llama16"
    model.save_pretrained(src)
    r = run("fold", src, "--affine", "--stream", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    (rb,) = [s for s in rep["skipped"] if s["rolled_back"]]
    assert rb["norm"] == "model.norm" and "non-finite" in rb["reason"] and len(rep["folded"]) == 4
    assert rep["verify"]["tolerance"] == 5e-3
    w, orig = load_file(tmp_path / "out" / "model.safetensors"), load_file(src / "model.safetensors")
    assert torch.equal(w["model.norm.weight"], orig["model.norm.weight"])
    assert torch.equal(w["lm_head.weight"], orig["lm_head.weight"])
    assert torch.all(w["model.layers.0.input_layernorm.weight"] == 1)
    assert _rel(_logits(src, IDS), _logits(tmp_path / "out", IDS)) < 1e-3  # float16 storage of W·diag(γ)


def test_the_local_check_catches_a_wrong_fold():
    """ReaderCheck compares reader(γ⊙n + β) with reader'(n): a fold that forgot γ fails it, the right one passes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g)
    gamma = 1 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)
    n = shard_stream.normalized_rows(8, "rmsnorm", 0)
    for layout, weight in (("out_in", w), ("in_out", w.T.contiguous())):
        right = weight.double() * (gamma[None, :] if layout == "out_in" else gamma[:, None])
        errors = {}
        for name, new in (("right", right.float()), ("wrong", weight)):
            check = shard_stream.ReaderCheck(n * gamma, n, layout)
            rows = weight.shape[0]
            for start in range(0, rows, 5):  # in chunks, as the stream folds
                check.add(start, min(rows, start + 5), weight[start:start + 5], new[start:start + 5], 12)
            errors[name] = check.error(None, None)
        assert errors["right"] < 1e-6 and errors["wrong"] > 1e-2, (layout, errors)


WIDE = {  # real-sized configs (built on the meta device: no memory), widths the twin must shrink
    "LlamaForCausalLM": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                             num_key_value_heads=4, intermediate_size=5632, vocab_size=32000)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(hidden_size=2048, num_hidden_layers=4, num_attention_heads=16,
                                             num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                                             vocab_size=151936)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(hidden_size=2304, num_hidden_layers=4, num_attention_heads=8,
                                               num_key_value_heads=4, head_dim=256, intermediate_size=9216,
                                               vocab_size=256000)),
    "FalconForCausalLM": ("FalconConfig", dict(hidden_size=4544, num_hidden_layers=3, num_attention_heads=71,
                                               multi_query=True, vocab_size=65024)),
    "GPT2LMHeadModel": ("GPT2Config", dict(n_embd=768, n_layer=3, n_head=12, vocab_size=50257)),
    "Phi3ForCausalLM": ("Phi3Config", dict(hidden_size=3072, num_hidden_layers=3, num_attention_heads=32,
                                           num_key_value_heads=32, intermediate_size=8192, vocab_size=32064,
                                           pad_token_id=32000)),
}


@pytest.mark.parametrize("cls_name", sorted(WIDE))
def test_twin_shrinks_widths_and_keeps_names_and_ranks(cls_name):
    import transformers

    config_cls, kw = WIDE[cls_name]
    config = getattr(transformers, config_cls)(**kw)
    cls = getattr(transformers, cls_name)
    with torch.device("meta"):
        real = cls(config)
    small = twin.build(config, cls)
    assert small.config.num_hidden_layers == config.num_hidden_layers
    assert {n: p.dim() for n, p in small.state_dict().items()} == {n: p.dim() for n, p in real.state_dict().items()}
    assert sum(p.numel() for p in small.parameters()) < 2e6 < sum(p.numel() for p in real.parameters())


def test_checkpoint_names_that_are_not_the_class_are_refused(tmp_path):
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    w = load_file(src / "model.safetensors")
    w["model.layers.0.mlp.gate.weight"] = w.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    r = run("fold", src, "--affine", "--stream", "-o", f"{tmp_path / 'out'}/")
    assert r.exit_code == 2 and "gate_proj.weight" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_bad_inputs_get_one_line(tmp_path):
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    before = _digest(src)
    cases = [
        (("fold", tmp_path / "nothing", "--affine", "--stream", "-o", f"{tmp_path / 'o'}/"), "transformers directory"),
        (("fold", src, "--affine", "--stream"), "-o DIR/"),
        (("fold", src, "--stream", "-o", f"{tmp_path / 'o'}/"), "--affine"),
        (("fold", src, "--affine", "--stream", "-o", tmp_path / "m.pt"), "directory"),
        (("fold", src, "--affine", "--stream", "--rtol", "1e-3", "-o", f"{tmp_path / 'o'}/"), "--rtol"),
        (("fold", src, "--affine", "--max-shard-mb", "5", "-o", f"{tmp_path / 'o'}/"), "--stream"),
        (("fold", src, "--affine", "--stream", "-o", f"{src}/"), "never overwrites"),
        (("fold", src, "--affine", "--stream", "-o", f"{src / 'sub'}/", "--force"), "never writes into its inputs"),
    ]
    for args, says in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in lines[0], (args, r.output)
    no_weights = tmp_path / "cfg_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((src / "config.json").read_text())
    r = run("fold", no_weights, "--affine", "--stream", "-o", f"{tmp_path / 'o'}/")
    assert r.exit_code == 2 and "model.safetensors" in r.output
    assert _digest(src) == before and not (tmp_path / "o").exists()


def test_existing_output_needs_force(tmp_path):
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    out = tmp_path / "out"
    assert run("fold", src, "--affine", "--stream", "-o", f"{out}/").exit_code == 0
    r = run("fold", src, "--affine", "--stream", "-o", f"{out}/")
    assert r.exit_code == 2 and "--force" in r.output
    r = run("fold", src, "--affine", "--stream", "-o", f"{out}/", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".normsurgeon-tmp")]


# --- rotate --stream ------------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden, matrix", [(128, "randomized Hadamard"),
                                            (48, "randomized Hadamard (16) ⊗ random orthogonal (QR, 3)")])
def test_streamed_rotation_matches_the_in_memory_one(tmp_path, hidden, matrix):
    """A power-of-2 width and 48 = 16·3 (the Kronecker Q): the streamed rotation is the in-memory one's,
    value for value, and the rotated model keeps its logits."""
    from normsurgeon import api

    src = tmp_path / "llama"
    _wide_llama(hidden).save_pretrained(src, max_shard_size="200KB")
    assert run("fold", src, "--affine", "--stream", "-o", f"{tmp_path / 'folded'}/").exit_code == 0
    before = _digest(tmp_path / "folded")
    r = run("rotate", tmp_path / "folded", "--stream", "--seed", "3", "-o", f"{tmp_path / 'rot'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["rotated"] and rep["width"] == hidden and rep["matrix"] == matrix
    assert len(rep["norms"]) == 5 and rep["verify"]["whole_model_run"] is False
    assert rep["stream"]["twin"]["width"] == min(hidden, 64) and rep["stream"]["rotated_tensors"] == 16
    assert 0 < rep["verify"]["max_rel_error"] < 1e-6  # float32 weights: the undone rotation is checked
    assert _digest(tmp_path / "folded") == before
    assert _rel(_logits(src, IDS), _logits(tmp_path / "rot", IDS)) < 1e-4
    mem, mem_rep = api.rotate(str(tmp_path / "folded"), seed=3)  # the in-memory rotation, same seed: same tensors
    assert mem_rep.matrix == matrix
    streamed = _tensors(tmp_path / "rot")
    for name, p in mem.state_dict().items():
        assert torch.equal(streamed[name], p), name  # the same fast transform, the same slices
    emb = "model.embed_tokens.weight"
    assert not torch.allclose(streamed[emb], _tensors(tmp_path / "folded")[emb], atol=1e-3)


@pytest.mark.parametrize("n", [48, 64, 15])
def test_streamed_rotate_tensor_is_the_dense_q_and_its_check_can_fail(tmp_path, n):
    """``rotate_tensor`` with the fast ``Rotation`` gives x·Q (rows) and Qᵀ·x (columns) of the dense Q
    (float64 weights: to 1e-12), its check passes near float64 rounding; a Q whose small factor is not
    orthogonal (B scaled by 1.01) is applied the same way, and undoing it misses the original by ~2e-2."""
    from normsurgeon.norm_math import Rotation, rotation
    from normsurgeon.shard_files import Checkpoint
    from normsurgeon.shard_rotate import rotate_tensor

    g = torch.Generator().manual_seed(1)
    tensors = {"reader": torch.randn(40, n, generator=g, dtype=torch.float64),
               "writer": torch.randn(n, 30, generator=g, dtype=torch.float64),
               "bias": torch.randn(n, generator=g, dtype=torch.float64)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    q = rotation(n, 7)
    dense = q.dense()
    for name, how, want in (("reader", "right", tensors["reader"] @ dense),
                            ("writer", "left", dense.T @ tensors["writer"]),
                            ("bias", "right", tensors["bias"] @ dense)):
        got, err = rotate_tensor(ckpt, name, how, q, 0)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), name
        assert err < 1e-14, (name, err)
    bad = Rotation(n, "bad", q.scale, (q.matrix if q.matrix is not None else torch.eye(1, dtype=torch.float64)) * 1.01)
    for name, how in (("reader", "right"), ("writer", "left")):
        _, err = rotate_tensor(ckpt, name, how, bad, 0)
        assert 1e-3 < err < 1e-1, (name, err)


def test_streamed_rotation_refuses_norms_with_an_affine(tmp_path):
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    r = run("rotate", src, "--stream", "-o", f"{tmp_path / 'rot'}/")
    assert r.exit_code == 1 and "still carries an affine scale" in r.output and "--affine --stream" in r.output
    assert not (tmp_path / "rot").exists()


def test_streamed_rotation_that_overflows_is_refused_whole(tmp_path):
    """float16, affine-free norms, one embedding row of 6e4 everywhere: the Hadamard sums it to √32·6e4,
    past float16's range. Undoing the stored rotation cannot give the row back: nothing is written."""
    model = zoo_llm.llama().half()
    with torch.no_grad():
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.fill_(1.0)
        model.model.embed_tokens.weight[3] = 6e4
    src = tmp_path / "llama16"
    model.save_pretrained(src)
    r = run("rotate", src, "--stream", "-o", f"{tmp_path / 'rot'}/", "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert not rep["rotated"] and rep["refused"][0]["path"] == "model.embed_tokens.weight"
    assert "non-finite" in rep["refused"][0]["reason"]
    assert not (tmp_path / "rot").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".normsurgeon")]


def test_streamed_rotation_of_a_tied_one_plus_model(tmp_path):
    """Gemma: affine-free means w = 0 (x·(1 + w)); the tied embedding/lm_head is one stored tensor, E·Q
    in both roles, rotated once."""
    model = zoo_llm.gemma()
    with torch.no_grad():
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.zero_()
    src = tmp_path / "gemma"
    model.save_pretrained(src)
    r = run("rotate", src, "--stream", "-o", f"{tmp_path / 'rot'}/", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["rotated"] and "lm_head" in rep["readers"] and rep["stream"]["rotated_tensors"] == 15
    assert "lm_head.weight" not in _tensors(tmp_path / "rot")  # still tied
    assert _rel(_logits(src, IDS), _logits(tmp_path / "rot", IDS)) < 1e-4


def test_a_directory_naming_remote_code_runs_none_of_it(tmp_path):
    """The twin reads config.json as data: a config whose auto_map names a module in the directory is
    refused (its architectures are not transformers' own), and the module, which would write a marker,
    is never imported."""
    src = tmp_path / "llama"
    zoo_llm.llama().save_pretrained(src)
    marker = tmp_path / "marker"
    (src / "evil_modeling.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
                                          "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilForCausalLM"}
    (src / "config.json").write_text(json.dumps(cfg))
    for cmd in (("fold", src, "--affine", "--stream"), ("rotate", src, "--stream")):
        r = run(*cmd, "-o", f"{tmp_path / cmd[0]}/")
        assert r.exit_code == 2, r.output
        assert "not a model class built into transformers" in r.output
        assert not marker.exists() and not (tmp_path / cmd[0]).exists()


def test_a_tied_head_stored_twice_with_other_values_is_refused(tmp_path):
    """A tied checkpoint that also stores a stale lm_head: transformers ties it to the embedding and
    ignores the stored copy, so folding the copy would change the model; the site is refused."""
    src = tmp_path / "gemma"
    zoo_llm.gemma().save_pretrained(src)
    w = load_file(src / "model.safetensors")
    w["lm_head.weight"] = w["model.embed_tokens.weight"] * 2
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    r = run("fold", src, "--affine", "--untie", "--stream", "-o", f"{tmp_path / 'out'}/", "--json")
    assert r.exit_code == 0, r.output
    (norm,) = [s for s in json.loads(r.stdout)["skipped"] if s["norm"] == "model.norm"]
    assert "different values" in norm["reason"]
    assert _rel(_logits(src, IDS), _logits(tmp_path / "out", IDS)) < 1e-5


def test_a_recipe_directory_streams_into_a_plain_transformers_directory(tmp_path):
    """`fold -o DIR/` writes a recipe directory with config.json (architectures named, as
    save_pretrained does); --stream reads it as a transformers directory and leaves the recipe
    behind, so the output loads in normsurgeon and in transformers with the same outputs."""
    from normsurgeon import api

    folded = tmp_path / "folded"
    r = run("fold", "normsurgeon.zoo:llama_lm", "--affine", "-o", f"{folded}/")
    assert r.exit_code == 0, r.output
    assert json.loads((folded / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    r = run("rotate", folded, "--stream", "--seed", "0", "-o", f"{tmp_path / 'rot'}/")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "rot" / "recipe.json").exists()
    again = api.load(str(tmp_path / "rot")).model  # a transformers directory now, not a broken recipe
    before = api.load(str(folded)).model
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(before(input_ids=ids).logits, again(input_ids=ids).logits) < 1e-4
    assert _rel(_logits(folded, ids), _logits(tmp_path / "rot", ids)) < 1e-4
