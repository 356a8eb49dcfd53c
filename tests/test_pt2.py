"""A .pt2 archive is a first-class model argument: every command runs on it, in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "normsurgeon")


def cli(*args, expect=0):
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def folded_resnet_pt2(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2") / "resnet_folded.pt2"
    cli("fold", "normsurgeon.zoo:resnet", "-o", str(out))
    return out


def test_transformers_pt2_loads_in_a_new_process_and_every_command_runs(folded_resnet_pt2, tmp_path):
    # a new process has not imported transformers' output classes: loading must do it
    data = json.loads(cli("inspect", str(folded_resnet_pt2), "--json").stdout)
    assert data["norms"] == []  # folded: no BatchNorm left
    exported = json.loads(cli("export", str(folded_resnet_pt2), "-o", str(tmp_path / "r.onnx"), "--json").stdout)
    assert exported["verify"]["passed"] and exported["norm_ops"] == {}
    fold = json.loads(cli("fold", str(folded_resnet_pt2), "--json").stdout)
    assert fold["folded"] == [] and fold["verify"]["passed"] is not False


def test_pt2_norms_are_functional_and_reported_so(tmp_path):
    out = tmp_path / "vit_bn.pt2"
    cli("convert", "normsurgeon.zoo:vit", "--to", "bn", "-o", str(out))
    norms = json.loads(cli("inspect", str(out), "--json").stdout)["norms"]
    assert len(norms) == 5 and {(n["kind"], n["source"]) for n in norms} == {("batchnorm", "function")}


def test_corrupt_pt2_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"junk")
    proc = cli("inspect", str(bad), expect=2)
    assert proc.stderr.strip().count("\n") == 0 and "not a readable torch.export archive" in proc.stderr
