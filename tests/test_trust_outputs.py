"""Issue 16, outputs: inputs survive every -o/--force, one of two writers wins, a killed run's
temporary files go away, outputs follow the umask, user paths print literally."""

import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from normsurgeon import saving
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(cnn(), path)
    return path


FOLD = ["fold", "--trust", "--input-shape", "2,3,8,8"]


# --- row 5: -o/--force never deletes or overwrites what the command reads ------------------------

def test_force_onto_the_inputs_file_is_refused(tmp_path, model_file):
    inputs = tmp_path / "x.pt"
    torch.save({"input_0": torch.randn(2, 3, 8, 8)}, inputs)
    before = inputs.read_bytes()
    result = run(*FOLD, model_file, "--inputs", inputs, "-o", inputs, "--force")
    assert result.exit_code == 2, result.output
    assert "never overwrites its inputs" in result.output
    assert inputs.read_bytes() == before


def test_force_onto_a_hard_link_or_symlink_of_the_model_is_refused(tmp_path, model_file):
    before = model_file.read_bytes()
    os.link(model_file, tmp_path / "hard.pt")
    (tmp_path / "soft.pt").symlink_to(model_file)
    for out in ("hard.pt", "soft.pt"):
        result = run(*FOLD, model_file, "-o", tmp_path / out, "--force")
        assert result.exit_code == 2, result.output
    assert model_file.read_bytes() == before


def test_force_onto_calibration_data_is_refused(tmp_path, model_file):
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(8, 3, 8, 8), data)
    before = data.read_bytes()
    result = run("calibrate", model_file, "--trust", "--input-shape", "2,3,8,8", "--data", data, "-o", data, "--force")
    assert result.exit_code == 2, result.output
    assert data.read_bytes() == before


def test_force_onto_the_weights_file_is_refused(tmp_path):
    from normsurgeon import zoo

    weights = tmp_path / "w.pt"
    torch.save(zoo.resnet().state_dict(), weights)
    before = weights.read_bytes()
    result = run("fold", "normsurgeon.zoo:resnet", "--weights", weights, "-o", weights, "--force")
    assert result.exit_code == 2, result.output
    assert weights.read_bytes() == before


def test_replacing_a_recipe_dir_that_holds_an_input_is_refused(tmp_path):
    """fold -o DIR/ --force where DIR (an earlier recipe output) holds the --inputs file."""
    out = tmp_path / "folded"
    assert run("fold", "normsurgeon.zoo:resnet", "-o", f"{out}/").exit_code == 0
    inputs = out / "real.pt"
    from normsurgeon import zoo
    torch.save({"pixel_values": zoo.resnet().example_inputs().kwargs["pixel_values"]}, inputs)
    before = inputs.read_bytes()
    result = run("fold", "normsurgeon.zoo:resnet", "--inputs", inputs, "-o", f"{out}/", "--force")
    assert result.exit_code == 2, result.output
    assert inputs.read_bytes() == before
    # the model argument inside the replaced directory is refused the same way
    with pytest.raises(NormSurgeonError, match="never overwrites"):
        saving.guard_inputs(out, [out / "recipe.json"])


def test_output_file_inside_an_input_directory_is_refused_when_it_exists(tmp_path):
    d = tmp_path / "modeldir"
    d.mkdir()
    (d / "old.pt").write_bytes(b"x")
    with pytest.raises(NormSurgeonError, match="never overwrites"):
        saving.check_output_path(d / "old.pt", force=True, inputs=[d])
    saving.check_output_path(d / "new.pt", force=True, inputs=[d])  # a new file deletes nothing


# --- row 7: two writers, one output, no --force -------------------------------------------------

class _RacingModule(nn.Module):
    """Another run finishes writing ``path`` while this one pickles itself."""

    def __init__(self, path):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.path = str(path)

    def __getstate__(self):
        if not os.path.exists(self.path):
            with open(self.path, "wb") as f:
                f.write(b"the other run's model")
        return super().__getstate__()


def test_second_writer_does_not_replace_the_first(tmp_path):
    out = tmp_path / "same.pt"
    with pytest.raises(NormSurgeonError, match="appeared while this run worked") as e:
        saving.save_model(_RacingModule(out), out)
    assert e.value.exit_code == 2
    assert out.read_bytes() == b"the other run's model"
    assert [p.name for p in tmp_path.iterdir()] == ["same.pt"]  # no temp file left


def test_second_writer_of_a_directory_does_not_replace_the_first(tmp_path):
    out = tmp_path / "out"
    first, second = saving.temp_dir(out), saving.temp_dir(out)
    (first / "recipe.json").write_text("{}")
    (second / "recipe.json").write_text("{\"second\": 1}")
    saving.place_dir(first, out, force=False)
    with pytest.raises(NormSurgeonError, match="appeared"):
        saving.place_dir(second, out, force=False)
    assert (out / "recipe.json").read_text() == "{}"


# --- row 8: a killed run's temporary files are removed by the next run ---------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_run_leftovers_are_removed_by_the_next_save(tmp_path):
    stale = tmp_path / f"{saving.TMP_PREFIX}{_dead_pid()}-0000-big"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    stale_file = tmp_path / f"{saving.TMP_PREFIX}{_dead_pid()}-0001-m.pt"
    stale_file.write_bytes(b"half")
    live = tmp_path / f"{saving.TMP_PREFIX}{os.getppid()}-0002-other.pt"  # a running process's: kept
    live.write_bytes(b"busy")
    saving.save_model(cnn(), tmp_path / "m.pt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m.pt", live.name])


def test_a_real_killed_save_is_cleaned_up(tmp_path):
    """kill -9 in the middle of writing: the next save into that directory removes the temp dir."""
    code = ("import os, signal, sys; from pathlib import Path; from normsurgeon import saving;"
            "t = saving.temp_dir(Path(sys.argv[1]) / 'big'); (t / 'w.bin').write_bytes(b'0' * 4096);"
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    assert any(p.name.startswith(saving.TMP_PREFIX) for p in tmp_path.iterdir())
    saving.save_model(cnn(), tmp_path / "next.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["next.pt"]


# --- row 12 (part): outputs follow the umask ------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_follow_the_umask(tmp_path, umask_022):
    out = saving.save_model(cnn(), tmp_path / "m.pt")
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    out = saving.save_model(cnn(), tmp_path / "m.pt2", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_recipe_directories_follow_the_umask(tmp_path, umask_022):
    out = tmp_path / "r"
    result = run("fold", "normsurgeon.zoo:resnet", "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


# --- row 6: paths with rich markup print literally -----------------------------------------------

@pytest.mark.parametrize("name", ["run[/final].pt", "ckpt[best].pt"])
def test_markup_in_a_missing_path_is_printed_literally(tmp_path, name):
    result = run("inspect", tmp_path / name)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"{name}: no such file" in result.output


def test_markup_in_the_output_path(tmp_path, model_file):
    (tmp_path / "exp[" / "1]").mkdir(parents=True)
    out = tmp_path / "exp[/1]" / "out.pt"
    result = run(*FOLD, model_file, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"saved the folded model to {out}" in result.output.replace("\n", "")
    assert out.is_file()
