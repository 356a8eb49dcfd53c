"""A TokenBatchNorm's BatchNorm is its ``bn`` child (``nn.TokenBatchNorm``): the passes match and
rewrite that child, and report it by the TokenBatchNorm's path, as recipes name it."""

from __future__ import annotations

from torch import nn

from ..nn import TokenBatchNorm
from ..report import Action
from ..verify import set_module


def site_path(model: nn.Module, path: str) -> str:
    """The path a pass matches for a recorded ``path``: a TokenBatchNorm's ``bn`` child."""
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return path
    return f"{path}.bn" if isinstance(m, TokenBatchNorm) else path


def report_paths(model: nn.Module, actions: list[Action]) -> None:
    """Name each TokenBatchNorm's child site by the TokenBatchNorm's path, then ``unwrap``."""
    tokens = {path for path, m in model.named_modules() if isinstance(m, TokenBatchNorm)}
    for a in actions:
        if a.path.endswith(".bn") and a.path[:-3] in tokens:
            a.path = a.path[:-3]
    unwrap(model)


def unwrap(model: nn.Module) -> None:
    """A TokenBatchNorm whose child was folded (an Identity) or swapped for a LayerNorm over its last
    dim computes exactly that child on the unflattened input: put the child in its place."""
    for path, m in list(model.named_modules()):
        if not isinstance(m, TokenBatchNorm):
            continue
        child = m._modules["bn"]
        if isinstance(child, nn.Identity) or (isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1):
            set_module(model, path, child)
