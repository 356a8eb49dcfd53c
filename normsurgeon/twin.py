"""A tiny twin of a transformers directory's model: the same class and layer count from the directory's
config with every width shrunk, so its parameter names are the real model's and its graph says which
tensors meet (what ``shard_stream`` plans from), at a size that captures in seconds.

The config is read as data, as ``loading`` reads a transformers directory: built-in classes only,
no remote code, the hub offline, built-in attention only. The twin is built from its config (random
weights), never from the directory's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import NormSurgeonError, one_line

HIDDEN = 64  # twin widths: small, but big enough for partial rotary factors and a few heads
HEADS = 4
HEAD_DIM = 16
INTERMEDIATE = 96
VOCAB = 128

_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
_FOLLOW_HIDDEN = ("word_embed_proj_dim", "embedding_size")  # shrunk with the hidden size when equal to it
_INTER_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "moe_intermediate_size",
               "shared_expert_intermediate_size")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
_TOKEN_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id")


def read_config(path: Path) -> tuple[Any, type]:
    """The directory's config (data only) and its model class, which must be one of transformers' own."""
    from .loading import read_hf_config

    config, cls = read_hf_config(path)
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        raise NormSurgeonError(f"{path}/config.json: architectures names {arch!r}, not a model class built into "
                               "transformers; `stream=True` plans from a twin of the same class")
    return config, cls


def shrink(config: Any) -> Any:
    """The same config with tiny widths and the same layer count and structure: hidden/intermediate sizes,
    heads (grouped-query kept grouped, multi-query kept at one kv head), an explicit head_dim, the
    vocabulary and the token ids that index it."""
    d = config.to_dict()
    hidden = next((d[k] for k in _HIDDEN_KEYS if isinstance(d.get(k), int)), None)
    if hidden is None:
        raise NormSurgeonError(f"{type(config).__name__}: no hidden size in the config ({', '.join(_HIDDEN_KEYS)})")
    for k in _HIDDEN_KEYS:
        if isinstance(d.get(k), int):
            d[k] = min(d[k], HIDDEN)
    for k in _FOLLOW_HIDDEN:
        if isinstance(d.get(k), int):
            d[k] = min(HIDDEN, hidden) if d[k] == hidden else min(d[k], HIDDEN // 2)
    for k in _INTER_KEYS:
        if isinstance(d.get(k), int):
            d[k] = min(d[k], INTERMEDIATE)
    heads = next((d[k] for k in _HEAD_KEYS if isinstance(d.get(k), int)), None)
    if heads is not None:
        kv = next((d[k] for k in _KV_KEYS if isinstance(d.get(k), int)), None)
        twin_heads = min(heads, HEADS)
        for k in _HEAD_KEYS:
            if isinstance(d.get(k), int):
                d[k] = twin_heads
        if kv is not None:
            # kv == heads (no grouping), kv == 1 (multi-query) and grouped in between stay what they were
            twin_kv = twin_heads if kv == heads else (1 if kv == 1 else max(1, twin_heads // 2))
            for k in _KV_KEYS:
                if isinstance(d.get(k), int):
                    d[k] = twin_kv
        if isinstance(d.get("head_dim"), int):
            d["head_dim"] = HEAD_DIM
        if min(hidden, HIDDEN) % twin_heads:
            raise NormSurgeonError(f"{type(config).__name__}: the twin's hidden size {min(hidden, HIDDEN)} does not "
                                   f"divide into {twin_heads} heads")
    vocab = d.get("vocab_size")
    if isinstance(vocab, int):
        d["vocab_size"] = min(vocab, VOCAB)
        for k in _TOKEN_KEYS:
            v = d.get(k)
            if isinstance(v, int):
                d[k] = min(v, d["vocab_size"] - 1)
            elif isinstance(v, list):
                d[k] = [min(i, d["vocab_size"] - 1) if isinstance(i, int) else i for i in v]
    d["use_cache"] = False
    try:
        return type(config).from_dict(d)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{type(config).__name__}: the shrunk twin config cannot be built "
                               f"({one_line(e)})") from e


def build(config: Any, cls: type) -> torch.nn.Module:
    """A twin model of class ``cls`` from ``shrink(config)``, float32, random weights, eval mode."""
    twin_config = shrink(config)
    torch.manual_seed(0)
    try:
        model = cls(twin_config)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{cls.__name__}: the tiny twin cannot be built from the shrunk config "
                               f"({one_line(e)})") from e
    return model.float().eval()
