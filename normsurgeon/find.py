"""Find every normalization site in a captured graph.

Three sources:
- ``module``: an ``nn`` norm module (or a subclass of one) ran a norm op;
- ``function``: a norm op (``F.layer_norm``, ``F.batch_norm``...) called from other code;
- ``pattern``: a norm written by hand, recognised from its computation: mean/variance or mean/std
  LayerNorm (also the annotated-Transformer form with unbiased std and eps added to std), RMSNorm
  variants (fp32 upcast, ``1 + weight``), over the last dim or channels-first (dim 1).

Norm modules the capture never reached are listed too, so nothing is silently missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn as nn

from .graph import GNode, ModelGraph
from .graph.ops import CASTS as _CASTS, DATA_MOVEMENT, batch_norm_args, track_axis

NORM_MODULES: list[tuple[type, str]] = [
    (nn.modules.batchnorm._BatchNorm, "batchnorm"),
    (nn.LayerNorm, "layernorm"),
    (nn.GroupNorm, "groupnorm"),
    (nn.modules.instancenorm._InstanceNorm, "instancenorm"),
]
if hasattr(nn, "RMSNorm"):
    NORM_MODULES.append((nn.RMSNorm, "rmsnorm"))

NORM_OPS = {
    "batch_norm": "batchnorm", "native_batch_norm": "batchnorm", "_native_batch_norm_legit": "batchnorm",
    "_native_batch_norm_legit_no_training": "batchnorm", "_native_batch_norm_legit_functional": "batchnorm",
    "layer_norm": "layernorm", "native_layer_norm": "layernorm",
    "group_norm": "groupnorm", "native_group_norm": "groupnorm",
    "instance_norm": "instancenorm", "rms_norm": "rmsnorm", "_fused_rms_norm": "rmsnorm",
}

# The note of a norm that ran inside a part nobody could capture (passes quote it as their reason).
UNCAPTURED = "ran, but in a part that could not be captured"


def norm_kind(module: nn.Module | None) -> str | None:
    if module is None:
        return None
    kind = next((kind for cls, kind in NORM_MODULES if isinstance(module, cls)), None)
    if kind is None and _is_frozen_bn(module):
        return "batchnorm"
    return kind


def _is_frozen_bn(module: nn.Module) -> bool:
    """Ours, or any module proven to compute ``x * scale + shift`` per channel of its buffers (DETR's,
    torchvision's FrozenBatchNorm2d: ``affine_probe``), whatever its class is called."""
    from .affine_probe import frozen_scale_shift
    from .nn import FrozenBatchNorm  # nn.py imports nothing from here; local import keeps find light

    return isinstance(module, FrozenBatchNorm) or frozen_scale_shift(module) is not None


@dataclass
class NormSite:
    path: str  # module path; "module.path:op#k" when the norm is one of several ops of a module
    kind: str  # batchnorm | layernorm | rmsnorm | groupnorm | instancenorm
    source: str  # module | function | pattern
    module_type: str | None = None
    dims: list[int] | None = None  # dims the statistics are taken over (relative to the input)
    channels: int | None = None
    eps: float | None = None
    affine: bool | None = None
    track_running_stats: bool | None = None
    input_shape: list[int] | None = None
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)  # how the formula departs from the canonical op
    calls: int = 1
    note: str | None = None
    node: GNode | None = field(default=None, repr=False, compare=False)  # output node of the site

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "node"}


@dataclass
class InspectReport:
    capture: str
    sites: list[NormSite]
    attempts: list[tuple[str, str]] = field(default_factory=list)
    failed_parts: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[dict] | None = None  # the inputs it was called with (input_files.input_layout)
    weight_standardization: list[str] = field(default_factory=list)  # modules normalizing a weight

    def to_json(self) -> dict:
        return {"capture": self.capture, "norms": [s.to_json() for s in self.sites], "inputs": self.inputs,
                "capture_attempts": [{"method": m, "error": e} for m, e in self.attempts],
                "not_captured": [{"path": p, "reason": r} for p, r in self.failed_parts],
                "weight_standardization": list(self.weight_standardization)}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def tables(self):
        from .report import Table

        rows = []
        for s in self.sites:
            extra = "; ".join(filter(None, [", ".join(s.differs), s.note,
                                            f"called {s.calls}x" if s.calls > 1 else None]))
            rows.append([s.path or "(root)", s.kind, s.source, s.module_type or "-",
                         _fmt_dims(s.dims), s.channels if s.channels is not None else "-",
                         "-" if s.input_shape is None else "x".join(map(str, s.input_shape)), extra])
        notes = [f"capture: {self.capture}"]
        if self.inputs:
            notes.append("inputs: " + ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}"
                                                for i in self.inputs))
        for method, err in self.attempts:
            notes.append(f"  {method} failed: {err}")
        for path, reason in self.failed_parts:
            notes.append(f"  not captured: {path}: {reason}")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items())) or "no normalization layers"
        notes.append(f"found {len(self.sites)} normalization sites: {summary}")
        if self.weight_standardization:
            notes.append(f"weight standardization (a norm over a weight, not a normalization layer) in "
                         f"{len(self.weight_standardization)} module(s): {', '.join(self.weight_standardization)}")
        return [Table("Normalization layers", ["path", "kind", "source", "type", "dims", "C", "input", "notes"],
                      rows, notes)]


