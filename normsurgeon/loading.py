"""Load models from what users have on disk, and save results without ever losing anything.

Accepted model arguments:
- a transformers model directory (config.json + weights), loaded offline, never with remote code,
  built-in attention only;
- a ``.pt2`` torch.export archive, its contents checked first (``pt2_check``): pickled or code parts
  need ``trust=True``;
- a ``.pt``/``.pth`` file: a pickled ``nn.Module`` (only with ``trust=True``, because unpickling runs
  arbitrary code) or a state dict (safe; needs an architecture from a factory spec);
- a ``package.module:factory`` spec, optionally with weights from ``.pt``/``.safetensors``.

What each may run, and what ``trust`` unlocks, is ``normsurgeon.trust``'s concern (docs/cli.md,
"What loading trusts").

Recipe directories (``convert``/``fold -o DIR/``) are rebuilt by ``normsurgeon.replay``, which needs
the passes; ``api.load`` takes every form.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import file_tensors
from .errors import NormSurgeonError, one_line
from .inputs import CallArgs, as_call_args, inputs_from_hf_config
from .quiet import quiet_torch
from .trust import check_config_attention, cwd_hint, hub_offline, user_code


@dataclass
class LoadedModel:
    model: torch.nn.Module
    example_inputs: CallArgs | None
    source: str  # transformers | pt2 | pickle | factory
    path: Path | None = None
    program: Any = None  # a .pt2's ExportedProgram itself: fold rewrites it (passes.fold.fold_program)


def import_modules(names: Sequence[str]) -> None:
    """Import modules a pickle or factory needs (``--import``), the working directory importable while
    they import (and no longer: ``trust.user_code``)."""
    with user_code(imports=names):
        pass


def load_model(spec: str | os.PathLike, *, trust: bool = False, imports: Sequence[str] = (),
               weights: str | os.PathLike | None = None, batch: int = 2) -> LoadedModel:
    """Load a model from a path or ``package.module:factory`` spec; see the module docstring.

    The working directory is importable during this call only with ``imports`` or ``trust``
    (``trust.user_code``); ``sys.path`` is as it was afterwards."""
    with user_code(trust=trust, imports=imports):
        return _load_model(spec, trust, weights, batch)


def _load_model(spec, trust: bool, weights, batch: int) -> LoadedModel:
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if (path / "recipe.json").is_file() and not (path / "config.json").is_file():
            raise NormSurgeonError(f"{path} is a normsurgeon recipe directory: load it with normsurgeon.load() "
                                   "(or api.load(), as the commands do)")
        if not (path / "config.json").is_file():
            raise NormSurgeonError(f"{path} is a directory without config.json: not a transformers model directory")
        return _load_transformers(path, batch)
    if path.exists():
        if weights is not None:
            raise NormSurgeonError("`weights` goes with a package.module:factory spec, not with a model file")
        suffix = path.suffix.lower()
        if suffix == ".pt2":
            return _load_pt2(path, trust)
        if suffix in (".pt", ".pth", ".bin", ".ckpt"):
            return _load_pickle_file(path, trust)
        if suffix == ".safetensors":
            raise NormSurgeonError(
                f"{path} holds only weights: pass the architecture as package.module:factory with `weights={path}`")
        raise NormSurgeonError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected a transformers "
                               "directory, .pt2, .pt/.pth or package.module:factory")
    if ":" in text and not os.sep in text.split(":", 1)[0]:
        return _load_factory(text, weights)
    raise NormSurgeonError(f"{text}: no such file or directory")


def read_hf_config(path: Path) -> tuple[Any, type | None]:
    """A transformers directory's config, read as data (no remote code, the hub offline, built-in
    attention only), and the model class its ``architectures`` names if transformers itself has it
    (else None: never a class from the directory)."""
    try:
        import transformers
    except ImportError:
        raise NormSurgeonError("loading a transformers directory needs the 'transformers' package") from None
    try:
        with hub_offline():
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}/config.json: cannot read config: {one_line(e)}") from e
    try:  # the file as written: sub-model configs may name their own attention
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    check_config_attention({"attn_implementation": getattr(config, "_attn_implementation", None), "file": raw},
                           f"{path}/config.json")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, str(arch), None) if arch else None
    return config, cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def _load_transformers(path: Path, batch: int) -> LoadedModel:
    import transformers

    config, cls = read_hf_config(path)
    cls = cls or transformers.AutoModel
    try:
        with hub_offline():
            model = cls.from_pretrained(path, config=config, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: cannot load weights: {one_line(e)}") from e
    prepare_hf_model(model)
    file_tensors.register(model, path)  # an in-place rewrite's undo reads replaced weights back from here
    return LoadedModel(model.eval(), inputs_from_hf_config(config, batch=batch), "transformers", path)


def prepare_hf_model(model: torch.nn.Module) -> None:
    """Make a transformers model capturable: no KV cache objects in its outputs."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


