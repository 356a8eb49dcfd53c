"""The float64 math of the norm surgery against the computation it replaces."""

import pytest
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


def test_in_place_variants_match_the_pure_math_slice_by_slice(monkeypatch):
    # small slices, so every tensor is updated in several pieces (a 1.1B head's are 16 MiB each)
    import normsurgeon.norm_math as nm

    monkeypatch.setattr(nm, "SLICE_ELEMENTS", 20)
    g = torch.Generator().manual_seed(3)

    def r(*s):  # float32 values: the in-place variants update a float32 tensor
        return torch.randn(*s, generator=g, dtype=torch.float64).float().double()

    gamma, beta, q = r(8), r(8), nm.orthogonal(8, 0)[0]
    for layout, w in (("out_in", r(12, 8)), ("in_out", r(8, 12))):
        w2, shift = fold_into_reader(w, None, gamma, beta, layout)
        t = w.float()
        got = nm.fold_into_reader_(t, gamma, beta, layout)
        assert torch.equal(t, w2.float()) and torch.allclose(got, shift)
        t = w.float()
        nm.rotate_reader_(t, q, layout)
        assert torch.allclose(t, rotate_reader(w, q, layout).float(), atol=1e-6)
    for kind, layout, w in (("linear", "out_in", r(8, 12)), ("linear", "in_out", r(12, 8)),
                            ("embedding", "out_in", r(30, 8)), ("conv", "out_in", r(8, 3, 2, 2)),
                            ("param", "out_in", r(1, 1, 8)), ("param", "out_in", r(8))):
        t = w.float()
        nm.rotate_writer_(t, q, kind, layout)
        assert torch.allclose(t, rotate_writer(w, None, q, kind, layout)[0].float(), atol=1e-6), (kind, layout)
        t = w.float()
        nm.centre_output_(t, kind, layout)
        assert torch.allclose(t, centre_output(w, None, kind, layout)[0].float(), atol=1e-6), (kind, layout)


def test_a_low_precision_fold_in_float32_rounds_as_the_float64_one():
    import normsurgeon.norm_math as nm

    g = torch.Generator().manual_seed(4)
    for dt in (torch.bfloat16, torch.float16):
        w = (torch.randn(64, 32, generator=g) * 3).to(dt)
        gamma = (torch.randn(32, generator=g) * 2).to(dt).double()
        assert nm.exact_scale_dtype(dt, gamma, None) == torch.float32
        t = w.clone()
        nm.fold_into_reader_(t, gamma, None, "out_in")
        assert torch.equal(t, (w.double() * gamma[None, :]).to(dt))
    # a γ with more bits than float16 holds: float64
    assert nm.exact_scale_dtype(torch.bfloat16, torch.tensor([1 + 2 ** -20], dtype=torch.float64), None) \
        == torch.float64
    assert nm.exact_scale_dtype(torch.float32, gamma, None) == torch.float64


def _dense_randomized_hadamard(n, seed):
    """The dense Q that ``orthogonal`` built before the fast transform: H·diag(±1)/√n, Sylvester H."""
    g = torch.Generator().manual_seed(seed)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return h * signs[None, :] / n ** 0.5


@pytest.mark.parametrize("n", [1, 2, 8, 16, 64, 256])
def test_fast_hadamard_is_the_same_q_as_the_dense_matrix(n):
    # same seed, same Q: the recipes and reports that name a seed keep meaning the same rotation
    import normsurgeon.norm_math as nm

    for seed in (0, 5):
        ref = _dense_randomized_hadamard(n, seed)
        q = nm.rotation(n, seed)
        assert q.kind == "randomized Hadamard" and q.matrix is None  # never formed
        assert torch.equal(q.dense(), ref) and torch.equal(nm.orthogonal(n, seed)[0], ref)
        x = r(7, 3, n)
        assert torch.allclose(q.apply(x), x @ ref, rtol=0, atol=1e-12)


