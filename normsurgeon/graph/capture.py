"""Capture a model's dataflow into one graph view, whatever captured it.

Order of attempts (the report says which one worked, and why the others did not):

1. ``torch.export`` (non-strict) when example inputs exist: it works on nearly every real model,
   keeps high-level ops (``aten.linear``, ``aten.conv2d``, ``aten.batch_norm``) and records for every
   node the module it came from (``nn_module_stack``) and its shape.
   On a large model (or with ``repeat_blocks=True``) a run of identical blocks is exported once and
   copied (``graph.blocks``), the whole export being the fallback.
2. ``torch.fx.symbolic_trace``: needs no inputs but fails on nearly every transformers model
   (iterating proxies, control flow); used when export failed or no inputs were given.
3. per child: each child module exported alone, once per call, with the inputs each call received
   during one forward pass, recursing into children that still fail. What nobody could capture is
   listed with the reason.

Every node becomes a ``GNode`` with a canonical ``op`` name (the aten op name without overload, e.g.
``linear``, ``batch_norm``, ``view``, ``mean``), the path of the innermost module that ran it, and
its ``call_key`` (which call of that module; a module called twice has two keys).
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..errors import NormSurgeonError, one_line
from ..inputs import CallArgs
from ..quiet import quiet_torch
from .blocks import NotRepeatable, Run, expand, find_runs, shortened
from .node import CapturedPart, GNode, ModelGraph

# Modules FX keeps as leaves, mapped to the aten op name their export produces.
_MODULE_OPS: list[tuple[type, str]] = [
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"),
    (nn.ConvTranspose1d, "conv_transpose1d"), (nn.ConvTranspose2d, "conv_transpose2d"),
    (nn.ConvTranspose3d, "conv_transpose3d"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"), (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.Dropout, "dropout"), (nn.Dropout1d, "dropout"), (nn.Dropout2d, "dropout"), (nn.Dropout3d, "dropout"),
    (nn.Identity, "identity"), (nn.Flatten, "flatten"),
    (nn.MaxPool1d, "max_pool1d"), (nn.MaxPool2d, "max_pool2d"), (nn.MaxPool3d, "max_pool3d"),
    (nn.AdaptiveMaxPool1d, "adaptive_max_pool1d"), (nn.AdaptiveMaxPool2d, "adaptive_max_pool2d"),
    (nn.AdaptiveMaxPool3d, "adaptive_max_pool3d"),
]
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS.append((nn.RMSNorm, "rms_norm"))

_OPERATORS = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul",
              operator.truediv: "div", operator.pow: "pow", operator.getitem: "getitem",
              operator.matmul: "matmul", operator.neg: "neg"}
_VARARG_METHODS = {"view", "reshape", "permute", "expand", "repeat"}
# Checks export inserts: they compute nothing, and as extra "users" they would hide single-use outputs.
# The reason of a part the example inputs never ran (any other failed part ran: its capture failed).
NOT_CALLED = "not called in the forward pass"
_IGNORED_OPS = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size",
                "_functional_assert_async", "_functional_assert_scalar"}


def capture(model: nn.Module, example_inputs: CallArgs | None = None, *, checked: bool = False,
            repeat_blocks: bool | None = None) -> ModelGraph:
    """Capture ``model``'s graph; see the module docstring for the order of attempts. ``checked``: the
    caller has just run the model on ``example_inputs`` (one forward pass less on a large model).
    ``repeat_blocks``: export each run of identical blocks once and copy it (``graph.blocks``), falling
    back to the whole export when the traced blocks do not prove it; None: only for a model of
    ``verify.LEAN_BYTES`` of weights or more, where the whole export costs seconds.

    A failed attempt is one line in ``ModelGraph.attempts``; what torch printed, logged or warned
    while failing (e.g. the partial graph of a failed export) is kept off the terminal."""
    with without_kv_cache(model):
        if example_inputs is not None and not checked:
            check_inputs(model, example_inputs)
        with quiet_torch():
            return _capture(model, example_inputs, repeat_blocks)


@contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Turn off the KV cache of every transformers config in ``model`` (a decoder returns its cache
    object, which torch.export refuses: "Found DynamicCache in output"), and restore the user's
    settings afterwards. What the CLI's loader does for good (``loading.prepare_hf_model``), done
    for the duration of a capture or a pass on a model the user holds."""
    changed = []
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None) is True and all(c is not config for c, _ in changed):
            try:
                config.use_cache = False
            except Exception:  # noqa: BLE001 - a read-only config: capture as it is
                continue
            changed.append((config, True))
    try:
        yield
    finally:
        for config, value in changed:
            config.use_cache = value


