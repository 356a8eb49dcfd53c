"""The examples/exp_*.py experiments in --quick mode, run as a user runs them (needs the `experiments` extra)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for _mod in ("matplotlib", "sklearn", "mlxtend"):
    pytest.importorskip(_mod, reason="needs the optional extra: pip install 'normsurgeon[experiments]'")


def run_quick(script, tmp_path):
    proc = subprocess.run([sys.executable, f"examples/{script}", "--quick", "--outdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_batch_size_sweep_quick(tmp_path):
    out = run_quick("exp_batch_size.py", tmp_path)
    data = json.loads((tmp_path / "batch_size.json").read_text())
    assert {(r["model"], r["variant"], r["batch_size"]) for r in data["results"]} == {
        (m, v, b) for m in ("cnn", "mlp") for v in ("bn", "ln", "gn", "frozen") for b in (4, 32)}
    assert all(0.3 < r["test_acc"] <= 1.0 for r in data["results"]), out  # 10 classes: chance is 0.1
    for m in ("cnn", "mlp"):
        assert (tmp_path / f"batch_size_{m}.png").stat().st_size > 10_000
    assert "| batch size |" in (tmp_path / "batch_size.md").read_text()


def test_vit_norms_quick(tmp_path):
    run_quick("exp_vit_norms.py", tmp_path)
    data = json.loads((tmp_path / "vit_norms.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["ln", "bn", "bn_ffn", "progressive"]
    lat = data["latency"]
    assert lat["norm_ops"]["ln"] == {"LayerNormalization": 7}
    for kind in ("progressive",):  # folded (a finished ProgressiveNorm as its RepBN): no norm op left
        assert lat["norm_ops"][kind] == {}, lat["norm_ops"]
        assert lat["folded"][kind][1] == 0
    assert set(data["timing_ms"]) == {"ln", "bn", "bn_ffn", "progressive", "progressive_finished"}
    for name in ("vit_curves.png", "vit_timing.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_padded_text_quick(tmp_path):
    run_quick("exp_padded_text.py", tmp_path)
    data = json.loads((tmp_path / "padded_text.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["ln", "tbn", "tbn_masked", "pn"]
    assert 20 < data["pad_percent"] < 70
    for r in data["results"]:
        assert r["losses"][-1] < r["losses"][0] and not r["diverged"]
    assert (tmp_path / "padded_text.png").stat().st_size > 10_000
