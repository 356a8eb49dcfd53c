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

import contextlib
import json
import math
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import file_tensors
from .errors import NormSurgeonError, one_line
from .inputs import CallArgs, as_call_args
from .loading import LoadedModel, getattr_inputs, load_model, prepare_hf_model
from .passes import convert as _convert
from .passes import fold as _fold
from .passes import ln_to_rms as _ln_to_rms
from .passes import norm_affine as _norm_affine
from .passes import rotate as _rotate
from .saving import guard_inputs, place_dir, temp_dir
from .hf_dir import write_config
from .mapped_output import WEIGHTS_METADATA, MappedOutput
from .pages import populate_for_write
from .recipe import Recipe, attach, describe_base, factory_base, recipe_of
from .trust import check_attention, check_config_attention, check_recipe_factory, hub_offline, user_code, zoo_name
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
    guard_inputs(out, inputs)
    if out.exists():
        if not out.is_dir():
            raise NormSurgeonError(f"`output` {path}: {out} is a file, not a directory")
        if any(out.iterdir()):
            if not (out / RECIPE_FILE).is_file():
                raise NormSurgeonError(f"`output` {path}: {out} is a directory with other files in it; a recipe goes "
                                       "into a new or empty directory")
            if not force:
                raise NormSurgeonError(f"`output` {path}: {out} holds a recipe already; pass `force=True` to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise NormSurgeonError(f"`output` {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise NormSurgeonError(f"`output` {path}: directory {parent} is not writable")
    return out


# --- building --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside the block go to the meta device (no memory; their random
    initialisation does no work), as accelerate's ``init_empty_weights(include_buffers=False)``.
    Buffers are built as usual: non-persistent ones (rotary tables, position ids) are not in the
    weights file, so they must hold their computed values."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            kwargs = dict(p.__dict__, requires_grad=p.requires_grad)
            self._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


_ZERO_BELOW = 1 << 20  # bytes


def _materialize(model: nn.Module) -> None:
    """CPU storage for every meta parameter, one per shared (tied) parameter. Large ones are left
    uninitialised: fresh pages that cost no memory until the weights are read into them (the replay
    only captures the model, whose graph does not depend on the values); small ones, which the
    allocator may hand out from reused memory, are zeroed so that no stray NaN runs through it."""
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                small = p.numel() * p.element_size() < _ZERO_BELOW
                data = torch.zeros(p.shape, dtype=p.dtype) if small else torch.empty(p.shape, dtype=p.dtype)
                kwargs = dict(p.__dict__, requires_grad=p.requires_grad)
                made[id(p)] = (p, type(p)(data, **kwargs))
            module._parameters[name] = made[id(p)][1]


def build_base(base: dict, *, trust: bool = False, where: str = "recipe", max_bytes: int | None = None,
               empty: bool = False) -> nn.Module:
    """The base model a recipe starts from, in eval mode: with fresh (random) weights, or with
    ``empty`` weights that were never initialised (fast, and costing no memory until the recipe's
    weights are loaded; a base that cannot be built that way is built as usual).

    Without ``trust`` only what runs no code from the recipe is built: a transformers class (looked
    up in transformers itself, built-in attention only) or ``normsurgeon.zoo:NAME``; any other
    factory spec needs ``trust=True`` (``trust.check_recipe_factory``). ``max_bytes``: the most a
    transformers base may hold (checked on the meta device first)."""
    if empty:
        again = dict(trust=trust, where=where, max_bytes=max_bytes)
        try:
            with _parameters_on_meta():
                model = build_base(base, **again)
        except NormSurgeonError:
            raise
        except Exception:  # noqa: BLE001 - a base that needs real weights while building: the usual way
            return build_base(base, **again)
        if any(b.is_meta for b in model.buffers()):  # a buffer computed from a parameter: the usual way
            return build_base(base, **again)
        _materialize(model)
        return model
    kind = base.get("kind")
    if kind == "factory":
        spec = base.get("spec")
        check_recipe_factory(spec, where, trust=trust)
        name = zoo_name(str(spec))
        if name is not None:  # the tool's own code: no import by name
            from .zoo import MODELS

            model = MODELS[name]()
            prepare_hf_model(model)
            return model.eval()
        return load_model(str(spec), trust=True).model
    if kind != "transformers":
        raise NormSurgeonError(f"{where}: unknown base kind {kind!r}")
    import transformers

    name = base.get("class")
    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise NormSurgeonError(f"{where}: transformers has no model class {name!r} (transformers "
                               f"{transformers.__version__})")
    impl = base.get("attn_implementation")
    check_attention(impl, f"{where} base")
    check_config_attention(base.get("config"), f"{where} base config")
    try:
        with hub_offline():
            config = cls.config_class.from_dict(dict(base.get("config") or {}))

            def build() -> nn.Module:
                return cls._from_config(config, attn_implementation=impl) if impl else cls(config)

            if max_bytes is not None:  # sizes from the config, measured without allocating
                size = _meta_bytes(build)
                if size is not None and size > max_bytes:
                    raise NormSurgeonError(
                        f"{where}: base.config describes a {name} of {size / 2**30:.1f} GiB, far more than the "
                        f"recipe's weights ({max_bytes / 2**30:.1f} GiB at most): refused before allocating it")
            model = build()
    except NormSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{where}: cannot build {name} from its config: {one_line(e, typed=True)}") from e
    prepare_hf_model(model)
    return model.eval()


def _meta_bytes(build) -> int | None:
    """Bytes of the model ``build()`` makes, built on the meta device (None: it cannot be built there;
    the real build then says what is wrong)."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001
        return None
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _weights_limit(file: Path) -> int:
    """How large a base may be for ``file``'s weights: the base is built in float32 (4 bytes an
    element, whatever dtype the file stores), allowed twice the file's elements (norms folded away,
    tied weights stored once) plus 256 MiB of buffers the file does not hold. Read from the header,
    before anything is built: a missing or unreadable file is an error here."""
    from safetensors import safe_open

    if not file.is_file():
        raise NormSurgeonError(f"{file}: missing (the weights of the recipe)")
    try:
        with safe_open(str(file), framework="pt") as f:
            elements = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{file}: cannot read: {one_line(e)}") from e
    return 2 * 4 * elements + (256 << 20)


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
        _check_sizes(model, action, i)
        redo(model, action, ci)
    attach(model, Recipe(base=recipe.base, actions=list(recipe.actions), example_inputs=ci))
    return model


def _check_sizes(model: nn.Module, action: dict, i: int) -> None:
    """An FFN BatchNorm normalizes the features between the two linears: a recorded size must be one
    of the linear's own (a recipe cannot make the reader allocate what the model does not have)."""
    ffn = action.get("ffn_bn") if action.get("op") == "convert" else None
    for j, site in enumerate((ffn or {}).get("sites") or []):
        where = f"recipe action {i + 1}: ffn_bn site {j + 1} ({site.get('linear')})"
        try:
            linear = model.get_submodule(str(site.get("linear")))
        except AttributeError:
            raise NormSurgeonError(f"{where}: the rebuilt model has no module there") from None
        weight = getattr(linear, "weight", None)
        dims = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        if site.get("hidden") not in dims:  # nn.Linear is (out, in), transformers' Conv1D (in, out)
            raise NormSurgeonError(f"{where}: hidden {site.get('hidden')!r} is not a size of the linear's weight "
                                   f"{list(dims)}")


