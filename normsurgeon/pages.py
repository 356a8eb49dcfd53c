"""A CPU tensor's pages in this process: made writable in one system call before an in-place update
writes all of it (``populate_for_write``); proved still a file's own, never written
(``UntouchedFilePages``); a shared file mapping turned private in place (``remap_private``); freed heap
memory handed back (``give_back_freed_memory``). Linux; elsewhere each does nothing or declines.

A model loaded from safetensors lives in a private mapping of the file: the first write to each 4 KiB
page is a copy-on-write fault. On the shared VM those cost about 20 µs each, so rotating a 1.1B bf16
model in place spent about as long in page faults as in the transform (the 131 MB lm_head took 0.65 s,
with 0.74 s of system time; 0.27 s after one ``MADV_POPULATE_WRITE``). Linux 5.14+; anywhere else this
does nothing and the writes fault page by page as before.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

_MADV_POPULATE_WRITE = 23
_libc = None


def populate_for_write(t: torch.Tensor) -> bool:
    """Prefault every page ``t``'s values occupy for writing (values unchanged). True when it was done."""
    global _libc
    if t.device.type != "cpu" or t.numel() == 0 or not sys.platform.startswith("linux") \
            or any(s < 0 for s in t.stride()):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    span = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    start = t.data_ptr() & ~(mmap.PAGESIZE - 1)
    return _libc.madvise(start, t.data_ptr() + span - start, _MADV_POPULATE_WRITE) == 0


class UntouchedFilePages:
    """Whether a tensor's bytes are provably an open file's: it lies in a private mapping of that file,
    at the file offset of its range, and no page under it was ever written (``/proc/self/pagemap``:
    each page is the file's own or not yet read in, none anonymous, none swapped). ``close`` when done."""

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

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None


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


def give_back_freed_memory() -> None:
    """Return freed heap memory to the system: glibc keeps freed blocks of its heap (tensors under its
    32 MiB mmap threshold come from there) in the process; a 1.1B model read from a recipe directory,
    then moved onto its output's file (``mapped_output``), otherwise kept 2.1 GB of it (4.4 GB peak)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


_PROT_READ, _PROT_WRITE, _MAP_PRIVATE, _MAP_FIXED = 1, 2, 2, 16


def remap_private(mm: mmap.mmap, fd: int | None) -> None:
    """Map ``fd``'s file privately over ``mm``, a shared mapping of it, at the same address: every tensor
    viewing it keeps its address and its values (the file's), and a later write to one stays in this
    process. Raises OSError if the kernel refused (the old mapping may then be gone)."""
    if fd is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    got = libc.mmap(base, len(mm), _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if got != base:
        raise OSError(ctypes.get_errno(), "could not turn the mapping private")
