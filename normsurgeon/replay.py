"""Surgery recipe directories: save a converted model as data, rebuild it without unpickling anything.

A directory written by ``save`` holds

- ``recipe.json``: the recipe (``normsurgeon.recipe``: base model, ordered actions, verification);
- ``model.safetensors``: every weight after surgery (tied weights stored once, as
  ``safetensors.torch.save_model`` does);
- ``inputs.safetensors``: the example inputs the actions captured the model with.

``load`` builds the base (transformers class + config, or the factory), replays the actions through
the passes that performed them (``passes.convert.replay``, ``passes.fold.replay``: the same rules,
at exactly the recorded sites, no re-verification on the random base weights), casts to the saved
dtypes and loads the weights strictly: a missing or unexpected key is an error naming it.
``apply_recipe`` is the middle step alone, for a state dict saved by the user's own trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import NormSurgeonError, one_line
from .inputs import CallArgs, as_call_args
from .loading import LoadedModel, getattr_inputs, load_model, prepare_hf_model
from .passes import convert as _convert
from .passes import fold as _fold
from .passes import ln_to_rms as _ln_to_rms
from .passes import norm_affine as _norm_affine
from .passes import rotate as _rotate
from .recipe import Recipe, attach, describe_base, factory_base, recipe_of
from .verify import run_clean

__all__ = ["save", "load", "load_dir", "apply_recipe", "build_base", "is_recipe_dir", "is_dir_output",
           "check_dir_output", "RECIPE_FILE", "WEIGHTS_FILE", "INPUTS_FILE"]

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "inputs.safetensors"

# action "op" -> the pass function that redoes it on a rebuilt model
_REPLAY = {"convert": _convert.replay, "fold": _fold.replay}
_REPLAY["norm_affine"] = _norm_affine.replay
_REPLAY["ln_to_rms"] = _ln_to_rms.replay
_REPLAY["rotate"] = _rotate.replay


def is_recipe_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / RECIPE_FILE).is_file()


def is_dir_output(path: str | os.PathLike) -> bool:
    """``-o`` names a recipe directory: it ends with a path separator, is an existing directory, or
    has no suffix (``-o converted``); ``-o m.pt`` / ``-o m.pt2`` stay model files."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).is_dir() or not Path(text).suffix