def inspect(model: nn.Module, example_inputs: Any = None, *, graph: ModelGraph | None = None) -> InspectReport:
    """Capture ``model`` and list every normalization site in it."""
    from .graph import capture
    from .inputs import as_call_args

    if graph is None:
        ci = as_call_args(example_inputs) if example_inputs is not None else None
        graph = capture(model, ci)
    sites = find_norms(graph)
    _name_token_sites(graph, sites)
    return InspectReport(graph.describe(), sites, list(graph.attempts),
                         [(p.path, p.error or "") for p in graph.failed_parts()],
                         weight_standardization=weight_standardization(graph))


def weight_standardization(graph: ModelGraph) -> list[str]:
    """Modules that run a norm op over one of their parameters (BiT's ``WeightStandardizedConv2d``:
    ``F.batch_norm`` of its conv weight): weight standardization, not a normalization layer."""
    return list(dict.fromkeys(n.module_path or "" for n in graph.nodes if NORM_OPS.get(n.op) and normalizes_parameter(n)))


def normalizes_parameter(node: GNode) -> bool:
    """The norm's input is a parameter (through reshapes and casts): it normalizes a weight."""
    x = node.arg(0)
    while isinstance(x, GNode) and (x.op in DATA_MOVEMENT or x.op in _CASTS) and x.inputs:
        x = x.inputs[0]
    return isinstance(x, GNode) and x.op == "param"


def _name_token_sites(graph: ModelGraph, sites: list[NormSite]) -> None:
    """Show a TokenBatchNorm's site (its BatchNorm1d child ``bn`` on the flattened tokens) as the
    TokenBatchNorm: its path, its (B, T, C) input and channel axis."""
    from .nn import TokenBatchNorm

    for s in sites:
        parent = s.path[:-3] if s.path.endswith(".bn") else None
        if parent is None or not isinstance(graph.module(parent), TokenBatchNorm):
            continue
        s.path, s.module_type = parent, type(graph.module(parent)).__name__
        x = s.node.arg(0) if s.node is not None else None
        if isinstance(x, GNode):
            src, axis = _module_input_channel_axis(x, parent)
            if src is not x and axis is not None and src.shape is not None:
                s.input_shape, s.dims = list(src.shape), [d for d in range(len(src.shape)) if d != axis]
                s.producer = _describe(_producer(src))


def find_norms(graph: ModelGraph) -> list[NormSite]:
    sites: list[NormSite] = []
    covered: set[int] = set()
    op_counter: dict[str, int] = {}
    for node in graph.nodes:
        kind = NORM_OPS.get(node.op)
        if not kind or normalizes_parameter(node):  # weight standardization: see weight_standardization()
            continue
        site = _op_site(graph, node, kind, op_counter)
        sites.append(site)
        covered.add(id(node))
    sites.extend(_pattern_sites(graph, covered, op_counter))
    seen = {s.path.split(":")[0] for s in sites if s.source == "module"}
    failed = {p.path: p.error for p in graph.failed_parts()}
    for path, module in graph.model.named_modules():
        kind = norm_kind(module)
        if kind and path not in seen:
            site = _module_fields(NormSite(path, kind, "module", type(module).__name__), module)
            calls = graph.calls(path)
            if calls and _is_frozen_bn(module):
                # computed as x * scale + shift: no norm op in the graph, but it ran
                site.calls, site.note = len(calls), "frozen: running statistics as buffers (scale and shift)"
                x = next((i for n in graph.nodes if n.module_path == path for i in n.inputs
                          if i.op != "param" and not _inside(i.module_path, path)), None)
                if x is not None and x.shape is not None:
                    site.input_shape = list(x.shape)
                    site.dims = [d for d in range(len(x.shape)) if d != 1]
                    site.producer = _describe(_producer(x))
            else:
                site.note = _uncaptured_note(path, failed)
                site.calls = 0
            sites.append(site)
    order = {p: i for i, (p, _) in enumerate(graph.model.named_modules())}
    sites.sort(key=lambda s: order.get(s.path.split(":")[0], len(order)))
    return sites


