"""BatchNorm → GroupNorm (``--to gn``): ``nn.GroupNorm(groups, C)``; ``groups`` (default 1) must
divide every C. Not function-preserving."""

from __future__ import annotations

from ..errors import NormSurgeonError
from ..find import NormSite
from ..graph import ModelGraph
from ..nn import batchnorm_to_groupnorm
from .swap import Plan, SwapRule, joined, read_bn_site


class BnToGn(SwapRule):
    target, target_name, sources = "gn", "GroupNorm", ("batchnorm",)

    def plan(self, graph: ModelGraph, path: str, group: list[NormSite]) -> tuple[str | None, Plan | None]:
        reason, bn = read_bn_site(graph, path, group)
        if bn is None:
            return reason, None
        if bn.token:
            return (f"{type(bn.module).__name__} normalizes the last dim of a rank-{bn.rank} input; GroupNorm "
                    "normalizes dim 1"), None
        g, channels = self.groups or 1, bn.module.num_features
        return None, Plan(path, "batchnorm", lambda old: batchnorm_to_groupnorm(old, g), False, channels, bn.shape,
                          joined(f"GroupNorm({g}, {channels})", bn.shared_note))

    def check_plans(self, plans: list[Plan]) -> None:
        """Refuse the whole conversion when ``groups`` does not divide every channel count."""
        groups = self.groups or 1
        bad = [(p.path, p.channels) for p in plans if p.channels is not None and p.channels % groups]
        if bad:
            shown = ", ".join(f"{path} (C={c})" for path, c in bad[:4]) + (
                f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise NormSurgeonError(f"--groups {groups} does not divide the channels of {shown}; choose a G that "
                                   "divides every C (1 always does)")
