"""What loading trusts: which code a model file may make the tool run, and where user code may come from.

Loading runs no code the user did not ask for. A model *file* (recipe directory, ``.pt2``,
transformers directory) is data: it may name only what the tool builds without importing user code
(a transformers class, the tool's own zoo, built-in attention). Code is run only where the user
said so: a ``package.module:factory`` they typed, ``imports`` (``--import``), or ``trust=True``
(``--trust``). The working directory is importable only in those cases, and only for that call.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Iterator, Sequence

from .errors import NormSurgeonError

ZOO_PREFIX = "normsurgeon.zoo:"

# Attention kernels transformers ships in its own code (torch ops). Anything else is a kernel from the
# Hugging Face hub ("org/repo"), or a flash-attention name transformers may satisfy from the hub
# when the package is missing: both fetch and run code.
BUILTIN_ATTENTION = ("eager", "sdpa", "flex_attention")

_TRUST_HINT = "pass `trust=True` if you trust where it came from"


@contextlib.contextmanager
def user_code(*, trust: bool = False, imports: Sequence[str] = ()) -> Iterator[None]:
    """Import ``imports`` and keep the working directory importable for the body, only when the user
    asked for user code (``imports`` or ``trust``); ``sys.path`` is restored afterwards."""
    added = None
    if trust or imports:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
            added = cwd
    try:
        for name in imports:
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
                raise NormSurgeonError(f"`imports={name}`: {type(e).__name__}: {e}") from e
        yield
    finally:
        if added is not None:
            with contextlib.suppress(ValueError):
                sys.path.remove(added)


def cwd_hint(module: str) -> str:
    """Why ``module`` may not import although the user sees it: it sits in the working directory."""
    top = module.split(".", 1)[0]
    if os.path.isfile(f"{top}.py") or os.path.isfile(os.path.join(top, "__init__.py")):
        return (f" ({top} is in the working directory, which is importable only with `imports={top}` or `trust=True`, "
                "imports=/trust= in Python)")
    return ""


def zoo_name(spec: str) -> str | None:
    """The zoo model a ``normsurgeon.zoo:NAME`` spec names (None for any other spec)."""
    from .zoo import MODELS

    if spec.startswith(ZOO_PREFIX) and spec[len(ZOO_PREFIX):] in MODELS:
        return spec[len(ZOO_PREFIX):]
    return None


def check_recipe_factory(spec: object, where: str, *, trust: bool) -> None:
    """A recipe's factory base runs code it names: only the zoo is built without trust."""
    if trust or (isinstance(spec, str) and zoo_name(spec) is not None):
        return
    mod = str(spec).partition(":")[0]
    raise NormSurgeonError(
        f"{where}: the base is the factory {spec!r}: building it would import {mod} and call it, running code the "
        f"recipe names; without trust a recipe may name only a transformers class or normsurgeon.zoo:NAME: "
        f"{_TRUST_HINT}")


def _installed_flash_attention(name: object) -> bool:
    """``flash_attention_N`` whose package is installed: transformers runs it, nothing is fetched (when
    it is missing, transformers would fetch a replacement kernel from the hub)."""
    try:
        import transformers.utils as tu
    except ImportError:  # pragma: no cover
        return False
    check = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}
    fn = getattr(tu, check.get(str(name), ""), None)
    return bool(fn is not None and fn())


def check_attention(value: object, where: str) -> None:
    """``value`` (an ``attn_implementation``, or a dict of them per sub-model) names built-in attention
    only (or an installed flash-attention package): never a kernel from the hub."""
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if v is not None and v not in BUILTIN_ATTENTION and not _installed_flash_attention(v):
            raise NormSurgeonError(
                f"{where}: attn_implementation {v!r} is not built into transformers (a hub kernel, or a "
                f"flash-attention package that is not installed, which transformers would fetch from the Hugging "
                f"Face hub); normsurgeon loads with {', '.join(BUILTIN_ATTENTION)} (or an installed flash-attention) "
                "only: set one of them")


def check_config_attention(config: object, where: str) -> None:
    """Every attention setting in a (nested) config dict is built-in."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k in ("attn_implementation", "_attn_implementation", "_attn_implementation_internal"):
                check_attention(v, f"{where} {k}")
            else:
                check_config_attention(v, where)
    elif isinstance(config, list):
        for v in config:
            check_config_attention(v, where)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face hub is offline for the body, whatever the environment says: no request is
    made, a missing file is an error (restored afterwards)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
