"""LayerNorm / RMSNorm → ProgressiveNorm (``--to bn --progressive STEPS``; SLAB, ICML 2024): the same
sites as ``--to bn`` over the last dim, each replaced by ``lam * norm(x) + (1 - lam) * RepBN(x)`` with a
copy of the original norm and a RepBN whose BN starts from the norm's affine parameters. lam goes
from 1 to 0 over STEPS training forwards; at step 0 the module is the original norm, so the swap is
function-preserving and convert verifies it like any exact swap (per site and whole model, with
rollback).
"""

from __future__ import annotations

import copy

from ..find import NormSite
from ..graph import ModelGraph
from ..nn import module_class
from .ln_to_bn import LnToBn, plan_to_bn
from .swap import Plan


class LnToProgressive(LnToBn):
    target, target_name = "bn", "ProgressiveNorm (LayerNorm -> RepBN)"

    def __init__(self, groups: int | None = None, *, steps: int, alpha: float = 1.0) -> None:
        super().__init__(groups)
        self.steps, self.alpha = int(steps), alpha

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        reason, plan = plan_to_bn(graph, path, group)
        if plan is None:
            return reason, None
        if not plan.note or not plan.note.startswith("token BN"):
            return "normalizes dim 1 (channels-first): the progressive RepBN normalizes the last dim", None
        to_bn, steps, alpha = plan.build, self.steps, self.alpha
        prog, rep = module_class("progressive"), module_class("rep_bn")

        def build(old):
            bn = to_bn(old)
            return prog(copy.deepcopy(old), rep._wrap(bn, alpha), steps).train(old.training)
        note = f"lambda 1 -> 0 over {steps} training steps; token BN statistics over batch x positions"
        # exact: at step 0 it *is* the original norm (verified)
        return None, Plan(plan.path, plan.kind, build, True, plan.channels, plan.input_shape, note)
