"""Capture a run of identical blocks once: trace a model whose block lists are shortened, then copy
the traced block's nodes for the blocks that were left out.

``torch.export`` traces op by op, so a 22-layer decoder costs 22 times one layer. A list of blocks
that are the same module (``find_runs``: same classes, parameter names/shapes/dtypes, buffer values,
``extra_repr`` and plain attributes, except an int that steps with the block's index such as
transformers' ``layer_idx``) is shortened to its first two blocks and its last one while the model is
exported (``shortened``); ``expand`` then checks the traced graph and rebuilds the full one:

- block 0 against block 1, and block 1 against the last block: the same ops, targets, literal
  arguments, shapes, dtypes and module paths relative to the block, each reading the same nodes
  outside the blocks and the previous block at the same positions. Comparing three blocks catches a
  forward that branches on the layer's index at the first or the last layer;
- block 1's nodes are copied for blocks 2 … N-2 (names, module paths, call keys and parameter names
  re-indexed; a read of the previous block goes to the previous copy), the last block is re-indexed
  from its position in the short list to N-1, and new ``param`` nodes take each block's tensors.

Anything that does not fit raises ``NotRepeatable``; the caller then exports the whole model. What
blocks 2 … N-2 would have traced is not seen: the structural identity of their modules stands in for
it, which is why the caller uses this only where a whole export costs seconds (or when told to).
"""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn

from .node import GNode

MIN_BLOCKS = 4  # three are traced: a shorter run saves nothing
_KEPT = 3  # blocks 0, 1 and the last one
_SCALARS = (bool, int, float, str, type(None))
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks")


# what every nn.Module keeps in its __dict__ (tensors, children, hooks: compared above or refused);
# any other attribute, private ones too (``self._act = i == 2``), must agree between the blocks
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


class NotRepeatable(Exception):
    """The traced blocks do not prove that copying one of them gives the whole model's graph."""


@dataclass
class Run:
    """A list of ``n`` identical blocks at ``path`` (a ``ModuleList`` child ``name`` of ``parent``)."""

    path: str
    parent: nn.Module
    name: str
    blocks: nn.ModuleList

    @property
    def n(self) -> int:
        return len(self.blocks)

    def note(self) -> str:
        return (f"{_KEPT} of {self.n} blocks of {self.path} traced (0, 1, {self.n - 1}), "
                f"{self.n - _KEPT} repeated from {self.path}.1")


# --- which lists repeat --------------------------------------------------------------------------

def find_runs(model: nn.Module) -> list[Run]:
    """Every outermost ``ModuleList`` of ``MIN_BLOCKS`` or more structurally identical blocks whose
    tensors no other module shares, unless a list as long in the model's config differs per layer."""
    owners: dict[int, int] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        owners[id(t)] = owners.get(id(t), 0) + 1
    module_uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        module_uses[id(m)] = module_uses.get(id(m), 0) + 1
    varying = _per_layer_lengths(model)
    runs: list[Run] = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < MIN_BLOCKS or not path or len(m) in varying:
            continue
        if any(path.startswith(r.path + ".") for r in runs):
            continue  # inside a block of a run: copied with it
        if _identical(list(m), owners, module_uses):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            if parent._modules.get(name) is m:
                runs.append(Run(path, parent, name, m))
    return runs


def _per_layer_lengths(model: nn.Module) -> set[int]:
    """Lengths of the lists in the model's configs that differ from item to item (``layer_types``,
    ``no_rope_layers``...): a loop may pick each layer's behaviour from one by the layer's position,
    which the blocks' own attributes would not show."""
    out = set()
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for config in configs.values():
        try:
            items = vars(config).values()
        except TypeError:
            continue
        for v in items:
            if isinstance(v, (list, tuple)) and len(v) >= MIN_BLOCKS and any(repr(x) != repr(v[0]) for x in v):
                out.add(len(v))
    return out


