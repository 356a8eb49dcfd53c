"""Padding-aware statistics: carry a model's attention/padding mask to its token norms.

A token BatchNorm (or PowerNorm) in a padded batch would otherwise count the padding positions in its
batch statistics. Rather than thread a mask argument through the user's forward (their code, not
ours), the mask travels in a context variable:

    handle = capture_padding_mask(model)          # once; a forward pre-hook on the top module
    model(input_ids=ids, attention_mask=mask)     # norms inside see `mask` during this call
    handle.remove()

or explicitly, for any call: ``with padding_mask(mask): model(x)``.

The mask is (B, T) with nonzero/True at real tokens (the transformers convention). A norm asks
:func:`real_rows` for the rows of its flattened ``(-1, C)`` input that are real tokens; it gets None
(use every row) when no mask is active or when its input's leading shape does not match the mask
(a pooled (B, C) head, a decoder with another length): such a norm keeps today's behaviour.
Only training-mode statistics use the mask; eval is a fixed per-channel map either way, so export and
folding never see it.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn

__all__ = ["padding_mask", "current_padding_mask", "capture_padding_mask", "real_rows", "PaddingMaskHandle"]

_MASK: ContextVar[torch.Tensor | None] = ContextVar("normsurgeon_padding_mask", default=None)
_MARK = "_normsurgeon_padding_mask_handle"


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"a padding mask must be (batch, positions), got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def current_padding_mask() -> torch.Tensor | None:
    """The (B, T) bool mask (True = real token) active in this context, or None."""
    return _MASK.get()


@contextlib.contextmanager
def padding_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, token norms compute batch statistics over the positions where ``mask`` is
    nonzero. ``None`` switches masking off (e.g. inside a masked outer call)."""
    token = _MASK.set(None if mask is None else _as_bool_mask(mask))
    try:
        yield
    finally:
        _MASK.reset(token)


def real_rows(x: torch.Tensor, num_features: int) -> torch.Tensor | None:
    """For an input ``x`` viewed as ``(-1, num_features)``: a bool vector over its rows, True at real
    tokens, or None when no mask applies (no mask active, or x's leading shape is not the mask's)."""
    mask = _MASK.get()
    if mask is None:
        return None
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape) or (len(lead) == 1 and lead[0] == mask.numel()):
        return mask.reshape(-1).to(x.device)
    return None


class _Publish:
    """The pre/post hook pair, as a picklable object (a model with the hooks still saves with torch.save)."""

    def __init__(self, kwarg: str, position: int | None) -> None:
        self.kwarg, self.position = kwarg, position
        self._saved: list = []

    def __getstate__(self) -> dict:
        return {"kwarg": self.kwarg, "position": self.position}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["kwarg"], state["position"])

    def pre(self, module, args, kwargs):
        mask = kwargs.get(self.kwarg)
        if mask is None and self.position is not None and self.position < len(args):
            mask = args[self.position]
        ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self._saved.append(_MASK.get())
        _MASK.set(_as_bool_mask(mask) if ok else None)

    def post(self, module, args, kwargs, output):
        if self._saved:
            _MASK.set(self._saved.pop())


class PaddingMaskHandle:
    """What :func:`capture_padding_mask` returns: ``remove()`` takes the hooks off (also a context manager)."""

    def __init__(self, model: nn.Module, hooks: list) -> None:
        self.model, self._hooks = model, hooks

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._hooks:
            self.model.__dict__.pop(_MARK, None)
        self._hooks = []

    def __enter__(self) -> "PaddingMaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture_padding_mask(model: nn.Module, kwarg: str = "attention_mask") -> PaddingMaskHandle:
    """Make every call of ``model`` publish its ``kwarg`` argument (keyword or positional) as the
    padding mask for the duration of the call, so its token norms see it; a call without it (or
    with None, or with a mask that is not 2-D) runs unmasked. Installing twice on one model is a
    no-op: the second handle removes nothing. The hooks are picklable objects, so the model still
    saves with ``torch.save``; one model should not run in two threads at once while hooked.
    """
    if model.__dict__.get(_MARK):
        return PaddingMaskHandle(model, [])
    try:
        position = list(inspect.signature(model.forward).parameters).index(kwarg)
    except (ValueError, TypeError):
        position = None
    pub = _Publish(kwarg, position)
    hooks = [model.register_forward_pre_hook(pub.pre, with_kwargs=True),
             # always_call: a forward that raises must not leave its mask behind for the next call
             model.register_forward_hook(pub.post, with_kwargs=True, always_call=True)]
    model.__dict__[_MARK] = True
    return PaddingMaskHandle(model, hooks)
