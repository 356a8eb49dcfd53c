"""RepBatchNorm and ProgressiveNorm: a gradual LayerNorm -> BatchNorm switch (SLAB, Guo et al., ICML 2024).

``RepBatchNorm(x) = BN(x) + alpha * x`` (token BN over the last dim, a learnable scalar alpha, SLAB's
"RepBN"): the identity branch keeps a path around the BN while it learns statistics, and in eval the
whole thing is one per-channel affine map, so it folds like a BN.

``ProgressiveNorm`` outputs ``lam * norm(x) + (1 - lam) * RepBN(x)`` where ``norm`` is the model's
original LayerNorm/RMSNorm and ``lam`` falls linearly from 1 to 0 over ``steps`` training forwards.
The step counter is a buffer (saved with the state dict, so a resumed run continues the schedule).
At step 0 it returns the original norm's output exactly (only that branch runs); once lam = 0 only the
RepBN runs, in train and eval, and the module is foldable (``finished``, ``eval_scale_shift``).

Unlike SLAB's reference code, eval mode uses the same lam as training (SLAB's eval always runs the
RepBN alone, which is only what the model computes once the schedule is over): a partly-converted
model evaluates as it trains.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import NormSurgeonError
from .token_batch_norm import TokenBatchNorm

__all__ = ["RepBatchNorm", "ProgressiveNorm"]


class RepBatchNorm(nn.Module):
    """``TokenBatchNorm(x) + alpha * x`` with a learnable scalar ``alpha`` (SLAB's RepBN; init 1).

    The inner ``bn`` is a :class:`TokenBatchNorm`, so it is padding-aware and ``calibrate`` sets its
    running statistics like any other BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, alpha: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.bn = TokenBatchNorm(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.full((1,), float(alpha), device=device, dtype=dtype))

    @property
    def num_features(self) -> int:
        return self.bn.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.alpha * x

    def eval_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) of the eval map: ``BN_eval(x) + alpha * x == x * scale + shift``
        (float32 or wider), scale = w / sqrt(var + eps) + alpha, shift = b - mean * w / sqrt(var + eps)."""
        bn = self.bn
        dt = torch.promote_types(bn.running_var.dtype, torch.float32)
        s = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        if bn.affine:
            s = s * bn.weight.detach().to(dt)
        shift = -bn.running_mean.to(dt) * s
        if bn.affine:
            shift = shift + bn.bias.detach().to(dt)
        return s + self.alpha.detach().to(dt), shift

    @classmethod
    def from_layernorm(cls, ln: nn.Module, *, alpha: float = 1.0, momentum: float | None = 0.1) -> "RepBatchNorm":
        """From a LayerNorm (affine copied into the BN as ``TokenBatchNorm.from_layernorm`` does)."""
        return cls._wrap(TokenBatchNorm.from_layernorm(ln, momentum=momentum), alpha)

    @classmethod
    def from_rmsnorm(cls, norm: nn.Module, *, alpha: float = 1.0, momentum: float | None = 0.1,
                     **kwargs) -> "RepBatchNorm":
        """From an RMSNorm (``TokenBatchNorm.from_rmsnorm``'s rules)."""
        return cls._wrap(TokenBatchNorm.from_rmsnorm(norm, momentum=momentum, **kwargs), alpha)

    @classmethod
    def _wrap(cls, bn: TokenBatchNorm, alpha: float) -> "RepBatchNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.bn = bn
        new.alpha = nn.Parameter(torch.full((1,), float(alpha), device=bn.running_mean.device,
                                            dtype=bn.running_mean.dtype))
        return new.train(bn.training)


class ProgressiveNorm(nn.Module):
    """``lam * norm(x) + (1 - lam) * rep(x)``, lam = max(0, 1 - step / steps), step counted per training forward.

    ``norm``: the original norm (a copy: the source module is never shared); ``rep``: a
    :class:`RepBatchNorm`. Build with :meth:`from_layernorm` / :meth:`from_rmsnorm` / :meth:`from_norm`.
    The schedule advances once per forward in training mode (a module called twice per optimizer step
    advances twice). ``steps == 0`` means RepBN only from the start.
    """

    def __init__(self, norm: nn.Module, rep: RepBatchNorm, steps: int) -> None:
        super().__init__()
        if steps < 0:
            raise NormSurgeonError(f"progressive steps must be >= 0, got {steps}")
        self.norm, self.rep = norm, rep
        device = rep.bn.running_mean.device
        self.register_buffer("step", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("total_steps", torch.tensor(int(steps), dtype=torch.long, device=device))
        # lam must be a Python number for torch.export/ONNX (a branch on a buffer's value is data-
        # dependent); this mirror follows the buffers outside export and is what an export reads.
        # (torch.compile reads the buffer: int() on it breaks the graph there, which is correct.)
        self._lam = self._lam_of(0, int(steps))

    @property
    def num_features(self) -> int:
        return self.rep.num_features

    @staticmethod
    def _lam_of(step: int, total: int) -> float:
        return 0.0 if total <= 0 else max(0.0, 1.0 - step / total)

    @property
    def lam(self) -> float:
        """The current weight of the original norm (1 at step 0, 0 once ``step >= steps``)."""
        if not torch.compiler.is_exporting():
            self._lam = self._lam_of(int(self.step), int(self.total_steps))
        return self._lam

    @property
    def finished(self) -> bool:
        """lam == 0: the module computes only ``rep`` and folds (``eval_scale_shift``)."""
        return self.lam == 0.0

    def eval_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel eval affine of ``rep``; only the module's function once ``finished``."""
        if not self.finished:
            raise NormSurgeonError(f"ProgressiveNorm at step {int(self.step)}/{int(self.total_steps)} still mixes in "
                                   f"its {type(self.norm).__name__} (lambda={self.lam:.3g}): it is not a fixed affine map")
        return self.rep.eval_scale_shift()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.lam
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        if lam == 1.0:
            return self.norm(x)
        if lam == 0.0:
            return self.rep(x)
        return lam * self.norm(x) + (1.0 - lam) * self.rep(x)

    def extra_repr(self) -> str:
        return f"step={int(self.step)}, steps={int(self.total_steps)}, lam={self.lam:.4g}"

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_layernorm(cls, ln: nn.Module, steps: int, *, alpha: float = 1.0,
                       momentum: float | None = 0.1) -> "ProgressiveNorm":
        """Progressive switch from a LayerNorm over the last dim: a deep copy of ``ln`` (so at step 0
        the output is bit-for-bit the LN's) and a RepBN whose BN starts from the LN's affine params."""
        rep = RepBatchNorm.from_layernorm(ln, alpha=alpha, momentum=momentum)
        return cls(copy.deepcopy(ln), rep, steps).train(ln.training)

    @classmethod
    def from_rmsnorm(cls, norm: nn.Module, steps: int, *, alpha: float = 1.0, momentum: float | None = 0.1,
                     **kwargs) -> "ProgressiveNorm":
        """Progressive switch from an RMSNorm (torch or transformers family): a deep copy of it and a
        RepBN from ``TokenBatchNorm.from_rmsnorm`` (``weight_offset=``/``eps=`` passed on)."""
        rep = RepBatchNorm.from_rmsnorm(norm, alpha=alpha, momentum=momentum, **kwargs)
        return cls(copy.deepcopy(norm), rep, steps).train(norm.training)

    @classmethod
    def from_norm(cls, norm: nn.Module, steps: int, **kwargs) -> "ProgressiveNorm":
        """``from_layernorm`` for ``nn.LayerNorm`` (and subclasses), else ``from_rmsnorm``."""
        if isinstance(norm, nn.LayerNorm):
            return cls.from_layernorm(norm, steps, **kwargs)
        return cls.from_rmsnorm(norm, steps, **kwargs)
