"""Folding BatchNormalization in .onnx files: hand-built graphs of every pattern and trap, LeViT from
both torch exporters, verified here independently in ONNX Runtime at two sizes of the dynamic dim."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normsurgeon.onnx.fold import fold_onnx

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _w(name, *shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _bn(name, c, x, y):
    inits = [numpy_helper.from_array((RNG.random(c) + 0.5).astype(np.float32), f"{name}.g"),
             numpy_helper.from_array((RNG.standard_normal(c) * 0.3).astype(np.float32), f"{name}.b"),
             numpy_helper.from_array((RNG.standard_normal(c) * 0.3).astype(np.float32), f"{name}.m"),
             numpy_helper.from_array((RNG.random(c) + 0.5).astype(np.float32), f"{name}.v")]
    node = helper.make_node("BatchNormalization", [x] + [i.name for i in inits], [y], name=name, epsilon=1e-5)
    return node, inits


def _const(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(nodes, inits, inputs, out_name="y", opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [helper.make_tensor_value_info(out_name, F, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)  # the output's shape, as exporters write it
    onnx.checker.check_model(m)
    return m


def _bns(m):
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def _run(m, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _max_rel(a, b, inputs, batches=(1, 5)):
    """Max relative error (max abs / max |expected|) of ``b`` vs ``a`` at two sizes of the batch dim."""
    worst = 0.0
    for n in batches:
        feeds = {name: RNG.standard_normal([n if isinstance(d, str) else d for d in shape]).astype(np.float32)
                 for name, shape in inputs}
        for e, got in zip(_run(a, feeds), _run(b, feeds)):
            worst = max(worst, float(np.abs(e - got).max() / np.abs(e).max()))
    return worst


# --- graphs -------------------------------------------------------------------------------------------

def conv_bn(groups=1, transposed=False, dims=2, c_in=4, c_out=6, shared_output=False):
    op = "ConvTranspose" if transposed else "Conv"
    k = [3] * dims
    w = _w("W", *((c_in, c_out // groups) if transposed else (c_out, c_in // groups)), *k)
    nodes = [helper.make_node(op, ["x", "W"], ["h"], name="conv", group=groups, pads=[1] * 2 * dims)]
    bn, inits = _bn("bn", c_out, "h", "z")
    nodes.append(bn)
    if shared_output:
        nodes.append(helper.make_node("Add", ["z", "h"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["z"], ["y"]))
    return _model(nodes, [w] + inits, [("x", ["batch", c_in] + [8] * dims)])


def gemm_bn(alpha=1.0, beta=1.0):
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["h"], transB=1, alpha=alpha, beta=beta, name="fc")]
    bn, inits = _bn("bn", 6, "h", "y")
    return _model(nodes + [bn], [_w("W", 6, 8), _w("C", 6)] + inits, [("x", ["batch", 8])])


def matmul_bn_2d():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    bn, inits = _bn("bn", 6, "h", "y")
    return _model(nodes + [bn], [_w("W", 8, 6)] + inits, [("x", ["batch", 8])])


def token_matmul_bn(bias=False, via="reshape", computed_shape=True):
    """[B, 16, 8] @ W[8, 12] (+ b) -> Reshape [-1, 12] -> BN -> Reshape back (LeViT's token BN)."""
    nodes, inits = [helper.make_node("MatMul", ["x", "W"], ["h0"], name="mm")], [_w("W", 8, 12)]
    h = "h0"
    if bias:
        nodes.append(helper.make_node("Add", ["h0", "B"], ["h"]))
        inits.append(_w("B", 12))
        h = "h"
    if via == "reshape":
        if computed_shape:  # the dynamo exporter's Shape -> Squeeze -> Mul -> Concat
            nodes += [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
                      helper.make_node("Squeeze", ["s"], ["b"]),
                      helper.make_node("Mul", ["b", "sixteen"], ["bn_rows"]),
                      helper.make_node("Unsqueeze", ["bn_rows", "ax0"], ["rows"]),
                      helper.make_node("Concat", ["rows", "c12"], ["shape2"], axis=0)]
            inits += [_const("sixteen", 16), _const("ax0", [0]), _const("c12", [12])]
        else:
            inits.append(_const("shape2", [-1, 12]))
        nodes.append(helper.make_node("Reshape", [h, "shape2"], ["flat"]))
        bn, bi = _bn("bn", 12, "flat", "z")
        nodes += [bn, helper.make_node("Shape", [h], ["back"]), helper.make_node("Reshape", ["z", "back"], ["y"])]
    elif via == "flatten":
        nodes.append(helper.make_node("Flatten", [h], ["flat"], axis=2))
        bn, bi = _bn("bn", 12, "flat", "z")
        nodes += [bn, helper.make_node("Shape", [h], ["back"]), helper.make_node("Reshape", ["z", "back"], ["y"])]
    else:  # transpose to [B, 12, 16]
        nodes.append(helper.make_node("Transpose", [h], ["tr"], perm=[0, 2, 1]))
        bn, bi = _bn("bn", 12, "tr", "y")
        nodes.append(bn)
    return _model(nodes, inits + bi, [("x", ["batch", 16, 8])])


def matmul_unsqueeze_bn():
    """[B, 8] @ W -> Unsqueeze(2) -> BN1d over [B, 12, 1] -> Squeeze."""
    bn, inits = _bn("bn", 12, "u", "z")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Unsqueeze", ["h", "ax2"], ["u"]), bn, helper.make_node("Squeeze", ["z", "ax2"], ["y"])]
    return _model(nodes, inits + [_w("W", 8, 12), _const("ax2", [2])], [("x", ["batch", 8])])


def conv_add_bn():
    """A converter's Conv without bias + Add(bias [1, C, 1, 1]) -> BN."""
    bn, inits = _bn("bn", 6, "h", "y")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h0"], name="conv"), helper.make_node("Add", ["h0", "B"], ["h"]), bn]
    return _model(nodes, inits + [_w("W", 6, 4, 1, 1), _w("B", 1, 6, 1, 1)], [("x", ["batch", 4, 5, 5])])


def gemm_c_row_bn():
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["h"], name="fc")]  # transB=0: W is (in, out)
    bn, inits = _bn("bn", 6, "h", "y")
    return _model(nodes + [bn], [_w("W", 8, 6), _w("C", 1, 6)] + inits, [("x", ["batch", 8])])