# --- saving ----------------------------------------------------------------------------------------

def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None, force: bool = False,
         input_path: str | os.PathLike | None = None, base: str | dict | None = None, check: bool = True,
         inputs=(), mapped: "MappedOutput | None" = None) -> Path:
    """Write ``model`` as a recipe directory (see the module docstring), atomically.

    ``model`` is one the tool converted or loaded (it carries its recipe), or any transformers model.
    ``base`` (``"package.module:factory"`` or a base dict) says how to build a model the tool cannot
    describe. With ``check`` the directory is loaded back and its outputs compared with ``model``'s,
    bit for bit, before it is moved into place (``saving.place_dir``: without ``force`` a directory
    another run created meanwhile is not replaced). ``input_path`` and ``inputs`` (files the caller
    read) are never deleted. ``mapped`` (``mapped_output.prepare``): the temporary directory whose
    weights file already holds the model's weights, if it still does (``MappedOutput.holds``).
    """
    if not is_dir_output(path):
        raise NormSurgeonError(f"{path}: a recipe is a directory (end the path with /); .pt and .pt2 files are "
                               "written by normsurgeon.save_model")
    out = check_dir_output(path, force=force, inputs=[input_path, *inputs])
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
    tmp = mapped.dir if mapped is not None else temp_dir(out.resolve())
    try:
        from safetensors.torch import save_file, save_model

        (tmp / RECIPE_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        if mapped is None or not mapped.holds(model):
            # written beside, then renamed: a mapped weights file is never truncated under the tensors on it
            part = tmp / f"{WEIGHTS_FILE}.part"
            try:
                save_model(model, str(part), metadata=dict(WEIGHTS_METADATA))
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"`output` {path}: cannot write the weights: {one_line(e, typed=True)}") from e
            os.replace(part, tmp / WEIGHTS_FILE)
        if ci is not None:
            save_file({k: t.detach().cpu().contiguous() for k, t in zip(names, _input_tensors(ci))},
                      str(tmp / INPUTS_FILE))
        # a transformers model whose classes survived: plain from_pretrained loads the directory too
        write_config(model, tmp)
        if check:
            held = mapped is not None and mapped.saved_in(model, tmp / WEIGHTS_FILE)
            _check_round_trip(model, tmp, ci, path, held=held)
        place_dir(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# Recipe ops whose replay edits structure only (never runs the model): a rebuild on the meta device
# shows every class, name and shape they make.
_STRUCTURAL = {"norm_affine", "rotate", "ln_to_rms"}


def _check_round_trip(model: nn.Module, saved: Path, ci: CallArgs | None, path, held: bool = False) -> None:
    """The directory must rebuild a model whose outputs equal ``model``'s exactly. A large model
    (``verify.LEAN_BYTES``) whose actions are all structural is checked without a second copy of its
    weights (``_check_without_copy``)."""
    from .verify import LEAN_BYTES

    recipe = recipe_of(model)
    structural = recipe is None or all(a.get("op") in _STRUCTURAL for a in recipe.actions)
    if structural and sum(p.numel() * p.element_size() for p in model.parameters()) >= LEAN_BYTES:
        _check_without_copy(model, saved, path, held=held)
        return
    reloaded = load_dir(saved, trust=True).model  # our own output: its base is the model's, built in this process
    if ci is None:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    reloaded.to(device)
    x = ci.to(device=device)
    want = run_clean(model, x, eval_mode=True)
    got = run_clean(reloaded, x, eval_mode=True)
    if len(want) != len(got) or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(want, got)):
        raise NormSurgeonError(f"`output` {path}: the rebuilt model's outputs differ from the model's (the recipe does "
                               "not describe this model; save as .pt instead); nothing written")


