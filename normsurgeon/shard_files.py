"""The tensors of a transformers directory's safetensors files, read a chunk at a time, and bounded output
shards written with safetensors' own writer (``shard_stream``'s input and output).

A tensor of ``safe_open`` is a view of a mapping of the whole file, whose touched pages stay resident
(and count as this process's memory) while the file is open or a view lives: reading a 2 GiB
checkpoint through one open handle left 2.8 GiB resident. So every read here opens the file, copies at
most a few MiB into memory of its own and closes it: what is resident is what the caller holds.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import NormSurgeonError, one_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
INDEX = "model.safetensors.index.json"
READ_BYTES = 4 << 20  # one read's copy


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class Checkpoint:
    """The tensors of a transformers directory (``model.safetensors``, or the shards its index names):
    names, shapes and dtypes from the headers; tensors and row slices read on demand into memory of
    their own."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {n: folder / f for n, f in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise NormSurgeonError(f"{index}: cannot read the shard index ({one_line(e)})") from e
        elif (folder / "model.safetensors").is_file():
            files = None
        else:
            raise NormSurgeonError(f"{folder}: `stream=True` reads model.safetensors or sharded "
                                   f"model-XXXXX-of-YYYYY.safetensors with {INDEX}; none found")
        handles: dict[Path, Any] = {}  # open to read the headers only
        self.file: dict[str, Path] = {}
        for f in dict.fromkeys(files.values()) if files is not None else [folder / "model.safetensors"]:
            if f.parent.resolve() != folder.resolve() or not f.is_file():
                raise NormSurgeonError(f"{index}: names {f.name}, which is not a file of {folder}")
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise NormSurgeonError(f"{f}: not a readable safetensors file ({one_line(e)})") from e
            handles[f] = h
            for n in h.keys():
                self.file[n] = f
        if files is not None:
            missing = [n for n in files if n not in self.file]
            if missing:
                raise NormSurgeonError(f"{index}: {missing[0]} is not in {files[missing[0]].name}")
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, torch.dtype] = {}
        for n, f in self.file.items():
            sl = handles[f].get_slice(n)
            self.shape[n] = tuple(sl.get_shape())
            dt = _DTYPES.get(sl.get_dtype())
            if dt is None:
                raise NormSurgeonError(f"{f}: {n} has dtype {sl.get_dtype()}, which `stream=True` does not handle")
            self.dtype[n] = dt

    @property
    def names(self) -> list[str]:
        return list(self.file)

    def _open(self, name: str) -> Any:
        from safetensors import safe_open

        return safe_open(str(self.file[name]), framework="pt")

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape[name]
        out = torch.empty(shape, dtype=self.dtype[name])
        if not shape or out.numel() == 0:
            with self._open(name) as h:
                return h.get_tensor(name).clone()
        step = self._step(name)
        for start in range(0, shape[0], step):
            out[start:start + step] = self.rows(name, start, min(shape[0], start + step))
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        with self._open(name) as h:
            return h.get_slice(name)[start:stop].clone()

    def _step(self, name: str) -> int:
        row = max(1, self.nbytes(name) // max(1, self.shape[name][0]))
        return max(1, READ_BYTES // row)

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape[name]) * self.dtype[name].itemsize


class ShardWriter:
    """Tensors into safetensors shards of at most ``max_bytes`` (one bigger tensor gets a shard of its
    own), each written as soon as it is full; ``finish`` names them model-XXXXX-of-YYYYY and writes the
    index (one shard: model.safetensors)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def make_room(self, nbytes: int) -> None:
        """Write the shard being gathered if ``nbytes`` more would overflow it."""
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        self.make_room(n)
        self.buffer[name] = t.contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> int:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({n: final for n in names})
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                     "weight_map": weight_map}, indent=2) + "\n")
        return len(self.files)


def copy_small_files(src: Path, dst: Path, untied: bool) -> None:
    """config.json (untied: tie_word_embeddings false) and the other non-weight files, as data; code
    files are left behind (the output loads with built-in classes only), and so is a recipe: the output
    is a transformers directory, and a copied recipe would describe weights it no longer holds."""
    from .replay import RECIPE_FILE

    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in (INDEX, RECIPE_FILE) or f.name.endswith(WEIGHT_SUFFIXES) or f.suffix == ".py":
            continue
        if f.name == "config.json" and untied:
            cfg = json.loads(f.read_text())
            cfg["tie_word_embeddings"] = False
            (dst / f.name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(f, dst / f.name)


def check_written(folder: Path, expect: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """The written directory holds exactly the expected tensors, shapes and dtypes (read back)."""
    got = Checkpoint(folder)
    for n, (shape, dtype) in expect.items():
        if got.shape.get(n) != shape or got.dtype.get(n) != dtype:
            raise NormSurgeonError(f"internal: the written {n} is {got.shape.get(n)} {got.dtype.get(n)}, expected "
                                   f"{shape} {dtype}; nothing written")
    extra = set(got.names) - set(expect)
    if extra:
        raise NormSurgeonError(f"internal: the written directory holds unexpected tensors ({sorted(extra)[0]})")
