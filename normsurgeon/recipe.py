"""A surgery recipe: how to build the base model and which edits turned it into this one.

A pickle of a converted model needs the user's trust and a compatible normsurgeon to load; a recipe is
data: the base model's description (a transformers config and class, or a ``package.module:factory``
spec), the ordered actions the passes applied (exactly which sites each rewrote, with their
parameters) and what their verification found. Replaying the actions on a freshly built base gives
the converted *architecture*; the weights come from the safetensors file saved beside it
(``normsurgeon.replay``). The format is in docs/recipes.md.

The passes record what they did on the model they return (``record``), in a plain-data attribute that
survives training, ``copy.deepcopy`` and pickling (a pickle of it needs no normsurgeon class), so ``normsurgeon.save(model, DIR)`` works on a
model converted by the tool and trained since.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import NormSurgeonError
from .inputs import CallArgs

FORMAT = "normsurgeon-recipe"
FORMAT_VERSION = 1  # bump when a reader of the old version would misread the new one
ATTR = "_normsurgeon_recipe"  # where a model carries its recipe (plain data in its __dict__)


@dataclass
class Recipe:
    """``base``: how to build the model the actions start from (None: unknown, ``base_unknown`` says
    why); ``actions``: what the passes did, in order; ``example_inputs``: what the actions captured the
    model with (replay captures with the same ones, so every rule sees the same shapes)."""

    base: dict | None = None
    actions: list[dict] = field(default_factory=list)
    example_inputs: CallArgs | None = None
    base_unknown: str | None = None
    dtype: str | None = None  # the one floating dtype of the saved weights (None: mixed or unknown)

    def to_json(self, *, weights: str | None = None, inputs: list[str] | None = None) -> dict:
        from . import __version__

        return {"format": FORMAT, "format_version": FORMAT_VERSION, "normsurgeon_version": __version__,
                "torch_version": torch.__version__.split("+")[0], "base": self.base, "dtype": self.dtype,
                "weights": weights, "example_inputs": inputs, "actions": self.actions}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Recipe":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise NormSurgeonError(f"{where}: not a normsurgeon recipe (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise NormSurgeonError(f"{where}: bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise NormSurgeonError(f"{where}: recipe format {version} was written by a newer normsurgeon "
                                   f"({data.get('normsurgeon_version')}); this one reads format {FORMAT_VERSION}: "
                                   "upgrade normsurgeon")
        base, actions = data.get("base"), data.get("actions")
        if not isinstance(base, dict) or base.get("kind") not in ("transformers", "factory"):
            raise NormSurgeonError(f"{where}: \"base\" must say how to build the model (kind transformers or factory)")
        if not isinstance(actions, list) or not all(isinstance(a, dict) and "op" in a for a in actions):
            raise NormSurgeonError(f"{where}: \"actions\" must be a list of {{\"op\": ...}} objects")
        dtype = data.get("dtype")
        if dtype is not None and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
                                      and getattr(torch, dtype).is_floating_point):
            raise NormSurgeonError(f"{where}: \"dtype\" must be a floating dtype (float32, bfloat16...), got {dtype!r}")
        check_fields(data, where)
        return cls(base=base, actions=actions, dtype=dtype)


# --- the recipe as data: every field a reader acts on, checked before anything is built ------------

MAX_SIZE = 1 << 24  # features of one layer: far above any real model, far below an allocation that hurts
_FFN_POSITIONS = ("after-first", "before-second")
_FFN_INITS = ("fresh", "identity")


def check_fields(data: dict, where: str) -> None:
    """Refuse a recipe whose fields have the wrong type or are out of range, naming the field, before
    any model is built (a 1 kB file must not make the reader allocate gigabytes)."""
    base = data["base"]
    if base["kind"] == "factory":
        _want(isinstance(base.get("spec"), str), where, "base.spec", "a string package.module:factory",
              base.get("spec"))
    else:
        _want(isinstance(base.get("class"), str), where, "base.class", "a class name", base.get("class"))
        _want(base.get("config") is None or isinstance(base.get("config"), dict), where, "base.config",
              "an object", base.get("config"))
        impl = base.get("attn_implementation")
        _want(impl is None or isinstance(impl, (str, dict)), where, "base.attn_implementation", "a string", impl)
    keys = data.get("example_inputs")
    _want(keys is None or (isinstance(keys, list) and all(isinstance(k, str) and k.startswith(("args.", "kwargs."))
                                                          for k in keys)),
          where, "example_inputs", "a list of \"args.N\"/\"kwargs.NAME\" keys", keys)
    for i, action in enumerate(data["actions"]):
        at = f"actions[{i}]"
        if action["op"] == "convert":
            _check_convert(action, where, at)
        elif action["op"] == "fold":
            folded = action.get("folded")
            _want(folded is None or isinstance(folded, list), where, f"{at}.folded", "a list", folded)
            for j, f in enumerate(folded or []):
                ok = isinstance(f, dict) and isinstance(f.get("norm"), str) and isinstance(f.get("position"), str) \
                    and isinstance(f.get("into"), list) and all(isinstance(t, str) for t in f["into"])
                _want(ok, where, f"{at}.folded[{j}]", "{\"norm\": str, \"into\": [str], \"position\": str}", f)


def _check_convert(action: dict, where: str, at: str) -> None:
    to = action.get("to")
    _want(to is None or isinstance(to, str), where, f"{at}.to", "a target name", to)
    swapped = action.get("swapped")
    _want(swapped is None or (isinstance(swapped, list) and all(isinstance(p, str) for p in swapped)),
          where, f"{at}.swapped", "a list of module paths", swapped)
    for name, low, none_ok in (("groups", 1, True), ("pn_groups", 1, True), ("progressive", 0, True),
                               ("pn_warmup_steps", 0, True)):
        _want_int(action.get(name), where, f"{at}.{name}", low, none_ok)
    mask = action.get("padding_mask")
    _want(mask is None or isinstance(mask, str), where, f"{at}.padding_mask", "an input name", mask)
    ffn = action.get("ffn_bn")
    if ffn is None:
        return
    _want(isinstance(ffn, dict), where, f"{at}.ffn_bn", "an object", ffn)
    _want(ffn.get("position") in _FFN_POSITIONS, where, f"{at}.ffn_bn.position", " or ".join(_FFN_POSITIONS),
          ffn.get("position"))
    _want(ffn.get("init") in _FFN_INITS, where, f"{at}.ffn_bn.init", " or ".join(_FFN_INITS), ffn.get("init"))
    sites = ffn.get("sites")
    _want(isinstance(sites, list), where, f"{at}.ffn_bn.sites", "a list", sites)
    for j, site in enumerate(sites):
        _want(isinstance(site, dict) and isinstance(site.get("linear"), str), where, f"{at}.ffn_bn.sites[{j}]",
              "{\"linear\": path, \"hidden\": size}", site)
        _want_int(site.get("hidden"), where, f"{at}.ffn_bn.sites[{j}].hidden", 1, False)


def _want(ok: bool, where: str, field: str, expected: str, got: Any) -> None:
    if not ok:
        text = repr(got)
        raise NormSurgeonError(f"{where}: {field} must be {expected}, got {text[:60]}{'...' if len(text) > 60 else ''}")


def _want_int(value: Any, where: str, field: str, low: int, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_SIZE
    _want(ok, where, field, f"an integer from {low} to {MAX_SIZE}", value)


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe ``model`` carries (a fresh ``Recipe`` each call: change it through ``attach``)."""
    d = model.__dict__.get(ATTR)
    if not isinstance(d, dict):
        return None
    ex = d.get("example_inputs")
    ci = CallArgs(tuple(ex.get("args") or ()), dict(ex.get("kwargs") or {})) if isinstance(ex, dict) else None
    return Recipe(base=d.get("base"), actions=list(d.get("actions") or []), example_inputs=ci,
                  base_unknown=d.get("base_unknown"))


