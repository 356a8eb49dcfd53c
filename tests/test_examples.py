"""Every example script and `normsurgeon demo` run as a user runs them: a real process, real output."""

import json
import subprocess
import sys
from pathlib import Path

import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


def run(args, timeout=300):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_fold_before_deploy_example(tmp_path):
    from normsurgeon import zoo

    out = run([sys.executable, "examples/fold_before_deploy.py", "--outdir", str(tmp_path), "--runs", "10"])
    for name in ("resnet", "levit"):  # every BatchNorm of both folds
        n = _count(zoo.MODELS[name](), nn.modules.batchnorm._BatchNorm)
        assert f"== {name}: folded {n} BatchNorms, skipped 0" in out
    assert "folded   ONNX: none  verified in ONNX Runtime: True" in out
    assert (tmp_path / "levit_folded.onnx").is_file()


def test_export_and_verify_example(tmp_path):
    from normsurgeon import zoo

    out = run([sys.executable, "examples/export_and_verify.py", "--outdir", str(tmp_path)])
    assert out.count("verified: True") == 2
    assert f"LayerNormalization {_count(zoo.vit(), nn.LayerNorm)}" in out


def test_train_bn_vit_example(tmp_path):
    out = run([sys.executable, "examples/train_bn_vit.py", "--steps", "30", "--outdir", str(tmp_path)])
    assert "nan" not in out.lower()


def test_demo_json_tells_the_whole_story(tmp_path):
    from normsurgeon.demo import demo_cnn, demo_vit

    out = run([str(Path(sys.executable).parent / "normsurgeon"), "demo", "--train-steps", "20", "--bench-runs", "10",
               "--workdir", str(tmp_path), "--json"], timeout=600)
    steps = json.loads(out)["steps"]
    assert len(steps) == 7
    inspect_report, convert_report, _, fold_report, export_step, bench, cnn = (s["report"] for s in steps)
    assert {n["kind"] for n in inspect_report["norms"]} == {"layernorm"}
    vit = demo_vit()
    lns, ffns = _count(vit, nn.LayerNorm), vit.config.num_hidden_layers  # one FFN per encoder layer
    assert len(convert_report["converted"]) == lns and len(convert_report["inserted"]) == ffns
    assert len(fold_report["folded"]) == lns + ffns and fold_report["skipped"] == []
    assert fold_report["verify"]["passed"]
    rows = steps[4]["tables"][0]["rows"]
    assert [r[-1] for r in rows] == ["yes", "yes"] and rows[1][2] == "none"
    assert [Path(m["onnx"]).name for m in bench["models"]] == ["vit_ln.onnx", "vit_bn_folded.onnx", "vit_no_norm.onnx"]
    assert cnn["skipped"] == [] and len(cnn["folded"]) == _count(demo_cnn(), nn.modules.batchnorm._BatchNorm)