def _check_without_copy(model: nn.Module, saved: Path, path, held: bool = False) -> None:
    """The round trip of a large model: the recipe is rebuilt on the meta device and must take the
    saved file as ``load`` does (every key, dtype and shape: ``_fit_weights``), and every saved tensor,
    read back one at a time, must equal the model's bit for bit. Together with the same classes from
    the same config, that is the model ``load`` returns, without holding a second copy of its weights.
    ``held`` (``MappedOutput.saved_in``): the model's tensors are the file's own pages, so its bytes
    are not read back."""
    recipe = _read_recipe(saved)
    with _parameters_on_meta():
        rebuilt = build_base(recipe.base, trust=True, where=str(saved / RECIPE_FILE))
    apply_recipe(rebuilt, recipe)
    if recipe.dtype is not None:
        rebuilt.to(getattr(torch, recipe.dtype))
    _fit_weights(rebuilt, saved / WEIGHTS_FILE)
    differs = _differs_in_structure(model, rebuilt)
    if differs is not None:
        raise NormSurgeonError(f"`output` {path}: the rebuilt model differs from the model at {differs} (the recipe "
                               "does not describe this model; save as .pt instead); nothing written")
    if held:
        return
    state = model.state_dict(keep_vars=True)
    differs = _differs_from_file(saved / WEIGHTS_FILE, state)
    if differs is not None:
        raise NormSurgeonError(f"`output` {path}: the saved {differs} differs from the model's (nothing written)")


_SCALARS = (bool, int, float, str, type(None))