def bn_transpose_matmul():
    """BN1d over [B, C, N] -> Transpose(0, 2, 1) -> MatMul over C (a BN before a token Linear)."""
    bn, inits = _bn("bn", 8, "x", "z")
    nodes = [bn, helper.make_node("Transpose", ["z"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "W"], ["y"], name="mm")]
    return _model(nodes, inits + [_w("W", 8, 5)], [("x", ["batch", 8, "tokens"])])


def bn_matmul_bn():
    """BN -> MatMul -> BN: one MatMul takes a BN on each side (both edit its weight and its bias)."""
    bn1, i1 = _bn("bn1", 8, "x", "z")
    bn2, i2 = _bn("bn2", 6, "h", "y")
    nodes = [bn1, helper.make_node("MatMul", ["z", "W"], ["h"], name="mm"), bn2]
    return _model(nodes, i1 + i2 + [_w("W", 8, 6)], [("x", ["batch", 8])])


def conv_pool_bn(negative=False, before=False):
    """Conv -> MaxPool -> BN (or BN -> MaxPool -> Conv): a max-pool commutes with a BN whose scale is >= 0."""
    if before:
        bn, inits = _bn("bn", 4, "x", "z")
        nodes = [bn, helper.make_node("MaxPool", ["z"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Conv", ["p", "W"], ["y"], name="conv")]
    else:
        bn, inits = _bn("bn", 4, "p", "y")
        nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"),
                 helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]), bn]
    if negative:
        inits[0] = numpy_helper.from_array(np.array([1.0, -0.5, 0.7, 1.2], np.float32), "bn.g")
    return _model(nodes, inits + [_w("W", 4, 4, 1, 1)], [("x", ["batch", 4, 8, 8])])


