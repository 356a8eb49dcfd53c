"""Pure float64 math of the norm-affine surgery (no graph, no modules): fold a norm's γ/β into the
linear that reads it, centre a writer of the residual stream, rotate by an orthogonal matrix.

Layouts: ``out_in`` is nn.Linear's weight (y = x·Wᵀ), ``in_out`` transformers' Conv1D and a matmul
with a parameter (y = x·W). Every function takes and returns float64 tensors; callers cast back.

The ``*_`` variants apply the same math to a model's tensor in place, a slice at a time: a float64
copy of a whole 32000×2048 head is 0.5 GB, and a 1.1B model's fold must not hold a second copy of
anything that large (issue 17's memory budget). Each slice is cast back as soon as it is computed.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

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
    is a power of 2, else the Q of a Gaussian matrix's QR (signs fixed so it is Haar-distributed)."""
    g = torch.Generator().manual_seed(seed)
    if n > 0 and n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return h * signs[None, :] / math.sqrt(n), "randomized Hadamard"
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal (QR)"


# --- in place, slice by slice ----------------------------------------------------------------------

def _slices(view: torch.Tensor, scratch: int = 1, dtype: torch.dtype = torch.float64
            ) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """Consecutive slices of ``view`` along dim 0, each at most ``SLICE_ELEMENTS`` values (one row at
    least), with ``scratch`` buffers (float64 unless ``dtype``) of the slice's shape. The buffers are allocated once and
    reused: fresh large allocations cost a page fault per 4 KiB, which made a 1.1B fold spend most of
    its time in the kernel."""
    row = max(1, view[0].numel()) if view.shape[0] else 1
    step = max(1, SLICE_ELEMENTS // row)
    n = max(SLICE_ELEMENTS, row)  # one size for every call: the allocator hands the same block back
    buffers = [torch.empty(n, dtype=dtype, device=view.device) for _ in range(scratch)]
    # One thread: writing a weight loaded from a mapped file faults in every page, and two threads
    # faulting at once contend for the process's memory map (a 1.1B fold: 14 s on 2 threads, 4 s on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, view.shape[0], step):
            part = view[i:i + step]
            yield i, part, [b[:part.numel()].view(part.shape) for b in buffers]
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
    for i, part, (c,) in _slices(rows, dtype=dtype):
        c.copy_(part)
        if shift is not None:
            torch.mv(c, beta, out=shift[i:i + c.shape[0]])
        if gamma is not None:
            part.copy_(c.mul_(gamma[None, :]))
    return shift


def centre_output_(w: torch.Tensor, kind: str, layout: str = "out_in") -> None:
    """``centre_output`` on the weight itself (the small bias is centred by the caller)."""
    for _, part, (c,) in _slices(_hidden_last(w, kind, layout)):
        c.copy_(part)
        part.copy_(c.sub_(c.mean(dim=-1, keepdim=True)))


def rotate_writer_(w: torch.Tensor, q: torch.Tensor, kind: str, layout: str = "out_in") -> None:
    """``rotate_writer`` on the weight itself (the small bias is rotated by the caller)."""
    for _, part, (c, out) in _slices(_hidden_last(w, kind, layout), scratch=2):
        c.copy_(part)
        part.copy_(torch.matmul(c, q, out=out))


def rotate_reader_(w: torch.Tensor, q: torch.Tensor, layout: str) -> None:
    """``rotate_reader`` on the weight itself, a slice of outputs at a time."""
    for _, part, (c, out) in _slices(w if layout == "out_in" else w.t(), scratch=2):
        c.copy_(part)
        part.copy_(torch.matmul(c, q, out=out))
