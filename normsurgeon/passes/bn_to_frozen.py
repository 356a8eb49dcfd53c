"""BatchNorm → FrozenBatchNorm (``--to frozen``): running statistics as buffers, a fixed per-channel
scale and shift. Exact in eval mode: each site is verified on the input it received and the whole
model against the reference outputs; a site that deviates is rolled back."""

from __future__ import annotations

from ..nn import module_class
from .swap import BnSite, FromBnRule, Plan, joined


class BnToFrozen(FromBnRule):
    target, target_name, exact = "frozen", "FrozenBatchNorm", True

    def plan_bn(self, path: str, bn: BnSite) -> tuple[str | None, Plan | None]:
        module, channels = bn.module, bn.module.num_features
        if not module.track_running_stats or module.running_mean is None:
            return (f"{type(module).__name__}({channels}) has track_running_stats=False: no running statistics to "
                    "freeze (it always normalizes with batch statistics)"), None
        note = "frozen running stats" + (" (was in train mode: now uses running stats in training too)"
                                         if module.training else "")
        # looked up at build time, so a patched from_batchnorm (tests) is the one that runs
        return None, Plan(path, "batchnorm", lambda old: module_class("frozen_bn").from_batchnorm(old), True,
                          channels, bn.shape, joined(note, bn.shared_note))