def trap_token_axis():
    """[B, 8, 8] @ W[8, 8] -> BN over axis 1: the tokens, not the channels (N == C)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    bn, inits = _bn("bn", 8, "h", "y")
    return _model(nodes + [bn], [_w("W", 8, 8)] + inits, [("x", ["batch", 8, 8])])


def bn_conv(pad=0):
    bn, inits = _bn("bn", 4, "x", "z")
    nodes = [bn, helper.make_node("Conv", ["z", "W", "Bc"], ["y"], name="conv", pads=[pad] * 4)]
    return _model(nodes, inits + [_w("W", 6, 4, 3, 3), _w("Bc", 6)], [("x", ["batch", 4, 8, 8])])


def bn_conv_transpose(pads=2):
    """BN -> ConvTranspose(k=3, stride 1): exact only where every output receives every tap (pads >= 2)."""
    bn, inits = _bn("bn", 4, "x", "z")
    nodes = [bn, helper.make_node("ConvTranspose", ["z", "W"], ["y"], name="convT", pads=[pads] * 4)]
    return _model(nodes, inits + [_w("W", 4, 6, 3, 3)], [("x", ["batch", 4, 8, 8])])


def bn_gemm(flatten=False):
    if flatten:  # the classifier head: BN2d -> Flatten -> Gemm over C*H*W features
        bn, inits = _bn("bn", 4, "x", "z")
        nodes = [bn, helper.make_node("Flatten", ["z"], ["f"], axis=1),
                 helper.make_node("Gemm", ["f", "W"], ["y"], transB=1, name="head")]
        return _model(nodes, inits + [_w("W", 5, 4 * 3 * 3)], [("x", ["batch", 4, 3, 3])])
    bn, inits = _bn("bn", 8, "x", "z")
    nodes = [bn, helper.make_node("Gemm", ["z", "W", "C"], ["y"], transB=1, name="fc")]
    return _model(nodes, inits + [_w("W", 5, 8), _w("C", 5)], [("x", ["batch", 8])])


def bn_matmul_readers():
    """One BN read by two MatMuls (q and k after one norm); the second already has a bias Add."""
    bn, inits = _bn("bn", 8, "x", "z")
    nodes = [bn, helper.make_node("MatMul", ["z", "Wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["z", "Wk"], ["k0"], name="k"), helper.make_node("Add", ["k0", "Bk"], ["k"]),
             helper.make_node("Add", ["q", "k"], ["y"])]
    return _model(nodes, inits + [_w("Wq", 8, 6), _w("Wk", 8, 6), _w("Bk", 6)], [("x", ["batch", 8])])


def bn_relu():
    bn, inits = _bn("bn", 4, "x", "z")
    return _model([bn, helper.make_node("Relu", ["z"], ["y"])], inits, [("x", ["batch", 4, 5])])


def shared_weight():
    """Two Convs read the same W; a BN after one of them must not change the other."""
    bn, inits = _bn("bn", 4, "h1", "z")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h1"], name="c1"), helper.make_node("Conv", ["x", "W"], ["h2"], name="c2"),
             bn, helper.make_node("Add", ["z", "h2"], ["y"])]
    return _model(nodes, inits + [_w("W", 4, 4, 1, 1)], [("x", ["batch", 4, 5, 5])])


def relu_between():
    bn, inits = _bn("bn", 4, "r", "y")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), helper.make_node("Relu", ["h"], ["r"]), bn]
    return _model(nodes, inits + [_w("W", 4, 3, 1, 1)], [("x", ["batch", 3, 5, 5])])


def trap_rows_2d():
    """[16, 8] @ W -> Reshape [1, 16, 16] -> BN over axis 1: the MatMul's rows, not its columns."""
    bn, inits = _bn("bn", 16, "r", "y")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "s"], ["r"]), bn]
    return _model(nodes, inits + [_w("W", 8, 16), _const("s", [1, 16, 16])], [("x", [16, 8])])


