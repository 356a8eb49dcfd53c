"""A recipe directory that plain transformers also loads: ``config.json`` beside the recipe's
``model.safetensors``, written when the surgery left every module class as it was (an affine fold
that created no bias, a rotation), so ``AutoModel*.from_pretrained(DIR)`` builds the same model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch.nn as nn

from .recipe import recipe_of

# recipe ops that keep every class and every weight name of a transformers model
_CLASS_PRESERVING = {"norm_affine", "rotate"}


def why_not_loadable(model: nn.Module) -> str | None:
    """None when the model's classes and state-dict names are transformers' own, else why not."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_file") or not type(model).__module__.startswith("transformers."):
        return "not a transformers model"
    recipe = recipe_of(model)
    actions = recipe.actions if recipe is not None else []
    if not actions:
        return "no surgery recorded"
    for a in actions:
        op = a.get("op")
        if op not in _CLASS_PRESERVING:
            return f"the {op} action changes the model's classes"
        if a.get("created_bias"):
            return f"the fold created biases transformers' config does not know ({', '.join(a['created_bias'])})"
    return None


def write_config(model: nn.Module, out: str | os.PathLike) -> Path | None:
    """Add ``config.json`` to the saved directory ``out`` when plain transformers can load it."""
    if why_not_loadable(model) is not None:
        return None
    out = Path(out)
    tmp = out / ".config.json.tmp"
    config = copy.deepcopy(model.config)
    # as save_pretrained writes it: vLLM and --stream pick the model class by this name, and a model
    # built from a bare config (not from_pretrained) has none
    config.architectures = [type(model).__name__]
    config.to_json_file(str(tmp))
    os.replace(tmp, out / "config.json")
    return out / "config.json"
