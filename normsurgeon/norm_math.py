"""The math of the norm-affine surgery (no graph, no modules): fold a norm's γ/β into the linear that
reads it, centre a writer of the residual stream, rotate by an orthogonal matrix.

Layouts: ``out_in`` is nn.Linear's weight (y = x·Wᵀ), ``in_out`` transformers' Conv1D and a matmul
with a parameter (y = x·W). The pure functions take and return float64 tensors; callers cast back.

The ``*_`` variants apply the same math to a model's tensor in place, a slice at a time: a float64
copy of a whole 32000×2048 head is 0.5 GB, and a 1.1B model's fold must not hold a second copy of
anything that large (issue 17's memory budget). Each slice is cast back as soon as it is computed.
A rotation is a ``Rotation``: a randomized Hadamard is applied as a fast Walsh–Hadamard transform,
whose in-place sums run in float32 for bfloat16/float16 weights (``rotation_dtype``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import torch

from .pages import populate_for_write

SLICE_ELEMENTS = 1 << 21  # float64 values in one slice of an in-place update (16 MiB)


def fold_into_reader(w: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor | None,
                     beta: torch.Tensor | None, layout: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W' = W·diag(γ), b' = b + W·β for a reader of γ⊙n + β."""
    in_axis = 1 if layout == "out_in" else 0
    shift = None
    if beta is not None:
        shift = w @ beta if layout == "out_in" else beta @ w
    if gamma is not None:
        w = w * (gamma[None, :] if in_axis == 1 else gamma[:, None])
    if shift is not None:
        b = shift if b is None else b + shift
    return w, b


