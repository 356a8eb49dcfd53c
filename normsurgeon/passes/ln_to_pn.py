"""LayerNorm / RMSNorm → PowerNorm (``--to pn``; Shen et al. 2020): the same sites as ``--to bn``
over the last dim (a channels-first LN is skipped: PowerNorm normalizes the last dim), each replaced
by a ``PowerNorm`` built from the ``TokenBatchNorm`` that ``--to bn`` would have installed (affine
carried over the same way). Not function-preserving: train it (its running quadratic mean starts at 1).
"""

from __future__ import annotations

from ..find import NormSite
from ..graph import ModelGraph
from ..nn import module_class
from .ln_to_bn import LnToBn, plan_to_bn
from .swap import Plan, joined


class LnToPn(LnToBn):
    target, target_name = "pn", "PowerNorm"

    def __init__(self, groups: int | None = None, *, warmup_steps: int = 4000, group_num: int | None = None,
                 alpha_fwd: float = 0.9, alpha_bkw: float = 0.9) -> None:
        super().__init__(groups)
        self.kwargs = {"warmup_steps": warmup_steps, "group_num": group_num, "alpha_fwd": alpha_fwd,
                       "alpha_bkw": alpha_bkw}

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        reason, plan = plan_to_bn(graph, path, group)
        if plan is None:
            return reason, None
        if not plan.note or not plan.note.startswith("token BN"):
            return "normalizes dim 1 (channels-first): PowerNorm normalizes the last dim", None
        to_bn, cls, kwargs = plan.build, module_class("pn"), self.kwargs

        def build(old):
            return cls._from_token_bn(to_bn(old), **kwargs)
        note = joined("statistics: quadratic mean over batch x positions",
                      f"warm-up {kwargs['warmup_steps']} steps",
                      kwargs["group_num"] and f"group scaling ({kwargs['group_num']} groups; only its affine part folds)")
        return None, Plan(plan.path, plan.kind, build, False, plan.channels, plan.input_shape, note)
