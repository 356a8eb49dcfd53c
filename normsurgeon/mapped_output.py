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

The copy need not wait for the model: ``start_early``, called before the load, copies the input
directory's one large weights file on a thread of its own while the load runs (``EarlyCopy``), and
``prepare`` takes that file over when the model's tensors turn out to be that file's, unchanged since,
proving each tensor as before and writing from memory any it cannot prove.

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
import threading
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


def prepare(model: nn.Module, out: Path, weights_file: str, *, min_bytes: int | None = None,
            early: "EarlyCopy | None" = None) -> MappedOutput | None:
    """The output's weights file for ``model`` (loaded by the tool from one safetensors file), written
    into a new temporary directory beside ``out`` and mapped under the model's tensors; None where the
    model is not such a model (the caller saves as usual). ``early`` (``start_early``, begun before
    the model was loaded): its file is taken over when it copied the model's very file, which has not
    changed since; it is closed otherwise."""
    if not available():
        return None
    plan = _plan(model, MIN_BYTES if min_bytes is None else min_bytes)
    if plan is None:
        if early is not None:
            early.close()
        return None
    source, start, header, state = plan
    if early is not None:
        try:
            if early.finished_for(source, start, header):
                mapped = _fill_and_map(early.dir, early.file, early.fd, early.data_start, early.end, source,
                                       start, header, state, copied=True, mm=early.map)
                early.hand_over()
                return mapped
        except OSError as e:  # the copy found a full disk, say: nothing was changed yet
            raise NormSurgeonError(f"`output` {out}: cannot write the weights: {one_line(e, typed=True)}") from e
        finally:
            early.close()  # taken over, or of no use: its disk space back before a new copy
    size = max((e["data_offsets"][1] for e in header.values()), default=0)
    if not _room_for(out, size):
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


def _room_for(out: Path, size: int) -> bool:
    """Room on ``out``'s disk for the copy and as much again: on a copy-on-write file system each
    rewritten page takes new blocks, and a full disk under a mapping is a crash (SIGBUS), not an error."""
    try:
        disk = os.statvfs(out.parent)
    except OSError:
        return False
    return disk.f_bavail * disk.f_frsize >= 2 * size


_EARLY_CHUNK = 256 * 2**20  # the early copy's step: ``close`` stops it within one