def _capture(model: nn.Module, example_inputs: CallArgs | None, repeat_blocks: bool | None = None) -> ModelGraph:
    attempts: list[tuple[str, str]] = []
    if example_inputs is not None:
        runs = find_runs(model) if _repeats(model, repeat_blocks) else []
        if runs:
            try:
                nodes = _export_repeated(model, example_inputs, runs)
                return ModelGraph(model, "export", nodes, [CapturedPart("", "export")], attempts,
                                  notes=[r.note() for r in runs])
            except Exception as e:  # noqa: BLE001 - the whole export decides
                attempts.append(("export of repeated blocks once", one_line(e, typed=not isinstance(e, NotRepeatable),
                                                                           limit=200)))
        try:
            nodes = _export_nodes(model, example_inputs)
            return ModelGraph(model, "export", nodes, [CapturedPart("", "export")], attempts)
        except Exception as e:  # noqa: BLE001 - any failure means: try the next method
            attempts.append(("export", one_line(e, typed=True, limit=200)))
    try:
        nodes = _fx_nodes(model, example_inputs)
        return ModelGraph(model, "fx", nodes, [CapturedPart("", "fx")], attempts)
    except Exception as e:  # noqa: BLE001
        attempts.append(("fx", one_line(e, typed=True, limit=200)))
    if example_inputs is None:
        raise NormSurgeonError(
            "torch.fx cannot trace this model without example inputs "
            f"({attempts[-1][1]}); pass `input_shapes` so it can be captured with torch.export")
    return _capture_per_child(model, example_inputs, attempts)


def check_inputs(model: nn.Module, example_inputs: CallArgs) -> None:
    """Run the model once, so that inputs it rejects give one clear error instead of a failed capture."""
    modes = eval_modes(model)
    try:
        with torch.no_grad():
            example_inputs.call(model)
    except Exception as e:  # noqa: BLE001
        raise rejected(example_inputs, e) from e
    finally:
        restore_modes(modes)


def rejected(example_inputs: CallArgs, e: BaseException) -> NormSurgeonError:
    """The one error for a model that fails on its own example inputs."""
    shapes = ", ".join("x".join(map(str, t.shape)) for t in example_inputs.tensors())
    return NormSurgeonError(f"the model rejects its example inputs ({shapes}): {one_line(e, typed=True, limit=200)}")


def eval_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode; returns every module's own mode for ``restore_modes``.

    ``model.train(was_training)`` would reset the mode of every submodule to the root's, e.g. turn a
    BatchNorm the user left in training mode inside an eval model into an eval one.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


# --- torch.export ------------------------------------------------------------------------------

def _export_nodes(model: nn.Module, ci: CallArgs, prefix: str = "", call: int = 0) -> list[GNode]:
    """The export graph's nodes; ``prefix``: the path of ``model`` inside the whole model (per child),
    ``call``: which call of it this is (node names and call keys of a later call end in ``@call``)."""
    modes = eval_modes(model)
    try:
        ep = torch.export.export(model, ci.args, ci.kwargs, strict=False)
    finally:
        restore_modes(modes)
    return program_nodes(ep, prefix, call)


def _repeats(model: nn.Module, repeat_blocks: bool | None) -> bool:
    if repeat_blocks is not None:
        return repeat_blocks
    from ..verify import LEAN_BYTES  # verify imports this module

    return sum(p.numel() * p.element_size() for p in model.parameters()) >= LEAN_BYTES


def _export_repeated(model: nn.Module, ci: CallArgs, runs: list[Run]) -> list[GNode]:
    """The whole model's nodes from an export with each run of identical blocks shortened to three."""
    with shortened(runs):
        nodes = _export_nodes(model, ci)
    nodes = expand(nodes, runs)
    for n in nodes:
        n.users = []
    _link_users(nodes)
    return nodes


