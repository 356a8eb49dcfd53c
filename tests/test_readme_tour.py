"""README.md runs as written: every `$ normsurgeon ...` / `$ torchrun ...` line of the Quick tour, in
order, in an empty directory (real processes, the zoo's tiny models), and the Python API snippet, twice
in a row in the same directory (a second run must not trip over the first one's files)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _section(start: str, end: str) -> str:
    return README[README.index(start):README.index(end)]


def tour_commands() -> list[str]:
    """The tour's command lines, `$ ` and trailing `# comments` dropped."""
    text = _section("## Quick tour", "## Python API")
    lines = [ln[2:] for ln in text.splitlines() if re.match(r"\$ (normsurgeon|torchrun) ", ln)]
    return [shlex.split(ln, comments=True) for ln in lines]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_tour_reads_only_files_it_wrote_before():
    """No input from nowhere: each file a command reads was written by an earlier command, and no two
    commands write the same file (the two calibrations once did: the torchrun one failed on every rank)."""
    written: list[str] = []
    cmds = tour_commands()
    assert ["normsurgeon", "inputs"] in [c[:2] for c in cmds] and "torchrun" in [c[0] for c in cmds]
    for c in cmds:
        args = c[1:] if c[0] == "normsurgeon" else c[c.index("normsurgeon") + 1:]
        read = [a for a in args[1:] if re.search(r"(\.pt2?|\.onnx|/)$", a) and not a.startswith("-")]
        read += [args[args.index(f) + 1] for f in ("--inputs", "--data", "--calibrate") if f in args]
        out = args[args.index("-o") + 1] if "-o" in args else None
        for f in read:
            if f != out:
                assert f.rstrip("/") in written, f"$ {shlex.join(c)}: {f} was not written by an earlier command"
        if out is not None:
            assert out.rstrip("/") not in written, f"$ {shlex.join(c)}: {out} is written twice"
            written.append(out.rstrip("/"))


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed next to this python")
def test_readme_tour_runs_in_an_empty_directory(tmp_path):
    for cmd in tour_commands():
        exe = [sys.executable, "-m", "normsurgeon"] if cmd[0] == "normsurgeon" else [str(BIN / "torchrun")]
        proc = subprocess.run([*exe, *cmd[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"$ {shlex.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "vit_bn_calibrated.pt").is_file() and (tmp_path / "vit_bn_calibrated_2ranks.pt").is_file()
    assert (tmp_path / "vit.onnx").is_file() and (tmp_path / "levit_folded.onnx").is_file()


@pytest.mark.slow
def test_python_snippet_runs_twice(tmp_path):
    code = _section("## Python API", "`examples/`")
    code = code[code.index("```python\n") + len("```python\n"):code.index("```\n", code.index("```python\n") + 3)]
    (tmp_path / "snippet.py").write_text(code)
    for run in (1, 2):
        proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"run {run}:\n{proc.stderr[-3000:]}"
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "levit_folded" / "recipe.json").is_file()