def _uncaptured_note(path: str, failed: dict[str, str | None]) -> str:
    """Why a norm module has no node: never run, or run inside a part whose capture failed (say which:
    "not reached" would send the user after their inputs when the capture is what failed)."""
    from .graph.capture import NOT_CALLED

    part = next((f for f in failed if path == f or path.startswith(f + ".")), None)
    if part is None or failed[part] == NOT_CALLED:
        return "not called in the captured forward pass"
    return f"{UNCAPTURED} ({part}: {failed[part]})"


# --- norm ops ----------------------------------------------------------------------------------

def _op_site(graph: ModelGraph, node: GNode, kind: str, counter: dict[str, int]) -> NormSite:
    owner = _norm_owner(graph, node)
    x = node.arg(0)
    if owner is not None:
        path, module = owner
        site = NormSite(path, kind, "module", type(module).__name__)
        _module_fields(site, module)
        site.calls = max(1, len(graph.calls(path)))
    else:
        module_path = node.module_path or ""
        # casts count as data movement here: OLMo's LayerNorm is F.layer_norm(x.float()).to(dtype), and
        # a module whose forward is one norm op is that norm (a swap replaces the module whole)
        own_ops = [n for n in _call_nodes(graph, node) if n.op not in DATA_MOVEMENT and n.op not in _CASTS
                   and n.op not in ("param", "input", "output", "getitem")]
        path = module_path if own_ops == [node] and module_path else _numbered(module_path, node.op, counter)
        mod = graph.module(module_path)
        site = NormSite(path, kind, "function", type(mod).__name__ if mod is not None else None)
        _op_fields(site, node)
    rank = len(x.shape) if isinstance(x, GNode) and x.shape is not None else None
    if kind in ("layernorm", "rmsnorm"):
        shape = node.arg(1) if node.leaf_module is False else None
        n_dims = len(shape) if isinstance(shape, (list, tuple)) else len(getattr(graph.module_of(node), "normalized_shape", (0,)))
        site.dims = list(range(-n_dims, 0))
        src, perm = _permuted_source(node, x)
        if perm is not None and site.dims == [-1]:
            site.dims = [perm[-1] - len(perm)] if perm[-1] != len(perm) - 1 else [-1]
            if perm[-1] == 1:
                site.note = "channels-first: normalizes dim 1 (permutes to channels-last around the op)"
            x = src
    elif kind == "batchnorm" and rank is not None:
        site.dims = [d for d in range(rank) if d != 1]
        if owner is not None:  # a BN subclass may reshape around the op (token BN: (B, T, C) -> (B*T, C))
            src, axis = _module_input_channel_axis(x, owner[0])
            if src is not x and axis is not None:
                x, site.dims = src, [d for d in range(len(src.shape)) if d != axis]
    elif kind == "instancenorm" and rank is not None:
        site.dims = list(range(2, rank))  # per sample and channel, over positions
    elif kind == "groupnorm" and rank is not None:
        site.dims = list(range(1, rank))  # per sample, over each group of channels and positions
    if isinstance(x, GNode) and x.shape is not None:
        site.input_shape = list(x.shape)
    site.producer = _describe(_producer(x)) if isinstance(x, GNode) else None
    site.consumers = [_describe(c) for c in _consumers(_site_output(node))]
    site.node = node
    return site


def _norm_owner(graph: ModelGraph, node: GNode) -> tuple[str, nn.Module] | None:
    """Innermost norm module on the node's module stack (a subclass may wrap the op in reshapes)."""
    for path, _ in reversed(node.module_stack or [(node.module_path, "")]):
        module = graph.module(path)
        if norm_kind(module):
            return path, module
    return None


