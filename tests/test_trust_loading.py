"""Loading runs no code from a model file without trust (issue 16, loading rows).

Every payload only writes a marker file in tmp_path; each test asserts the marker is absent without
trust, and where it makes sense that trust does run the trusted path (so the test could fail).
The malicious .pt2 archives are real torch.export archives with one part changed the way an
attacker would change it.
"""

import json
import pathlib
import sys
import zipfile

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors.torch import save_file, save_model

import normsurgeon
from normsurgeon import api
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError
from normsurgeon.loading import load_model


class Payload:
    """Unpickling this writes the marker (a stand-in for any code a pickle can run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """tmp_path as the working directory, not on sys.path (as a user's shell would have it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    return tmp_path


def write_evil_module(where, name="evilmod"):
    (where / f"{name}.py").write_text(
        "import pathlib, torch\n"
        f"pathlib.Path({str(where / 'MARKER')!r}).write_text('imported')\n"
        "def x():\n    torch.manual_seed(0)\n    return torch.nn.Linear(2, 2)\n"
        "class Foo(tuple):\n    pass\n")
    return where / "MARKER"


def factory_recipe(path, spec):
    path.mkdir()
    (path / "recipe.json").write_text(json.dumps({
        "format": "normsurgeon-recipe", "format_version": 1, "base": {"kind": "factory", "spec": spec},
        "dtype": "float32", "weights": "model.safetensors", "example_inputs": None, "actions": []}))
    torch.manual_seed(0)
    save_model(nn.Linear(2, 2), str(path / "model.safetensors"))
    return path


# --- row 1: a recipe's factory base -----------------------------------------------------------------

@pytest.mark.parametrize("spec", ["evilmod:x", "sys:exit"])
def test_recipe_factory_base_is_refused_without_trust(cwd, spec):
    marker = write_evil_module(cwd)
    d = factory_recipe(cwd / "r", spec)
    path_before = list(sys.path)
    with pytest.raises(NormSurgeonError, match=rf"factory '{spec}'.*trust=True"):
        normsurgeon.load(d)
    with pytest.raises(NormSurgeonError, match="trust"):
        api.load(d)
    with pytest.raises(NormSurgeonError, match="trust"):  # the mapped load (fold/rotate writing their output first)
        api.load(d, map_weights=True)
    assert not marker.exists() and "evilmod" not in sys.modules
    assert sys.path == path_before


def test_recipe_factory_base_with_trust_builds_it_and_restores_sys_path(cwd):
    marker = write_evil_module(cwd)
    d = factory_recipe(cwd / "r", "evilmod:x")
    path_before = list(sys.path)
    try:
        model = normsurgeon.load(d, trust=True)
    finally:
        sys.modules.pop("evilmod", None)
    assert marker.exists() and isinstance(model, nn.Linear)
    assert sys.path == path_before


def test_cli_inspect_recipe_with_evil_factory_in_cwd(cwd):
    marker = write_evil_module(cwd)
    factory_recipe(cwd / "r", "evilmod:x")
    result = CliRunner().invoke(main, ["inspect", "r/"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "evilmod:x" in lines[0], result.output
    assert not marker.exists()


def test_load_model_leaves_sys_path_alone_and_cwd_needs_import(cwd):
    write_evil_module(cwd, "mymodels")
    before = list(sys.path)
    load_model("normsurgeon.zoo:resnet")
    assert sys.path == before
    with pytest.raises(NormSurgeonError, match="imports=mymodels"):
        load_model("mymodels:x")
    assert not (cwd / "MARKER").exists()
    try:
        loaded = load_model("mymodels:x", imports=["mymodels"])
    finally:
        sys.modules.pop("mymodels", None)
    assert isinstance(loaded.model, nn.Linear) and sys.path == before


# --- rows 2 and 3: .pt2 archives ---------------------------------------------------------------------

class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return (self.bn(self.conv(x)),)


def plain_archive(path, dynamic=False):
    model = TupleOut().eval()
    x = torch.randn(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("b", min=2, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))
    return path, model, x


def edit_archive(src, dst, edit):
    """Copy a .pt2 archive, ``edit(name, bytes) -> bytes`` applied to each member (names without prefix)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            prefix, _, name = info.filename.partition("/")
            out.writestr(info.filename, edit(name, z.read(info.filename)))
    return dst


def payload_bytes(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=4)
    return buf.getvalue()


def edit_json(data, fn):
    doc = json.loads(data)
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("dynamic", [False, True])
def test_plain_archives_load_without_trust(tmp_path, dynamic):
    path, model, x = plain_archive(tmp_path / "m.pt2", dynamic)
    loaded = load_model(path)
    assert torch.allclose(loaded.model(x)[0], model(x)[0], atol=1e-6)


def test_tool_written_archive_of_a_transformers_model_loads_without_trust(tmp_path):
    from normsurgeon import zoo

    model = zoo.vit()
    ci = model.example_inputs()
    api.save(model, tmp_path / "vit.pt2", example_inputs=ci)
    loaded = load_model(tmp_path / "vit.pt2")
    assert torch.allclose(loaded.model(**ci.kwargs).logits, model(**ci.kwargs).logits, atol=1e-5)


def _trusted_runs(path, marker, call=None):
    """With trust, torch's own loader reaches the payload: the archive is really malicious."""
    try:
        loaded = load_model(path, trust=True)
        if call is not None:
            call(loaded)
    except Exception:  # noqa: BLE001 - whatever torch makes of it afterwards
        pass
    return marker.exists()


def test_pickled_sample_inputs_are_refused(tmp_path):
    src, _, x = plain_archive(tmp_path / "m.pt2")
    marker = tmp_path / "MARKER"
    bad = edit_archive(src, tmp_path / "bad.pt2", lambda name, data: payload_bytes(((x, Payload(marker)), {}))
                       if name == "data/sample_inputs/model.pt" else data)
    with pytest.raises(NormSurgeonError, match="sample inputs hold pickled objects.*trust"):
        load_model(bad)
    assert not marker.exists()
    assert _trusted_runs(bad, marker)


def test_use_pickle_weight_is_refused(tmp_path):
    src, _, _ = plain_archive(tmp_path / "m.pt2")
    marker = tmp_path / "MARKER"
    with zipfile.ZipFile(src) as z:
        config = json.loads(next(z.read(n) for n in z.namelist() if n.endswith("model_weights_config.json")))
    fqn, meta = next(iter(config["config"].items()))

    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            return edit_json(data, lambda d: d["config"][fqn].update(use_pickle=True))
        if name == f"data/weights/{meta['path_name']}":
            return payload_bytes(Payload(marker))
        return data

    bad = edit_archive(src, tmp_path / "bad.pt2", edit)
    with pytest.raises(NormSurgeonError, match=rf"weight '{fqn}' is stored as a pickle"):
        load_model(bad)
    assert not marker.exists()
    assert _trusted_runs(bad, marker)


def test_opaque_constant_is_refused(tmp_path):
    src, _, _ = plain_archive(tmp_path / "m.pt2")
    marker = tmp_path / "MARKER"

    def edit(name, data):
        if name == "data/constants/model_constants_config.json":
            return edit_json(data, lambda d: d["config"].update(
                obj={"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}))
        return data

    bad = edit_archive(src, tmp_path / "bad.pt2", edit)
    with zipfile.ZipFile(bad, "a") as z:
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/data/constants/opaque_obj_0", payload_bytes(Payload(marker)))
    with pytest.raises(NormSurgeonError, match="constant 'obj'"):
        load_model(bad)
    assert not marker.exists()


def test_foreign_pytree_type_is_refused_and_not_imported(cwd):
    marker = write_evil_module(cwd, "evilpt")
    src, _, _ = plain_archive(cwd / "m.pt2")

    def edit(name, data):
        if name == "models/model.json":
            return data.replace(b"builtins.tuple", b"evilpt.Foo")
        return data

    bad = edit_archive(src, cwd / "bad.pt2", edit)
    assert b"evilpt.Foo" in zipfile.ZipFile(bad).read(zipfile.ZipFile(bad).namelist()[0].split("/")[0]
                                                       + "/models/model.json")
    with pytest.raises(NormSurgeonError, match="pytree type evilpt.Foo.*imports evilpt"):
        load_model(bad)
    assert not marker.exists() and "evilpt" not in sys.modules
    try:
        assert _trusted_runs(bad, marker)
    finally:
        sys.modules.pop("evilpt", None)


def test_pytree_context_naming_a_module_is_refused_and_not_imported(cwd):
    """torch imports the module of an enum a pytree context names (``"__enum__"``)."""
    marker = write_evil_module(cwd, "evilenum")
    src, _, _ = plain_archive(cwd / "m.pt2")

    def set_context(doc):
        sig = doc["graph_module"]["module_call_graph"][0]["signature"]
        version, spec = json.loads(sig["in_spec"])
        kwargs = spec["children_spec"][1]
        assert kwargs["type"] == "builtins.dict"
        kwargs["context"] = json.dumps([{"__enum__": True, "fqn": "evilenum:E", "name": "A"}])
        sig["in_spec"] = json.dumps([version, spec])

    bad = edit_archive(src, cwd / "bad.pt2", lambda name, data: edit_json(data, set_context)
                       if name == "models/model.json" else data)
    with pytest.raises(NormSurgeonError, match="names an enum"):
        load_model(bad)
    assert not marker.exists() and "evilenum" not in sys.modules
    try:
        assert _trusted_runs(bad, marker)
    finally:
        sys.modules.pop("evilenum", None)


def test_guards_code_that_is_not_a_shape_check_is_refused(tmp_path):
    src, _, x = plain_archive(tmp_path / "m.pt2")
    marker = tmp_path / "MARKER"
    code = f"__import__('pathlib').Path('{marker}').write_text('pwned') is None"
    bad = edit_archive(src, tmp_path / "bad.pt2", lambda name, data: edit_json(
        data, lambda d: d.update(guards_code=[*d.get("guards_code", []), code])) if name == "models/model.json" else data)
    with pytest.raises(NormSurgeonError, match="guards_code"):
        load_model(bad)
    assert not marker.exists()
    assert _trusted_runs(bad, marker, call=lambda loaded: loaded.model(x))


def test_shape_expression_that_is_not_sympy_is_refused(tmp_path):
    src, _, _ = plain_archive(tmp_path / "m.pt2", dynamic=True)
    marker = tmp_path / "MARKER"
    code = f"__import__('pathlib').Path('{marker}').write_text('pwned')"

    def edit(name, data):
        if name != "models/model.json":
            return data
        text = data.decode()
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        return (text[:start] + code.replace("'", "\\u0027") + text[end:]).encode()

    bad = edit_archive(src, tmp_path / "bad.pt2", edit)
    with pytest.raises(NormSurgeonError, match="shape expression"):
        load_model(bad)
    assert not marker.exists()
    assert _trusted_runs(bad, marker)


def test_parameter_name_that_is_code_is_refused(tmp_path):
    """FX writes getattr(self, "<name>") into the module's source without escaping the name."""
    src, _, x = plain_archive(tmp_path / "m.pt2")
    marker = tmp_path / "MARKER"
    inj = f'training"),getattr(getattr(__import__(\'pathlib\'),\'Path\')(\'{marker}\'),\'touch\')(),getattr(self,"training'

    def edit(name, data):
        if name in ("models/model.json", "data/weights/model_weights_config.json"):
            return data.replace(b'"conv.weight"', json.dumps("conv." + inj).encode())
        return data

    bad = edit_archive(src, tmp_path / "bad.pt2", edit)
    with pytest.raises(NormSurgeonError, match="torch would paste into generated code"):
        load_model(bad)
    assert not marker.exists()
    assert _trusted_runs(bad, marker, call=lambda loaded: loaded.model(x))


def test_compiled_code_in_archive_is_refused(tmp_path):
    src, _, _ = plain_archive(tmp_path / "m.pt2")
    bad = edit_archive(src, tmp_path / "bad.pt2", lambda name, data: data)
    with zipfile.ZipFile(bad, "a") as z:
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(NormSurgeonError, match="compiled code"):
        load_model(bad)


def test_safe_expression_checks_accept_what_torch_writes():
    from normsurgeon.pt2_check import safe_guard, safe_sym_expr

    for ok in ["Symbol('s17', positive=True, integer=True)", "Mul(Integer(2), Symbol('s81', positive=True))",
               "2*s0 + 1", "FloorDiv(s0, 2)", "Max(1, s0)"]:
        assert safe_sym_expr(ok), ok
    for bad in ["__import__('os').system('x')", "s0.__class__", "Symbol('a').subs.__globals__", "exec('x')",
                "preview(s0)", "lambda: 1"]:
        assert not safe_sym_expr(bad), bad
    for ok in ["L['x'].size()[0] == 2", "(L['x'].size()[1] // 2) <= L['x'].size()[1]",
               "L['x'].size()[1] != max(1, L['x'].size()[1] // 2)", "2 <= L['args'][0].size()[0]"]:
        assert safe_guard(ok), ok
    for bad in ["__import__('os')", "L['x'].__class__", "L['x'\") or exec(\"1'] == 1", "open('f')",
                "torch.ops.aten.x", "L['x'].size()[0] == 2 # c"]:
        assert not safe_guard(bad), bad


# --- row 4: attention implementations ---------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_recipe(tmp_path_factory):
    from normsurgeon import zoo

    d = tmp_path_factory.mktemp("recipes") / "vit"
    model = zoo.vit()
    converted, _ = api.convert(model, "bn", example_inputs=model.example_inputs(), ffn_bn=True)
    api.save(converted, d)
    return d


def copy_recipe(src, dst, edit=None):
    import shutil

    shutil.copytree(src, dst)
    if edit is not None:
        doc = json.loads((dst / "recipe.json").read_text())
        edit(doc)
        (dst / "recipe.json").write_text(json.dumps(doc))
    return dst


def test_tool_written_recipe_loads_without_trust(vit_recipe):
    assert normsurgeon.load(vit_recipe) is not None


def test_hub_attention_in_recipe_base_is_refused(vit_recipe, tmp_path):
    d = copy_recipe(vit_recipe, tmp_path / "r", lambda doc: doc["base"].update(attn_implementation="org/repo"))
    with pytest.raises(NormSurgeonError, match="attn_implementation 'org/repo'.*eager, sdpa"):
        normsurgeon.load(d)
    d = copy_recipe(vit_recipe, tmp_path / "r2", lambda doc: doc["base"]["config"].update(
        attn_implementation="kernels-community/flash-attn"))
    with pytest.raises(NormSurgeonError, match="attn_implementation"):
        normsurgeon.load(d)


def test_hub_attention_in_config_json_is_refused(tmp_path):
    from normsurgeon import zoo

    zoo.bert().save_pretrained(tmp_path / "bert")
    cfg = json.loads((tmp_path / "bert" / "config.json").read_text())
    cfg["attn_implementation"] = "org/repo"
    (tmp_path / "bert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NormSurgeonError, match="config.json.*attn_implementation 'org/repo'"):
        load_model(tmp_path / "bert")


def test_transformers_loads_with_the_hub_offline(tmp_path, monkeypatch):
    """Even with HF_HUB_OFFLINE unset, the hub is offline while the tool calls transformers."""
    from huggingface_hub import constants

    from normsurgeon import zoo

    seen = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import transformers

    real = transformers.BertModel.from_pretrained.__func__

    def spy(cls, *a, **k):
        seen.append(constants.HF_HUB_OFFLINE)
        return real(cls, *a, **k)

    monkeypatch.setattr(transformers.BertModel, "from_pretrained", classmethod(spy))
    zoo.bert().save_pretrained(tmp_path / "bert")
    load_model(tmp_path / "bert")
    assert seen == [True] and constants.HF_HUB_OFFLINE is False


# --- rows 9 and 13: recipe weights and fields --------------------------------------------------------

def test_recipe_weights_of_another_dtype_are_refused(vit_recipe, tmp_path):
    from safetensors.torch import load_file

    d = copy_recipe(vit_recipe, tmp_path / "r")
    weights = load_file(str(d / "model.safetensors"))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 2)
    weights[key] = weights[key].to(torch.int64)
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(NormSurgeonError, match=rf"{key} is stored as int64.*float32"):
        normsurgeon.load(d)


def _ffn_site(doc):
    return next(a for a in doc["actions"] if a["op"] == "convert")["ffn_bn"]["sites"][0]


@pytest.mark.parametrize("edit, match", [
    (lambda doc: _ffn_site(doc).update(hidden=5e8), r"ffn_bn.sites\[0\].hidden must be an integer"),
    (lambda doc: _ffn_site(doc).update(hidden=-3), r"ffn_bn.sites\[0\].hidden must be an integer"),
    (lambda doc: _ffn_site(doc).update(hidden=10_000_000), r"hidden 10000000 is not a size of the linear"),
    (lambda doc: doc.update(format_version=99), "written by a newer normsurgeon"),
    (lambda doc: doc.update(format_version="1"), "bad format_version"),
    (lambda doc: doc.update(dtype="int64"), "dtype.*floating"),
    (lambda doc: doc["actions"][0].update(groups=-1), r"actions\[0\].groups"),
    (lambda doc: doc["base"]["config"].update(hidden_size=1 << 16, intermediate_size=1 << 16),
     "base.config describes a ViTModel|base.config describes a"),
])
def test_recipe_fields_out_of_range_are_refused_before_allocating(vit_recipe, tmp_path, edit, match):
    import resource

    d = copy_recipe(vit_recipe, tmp_path / "r", edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NormSurgeonError, match=match):
        normsurgeon.load(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: under 512 MiB


def test_absurd_config_without_weights_is_refused_before_building(vit_recipe, tmp_path):
    import resource

    d = copy_recipe(vit_recipe, tmp_path / "r", lambda doc: doc["base"]["config"].update(
        hidden_size=1 << 16, intermediate_size=1 << 16))
    (d / "model.safetensors").unlink()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(NormSurgeonError, match="model.safetensors: missing"):
        normsurgeon.load(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024


def test_python_dash_m_does_not_make_the_working_directory_importable(cwd):
    """`python -m` puts the working directory on sys.path; the CLI takes it off (--import puts it back)."""
    import os
    import subprocess

    write_evil_module(cwd, "mymodels")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "normsurgeon", "inspect", "mymodels:x", "--input-shape", "1,2"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--import mymodels" in proc.stderr, proc.stderr[-2000:]
    assert not (cwd / "MARKER").exists()
