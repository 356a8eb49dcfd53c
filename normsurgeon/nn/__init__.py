"""Replacement normalization modules, small and composable (in the spirit of timm's ``layers/``).

Pure ``nn.Module`` code: no graph capture, no model surgery. ``convert`` decides where these go;
this package only defines what they compute and how they are built from the module they replace.

- :class:`TokenBatchNorm`   BatchNorm over the last dim of (B, C), (B, T, C), (B, H, W, C) inputs.
- :class:`ChannelLayerNorm` LayerNorm over dim 1 of (N, C, *) inputs ("channels_first" LN).
- :class:`FrozenBatchNorm`  BN as a fixed per-channel scale/shift from buffers (any rank, channel dim 1).
- :class:`PowerNorm`        Shen et al. 2020: quadratic-mean BN for token models (running stats, approx. backward).
- :class:`RepBatchNorm`     SLAB's RepBN, ``TokenBatchNorm(x) + alpha * x``.
- :class:`ProgressiveNorm`  SLAB's progressive LN -> RepBN switch, ``lam * LN(x) + (1 - lam) * RepBN(x)``.
- :func:`capture_padding_mask`, :func:`padding_mask`: token BN / PowerNorm statistics over real tokens only.
- :func:`batchnorm_to_groupnorm`, :func:`ffn_batchnorm`, :func:`make_identity`.
- :func:`convert_sync_batchnorm`, :class:`SyncTokenBatchNorm`: synchronized BN for DDP training.

Rules every ``from_*`` constructor follows:

- affine parameters are *copied* (never shared with the source), with the source's dtype, device and
  ``requires_grad``; the new module takes the source's train/eval mode;
- a source without affine parameters gives a new module without them where the new class supports
  that (``TokenBatchNorm(affine=False)``, ``ChannelLayerNorm(elementwise_affine=False)``,
  ``GroupNorm(affine=False)``); :class:`FrozenBatchNorm` always holds weight/bias buffers, so there
  they are 1 and 0. A source with a weight but no bias gets a zero bias where the new class needs one.

See docs/modules.md for when to use which and what each becomes in ONNX.

One module per file.
"""

from ._common import MIN_BN_EPS, bn_eps  # noqa: F401 - convert and tests use them
from .channel_layer_norm import ChannelLayerNorm
from .factories import batchnorm_to_groupnorm, ffn_batchnorm, make_identity
from .frozen_batch_norm import FrozenBatchNorm
from .padding_mask import capture_padding_mask, current_padding_mask, padding_mask
from .power_norm import GroupScaling, PowerNorm
from .progressive_norm import ProgressiveNorm, RepBatchNorm
from .sync_batch_norm import SyncTokenBatchNorm, convert_sync_batchnorm
from .token_batch_norm import TokenBatchNorm
from .registry import MODULES, module_class  # noqa: E402 - target name -> class

__all__ = [
    "MIN_BN_EPS", "bn_eps",
    "TokenBatchNorm", "ChannelLayerNorm", "FrozenBatchNorm", "PowerNorm", "GroupScaling",
    "RepBatchNorm", "ProgressiveNorm", "capture_padding_mask", "current_padding_mask", "padding_mask",
    "batchnorm_to_groupnorm", "ffn_batchnorm", "make_identity", "MODULES", "module_class",
    "SyncTokenBatchNorm", "convert_sync_batchnorm",
]