def trap_tokens_split():
    """[64, 8] @ W[8, 16] -> Reshape [4, 16, 16] -> BN over axis 1: 16 tokens, not the 16 channels."""
    bn, inits = _bn("bn", 16, "r", "y")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "s"], ["r"]), bn]
    return _model(nodes, inits + [_w("W", 8, 16), _const("s", [4, 16, 16])], [("x", [64, 8])])


def matmul_reshape_transpose_bn():
    """2-D [16, 8] @ W -> Reshape [1, 16, 16] -> Transpose -> BN over the columns."""
    bn, inits = _bn("bn", 16, "t", "y")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "s"], ["r"]), helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             bn]
    return _model(nodes, inits + [_w("W", 8, 16), _const("s", [1, 16, 16])], [("x", [16, 8])])


def constant_node_weights():
    """Weights as Constant nodes, no initializers at all (some converters emit these)."""
    m = conv_bn()
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    g = helper.make_graph(consts + list(m.graph.node), "g", list(m.graph.input), list(m.graph.output))
    out = helper.make_model(g, opset_imports=list(m.opset_import))
    out.ir_version = 8
    return out


FOLDABLE = {
    "conv->bn": conv_bn, "depthwise conv->bn": lambda: conv_bn(groups=4, c_in=4, c_out=4),
    "convT->bn": lambda: conv_bn(transposed=True), "grouped convT->bn": lambda: conv_bn(groups=2, transposed=True),
    "conv1d->bn": lambda: conv_bn(dims=1), "conv3d->bn": lambda: conv_bn(dims=3),
    "gemm->bn": gemm_bn, "gemm(alpha, beta)->bn": lambda: gemm_bn(0.5, 2.0), "matmul->bn": matmul_bn_2d,
    "token matmul->reshape(computed)->bn": token_matmul_bn,
    "token matmul->reshape(static -1)->bn": lambda: token_matmul_bn(computed_shape=False),
    "token matmul+add->reshape->bn": lambda: token_matmul_bn(bias=True),
    "token matmul->flatten->bn": lambda: token_matmul_bn(via="flatten"),
    "token matmul->transpose->bn": lambda: token_matmul_bn(via="transpose"),
    "matmul->unsqueeze->bn->squeeze": matmul_unsqueeze_bn, "conv->maxpool->bn": conv_pool_bn,
    "bn->maxpool->conv": lambda: conv_pool_bn(before=True), "bn->matmul->bn": bn_matmul_bn, "conv+add(bias)->bn": conv_add_bn,
    "gemm(transB=0, C [1, N])->bn": gemm_c_row_bn, "bn->transpose->matmul (tokens dynamic)": bn_transpose_matmul,
    "bn->conv (no pad)": bn_conv, "bn->convT (uniform taps)": bn_conv_transpose, "bn->gemm": bn_gemm, "bn->flatten->gemm": lambda: bn_gemm(flatten=True),
    "bn->matmul x2 (readers)": bn_matmul_readers, "constant-node weights": constant_node_weights,
}
STATIC = {"2d matmul->reshape->transpose->bn": matmul_reshape_transpose_bn}
TRAPS = {
    "token axis (N == C)": (trap_token_axis, "axis"), "bn->conv (zero pad)": (lambda: bn_conv(pad=1), "zero-pads"),
    "bn->convT (border taps)": (lambda: bn_conv_transpose(pads=0), "taps"),
    "bn standalone": (bn_relu, "nonlinearity"),
    "conv->maxpool->bn, negative scale": (lambda: conv_pool_bn(negative=True), "max-pool"), "conv output shared": (lambda: conv_bn(shared_output=True), "also read"),
    "shared weight": (shared_weight, "shared"), "relu between": (relu_between, "nonlinearity"),
    "2d rows": (trap_rows_2d, "axis"), "tokens split": (trap_tokens_split, "axis"),
}


def _inputs(m):
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input]


