"""`normsurgeon calibrate` (issue 10.4): exact BN statistics from files, on one process and under a real
2-process torchrun (gloo), where the result must equal one process calibrating on the union of the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from normsurgeon import api, zoo
from normsurgeon.calibrate import shard_files
from normsurgeon.cli import main
from normsurgeon.errors import NormSurgeonError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of different sizes, batchings and distributions (a ResNet's pixel_values)."""
    d = tmp_path_factory.mktemp("calib")
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(10, 3, 32, 32, generator=g), d / "calib-0.pt")  # one tensor: one batch of 10
    torch.save([torch.randn(b, 3, 32, 32, generator=g) * 2 + 1 for b in (3, 7, 4)], d / "calib-1.pt")
    return d


def _running(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.fixture(scope="module")
def single(shards):
    """The reference: one process, the library, on the union of the shards."""
    model = zoo.resnet()
    batches = []
    for r in range(2):
        batches += api.load_calibration_data(shards / f"calib-{r}.pt", model.example_inputs())
    report = api.calibrate(model, batches)
    assert report.recalibrated == 8 and report.batches == 4 and report.samples == 24
    return _running(model)


def _assert_equal_stats(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        # both merge the same float64 statistics (in another order across ranks): exact to float32 rounding
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_cli_calibrate_single_process_on_several_files(tmp_path, shards, single):
    out = tmp_path / "r.pt"
    result = CliRunner().invoke(main, ["calibrate", "normsurgeon.zoo:resnet", "--data", str(shards / "calib-0.pt"),
                                       "--data", str(shards / "calib-1.pt"), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(result.stdout)
    assert {"recalibrated", "batches", "samples", "world_size", "norms", "skipped"} <= set(data)
    assert (data["recalibrated"], data["batches"], data["samples"], data["world_size"]) == (8, 4, 24, 1)
    assert data["output"] == str(out) and data["skipped"] == []
    assert "calibrating" not in result.stderr  # progress only on a terminal
    _assert_equal_stats(_running(torch.load(out, weights_only=False)), single)
    # the statistics really changed (the zoo's are random placeholders)
    assert any(not torch.allclose(v.float(), _running(zoo.resnet())[k].float()) for k, v in single.items())


def test_cli_calibrate_bad_input(tmp_path, shards):
    def run(*args):
        r = CliRunner().invoke(main, ["calibrate", "normsurgeon.zoo:resnet", *args])
        return r.exit_code, r.stdout, r.stderr

    (tmp_path / "exists.pt").write_bytes(b"x")
    code, out, err = run("--data", str(shards / "calib-0.pt"), "-o", str(tmp_path / "exists.pt"))
    assert code == 2 and not out and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("--data", str(tmp_path / "missing-{rank}.pt"), "-o", str(tmp_path / "a.pt"))
    assert code == 2 and "missing-0.pt" in err, err
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "small.pt")
    code, _, err = run("--data", str(tmp_path / "small.pt"), "-o", str(tmp_path / "a.pt"))
    assert code == 2 and "does not fit" in err, err
    assert not (tmp_path / "a.pt").exists()
    code, _, err = run("-o", str(tmp_path / "a.pt"))
    assert code == 2 and "--data" in err


def test_shard_files():
    assert shard_files("c-{rank}-of-{world_size}.pt", 1, 4) == [Path("c-1-of-4.pt")]
    assert shard_files(["a.pt", "b.pt", "c.pt"], 0, 2) == [Path("a.pt"), Path("c.pt")]
    assert shard_files(["a.pt", "b.pt", "c.pt"], 1, 2) == [Path("b.pt")]
    assert shard_files(["a.pt", "b.pt"], 0, 1) == [Path("a.pt"), Path("b.pt")]
    with pytest.raises(NormSurgeonError, match="one file per rank"):
        shard_files(["a.pt"], 0, 2)
    with pytest.raises(NormSurgeonError, match="in every file name or in none"):
        shard_files(["a-{rank}.pt", "b.pt"], 0, 2)


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "normsurgeon", "calibrate",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_torchrun_two_ranks_equal_one_process_on_the_union(tmp_path, shards, single):
    out = tmp_path / "r.pt"
    result = _torchrun("normsurgeon.zoo:resnet", "--data", str(shards / "calib-{rank}.pt"), "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)  # rank 0 alone prints: exactly one JSON object
    assert (data["world_size"], data["batches"], data["samples"], data["recalibrated"]) == (2, 4, 24, 8)
    assert data["files"] == [str(shards / "calib-0.pt")]  # rank 0's shard
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]  # one writer, no temporary files left
    _assert_equal_stats(_running(torch.load(out, weights_only=False)), single)

    # a rank whose shard is missing: every rank stops (none waits in a collective), nothing is written
    (shards / "lonely-0.pt").write_bytes((shards / "calib-0.pt").read_bytes())
    failed = _torchrun("normsurgeon.zoo:resnet", "--data", str(shards / "lonely-{rank}.pt"),
                       "-o", str(tmp_path / "f.pt"), timeout=240)
    assert failed.returncode != 0
    assert "rank 1: calibration data" in failed.stderr and "lonely-1.pt" in failed.stderr, failed.stderr[-3000:]
    assert "rank(s) 1 of 2 could not use their calibration data" in failed.stderr
    assert not (tmp_path / "f.pt").exists()


def test_progress_shows_batches_done_only_on_a_terminal():
    import io

    from rich.console import Console

    from normsurgeon.cli.calibrate_cmd import _BatchProgress

    piped = io.StringIO()
    with _BatchProgress(Console(file=piped, force_terminal=False)) as progress:
        progress(1, 4)  # piped stderr (CI logs): no bar, and no line for quick work
        progress.start -= 60  # ... but slow work says where it is, in plain lines
        progress(2, 4)
    assert piped.getvalue().startswith("normsurgeon: calibrating: batches: 2/4 [") and "\x1b" not in piped.getvalue()
    buf = io.StringIO()
    with _BatchProgress(Console(file=buf, force_terminal=True, width=100)) as progress:
        for done in range(1, 5):
            progress(done, 4)
    assert "calibrating: batches" in buf.getvalue() and "4/4" in buf.getvalue()
