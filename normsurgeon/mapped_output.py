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

import ctypes
import errno
import json
import mmap
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import file_tensors
from .errors import NormSurgeonError, one_line
from .saving import temp_dir

WEIGHTS_METADATA = {"format": "pt", "normsurgeon": "recipe"}
# smaller models take the plain save: the mapping pays off on large weights, and from this size on
# (verify.LEAN_BYTES) the save checks its round trip byte for byte, not by comparing outputs with a
# reloaded copy, whose tensors the allocator aligns otherwise than the file does
MIN_BYTES = 1 << 30
_ALIGN = 4096  # where the data starts in the file: a page boundary, so a tensor's alignment is its offset's


@dataclass
class MappedOutput:
    """The output's temporary directory and its weights file, mapped shared under the model's tensors."""

    dir: Path
    file: Path
    places: dict[int, tuple[int, torch.Tensor]]  # id(tensor) -> (its data address, the tensor)
    names: dict[str, int]  # file key -> id(tensor)
    kinds: dict[int, tuple[torch.dtype, tuple[int, ...]]]  # id(tensor) -> the dtype and shape the file says
    _map: mmap.mmap | None = field(default=None, repr=False)
    _fd: int | None = field(default=None, repr=False)
    _data_start: int = 0
    _ranges: dict[int, list[int]] = field(default_factory=dict, repr=False)  # id(tensor) -> its data_offsets

    def holds(self, model: nn.Module) -> bool:
        """Whether the file is exactly ``model``'s weights: every tensor of its state dict (tied ones
        once) is still the one moved onto the file, at its place, and nothing was added or removed."""
        if self._map is None:
            return False
        state = model.state_dict(keep_vars=True)
        seen = set()
        for key, t in state.items():
            hit = self.places.get(id(t))
            if hit is None or hit[1] is not t or t.data_ptr() != hit[0] or not t.is_contiguous() \
                    or (t.dtype, tuple(t.shape)) != self.kinds[id(t)]:
                return False
            if key in self.names and self.names[key] != id(t):
                return False
            seen.add(id(t))
        return seen == set(self.names.values()) and all(k in state for k in self.names)

    def close(self) -> None:
        """Turn the shared mapping private at the same address (the model's tensors keep their values,
        later writes stay in memory) and remove the temporary directory if it is still there (not
        moved into place: the save failed or never happened)."""
        try:
            if self._map is not None:
                try:
                    _remap_private(self._map, self._fd)
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
            for key, (_, t) in self.places.items():
                a, b = self._ranges[key]
                fresh = torch.empty(t.shape, dtype=t.dtype)
                if b > a:
                    raw = memoryview(fresh.reshape(-1).view(torch.uint8).numpy())
                    file_tensors._read_into(self._fd, raw, self._data_start + a, self.file)
                t.data = fresh


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
        try:
            proof = _Proof(src)
            copy = _Copier(src, fd)
            for key, e in header.items():
                a, b = e["data_offsets"]
                t = state[key]
                if proof.holds(t, start + a, b - a):
                    copy(start + a, data_start + a, b - a)
                else:
                    _write_tensor(fd, t, data_start + a)
        finally:
            os.close(src)
        mm = mmap.mmap(fd, data_start + end) if data_start + end > 0 else None
        places: dict[int, tuple[int, torch.Tensor]] = {}
        names: dict[str, int] = {}
        with torch.no_grad():
            for key, e in header.items():
                t = state[key]
                names[key] = id(t)
                if id(t) in places:
                    continue
                a, b = e["data_offsets"]
                t.data = _view(mm, data_start + a, b - a, t)
                places[id(t)] = (t.data_ptr(), t)
        ok = True
        _give_back_freed_memory()
        kinds = {i: (t.dtype, tuple(t.shape)) for i, (_, t) in places.items()}
        return MappedOutput(tmp, file, places, names, kinds, mm, fd, data_start,
                            {id(state[k]): e["data_offsets"] for k, e in header.items()})
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

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst, self.kernel, self._buf = src, dst, True, None

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
            file_tensors._read_into(self.src, view[:k], src_at + done, Path("the input file"))
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


class _Proof:
    """Whether a tensor's bytes are provably the input file's: it lies in a private mapping of that
    file, at the file offset of its range, and no page under it was ever written (pagemap: each page
    is the file's own or not yet read in, none anonymous, none swapped)."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)  # the file being copied from, whatever its path names now
        self._inode = (st.st_dev, st.st_ino)
        self._maps = _file_mappings(self._inode)
        try:
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError:
            self._pagemap = None
        if self._pagemap is not None and not self._trustworthy():
            os.close(self._pagemap)
            self._pagemap = None

    def _trustworthy(self) -> bool:
        """pagemap must show a page just written as present and anonymous: where it reads all zeros (a
        sandbox, an emulation), every page would pass for one never read in."""
        probe = torch.ones(2 * mmap.PAGESIZE, dtype=torch.uint8)
        page = -(-probe.data_ptr() // mmap.PAGESIZE)
        try:
            bits = int.from_bytes(os.pread(self._pagemap, 8, 8 * page), "little")
        except OSError:
            return False
        return bool(bits >> 63) and not (bits >> 61) & 1

    def holds(self, t: torch.Tensor, file_at: int, size: int) -> bool:
        if self._pagemap is None or size == 0:
            return False
        addr = t.data_ptr()
        if not any(lo <= addr and addr + size <= hi and off + (addr - lo) == file_at for lo, hi, off in self._maps):
            return False
        page = mmap.PAGESIZE
        first, last = addr // page, (addr + size - 1) // page
        try:
            raw = os.pread(self._pagemap, 8 * (last - first + 1), 8 * first)
        except OSError:
            return False
        if len(raw) != 8 * (last - first + 1):
            return False
        bits = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        present = bits < 0  # bit 63
        swapped = (bits & (1 << 62)) != 0
        file_page = (bits & (1 << 61)) != 0
        return bool(((~present & ~swapped) | (present & file_page)).all())

    def __del__(self) -> None:
        if getattr(self, "_pagemap", None) is not None:
            os.close(self._pagemap)


def _file_mappings(inode: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every private mapping of the file ``inode`` names."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5 or parts[1][3] != "p" or parts[4] != str(inode[1]) or line.rstrip().endswith("(deleted)"):
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if os.makedev(major, minor) != inode[0]:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.append((lo, hi, int(parts[2], 16)))
    except (OSError, ValueError):
        return []
    return found


def _give_back_freed_memory() -> None:
    """Return the memory the model's old tensors held to the system: glibc keeps freed blocks of its heap
    (tensors under its 32 MiB mmap threshold come from there) in the process, and a 1.1B model read from
    a recipe directory otherwise kept 2.1 GB of freed memory beside the file's pages (4.4 GB peak)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


_PROT_READ, _PROT_WRITE, _MAP_PRIVATE, _MAP_FIXED = 1, 2, 2, 16


def _remap_private(mm: mmap.mmap, fd: int | None) -> None:
    """Map the file privately over the shared mapping, at the same address: every tensor viewing it keeps
    its address and its values (the file's), and a later write to one stays in this process."""
    if fd is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    got = libc.mmap(base, len(mm), _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if got != base:
        raise OSError(ctypes.get_errno(), "could not turn the output's mapping private")