def _identical(blocks: list[nn.Module], owners: dict[int, int], module_uses: dict[int, int]) -> bool:
    sigs = []
    for b in blocks:
        if any(module_uses[id(m)] != 1 for m in b.modules()):
            return False  # a module shared with another block or registered twice
        if any(owners[id(t)] != 1 for t in [*b.parameters(), *b.buffers()]):
            return False  # a tied tensor: the graph reads it once
        if any(getattr(m, h, None) for m in b.modules() for h in _HOOKS):
            return False  # hooks cannot be compared; one block's hook would change its forward alone
        sigs.append(_signature(b))
    first = sigs[0]
    if any(s[0] != first[0] for s in sigs[1:]):
        return False
    if not all(_same_values(first[1], s[1]) for s in sigs[1:]):
        return False
    return _attributes_agree([s[2] for s in sigs])


def _signature(block: nn.Module) -> tuple[tuple, list, dict]:
    """(structure, tensor values to compare, plain attributes by (module, name))."""
    structure, values, attrs = [], [], {}
    for rel, m in block.named_modules():
        structure.append(("module", rel, type(m), m.extra_repr()))
        for name, p in m.named_parameters(recurse=False):
            structure.append(("param", rel, name, tuple(p.shape), p.dtype, p.requires_grad))
        for name, buf in m.named_buffers(recurse=False):
            structure.append(("buffer", rel, name, tuple(buf.shape), buf.dtype,
                              name not in m._non_persistent_buffers_set))
            values.append(buf)
        for name, v in vars(m).items():
            if name in _MODULE_INTERNALS or name == "training":
                continue
            if isinstance(v, torch.Tensor):  # a plain tensor attribute (a cached table): compared by value
                structure.append(("tensor", rel, name, tuple(v.shape), v.dtype))
                values.append(v)
            elif not name.startswith("_") or _plain(v):
                # a private flag (``self._act = i == 2``) is compared like a public one; a private object
                # (transformers' per-module ``_kernel_funcs`` table) is the module's machinery, not its data
                attrs[(rel, name)] = _attribute(v)
    return tuple(structure), values, attrs


@dataclass(frozen=True)
class _Opaque:
    """An attribute that is not plain data (a shared config, a function): equal only to itself."""

    value: Any

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Opaque) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _attribute(v: Any) -> Any:
    if _plain(v):
        return v
    if isinstance(v, functools.partial) and _plain(v.args) and _plain(tuple(v.keywords.values())):
        # an activation built per block (``partial(gelu, approximate="tanh")``): equal when it computes the same
        return ("partial", _Opaque(v.func), v.args, tuple(sorted(v.keywords.items())))
    return _Opaque(v)