def check_dir_output(path: str | os.PathLike, *, force: bool = False, inputs=()) -> Path:
    """Validate a recipe directory output before any work is done."""
    out = Path(path)
    for src in inputs:
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise NormSurgeonError(f"-o {out} is the input; normsurgeon never overwrites its input")
    if out.exists():
        if not out.is_dir():
            raise NormSurgeonError(f"-o {path}: {out} is a file, not a directory")
        if any(out.iterdir()):
            if not (out / RECIPE_FILE).is_file():
                raise NormSurgeonError(f"-o {path}: {out} is a directory with other files in it; a recipe goes "
                                       "into a new or empty directory")
            if not force:
                raise NormSurgeonError(f"-o {path}: {out} holds a recipe already; pass --force to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise NormSurgeonError(f"-o {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NormSurgeonError(f"-o {path}: directory {parent} is not writable")
    return out


# --- building --------------------------------------------------------------------------------------

def build_base(base: dict) -> nn.Module:
    """The base model a recipe starts from, with fresh (random) weights, in eval mode."""
    kind = base.get("kind")
    if kind == "factory":
        return load_model(str(base["spec"])).model
    if kind != "transformers":
        raise NormSurgeonError(f"recipe: unknown base kind {kind!r}")
    import transformers

    name = base.get("class")
    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise NormSurgeonError(f"recipe: transformers has no model class {name!r} (transformers "
                               f"{transformers.__version__})")
    try:
        config = cls.config_class.from_dict(dict(base.get("config") or {}))
        impl = base.get("attn_implementation")
        model = cls._from_config(config, attn_implementation=impl) if impl else cls(config)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"recipe: cannot build {name} from its config: {one_line(e, typed=True)}") from e
    prepare_hf_model(model)
    return model.eval()


def apply_recipe(model: nn.Module, recipe: Any, *, example_inputs: Any = None) -> nn.Module:
    """Rebuild the converted architecture on ``model`` (the base, built the way the recipe says), in
    place, and return it: afterwards a state dict of the converted model loads into it.

    ``recipe``: a recipe directory, its ``recipe.json``, or a ``Recipe``. The actions capture the
    model with the recipe's example inputs (``example_inputs`` overrides them). Weights are not
    touched: load the trained ones next (``model.load_state_dict(...)``).
    """
    if isinstance(recipe, (str, os.PathLike)):
        recipe = _read_recipe(Path(recipe))
    if not isinstance(recipe, Recipe):
        raise NormSurgeonError(f"apply_recipe: expected a recipe directory or a Recipe, got {type(recipe).__name__}")
    ci = as_call_args(example_inputs) if example_inputs is not None else recipe.example_inputs
    if ci is None and recipe.actions:
        ci = getattr_inputs(model)
        if ci is None:
            raise NormSurgeonError("apply_recipe: the recipe has no example inputs and the model carries none: "
                                   "pass example_inputs=")
    for i, action in enumerate(recipe.actions):
        redo = _REPLAY.get(action.get("op"))
        if redo is None:
            raise NormSurgeonError(f"recipe action {i + 1}: unknown op {action.get('op')!r} (written by a newer "
                                   "normsurgeon?)")
        redo(model, action, ci)
    attach(model, Recipe(base=recipe.base, actions=list(recipe.actions), example_inputs=ci))
    return model


# --- saving ----------------------------------------------------------------------------------------

def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, force: bool = False,
         input_path: str | os.PathLike | None = None, base: str | dict | None = None, check: bool = True) -> Path:
    """Write ``model`` as a recipe directory (see the module docstring), atomically.

    ``model`` is one the tool converted or loaded (it carries its recipe), or any transformers model.
    ``base`` (``"package.module:factory"`` or a base dict) says how to build a model the tool cannot
    describe. With ``check`` the directory is loaded back and its outputs compared with ``model``'s,
    bit for bit, before it is moved into place.
    """
    if not is_dir_output(path):
        raise NormSurgeonError(f"{path}: a recipe is a directory (end the path with /); .pt and .pt2 files are "
                               "written by normsurgeon.save_model")
    out = check_dir_output(path, force=force, inputs=[input_path])
    recipe = recipe_of(model) or Recipe()
    if base is not None:
        recipe = Recipe(factory_base(base) if isinstance(base, str) else dict(base), list(recipe.actions),
                        recipe.example_inputs)
    base_desc = describe_base(model) if recipe.base is None else recipe.base
    ci = recipe.example_inputs
    if ci is None:
        ci = as_call_args(example_inputs) if example_inputs is not None else getattr_inputs(model)
    if ci is None and recipe.actions:
        raise NormSurgeonError("saving a recipe needs the example inputs its actions captured the model with")
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    names = _input_keys(ci) if ci is not None else None
    doc = Recipe(base_desc, list(recipe.actions), dtype=dtype).to_json(weights=WEIGHTS_FILE, inputs=names)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        from safetensors.torch import save_file, save_model

        (tmp / RECIPE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        try:
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "normsurgeon": "recipe"})
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"-o {path}: cannot write the weights: {one_line(e, typed=True)}") from e
        if ci is not None:
            save_file({k: t.detach().cpu().contiguous() for k, t in zip(names, _input_tensors(ci))},
                      str(tmp / INPUTS_FILE))
        if check:
            _check_round_trip(model, tmp, ci, path)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_round_trip(model: nn.Module, saved: Path, ci: CallArgs | None, path) -> None:
    """The directory must rebuild a model whose outputs equal ``model``'s exactly."""
    reloaded = load_dir(saved).model
    if ci is None:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    reloaded.to(device)
    x = ci.to(device=device)
    want = run_clean(model, x, eval_mode=True)
    got = run_clean(reloaded, x, eval_mode=True)
    if len(want) != len(got) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(want, got)):
        raise NormSurgeonError(f"-o {path}: the rebuilt model's outputs differ from the model's (the recipe does "
                               "not describe this model; save as .pt instead); nothing written")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _input_keys(ci: CallArgs) -> list[str]:
    return [f"args.{i}" for i in range(len(ci.args))] + [f"kwargs.{k}" for k in ci.kwargs]