@pytest.mark.parametrize("name", list(FOLDABLE) + list(STATIC))
def test_foldable_graph_loses_every_bn(name):
    m = {**FOLDABLE, **STATIC}[name]()
    before = onnx.ModelProto()
    before.CopyFrom(m)
    folded, report = fold_onnx(m)
    assert m == before  # the caller's model is untouched
    assert _bns(m) >= 1 and _bns(folded) == 0, report.summary()
    assert report.passed and report.batchnorms_left == 0
    onnx.checker.check_model(folded)
    assert [o for o in folded.opset_import] == [o for o in m.opset_import]
    assert folded.graph.input[0] == m.graph.input[0]  # dynamic dims kept
    dynamic = name in FOLDABLE
    assert _max_rel(m, folded, _inputs(m), batches=(1, 5) if dynamic else (None,)) < 1e-5
    if dynamic:  # verified by the pass itself at two other sizes of the dynamic dim
        names = " ".join(c.name for c in report.checks)
        assert "batch=1" in names and "batch=8" in names
    if name != "constant-node weights":  # initializers stay initializers, under their names
        assert {t.name for t in folded.graph.initializer} & {t.name for t in m.graph.initializer}
    else:
        assert not folded.graph.initializer and any(n.op_type == "Constant" for n in folded.graph.node)


@pytest.mark.parametrize("name", list(TRAPS))
def test_trap_is_left_alone_with_a_reason(name):
    build, word = TRAPS[name]
    m = build()
    folded, report = fold_onnx(m)
    assert _bns(folded) == 1
    assert report.passed
    (skipped,) = report.skipped
    assert word in skipped.reason, skipped.reason
    assert _max_rel(m, folded, _inputs(m), batches=(1,) if "batch" in str(_inputs(m)) else (None,)) == 0.0


def test_matmul_gets_its_bias_as_an_add_ort_fuses():
    folded, _ = fold_onnx(matmul_bn_2d())
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["MatMul", "Add"]
    assert any(t.name == "W" for t in folded.graph.initializer)


@pytest.mark.parametrize("build", [gemm_bn, bn_transpose_matmul])
def test_bn_as_graph_output_keeps_the_output_name(build):
    m = build()
    del m.graph.value_info[:]  # exporters need not type intermediate values; a graph output needs a type
    folded, report = fold_onnx(m)
    assert [o.name for o in folded.graph.output] == ["y"] and _bns(folded) == 0 and report.passed
    assert folded.graph.output[0].type == m.graph.output[0].type


def test_rollback_when_the_fold_does_not_verify(monkeypatch):
    """A fold whose math is wrong is caught by ONNX Runtime and rolled back, with the reason."""
    from normsurgeon import fold_math

    real = fold_math.fold_bn_after_conv

    def wrong(weight, bias, scale, shift, **kw):
        w, b = real(weight, bias, scale, shift, **kw)
        return w, b + 1.0

    monkeypatch.setattr(fold_math, "fold_bn_after_conv", wrong)
    m = conv_bn()
    folded, report = fold_onnx(m)
    assert _bns(folded) == 1 and report.passed
    assert report.rolled_back and "changed the outputs" in report.rolled_back[0].reason


def test_user_inputs_join_the_verification(tmp_path):
    m = conv_bn()
    path = tmp_path / "inputs.npz"
    np.savez(path, x=RNG.standard_normal((3, 4, 8, 8)).astype(np.float32))
    _, report = fold_onnx(m, inputs_file=path)
    assert report.user_inputs == 1 and any(c.name == "user inputs 1" and c.passed for c in report.checks)


def test_tiny_outputs_are_judged_against_rounding_not_only_their_scale():
    """A saturated sigmoid map (~1e-4 everywhere): rounding-sized differences pass, real ones do not."""
    from normsurgeon.onnx.ortcheck import Reference

    ref = Reference([], [], rtol=1e-4, atol=1e-6)
    e = np.full((4, 4), 1e-4, np.float32)
    assert ref.judge([e], [e * (1 + 2e-4)])[1]  # relative 2e-4, absolute 2e-8: rounding
    assert not ref.judge([e], [e * 3])[1]


