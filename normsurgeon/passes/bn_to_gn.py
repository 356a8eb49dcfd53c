"""BatchNorm → GroupNorm (``--to gn``): ``nn.GroupNorm(groups, C)``; ``groups`` (default 1) must
divide every C. Not function-preserving."""

from __future__ import annotations

from ..errors import NormSurgeonError
from ..nn import batchnorm_to_groupnorm
from .swap import BnSite, FromBnRule, Plan, joined


class BnToGn(FromBnRule):
    target, target_name = "gn", "GroupNorm"

    def plan_bn(self, path: str, bn: BnSite) -> tuple[str | None, Plan | None]:
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
            raise NormSurgeonError(f"`groups={groups}` does not divide the channels of {shown}; choose a G that "
                                   "divides every C (1 always does)")
