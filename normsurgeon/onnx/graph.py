"""The graph view of an ONNX model for the passes: an ``onnx_ir`` model (the IR torch's exporter
uses), constant values, and shapes whose dynamic dims are *symbols*, never guesses.

A dim is a monomial ``(coefficient, (symbol, ...))``: ``64`` is ``(64, ())``, ``batch`` is
``(1, ("batch",))``, ``batch*16`` (a flatten of a ``[batch, 16, C]`` token tensor) is
``(16, ("batch",))``; ``None`` is a dim nobody can name. Two dims are equal only if their monomials
are identical, which holds for every value of the symbols: that is what lets the fold follow a
channel axis through a reshape of a dynamic-batch graph and prove it, where a size comparison would
only guess. Shapes are propagated here through the data-movement ops, MatMul/Gemm and elementwise
ops, including the shape tensors exporters compute at run time (``Shape → Gather/Squeeze → Mul →
Concat → Reshape``); for every other op ONNX's own shape inference fills in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NormSurgeonError, one_line

__all__ = ["Dim", "OnnxGraph", "load_ir", "dim_text", "shape_text", "DATA_MOVEMENT", "NONLINEAR"]

Dim = tuple[int, tuple[str, ...]] | None

#: ops that only move data: the channel axis can be followed through them
DATA_MOVEMENT = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"})
#: ops that read only the shape of their input
SHAPE_ONLY = frozenset({"Shape", "Size"})
#: ops that are the identity on their first input
IDENTITY_OPS = frozenset({"Identity", "Dropout"})
NONLINEAR = frozenset({"Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "Elu",
                       "Selu", "Celu", "Softplus", "Softsign", "Mish", "Erf", "Clip", "Softmax", "LogSoftmax",
                       "Exp", "Log", "Sqrt", "Abs", "Max", "Min", "Pow", "Swish", "QuickGelu", "FastGelu",
                       "BiasGelu", "ThresholdedRelu", "Shrink"})
_SAME_SHAPE = NONLINEAR - {"Max", "Min", "Pow", "PRelu"} | {"Identity", "Dropout", "Cast", "CastLike", "Neg",
                                                            "BatchNormalization", "LayerNormalization",
                                                            "RMSNormalization", "Reciprocal", "Floor", "Ceil",
                                                            "Round", "Not", "Sign", "InstanceNormalization"}
_BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater", "And",
                        "Or", "PRelu"})


def load_ir(model: Any):
    """``model`` (a path or an ``onnx.ModelProto``) as an ``onnx_ir.Model``; bad input is one line."""
    import onnx
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    path = Path(os.fspath(model))
    if not path.is_file():
        raise NormSurgeonError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise NormSurgeonError(f"{path}: not a readable ONNX model: {one_line(e)}") from e
    return ir.from_proto(proto)


# --- monomial dims -------------------------------------------------------------------------------

def _mul(a: Dim, b: Dim) -> Dim:
    if a is None or b is None:
        return None
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _div(a: Dim, b: Dim) -> Dim:
    """``a / b`` when it is a monomial for every value of the symbols, else None."""
    if a is None or b is None or b[0] == 0 or a[0] % b[0]:
        return None
    syms = list(a[1])
    for s in b[1]:
        if s not in syms:
            return None
        syms.remove(s)
    return a[0] // b[0], tuple(syms)


def prod(dims: Iterable[Dim]) -> Dim:
    out: Dim = (1, ())
    for d in dims:
        out = _mul(out, d)
    return out


def dim_text(d: Dim) -> str:
    if d is None:
        return "?"
    parts = ([str(d[0])] if d[0] != 1 or not d[1] else []) + list(d[1])
    return "*".join(parts)


def shape_text(shape: list[Dim] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(dim_text(d) for d in shape) + "]"


def _from_ir_dim(d: Any) -> Dim:
    if isinstance(d, int):
        return (d, ())
    value = getattr(d, "value", None)
    if isinstance(value, int):
        return (value, ())
    if isinstance(value, str) and value:
        return (1, (value,))
    return None


def _static(d: Dim) -> int | None:
    return d[0] if d is not None and not d[1] else None


# --- the view ------------------------------------------------------------------------------------

class OnnxGraph:
    """Constants, users and symbolic shapes of one ``onnx_ir`` model's main graph (read-only)."""

    def __init__(self, model, *, shapes: bool = True) -> None:
        self.model = model
        self.graph = model.graph
        self._shapes: dict[int, list[Dim] | None] = {}
        self._values: dict[int, tuple[list[Dim], bool]] = {}  # int shape tensors: (dims, is_scalar)
        self._consts: dict[int, np.ndarray | None] = {}
        self._onnx_shapes = self._inferred_shapes() if shapes else {}
        if not shapes:  # a rewrite reads constants only
            return
        for v in self.graph.inputs:
            self._shapes[id(v)] = None if v.shape is None else [_from_ir_dim(d) for d in v.shape]
        for node in self.graph:
            self._propagate(node)

    # constants
    def const(self, v) -> np.ndarray | None:
        """The value of ``v`` if it is a constant: an initializer, a ``Constant`` node, or a
        data-movement/cast op of constants (a weight the exporter left as ``Transpose(W)``)."""
        if v is None:
            return None
        key = id(v)
        if key not in self._consts:
            self._consts[key] = None  # cycles cannot happen in a valid graph; this also stops recursion
            self._consts[key] = self._const(v)
        return self._consts[key]

    def invalidate(self) -> None:
        """Forget cached constants (after a rewrite changed one)."""
        self._consts.clear()

    def _const(self, v) -> np.ndarray | None:
        # an initializer also listed as a graph input (older exporters) is read as the constant it holds
        if v.const_value is not None and (v.is_initializer() or (v.producer() is None and not v.is_graph_input())):
            try:
                return np.asarray(v.const_value.numpy())
            except Exception:  # noqa: BLE001 - external data that cannot be read, or an odd dtype
                return None
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "Constant":
            for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                a = node.attributes.get(name)
                if a is not None:
                    val = a.value
                    return np.asarray(val.numpy() if hasattr(val, "numpy") else val)
            return None
        if op == "Shape":  # of a constant, or of an input with a static shape
            src = node.inputs[0]
            c = self.const(src)
            dims = list(c.shape) if c is not None else (
                [d for d in src.shape] if src.shape is not None and all(isinstance(d, int) for d in src.shape)
                else None)
            if dims is None:
                return None
            start, end = _attr_int(node, "start", 0), _attr_int(node, "end", None)
            return np.asarray(dims[start:end], dtype=np.int64)
        inputs = [self.const(i) if i is not None else None for i in node.inputs]
        x = inputs[0] if inputs else None
        if x is None:
            return None
        if op == "CastLike" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and node.inputs[1].dtype is not None:
            return x.astype(node.inputs[1].dtype.numpy())
        if op == "Expand" and len(inputs) > 1 and inputs[1] is not None:
            return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(i) for i in inputs[1]))).copy()
        try:
            if op in IDENTITY_OPS:
                return x
            if op == "Cast":
                import onnx_ir as ir

                return x.astype(ir.DataType(node.attributes["to"].value).numpy())
            if op == "Transpose":
                perm = node.attributes.get("perm")
                return np.transpose(x, perm.value if perm is not None else None)
            if op == "Reshape" and inputs[1] is not None:
                shape = [int(s) for s in inputs[1]]
                shape = [x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)]
                return x.reshape(shape)
            if op in ("Squeeze", "Unsqueeze"):
                axes = self._axes(node, inputs)
                if op == "Squeeze":
                    return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
                return np.expand_dims(x, tuple(axes))
        except Exception:  # noqa: BLE001 - not a constant we can evaluate
            return None
        return None

    def _axes(self, node, inputs) -> list[int] | None:
        a = node.attributes.get("axes")
        if a is not None:
            return list(a.value)
        if len(inputs) > 1 and inputs[1] is not None:
            return [int(i) for i in np.asarray(inputs[1]).reshape(-1)]
        return None

    def is_const(self, v) -> bool:
        return self.const(v) is not None

    # shapes
    def shape(self, v) -> list[Dim] | None:
        if v is None:
            return None
        if id(v) in self._shapes:
            return self._shapes[id(v)]
        c = self.const(v)
        if c is not None:
            return [(int(d), ()) for d in c.shape]
        return self._onnx_shapes.get(v.name)

    def rank(self, v) -> int | None:
        s = self.shape(v)
        return None if s is None else len(s)

    def _inferred_shapes(self) -> dict[str, list[Dim] | None]:
        """ONNX's shape inference on a weightless copy (it needs initializer dims, not their data)."""
        import onnx
        import onnx_ir as ir

        try:
            proto = ir.to_proto(self.model)
            for t in proto.graph.initializer:  # keep dims and type, drop the bytes
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    t.ClearField(f)
                t.ClearField("external_data")
                t.data_location = onnx.TensorProto.DEFAULT
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is a help, not a requirement
            return {}
        out: dict[str, list[Dim] | None] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if not t.HasField("shape"):
                continue
            dims: list[Dim] = []
            for d in t.shape.dim:
                if d.HasField("dim_value"):
                    dims.append((d.dim_value, ()))
                elif d.HasField("dim_param") and d.dim_param and not d.dim_param.startswith("unk__"):
                    dims.append((1, (d.dim_param,)))
                else:
                    dims.append(None)
            out[vi.name] = dims
        return out

    def shape_value(self, v) -> tuple[list[Dim], bool] | None:
        """A 1-D (or scalar) integer tensor as symbolic dims: what a ``Reshape`` receives as its shape."""
        if v is None:
            return None
        if id(v) in self._values:
            return self._values[id(v)]
        c = self.const(v)
        if c is not None and np.issubdtype(c.dtype, np.integer) and c.ndim <= 1:
            return [(int(i), ()) for i in c.reshape(-1)], c.ndim == 0
        return None

    def _propagate(self, node) -> None:
        try:
            self._propagate_value(node)
            shape = self._propagate_shape(node)
        except Exception:  # noqa: BLE001 - a shape we cannot derive is unknown, never wrong
            shape = None
        if node.outputs:
            out = node.outputs[0]
            if shape is None:
                shape = self._onnx_shapes.get(out.name)
            self._shapes[id(out)] = shape

    def _propagate_shape(self, node) -> list[Dim] | None:
        if node.domain not in ("", "ai.onnx") or not node.inputs:
            return None
        op = node.op_type
        ins = list(node.inputs)
        x = self.shape(ins[0])
        if op == "Constant":
            return None
        if op in _SAME_SHAPE:
            return x
        if x is None:
            return None
        if op == "Reshape":
            target = self.shape_value(ins[1])
            if target is None:
                return None
            allowzero = node.attributes.get("allowzero")
            return _reshape(x, target[0], bool(allowzero.value) if allowzero is not None else False)
        if op == "Flatten":
            a = node.attributes.get("axis")
            axis = (a.value if a is not None else 1) % (len(x) + 1) if x else 0
            return [prod(x[:axis]), prod(x[axis:])]
        if op == "Transpose":
            perm = node.attributes.get("perm")
            perm = list(perm.value) if perm is not None else list(reversed(range(len(x))))
            return [x[p] for p in perm]
        if op in ("Squeeze", "Unsqueeze"):
            consts = [self.const(i) if i is not None else None for i in ins]
            axes = self._axes(node, consts)
            if op == "Squeeze":
                if axes is None:
                    if any(d is None or d[1] for d in x):
                        return None
                    return [d for d in x if d != (1, ())]
                axes = {a % len(x) for a in axes}
                return [d for i, d in enumerate(x) if i not in axes]
            if axes is None:
                return None
            n = len(x) + len(axes)
            axes = sorted(a % n for a in axes)
            out = list(x)
            for a in axes:
                out.insert(a, (1, ()))
            return out
        if op in _BROADCAST:
            shapes = [self.shape(i) for i in ins]
            if any(s is None for s in shapes):
                return None
            return _broadcast(shapes)
        if op == "MatMul":
            a, b = x, self.shape(ins[1])
            if b is None or len(a) < 2 or len(b) < 2:
                return None
            batch = _broadcast([a[:-2], b[:-2]])
            return None if batch is None else batch + [a[-2], b[-1]]
        if op == "Gemm":
            b = self.shape(ins[1])
            ta, tb = node.attributes.get("transA"), node.attributes.get("transB")
            if b is None or len(x) != 2 or len(b) != 2:
                return None
            m = x[1] if ta is not None and ta.value else x[0]
            n = b[0] if tb is not None and tb.value else b[1]
            return [m, n]
        return None

    def _propagate_value(self, node) -> None:
        """Symbolic values of the small integer tensors that become shapes."""
        if node.domain not in ("", "ai.onnx") or not node.outputs:
            return
        op = node.op_type
        ins = list(node.inputs)
        out = node.outputs[0]
        result: tuple[list[Dim], bool] | None = None
        if op == "Shape":
            s = self.shape(ins[0])
            if s is None:
                return
            start = node.attributes.get("start")
            end = node.attributes.get("end")
            r = len(s)
            lo = start.value if start is not None else 0
            hi = end.value if end is not None else r
            lo, hi = max(0, lo + r if lo < 0 else lo), min(r, hi + r if hi < 0 else hi)
            result = (s[lo:hi], False)
        elif op in ("Cast", "Identity"):
            result = self.shape_value(ins[0])
        elif op == "Gather":
            v, idx = self.shape_value(ins[0]), self.const(ins[1])
            axis = node.attributes.get("axis")
            if v is None or idx is None or (axis is not None and axis.value != 0) or v[1]:
                return
            picked = [v[0][int(i)] for i in idx.reshape(-1)]
            result = (picked, idx.ndim == 0)
        elif op == "Concat":
            parts = [self.shape_value(i) for i in ins]
            if any(p is None for p in parts):
                return
            result = ([d for p in parts for d in p[0]], False)
        elif op == "Unsqueeze":
            v = self.shape_value(ins[0])
            if v is not None and v[1]:
                result = (v[0], False)
        elif op == "Squeeze":
            v = self.shape_value(ins[0])
            if v is not None and not v[1] and len(v[0]) == 1:
                result = (v[0], True)
        elif op == "Reshape":
            v, t = self.shape_value(ins[0]), self.const(ins[1])
            if v is not None and t is not None and t.size <= 1 and len(v[0]) == 1:
                result = (v[0], t.size == 0)
        elif op == "Slice":
            v = self.shape_value(ins[0])
            consts = [self.const(i) if i is not None else None for i in ins[1:]]
            if v is None or v[1] or consts[0] is None or consts[1] is None:
                return
            axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.array([0])
            steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.array([1])
            if list(axes.reshape(-1)) not in ([0], [-1]):
                return
            result = (v[0][slice(int(consts[0].reshape(-1)[0]), int(consts[1].reshape(-1)[0]),
                                 int(steps.reshape(-1)[0]))], False)
        elif op in ("Mul", "Div"):
            a, b = self.shape_value(ins[0]), self.shape_value(ins[1])
            if a is None or b is None:
                return
            if len(a[0]) == 1 and len(b[0]) >= 1:
                a = (a[0] * len(b[0]), a[1])
            if len(b[0]) == 1 and len(a[0]) >= 1:
                b = (b[0] * len(a[0]), b[1])
            if len(a[0]) != len(b[0]):
                return
            f = _mul if op == "Mul" else _div
            dims = [f(p, q) for p, q in zip(a[0], b[0])]
            if any(d is None for d in dims):
                return
            result = (dims, a[1] and b[1])
        if result is not None:
            self._values[id(out)] = result

    # users
    @staticmethod
    def users(v) -> list:
        """The nodes reading the *data* of ``v`` (a node reading it twice is listed once): a ``Shape``
        or ``Size`` node reads only its shape, which no fold changes (exporters compute the shape of
        a reshape back from the tensor it restores)."""
        seen: list = []
        for use in v.uses():
            node = use[0] if isinstance(use, tuple) else use.node
            if node.op_type in SHAPE_ONLY and node.domain in ("", "ai.onnx"):
                continue
            if all(node is not s for s in seen):
                seen.append(node)
        return seen


