"""Tensors as they lie in a safetensors file: read with plain reads, one at a time, and where a model
loaded from a directory keeps each of its parameters on disk.

Plain reads, not a mapping of the whole file: pages of a mapped file count in the process's resident
memory while it is open, so reading a 2 GB file back through safetensors' own mapping costs 2 GB of
peak memory (a comparison maps one 16 MiB window at a time, ``fd_holds``).

``register(model, directory)`` remembers, for a model the tool loaded, which file range holds each
parameter; an in-place rewrite's undo log (``verify.UndoLog``) then reads a replaced tensor back from
the input file, once it has checked that the file holds exactly the tensor's current bytes, instead of
writing a copy of it to a temporary file (a 1.1B rotation replaces 2.2 GB; writing them cost seconds,
reading them back costs a fraction, and only when a rewrite is undone). The input file is never
written by the tool (``saving.guard_inputs``).
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAMES = {t: n for n, t in ST_DTYPES.items()}


def read_header(file: Path) -> tuple[int, dict]:
    """(where the data starts, the header's tensor entries) of a safetensors file."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


@dataclass(frozen=True)
class FileSlice:
    """One tensor's bytes in a safetensors file."""

    file: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    def fits(self, t: torch.Tensor) -> bool:
        return ST_NAMES.get(t.dtype) == self.dtype and tuple(t.shape) == self.shape and t.device.type == "cpu"

    def holds(self, t: torch.Tensor, buf: bytearray | None = None) -> bool:
        """Whether the file holds exactly ``t``'s current bytes (``buf``: a reusable read buffer)."""
        if not self.fits(t):
            return False
        fd = os.open(self.file, os.O_RDONLY)
        try:
            return fd_holds(fd, self, t, buf if buf is not None else bytearray(COMPARE_CHUNK))
        finally:
            os.close(fd)


def fd_holds(fd: int, where: FileSlice, t: torch.Tensor, buf: bytearray) -> bool:
    """Whether ``where`` in the open file ``fd`` holds exactly ``t``'s bytes, compared a window of
    ``len(buf)`` bytes at a time: each window is mapped read-only and compared in place, then unmapped
    (twice as fast as reading it into ``buf``: a 1.1B rotation's undo log compared 2.2 GB in 0.4 s
    against 0.9; one window at a time, so the pages count in the process's memory only while they are
    compared). Where the file cannot be mapped, it is read into ``buf`` (a reusable buffer: a fresh one
    the size of each weight cost more in page faults than the reading and comparing).

    A mapped window shares what any mapping of a file risks, as the model's own mapping of the same
    checkpoint does (transformers and ``load(map_weights=True)`` map it): a file truncated by another
    process while a window is read, or a disk error under it, ends the process (SIGBUS) instead of
    raising. A file already shorter than the range is a plain False."""
    mine = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if mine.numel() != where.end - where.start:
        return False
    if where.end > os.fstat(fd).st_size:
        return False  # never map past the end: that page would be a SIGBUS, not an error
    view, off = memoryview(buf), 0
    while off < mine.numel():
        k = min(len(view), mine.numel() - off)
        try:
            same = _mapped_same(fd, where.start + off, mine[off:off + k])
        except (OSError, ValueError):  # a file that cannot be mapped (a pipe, some FUSE mounts)
            read_range(fd, view[:k], where.start + off, where.file)
            same = same_bytes(view[:k], mine[off:off + k])
        if not same:
            return False
        off += k
    return True


def _mapped_same(fd: int, offset: int, mine: torch.Tensor) -> bool:
    """Whether the file's bytes at ``offset`` are ``mine``'s, compared through a read-only mapping."""
    lo = offset - offset % mmap.ALLOCATIONGRANULARITY
    window = mmap.mmap(fd, offset - lo + mine.numel(), prot=mmap.PROT_READ, offset=lo)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: this tensor is only read
            theirs = torch.frombuffer(window, dtype=torch.uint8, count=mine.numel(), offset=offset - lo)
        try:
            return _equal_bytes(theirs, mine)
        finally:
            del theirs  # the mapping cannot close while a tensor still views it
    finally:
        window.close()


# 16 MiB: a multiple of every element size, small enough to stay in memory already touched
COMPARE_CHUNK = 16 * 2**20


def same_bytes(raw: bytearray | memoryview, t: torch.Tensor) -> bool:
    """Whether ``raw`` is exactly ``t``'s bytes."""
    mine = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if len(raw) != mine.numel():
        return False
    if not raw:
        return True
    return _equal_bytes(torch.frombuffer(raw, dtype=torch.uint8), mine)


def _equal_bytes(theirs: torch.Tensor, mine: torch.Tensor) -> bool:
    """Two flat uint8 tensors, compared 8 (4, 2) bytes at a time where they divide the length and the
    offsets allow (byte by byte is five times slower on a 2 GB model)."""
    if theirs.numel() != mine.numel():
        return False
    for wide in (torch.int64, torch.int32, torch.int16):
        size = torch.empty((), dtype=wide).element_size()
        if theirs.numel() % size == 0:
            try:
                return torch.equal(theirs.view(wide), mine.view(wide))
            except RuntimeError:  # an offset the wider view cannot take
                break
    return torch.equal(theirs, mine)


class PinnedFiles:
    """Input files held open for one pass's undo logs: what a rollback reads comes through the open
    descriptor, so renaming or deleting the path meanwhile changes nothing, and a file rewritten in
    place (another size or modification time) is refused instead of read."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[int, tuple[int, int, int]]] = {}
        self._buf: bytearray | None = None

    def pin(self, where: FileSlice, t: torch.Tensor) -> Callable[[], None] | None:
        """How to put ``t``'s current bytes back from ``where``, or None when the file does not hold
        them (or cannot be read: the caller keeps a copy instead)."""
        if not where.fits(t):
            return None
        try:
            fd, stamp = self._fd(where.file)
            if self._buf is None:
                self._buf = bytearray(COMPARE_CHUNK)
            if not fd_holds(fd, where, t, self._buf):
                return None
        except OSError:
            return None

        def restore() -> None:
            from .errors import NormSurgeonError

            try:
                st = os.fstat(fd)
                if (st.st_ino, st.st_size, st.st_mtime_ns) != stamp:
                    raise OSError("it was rewritten meanwhile")
                raw = _pread(fd, where)
            except OSError as e:
                raise NormSurgeonError(f"cannot roll back a rewrite: {where.file} changed while the model was being "
                                       f"rewritten ({e}); the model in memory is not the original") from None
            with torch.no_grad():
                if raw:
                    t.copy_(torch.frombuffer(raw, dtype=torch.uint8).view(ST_DTYPES[where.dtype]).reshape(where.shape))
        return restore

    def _fd(self, file: Path) -> tuple[int, tuple[int, int, int]]:
        if file not in self._open:
            fd = os.open(file, os.O_RDONLY)
            st = os.fstat(fd)
            self._open[file] = (fd, (st.st_ino, st.st_size, st.st_mtime_ns))
        return self._open[file]

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()
        self._buf = None


def _pread(fd: int, where: FileSlice) -> bytearray:
    raw = bytearray(where.end - where.start)
    read_range(fd, memoryview(raw), where.start, where.file)
    return raw


def read_range(fd: int, view: memoryview, offset: int, file: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (a read may return less than asked)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{file}: truncated")
        done += n


_SOURCES: "weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[weakref.ref, FileSlice]]]" = \
    weakref.WeakKeyDictionary()


def register(model: nn.Module, directory: Path) -> None:
    """Remember where ``directory``'s safetensors hold ``model``'s parameters (by name, dtype and shape;
    whether the bytes are the same is checked when one is needed)."""
    entries: dict[str, FileSlice] = {}
    try:
        for file in sorted(Path(directory).glob("*.safetensors")):
            start, header = read_header(file)
            for name, e in header.items():
                a, b = e["data_offsets"]
                entries[name] = FileSlice(file, start + a, start + b, e["dtype"], tuple(e["shape"]))
    except (OSError, ValueError, KeyError, TypeError):
        return  # a file this cannot read: the undo log spills copies, as for any model
    found = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        where = entries.get(name)
        if where is not None and where.fits(p):
            found[id(p)] = (weakref.ref(p), where)
    _SOURCES[model] = found


def source_of(t: torch.Tensor) -> FileSlice | None:
    """The file range registered for ``t`` (the very tensor object, still alive), or None."""
    for found in list(_SOURCES.values()):
        hit = found.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
    return None
