"""BatchNorm → FrozenBatchNorm (``--to frozen``): running statistics as buffers, a fixed per-channel
scale and shift. Exact in eval mode: each site is verified on the input it received and the whole
model against the reference outputs; a site that deviates is rolled back."""

from __future__ import annotations

from ..find import NormSite
from ..graph import ModelGraph
from ..nn import module_class
from .swap import Plan, SwapRule, joined, read_bn_site


class BnToFrozen(SwapRule):
    target, target_name, sources, exact = "frozen", "FrozenBatchNorm", ("batchnorm",), True

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        reason, bn = read_bn_site(graph, path, group)
        if bn is None:
            return reason, None
        module, channels = bn.module, bn.module.num_features
        if bn.token:
            return (f"{type(module).__name__} normalizes the last dim of a rank-{bn.rank} input; FrozenBatchNorm "
                    "normalizes dim 1"), None
        if not module.track_running_stats or module.running_mean is None:
            return (f"{type(module).__name__}({channels}) has track_running_stats=False: no running statistics to "
                    "freeze (it always normalizes with batch statistics)"), None
        note = "frozen running stats" + (" (was in train mode: now uses running stats in training too)"
                                         if module.training else "")
        # looked up at build time, so a patched from_batchnorm (tests) is the one that runs
        return None, Plan(path, "batchnorm", lambda old: module_class("frozen_bn").from_batchnorm(old), True,
                          channels, bn.shape, joined(note, bn.shared_note))
