"""Reports: what a pass did, as data.

The library never prints. Every command returns a report with ``to_json()`` (the CLI contract of
docs/cli.md) and ``tables()`` (plain rows the CLI renders with rich).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Action:
    """One thing a pass did (or refused to do) at one site."""

    kind: str  # folded | converted | inserted | skipped | rolled_back
    path: str
    detail: dict = field(default_factory=dict)
    reason: str | None = None


def fmt_float(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}"