def _differs_in_structure(model: nn.Module, rebuilt: nn.Module) -> str | None:
    """Where ``rebuilt`` (weights on the meta device) would compute differently from ``model`` apart from
    its weights: a module of another class or description, a plain attribute (an eps, a flag, a size)
    of another value, a buffer (rotary tables, masks) of other values; None when nothing differs."""
    theirs = dict(rebuilt.named_modules(remove_duplicate=False))
    for name, m in model.named_modules(remove_duplicate=False):
        r = theirs.get(name)
        where = name or "(root)"
        if r is None or type(r) is not type(m) or r.extra_repr() != m.extra_repr():
            return f"{where} ({type(m).__name__})"
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training" or not isinstance(v, _SCALARS):
                continue
            if getattr(r, k, None) != v and not (isinstance(v, float) and math.isnan(v)):
                return f"{where}.{k}"
        for k, b in m._buffers.items():
            rb = r._buffers.get(k)
            if (b is None) != (rb is None) or (b is not None and (rb.is_meta or b.dtype != rb.dtype
                                                                  or not torch.equal(b.cpu(), rb.cpu()))):
                return f"{where}.{k}"
    return None


def _differs_from_file(file: Path, state: dict[str, torch.Tensor]) -> str | None:
    """The first tensor of ``file`` that is not bit-identical to ``state``'s (read with plain reads,
    one tensor at a time: a mapped file would count every page read), or None."""
    start, header = file_tensors.read_header(file)
    buf = bytearray(file_tensors.COMPARE_CHUNK)
    for k, e in header.items():
        a, b = e["data_offsets"]
        where = file_tensors.FileSlice(file, start + a, start + b, e["dtype"], tuple(e["shape"]))
        t = state.get(k)
        if t is None or not where.holds(t.detach().to("cpu"), buf):
            return k
    return None


def _input_keys(ci: CallArgs) -> list[str]:
    return [f"args.{i}" for i in range(len(ci.args))] + [f"kwargs.{k}" for k in ci.kwargs]


def _input_tensors(ci: CallArgs) -> list[torch.Tensor]:
    values = [*ci.args, *ci.kwargs.values()]
    bad = [k for k, v in zip(_input_keys(ci), values) if not isinstance(v, torch.Tensor)]
    if bad:
        raise NormSurgeonError(f"a recipe stores tensor example inputs only; {bad[0]} is not a tensor")
    return values


# --- loading ---------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, trust: bool = False) -> nn.Module:
    """The model saved in recipe directory ``path`` (eval mode), rebuilt without unpickling anything.

    ``trust=True`` is needed only for a recipe whose base is a factory other than the zoo (building it
    runs code the recipe names)."""
    return load_dir(path, trust=trust).model


def load_dir(path: str | os.PathLike, *, trust: bool = False, imports=(), map_weights: bool = False) -> LoadedModel:
    """``load`` with the example inputs, as every command loads a model argument. ``map_weights``: the
    weights are views of a private mapping of the file instead of read into memory (see ``_read_into``)."""
    path = Path(path)
    recipe = _read_recipe(path)
    limit = _weights_limit(path / WEIGHTS_FILE)
    with user_code(trust=trust, imports=imports):
        # every weight is loaded below: never initialise one
        model = build_base(recipe.base, trust=trust, where=str(path / RECIPE_FILE), max_bytes=limit, empty=True)
    apply_recipe(model, recipe)
    if recipe.dtype is not None:  # non-persistent buffers too (rotary tables...), as model.half() did
        model.to(getattr(torch, recipe.dtype))
    _load_weights(model, path / WEIGHTS_FILE, map_weights=map_weights)
    file_tensors.register(model, path)
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


def _load_weights(model: nn.Module, file: Path, *, map_weights: bool = False) -> None:
    """Load ``file`` into ``model`` strictly, each tensor in the dtype it was saved in."""
    state, saved = _fit_weights(model, file)
    _read_into(file, {k: state[k] for k in saved}, map_weights=map_weights)


