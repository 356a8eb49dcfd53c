"""Count the normalization ops of an ONNX graph: fused ops (ONNX and ONNX Runtime contrib domains,
inside functions and subgraphs too) and mean/variance patterns decomposed into primitive ops, as
exported and after ONNX Runtime's optimizations."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import NormSurgeonError, one_line

__all__ = ["NORM_OP_TYPES", "count_norm_ops"]

#: Fused normalization op types, in ONNX and in ONNX Runtime's contrib domains.
NORM_OP_TYPES = (
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization", "GroupNorm", "SkipGroupNorm",
    "MeanVarianceNormalization", "BatchNormInternal",
)


def load_structure(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise NormSurgeonError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: not a readable ONNX model: {one_line(e)}") from e


def count_norm_ops(onnx_path_or_model) -> dict[str, int]:
    """Normalization ops in an ONNX model (path or ``onnx.ModelProto``): ``{op_type: count}``.

    Fused ops (``NORM_OP_TYPES``, any domain) are counted by type; normalizations written out in primitive
    ops are counted as ``decomposed_layernorm`` (ReduceMean → Sub → Pow/Mul → ReduceMean → Add → Sqrt) and
    ``decomposed_rmsnorm`` (Pow/Mul → ReduceMean → Add → Sqrt, no mean subtraction). Subgraphs (If/Loop)
    and local functions are counted where they are called. Only non-zero counts are returned.
    """
    model = load_structure(onnx_path_or_model)
    functions = {(f.domain, f.name): f for f in model.functions}
    counts: Counter = Counter()
    _count_graph(model.graph.node, list(model.graph.initializer), functions, counts, depth=0)
    return dict(sorted(counts.items()))


def _count_graph(nodes, initializers, functions, counts: Counter, depth: int) -> None:
    if depth > 20:
        return
    for node in nodes:
        if node.op_type in NORM_OP_TYPES:
            counts[node.op_type] += 1
        fn = functions.get((node.domain, node.op_type))
        if fn is not None:
            _count_graph(fn.node, [], functions, counts, depth + 1)
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                _count_graph(attr.g.node, list(attr.g.initializer), functions, counts, depth + 1)
            for g in attr.graphs:
                _count_graph(g.node, list(g.initializer), functions, counts, depth + 1)
    for kind, n in _decomposed_norms(nodes, initializers).items():
        counts[kind] += n


def _decomposed_norms(nodes, initializers) -> Counter:
    """Find Sqrt(ReduceMean(square(y)) + eps) and classify by whether y = x - ReduceMean(x)."""
    from onnx import numpy_helper

    producer = {out: n for n in nodes for out in n.output if out}
    consts: dict[str, np.ndarray] = {}
    for init in initializers:
        with contextlib.suppress(Exception):
            consts[init.name] = numpy_helper.to_array(init)
    for n in nodes:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                with contextlib.suppress(Exception):
                    if a.name == "value":
                        consts[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.name == "value_float":
                        consts[n.output[0]] = np.array(a.f)

    def const(name: str) -> np.ndarray | None:
        seen = 0
        while name not in consts and seen < 4:
            p = producer.get(name)
            if p is None or p.op_type not in ("Cast", "Identity") or not p.input:
                return None
            name, seen = p.input[0], seen + 1
        return consts.get(name)

    def base(name: str) -> str:
        """``name`` with Cast/Identity producers looked through."""
        for _ in range(6):
            p = producer.get(name)
            if p is None or p.op_type not in ("Cast", "Identity"):
                return name
            name = p.input[0]
        return name

    def src(name: str):
        """The node producing ``name``, looking through Cast/Identity."""
        return producer.get(base(name))

    def is_const_value(name: str, value: float) -> bool:
        c = const(name)
        return c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - value) < 1e-6

    found: Counter = Counter()
    for n in nodes:
        if n.op_type == "Sqrt":
            inner = n.input[0]
        elif n.op_type == "Pow" and len(n.input) == 2 and is_const_value(n.input[1], 0.5):
            inner = n.input[0]
        else:
            continue
        add = src(inner)
        var_name = inner
        if add is not None and add.op_type == "Add" and len(add.input) == 2:
            non_const = [i for i in add.input if const(i) is None]
            if len(non_const) != 1:
                continue
            var_name = non_const[0]
        var = src(var_name)
        if var is None or var.op_type != "ReduceMean":
            continue
        sq = src(var.input[0])
        if sq is None:
            continue
        if sq.op_type == "Pow" and len(sq.input) == 2 and is_const_value(sq.input[1], 2.0):
            centered = sq.input[0]
        elif sq.op_type == "Mul" and len(sq.input) == 2 and base(sq.input[0]) == base(sq.input[1]):
            centered = sq.input[0]
        else:
            continue
        sub = src(centered)
        if sub is not None and sub.op_type == "Sub" and len(sub.input) == 2:
            mean = src(sub.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and base(mean.input[0]) == base(sub.input[0]):
                found["decomposed_layernorm"] += 1
                continue
        found["decomposed_rmsnorm"] += 1
    return found