# --- LeViT from both torch exporters ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def levit_onnx(tmp_path_factory):
    import torch

    from normsurgeon import zoo

    model = zoo.levit()
    x = model.example_inputs().kwargs["pixel_values"]

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    w = Logits(model).eval()
    d = tmp_path_factory.mktemp("levit")
    paths = {"torchscript": d / "levit_ts.onnx", "dynamo": d / "levit_dyn.onnx",
             "dynamo optimized": d / "levit_dyn_opt.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(w, (x,), str(paths["torchscript"]), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          dynamic_axes={"pixel_values": {0: "batch"}})
        torch.onnx.export(w, (x,), str(paths["dynamo"]), dynamo=True, optimize=False, verbose=False,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})
        # as a user calls it: the exporter's optimizer folds the 4 Conv -> BN of the patch embedding itself
        torch.onnx.export(w, (x,), str(paths["dynamo optimized"]), dynamo=True, verbose=False,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}})
    return paths


@pytest.mark.parametrize("exporter,count", [("torchscript", 27), ("dynamo", 27), ("dynamo optimized", 23)])
def test_levit_folds_every_bn(levit_onnx, exporter, count):
    path = levit_onnx[exporter]
    m = onnx.load(str(path))
    assert _bns(m) == count
    folded, report = fold_onnx(path)
    assert _bns(folded) == 0 and len(report.folded) == count and report.passed, report.summary()
    assert _max_rel(m, folded, [("pixel_values", ["batch", 3, 64, 64])], batches=(1, 3)) < 1e-5


