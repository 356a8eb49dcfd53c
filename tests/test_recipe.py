"""Surgery recipes (`-o DIR/`): saved as JSON + safetensors, rebuilt without unpickling, bit-exact.

Real transformers architectures from small configs (normsurgeon.zoo), real safetensors files.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import normsurgeon
from normsurgeon import api, zoo
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.inputs import CallArgs
from normsurgeon.recipe import recipe_of


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def outputs(model, ci):
    model.eval()
    with torch.no_grad():
        return normsurgeon.flatten_outputs(ci.call(model))


def same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_wav2vec2_convert_bn_ffn_bn_to_dir_and_every_command_reads_it(tmp_path):
    src = tmp_path / "w2v"
    zoo.wav2vec2().save_pretrained(src)
    result = run("convert", src, "--to", "bn", "--ffn-bn", "-o", f"{tmp_path}/w/", "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "w"
    assert sorted(p.name for p in out.iterdir()) == ["inputs.safetensors", "model.safetensors", "recipe.json"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["format_version"] == 1 and recipe["base"]["class"] == "Wav2Vec2Model"
    action = recipe["actions"][0]
    assert action["op"] == "convert" and action["to"] == "bn" and action["swapped"]
    assert len(action["ffn_bn"]["sites"]) == 2

    # the same conversion in process: deterministic (fresh BNs), so the reloaded model must equal it
    loaded = api.load(src)
    expected, _ = api.convert(loaded.model, "bn", example_inputs=loaded.example_inputs, ffn_bn=True)
    model = normsurgeon.load(out)
    # weight_norm on the positional conv survived (a parametrization, saved through the state dict)
    assert hasattr(model.encoder.pos_conv_embed.conv, "parametrizations")
    assert type(model.encoder.layers[0].feed_forward.intermediate_dense[1]).__name__ == "TokenBatchNorm"
    assert same(outputs(model, loaded.example_inputs), outputs(expected, loaded.example_inputs))

    for cmd in (["inspect", out], ["fold", out], ["export", out, "-o", tmp_path / "w.onnx"]):
        result = run(*cmd)
        assert result.exit_code == 0, (cmd, result.output)
    assert (tmp_path / "w.onnx").is_file()


def test_vit_convert_train_save_load_is_bit_exact(tmp_path):
    result = run("convert", "normsurgeon.zoo:vit", "--to", "bn", "--ffn-bn", "-o", f"{tmp_path}/vit/")
    assert result.exit_code == 0, result.output
    model = normsurgeon.load(tmp_path / "vit")
    ci = zoo.vit().example_inputs()
    before = outputs(model, ci)

    # the user's training loop: BN statistics and weights change
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        loss = model(pixel_values=x).logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = outputs(model, ci)
    assert not same(trained, before)

    normsurgeon.save(model, tmp_path / "trained/")
    reloaded = normsurgeon.load(tmp_path / "trained")
    assert same(outputs(reloaded, ci), trained)
    assert [a["op"] for a in json.loads((tmp_path / "trained" / "recipe.json").read_text())["actions"]] == ["convert"]

    # a state dict from the user's own trainer loads into the rebuilt architecture
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = normsurgeon.apply_recipe(zoo.vit(), tmp_path / "vit")
    rebuilt.load_state_dict(state, strict=True)
    assert same(outputs(rebuilt, ci), trained)
    # and remembers its recipe: it can be saved again
    assert recipe_of(rebuilt) is not None and recipe_of(rebuilt).base == {"kind": "factory",
                                                                          "spec": "normsurgeon.zoo:vit"}


@pytest.mark.parametrize("arch,dtype", [("gpt2_lm", torch.bfloat16), ("bert_mlm", torch.float16)])
def test_tied_embeddings_and_low_precision_round_trip(tmp_path, arch, dtype):
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2_lm":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))
    else:
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32))
    model.config.use_cache = False
    model = model.eval().to(dtype)
    ci = CallArgs((), {"input_ids": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))})
    converted, report = normsurgeon.convert(model, "bn", example_inputs=ci, ffn_bn=True)
    assert report.converted and report.inserted
    normsurgeon.save(converted, tmp_path / "m/")
    # safetensors refuses shared storage: each tied tensor is stored once
    state = converted.state_dict()
    assert len(load_file(str(tmp_path / "m" / "model.safetensors"))) == \
        len({t.untyped_storage().data_ptr() for t in state.values()}) < len(state)
    reloaded = normsurgeon.load(tmp_path / "m")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    assert same(outputs(reloaded, ci), outputs(converted, ci))


def test_weights_load_strictly_naming_the_key(tmp_path):
    model = zoo.vit()
    converted, _ = normsurgeon.convert(model, "bn", example_inputs=model.example_inputs())
    normsurgeon.save(converted, tmp_path / "m/", check=False)
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    dropped = "vit.layernorm.running_mean"
    save_file({k: v for k, v in state.items() if k != dropped}, str(weights))
    with pytest.raises(NormSurgeonError, match=f"missing key.*{dropped}"):
        normsurgeon.load(tmp_path / "m")
    save_file({**state, "extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(NormSurgeonError, match="unexpected key.*extra.weight"):
        normsurgeon.load(tmp_path / "m")


def test_recipe_format_checks(tmp_path):
    model = zoo.vit()
    normsurgeon.save(normsurgeon.convert(model, "bn", example_inputs=model.example_inputs())[0], tmp_path / "m/")
    path = tmp_path / "m" / "recipe.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "format_version": 99}))
    result = run("inspect", tmp_path / "m")
    assert result.exit_code == 2 and "newer normsurgeon" in result.output and "Traceback" not in result.output
    path.write_text(json.dumps({**doc, "actions": [{"op": "teleport"}]}))
    with pytest.raises(NormSurgeonError, match="unknown op 'teleport'"):
        normsurgeon.load(tmp_path / "m")


def test_pickled_base_cannot_be_a_recipe_but_pt_still_works(tmp_path):
    # not a transformers model (whose class + config would describe it): nothing says how to build it
    torch.save(zoo.transformer_encoder(), tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt", "--trust", "--to", "bn", "-o", f"{tmp_path}/out/")
    assert result.exit_code == 2
    assert "is a pickled model" in result.output and "save as .pt" in result.output
    assert not (tmp_path / "out").exists()
    result = run("convert", tmp_path / "m.pt", "--trust", "--to", "bn", "-o", tmp_path / "out.pt")
    assert result.exit_code == 0, result.output
    result = run("fold", tmp_path / "out.pt", "--trust", "-o", tmp_path / "again")
    assert result.exit_code == 2 and "m.pt is a pickled model" in result.output
    # a pickled transformers model is described by its class and config
    torch.save(zoo.bert(), tmp_path / "bert.pt")
    assert run("convert", tmp_path / "bert.pt", "--trust", "--to", "bn", "-o", tmp_path / "bert/").exit_code == 0
    assert json.loads((tmp_path / "bert" / "recipe.json").read_text())["base"]["class"] == "BertModel"
    # a .pt the tool wrote from a base it can rebuild carries its recipe: it can become a directory later
    assert run("convert", "normsurgeon.zoo:vit", "--to", "bn", "--ffn-bn", "-o", tmp_path / "v.pt").exit_code == 0
    result = run("fold", tmp_path / "v.pt", "--trust", "-o", tmp_path / "v/")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "v" / "recipe.json").read_text())
    assert doc["base"] == {"kind": "factory", "spec": "normsurgeon.zoo:vit"}
    assert [a["op"] for a in doc["actions"]] == ["convert", "fold"]


def test_recipe_output_directory_rules(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = run("convert", "normsurgeon.zoo:vit", "--to", "bn", "-o", tmp_path / "busy")
    assert result.exit_code == 2 and "other files" in result.output
    assert run("convert", "normsurgeon.zoo:vit", "--to", "bn", "-o", tmp_path / "r").exit_code == 0
    result = run("convert", "normsurgeon.zoo:vit", "--to", "bn", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "--force" in result.output
    result = run("fold", tmp_path / "r", "-o", tmp_path / "r", "--force")
    assert result.exit_code == 2 and "is the input" in result.output
    assert run("convert", "normsurgeon.zoo:vit", "--to", "bn", "-o", tmp_path / "r", "--force").exit_code == 0


def test_fold_of_a_recipe_appends_to_it(tmp_path):
    assert run("convert", "normsurgeon.zoo:vit", "--to", "bn", "--ffn-bn", "-o", tmp_path / "a/").exit_code == 0
    result = run("fold", tmp_path / "a", "-o", tmp_path / "b/", "--json")
    assert result.exit_code == 0, result.output
    folded = {f["norm"] for f in json.loads(result.output)["folded"]}
    assert {"vit.layers.0.mlp.fc1.1", "vit.layers.1.mlp.fc1.1", "vit.layers.0.layernorm_before"} <= folded
    doc = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert [a["op"] for a in doc["actions"]] == ["convert", "fold"]
    assert doc["actions"][1]["verify"]["passed"] is True
    model = normsurgeon.load(tmp_path / "b")
    assert isinstance(model.vit.layers[0].mlp.fc1[1], torch.nn.Identity)
    ci = zoo.vit().example_inputs()
    assert same(outputs(model, ci), outputs(api.fold(normsurgeon.load(tmp_path / "a"), ci)[0], ci))


def test_the_recipe_a_model_carries_is_plain_data(tmp_path):
    # a .pt of a folded torch/transformers model must not start needing normsurgeon's classes to unpickle
    import pickletools
    import zipfile

    model = zoo.resnet()
    folded, report = normsurgeon.fold(model, model.example_inputs())
    assert report.folded and recipe_of(folded).actions[0]["op"] == "fold"
    assert recipe_of(model) is None  # the input model is untouched
    del folded.example_inputs  # zoo's own input helper is a normsurgeon class; the recipe must not be
    torch.save(folded, tmp_path / "f.pt")
    with zipfile.ZipFile(tmp_path / "f.pt") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    names = {str(arg) for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    strings = [str(arg) for op, arg, _ in pickletools.genops(data) if "UNICODE" in op.name]
    assert "_normsurgeon_recipe" in strings
    assert not [n for n in names if "normsurgeon" in n] and not [s for s in strings if s.startswith("normsurgeon.")]
