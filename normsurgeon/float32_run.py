"""A float16/bfloat16 model's forward pass computed in float32, without a float32 copy of the model:
the reference its function-preserving rewrites are judged against (``verify.References``).

A ``TorchFunctionMode`` reads every low-precision operand as a float32 copy (a linear's weight goes into
a reused buffer, a large one a block of rows at a time, and is applied by oneDNN's linear where torch has
it; an embedding gathers its rows first) and every
low-precision dtype argument as float32, and refuses
(``NotFloat32``) what would not be a float32 run: a write into the model's own tensors, a reinterpreting
``view(dtype)``, outputs still in low precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .inputs import CallArgs

LOW_PRECISION = (torch.float16, torch.bfloat16)


def low_precision_dtypes(model: nn.Module) -> list[torch.dtype]:
    """The float16/bfloat16 dtypes among ``model``'s floating parameters and buffers."""
    return sorted({t.dtype for t in (*model.parameters(), *model.buffers()) if t.dtype in LOW_PRECISION}, key=str)


class _Float32Mode(TorchFunctionMode):
    """Every torch call computes in float32: float16/bfloat16 operands are read as float32 copies and a
    float16/bfloat16 dtype (an argument, or what ``tensor.dtype`` answers) reads as float32, so code that
    casts to its weights' dtype (``x.to(self.proj.weight.dtype)``, ``softmax(...).to(q.dtype)``) stays in
    float32 too. The model's own tensors are never written: a write into one raises instead (its float32
    copy would take the write and the forward would read stale values)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # an attribute (.dtype, .shape, .device): read it, never upcast the tensor for it
            if getattr(getattr(func, "__self__", None), "__name__", "") == "data" and args and _is_low(args[0]):
                # the tensor itself: ops that read it upcast it, and one that writes into it
                # (``w.data.clamp_()``) is refused below instead of writing into a copy
                return func(*args, **kwargs)
            return tree_map(_to_float32, func(*args, **kwargs))
        inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
        if (inplace and args and _is_low(args[0])) or _is_low(kwargs.get("out")):
            raise NotFloat32(f"{name} writes into a {dtype_name((args[0] if inplace else kwargs['out']).dtype)} tensor")
        if name in ("detach", "detach_") and args and _is_low(args[0]):
            # the model's tensor itself, as ``.data`` above: a write into it is then refused, not lost
            return func(*args, **kwargs)
        if name == "__set__" and args and _is_low(args[0]):  # ``w.data = ...``: the copy would take it
            what = getattr(getattr(func, "__self__", None), "__name__", "an attribute")
            raise NotFloat32(f"sets .{what} of a {dtype_name(args[0].dtype)} tensor")
        if name == "view" and args and _is_low(args[0]) and any(isinstance(a, torch.dtype) for a in args[1:]):
            raise NotFloat32(f"view reinterprets the bits of a {dtype_name(args[0].dtype)} tensor")
        if func is F.embedding and _gathers_only(args, kwargs):
            # the rows, then their upcast: the same values as gathering from a float32 copy of the table
            return _to_float32(func(*args, **kwargs))
        if func is F.linear and kwargs:  # ``F.linear(x, weight=w, bias=b)``: as the positional call
            bound = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
            if bound.keys() <= {"input", "weight", "bias"} and {"input", "weight"} <= bound.keys():
                args, kwargs = (bound["input"], bound["weight"], bound.get("bias")), {}
        if func is F.linear and not kwargs and 2 <= len(args) <= 3 and _is_low(args[1]) and args[1].dim() == 2:
            if args[1].numel() * 4 > ROWS_BYTES:
                return self._linear_by_rows(*args)
            x, w, b = (*args, None)[:3]
            return _linear32(_to_float32(x), self._scratch(1, w), _to_float32(b))
        if func in _READS_WEIGHTS:
            args = tuple(self._scratch(i, a) for i, a in enumerate(args))
        return tree_map(_to_float32, func(*tree_map(_to_float32, args), **tree_map(_to_float32, kwargs)))

    def _linear_by_rows(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``linear`` with a large low-precision weight, upcast ``ROWS_BYTES`` of output rows at a time
        into one reused buffer: a float32 copy of a whole vocabulary head (32000 × 2048: 262 MB) was
        most of what a float32 reference added to a 1.1B model's peak memory."""
        x, b = _to_float32(x), _to_float32(b)
        n, k = w.shape
        step = max(1, ROWS_BYTES // (4 * k))
        key = ("rows", step, k, w.device)
        buf = self._pool.get(key)
        if buf is None:
            buf = self._pool[key] = torch.empty(step, k, dtype=torch.float32, device=w.device)
        out = torch.empty((*x.shape[:-1], n), dtype=torch.float32, device=x.device)
        for i in range(0, n, step):
            r = min(step, n - i)
            out[..., i:i + r] = _linear32(x, buf[:r].copy_(w[i:i + r]), None if b is None else b[i:i + r])
        return out

    def _scratch(self, i: int, t: Any) -> Any:
        """A weight's float32 copy in a buffer reused by the next weight of its shape: a large model's
        fresh copies cost more in page faults than in converting (a third of a float32 forward)."""
        if not _is_low(t):
            return t
        key = (i, t.shape, t.device)
        buf = self._pool.get(key)
        if buf is None:
            buf = self._pool[key] = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        return buf.copy_(t)

    def __enter__(self):
        self._pool: dict[tuple, torch.Tensor] = {}
        return super().__enter__()

    def __exit__(self, *exc):
        self._pool = {}
        return super().__exit__(*exc)


def _linear32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of float32 operands, through oneDNN's linear on a CPU where torch has it: for the few
    rows of a verification input it took 0.30-0.55 ns a weight against 0.53-0.82 for ``F.linear``'s MKL
    GEMM (a 5632 × 2048 weight in 4 MiB blocks, 12 and 32 rows, two threads), the same float32 sums in
    another order. Only with float32 matmuls at full precision: at "medium" oneDNN may round operands to
    bf16, and the reference must not. Not where autograd records (a forward that turns grad on itself)."""
    if (_ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dim() >= 2 and x.numel()
            and x.dtype == w.dtype == torch.float32 and (b is None or b.dtype == torch.float32)
            and torch.get_float32_matmul_precision() == "highest"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):  # it has no backward
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


_ONEDNN_LINEAR = (getattr(torch.ops.mkldnn, "_linear_pointwise", None)
                  if torch.backends.mkldnn.is_available() else None)


# ops whose result never aliases their operands (no view of the weight lives on after the call)
_READS_WEIGHTS = {F.linear, F.embedding}
# a low-precision linear weight larger than this in float32 is upcast a block of rows at a time: 4 MiB
# blocks stay in cache between the upcast and the matmul that reads them (a 1.1B model's float32
# forward: 0.85 s against 1.02 s with 32 MiB blocks; 0.5 MiB blocks were twice as slow, too many calls)
ROWS_BYTES = 4 * 2**20


def _gathers_only(args: tuple, kwargs: dict) -> bool:
    """An ``embedding`` call that only gathers rows (no ``max_norm``, which renormalizes the table in
    place) from a low-precision table with integer indices."""
    max_norm = args[3] if len(args) > 3 else kwargs.get("max_norm")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    index = args[0] if args else kwargs.get("input")
    return max_norm is None and _is_low(weight) and isinstance(index, torch.Tensor) and not index.is_floating_point()


_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                    "__imatmul__"}


def _is_low(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION


def _to_float32(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return torch.float32 if v in LOW_PRECISION else v
    return v.float() if _is_low(v) else v


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_float32(model: nn.Module, ci: CallArgs, *, eval_mode: bool = False) -> list[torch.Tensor]:
    """``run_clean`` computing in float32 (``_Float32Mode``) without a float32 copy of the model: each
    float16/bfloat16 weight is upcast where an op reads it and dropped after, the model's own tensors
    are never written (its state stays bit for bit). Raises where that is not a float32 run: an op
    writing in place into a low-precision tensor (its copy would take the write), or a floating output
    that still comes back in float16/bfloat16."""
    from .verify import run_clean  # verify builds its references with this module

    up = CallArgs(tuple(tree_map(_to_float32, ci.args)), {k: tree_map(_to_float32, v) for k, v in ci.kwargs.items()})
    held = _tensors_held(model)
    try:
        with _Float32Mode():
            out = run_clean(model, up, eval_mode=eval_mode)
    finally:
        _put_back(model, held)
    low = sorted({dtype_name(o.dtype) for o in out if o.dtype in LOW_PRECISION})
    if low:
        raise NotFloat32(f"outputs still came back in {', '.join(low)}")
    return out


_OWN_DICTS = ("_parameters", "_buffers", "_modules")


def _tensors_held(model: nn.Module) -> list[tuple[nn.Module, list[dict], dict]]:
    """Every module's parameters, buffers, children and attributes, as objects."""
    return [(m, [dict(getattr(m, d)) for d in _OWN_DICTS], dict(vars(m))) for m in model.modules()]


def _put_back(model: nn.Module, held: list[tuple[nn.Module, list[dict], dict]]) -> None:
    """Undo what a float32 run stored on the modules: code like ``if self.cache.dtype != x.dtype:
    self.cache = self.cache.to(x.dtype)`` saw float32 there and would leave the model a float32 buffer
    (its later outputs, and what is saved, would change); a table or a submodule made on the first call
    would stay float32. Every module's attributes, parameters, buffers and children are put back as
    they were, objects and all (what the run added goes). A cache filled in place (``self.cache[k] = t``
    into a dict the module already had) is not seen."""
    for m, stores, attrs in held:
        for d, before in zip(_OWN_DICTS, stores):
            store = getattr(m, d)
            if store.keys() != before.keys() or any(store[k] is not v for k, v in before.items()):
                store.clear()
                store.update(before)
        now = vars(m)
        for k in [k for k in now if k not in attrs]:
            del now[k]
        for k, v in attrs.items():
            if k not in now or now[k] is not v:
                now[k] = v


class NotFloat32(RuntimeError):
    """A float32 run that did not compute in float32."""
