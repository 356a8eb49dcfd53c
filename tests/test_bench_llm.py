"""benchmarks/bench_llm_fold_memory.py's quick mode runs the steps it times on the 1.1B model (the
figures in docs/llm.md "Scale"), each a passed fold or rotation, with its memory priming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_llm_benchmark_runs_every_step_in_quick_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llm_fold_memory.py"), "--quick",
                           "--prime-gb", "0.05", "--skip-plain-fold", "--workdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (runs,) = json.loads(out.read_text())["rounds"]
    # (the plain fold is fold -o without its save: skipped to keep the suite short)
    assert list(runs) == ["baseline", "fold -o", "rotate", "rotate -o"]
    assert all(r["exit"] == 0 and r["wall_s"] > 0 and r["peak_rss_mib"] > 0 for r in runs.values()), runs
    assert proc.stdout.count("[passed True") == 3, proc.stdout
    assert (tmp_path / "llama_64x2" / "model.safetensors").exists()  # the model it built and timed