def _reshape(x: list[Dim], target: list[Dim], allowzero: bool) -> list[Dim] | None:
    out: list[Dim] = []
    unknown = -1
    for i, d in enumerate(target):
        if d == (0, ()) and not allowzero:
            if i >= len(x):
                return None
            out.append(x[i])
        elif d == (-1, ()):
            if unknown >= 0:
                return None
            unknown = i
            out.append(None)
        else:
            if d is not None and d[0] < 0:
                return None
            out.append(d)
    if unknown >= 0:
        rest = prod(d for i, d in enumerate(out) if i != unknown)
        out[unknown] = _div(prod(x), rest)
        if out[unknown] is None:
            return None
    return out


def _broadcast(shapes: list[list[Dim]]) -> list[Dim] | None:
    n = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(n):
        dims = [s[len(s) - n + i] for s in shapes if len(s) - n + i >= 0]
        non1 = [d for d in dims if d != (1, ())]
        if not non1:
            out.append((1, ()))
        elif all(d is not None and d == non1[0] for d in non1):
            out.append(non1[0])
        else:
            return None
    return out


def map_axis_through_reshape(in_shape: list[Dim], out_shape: list[Dim], axis: int) -> int | None:
    """Where input axis ``axis`` lands after a row-major reshape, or None when it is merged, split or
    not provable: output axis ``a`` is it iff its dim and the product of the dims after it are
    identical monomials (``graph.ops.map_axis_through_reshape`` over symbols)."""
    n, trailing = in_shape[axis], prod(in_shape[axis + 1:])
    if n is None or trailing is None:
        return None
    for a, m in enumerate(out_shape):
        if m == n and prod(out_shape[a + 1:]) == trailing:
            return a
    return None


