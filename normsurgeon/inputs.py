"""Example inputs: how a model is called, and where the tensors come from.

An example input is stored as ``CallArgs`` (positional + keyword tensors) so that every pass calls
the model the same way, whether it takes ``x`` or ``pixel_values=`` or ``input_ids=``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .errors import NormSurgeonError

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
}


@dataclass
class CallArgs:
    """Positional and keyword arguments for one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    #: the forward parameters the positional args bind to (``named_after``): the names files use for them
    arg_names: tuple = ()

    def call(self, model: torch.nn.Module):
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor)]

    def names(self) -> list[str]:
        """Names for exported graph inputs, positional ones first."""
        return [f"input_{i}" for i in range(len(self.args))] + list(self.kwargs)

    def file_names(self) -> list[str]:
        """Names for input files (``--inputs``, calibration data): a positional input by the forward
        parameter it binds to (``pixel_values``, ``x``) when known, else as ``names()``."""
        if len(self.arg_names) == len(self.args):
            return [*self.arg_names, *self.kwargs]
        return self.names()

    def aliases(self) -> dict[str, str]:
        """Another name a file may give an input -> its ``names()`` name (``pixel_values`` -> ``input_0``)."""
        return {f: n for f, n in zip(self.file_names(), self.names()) if f != n}

    def to(self, device=None, dtype=None) -> "CallArgs":
        def conv(t):
            if not isinstance(t, torch.Tensor):
                return t
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)
        return CallArgs(tuple(conv(a) for a in self.args), {k: conv(v) for k, v in self.kwargs.items()},
                        self.arg_names)

    def like(self, generator: torch.Generator | None = None, batch: int | None = None,
             seq: int | None = None, seq_dims: Mapping[str, int] | None = None) -> "CallArgs":
        """Fresh random tensors with the same shapes/dtypes (optionally another batch/sequence size).

        Integer tensors (token ids) are drawn below their observed maximum so they stay valid ids.
        ``seq_dims`` maps an input name to its sequence axis, used when ``seq`` is given.
        """
        names = self.names()
        values = [*self.args, *self.kwargs.values()]
        out = []
        for name, t in zip(names, values):
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            shape = list(t.shape)
            if batch is not None and shape:
                shape[0] = batch
            if seq is not None and seq_dims and name in seq_dims:
                shape[seq_dims[name]] = seq
            out.append(random_like(t, shape, generator))
        n = len(self.args)
        return CallArgs(tuple(out[:n]), dict(zip(names[n:], out[n:])), self.arg_names)


def named_after(ci: CallArgs, model: torch.nn.Module) -> CallArgs:
    """``ci`` with its positional inputs named after the parameters of ``model.forward`` they bind to,
    so a file that stores ``{"pixel_values": ...}`` fits inputs given by shape (``input_0``)."""
    import inspect

    if not ci.args or ci.arg_names:
        return ci
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return ci
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    if len(names) < len(ci.args) or set(names[:len(ci.args)]) & set(ci.kwargs):
        return ci
    return CallArgs(ci.args, ci.kwargs, tuple(names[:len(ci.args)]))


def rename_inputs(obj: Mapping, ci: CallArgs) -> dict:
    """A file's tensors by name, the forward-parameter names of positional inputs mapped to ``names()``."""
    aliases = ci.aliases()
    return {aliases.get(k, k): v for k, v in obj.items()}


def random_like(t: torch.Tensor, shape: Sequence[int], generator: torch.Generator | None = None):
    if t.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(t.dtype)
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    high = int(t.max().item()) + 1 if t.numel() else 2
    if t.min().item() >= 0 and high <= 2:
        # attention masks and other 0/1 tensors: keep every position valid.
        return torch.ones(shape, dtype=t.dtype)
    return torch.randint(0, max(high, 2), shape, generator=generator, dtype=t.dtype)


