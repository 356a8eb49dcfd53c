"""What every pass is made of, and the verified driver that applies function-preserving ones.

A rule is three functions (see ``Rule``): **match** finds candidate sites in the captured graph
(read-only); **check** returns the reason a site must not be rewritten, or None; **rewrite** edits the
model in place, records in an ``UndoLog`` how to take that back, and returns an ``Action``.

``apply_verified`` runs the rewrites a rule accepted, compares the model with the reference outputs
and, if they deviate, undoes everything and re-applies the sites in halves (bisecting): a group that
verifies is kept, a single site that does not is rolled back with the reason. Sites are re-applied
in their original order, each on top of those already kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Protocol, TypeVar

import torch.nn as nn

from ..errors import one_line
from ..outputs import ErrorStats
from ..report import Action, fmt_float
from ..verify import References, Tolerance, UndoLog, UndoStore

S = TypeVar("S")


class Rule(Protocol[S]):
    """One rewrite: a new fold pattern or norm swap implements these three and nothing else."""

    name: str

    def match(self, *args: Any) -> Iterable[S]: ...

    def check(self, site: S, *args: Any) -> str | None: ...

    def rewrite(self, site: S, *args: Any, undo: UndoLog) -> Action: ...


@dataclass
class Applied(Generic[S]):
    """A site that was rewritten: how to redo it (returns a fresh Action) and how to undo it."""

    key: str
    site: S
    action: Action
    undo: UndoLog
    redo: Callable[[UndoLog], Action]
    rolled_back: Callable[[str], Action]  # the Action to report when this site is rolled back, given why
    describe: str = "the rewrite"  # what the rewrite did, for the rollback reason ("folding into fc1")


@dataclass
class Verdict:
    stats: ErrorStats
    error: str | None
    passed: bool
    actions: dict[str, Action]  # key -> final action of every applied site
    first: ErrorStats | None = None  # the deviation with every site applied, when sites were rolled back


def apply_verified(model: nn.Module, applied: list[Applied], refs: References, tol: Tolerance,
                   store: UndoStore, *, done: str = "rewritten") -> Verdict:
    """Check ``model`` (with every site in ``applied`` rewritten) against ``refs``; roll back the sites
    that break it. See the module docstring. Against a float32 reference of a low-precision model the
    tolerance is ``refs.tolerance(tol)`` (the original's own error sets the bar)."""
    tol = refs.tolerance(tol)
    actions = {a.key: a.action for a in applied}
    stats, err = refs.compare(model)
    if tol.ok(stats, err) or not applied:
        ok = tol.ok(stats, err)
        return Verdict(stats, err or (None if ok else refs.why_unverifiable), ok, actions)
    first = stats
    for a in reversed(applied):
        a.undo.restore()
    stats, err = refs.compare(model)
    if not tol.ok(stats, err):
        why = refs.why_unverifiable or (f"the outputs differ even with nothing {done} "
                                         "(the model is not deterministic?)")
        for a in applied:
            actions[a.key] = a.rolled_back(f"rolled back: {why}")
        return Verdict(stats, err or refs.why_unverifiable, False, actions, first)
    state = {"stats": stats, "err": err}

    def settle(group: list[Applied]) -> None:
        logs = []
        done: list[tuple[Applied, Action]] = []
        for a in group:
            undo = store.log()
            try:
                action = a.redo(undo)
            except Exception as e:  # noqa: BLE001 - a failed rewrite is a rolled-back site, never a half-edit
                undo.restore()
                actions[a.key] = a.rolled_back(f"rolled back: rewrite failed: {one_line(e, typed=True)}")
                continue
            logs.append(undo)
            done.append((a, action))
        if not done:
            return
        s, e = refs.compare(model, stop_past=tol)
        if tol.ok(s, e):
            for a, action in done:
                actions[a.key] = action
            state.update(stats=s, err=e)
            return
        for undo in reversed(logs):
            undo.restore()
        if len(done) == 1:
            a = done[0][0]
            what = e or f"max rel error {fmt_float(s.max_rel_error)} > tolerance {tol.rtol:g}"
            actions[a.key] = a.rolled_back(f"rolled back: {a.describe} changed the "
                                           f"outputs ({what})")
            return
        half = len(done) // 2
        settle([a for a, _ in done[:half]])
        settle([a for a, _ in done[half:]])

    settle(applied)
    return Verdict(state["stats"], state["err"], tol.ok(state["stats"], state["err"]), actions, first)
