"""The one safe reader for tensor files the user hands in (verification inputs, calibration data).

``.pt``/``.pth`` are loaded with ``weights_only=True`` (tensors and containers only: no code runs),
``.npy``/``.npz`` without pickles, ``.safetensors`` as it is. What the tensors mean (input sets,
calibration batches) is for the caller to decide.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import NormSurgeonError, one_line

SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def read_tensors(path: str | os.PathLike, what: str, *, npz_positional: bool = True) -> Any:
    """The tensors in ``path``: a tensor, a list, or a dict name -> tensor (as the file holds them).

    ``what`` names the file in errors (``"--inputs"``). ``npz_positional``: an ``.npz`` whose keys
    are all ``arr_0``, ``arr_1``... (``np.savez(a, b)``) is a list, not a dict.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise NormSurgeonError(f"{what} {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise NormSurgeonError(f"{what} {path}: unknown format {suffix or '(no suffix)'}; "
                               "use .pt, .npy, .npz or .safetensors")
    try:
        if suffix in (".pt", ".pth"):
            return torch.load(str(path), map_location="cpu", weights_only=True)
        if suffix == ".npy":
            return _from_numpy(np.load(str(path), allow_pickle=False))
        if suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as z:
                keys = list(z.keys())
                if npz_positional and keys and all(re.fullmatch(r"arr_\d+", k) for k in keys):
                    return [_from_numpy(z[f"arr_{i}"]) for i in range(len(keys))]
                return {k: _from_numpy(z[k]) for k in keys}
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    except NormSurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable file, pickled objects in .pt, object arrays in .npy
        raise NormSurgeonError(f"{what} {path}: cannot read: {one_line(e, typed=True)}") from e


def _from_numpy(a) -> torch.Tensor:
    import numpy as np

    if a.dtype == np.uint16 or a.dtype.kind not in "biuf":
        raise NormSurgeonError(f"unsupported array dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))