def map_channels_through_reshape(in_shape: list[Dim], out_shape: list[Dim], axis: int, stride: int, n: int
                                 ) -> tuple[int, int] | None:
    """``graph.ops.map_channels_through_reshape`` over monomials: (axis, stride) of ``n`` channels whose
    index ``i`` along ``axis`` holds channel ``(i // stride) % n``, or None."""
    after = prod(in_shape[axis + 1:])
    if after is None or after[1]:
        if stride == 1:
            a = map_axis_through_reshape(in_shape, out_shape, axis)
            return None if a is None else (a, 1)
        return None
    period = stride * after[0]
    for a, m in enumerate(out_shape):
        trailing = prod(out_shape[a + 1:])
        if m is None or trailing is None or m[1] or trailing[1]:
            continue
        if period % trailing[0] == 0 and (m[0] * trailing[0]) % (n * period) == 0:
            return a, period // trailing[0]
    return None


def static_ints(shape: list[Dim] | None) -> list[int] | None:
    if shape is None:
        return None
    out = [_static(d) for d in shape]
    return None if any(d is None for d in out) else out  # type: ignore[return-value]


def numel(shape: list[Dim]) -> int | None:
    p = prod(shape)
    return None if p is None or p[1] else p[0]



def _attr_int(node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else int(a.value)