def test_cli_fold_writes_a_verified_onnx(tmp_path):
    import json

    from click.testing import CliRunner

    from normsurgeon.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(token_matmul_bn(bias=True), str(src))
    out = tmp_path / "folded.onnx"
    res = CliRunner().invoke(main, ["fold", str(src), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["output"] == str(out) and d["summary"]["folded"] == 1 and d["verify"]["passed"]
    assert {c["name"] for c in d["verify"]["checks"]} >= {"example", "batch=1", "batch=8"}
    assert _bns(onnx.load(str(out))) == 0 and _bns(onnx.load(str(src))) == 1
    res = CliRunner().invoke(main, ["fold", str(src), "-o", str(src), "--force"])
    assert res.exit_code == 2 and "input" in res.output
    res = CliRunner().invoke(main, ["fold", str(src), "-o", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and ".onnx" in res.output


@pytest.mark.parametrize("name,count", [("resnet", 8), ("mobilenet_v2", 52), ("efficientnet", 22), ("regnet", 9),
                                        ("mobilevit", 32)])
def test_zoo_exports_fold_like_the_module_fold(tmp_path, name, count):
    """The zoo's other BN models, exported with their BNs: as many fold as the module fold folds (all)."""
    import torch

    from normsurgeon import zoo

    model = zoo.MODELS[name]()
    x = model.example_inputs().kwargs["pixel_values"]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["pixel_values"], training=torch.onnx.TrainingMode.PRESERVE,
                          do_constant_folding=False, dynamic_axes={"pixel_values": {0: "batch"}})
    m = onnx.load(str(path))
    folded, report = fold_onnx(m)
    assert _bns(m) == count and _bns(folded) == 0 and report.passed, report.summary()
    shape = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert _max_rel(m, folded, [("pixel_values", shape)], batches=(1, 3)) < 1e-5


def test_input_shape_sizes_the_symbolic_dims(tmp_path):
    from normsurgeon import api

    bn, inits = _bn("bn", 4, "h", "y")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), bn]
    m = _model(nodes, inits + [_w("W", 4, 3, 1, 1)], [("x", ["batch", 3, "height", "width"])])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    _, report = api.fold(path, input_shapes=["1,3,12,10"])
    assert report.passed and report.checks[0].shapes == {"x": [1, 3, 12, 10]}
    assert report.sizes == {"batch": [1, 8], "height": [12, 6, 24], "width": [10, 5, 20]}
    from normsurgeon.errors import NormSurgeonError

    with pytest.raises(NormSurgeonError, match="does not fit"):
        api.fold(path, input_shapes=["1,4,12,10"])


def test_initializers_listed_as_inputs_fold():
    """Older exporters list every initializer as a graph input too (keep_initializers_as_inputs)."""
    m = conv_bn()
    m.graph.input.extend(helper.make_tensor_value_info(t.name, F, list(t.dims)) for t in m.graph.initializer)
    folded, report = fold_onnx(m)
    assert _bns(folded) == 0 and report.passed and any("graph inputs" in n for n in report.notes)
    assert {c.name for c in report.checks} >= {"example", "batch=1", "batch=8"}


def test_exit_1_and_nothing_written_when_not_proved(tmp_path, monkeypatch):
    """When no subset of the folds verifies (here: a check that never passes), the report fails,
    nothing is written and the command exits 1."""
    from click.testing import CliRunner

    from normsurgeon.cli import main
    from normsurgeon.onnx import ortcheck
    from normsurgeon.outputs import ErrorStats

    monkeypatch.setattr(ortcheck.Reference, "judge", lambda self, e, a: (ErrorStats(1.0, 1.0, 0.0), False))
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(conv_bn(), str(src))
    res = CliRunner().invoke(main, ["fold", str(src), "-o", str(out)])
    assert res.exit_code == 1 and not out.exists()
    assert "do not match" in res.output


def test_a_rewrite_that_raises_is_rolled_back_alone(monkeypatch):
    """Two BNs; the rewrite of the Gemm one raises: it is rolled back with the error, the conv one folds."""
    from normsurgeon.passes import fold_targets

    real = fold_targets.fold

    def flaky(r, position, *a, **kw):
        if r.name == "linear":
            raise RuntimeError("boom")
        return real(r, position, *a, **kw)

    monkeypatch.setattr(fold_targets, "fold", flaky)
    bn1, i1 = _bn("bn1", 4, "h", "z")
    bn2, i2 = _bn("bn2", 4, "p", "q")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), bn1,
             helper.make_node("GlobalAveragePool", ["z"], ["g"]), helper.make_node("Flatten", ["g"], ["p0"]),
             helper.make_node("Gemm", ["p0", "V"], ["p"], transB=1, name="fc"), bn2,
             helper.make_node("Relu", ["q"], ["y"])]
    m = _model(nodes, i1 + i2 + [_w("W", 4, 3, 1, 1), _w("V", 4, 4)], [("x", ["batch", 3, 5, 5])])
    folded, report = fold_onnx(m)
    assert report.passed and _bns(folded) == 1
    assert [a.path for a in report.folded] == ["bn1"]
    (rb,) = report.rolled_back
    assert rb.path == "bn2" and "boom" in rb.reason


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_exported_mix_folds_every_bn(tmp_path, dynamo):
    """Conv -> BN, grouped ConvTranspose -> BN, BN -> Flatten -> Linear head, Linear -> BN1d as the output,
    as both torch exporters write them (TorchScript leaves intermediate values untyped)."""
    import torch
    from torch import nn

    from normsurgeon.zoo import _randomize_norm_stats

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.t, self.b2 = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8)
            self.b3, self.fc = nn.BatchNorm2d(8), nn.Linear(8 * 16 * 16, 10)
            self.lin, self.b4 = nn.Linear(10, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            x = torch.relu(self.b1(self.c(x)))
            x = torch.relu(self.b2(self.t(x)))
            return self.b4(self.lin(self.fc(self.b3(x).flatten(1))))

    model = Mix().eval()
    _randomize_norm_stats(model)
    path = tmp_path / "mix.onnx"
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, verbose=False, input_names=["x"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                              dynamic_axes={"x": {0: "batch"}})
    m = onnx.load(str(path))
    folded, report = fold_onnx(m)
    assert _bns(m) == 4 and _bns(folded) == 0 and report.passed, report.summary()
    assert _max_rel(m, folded, [("x", ["batch", 3, 8, 8])], batches=(1, 3)) < 1e-5
