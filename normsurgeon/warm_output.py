"""A large output file's pages, allocated while the pass runs.

Writing a multi-gigabyte safetensors file costs more in allocating the page cache's pages than in
copying bytes into them: on this project's shared VM, writing the 1.1B model's 2.2 GB took 4.9 s of
system time, while overwriting the pages of a file that already has them took 0.2 s. A pass on such
a model computes for seconds before it has anything to write (the references, the capture, the
rewrite, its verification), on one core for much of that time. So ``warming`` starts a thread that
writes zeros of the expected size into a temporary file beside the output while the pass runs, and
``save_weights`` then overwrites that file in place with the real safetensors bytes and moves it
into the output directory. Nothing here decides what is written: a file that could not be warmed,
or a model this writer cannot lay out, is written by safetensors' own ``save_model`` as before.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .file_tensors import ST_NAMES
from .saving import temp_file

# Below this, the write is short enough that a thread and a second file are not worth it.
WARM_BYTES = 256 * 2**20
_CHUNK = 16 * 2**20
# room for the header (names, shapes, offsets) and for tensors a pass adds (a created bias)
_SLACK = 4 * 2**20


class WarmFile:
    """A temporary file beside ``out`` being filled with ``nbytes`` zeros by a background thread."""

    def __init__(self, out: Path, nbytes: int):
        self.path = temp_file(out)
        self.nbytes = nbytes
        self.taken = False
        self._stop = threading.Event()
        self._fd = os.open(self.path, os.O_WRONLY)
        self._thread = threading.Thread(target=self._fill, name="normsurgeon-warm-output", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        _lowest_priority()
        zeros = bytes(_CHUNK)
        off = 0
        try:
            while off < self.nbytes and not self._stop.is_set():
                off += os.pwrite(self._fd, zeros[:min(_CHUNK, self.nbytes - off)], off)
        except OSError:  # a full disk shows again, as one clear error, when the real bytes are written
            pass

    def take(self) -> Path:
        """Stop filling (the rest is allocated by the real write) and hand the file over."""
        self._finish()
        self.taken = True
        return self.path

    def _finish(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._finish()
        if not self.taken:
            self.path.unlink(missing_ok=True)


def _lowest_priority() -> None:
    """Run this thread only when a core is idle: the pass's own threads (a float32 reference's GEMMs on
    every core) must not wait for zeros. Linux gives each thread its own nice value."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def state_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers, each storage once (tied weights are saved once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@contextmanager
def warming(out: Path | None, model: nn.Module) -> Iterator[WarmFile | None]:
    """A ``WarmFile`` sized for ``model``'s weights beside the recipe directory ``out`` while the block
    runs (None when there is no directory output or the model is below ``WARM_BYTES``); removed on
    exit unless ``save_weights`` took it."""
    if out is None or not isinstance(model, nn.Module):
        yield None
        return
    nbytes = state_bytes(model)
    if nbytes < WARM_BYTES:
        yield None
        return
    warm = WarmFile(Path(out), nbytes + _SLACK)
    try:
        yield warm
    finally:
        warm.close()


def save_weights(model: nn.Module, dest: Path, metadata: dict[str, str], warm: WarmFile | None = None) -> None:
    """``safetensors.torch.save_model(model, dest, metadata)``: written into ``warm``'s pages when it is
    given and the layout is one this writer knows, else by safetensors itself."""
    from safetensors.torch import save_model

    tensors = _dedup_state(model, metadata) if warm is not None else None
    if tensors is None:
        save_model(model, str(dest), metadata=metadata)
        return
    path = warm.take()
    _write_into(path, tensors, metadata)
    os.replace(path, dest)


def _dedup_state(model: nn.Module, metadata: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The tensors ``save_model`` would write (tied names dropped into ``metadata`` as it does), or None
    where this writer cannot lay them out as safetensors does (another device, an unknown dtype)."""
    try:
        from safetensors.torch import _remove_duplicate_names
    except ImportError:  # a safetensors without it: let its own save_model choose the names
        return None
    state = model.state_dict()
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del state[name]
    if any(t.device.type != "cpu" or t.dtype not in ST_NAMES or t.layout != torch.strided for t in state.values()):
        return None
    return {k: t.contiguous() for k, t in state.items()}


def _write_into(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file over ``path``'s existing bytes (no truncation first: its pages stay),
    then cut it to its length. The layout safetensors itself writes: a little-endian u64 header size,
    the JSON header padded with spaces to 8 bytes, the tensors' bytes back to back."""
    # larger elements first, then by name, as safetensors orders them (keeps every tensor aligned)
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for k in order:
        n = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": ST_NAMES[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_all(fd, len(text).to_bytes(8, "little") + text, 0)
        for k in order:
            t = tensors[k]
            if t.numel():
                _pwrite_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), start + header[k]["data_offsets"][0])
        os.ftruncate(fd, start + off)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):  # Linux writes at most ~2 GiB per call
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)