class EarlyCopy:
    """The output's weights file begun before the model is loaded (``start_early``): the input file's
    header, then its whole data section, copied in the kernel on a thread of its own. Loading a large
    model is mostly Python on one core (importing transformers' model code, building the modules), so
    the copy costs the command almost nothing beside it, where after the load it cost 0.9 s in a quiet
    minute and 3–5 s when this VM's host had to back the new page cache first. ``prepare`` takes the
    file over (``finished_for``, ``hand_over``) and still proves every tensor as it would have before
    copying it; ``close`` stops the copy and removes the directory unless it was handed over."""

    def __init__(self, source: Path, identity: tuple, start: int, header: dict, tmp: Path, file: Path, fd: int,
                 data_start: int, end: int) -> None:
        self.source, self.identity, self.start, self.header = source, identity, start, header
        self.dir, self.file, self.fd, self.data_start, self.end = tmp, file, fd, data_start, end
        self.done = False
        self.map: mmap.mmap | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.taken = False  # handed over to a MappedOutput: the directory and descriptor are its own
        self._closed = False
        self._thread = threading.Thread(target=self._copy, name="normsurgeon-early-copy", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            src = os.open(self.source, os.O_RDONLY)
            try:
                if _identity(os.fstat(src)) != self.identity:
                    return  # replaced since its header was read: not the file to copy
                copy, at = _Copier(src, self.fd, self.source), 0
                while at < self.end and not self._stop.is_set():
                    k = min(_EARLY_CHUNK, self.end - at)
                    copy(self.start + at, self.data_start + at, k)
                    at += k
                self.done = at >= self.end
            finally:
                os.close(src)
            if self.done and self.data_start + self.end > 0 and not self._stop.is_set():
                # its pages made writable here too: the rewrite then finds them mapped (a rotation's
                # 0.75 s writable pass went to 0.1 s), and the load beside it no slower
                try:
                    self.map = mmap.mmap(self.fd, self.data_start + self.end)
                except OSError:
                    return  # prepare maps the file itself
                pages.populate_for_write(torch.frombuffer(self.map, dtype=torch.uint8))
        except BaseException as e:  # noqa: BLE001 - raised where the copy is taken (finished_for)
            self.error = e

    def finished_for(self, source: Path, start: int, header: dict) -> bool:
        """Wait for the copy; whether it copied all of ``source``, whose data starts at ``start`` under
        ``header``, and the file is still the one it copied (same inode, size and modification time).
        The copy's own error (a full disk) is raised here."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        try:
            now = _identity(os.stat(source))
        except OSError:
            return False
        return self.done and now == self.identity and start == self.start and header == self.header

    def hand_over(self) -> None:
        """The file and its directory belong to a ``MappedOutput`` now."""
        self.taken = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self.taken and not self._closed:
            self._closed = True
            if self.map is not None:
                try:
                    self.map.close()
                except BufferError:  # a tensor still views it (a failed take-over): it goes with them
                    pass
            os.close(self.fd)
            shutil.rmtree(self.dir, ignore_errors=True)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def start_early(source: Path, out: Path, weights_file: str, *, min_bytes: int | None = None) -> EarlyCopy | None:
    """Begin copying the safetensors file ``source`` into a new temporary directory beside ``out``
    (as its ``weights_file``) before a model is loaded from it, when it is a file of ``MIN_BYTES`` or
    more; None otherwise, or where the file or the disk is not as ``prepare`` needs (it then writes the
    file itself, or reports why not)."""
    if not available():
        return None
    try:
        identity = _identity(os.stat(source))
        if identity[2] < (MIN_BYTES if min_bytes is None else min_bytes) or not Path(source).is_file():
            return None
        start, header = file_tensors.read_header(source)
        offsets = [e["data_offsets"] for e in header.values()]
        end = max((b for _, b in offsets), default=0)
        if any(not 0 <= a <= b for a, b in offsets) or start + end > identity[2]:
            return None  # a header the file does not match: the load reports it, not this copy
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    if not _room_for(out, end):
        return None
    tmp = temp_dir(out)
    try:
        fd, data_start, end = _create(tmp / weights_file, header)
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    try:
        return EarlyCopy(source, identity, start, header, tmp, tmp / weights_file, fd, data_start, end)
    except BaseException as e:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, RuntimeError):  # no thread could start: prepare copies after the load
            return None
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
    fd, data_start, end = _create(file, header)
    try:
        return _fill_and_map(tmp, file, fd, data_start, end, source, start, header, state, copied=False)
    except BaseException:
        os.close(fd)
        raise


def _create(file: Path, header: dict) -> tuple[int, int, int]:
    """The new weights file with its header written and its size set: (its descriptor, where its data
    starts, the data's length)."""
    entries = {"__metadata__": WEIGHTS_METADATA, **header}
    text = json.dumps(entries, separators=(",", ":")).encode()
    data_start = -(-(8 + len(text)) // _ALIGN) * _ALIGN
    text += b" " * (data_start - 8 - len(text))  # padding the safetensors format allows
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(fd, data_start + end)
    except BaseException:
        os.close(fd)
        raise
    return fd, data_start, end


def _fill_and_map(tmp: Path, file: Path, fd: int, data_start: int, end: int, source: Path, start: int,
                  header: dict, state: dict, *, copied: bool, mm: mmap.mmap | None = None) -> MappedOutput:
    """Each tensor's bytes in the file: copied from ``source`` where the proof holds (already there when
    ``copied``: the early copy), else written from memory; then the file mapped under the tensors."""
    src = os.open(source, os.O_RDONLY)
    proof = pages.UntouchedFilePages(src)
    try:
        copy = None if copied else _Copier(src, fd, source)
        for key, e in header.items():
            a, b = e["data_offsets"]
            t = state[key]
            if proof.holds(t, start + a, b - a):
                if copy is not None:
                    copy(start + a, data_start + a, b - a)
            else:
                _write_tensor(fd, t, data_start + a)
    finally:
        proof.close()
        os.close(src)
    if mm is None and data_start + end > 0:
        mm = mmap.mmap(fd, data_start + end)
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
    pages.give_back_freed_memory()
    return MappedOutput(tmp, file, places, names, mm, fd)


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