def _dense_qr(m, g):
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()  # (torch.kron needs it)


@pytest.mark.parametrize("p, m", [(1, 9), (1, 5), (4, 3), (8, 3), (2, 5)])
def test_other_widths_are_a_kronecker_product_or_the_old_qr(p, m):
    # n = p·m: (H_p·diag(s)/√p) ⊗ B with B the sign-fixed QR of the next m×m draw; odd n: the QR of
    # earlier versions, unchanged
    import normsurgeon.norm_math as nm

    n = p * m
    g = torch.Generator().manual_seed(2)
    if p == 1:
        want = _dense_qr(n, g)
    else:
        h = _dense_randomized_hadamard(p, 2)
        torch.randint(0, 2, (p,), generator=g)  # the signs come first
        want = torch.kron(h, _dense_qr(m, g))
    q = nm.rotation(n, 2)
    assert torch.allclose(q.dense(), want, rtol=0, atol=1e-12)
    assert torch.allclose(q.dense() @ q.dense().T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert q.kind == ("random orthogonal (QR)" if p == 1 else f"randomized Hadamard ({p}) ⊗ random orthogonal (QR, {m})")
    x = r(4, n)
    assert torch.allclose(q.apply(x), x @ want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("elements", [1, 20, 64, 1 << 18])
def test_in_place_rotation_is_the_dense_product_for_every_tensor_kind(monkeypatch, elements):
    # slices of one row, of a few rows and of whole tensors; float32 weights round like the dense float64 product
    import normsurgeon.norm_math as nm

    monkeypatch.setattr(nm, "ROTATE_SLICE_ELEMENTS", elements)
    n = 32
    q, dense = nm.rotation(n, 3), _dense_randomized_hadamard(n, 3)
    kron, qr = nm.rotation(24, 3), nm.rotation(9, 3)  # 8·3: Hadamard ⊗ 3×3 QR; odd: the dense QR
    for rot, ref, m in ((q, dense, n), (kron, kron.dense(), 24), (qr, qr.dense(), 9)):
        def w(*s):
            return torch.randn(*s, generator=g, dtype=torch.float64).float()

        cases = [("reader", "out_in", w(40, m)), ("reader", "in_out", w(m, 40)),
                 ("linear", "out_in", w(m, 40)), ("linear", "in_out", w(40, m)), ("embedding", "out_in", w(50, m)),
                 ("conv", "out_in", w(m, 3, 2, 2)), ("param", "out_in", w(1, 1, m)), ("param", "out_in", w(m)),
                 # views that are not contiguous take the row-slice path
                 ("reader", "in_out", w(40, m).t()), ("linear", "out_in", w(40, m).t())]
        def rotated(t, kind, layout):
            if kind == "reader":
                return rotate_reader(t.double(), ref, layout)
            return rotate_writer(t.double(), None, ref, kind, layout)[0]

        for kind, layout, t in cases:
            for weights in (t, t.bfloat16()):  # float32 and bf16 weights, cast back from float64
                exact = rotated(weights, kind, layout)
                want = exact.to(weights.dtype)
                got = weights.clone()
                if kind == "reader":
                    nm.rotate_reader_(got, rot, layout)
                else:
                    nm.rotate_writer_(got, rot, kind, layout)
                if weights.dtype == torch.float32:
                    # the same rounded weights as the dense float64 product, but for a rare tie
                    assert (got != want).sum() <= 1, (kind, layout, weights.dtype)
                else:  # float32 sums: the float64 result's rounding, give or take 1e-7 of the tensor's norm
                    slack = 1e-7 * float(weights.double().norm())
                    assert bool(((got.double() - exact).abs() <= (want.double() - exact).abs() + slack).all()), \
                        (kind, layout)
                assert not torch.equal(got, weights)
    bias = r(24)
    assert torch.allclose(kron.apply(bias), bias @ kron.dense())


@pytest.mark.parametrize("n", [512, 2048])
def test_wide_rotations_are_the_dense_product_as_rows_and_as_columns(n):
    # the widths of real models: rows take a matmul and butterflies, columns (an output projection as
    # stored) a batched matmul per group of four bits of the index; both round like the dense product
    import normsurgeon.norm_math as nm

    g = torch.Generator().manual_seed(n)
    q, dense = nm.rotation(n, 7), _dense_randomized_hadamard(n, 7)
    w = torch.randn(n, 24, generator=g, dtype=torch.float64).float()  # (hidden, out): Qᵀ·W, columns
    got = w.clone()
    nm.rotate_writer_(got, q, "linear", "out_in")
    assert (got != (dense.T @ w.double()).float()).sum() <= 1
    rows = w.t().contiguous()  # (out, hidden): W·Q, rows
    got = rows.clone()
    nm.rotate_reader_(got, q, "out_in")
    assert (got != (rows.double() @ dense).float()).sum() <= 1


def test_the_thread_count_comes_back_when_an_in_place_update_raises():
    import normsurgeon.norm_math as nm

    before = torch.get_num_threads()
    w = torch.ones(4, 3)
    with pytest.raises(RuntimeError):
        nm.fold_into_reader_(w, torch.ones(5, dtype=torch.float64), None, "out_in")  # γ of the wrong width
    assert torch.get_num_threads() == before


def test_in_place_rotations_on_several_threads_write_what_one_thread_writes(monkeypatch):
    # each thread takes its own run of slices with its own buffers; the result must not depend on how
    # the slices were shared out, and several threads must really have run (the suite itself runs on
    # one); the affine fold and the centring stay on one thread (their time is page faults, not math)
    import threading

    import normsurgeon.norm_math as nm

    monkeypatch.setattr(nm, "SLICE_ELEMENTS", 40)
    monkeypatch.setattr(nm, "ROTATE_SLICE_ELEMENTS", 40)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(37, 16, generator=g).bfloat16()
    gamma, beta = torch.rand(16, generator=g, dtype=torch.float64) + 0.5, torch.randn(16, generator=g, dtype=torch.float64)
    q = nm.rotation(16, 1)
    jobs = {"fold": lambda t: nm.fold_into_reader_(t, gamma, beta, "out_in"),
            "fold in_out": lambda t: nm.fold_into_reader_(t, gamma, None, "in_out"),
            "centre": lambda t: nm.centre_output_(t, "linear", "in_out"),
            "rows": lambda t: nm.rotate_reader_(t, q, "out_in"),
            "columns": lambda t: nm.rotate_writer_(t, q, "linear", "out_in")}
    seen = set()
    slices = nm._slices

    def watched(*a, **k):
        seen.add(threading.get_ident())
        yield from slices(*a, **k)

    monkeypatch.setattr(nm, "_slices", watched)
    before = torch.get_num_threads()
    for name, job in jobs.items():
        shape = (16, 37) if name in ("fold in_out", "centre", "columns") else (37, 16)
        src = w.reshape(shape).clone()
        torch.set_num_threads(1)
        one = src.clone()
        r1 = job(one)
        assert len(seen) == 1
        seen.clear()
        torch.set_num_threads(3)
        try:
            three = src.clone()
            r3 = job(three)
        finally:
            torch.set_num_threads(before)
        if name in ("rows", "columns"):
            assert len(seen) >= 2, name  # (a pool thread done with its run may take the next one too)
        else:
            assert len(seen) == 1, name
        seen.clear()
        assert torch.equal(one, three) and not torch.equal(one, src), name
        assert (r1 is None) == (r3 is None) and (r1 is None or torch.equal(r1, r3)), name


def test_a_failure_on_one_thread_is_raised_after_every_thread_stopped(monkeypatch):
    # the calling thread fails at once while another is still writing the tensor: the failure must
    # reach the caller (whose undo log then restores the tensor) only once that thread is done
    import threading
    import time

    import normsurgeon.norm_math as nm

    monkeypatch.setattr(nm, "ROTATE_SLICE_ELEMENTS", 8)
    main, finished = threading.get_ident(), []
    slices = nm._slices

    def slow_elsewhere(*a, **k):
        if threading.get_ident() == main:
            raise RuntimeError("boom")
        time.sleep(0.3)
        yield from slices(*a, **k)
        finished.append(True)

    monkeypatch.setattr(nm, "_slices", slow_elsewhere)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            nm.rotate_reader_(torch.ones(10, 8), nm.rotation(8, 0), "out_in")
        assert finished == [True]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_low_precision_rotation_sums_in_float32_within_1e_7_of_the_row():
    # bf16/f16 weights are rotated with float32 sums (twice as fast as float64): beyond the float64
    # result's own rounding, at most ~1e-8 of the row's norm off (bound here 1e-7), and the weights are
    # the float64 result's but for a few in 1e4 (each an ulp or a few away)
    import normsurgeon.norm_math as nm

    assert nm.rotation_dtype(torch.bfloat16) == nm.rotation_dtype(torch.float16) == torch.float32
    assert nm.rotation_dtype(torch.float32) == nm.rotation_dtype(torch.float64) == torch.float64
    assert nm.rotation_dtype(torch.bfloat16, "cuda") == torch.float64  # TF32 would round the operands
    n = 2048
    q, dense = nm.rotation(n, 4), _dense_randomized_hadamard(n, 4)
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.bfloat16, torch.float16):
        for scale in (0.02, 1.0):
            w = (torch.randn(256, n, generator=gen, dtype=torch.float64) * scale).to(dtype)
            exact = w.double() @ dense
            want = exact.to(dtype)
            got = w.clone()
            nm.rotate_reader_(got, q, "out_in")
            beyond = (got.double() - exact).abs() - (want.double() - exact).abs()
            assert float((beyond / w.double().norm(dim=1, keepdim=True)).max()) <= 1e-7, (dtype, scale)
            assert int((got != want).sum()) <= 1e-3 * w.numel(), (dtype, scale)


def test_a_rotation_sums_in_float64_where_float32_matmuls_may_be_rounded():
    # "medium" lets oneDNN compute float32 matmuls in bfloat16: the transform's small matmuls would
    # round their operands, so the float32 path is not taken
    import normsurgeon.norm_math as nm

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert nm.rotation_dtype(torch.bfloat16) == torch.float64
        q, dense = nm.rotation(32, 1), _dense_randomized_hadamard(32, 1)
        w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
        got = w.clone()
        nm.rotate_reader_(got, q, "out_in")
        assert (got != (w.double() @ dense).bfloat16()).sum() <= 1
    finally:
        torch.set_float32_matmul_precision(before)
    assert nm.rotation_dtype(torch.bfloat16) == torch.float32


def test_a_float32_sum_that_overflows_is_redone_in_float64():
    # bf16 shares float32's range: 32 weights of 2e37 sum to 6.4e38, past float32's 3.4e38, though
    # the rotated weight (the sum over √32) is finite
    import normsurgeon.norm_math as nm

    n = 32
    q, dense = nm.rotation(n, 0), _dense_randomized_hadamard(n, 0)
    w = (torch.randn(6, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e37).bfloat16()
    w[2] = (2e37 * dense[:, 0].sign()).bfloat16()  # every term of output 0 has the same sign
    assert not torch.isfinite(w[2:3].float() @ (dense * n ** 0.5).float()).all()  # float32 would overflow
    want = q.apply(w.double()).bfloat16()  # the float64 transform
    assert torch.isfinite(want).all()
    for how in ("rows", "columns"):
        got = w.clone() if how == "rows" else w.t().contiguous()
        if how == "rows":
            nm.rotate_reader_(got, q, "out_in")
        else:
            nm.rotate_writer_(got, q, "linear", "out_in")  # Qᵀ·W over the stored first axis
            got = got.t()
        assert torch.equal(got, want), how
