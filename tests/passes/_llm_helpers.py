"""Shared by the norm-surgery tests: fresh inputs (another batch size and sequence length) and the error."""

import torch


def fresh_inputs(name):
    g = torch.Generator().manual_seed(123)
    if name == "vit":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 96, (3, 7), generator=g)}


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def logits(model, kw):
    with torch.no_grad():
        return model(**kw)[0]