def program_nodes(ep: torch.export.ExportedProgram, prefix: str = "", call: int = 0) -> list[GNode]:
    """An exported program's graph as ``GNode``s (dynamic sizes at their example values); lifted
    state placeholders are ``param`` nodes named by their state name. ``prefix``/``call``: as in
    ``_export_nodes`` (a child captured alone)."""
    sig = ep.graph_signature
    param_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                   **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    key_prefix = f"{prefix}@{call}" if call else prefix
    mapping: dict[torch.fx.Node, GNode] = {}
    nodes: list[GNode] = []
    for fx in ep.graph.nodes:
        if fx.op == "call_function" and _op_name(fx.target) in _IGNORED_OPS:
            continue
        val = fx.meta.get("val")
        shape, dtype = _shape_dtype(val)
        if fx.op == "placeholder":
            pname = param_names.get(fx.name)
            node = GNode(_pre(key_prefix, fx.name), "param" if pname else "input", shape=shape, dtype=dtype,
                         param=_join(prefix, pname) if pname else None)
        elif fx.op == "output":
            node = GNode(_pre(key_prefix, fx.name), "output", args=_map_args(fx.args, mapping))
        else:
            stack = fx.meta.get("nn_module_stack") or {}
            entries = [(_join(prefix, _clean_path(v[0])), _type_name(v[1])) for v in stack.values()]
            keys = list(stack.keys())
            path = entries[-1][0] if entries else (prefix or "")
            key = _pre(key_prefix, keys[-1]) if keys else (key_prefix or "") + "@root"
            node = GNode(_pre(key_prefix, fx.name), _op_name(fx.target), fx.target, _map_args(fx.args, mapping),
                         {k: _map_arg(v, mapping) for k, v in fx.kwargs.items()}, path, key, entries,
                         shape, dtype)
        mapping[fx] = node
        nodes.append(node)
    _link_users(nodes)
    return nodes


def _clean_path(path: str) -> str:
    # Older torch versions spell paths as "L['self'].a.b"; normalise to "a.b".
    for junk in ("L['self'].", "L['self']", "L__self__.", "L__self__"):
        if path.startswith(junk):
            path = path[len(junk):]
    return path


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if target in _OPERATORS:
        return _OPERATORS[target]
    return getattr(target, "__name__", str(target))


# --- torch.fx ----------------------------------------------------------------------------------

def _fx_nodes(model: nn.Module, ci: CallArgs | None) -> list[GNode]:
    gm = torch.fx.symbolic_trace(model)
    if ci is not None:
        try:
            from torch.fx.passes.shape_prop import ShapeProp
            if not ci.kwargs:
                ShapeProp(gm).propagate(*ci.args)
        except Exception:  # noqa: BLE001 - shapes are a bonus for FX graphs
            pass
    modules = dict(gm.named_modules())
    mapping: dict[torch.fx.Node, GNode] = {}
    nodes: list[GNode] = []
    for fx in gm.graph.nodes:
        tm = fx.meta.get("tensor_meta")
        shape = tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
        dtype = getattr(tm, "dtype", None) if tm is not None else None
        stack = fx.meta.get("nn_module_stack") or {}
        entries = [(_clean_path(v[0]), _type_name(v[1])) for v in stack.values()]
        path = entries[-1][0] if entries else ""
        args = _map_args(fx.args, mapping)
        kwargs = {k: _map_arg(v, mapping) for k, v in fx.kwargs.items()}
        if fx.op == "placeholder":
            node = GNode(fx.name, "input", shape=shape, dtype=dtype)
        elif fx.op == "get_attr":
            node = GNode(fx.name, "param", param=str(fx.target), shape=shape, dtype=dtype)
        elif fx.op == "output":
            node = GNode(fx.name, "output", args=args)
        elif fx.op == "call_module":
            mod = modules[fx.target]
            op = next((name for cls, name in _MODULE_OPS if isinstance(mod, cls)), "module")
            entries = entries or [(str(fx.target), type(mod).__name__)]
            # One FX node per call: the node name tells calls of a shared module apart.
            node = GNode(fx.name, op, mod, args, kwargs, str(fx.target), f"{fx.target}#{fx.name}", entries,
                         shape, dtype, leaf_module=True)
        else:
            op = fx.target if fx.op == "call_method" else _op_name(fx.target)
            if fx.op == "call_method" and op in _VARARG_METHODS and len(args) >= 2 and isinstance(args[1], int):
                args = (args[0], list(args[1:]))
            # the module stack's last key tells calls apart ("a.b", then "a.b@1" for its second call)
            key = f"{list(stack)[-1]}#fx" if stack else "#fx"
            node = GNode(fx.name, op, fx.target, args, kwargs, path, key, entries, shape, dtype)
        mapping[fx] = node
        nodes.append(node)
    _link_users(nodes)
    return nodes