def centre_output(w: torch.Tensor, b: torch.Tensor | None, kind: str, layout: str = "out_in"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make a writer's output zero-mean over the hidden axis: subtract the mean over that axis."""
    axis = _hidden_axis(kind, layout)
    w = w - w.mean(dim=axis, keepdim=True)
    if b is not None:
        b = b - b.mean()
    return w, b


def rotate_writer(w: torch.Tensor, b: torch.Tensor | None, q: torch.Tensor, kind: str, layout: str = "out_in"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The writer's output y becomes y·Q (its hidden axis multiplied by Q)."""
    axis = _hidden_axis(kind, layout)
    w = torch.movedim(torch.movedim(w, axis, -1) @ q, -1, axis)
    if b is not None:
        b = b @ q
    return w, b


def rotate_reader(w: torch.Tensor, q: torch.Tensor, layout: str) -> torch.Tensor:
    """A reader of x·Q computes what it computed on x: W' = W·Q (out_in) or Qᵀ·W (in_out)."""
    return w @ q if layout == "out_in" else q.T @ w


def _hidden_axis(kind: str, layout: str) -> int:
    if kind == "embedding":
        return 1  # (vocab, hidden)
    if kind == "param":
        return -1  # cls token / position embedding: (..., hidden)
    if kind == "conv":
        return 0  # (out, in, k...)
    return 0 if layout == "out_in" else 1


def orthogonal(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """A seeded random orthogonal n×n matrix in float64: a randomized Hadamard (H·diag(±1)/√n) when n
    is a power of 2; for n = 2^k·m (m odd, k ≥ 1) the Kronecker product of a randomized Hadamard of size
    2^k and a random orthogonal m×m matrix (orthogonal as a product of orthogonal factors, and QuaRot's
    construction for such widths); for an odd n the Q of a Gaussian matrix's QR (signs fixed so it is
    Haar-distributed; the same QR gives the m×m factor). The dense form of ``rotation(n, seed)``, which
    applies the same Q without forming it."""
    q = rotation(n, seed)
    return q.dense(), q.kind


class Rotation:
    """The seeded orthogonal Q of ``orthogonal``, applied to the rows of a float64 matrix (x ← x·Q).

    Q = (H·diag(s)/√p) ⊗ B with p = 2^k and B an m×m matrix (either factor may be 1×1). Q is never
    formed: the Hadamard factor is a fast Walsh–Hadamard transform (p·log₂p additions instead of p²
    multiply-adds: a 1.1B model's 2048-wide rotation went from minutes of float64 matmul to seconds),
    then a scale by s/√p; B is a small matmul. The sums are float64 like the dense product, so both
    round to the same weights; in place on bfloat16/float16 weights they are float32 (``rotation_dtype``)."""

    def __init__(self, n: int, kind: str, scale: torch.Tensor | None = None, matrix: torch.Tensor | None = None):
        self.n, self.kind = n, kind
        self.scale = scale  # s/√p of the Hadamard factor (None: p = 1)
        self.matrix = matrix  # B, the m×m factor (None: m = 1)
        self.p = 1 if scale is None else scale.shape[0]
        self.m = n // self.p
        self._cast: dict[torch.dtype, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def to(self, device: torch.device | str) -> "Rotation":
        move = (lambda t: None if t is None else t.to(device))
        return Rotation(self.n, self.kind, move(self.scale), move(self.matrix))

    def dense(self) -> torch.Tensor:
        if self.scale is None:
            return self.matrix
        return self.apply(torch.eye(self.n, dtype=torch.float64, device=self.scale.device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·Q for a small float64 tensor (..., n), e.g. a bias; a new tensor."""
        rows = x.reshape(-1, self.n).clone()
        out = torch.empty_like(rows)
        self.apply_(rows, rows, out)
        return rows.view(x.shape)

    def apply_(self, dst: torch.Tensor, x: torch.Tensor, spare: torch.Tensor, columns: bool = False) -> None:
        """dst ← x·Q over the last axis of x, or with ``columns`` dst ← Qᵀ·x over the first axis of an
        (n, k) x (the same map on a tensor stored with the hidden axis first, read without a transpose).
        ``x`` (float64 or float32, contiguous) and ``spare`` (its shape and dtype) are both overwritten
        as scratch; the sums run in x's dtype; ``dst`` may be ``x``, ``spare`` or the model's own tensor
        of any dtype and strides (cast in the last step)."""
        dst.copy_(self.transform_(x, spare, columns).view(dst.shape))  # a separate cast: torch.mul(..., out=bf16) is 1.7× slower than mul_ + copy_

    def transform_(self, x: torch.Tensor, spare: torch.Tensor, columns: bool = False) -> torch.Tensor:
        """``apply_`` without the last copy: returns whichever of ``x`` and ``spare`` holds the result."""
        p, m = self.p, self.m
        scale, matrix = self._factors(x.dtype)
        t = x.shape[1] if columns else 1  # values per hidden index that travel together
        if matrix is not None:  # B on the m axis: index i = i_p·m + i_m
            if columns:
                torch.matmul(matrix.T, x.view(p, m, t), out=spare.view(p, m, t))
            else:
                torch.matmul(x.view(-1, m), matrix, out=spare.view(-1, m))
            x, spare = spare, x
        if scale is not None:  # the Hadamard on the p axis, then diag(s)/√p (Qᵀ = diag(s)·H/√p too)
            shape = (1, p, m * t) if columns else (-1, p, m)
            x = _fwht_(x.view(shape), spare.view(shape))
            x.mul_(scale[:, None])
        return x

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scale and B in ``dtype`` (the float64 ones are the definition; float32 copies are cached)."""
        if dtype == torch.float64:
            return self.scale, self.matrix
        if dtype not in self._cast:
            self._cast[dtype] = tuple(None if f is None else f.to(dtype) for f in (self.scale, self.matrix))
        return self._cast[dtype]


def rotation_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """What a rotation of weights of ``dtype`` sums in: float32 for bfloat16/float16 weights on the CPU
    while float32 matmuls run at full precision (``torch.get_float32_matmul_precision() == "highest"``:
    "medium" lets oneDNN round float32 operands to bfloat16, and CUDA's TF32 rounds them to 10 bits),
    float64 otherwise. Twice as fast: the transform took 5.3 ns a weight in float64, 2.4 in float32 (one
    core), the largest part of a 1.1B rotation.

    What it costs in exactness, measured on random 512×2048 matrices: beyond the float64 result's own
    rounding to the weights' dtype, the float32 sums are off by at most about 1e-8 of the row's norm,
    against up to 3e-4 of it for that rounding in bfloat16 (4e-5 in float16). The rotated weights are
    then the float64 result's but for 1e-5 of bfloat16 weights and 7e-5 to 3e-4 of float16 ones, each
    one ulp away, a few ulps for a weight tiny next to its row. A float32 sum that overflows (weights
    near float32's limit, which bfloat16 shares) is redone in float64 (``_finite_or_float64``)."""
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cpu" \
            or torch.get_float32_matmul_precision() != "highest":
        return torch.float64
    return torch.float32


def rotation(n: int, seed: int) -> Rotation:
    """The seeded Q of ``orthogonal(n, seed)`` as a ``Rotation`` (no n×n matrix unless n is odd)."""
    g = torch.Generator().manual_seed(seed)
    p = n & -n if n > 0 else 1  # the largest power of 2 dividing n
    scale = None
    if p > 1 or n == 1:
        signs = torch.randint(0, 2, (p,), generator=g).to(torch.float64) * 2 - 1
        scale = signs / math.sqrt(p)
        if p == n:
            return Rotation(n, "randomized Hadamard", scale=scale)
    m = n // p
    a = torch.randn(m, m, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    b = q * torch.sign(torch.diagonal(r))[None, :]
    if scale is None:
        return Rotation(n, "random orthogonal (QR)", matrix=b)
    return Rotation(n, f"randomized Hadamard ({p}) ⊗ random orthogonal (QR, {m})", scale=scale, matrix=b)


_LOW = 16  # the lowest log₂16 bits of the transform in one small matmul: fewer passes over the rows
_H_LOW: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _sylvester(n: int, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    key = (n, device, dtype)
    if key not in _H_LOW:
        h = torch.ones(1, 1, dtype=dtype)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _H_LOW[key] = h.to(device)
    return _H_LOW[key]


def _fwht_(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """H·x along the middle axis of ``x`` (r, n, t), n a power of 2 (Sylvester H, H[i, j] =
    (-1)^popcount(i & j), so H_n = H_{n/(h·b)} ⊗ H_b ⊗ H_h: each group of bits of the index is
    transformed on its own). Ping-pongs between ``x`` and ``spare``; returns the one that holds the
    result. Rows (t = 1) do their lowest log₂b bits in one (r·n/b, b) × H_b matmul, then one butterfly
    pass per bit over contiguous runs of h values. Columns (r = 1, t > 1: t values per index, a slice of
    an output projection as stored) do every group of log₂b bits in one batched matmul, H_b times each
    of the n/(h·b) blocks of b×(h·t) values: three calls for n = 2048 where eleven butterfly passes made
    22 (a 2048-wide output projection, one core: 2.7 ns a weight against 3.3). Rows gain nothing from
    it: their upper groups are batches of tiny matmuls."""
    r, n, t = x.shape
    if r == 1 and t > 1:
        h = 1
        while h < n:
            b = min(_LOW, n // h)
            shape = (n // (h * b), b, h * t)
            torch.matmul(_sylvester(b, x.device, x.dtype), x.view(shape), out=spare.view(shape))
            x, spare = spare, x
            h *= b
        return x
    h = 1
    if t == 1 and n > 1:
        h = min(_LOW, n)
        torch.matmul(x.view(-1, h), _sylvester(h, x.device, x.dtype), out=spare.view(-1, h))
        x, spare = spare, x
    while h < n:
        s0, s1 = x.view(r, n // (2 * h), 2, h * t).unbind(2)
        d0, d1 = spare.view(r, n // (2 * h), 2, h * t).unbind(2)
        torch.add(s0, s1, out=d0)
        torch.sub(s0, s1, out=d1)
        x, spare = spare, x
        h *= 2
    return x


# --- in place, slice by slice ----------------------------------------------------------------------

def _slices(view: torch.Tensor, scratch: int = 1, dtype: torch.dtype = torch.float64, elements: int | None = None
            ) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """Consecutive slices of ``view`` along dim 0, each at most ``elements`` (``SLICE_ELEMENTS``) values
    (one row at least), with ``scratch`` buffers (float64 unless ``dtype``) of the slice's shape. The
    buffers are allocated once and reused: fresh large allocations cost a page fault per 4 KiB, which
    made a 1.1B fold spend most of its time in the kernel."""
    elements = elements or SLICE_ELEMENTS
    row = max(1, view[0].numel()) if view.shape[0] else 1
    step = max(1, elements // row)
    n = max(elements, row)  # one size for every call: the allocator hands the same block back
    buffers = [torch.empty(n, dtype=dtype, device=view.device) for _ in range(scratch)]
    for i in range(0, view.shape[0], step):
        part = view[i:i + step]
        yield i, part, [b[:part.numel()].view(part.shape) for b in buffers]


def _in_slices(view: torch.Tensor, body: Callable[[int, torch.Tensor, list[torch.Tensor]], None], *,
               scratch: int = 1, dtype: torch.dtype = torch.float64, elements: int | None = None,
               populate: bool = True, parallel: bool = False) -> None:
    """``body(i, part, buffers)`` for every slice of ``_slices(view, ...)``; with ``parallel`` on up to
    ``torch.get_num_threads()`` threads of one torch thread each: every thread takes a contiguous run
    of slices with buffers of its own. The slices are independent and torch's kernels release the GIL,
    so a 1.1B rotation's transform ran 1.7× faster on 2 threads than on one, where torch's own threads
    split each small op and waited for each other at every one. An affine fold is not parallel: it is
    a multiply per value, its time is the copy-on-write, and a second thread only added 350 MB to a
    1.1B fold's peak memory. ``populate``: the pages of ``view`` are
    made writable first (``pages.populate_for_write``), in one call: two threads faulting in halves of
    one mapping at once were slower than one (a 1.1B fold's copy-on-write: 1.5 s on one, 3.7 s on two)."""
    elements = elements or SLICE_ELEMENTS
    rows = view.shape[0]
    step = max(1, elements // max(1, view[0].numel())) if rows else 1
    count = -(-rows // step)
    threads = max(1, min(torch.get_num_threads(), count)) if parallel and view.device.type == "cpu" else 1
    bounds = [min(rows, (count * j // threads) * step) for j in range(threads + 1)]
    if populate:
        populate_for_write(view)

    def run(a: int, b: int) -> None:
        for i, part, buffers in _slices(view[a:b], scratch=scratch, dtype=dtype, elements=elements):
            body(a + i, part, buffers)

    with _one_thread():
        if threads == 1:
            run(0, rows)
            return
        with _POOL_LOCK:  # one parallel update at a time: the pool is sized and shared process-wide
            pool, others = _pool(threads - 1), []
            try:
                for j in range(1, threads):
                    try:
                        others.append(pool.submit(run, bounds[j], bounds[j + 1]))
                    except RuntimeError:  # no thread could start: this thread takes the run itself
                        run(bounds[j], bounds[j + 1])
                run(bounds[0], bounds[1])
            finally:
                for f in others:  # every thread done (or failed) before the tensor is handed back
                    f.exception()
        for f in others:
            f.result()


_POOL: list = [None, 0, 0]  # (executor, its size, the process it was made in): started once, not per tensor
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """Threads for ``_in_slices``, started at their first use, which is under ``_one_thread``: a thread's
    torch settles its thread count then, so these compute on one thread each for good. A forked child
    gets a pool of its own (its parent's threads do not exist in it)."""
    if _POOL[1] < size or _POOL[2] != os.getpid():
        if _POOL[0] is not None and _POOL[2] == os.getpid():
            _POOL[0].shutdown(wait=True)
        _POOL[:] = [ThreadPoolExecutor(size, thread_name_prefix="normsurgeon"), size, os.getpid()]
    return _POOL[0]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One thread: writing a weight loaded from a mapped file faults in every page, and two threads
    faulting at once contend for the process's memory map (a 1.1B fold: 14 s on 2 threads, 4 s on 1);
    under CPU contention two threads also wait on each other at each of a transform's small ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hidden_last(w: torch.Tensor, kind: str, layout: str) -> torch.Tensor:
    """A view of ``w`` with the hidden axis last and at least one leading dim to slice along."""
    view = torch.movedim(w, _hidden_axis(kind, layout), -1)
    return view.unsqueeze(0) if view.dim() == 1 else view


def exact_scale_dtype(w_dtype: torch.dtype, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> torch.dtype:
    """The dtype in which W·diag(γ) is exact: float32 for a bfloat16/float16 weight (8/11 significant
    bits) and a γ that bfloat16 or float16 holds exactly (at most 11 bits), whose products need at most
    22 of float32's 24 bits (wherever the product is a normal float32, |W·γ| ≥ 2^-126); rounded once
    to the weight's dtype, the result is the float64 one. Else (and for β's sums) float64."""
    if gamma is None or beta is not None or w_dtype not in (torch.bfloat16, torch.float16):
        return torch.float64
    for holds in (torch.bfloat16, torch.float16):
        if bool(torch.isfinite(gamma).all()) and torch.equal(gamma.to(holds).to(gamma.dtype), gamma):
            return torch.float32
    return torch.float64


def fold_into_reader_(w: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                      layout: str) -> torch.Tensor | None:
    """``fold_into_reader`` on the weight itself: W ← W·diag(γ), exactly (``exact_scale_dtype``), cast
    back per slice of outputs. Returns W·β (float64, from the weight before scaling), which the bias
    must gain, or None."""
    rows = w if layout == "out_in" else w.t()  # (out, in)
    shift = torch.empty(rows.shape[0], dtype=torch.float64, device=w.device) if beta is not None else None
    dtype = exact_scale_dtype(w.dtype, gamma, beta)
    if gamma is not None:
        gamma = gamma.to(dtype)

    def body(i: int, part: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        c = buffers[0]
        c.copy_(part)
        if shift is not None:
            torch.mv(c, beta, out=shift[i:i + c.shape[0]])
        if gamma is not None:
            part.copy_(c.mul_(gamma[None, :]))

    _in_slices(rows, body, dtype=dtype, populate=gamma is not None)
    return shift


def centre_output_(w: torch.Tensor, kind: str, layout: str = "out_in") -> None:
    """``centre_output`` on the weight itself (the small bias is centred by the caller)."""
    def body(_: int, part: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        c = buffers[0]
        c.copy_(part)
        part.copy_(c.sub_(c.mean(dim=-1, keepdim=True)))

    _in_slices(_hidden_last(w, kind, layout), body)


def rotate_writer_(w: torch.Tensor, q: Rotation | torch.Tensor, kind: str, layout: str = "out_in") -> None:
    """``rotate_writer`` on the weight itself (the small bias is rotated by the caller)."""
    if _hidden_axis(kind, layout) == 0 and w.dim() > 1 and w.is_contiguous():
        _rotate_columns_(w.view(w.shape[0], -1), q)  # an output projection / patch conv: Qᵀ·W
    else:
        _rotate_rows_(_hidden_last(w, kind, layout), q)


def rotate_reader_(w: torch.Tensor, q: Rotation | torch.Tensor, layout: str) -> None:
    """``rotate_reader`` on the weight itself, a slice of outputs at a time."""
    if layout == "in_out" and w.is_contiguous():
        _rotate_columns_(w, q)  # Qᵀ·W
    else:
        _rotate_rows_(w if layout == "out_in" else w.t(), q)


ROTATE_SLICE_ELEMENTS = 1 << 18  # float64 values per buffer (2 MiB): the transform's passes stay in cache


def _rotate_slice(dtype: torch.dtype) -> int:
    """Values per slice of a rotation summing in ``dtype``: ``ROTATE_SLICE_ELEMENTS``' 2 MiB a buffer
    (float32 slices of 0.5M values: 2.4 ns a bf16 weight on one core against 2.7 at 0.25M)."""
    return ROTATE_SLICE_ELEMENTS * 8 // torch.empty((), dtype=dtype).element_size()


def _as_rotation(q: Rotation | torch.Tensor, device: torch.device) -> Rotation:
    return q.to(device) if isinstance(q, Rotation) else Rotation(q.shape[0], "dense", matrix=q.to(device).double())


def _rotate_rows_(rows: torch.Tensor, q: Rotation | torch.Tensor) -> None:
    """rows ← rows·Q over the last axis, a slice of rows at a time."""
    q = _as_rotation(q, rows.device)

    def body(_: int, part: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        c, spare = buffers
        c.copy_(part)
        part.copy_(_finite_or_float64(q.transform_(c, spare), part, q))

    dtype = rotation_dtype(rows.dtype, rows.device)
    q._factors(dtype)  # cast once, before the threads
    _in_slices(rows, body, scratch=2, dtype=dtype, elements=_rotate_slice(dtype), parallel=True)


def _rotate_columns_(w: torch.Tensor, q: Rotation | torch.Tensor) -> None:
    """w ← Qᵀ·w for a contiguous (n, k) w, a slice of columns at a time: each slice is copied as it is
    stored (n runs of contiguous values), where a rows·Q view of it would be a transposing, cache-hostile
    gather (17 ns a value against 9 for a 2048-wide output projection)."""
    q = _as_rotation(q, w.device)

    def body(_: int, part: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        cols = part.t()  # (n, step): the slice's columns as stored
        c, spare = (b.view(cols.shape) for b in buffers)
        c.copy_(cols)
        cols.copy_(_finite_or_float64(q.transform_(c, spare, columns=True), cols, q, columns=True))

    dtype = rotation_dtype(w.dtype, w.device)
    q._factors(dtype)  # cast once, before the threads
    _in_slices(w.t(), body, scratch=2, dtype=dtype, elements=_rotate_slice(dtype), parallel=True)  # wᵀ's rows: w's columns


def _finite_or_float64(y: torch.Tensor, part: torch.Tensor, q: Rotation, columns: bool = False) -> torch.Tensor:
    """``y`` (the transform of ``part``), or where a float32 sum overflowed, ``part``'s in float64. An
    overflow makes y's sum inf or NaN (one reduction: ``isfinite`` cost as much as the transform)."""
    if y.dtype == torch.float64 or math.isfinite(float(y.sum())) or not bool(torch.isfinite(part).all()):
        return y.view(part.shape)
    x = part.to(torch.float64, memory_format=torch.contiguous_format)
    return q.transform_(x, torch.empty_like(x), columns).view(part.shape)
