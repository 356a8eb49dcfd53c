"""Which input dimensions an ONNX export leaves dynamic, and at which sizes verification runs them.

The batch axis is dim 0 of every tensor input. A sequence axis is only named where the model says
so, never guessed from equal sizes: token inputs by their transformers names (``input_ids``,
``attention_mask``...), audio ``input_values`` and ``inputs_embeds`` by theirs, integer (B, T)
inputs of a model whose tokens go through an ``nn.Embedding``, and the (B, T, C) / (T, B, C) input
of torch's own ``nn.Transformer*`` modules (their ``batch_first`` says which axis is which).
"""

from __future__ import annotations

from typing import Mapping

import torch

BATCH, SEQUENCE = "batch", "sequence"

#: inputs whose dim 1 is the sequence, by their transformers names
TOKEN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                          "decoder_attention_mask", "input_values", "inputs_embeds"})

#: the batch sizes every dynamic batch axis is verified at
BATCH_SIZES = (1, 8)

_LIMIT_ATTRS = ("max_position_embeddings", "n_positions", "max_source_positions", "n_ctx")


def _torch_transformer(model: torch.nn.Module) -> torch.nn.Module | None:
    types = (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoder,
             torch.nn.TransformerDecoderLayer, torch.nn.Transformer)
    return model if isinstance(model, types) else None


def _batch_first(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Transformer):
        return bool(module.batch_first)
    if isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerDecoder)):
        module = module.layers[0]
    return bool(module.self_attn.batch_first)


def dynamic_axes(model: torch.nn.Module, named: Mapping[str, torch.Tensor], *, batch: bool = True,
                 sequence: bool = True) -> dict[str, dict[int, str]]:
    """``{input name: {axis: "batch" | "sequence"}}`` for the tensor inputs ``named`` of ``model``."""
    seq_axis = {n: 1 for n, t in named.items() if n in TOKEN_INPUTS and t.dim() >= 2}
    batch_axis = {n: 0 for n, t in named.items() if t.dim() >= 1}
    has_embedding = any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    for n, t in named.items():
        if n not in seq_axis and has_embedding and t.dim() == 2 and not t.is_floating_point() \
                and t.dtype != torch.bool:
            seq_axis[n] = 1  # integer (B, T) ids feeding an embedding
    tt = _torch_transformer(model)
    if tt is not None:
        first = _batch_first(tt)
        for n, t in named.items():
            if t.is_floating_point() and t.dim() == 3:
                batch_axis[n], seq_axis[n] = (0, 1) if first else (1, 0)
    out: dict[str, dict[int, str]] = {}
    for n in named:
        axes = {}
        if batch and n in batch_axis:
            axes[batch_axis[n]] = BATCH
        if sequence and n in seq_axis:
            axes[seq_axis[n]] = SEQUENCE
        if axes:
            out[n] = dict(sorted(axes.items()))
    return out


def sequence_limit(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, from its transformers config (position embeddings)."""
    config = getattr(model, "config", None)
    for attr in _LIMIT_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def verify_sizes(axes: Mapping[str, Mapping[int, str]], named: Mapping[str, torch.Tensor],
                 limit: int | None = None) -> dict[str, list[int]]:
    """Two sizes per dynamic dimension name, other than the example's: batch 1 and 8; a sequence at
    half and twice the example's length where ``limit`` allows (else the nearest others within it)."""
    example: dict[str, int] = {}
    for n, a in axes.items():
        for ax, dim in a.items():
            if n in named and ax < named[n].dim():  # (inputs of another graph are refused later, by name)
                example.setdefault(dim, int(named[n].shape[ax]))
    sizes: dict[str, list[int]] = {}
    for dim, size in example.items():
        if dim == BATCH:
            sizes[dim] = list(BATCH_SIZES)
            continue
        top = limit if limit is not None else max(4 * size, 8)
        picked: list[int] = []
        for s in (size // 2, 2 * size, size - 1, size + 1, 2, 3, 4):
            if 2 <= s <= top and s != size and s not in picked:
                picked.append(s)
        sizes[dim] = sorted(picked[:2])
    return sizes