class ExportedModel(torch.nn.Module):
    """A program loaded from a ``.pt2`` archive, callable like the model it was exported from.

    Its train/eval behaviour was fixed when it was exported and its graph module refuses
    ``train()``/``eval()``, so this wrapper records the flag without passing it on. Its norms are
    functional ops on lifted weights: inspect and export see them, convert cannot edit them, and fold
    rewrites the program itself (``LoadedModel.program``).
    """

    def __init__(self, program: torch.nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self


def _load_pt2(path: Path, trust: bool) -> LoadedModel:
    from .pt2_check import check_archive

    with open(path, "rb") as fh:  # one open file: what was checked is what torch reads
        report = check_archive(fh, str(path))
        if report.needs_trust and not trust:
            more = f" (and {len(report.needs_trust) - 1} more such part(s))" if len(report.needs_trust) > 1 else ""
            raise NormSurgeonError(
                f"{path}: {report.needs_trust[0]}{more}; loading this archive would run code from the file, so it is "
                "loaded only with `trust=True` (pass it if you trust where the file came from)")
        # An output type (a transformers ModelOutput, say) registers itself as a pytree node when its module
        # is imported; the archive names it. Only transformers' own modules are imported without trust.
        for module in sorted(report.pytree_modules | (report.foreign_modules if trust else set())):
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"{path}: cannot import {module}, which defines a type of the program's "
                                       f"inputs or outputs: {one_line(e)}{cwd_hint(module)}") from e
        fh.seek(0)
        try:
            with quiet_torch():
                ep = torch.export.load(fh)
        except Exception as e:  # noqa: BLE001
            raise NormSurgeonError(f"{path}: not a readable torch.export archive: {one_line(e)}") from e
    return LoadedModel(program_module(ep), program_inputs(ep), "pt2", path, ep)


def program_module(ep: torch.export.ExportedProgram) -> ExportedModel:
    """``ep`` as a callable module (train()/eval() are no-ops: the program's mode is fixed)."""
    return ExportedModel(ep.module())


def program_inputs(ep: torch.export.ExportedProgram, seed: int = 0) -> CallArgs:
    """Example inputs for ``ep``: the ones saved with it, else random ones shaped like its input
    placeholders (dynamic sizes at their example values)."""
    from torch.export.graph_signature import InputKind

    from .graph.capture import size_hint

    if getattr(ep, "example_inputs", None) is not None:
        args, kwargs = ep.example_inputs
        return CallArgs(tuple(args), dict(kwargs))
    gen = torch.Generator().manual_seed(seed)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    flat = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        val = placeholders[spec.arg.name].meta.get("val") if hasattr(spec.arg, "name") else None
        if not isinstance(val, torch.Tensor):
            flat.append(getattr(spec.arg, "value", val))
            continue
        shape = [size_hint(d) or 2 for d in val.shape]
        if val.dtype.is_floating_point:
            flat.append(torch.randn(shape, generator=gen).to(val.dtype))
        elif val.dtype == torch.bool:
            flat.append(torch.ones(shape, dtype=torch.bool))
        else:
            flat.append(torch.randint(0, 2, shape, generator=gen, dtype=val.dtype))
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return CallArgs(tuple(args), dict(kwargs))


def _load_pickle_file(path: Path, trust: bool) -> LoadedModel:
    if not _looks_like_torch_file(path):
        raise NormSurgeonError(f"{path}: not a torch file (neither a torch.save zip archive nor a pickle)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise NormSurgeonError(
                f"{path} holds a pickled model; unpickling runs code from the file, so it is loaded only with "
                "`trust=True` (pass it if you trust where the file came from)") from e
        obj = _unpickle(path)
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise NormSurgeonError(f"{path}: not a readable torch file: {one_line(e)}") from e
    if isinstance(obj, torch.nn.Module):
        return LoadedModel(obj.eval(), getattr_inputs(obj), "pickle", path)
    if isinstance(obj, dict) and _tensor_dict(obj):
        raise NormSurgeonError(
            f"{path} holds a state dict ({len(obj)} tensors), not a model: pass the architecture as "
            f"package.module:factory with `weights={path}`")
    raise NormSurgeonError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _looks_like_torch_file(path: Path) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # pickle protocol 2+ (torch's legacy format)


def _unpickle(path: Path) -> Any:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as e:
        raise NormSurgeonError(f"{path}: the pickle needs code that is not importable ({one_line(e)}); "
                               "add `imports=MODULE` for the module that defines it") from e
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: cannot unpickle: {one_line(e)}") from e
    if isinstance(obj, torch.nn.Module):
        prepare_hf_model(obj)
    return obj


def _tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def getattr_inputs(model: torch.nn.Module) -> CallArgs | None:
    """Inputs a model carries itself: ``example_inputs`` attribute/method, or a transformers config."""
    ex = getattr(model, "example_inputs", None)
    if callable(ex):
        ex = ex()
    if ex is not None:
        return as_call_args(ex)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return inputs_from_hf_config(config)
    return None


def _load_factory(spec: str, weights: str | os.PathLike | None) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001
        hint = cwd_hint(mod_name) if isinstance(e, ModuleNotFoundError) else ""
        raise NormSurgeonError(f"{spec}: cannot import {mod_name}: {one_line(e)}{hint}") from e
    factory: Callable | None = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        known = f"; the built-in models are {', '.join(module.MODELS)}" if mod_name == "normsurgeon.zoo" else ""
        raise NormSurgeonError(f"{spec}: {mod_name} has no callable {attr!r}{known}")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{spec}: the factory raised {one_line(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise NormSurgeonError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    prepare_hf_model(model)
    return LoadedModel(model.eval(), getattr_inputs(model), "factory", None)


def load_weights(model: torch.nn.Module, weights: str | os.PathLike) -> None:
    path = Path(weights)
    if not path.is_file():
        raise NormSurgeonError(f"`weights` {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"`weights` {path}: cannot read: {one_line(e)}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not _tensor_dict(state):
        raise NormSurgeonError(f"`weights` {path}: not a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise NormSurgeonError(f"`weights` {path} does not fit the model: {one_line(e)}") from e


# Saving lives in normsurgeon.saving; these names stay importable from here for user scripts.
from .saving import atomic_write, check_output_path, check_picklable, check_program_output, save_model  # noqa: E402,F401

__all__ = ["load_model", "LoadedModel", "ExportedModel", "import_modules", "read_hf_config", "prepare_hf_model",
           "program_module", "program_inputs", "getattr_inputs", "load_weights",
           # re-exported from saving
           "atomic_write", "check_output_path", "check_picklable", "check_program_output", "save_model"]