def _module_fields(site: NormSite, module: nn.Module) -> NormSite:
    site.eps = float(getattr(module, "eps", 0.0) or 0.0) if hasattr(module, "eps") else None
    if _is_frozen_bn(module):
        channels = getattr(module, "num_features", None)
        if not isinstance(channels, int):
            from .affine_probe import frozen_scale_shift
            channels = frozen_scale_shift(module)[0].numel()
        site.channels, site.affine, site.track_running_stats = int(channels), True, True
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        site.channels, site.affine = module.num_features, module.affine
        site.track_running_stats = module.track_running_stats and module.running_mean is not None
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        site.channels, site.affine = module.num_features, module.affine
        site.track_running_stats = module.track_running_stats
    elif isinstance(module, nn.LayerNorm):
        site.channels = int(module.normalized_shape[-1])
        site.affine = module.elementwise_affine
        site.dims = list(range(-len(module.normalized_shape), 0))
    elif isinstance(module, nn.GroupNorm):
        site.channels, site.affine = module.num_channels, module.affine
        site.note = f"{module.num_groups} groups"
    elif hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        site.channels = int(module.normalized_shape[-1])
        site.affine = module.elementwise_affine
        site.dims = list(range(-len(module.normalized_shape), 0))
        if module.eps is None:
            site.eps = None
    return site


def _op_fields(site: NormSite, node: GNode) -> None:
    op = node.op
    if op in ("batch_norm", "native_batch_norm"):
        args = batch_norm_args(node) or {}  # aten and F.batch_norm order their arguments differently
        w, eps = args.get("weight"), args.get("eps")
        site.track_running_stats = isinstance(args.get("running_mean"), GNode)
    elif op.startswith("_native_batch_norm_legit"):
        w, eps = node.arg(1), node.arg(6 if "no_training" in op else 7)
        site.track_running_stats = "no_training" in op or isinstance(node.arg(3), GNode)
    elif op in ("layer_norm", "native_layer_norm"):
        w, eps = node.arg(2, "weight"), node.arg(4, "eps", 1e-5)
    elif op in ("group_norm", "native_group_norm"):
        w, eps = node.arg(2, "weight"), node.arg(4, "eps", 1e-5)
        site.note = f"{node.arg(1)} groups"
    elif op == "instance_norm":
        w, eps = node.arg(1, "weight"), node.arg(7, "eps")
    else:  # rms_norm
        w, eps = node.arg(2, "weight"), node.arg(3, "eps")
    site.affine = isinstance(w, GNode)
    site.eps = float(eps) if isinstance(eps, (int, float)) else None
    if isinstance(w, GNode) and w.shape:
        site.channels = int(w.shape[0]) if len(w.shape) == 1 else int(w.shape[-1])
    elif isinstance(node.arg(0), GNode) and node.arg(0).shape:
        x_shape = node.arg(0).shape
        site.channels = int(x_shape[1] if site.kind in ("batchnorm", "groupnorm", "instancenorm") else x_shape[-1])


# --- hand-written patterns ---------------------------------------------------------------------

def _pattern_sites(graph: ModelGraph, covered: set[int], counter: dict[str, int]) -> list[NormSite]:
    sites = []
    for node in graph.nodes:
        found = _match_second_moment(node)
        if found is None:
            continue
        base, centered, dims, differs = found
        out = _match_normalizer(node, base, centered, differs)
        if out is None or id(out[0]) in covered:
            continue
        norm_out, eps, affine = out
        covered.add(id(norm_out))
        kind = "layernorm" if centered else "rmsnorm"
        src = base
        while src.op in _CASTS and isinstance(src.arg(0), GNode):
            src = src.arg(0)
        rank = len(src.shape) if src.shape is not None else None
        dims = [d - rank if rank is not None and d >= 0 else d for d in dims]
        module_path = norm_out.module_path or ""
        region = _pattern_region(src, norm_out)
        own_ops = [n for n in _call_nodes(graph, norm_out) if n.op not in ("param", "input", "output")]
        whole_module = module_path and all(id(n) in region for n in own_ops)
        path = module_path if whole_module else _numbered(module_path, kind, counter)
        mod = graph.module(module_path)
        site = NormSite(path, kind, "pattern", type(mod).__name__ if mod is not None and whole_module else None,
                        dims=dims, eps=eps, affine=affine, differs=differs, node=norm_out)
        if src.shape is not None:
            site.input_shape = list(src.shape)
            if len(dims) == 1:
                site.channels = int(src.shape[dims[0]])
        if dims == [1 - rank if rank else 1] and rank and rank > 2:
            site.note = "channels-first: normalizes dim 1"
        site.calls = max(1, len(graph.calls(module_path))) if whole_module else 1
        site.producer = _describe(_producer(src))
        site.consumers = [_describe(c) for c in _consumers(norm_out)]
        sites.append(site)
    return sites


