"""Real two-process torch.distributed checks (gloo on CPU) for the tests, ending cleanly every time.

A rank that fails raises through torch.multiprocessing into the test. A rank that succeeds must not
abort afterwards: DDP sits in a reference cycle, so its reducer (and the gloo group it holds) outlived
the worker function and ``destroy_process_group`` and was freed during interpreter teardown, where a
gloo thread can abort the process ("terminate called without an active exception", seen in CI). So
the cycle is collected while the group is alive, the ranks tear the group down together, and a rank
leaves with ``os._exit`` once its output is flushed: nothing is left for the teardown to free.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT_S = 90  # the group's: a rank left waiting on a peer that died raises after this


def run_ranks(fn, tmp_path, *args, limit: float = 150) -> None:
    """Run ``fn(rank, *args)`` on WORLD spawned processes in one gloo group; fail the test on any error or
    if the ranks take longer than ``limit`` seconds. A rank that raises destroys its group, so its peer
    fails at its next collective, or at the latest after the group's ``TIMEOUT_S``: the limit is longer,
    so the test reports the rank's own error, not the deadline."""
    assert limit > TIMEOUT_S, "the deadline would hide a rank's own error"
    ctx = mp.start_processes(_rank_main, args=(fn, str(tmp_path / "rendezvous"), args), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD}-process check did not finish within {limit} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _rank_main(rank, fn, store, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, *args)
    except BaseException:
        dist.destroy_process_group()  # the peer's next collective fails instead of waiting out the timeout
        raise
    gc.collect()  # DDP's reference cycle: its reducer goes while the group is still alive
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