def as_call_args(example_inputs: Any) -> CallArgs:
    """Accept a tensor, a tuple/list of tensors, a dict of keyword tensors, or a CallArgs."""
    if example_inputs is None:
        raise NormSurgeonError("example inputs are required here")
    if isinstance(example_inputs, CallArgs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return CallArgs((example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        return CallArgs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return CallArgs(tuple(example_inputs), {})
    raise NormSurgeonError(
        f"example inputs must be a tensor, a tuple of tensors or a dict of tensors, not {type(example_inputs).__name__}")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise NormSurgeonError(f"unknown dtype {name!r}; use one of {', '.join(sorted(set(_DTYPES)))}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' -> (1, 3, 224, 224)."""
    parts = re.split(r"[,x]", text.strip())
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise NormSurgeonError(f"bad `input_shapes` entry {text!r}: expected integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise NormSurgeonError(f"bad `input_shapes` entry {text!r}: every size must be a positive integer")
    return shape


def inputs_from_shapes(shapes: Sequence[str | Sequence[int]], dtypes: Sequence[str] = (),
                       seed: int = 0, int_high: Sequence[int | None] = ()) -> CallArgs:
    """Random positional inputs of the given shapes; ``dtypes`` is one per shape or one for all.
    Integer inputs are drawn from [0, ``int_high[i]``) (default 100; see ``int_input_bounds``)."""
    gen = torch.Generator().manual_seed(seed)
    parsed = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    if dtypes and len(dtypes) not in (1, len(parsed)):
        raise NormSurgeonError(f"got {len(dtypes)} `input_dtypes` values for {len(parsed)} `input_shapes` values")
    tensors = []
    for i, shape in enumerate(parsed):
        dtype = parse_dtype(dtypes[i if len(dtypes) > 1 else 0]) if dtypes else torch.float32
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            high = int_high[i] if i < len(int_high) and int_high[i] else 100
            tensors.append(torch.randint(0, high, shape, generator=gen, dtype=dtype))
    return CallArgs(tuple(tensors), {})


def inputs_from_hf_config(config: Any, batch: int = 2, seed: int = 0) -> CallArgs | None:
    """Derive inputs for a transformers model from its config: pixel_values, input_ids or input_values."""
    gen = torch.Generator().manual_seed(seed)
    model_type = getattr(config, "model_type", "")
    if hasattr(config, "num_channels") and hasattr(config, "image_size"):
        size = config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return CallArgs((), {"pixel_values": torch.randn(batch, config.num_channels, *size, generator=gen)})
    if "wav2vec" in model_type or "hubert" in model_type or hasattr(config, "conv_kernel"):
        return CallArgs((), {"input_values": torch.randn(batch, 1600, generator=gen)})
    if hasattr(config, "num_channels"):  # image models without image_size (ResNet, RegNet, ...)
        return CallArgs((), {"pixel_values": torch.randn(batch, config.num_channels, 64, 64, generator=gen)})
    if hasattr(config, "vocab_size"):
        seq = min(16, getattr(config, "max_position_embeddings", 16) or 16)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        return CallArgs((), {"input_ids": ids})
    return None


def int_input_bounds(model: torch.nn.Module, ci: CallArgs) -> dict[str, int]:
    """For each integer input (by ``CallArgs.names()``), the number of valid ids: ``num_embeddings`` of
    the ``nn.Embedding`` that consumes it (found by running the model once with the ids clamped into
    every embedding's range), else the config's ``vocab_size``. Inputs neither bounds are left out."""
    values = [*ci.args, *ci.kwargs.values()]
    named = {n: t for n, t in zip(ci.names(), values)
             if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool and t.numel()}
    if not named:
        return {}
    by_storage = {t.untyped_storage().data_ptr(): n for n, t in named.items()}
    bounds: dict[str, int] = {}

    def hook(module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.is_floating_point():
            return None
        name = by_storage.get(x.untyped_storage().data_ptr())
        if name is not None:
            bounds[name] = min(bounds.get(name, module.num_embeddings), module.num_embeddings)
        return (x.clamp(0, module.num_embeddings - 1), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ci.call(model)
    except Exception:  # noqa: BLE001 - the ids seen before a failure are what we wanted
        pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        for n in named:
            bounds.setdefault(n, vocab)
    return bounds
