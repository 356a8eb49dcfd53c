"""torch.distributed for commands launched by ``torchrun``: the process group from its environment,
and the one agreement step that keeps a failing rank from leaving the others blocked in a collective.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import NormSurgeonError

#: how long a rank waits in a collective for the others (torch's default is 30 minutes)
TIMEOUT = datetime.timedelta(minutes=10)
#: how long a rank waits at the end for the others (rank 0 may still be writing the output)
TEARDOWN_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None  # the process group (None: the default one, or none at all)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        device = f"cuda:{local}"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise NormSurgeonError(f"`device={device!r}`: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NormSurgeonError(f"`device={device!r}`: CUDA is not available on this machine")
    return dev


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Ranks]:
    """The ranks this process belongs to.

    An initialized process group is used as it is. Under ``torchrun`` (its environment variables) one
    is initialized from the environment, NCCL when the device is a GPU and gloo on the CPU, and
    destroyed on exit. Otherwise this is one process: rank 0 of 1.
    """
    import torch.distributed as dist

    dev = pick_device(device)
    if dist.is_available() and dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(), dev)
        return
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Ranks(0, 1, dev)
        return
    if not dist.is_available():
        raise NormSurgeonError("torchrun launched this command, but this torch build has no torch.distributed")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT)
    except Exception as e:  # noqa: BLE001 - rendezvous problems are the user's to fix
        raise NormSurgeonError(f"cannot join the torchrun process group ({backend}): {type(e).__name__}: {e}") from e
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), dev)
    except BaseException as e:
        # an error every rank raised (``AGREED``, after ``failed_ranks``): leave together; one rank's own
        # error: the others may be in a collective it will never join, so go at once (torchrun stops them)
        _teardown(backend, together=getattr(e, AGREED, False))
        raise
    _teardown(backend, together=True)


#: set on an exception that every rank raises at the same step, so they can leave the group together
AGREED = "raised_on_every_rank"


def _teardown(backend: str, together: bool) -> None:
    """Destroy the process group, on every path; ``together``: after the other ranks arrive.

    A gloo rank that destroys its group, or exits without destroying it, while a peer still works
    (rank 0 saving) or still talks to it can abort in C++ ("terminate called without an active
    exception") and fail the whole launch. So on success and on an agreed error every rank first
    waits for the others at a barrier, bounded by ``TEARDOWN_TIMEOUT`` for gloo (``monitored_barrier``:
    a rank that never comes, e.g. one that crashed, is reported instead of waited for), and destroys
    the group whatever happened there.
    """
    import torch.distributed as dist

    try:
        if not together:
            pass
        elif backend == "gloo":
            dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT)
        else:
            dist.barrier()
    except Exception:  # noqa: BLE001 - a peer gone already: nothing left to wait for
        pass
    finally:
        dist.destroy_process_group()


def failed_ranks(ok: bool, group=None) -> list[int]:
    """Every rank says whether it is ready; all learn which ranks are not (one collective).

    Call it on every rank after the step that may fail on some (reading a shard), so that no rank goes
    on into a collective that a failed rank will never join.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [] if ok else [0]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    flags = [torch.zeros(1, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, torch.tensor([1.0 if ok else 0.0], device=device), group=group)
    return [r for r, f in enumerate(flags) if float(f) != 1.0]