def _fit_weights(model: nn.Module, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check that ``file`` fits ``model`` (every key, dtype and shape), casting floating tensors to the
    saved dtypes; the model's state and the file's dtypes by key."""
    from safetensors import safe_open

    if not file.is_file():
        raise NormSurgeonError(f"{file}: missing (the weights of the recipe)")
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = {k: f.get_slice(k).get_dtype() for k in f.keys()}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{file}: cannot read: {one_line(e)}") from e
    _check_dtypes(model, saved, file)
    _cast_to_saved(model, saved)
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}  # tied weights: one tensor under several names, stored once
    for k, t in state.items():
        names.setdefault(id(t), []).append(k)
    unexpected = sorted(set(saved) - set(state))
    missing = sorted(k for k, t in state.items() if not any(n in saved for n in names[id(t)]))
    if missing or unexpected:
        raise NormSurgeonError(f"{file} does not fit the rebuilt model: "
                               + "; ".join(filter(None, [
                                   missing and f"missing key(s) {', '.join(sorted(missing)[:5])}"
                                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                                   unexpected and f"unexpected key(s) {', '.join(sorted(unexpected)[:5])}"
                                   + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")])))
    bad = [(k, tuple(state[k].shape), shape) for k, shape in shapes.items() if tuple(state[k].shape) != shape]
    if bad:
        k, want, got = bad[0]
        raise NormSurgeonError(f"{file} does not fit the rebuilt model: {k} has shape {list(got)} in the file, "
                               f"{list(want)} in the model" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return state, saved


def _read_into(file: Path, targets: dict[str, torch.Tensor], *, map_weights: bool = False) -> None:
    """Each tensor's bytes read from the file straight into the model's own storage: never the whole
    state dict beside the model, nor the file mapped into memory (safetensors maps it, and every
    page read counts; and a rewrite of a mapped tensor copies each page on write, which cost a 1.1B
    rotation 4.5 s against 1 s for reading it all). Not handed over either: a tensor mapped from the
    file is only 8-byte aligned and matmul kernels may round differently on it, which would break the
    bit-exact rebuild. A tensor that cannot be filled that way (another dtype, not contiguous) is copied.

    ``map_weights``: each tensor that fits is a view of a private mapping of the file instead, for a
    model whose weights are about to be copied elsewhere whole: ``fold``/``rotate`` writing their
    output first (``mapped_output``) then copy them file to file, and a 1.1B ``rotate -o`` reads
    nothing into memory."""
    from safetensors import safe_open

    with open(file, "rb") as f, torch.no_grad():
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if map_weights else None
        for k, dst in targets.items():
            start, end = header[k]["data_offsets"]
            fits = header[k]["dtype"] == _ST_NAMES.get(dst.dtype) and dst.device.type == "cpu" \
                and dst.is_contiguous() and dst.numel() * dst.element_size() == end - start
            if not fits:
                with safe_open(str(file), framework="pt") as st:
                    dst.copy_(st.get_tensor(k))
                continue
            if mapping is not None and end > start and 8 + size + end <= len(mapping):
                raw = torch.frombuffer(mapping, dtype=torch.uint8, count=end - start, offset=8 + size + start)
                try:
                    dst.data = raw.view(dst.dtype).view(dst.shape)
                    continue
                except RuntimeError:  # an offset the dtype cannot start at: read it
                    pass
            f.seek(8 + size + start)
            # one call makes the fresh pages writable: faulting them in one by one inside the read cost
            # 1.2 s against 0.95 s for a 2.2 GB model
            populate_for_write(dst.detach())
            raw = memoryview(dst.detach().reshape(-1).view(torch.uint8).numpy())
            if end > start and f.readinto(raw) != end - start:
                raise NormSurgeonError(f"{file}: truncated (the data of {k} ends early)")


_ST_DTYPES, _ST_NAMES = file_tensors.ST_DTYPES, file_tensors.ST_NAMES


def _check_dtypes(model: nn.Module, saved: dict[str, str], file: Path) -> None:
    """A strict load compares dtypes too: a floating tensor may be saved in another floating dtype
    (it is loaded in that one), anything else must be saved in the model's own dtype."""
    state = model.state_dict(keep_vars=True)
    for key, st_dtype in saved.items():
        t = state.get(key)
        if t is None:
            continue  # reported as an unexpected key by the load
        got = _ST_DTYPES.get(st_dtype)
        if got == t.dtype or (got is not None and got.is_floating_point and t.is_floating_point()):
            continue
        shown = str(got).removeprefix("torch.") if got is not None else st_dtype
        raise NormSurgeonError(f"{file}: {key} is stored as {shown}, but the rebuilt model's tensor is "
                               f"{str(t.dtype).removeprefix('torch.')}: not weights of this model")


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
