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


class FoldActions:
    """The views every fold report (in memory, streamed) gives of its ``actions``."""

    actions: list[Action]

    @property
    def folded(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "folded"]

    @property
    def skipped(self) -> list[Action]:
        """Everything not folded, rolled back included (each with its reason)."""
        return [a for a in self.actions if a.kind in ("skipped", "rolled_back")]

    @property
    def rolled_back(self) -> list[Action]:
        return [a for a in self.actions if a.kind == "rolled_back"]


def fmt_float(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.2e}"