def _reduce_dims(node: GNode) -> list[int] | None:
    dims = node.arg(1, "dim")
    if isinstance(dims, int):
        return [dims]
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return list(dims)
    return None


def _match_second_moment(node: GNode):
    """var/std over D, or mean(square(y)) over D. Returns (base, centered, dims, differs)."""
    differs: list[str] = []
    if node.op in ("var", "std", "var_mean", "std_mean"):
        x, dims = node.arg(0), _reduce_dims(node)
        if not isinstance(x, GNode) or dims is None:
            return None
        correction = node.kwargs.get("correction", node.kwargs.get("unbiased", True))
        if len(node.args) > 2 and isinstance(node.args[2], bool):
            correction = node.args[2]
        if correction not in (0, False, 0.0):
            differs.append(f"unbiased {'std' if node.op.startswith('std') else 'variance'} (divides by N-1)")
        return x, True, dims, differs
    if node.op != "mean":
        return None
    dims = _reduce_dims(node)
    sq = node.arg(0)
    if dims is None or not isinstance(sq, GNode):
        return None
    if sq.op in ("pow", "square") and (sq.op == "square" or sq.arg(1) == 2):
        y = sq.arg(0)
    elif sq.op == "mul" and sq.arg(0) is sq.arg(1):
        y = sq.arg(0)
    else:
        return None
    if not isinstance(y, GNode):
        return None
    if y.op == "sub" and isinstance(y.arg(1), GNode) and y.arg(1).op == "mean" and y.arg(1).arg(0) is y.arg(0) \
            and _reduce_dims(y.arg(1)) == dims:
        return y.arg(0), True, dims, differs
    if y.op in _CASTS:
        differs.append("computes in float32 (upcast)")
    return y, False, dims, differs


def _match_normalizer(moment: GNode, base: GNode, centered: bool, differs: list[str]):
    """From the second moment to the normalized output: (output node, eps, affine)."""
    eps = None
    cur = moment
    if moment.op in ("var_mean", "std_mean"):
        return None
    is_std = moment.op == "std"
    nxt = _single_user(cur, {"add", "rsqrt", "sqrt"})
    if nxt is not None and nxt.op == "add":
        eps = _const(nxt)
        if is_std:
            differs.append("eps added to std, not to variance")
        cur, nxt = nxt, _single_user(nxt, {"rsqrt", "sqrt", "div"})
    if nxt is None:
        return None
    if nxt.op == "sqrt":
        is_std = True
        cur = nxt
        after = _single_user(cur, {"add", "div", "reciprocal"})
        if after is not None and after.op == "add":
            eps = _const(after)
            differs.append("eps added to std, not to variance")
            cur = after
    elif nxt.op == "rsqrt":
        cur = nxt
    elif nxt.op == "div" and is_std:
        pass  # x / (std + eps): the std branch above already noted it
    # the normalized value: mul(y, rsqrt) or div(y, sqrt)
    out = None
    for u in cur.users:
        if u.op in ("mul", "div") and any(_reaches_base(a, base, centered) for a in u.inputs if a is not cur):
            out = u
            break
        if u.op == "div" and is_std:
            out = u
            break
        if u.op == "mul" and any(isinstance(a, GNode) and a.op == "sub" for a in u.inputs):
            out = u
            break
    if out is None:
        return None
    affine = False
    tail = out
    for _ in range(4):  # cast back, weight, bias
        nxt2 = _single_user(tail, {"mul", "add", "to", "_to_copy", "type_as"})
        if nxt2 is None or nxt2.module_path != out.module_path:
            break  # the next module's ops are not this norm's affine part
        others = [a for a in nxt2.inputs if a is not tail]
        if nxt2.op in ("mul", "add") and others and all(_is_param_like(a) for a in others):
            affine = True
            if nxt2.op == "mul" and any(a.op == "add" for a in others):
                differs.append("scales by (1 + weight)")
        elif nxt2.op not in _CASTS:
            break
        tail = nxt2
    if eps is None:
        eps = 0.0
    return tail, eps, affine


def _reaches_base(a: Any, base: GNode, centered: bool) -> bool:
    if not isinstance(a, GNode):
        return False
    if a is base:
        return True
    if a.op in _CASTS and a.arg(0) is base:
        return True
    if centered and a.op == "sub" and a.arg(0) is base:
        return True
    if a.op in ("mul",) and any(x is base or (isinstance(x, GNode) and x.op == "sub" and x.arg(0) is base)
                                for x in a.inputs):
        return True  # weight * (x - mean) / std
    return False


