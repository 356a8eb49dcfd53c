"""Pure float64 math of the norm-affine surgery (no graph, no modules): fold a norm's γ/β into the
linear that reads it, centre a writer of the residual stream, rotate by an orthogonal matrix.

Layouts: ``out_in`` is nn.Linear's weight (y = x·Wᵀ), ``in_out`` transformers' Conv1D and a matmul
with a parameter (y = x·W). Every function takes and returns float64 tensors; callers cast back.
"""

from __future__ import annotations

import math

import torch


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