# --- per child ---------------------------------------------------------------------------------

def _capture_per_child(model: nn.Module, ci: CallArgs, attempts: list[tuple[str, str]]) -> ModelGraph:
    recorded = _record_module_inputs(model, ci)
    nodes: list[GNode] = []
    parts: list[CapturedPart] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if not any(True for _ in child.parameters()) and not any(True for _ in child.children()):
                continue  # stateless leaf (activation, dropout): nothing to find or fold in it alone
            if child_path not in recorded:
                if any(p.startswith(child_path + ".") for p in recorded):
                    visit(child_path, child)  # a container (ModuleList...) is never called; its children ran
                else:
                    parts.append(CapturedPart(child_path, "failed", NOT_CALLED))
                continue
            try:
                # every call, each on its own inputs: a module called twice shows two calls, as in export
                calls = [_export_nodes(child, args, prefix=child_path, call=i)
                         for i, args in enumerate(recorded[child_path])]  # all or none of its calls
                nodes.extend(n for call_nodes in calls for n in call_nodes)
                parts.append(CapturedPart(child_path, "export"))
            except Exception as e:  # noqa: BLE001
                if any(True for _ in child.children()):
                    visit(child_path, child)
                else:
                    parts.append(CapturedPart(child_path, "failed", one_line(e, typed=True, limit=200)))

    visit("", model)  # attempts lists failed methods only: describe() says how many parts this one captured
    return ModelGraph(model, "per-child", nodes, parts, attempts)


def _record_module_inputs(model: nn.Module, ci: CallArgs) -> dict[str, list[CallArgs]]:
    """The inputs of every call of each module during one forward pass of the whole model."""
    recorded: dict[str, list[CallArgs]] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module, args, kwargs):
            recorded.setdefault(path, []).append(CallArgs(tuple(args), dict(kwargs)))
        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(hook_for(path), with_kwargs=True))
    modes = eval_modes(model)
    try:
        with torch.no_grad():
            ci.call(model)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"the model fails on its example inputs: {type(e).__name__}: {one_line(e, typed=True, limit=200)}") from e
    finally:
        restore_modes(modes)
        for h in handles:
            h.remove()
    return recorded


# --- helpers -----------------------------------------------------------------------------------

def _map_arg(a: Any, mapping: dict) -> Any:
    if isinstance(a, torch.fx.Node):
        return mapping[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_map_arg(x, mapping) for x in a)
    if isinstance(a, dict):
        return {k: _map_arg(v, mapping) for k, v in a.items()}
    return a


def _map_args(args: tuple, mapping: dict) -> tuple:
    return tuple(_map_arg(a, mapping) for a in args)


def _link_users(nodes: list[GNode]) -> None:
    for n in nodes:
        for i in dict.fromkeys(n.inputs):
            i.users.append(n)


def size_hint(d: Any) -> int | None:
    """A size as an int: a dynamic one at its example value; None for an unbacked one."""
    if isinstance(d, int):
        return d
    try:
        hint = d.node.hint
        if hint is None:
            hint = d.node.shape_env.size_hint(d.node.expr)
        return int(hint)
    except Exception:  # noqa: BLE001 - an unbacked size: no shape for this node
        return None


def _shape_dtype(val: Any) -> tuple[tuple | None, torch.dtype | None]:
    if isinstance(val, torch.Tensor):
        dims = [size_hint(d) for d in val.shape]
        return (None if None in dims else tuple(dims)), val.dtype
    return None, None


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]


def _join(prefix: str, path: str | None) -> str:
    if not prefix:
        return path or ""
    return f"{prefix}.{path}" if path else prefix


def _pre(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name