def attach(model: nn.Module, recipe: Recipe) -> None:
    """Store ``recipe`` on ``model`` as plain data (dicts, lists, strings, tensors): a pickle of the
    model then loads without normsurgeon's classes. object.__setattr__: never a submodule, parameter
    or buffer, so state dicts stay as they are."""
    ci = recipe.example_inputs
    object.__setattr__(model, ATTR, {
        "base": copy.deepcopy(recipe.base), "actions": copy.deepcopy(list(recipe.actions)),
        "example_inputs": {"args": list(ci.args), "kwargs": dict(ci.kwargs)} if ci is not None else None,
        "base_unknown": recipe.base_unknown})


def set_base(model: nn.Module, base: dict | None, *, unknown: str | None = None) -> None:
    """Say how ``model`` was built (a loader calls this); keeps actions already recorded on it."""
    r = recipe_of(model)
    if r is not None and (r.base is not None or r.actions):
        return  # a model that carries its own recipe (a pickle the tool wrote) keeps it
    attach(model, Recipe(base=base, base_unknown=unknown if base is None else None))


def record(model: nn.Module, action: dict, example_inputs: CallArgs) -> None:
    """Append what a pass did to ``model``'s recipe (``action["op"]`` names the pass)."""
    r = recipe_of(model) or Recipe()
    if r.example_inputs is None:
        r.example_inputs = CallArgs(tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t
                                          for t in example_inputs.args),
                                    {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                     for k, v in example_inputs.kwargs.items()})
    r.actions.append(json_safe(action))
    attach(model, r)


def transformers_base(model: nn.Module) -> dict | None:
    """A transformers model's description: its class and config (None for any other model)."""
    config = getattr(model, "config", None)
    cls = type(model)
    if config is None or not hasattr(config, "to_dict") or not cls.__module__.startswith("transformers."):
        return None
    import transformers

    if getattr(transformers, cls.__name__, None) is not cls:
        return None
    base = {"kind": "transformers", "class": cls.__name__, "config": json_safe(config.to_dict())}
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str):
        base["attn_implementation"] = impl  # outputs are bit-exact only with the same attention kernel
    return base


def factory_base(spec: str) -> dict:
    return {"kind": "factory", "spec": spec}


def describe_base(model: nn.Module) -> dict:
    """How to build ``model``'s base, or the one-line reason it cannot be described."""
    r = recipe_of(model)
    if r is not None and r.base is not None:
        return r.base
    base = transformers_base(model)
    if base is not None:
        return base
    why = r.base_unknown if r is not None and r.base_unknown else \
        f"normsurgeon does not know how to build a {type(model).__name__}"
    raise NormSurgeonError(f"{why}: a recipe needs a base it can rebuild (a transformers model directory or "
                           "package.module:factory); save as .pt or .pt2 instead, or pass base='package.module:factory'")


def json_safe(obj: Any) -> Any:
    """``obj`` with only JSON types (tuples as lists, dtypes and other objects as strings, inf as None)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)