def _input_tensors(ci: CallArgs) -> list[torch.Tensor]:
    values = [*ci.args, *ci.kwargs.values()]
    bad = [k for k, v in zip(_input_keys(ci), values) if not isinstance(v, torch.Tensor)]
    if bad:
        raise NormSurgeonError(f"a recipe stores tensor example inputs only; {bad[0]} is not a tensor")
    return values


# --- loading ---------------------------------------------------------------------------------------

def load(path: str | os.PathLike) -> nn.Module:
    """The model saved in recipe directory ``path`` (eval mode), rebuilt without unpickling anything."""
    return load_dir(path).model


def load_dir(path: str | os.PathLike) -> LoadedModel:
    """``load`` with the example inputs, as every command loads a model argument."""
    path = Path(path)
    recipe = _read_recipe(path)
    model = build_base(recipe.base)
    apply_recipe(model, recipe)
    if recipe.dtype is not None:  # non-persistent buffers too (rotary tables...), as model.half() did
        model.to(getattr(torch, recipe.dtype))
    _load_weights(model, path / WEIGHTS_FILE)
    ci = recipe.example_inputs if recipe.example_inputs is not None else getattr_inputs(model)
    return LoadedModel(model.eval(), ci, "recipe", path)


def _read_recipe(path: Path) -> Recipe:
    if path.name == RECIPE_FILE and path.is_file():
        path = path.parent
    if not is_recipe_dir(path):
        raise NormSurgeonError(f"{path}: not a recipe directory (no {RECIPE_FILE})")
    where = path / RECIPE_FILE
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise NormSurgeonError(f"{where}: cannot read: {one_line(e)}") from e
    recipe = Recipe.from_json(data, str(where))
    keys = data.get("example_inputs")
    if keys:
        recipe.example_inputs = _read_inputs(path / INPUTS_FILE, keys)
    elif recipe.actions:
        raise NormSurgeonError(f"{where}: actions without example inputs ({INPUTS_FILE}) cannot be replayed")
    return recipe


def _read_inputs(file: Path, keys: list[str]) -> CallArgs:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{file}: cannot read the example inputs: {one_line(e)}") from e
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise NormSurgeonError(f"{file}: missing example input {missing[0]}")
    args = tuple(tensors[k] for k in keys if k.startswith("args."))
    kwargs = {k.removeprefix("kwargs."): tensors[k] for k in keys if k.startswith("kwargs.")}
    return CallArgs(args, kwargs)


def _load_weights(model: nn.Module, file: Path) -> None:
    """Load ``file`` into ``model`` strictly, each tensor in the dtype it was saved in."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    if not file.is_file():
        raise NormSurgeonError(f"{file}: missing (the weights of the recipe)")
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{file}: cannot read: {one_line(e)}") from e
    _cast_to_saved(model, saved)
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as e:  # a shape that does not fit
        raise NormSurgeonError(f"{file} does not fit the rebuilt model: {one_line(e)}") from e
    if missing or unexpected:
        raise NormSurgeonError(f"{file} does not fit the rebuilt model: "
                               + "; ".join(filter(None, [
                                   missing and f"missing key(s) {', '.join(sorted(missing)[:5])}"
                                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                                   unexpected and f"unexpected key(s) {', '.join(sorted(unexpected)[:5])}"
                                   + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")])))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _cast_to_saved(model: nn.Module, saved: dict[str, str]) -> None:
    """A floating tensor saved in another dtype than the rebuilt one is cast first, so loading copies
    its values exactly (``load_state_dict`` would round them into the rebuilt dtype)."""
    state = model.state_dict(keep_vars=True)
    for key, st_dtype in saved.items():
        want, t = _ST_DTYPES.get(st_dtype), state.get(key)
        if want is None or t is None or not t.is_floating_point() or t.dtype == want:
            continue
        owner_path, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if name in owner._parameters:
            owner._parameters[name].data = owner._parameters[name].data.to(want)
        elif name in owner._buffers:
            owner._buffers[name] = owner._buffers[name].to(want)
