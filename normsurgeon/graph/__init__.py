"""The captured graph: ``capture`` (torch.export → torch.fx → per child; ``blocks``: identical blocks
exported once), the ``GNode`` view every pass reads, and ``ops``, the one vocabulary of data-movement
ops with channel-axis tracking."""

from .capture import capture, check_inputs, eval_modes, restore_modes, without_kv_cache
from .node import CapturedPart, GNode, ModelGraph

__all__ = ["capture", "check_inputs", "eval_modes", "restore_modes", "without_kv_cache", "CapturedPart", "GNode", "ModelGraph"]