def _is_param_like(a: GNode) -> bool:
    """A parameter, possibly reshaped, cast or offset by a constant (1 + weight)."""
    seen = 0
    while a.op != "param" and seen < 4:
        if a.op in DATA_MOVEMENT | _CASTS | {"add", "unsqueeze", "select", "getitem", "slice"} and a.inputs:
            a = a.inputs[0]
            seen += 1
        else:
            return False
    return a.op == "param"


def _single_user(node: GNode, ops: set[str]) -> GNode | None:
    users = [u for u in node.users if u.op in ops]
    return users[0] if len(users) == 1 else None


def _const(node: GNode) -> float | None:
    for a in node.args:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
    return None


def _pattern_region(base: GNode, out: GNode) -> set[int]:
    """Nodes between base (exclusive) and out (inclusive): the pattern's own ops."""
    region: set[int] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if id(n) in region or n is base:
            continue
        region.add(id(n))
        stack.extend(i for i in n.inputs if i is not base)
    return region


# --- neighbours --------------------------------------------------------------------------------

def _permuted_source(node: GNode, x: Any) -> tuple[Any, list[int] | None]:
    """If the op's input is a permute done inside the same module, the pre-permute tensor and perm."""
    if isinstance(x, GNode) and x.op == "permute" and x.module_path == node.module_path:
        perm = x.arg(1)
        if isinstance(perm, (list, tuple)):
            return x.arg(0), list(perm)
    return x, None


def _module_input_channel_axis(x: Any, path: str) -> tuple[Any, int | None]:
    """Follow the module's own data-movement ops back to its input; where is the channel axis there?

    The op sees channels on dim 1: the module input's channel axis is the one ``track_axis`` carries
    to dim 1 through those ops (reshapes by the row-major rule, transposes and permutes by their
    dims), so nothing is guessed from sizes (a (B, T, C) input with T == C is no puzzle).
    """
    if not isinstance(x, GNode) or x.shape is None or len(x.shape) < 2:
        return x, None
    chain, src = [], x
    while src.op in DATA_MOVEMENT and src.inputs and _inside(src.module_path, path):
        chain.append(src)
        src = src.inputs[0]
    if src is x or src.shape is None:
        return x, None
    chain.reverse()
    found = [j for j in range(len(src.shape)) if track_axis(chain, j)[0] == 1]
    return (src, found[0]) if len(found) == 1 else (x, None)


def _call_nodes(graph: ModelGraph, node: GNode) -> list[GNode]:
    """The ops of the module call that ran ``node`` (a module called twice has two calls: a norm that
    is all of one call's ops is the whole module)."""
    return [n for n in graph.nodes if n.module_path == node.module_path and n.call_key == node.call_key]


def _inside(module_path: str | None, path: str) -> bool:
    return module_path is not None and (module_path == path or module_path.startswith(path + "."))


def _site_output(node: GNode) -> GNode:
    """The last node of a norm call (past getitem and the module's own reshapes/permutes)."""
    out = node
    while len(out.users) == 1 and (out.users[0].op == "getitem" or
                                    (out.users[0].op in DATA_MOVEMENT and out.users[0].module_path == node.module_path)):
        out = out.users[0]
    return out


def _producer(x: GNode | None) -> GNode | None:
    while x is not None and (x.op in DATA_MOVEMENT or x.op in _CASTS or x.op == "getitem") and x.inputs:
        x = x.inputs[0]
    return x


def _consumers(out: GNode, depth: int = 0) -> list[GNode]:
    result = []
    for u in out.users:
        if u.op in DATA_MOVEMENT and depth < 8:
            result.extend(_consumers(u, depth + 1))
        elif u.op != "output":
            result.append(u)
        else:
            result.append(u)
    return result


def _describe(node: GNode | None) -> str | None:
    if node is None:
        return None
    if node.op == "input":
        return f"input {node.name}"
    if node.op == "output":
        return "model output"
    return f"{node.module_path or '(root)'} ({node.op})"


def _numbered(module_path: str, op: str, counter: dict[str, int]) -> str:
    key = f"{module_path}:{op}" if module_path else op
    k = counter.get(key, 0)
    counter[key] = k + 1
    return f"{key}#{k}"


def _fmt_dims(dims: list[int] | None) -> str:
    return "-" if dims is None else ",".join(map(str, dims))
