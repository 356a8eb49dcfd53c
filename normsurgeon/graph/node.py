"""The graph view every pass reads: ``GNode`` (one op), ``ModelGraph`` (the captured model).

Whatever captured the model (``torch.export``, ``torch.fx``, per child), its nodes become ``GNode``s
with a canonical ``op`` name (the aten op name without overload), the path of the innermost module
that ran them and a ``call_key`` telling calls of the same module apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn


@dataclass(eq=False)
class GNode:
    """One operation of the captured graph."""

    name: str
    op: str  # canonical op name; "input", "param", "output" for the graph's boundary
    target: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module_path: str | None = None  # innermost module that ran this op ("" for the root)
    call_key: str | None = None  # distinguishes calls of the same module
    module_stack: list[tuple[str, str]] = field(default_factory=list)  # (path, class name), outer → inner
    shape: tuple | None = None
    dtype: torch.dtype | None = None
    param: str | None = None  # "param" nodes: qualified name of the parameter or buffer
    users: list["GNode"] = field(default_factory=list)
    leaf_module: bool = False  # FX call_module: the module ran as one node

    @property
    def inputs(self) -> list["GNode"]:
        return [a for a in flat(self.args) if isinstance(a, GNode)] + \
            [a for a in flat(tuple(self.kwargs.values())) if isinstance(a, GNode)]

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def __repr__(self) -> str:
        return f"GNode({self.name}: {self.op} @ {self.module_path!r})"


@dataclass
class CapturedPart:
    path: str  # "" for the whole model
    method: str  # export | fx | failed
    error: str | None = None


@dataclass
class ModelGraph:
    """The captured dataflow of ``model`` (or of the parts of it that could be captured)."""

    model: nn.Module
    method: str  # export | fx | per-child
    nodes: list[GNode]
    parts: list[CapturedPart]
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (method, why it failed)
    notes: list[str] = field(default_factory=list)  # how the method was used (blocks traced once)

    def __post_init__(self) -> None:
        self._modules = dict(self.model.named_modules(remove_duplicate=False))
        self._paths_of = paths_by_module(self._modules)

    @property
    def has_shapes(self) -> bool:
        return any(n.shape is not None for n in self.nodes)

    def module(self, path: str | None) -> nn.Module | None:
        if path is None:
            return None
        return self._modules.get(path)

    def aliases(self, module: nn.Module | None) -> list[str]:
        """Every path ``module`` is registered under (more than one: the object is shared)."""
        return self._paths_of.get(id(module), []) if module is not None else []

    def module_of(self, node: GNode) -> nn.Module | None:
        return self.module(node.module_path)

    def ops(self, *names: str) -> Iterator[GNode]:
        wanted = set(names)
        return (n for n in self.nodes if n.op in wanted)

    def calls(self, path: str) -> set[str]:
        """Distinct call keys of the module at ``path`` (more than one: the module is shared)."""
        return {n.call_key for n in self.nodes if n.module_path == path and n.call_key is not None}

    def failed_parts(self) -> list[CapturedPart]:
        return [p for p in self.parts if p.method == "failed"]

    def describe(self) -> str:
        if self.method == "per-child":
            ok = sum(p.method != "failed" for p in self.parts)
            return f"per-child ({ok} parts captured, {len(self.failed_parts())} failed)"
        return f"{self.method} ({'; '.join(self.notes)})" if self.notes else self.method


def flat(xs: Any) -> Iterator[Any]:
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from flat(x)
        elif isinstance(x, dict):
            yield from flat(tuple(x.values()))
        else:
            yield x


def paths_by_module(modules: dict[str, nn.Module]) -> dict[int, list[str]]:
    """id(module) -> every path it is registered under, from ``named_modules(remove_duplicate=False)``."""
    out: dict[int, list[str]] = {}
    for path, m in modules.items():
        out.setdefault(id(m), []).append(path)
    return out
