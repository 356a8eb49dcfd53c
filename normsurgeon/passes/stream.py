"""The residual stream of a transformer, read off the captured graph: a norm's affine parameters, the
linear layers that read its output (readers) and the ops whose outputs add up to its input (writers).

Everything here is found through the op vocabulary (``graph.ops``) and the parameters the graph
names, never through module names: a reader is any ``linear``/``addmm``/``matmul`` whose weight is a
parameter, reached from the norm's output through ops that keep the last (hidden) axis in place.
Read-only: the passes that rewrite (``norm_affine``, ``ln_to_rms``, ``rotate``) decide what to do
with what is found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..find import NormSite, _match_normalizer, _match_second_moment, _site_output
from ..graph import GNode, ModelGraph
from ..graph.ops import CASTS, DROPOUT, IDENTITY, PERMUTE, RESHAPE, TRANSPOSE, data_users

_NOOP = IDENTITY | DROPOUT | CASTS | {"alias", "expand"}


@dataclass
class Tensor:
    """A parameter (or buffer) by its qualified name, with the module that owns it."""

    name: str
    owner: str  # module path
    attr: str

    @classmethod
    def of(cls, name: str) -> "Tensor":
        owner, _, attr = name.rpartition(".")
        return cls(name, owner, attr)

    def get(self, model: nn.Module) -> torch.Tensor:
        return getattr(model.get_submodule(self.owner), self.attr)


@dataclass
class Reader:
    """A linear map reading the stream: y = x·Wᵀ + b (``out_in``: nn.Linear) or x·W + b (``in_out``:
    transformers' Conv1D ``addmm``, a ``matmul`` with a parameter)."""

    node: GNode
    weight: Tensor
    layout: str  # out_in | in_out
    bias: Tensor | None = None

    @property
    def path(self) -> str:
        return self.weight.owner


@dataclass
class Affine:
    """How a norm site scales and shifts: γ (``weight``; ``one_plus``: it multiplies by 1 + w) and β."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    one_plus: bool = False
    subtracts_mean: bool = False


@dataclass
class Writer:
    """A term of the residual stream: its kind says which axis of which tensor holds the hidden size."""

    kind: str  # embedding | linear | conv | param
    node: GNode
    weight: Tensor
    layout: str = "out_in"  # linear: out_in (nn.Linear) / in_out (Conv1D); conv: out channels on dim 0
    bias: Tensor | None = None

    @property
    def path(self) -> str:
        return self.weight.owner if self.kind != "param" else self.weight.name


@dataclass
class Stream:
    """What a pass needs to know about the stream around a set of norms."""

    writers: list[Writer] = field(default_factory=list)
    nodes: set[int] = field(default_factory=set)  # the stream's own nodes (adds, movement, scalar scales)


def param_of(node: object) -> Tensor | None:
    """The parameter ``node`` is (through casts and no-op views), or None."""
    seen = 0
    while isinstance(node, GNode) and node.op != "param" and seen < 4:
        if node.op in _NOOP and node.inputs:
            node, seen = node.inputs[0], seen + 1
        else:
            return None
    return Tensor.of(node.param) if isinstance(node, GNode) and node.op == "param" and node.param else None


def _param_through(node: object, ops: frozenset | set) -> tuple[Tensor | None, bool]:
    """Like ``param_of`` but also through ``ops``; says whether a ``1 + w`` was passed."""
    one_plus = False
    seen = 0
    while isinstance(node, GNode) and node.op != "param" and seen < 6:
        if node.op == "add" and any(isinstance(a, (int, float)) and a == 1 for a in node.args):
            one_plus = True
        elif node.op not in ops:
            return None, False
        ins = node.inputs
        if len(ins) != 1:
            return None, False
        node, seen = ins[0], seen + 1
    if isinstance(node, GNode) and node.op == "param" and node.param:
        return Tensor.of(node.param), one_plus
    return None, False


def affine_of(site: NormSite) -> Affine | None:
    """The γ/β parameters of a LayerNorm/RMSNorm site, found on its graph nodes (None: unknown form)."""
    node = site.node
    if node is None:
        return None
    if node.op in ("layer_norm", "native_layer_norm"):
        return Affine(param_of(node.arg(2, "weight")), param_of(node.arg(3, "bias")), subtracts_mean=True)
    if node.op in ("rms_norm", "_fused_rms_norm"):
        return Affine(param_of(node.arg(2, "weight")))
    aff = Affine(subtracts_mean=site.kind == "layernorm")
    cur = node
    ops = _NOOP | {"add", "unsqueeze", "view", "reshape"}
    for _ in range(6):
        if cur.op in CASTS and cur.inputs:
            cur = cur.inputs[0]
            continue
        if cur.op not in ("mul", "add") or len(cur.inputs) != 2:
            break
        found = [(i, *_param_through(a, ops)) for i, a in enumerate(cur.inputs)]
        params = [(i, t, op1) for i, t, op1 in found if t is not None]
        if len(params) != 1:
            break
        i, t, op1 = params[0]
        if cur.op == "mul":
            if aff.weight is not None:
                break
            aff.weight, aff.one_plus = t, op1
        else:
            if aff.bias is not None or aff.weight is not None:  # (x·γ) + β: β is met first going back
                break
            aff.bias = t
        cur = cur.inputs[1 - i]
    return aff


def per_head(x: object, width: int) -> bool:
    """``x`` (a norm's input) is a linear's output split into heads: a reshape took its last dim from a
    multiple of ``width`` down to ``width`` (Qwen3's q/k norms: (B, T, H·D) → (B, T, H, D))."""
    seen = 0
    while isinstance(x, GNode) and seen < 8 and x.inputs:
        src = x.inputs[0]
        if x.op in RESHAPE and x.shape and src.shape and x.shape[-1] == width and src.shape[-1] > width \
                and src.shape[-1] % width == 0:
            return True
        if x.op not in RESHAPE | TRANSPOSE | PERMUTE | _NOOP:
            return False
        x, seen = src, seen + 1
    return False


def norm_input(site: NormSite) -> GNode | None:
    """The tensor an op norm normalizes (hand-written norms: see ``rotate._norm_inputs``)."""
    node = site.node
    if node is not None and node.op in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
        x = node.arg(0)
        return x if isinstance(x, GNode) else None
    return None


def hand_written_inputs(graph: ModelGraph) -> dict[int, GNode]:
    """id(norm output node) -> the tensor a hand-written norm normalizes (its input, before casts)."""
    out = {}
    for node in graph.nodes:
        found = _match_second_moment(node)
        if found is None:
            continue
        base, centered, _, differs = found
        res = _match_normalizer(node, base, centered, list(differs))
        if res is None:
            continue
        src = base
        while src.op in CASTS and isinstance(src.arg(0), GNode):
            src = src.arg(0)
        out[id(res[0])] = src
    return out


def output_of(site: NormSite) -> GNode | None:
    if site.node is None:
        return None
    return _site_output(site.node) if site.node.op in ("layer_norm", "native_layer_norm", "rms_norm") else site.node


def _keeps_last_axis(u: GNode, x: GNode, width: int) -> bool:
    """``u`` moves data without mixing or moving the last axis of ``x`` (of size ``width``)."""
    if u.op in _NOOP:
        return True
    rank = len(x.shape) if x.shape is not None else None
    if u.op in RESHAPE:
        return u.shape is not None and len(u.shape) >= 1 and u.shape[-1] == width
    if u.op in TRANSPOSE and rank is not None:
        dims = [d % rank for d in u.args[1:3] if isinstance(d, int)]
        return u.op != "t" and len(dims) == 2 and rank - 1 not in dims
    if u.op in PERMUTE and rank is not None:
        perm = u.arg(1)
        return isinstance(perm, (list, tuple)) and perm[-1] % rank == rank - 1
    if u.op in ("select", "slice") and rank is not None:
        dim = u.arg(1, "dim", 0)
        return isinstance(dim, int) and dim % rank != rank - 1
    return False


def readers_of(out: GNode, width: int) -> tuple[list[Reader], str | None]:
    """Every linear that reads ``out`` (the norm's output), or the reason the output goes elsewhere."""
    found: list[Reader] = []
    stack = [out]
    while stack:
        x = stack.pop()
        for u in data_users(x):
            if u.op in ("linear",) and u.arg(0) is x:
                w = param_of(u.arg(1))
                if w is None:
                    return [], f"{_where(u)} multiplies by a computed tensor, not a weight"
                found.append(Reader(u, w, "out_in", param_of(u.arg(2, "bias"))))
            elif u.op == "addmm" and u.arg(1) is x:
                w = param_of(u.arg(2))
                if w is None:
                    return [], f"{_where(u)} multiplies by a computed tensor, not a weight"
                found.append(Reader(u, w, "in_out", param_of(u.arg(0))))
            elif u.op in ("matmul", "mm") and u.arg(0) is x:
                r = _matmul_reader(u)
                if r is None:
                    return [], f"{_where(u)} multiplies by a computed tensor, not a weight"
                found.append(r)
            elif u.op == "output":
                return [], "its output is a model output"
            elif u.op == "add":
                return [], f"post-norm: its output also feeds a residual add ({_where(u)})"
            elif _keeps_last_axis(u, x, width):
                stack.append(u)
            else:
                return [], f"a reader is not linear: {_where(u)}"
    if not found:
        return [], "no linear layer reads its output"
    return found, None


def _matmul_reader(u: GNode) -> Reader | None:
    w_node = u.arg(1)
    layout = "in_out"
    if isinstance(w_node, GNode) and (w_node.op in ("t", "numpy_T", "mT") or (w_node.op in TRANSPOSE and len(w_node.args) >= 3
                                                             and {a % 2 for a in w_node.args[1:3]} == {0, 1})):
        layout, w_node = "out_in", w_node.arg(0)
    w = param_of(w_node)
    if w is None:
        return None
    bias = None
    users = data_users(u)
    if len(users) == 1 and users[0].op == "add":
        other = next((a for a in users[0].args if a is not u), None)
        b = param_of(other)
        if b is not None and isinstance(other, GNode) and other.shape is not None and len(other.shape) == 1:
            bias = b
    return Reader(u, w, layout, bias)


def _where(node: GNode) -> str:
    return f"{node.module_path or '(root)'} ({node.op})"


def tensor_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every qualified name it is registered under (more than one: tied)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def uses(graph: ModelGraph, tensor: torch.Tensor) -> list[GNode]:
    """Every op that reads ``tensor`` (a parameter or buffer, under any of its names)."""
    out = []
    for n in _nodes_naming(graph, tensor):
        stack = list(data_users(n))
        while stack:
            u = stack.pop()
            if u.op in _NOOP and u.op not in CASTS:
                stack.extend(data_users(u))
            else:
                out.append(u)
    return out


def _nodes_naming(graph: ModelGraph, tensor: torch.Tensor) -> list[GNode]:
    """The graph's param nodes whose name resolves to ``tensor`` now. The index is rebuilt when it is
    stale for this tensor: none of its nodes, or one that no longer resolves to it (an untied weight
    is a new tensor under an old name)."""
    for rebuild in (False, True):
        listed = _param_nodes(graph, rebuild).get(id(tensor), [])
        nodes = [n for n in listed if _resolve(graph.model, n.param) is tensor]
        if nodes and len(nodes) == len(listed):
            return nodes
    return nodes


def _param_nodes(graph: ModelGraph, rebuild: bool = False) -> dict[int, list[GNode]]:
    """id(tensor) -> the graph's param nodes that name it: ``uses`` runs for every reader of every
    norm, and resolving every node's name each time cost a 1.1B model's fold seconds (so did a key
    over every parameter: ``_nodes_naming`` checks what it reads instead)."""
    cached = graph.__dict__.get("_param_nodes")
    if cached is not None and not rebuild:
        return cached
    index: dict[int, list[GNode]] = {}
    for n in graph.nodes:
        if n.op == "param" and n.param:
            t = _resolve(graph.model, n.param)
            if t is not None:
                index.setdefault(id(t), []).append(n)
    graph.__dict__["_param_nodes"] = index
    return index


def _resolve(model: nn.Module, name: str) -> torch.Tensor | None:
    try:
        return Tensor.of(name).get(model)
    except AttributeError:
        return None


def own_tensor(graph: ModelGraph, node: GNode, t: Tensor) -> Tensor:
    """Name ``t`` by the module that ran ``node`` when that module holds it (a tied lm_head's weight is
    ``lm_head.weight`` there, whatever name the capture gave the shared tensor)."""
    mod = graph.module(node.module_path)
    value = _resolve(graph.model, t.name)
    if mod is not None and value is not None:
        for attr, p in mod.named_parameters(recurse=False):
            if p is value:
                path = node.module_path
                return Tensor(f"{path}.{attr}" if path else attr, path, attr)
    return t


# --- writers: backwards from a norm's input -----------------------------------------------------

def _scalar(a: object) -> bool:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    return isinstance(a, GNode) and a.shape is not None and all(d == 1 for d in a.shape) and a.op != "input"


def writers_of(x: GNode, width: int, stream: Stream) -> str | None:
    """Walk from a norm's input ``x`` back through the residual adds to every term that writes it,
    adding them to ``stream``; returns the reason a term is not one a linear surgery can move."""
    stack = [x]
    while stack:
        n = stack.pop()
        if id(n) in stream.nodes:
            continue
        if n.op in ("add", "add_"):
            stream.nodes.add(id(n))
            stack.extend(a for a in n.args if isinstance(a, GNode))
            continue
        if n.op == "mul" and len(n.args) == 2 and any(_scalar(a) for a in n.args):
            stream.nodes.add(id(n))
            stack.extend(a for a in n.args if isinstance(a, GNode) and not _scalar(a))
            continue
        if n.op == "div" and _scalar(n.arg(1)):
            stream.nodes.add(id(n))
            stack.append(n.arg(0))
            continue
        if n.op == "cat" and n.shape is not None:
            dim = n.arg(1, "dim", 0)
            if isinstance(dim, int) and dim % len(n.shape) != len(n.shape) - 1:
                stream.nodes.add(id(n))
                stack.extend(a for a in n.arg(0) if isinstance(a, GNode))
                continue
        if (n.op in _NOOP or n.op in RESHAPE or n.op in ("select", "slice")) and n.inputs \
                and n.inputs[0].shape is not None and n.shape is not None and n.inputs[0].shape[-1] == width \
                and n.shape[-1] == width and (n.op not in RESHAPE and n.op not in ("select", "slice")
                                              or _keeps_last_axis(n, n.inputs[0], width)):
            stream.nodes.add(id(n))
            stack.append(n.inputs[0])
            continue
        if n.op in TRANSPOSE | PERMUTE and n.inputs:
            w = _conv_writer(n, width)
            if w is not None:
                stream.writers.append(w)
                cur = n
                while cur is not w.node:  # the flatten/transpose between the conv and the stream
                    stream.nodes.add(id(cur))
                    cur = cur.inputs[0]
                stream.nodes.add(id(w.node))
                continue
        w = _writer(n)
        if w is None:
            return f"{_where(n)} writes to the residual stream and is not a linear map of weights"
        if not any(e.node is n for e in stream.writers):
            stream.writers.append(w)
        stream.nodes.add(id(n))
    return None


def _writer(n: GNode) -> Writer | None:
    if n.op == "embedding":
        w = param_of(n.arg(0))
        return Writer("embedding", n, w) if w is not None else None
    if n.op == "param":
        return Writer("param", n, Tensor.of(n.param)) if n.param else None
    if n.op == "linear":
        w = param_of(n.arg(1))
        return Writer("linear", n, w, "out_in", param_of(n.arg(2, "bias"))) if w is not None else None
    if n.op == "addmm":
        w = param_of(n.arg(2))
        return Writer("linear", n, w, "in_out", param_of(n.arg(0))) if w is not None else None
    if n.op in ("matmul", "mm"):
        r = _matmul_reader(n)
        # a matmul writer's bias is the add after it, which the walk meets first as a stream add
        return Writer("linear", n, r.weight, r.layout) if r is not None else None
    return None


def _conv_writer(n: GNode, width: int) -> Writer | None:
    """A patch embedding: conv → flatten → transpose, the conv's channel axis ending last."""
    chain = [n]
    cur = n.inputs[0]
    while cur.op in RESHAPE | TRANSPOSE | PERMUTE | _NOOP and cur.inputs:
        chain.append(cur)
        cur = cur.inputs[0]
    if cur.op not in ("conv2d", "conv1d", "conv3d", "convolution") or cur.shape is None:
        return None
    from ..graph.ops import track_axis

    axis, _ = track_axis(list(reversed(chain)), 1)
    if axis is None or n.shape is None or axis % len(n.shape) != len(n.shape) - 1 or cur.shape[1] != width:
        return None
    w = param_of(cur.arg(1))
    return Writer("conv", cur, w, "out_in", param_of(cur.arg(2, "bias"))) if w is not None else None
