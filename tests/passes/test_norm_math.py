"""The float64 math of the norm surgery against the computation it replaces."""

import torch

from normsurgeon.norm_math import centre_output, fold_into_reader, orthogonal, rotate_reader, rotate_writer

g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_fold_into_reader_both_layouts():
    n, gamma, beta = r(5, 8), r(8), r(8)
    w, b = r(3, 8), r(3)
    w2, b2 = fold_into_reader(w, b, gamma, beta, "out_in")
    assert torch.allclose((gamma * n + beta) @ w.T + b, n @ w2.T + b2)
    w2, b2 = fold_into_reader(w.T.clone(), None, gamma, beta, "in_out")
    assert torch.allclose((gamma * n + beta) @ w.T, n @ w2 + b2)


def test_centre_output_makes_zero_mean():
    x = r(5, 4)
    for kind, layout, w, f in [("linear", "out_in", r(8, 4), lambda w, b: x @ w.T + b),
                               ("linear", "in_out", r(4, 8), lambda w, b: x @ w + b)]:
        w2, b2 = centre_output(w, r(8), kind, layout)
        assert f(w2, b2).mean(-1).abs().max() < 1e-12
    e2, _ = centre_output(r(10, 8), None, "embedding")
    assert e2.mean(-1).abs().max() < 1e-12


def test_rotation_round_trip():
    q, _ = orthogonal(8, 0)
    x = r(5, 4)
    w, b = r(8, 4), r(8)
    w2, b2 = rotate_writer(w, b, q, "linear", "out_in")
    y = x @ w.T + b
    assert torch.allclose(x @ w2.T + b2, y @ q)
    reader = r(3, 8)
    assert torch.allclose((y @ q) @ rotate_reader(reader, q, "out_in").T, y @ reader.T)
    assert torch.allclose((y @ q) @ rotate_reader(reader.T.clone(), q, "in_out"), y @ reader.T)
    conv = r(8, 3, 2, 2)
    c2, _ = rotate_writer(conv, None, q, "conv")
    assert torch.allclose(torch.einsum("oikl,oc->cikl", conv, q), c2)