def _plain(v: Any) -> bool:
    if isinstance(v, _SCALARS) or isinstance(v, (torch.dtype, torch.device)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return False


def _same_values(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    try:
        return len(a) == len(b) and all(x.device == y.device and torch.equal(x, y) for x, y in zip(a, b))
    except Exception:  # noqa: BLE001 - values that cannot be compared (meta tensors): not the same
        return False


def _attributes_agree(per_block: list[dict]) -> bool:
    """Every block's plain attributes equal block 0's, except an int that steps with the index."""
    keys = per_block[0].keys()
    if any(d.keys() != keys for d in per_block[1:]):
        return False
    for key in keys:
        vals = [d[key] for d in per_block]
        if all(type(v) is type(vals[0]) and v == vals[0] for v in vals):
            continue
        if all(type(v) is int for v in vals):
            step = vals[1] - vals[0]
            if step and all(v == vals[0] + i * step for i, v in enumerate(vals)):
                continue  # layer_idx: its uses in the forward are compared on the traced graph
        return False
    return True


class _ShortList(nn.ModuleList):
    """A run's stand-in while it is exported: iterating it gives blocks 0, 1 and the last. Anything
    that would count the blocks or pick them by position (``len(layers)``, ``layers[i]``,
    ``layers[:split]``) raises ``NotRepeatable``: it would see 3 blocks where the model has N, and the
    graph would be wrong without looking so (a norm between two slices of the list moved after the
    last block; a scale computed from the length). A slice covering all N (Llama's
    ``layers[:num_hidden_layers]``) is the list itself."""

    def __init__(self, blocks: list[nn.Module], n: int) -> None:
        super().__init__(blocks)
        self._full = n

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice) and idx.step in (None, 1) and idx.start in (None, 0) \
                and (idx.stop is None or idx.stop >= self._full):
            return self
        raise NotRepeatable(f"the forward picks blocks of the list by position ([{idx!r}]): it would see "
                            f"{_KEPT} of {self._full}")

    def __len__(self) -> int:
        if "_full" not in self.__dict__:  # ModuleList's own constructor counts what it has added
            return len(self._modules)
        raise NotRepeatable(f"the forward counts the blocks of the list: it would see {_KEPT} of {self._full}")


@contextmanager
def shortened(runs: list[Run]) -> Iterator[None]:
    """Each run's list replaced by one of blocks 0, 1 and the last while the body runs; always restored."""
    try:
        for r in runs:
            short = _ShortList([r.blocks[0], r.blocks[1], r.blocks[r.n - 1]], r.n)
            short.training = r.blocks.training
            r.parent._modules[r.name] = short
        yield
    finally:
        for r in runs:
            r.parent._modules[r.name] = r.blocks


# --- the full graph from the short one -----------------------------------------------------------

def expand(nodes: list[GNode], runs: list[Run]) -> list[GNode]:
    """The graph of the whole model from the export of the shortened one (``users`` left to the
    caller to link). Raises ``NotRepeatable`` with the reason when the traced blocks differ."""
    for r in runs:
        nodes = _expand_run(nodes, r)
    return nodes


def _under(s: str | None, base: str) -> bool:
    return s is not None and (s == base or s.startswith(base + "."))


def _reindex_path(s: str | None, base: str, new: str) -> str | None:
    return new + s[len(base):] if _under(s, base) else s


def _key_pattern(base: str) -> re.Pattern:
    # a call key is torch's module-stack key: "L__self__model.layers.1.mlp", "...@1" for a second call
    return re.compile(re.escape(base) + r"(?=$|[.@])")


def _reindex_key(key: str | None, base: str, new: str) -> str | None:
    return None if key is None else _key_pattern(base).sub(lambda _: new, key, count=1)


class _Segment:
    """The compute nodes of one traced block (position ``pos`` in the short list, index ``index`` in
    the model), contiguous in the graph."""

    def __init__(self, nodes: list[GNode], start: int, end: int, path: str, pos: int, index: int) -> None:
        self.nodes = nodes[start:end]
        self.start, self.end = start, end
        self.base = f"{path}.{pos}"  # as traced
        self.final = f"{path}.{index}"  # as in the model
        self.at = {id(n): i for i, n in enumerate(self.nodes)}


def _segments(nodes: list[GNode], path: str) -> list[_Segment]:
    spans: list[list[int]] = []
    for pos in range(_KEPT):
        idx = [i for i, n in enumerate(nodes) if n.op != "param" and _under(n.module_path, f"{path}.{pos}")]
        if not idx:
            raise NotRepeatable(f"block {path}.{pos} ran no op")
        if idx[-1] - idx[0] + 1 != len(idx):
            raise NotRepeatable(f"the ops of {path}.{pos} are interleaved with others")
        spans.append([idx[0], idx[-1] + 1])
    for a, b in zip(spans, spans[1:]):
        if a[1] != b[0]:
            raise NotRepeatable(f"ops between the blocks of {path} (the loop computes something per block)")
    return spans


def _expand_run(nodes: list[GNode], run: Run) -> list[GNode]:
    path, n = run.path, run.n
    spans = _segments(nodes, path)
    segs = [_Segment(nodes, s, e, path, pos, idx) for pos, ((s, e), idx) in enumerate(zip(spans, (0, 1, n - 1)))]
    block_param = re.compile(re.escape(path) + r"\.(\d+)(\..*)$")

    def token(a: Any, seg: _Segment, prev: _Segment | None) -> Any:
        """What an argument of a node of ``seg`` reads, as the same token in every block."""
        if isinstance(a, GNode):
            if id(a) in seg.at:
                return ("self", seg.at[id(a)])
            if prev is not None and id(a) in prev.at:
                return ("prev", prev.at[id(a)])
            if any(id(a) in s.at for s in segs):
                raise NotRepeatable(f"a node of {seg.base} reads a block other than the one before it")
            if a.op == "param" and a.param is not None:
                m = block_param.match(a.param)
                if m:
                    if f"{path}.{m.group(1)}" != seg.base:
                        raise NotRepeatable(f"{seg.base} reads {a.param}, a tensor of another block")
                    return ("param", m.group(2))
            return ("out", id(a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(token(x, seg, prev) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, token(v, seg, prev)) for k, v in a.items()))
        if isinstance(a, torch.Tensor):
            raise NotRepeatable("a tensor literal in a block's arguments")
        return ("lit", type(a).__name__, a)

    def form(node: GNode, seg: _Segment, prev: _Segment | None) -> tuple:
        stack = tuple((_reindex_path(p, seg.base, "#"), c) for p, c in node.module_stack)
        return (node.op, node.target, _reindex_path(node.module_path, seg.base, "#"),
                _reindex_key(node.call_key, seg.base, "#"), stack, node.shape, node.dtype, node.leaf_module,
                token(node.args, seg, prev), token(node.kwargs, seg, prev))

    template, last = segs[1], segs[2]
    forms = [[form(x, s, segs[i - 1] if i else None) for x in s.nodes] for i, s in enumerate(segs)]
    chain: dict[Any, Any] = {}
    _same(forms[0], forms[1], chain, f"{path}.0", f"{path}.1")  # block 0 reads the stream from outside
    _same(forms[1], forms[2], None, f"{path}.1", f"{path}.{n - 1}")
    inside = {id(x) for s in segs[:2] for x in s.nodes}
    for x in nodes[last.end:]:
        if any(id(i) in inside for i in x.inputs):
            raise NotRepeatable(f"a node after {path} reads a block other than the last (every layer's output?)")

    # the compute nodes: block 1's copied for 2 … n-2, then the last block re-indexed
    used = {x.name for x in nodes}
    for x in nodes:  # the last block's tensors take their own names first
        if x.op == "param" and _under(x.param, last.base):
            x.param = last.final + x.param[len(last.base):]
            x.name = _fresh(_slug(x.param), used)
    params = _param_nodes(nodes, path, used, n)
    copies: list[GNode] = []
    prev_nodes = template.nodes
    for k in range(2, n - 1):
        made = _copy_block(template, segs[0], prev_nodes, f"{path}.{k}", params, k, used)
        copies.extend(made)
        prev_nodes = made

    for x in last.nodes:  # re-indexed in place: the nodes after the blocks keep reading them
        x.args = _redirect(x.args, segs[1], prev_nodes)
        x.kwargs = _redirect(x.kwargs, segs[1], prev_nodes)
        x.module_path = _reindex_path(x.module_path, last.base, last.final)
        x.call_key = _reindex_key(x.call_key, last.base, last.final)
        x.module_stack = [(_reindex_path(p, last.base, last.final), c) for p, c in x.module_stack]

    out = nodes[:last.start] + copies + nodes[last.start:]
    return _place_params(out, path, params, n)


def _copy_block(template: _Segment, before: _Segment, prev_nodes: list[GNode], base: str,
                params: dict[tuple[int, str], GNode], k: int, used: set[str]) -> list[GNode]:
    """Block ``k`` as a copy of ``template`` (block 1): its reads of block 0 go to ``prev_nodes``
    (block k-1), its reads of itself to the copy, its tensors to block k's ``param`` nodes."""
    made: list[GNode] = []

    def remap(a: Any) -> Any:
        if isinstance(a, GNode):
            if id(a) in template.at:
                return made[template.at[id(a)]]
            if id(a) in before.at:
                return prev_nodes[before.at[id(a)]]
            if a.op == "param" and _under(a.param, template.base):
                return params[(k, a.param[len(template.base):])]
            return a
        if isinstance(a, (list, tuple)):
            return type(a)(remap(x) for x in a)
        if isinstance(a, dict):
            return {key: remap(v) for key, v in a.items()}
        return a

    old = template.base
    for x in template.nodes:
        made.append(GNode(_fresh(f"{x.name}_{base}", used), x.op, x.target, remap(x.args), remap(x.kwargs),
                          _reindex_path(x.module_path, old, base), _reindex_key(x.call_key, old, base),
                          [(_reindex_path(p, old, base), c) for p, c in x.module_stack],
                          x.shape, x.dtype, leaf_module=x.leaf_module))
    return made


def _same(a: list[tuple], b: list[tuple], chain: dict | None, pa: str, pb: str) -> None:
    if len(a) != len(b):
        raise NotRepeatable(f"{pa} traced {len(a)} ops, {pb} {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if not _match(x, y, chain):
            raise NotRepeatable(f"op {i} of {pa} ({x[0]}) differs from {pb}'s ({y[0]})")


def _match(x: Any, y: Any, chain: dict | None) -> bool:
    """``x == y``; with ``chain`` (block 0 against block 1), an outside node block 0 reads may stand
    where block 1 reads block 0, one outside node for one position."""
    if type(x) is not type(y):
        return False
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "out" and chain is not None and y[0] == "prev":
        return chain.setdefault(("out", x[1]), y[1]) == y[1] and chain.setdefault(("prev", y[1]), x[1]) == x[1]
    if isinstance(x, tuple):
        return len(x) == len(y) and all(_match(p, q, chain) for p, q in zip(x, y))
    try:
        return x is y or bool(x == y)
    except Exception:  # noqa: BLE001 - incomparable literals: not the same
        return False


def _redirect(a: Any, seg: _Segment, to: list[GNode]) -> Any:
    if isinstance(a, GNode):
        return to[seg.at[id(a)]] if id(a) in seg.at else a
    if isinstance(a, (list, tuple)):
        return type(a)(_redirect(x, seg, to) for x in a)
    if isinstance(a, dict):
        return {k: _redirect(v, seg, to) for k, v in a.items()}
    return a


def _fresh(name: str, used: set[str]) -> str:
    out, i = name, 1
    while out in used:
        out, i = f"{name}_{i}", i + 1
    used.add(out)
    return out


def _param_nodes(nodes: list[GNode], path: str, used: set[str], n: int) -> dict[tuple[int, str], GNode]:
    """A ``param`` node for each tensor of blocks 2 … n-2, like block 1's (keyed by (index, suffix))."""
    base = f"{path}.1"
    out = {}
    for x in nodes:
        if x.op == "param" and _under(x.param, base):
            for k in range(2, n - 1):
                name = f"{path}.{k}{x.param[len(base):]}"
                out[(k, x.param[len(base):])] = GNode(_fresh(_slug(name), used), "param", shape=x.shape,
                                                       dtype=x.dtype, param=name)
    return out


def _slug(name: str) -> str:
    return "p_" + re.sub(r"\W", "_", name)


def _place_params(nodes: list[GNode], path: str, params: dict[tuple[int, str], GNode], n: int) -> list[GNode]:
    """Insert the copied ``param`` nodes after each run of block 1's (parameters and buffers are
    lifted in the model's order: block by block)."""
    one = f"{path}.1"
    out: list[GNode] = []
    run: list[str] = []

    def flush() -> None:
        for k in range(2, n - 1):
            out.extend(params[(k, suffix)] for suffix in run)
        run.clear()

    for x in nodes:
        if x.op == "param" and _under(x.param, one):
            run.append(x.param[len(one):])
        elif run:
            flush()
        out.append(x)
    if run:
        flush()
    return out
