"""The inspect command as a user runs it: tables, JSON, and one clear line for bad input."""

import json

import torch
import torch.nn as nn
from click.testing import CliRunner

from normsurgeon.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_inspect_factory_table():
    from normsurgeon import zoo

    n = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in zoo.levit().modules())
    result = run("inspect", "normsurgeon.zoo:levit")
    assert result.exit_code == 0, result.output
    assert f"found {n} normalization sites: {n} batchnorm" in result.output
    assert "capture: export" in result.output


def test_inspect_json_contract():
    from normsurgeon import zoo

    result = run("inspect", "normsurgeon.zoo:vit", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["capture"] == "export"
    assert len(data["norms"]) == sum(isinstance(m, nn.LayerNorm) for m in zoo.vit().modules())
    for norm in data["norms"]:
        assert {"path", "kind", "source"} <= set(norm)
        assert norm["kind"] == "layernorm" and norm["source"] == "module"


def test_inspect_pickle_with_trust_and_input_shape(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), path)
    result = run("inspect", str(path), "--trust", "--input-shape", "1,3,16,16", "--json")
    assert result.exit_code == 0, result.output
    norm = json.loads(result.stdout)["norms"][0]
    assert norm["input_shape"] == [1, 4, 14, 14] and norm["producer"] == "0 (conv2d)"


def one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    assert "no such file" in one_line_error(run("inspect", str(tmp_path / "missing.pt")))
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    assert "not a torch file" in one_line_error(run("inspect", str(tmp_path / "bad.pt"), "--trust"))
    torch.save(nn.Linear(2, 2), tmp_path / "lin.pt")
    assert "--trust" in one_line_error(run("inspect", str(tmp_path / "lin.pt")))
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert "not a readable ONNX model" in one_line_error(run("inspect", str(tmp_path / "m.onnx")))  # .onnx is inspected
    assert "rejects its example inputs" in one_line_error(
        run("inspect", "normsurgeon.zoo:transformer_encoder", "--input-shape", "2,5,31"))
    assert "--input-shape" in one_line_error(run("inspect", "normsurgeon.zoo:transformer_encoder", "--input-shape", "2,x"))


class NeedsInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        for _row in x:  # iterating a proxy: torch.fx cannot trace this
            pass
        return self.ln(x)


def test_model_that_needs_inputs_and_got_none(tmp_path):
    torch.save(NeedsInputs(), tmp_path / "m.pt")
    line = one_line_error(run("inspect", str(tmp_path / "m.pt"), "--trust"))
    assert "--input-shape" in line
    ok = run("inspect", str(tmp_path / "m.pt"), "--trust", "--input-shape", "2,4")
    assert ok.exit_code == 0 and "1 layernorm" in ok.output


def test_debug_shows_traceback(tmp_path):
    for args in (["--debug", "inspect"], ["inspect", "--debug"]):  # on the group or on the command
        result = run(*args, str(tmp_path / "missing.pt"))
        assert result.exit_code == 2
        assert "Traceback (most recent call last)" in result.stderr, result.output
        assert "NormSurgeonError" in result.stderr and "no such file" in result.stderr
    plain = run("inspect", str(tmp_path / "missing.pt"))
    assert plain.exit_code == 2 and "Traceback" not in plain.output


def test_usage_errors_are_one_line_too():
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "normsurgeon")
    for args in (["export", "normsurgeon.zoo:resnet"], ["bench", "--runs", "0", "a.onnx"], ["nope"]):
        proc = subprocess.run([cli, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr


BRANCHY = '''
import torch, torch.nn as nn

class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.fc(x)
        if float(h.sum()) > 1e9:  # data-dependent control flow: torch.export and torch.fx both fail
            h = h * 2
        return self.ln(h)

def make():
    return Branchy()
'''


def test_failed_capture_attempts_reach_the_terminal_as_one_line_each(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "branchy.py").write_text(BRANCHY)
    cli = str(Path(sys.executable).parent / "normsurgeon")
    # the working directory is importable only with --import (or --trust)
    for args in (["inspect", "branchy:make", "--import", "branchy", "--input-shape", "2,5,8"],
                 ["convert", "branchy:make", "--import", "branchy", "--to", "bn", "--input-shape", "2,5,8"]):
        proc = subprocess.run([cli, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr == "", proc.stderr[:2000]  # no graph dump, log line or warning
        assert "def forward" not in proc.stdout
        assert "capture: per-child" in proc.stdout
        if args[0] == "inspect":
            failed = [ln for ln in proc.stdout.splitlines() if " failed: " in ln]
            assert [ln.split()[0] for ln in failed] == ["export", "fx"], proc.stdout  # and per-child is not one


def test_the_command_ends_without_teardown_yet_says_everything_and_keeps_its_exit_status(tmp_path):
    # the entry point (`normsurgeon`, `python -m normsurgeon`) ends the process with os._exit after the
    # command: its output must all be there (a pipe is block-buffered: nothing flushed, nothing seen)
    # and its exit status kept; the command's files are written and no temporary one is left behind
    import json
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["normsurgeon"] == "normsurgeon.cli:run"
    cli = str(Path(sys.executable).parent / "normsurgeon")
    proc = subprocess.run([cli, "inspect", "normsurgeon.zoo:gpt2", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["norms"]  # whole
    proc = subprocess.run([sys.executable, "-m", "normsurgeon", "inspect", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "missing.pt" in proc.stderr
    out = tmp_path / "out"
    proc = subprocess.run([cli, "fold", "normsurgeon.zoo:llama", "--affine", "-o", f"{out}/", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["output"], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").stat().st_size > 0 and json.loads((out / "recipe.json").read_text())
