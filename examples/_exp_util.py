"""Shared plumbing of the examples/exp_*.py experiments (tables, spread, plots, results files).

The experiments need the optional extra: ``pip install 'normsurgeon[experiments]'`` (matplotlib,
scikit-learn, mlxtend).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def require_extras() -> None:
    missing = []
    for mod in ("matplotlib", "sklearn", "mlxtend"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        print(f"error: this experiment needs {', '.join(missing)}: pip install 'normsurgeon[experiments]'",
              file=sys.stderr)
        raise SystemExit(2)
    import matplotlib
    matplotlib.use("Agg")


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_ms(values, digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def quantiles(values) -> tuple[float, float, float]:
    """(p25, median, p75)."""
    v = sorted(float(x) for x in values)
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[1], q[2]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(outdir: Path, name: str, results: dict, tables: list[tuple[str, str]]) -> None:
    """``name``.json (raw numbers) and ``name``.md (the tables) in outdir; tables also printed."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(f"**{title}**\n\n{table}" for title, table in tables) + "\n"
    (outdir / f"{name}.md").write_text(text)
    print(text)
