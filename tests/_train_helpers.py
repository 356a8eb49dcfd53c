"""Small training loops on real data for the nn tests (stdlib source text, no downloads)."""

from __future__ import annotations

import inspect
import json

import torch
from torch import nn


def swap_norms(model: nn.Module, make) -> int:
    """Replace every nn.LayerNorm in ``model`` by ``make(ln)``; returns how many."""
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for name, ln in sites:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, make(ln))
    return len(sites)


def text_bytes() -> torch.Tensor:
    """Bytes of a standard-library source file, folded into a 100-token vocabulary."""
    data = inspect.getsource(json).encode()
    return torch.tensor(list(data), dtype=torch.long) % 100


def next_byte_loss_curve(model: nn.Module, steps: int = 40, batch: int = 8, seq: int = 16, lr: float = 3e-3,
                         seed: int = 0) -> list[float]:
    """Train a token model (transformers *Model returning last_hidden_state) with a linear head on
    next-byte prediction; returns the loss per step."""
    torch.manual_seed(seed)
    data = text_bytes()
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    head = nn.Linear(hidden, 100)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=lr)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        ids = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        out = model(input_ids=ids[:, :-1]).last_hidden_state
        loss = nn.functional.cross_entropy(head(out).reshape(-1, 100), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
