"""An in-place rewrite of a loaded model, written straight into its output's weights file.

``fold(DIR, affine=True, output=OUT/)`` and ``rotate(DIR, output=OUT/)`` change a loaded model's
weights in place, then save every weight. Done plainly, each changed weight is touched twice in new
memory: once when the rewrite writes it (a copy-on-write of the file the model was loaded from: the
model lives in a private mapping of it), once when the saved file's pages are written. On a VM where
new memory costs about a second a gigabyte, that was a third of a 1.1B fold's time.

``prepare`` does the saving first: before the rewrite, the output's weights file is written into the
output's temporary directory (``saving.temp_dir``): each tensor the input file provably still holds
is copied file to file in the kernel (``os.copy_file_range``; through a buffer where the kernel will
not copy between the two files), any other is written from memory; the file is mapped shared and the
model's tensors are moved onto it, so the rewrite, its verification and any rollback work on the
file's own pages, and ``replay.save`` finds the weights already written (``MappedOutput.holds``).
``close`` turns the mapping private at the same address, so a later in-place change to the model the
API hands back (training, say) never reaches the saved file; its unchanged pages are still read from
that file, as a transformers model's are from its checkpoint (replace the file by renaming a new one
over it, never by rewriting it in place). A recipe directory is loaded mapped for such a call
(``api.load(map_weights=True)``), so its tensors too are copied file to file.

Only for a model of ``MIN_BYTES`` or more loaded from one safetensors file holding each of its tensors
once, with twice the weights' size free on the output's disk (on a copy-on-write file system every
rewritten page takes new blocks, and a full disk under a mapping is a crash, not an error).

"Provably still holds": the tensor lies in a private mapping of that very file at its range, and
``/proc/self/pagemap`` shows none of its pages was ever written (each page is either the file's own
page or not yet read in). Only that proof lets bytes be copied from the file; without it (a tensor
changed since loading, another mapping, no pagemap) the model's own bytes are written. Linux only
(``prepare`` returns None elsewhere: the plain save is used).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from . import file_tensors, pages
from .errors import NormSurgeonError, one_line
from .saving import temp_dir

WEIGHTS_METADATA = {"format": "pt", "normsurgeon": "recipe"}
# smaller models take the plain save: the mapping pays off on large weights, and from this size on
# (verify.LEAN_BYTES) the save checks its round trip byte for byte, not by comparing outputs with a
# reloaded copy, whose tensors the allocator aligns otherwise than the file does
MIN_BYTES = 1 << 30
_ALIGN = 4096  # where the data starts in the file: a page boundary, so a tensor's alignment is its offset's


class _Place(NamedTuple):
    """Where one tensor of the model was moved: its address, and what the file says it is."""

    tensor: torch.Tensor
    address: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    at: int  # the byte offset of its data in the file
    size: int


@dataclass
class MappedOutput:
    """The output's temporary directory and its weights file, mapped shared under the model's tensors."""

    dir: Path
    file: Path
    places: dict[int, _Place]  # id(tensor) -> where it was moved
    names: dict[str, int]  # file key -> id(tensor)
    _map: mmap.mmap | None = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)

    def holds(self, model: nn.Module) -> bool:
        """Whether the file is exactly ``model``'s weights: every tensor of its state dict (tied ones
        once) is still the one moved onto the file, at its place, as the file describes it, and nothing
        was added or removed."""
        if self._map is None:
            return False
        state = model.state_dict(keep_vars=True)
        for key, t in state.items():
            place = self.places.get(id(t))
            if place is None or place.tensor is not t or t.data_ptr() != place.address or not t.is_contiguous() \
                    or (t.dtype, tuple(t.shape)) != (place.dtype, place.shape):
                return False
            if key in self.names and self.names[key] != id(t):
                return False
        return {id(t) for t in state.values()} == set(self.places) and all(k in state for k in self.names)

    def saved_in(self, model: nn.Module, file: Path) -> bool:
        """Whether ``file`` is this weights file (the same inode as the mapping's) and ``model``'s tensors
        are views of it where its header says (``holds``): then every byte the file holds for a tensor is
        the tensor's own memory, and reading the file back to compare it with the model compares each
        page with itself (0.4 s of a 1.1B ``rotate -o``)."""
        if self._fd is None or not self.holds(model):
            return False
        try:
            mine, theirs = os.fstat(self._fd), os.stat(file)
            start, header = file_tensors.read_header(file)
        except (OSError, ValueError):
            return False
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino) or set(header) != set(self.names):
            return False
        for key, e in header.items():
            place = self.places[self.names[key]]
            a, b = e["data_offsets"]
            if (start + a, b - a) != (place.at, place.size) or e["dtype"] != file_tensors.ST_NAMES.get(place.dtype) \
                    or tuple(e["shape"]) != place.shape:
                return False
        return True

    def close(self) -> None:
        """Turn the shared mapping private at the same address (the model's tensors keep their values,
        later writes stay in memory) and remove the temporary directory if it is still there (not
        moved into place: the save failed or never happened)."""
        try:
            if self._map is not None:
                try:
                    pages.remap_private(self._map, self._fd)
                except OSError:  # never leave the model writing into the saved file: copies read from it
                    self._read_copies()
                self._map = None
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def _read_copies(self) -> None:
        """Give every tensor memory of its own, read from the file, never from the mapping (a failed
        MAP_FIXED may have removed it)."""
        with torch.no_grad():
            for place in self.places.values():
                fresh = torch.empty(place.shape, dtype=place.dtype)
                if place.size:
                    raw = memoryview(fresh.reshape(-1).view(torch.uint8).numpy())
                    file_tensors.read_range(self._fd, raw, place.at, self.file)
                place.tensor.data = fresh


def available() -> bool:
    """Whether this system can write an output first (Linux: ``copy_file_range`` and ``/proc/self/pagemap``)."""
    return sys.platform.startswith("linux") and hasattr(os, "copy_file_range")


def prepare(model: nn.Module, out: Path, weights_file: str, *, min_bytes: int | None = None) -> MappedOutput | None:
    """The output's weights file for ``model`` (loaded by the tool from one safetensors file), written
    into a new temporary directory beside ``out`` and mapped under the model's tensors; None where the
    model is not such a model (the caller saves as usual)."""
    if not available():
        return None
    plan = _plan(model, MIN_BYTES if min_bytes is None else min_bytes)
    if plan is None:
        return None
    source, start, header, state = plan
    size = max((e["data_offsets"][1] for e in header.values()), default=0)
    try:
        disk = os.statvfs(out.parent)
        free = disk.f_bavail * disk.f_frsize
    except OSError:
        free = 0
    if free < 2 * size:
        # room for the copy and as much again: on a copy-on-write file system each rewritten page takes
        # new blocks, and a full disk under a mapping is a crash (SIGBUS), not an error
        return None
    tmp = temp_dir(out)
    try:
        return _write_and_map(tmp, tmp / weights_file, source, start, header, state)
    except OSError as e:  # a full disk, say: nothing was changed yet
        shutil.rmtree(tmp, ignore_errors=True)
        raise NormSurgeonError(f"`output` {out}: cannot write the weights: {one_line(e, typed=True)}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan(model: nn.Module, min_bytes: int):
    """(input file, where its data starts, its header, key -> the model's tensor) when every tensor of
    the model's state dict is registered to one safetensors file whose keys are exactly the state's
    (tied tensors under one of their names), with the same dtypes and shapes; else None."""
    state = model.state_dict(keep_vars=True)
    if not state or sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values()) < min_bytes:
        return None
    files = set()
    for t in state.values():
        src = file_tensors.source_of(t)
        if src is None or not t.is_contiguous() or t.device.type != "cpu":
            return None
        files.add(src.file)
    if len(files) != 1:
        return None
    source = files.pop()
    try:
        start, header = file_tensors.read_header(source)
    except (OSError, ValueError):
        return None
    by_id: dict[int, list[str]] = {}
    for key, t in state.items():
        by_id.setdefault(id(t), []).append(key)
    for key, e in header.items():
        t = state.get(key)
        if t is None or file_tensors.ST_NAMES.get(t.dtype) != e.get("dtype") or list(t.shape) != e.get("shape"):
            return None
        if (start + e["data_offsets"][0]) % t.element_size():
            return None  # a range the dtype cannot start at: no view of the file can hold it
    # every tensor exactly once in the file: a tied tensor stored under two keys would be moved onto one
    # range while the other kept the old bytes
    if any(sum(k in header for k in keys) != 1 for keys in by_id.values()):
        return None
    return source, start, header, {k: state[k] for k in header}


def _write_and_map(tmp: Path, file: Path, source: Path, start: int, header: dict, state: dict) -> MappedOutput:
    entries = {"__metadata__": WEIGHTS_METADATA, **header}
    text = json.dumps(entries, separators=(",", ":")).encode()
    data_start = -(-(8 + len(text)) // _ALIGN) * _ALIGN
    text += b" " * (data_start - 8 - len(text))  # padding the safetensors format allows
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    ok = False
    try:
        os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(fd, data_start + end)
        src = os.open(source, os.O_RDONLY)
        proof = pages.UntouchedFilePages(src)
        try:
            copy = _Copier(src, fd, source)
            for key, e in header.items():
                a, b = e["data_offsets"]
                t = state[key]
                if proof.holds(t, start + a, b - a):
                    copy(start + a, data_start + a, b - a)
                else:
                    _write_tensor(fd, t, data_start + a)
        finally:
            proof.close()
            os.close(src)
        mm = mmap.mmap(fd, data_start + end) if data_start + end > 0 else None
        places: dict[int, _Place] = {}
        names: dict[str, int] = {}
        with torch.no_grad():
            for key, e in header.items():
                t = state[key]
                names[key] = id(t)
                if id(t) in places:
                    continue
                a, b = e["data_offsets"]
                t.data = _view(mm, data_start + a, b - a, t)
                places[id(t)] = _Place(t, t.data_ptr(), t.dtype, tuple(t.shape), data_start + a, b - a)
        ok = True
        pages.give_back_freed_memory()
        return MappedOutput(tmp, file, places, names, mm, fd)
    finally:
        if not ok:
            os.close(fd)


def _view(mm: mmap.mmap | None, offset: int, size: int, like: torch.Tensor) -> torch.Tensor:
    if size == 0 or mm is None:
        return torch.empty(like.shape, dtype=like.dtype)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=offset)
    return raw.view(like.dtype).view(like.shape)


# copy_file_range refused for this pair of files (another file system, a FUSE or network mount): copy
# through a buffer instead; anything else (a full disk, an I/O error) is an error
_NO_KERNEL_COPY = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EPERM}
_CHUNK = 16 * 2**20


class _Copier:
    """Copy ranges from ``src`` to ``dst``: in the kernel while it accepts, else through one buffer."""

    def __init__(self, src: int, dst: int, source: Path) -> None:
        self.src, self.dst, self.source, self.kernel, self._buf = src, dst, source, True, None

    def __call__(self, src_at: int, dst_at: int, size: int) -> None:
        done = 0
        while done < size and self.kernel:
            try:
                n = _copy_range(self.src, self.dst, size - done, src_at + done, dst_at + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel = False
                break
            if n <= 0:
                raise OSError("the input file is shorter than its header says")
            done += n
        if done < size:
            self._buffered(src_at + done, dst_at + done, size - done)

    def _buffered(self, src_at: int, dst_at: int, size: int) -> None:
        if self._buf is None:
            self._buf = bytearray(_CHUNK)
        view = memoryview(self._buf)
        done = 0
        while done < size:
            k = min(len(view), size - done)
            file_tensors.read_range(self.src, view[:k], src_at + done, self.source)
            w = 0
            while w < k:
                w += os.pwrite(self.dst, view[w:k], dst_at + done + w)
            done += k


def _copy_range(src: int, dst: int, count: int, src_at: int, dst_at: int) -> int:
    return os.copy_file_range(src, dst, count, src_at, dst_at)


def _write_tensor(fd: int, t: torch.Tensor, at: int) -> None:
    raw = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(raw):
        done += os.pwrite(fd, raw[done:], at + done)
