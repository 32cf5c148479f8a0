"""Run a function on a few gloo processes of this machine, in bounded time, leaving none behind.

``spawn(worker, world, tmp_path, *args)`` starts ``world`` processes (``spawn`` start method),
each of which joins a gloo process group and calls ``worker(rank, world, outdir, *args)``;
workers report by writing files into ``outdir`` (``torch.save``), which the test then reads.

* Loopback only, and no port of ours: the ranks meet through a file in the run's own tmp dir
  (two concurrent test runs cannot collide), and gloo's sockets bind to the loopback interface
  (by default gloo binds to whatever the hostname resolves to).
* Bounded: a lost peer fails the collective after ``COLLECTIVE_TIMEOUT``; a run that outlives
  ``timeout`` is killed (every process, then joined) and the test fails.
* One intra-op thread per process (the machine's cores are shared).
* A rank that finished leaves with ``os._exit(0)``, after a barrier and ``destroy_process_group``:
  its gloo threads outlive the group, and tearing them down at interpreter exit aborted
  (Note [Leaving without finalization]).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


#: Skip marks for a test that needs gloo processes on the loopback interface.
requires_gloo = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"),
    pytest.mark.skipif(loopback_interface() is None, reason="no loopback network interface"),
]


def _entry(rank: int, worker: Callable[..., None], world: int, iface: str, outdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = iface
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(outdir, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        worker(rank, world, outdir, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    try:  # no rank closes its sockets while a peer may still be inside a collective
        dist.barrier()
    except RuntimeError:
        pass  # a peer failed: it reports why (this rank's error would hide its traceback)
    dist.destroy_process_group()
    _exit_now()


# Note [Leaving without finalization]
# A clean-clone CI run, and 2 of about 100 two-rank jobs here (run side by side on two cores),
# aborted a rank *after* its work, its result file and destroy_process_group: "terminate called
# without an active exception", SIGABRT (test_fsdp_optimizer.py's fixture: 4 errors; the torchrun
# example). Python's faulthandler showed no Python frame at the abort: the process was past all
# its Python code, in its teardown. The gloo group outlives destroy_process_group: its threads
# (gloo_tcp_loop, 2 x pt_gloo_runloop) still run at atexit, after gc, once torch.distributed.tensor
# or torch.distributed.fsdp is imported, geofunc or not (torch keeps a reference). So they are
# torn down, presumably, by interpreter finalization and the C++ static destructors, racing the
# peer's exit that closes their sockets (no core dump came to say which object). Ports are not the
# cause: the ranks meet through a file, gloo binds kernel-chosen loopback ports, and torchrun
# --standalone binds its store to port 0 and hands it to the workers. So a rank that finished
# cleanly leaves with os._exit(0) after flushing: nothing is finalized, the threads end with the
# process. A failing worker still raises to torch.multiprocessing, which reports its traceback
# (its peers, past their work, wait for it in the barrier and leave quietly).
def _exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_results(worker: Callable[..., None], world: int, outdir: Any, *, timeout: float = 120.0) -> list[Any]:
    """:func:`spawn` the ``worker``, which saves its results in ``<outdir>/rank<r>.pt``, and load
    them, one per rank."""
    spawn(worker, world, outdir, timeout=timeout)
    return [torch.load(os.path.join(str(outdir), f"rank{r}.pt")) for r in range(world)]


def spawn(worker: Callable[..., None], world: int, outdir: Any, *args: Any, timeout: float = 120.0) -> None:
    """Run ``worker(rank, world, outdir, *args)`` on ``world`` gloo processes; fail the test if a
    process fails or the run takes longer than ``timeout`` seconds (all are killed then).

    ``worker`` must be importable by name (a module-level function of a test module).
    """
    iface = loopback_interface()
    assert iface is not None
    outdir = str(outdir)
    os.makedirs(outdir, exist_ok=True)
    rendezvous = os.path.join(outdir, "rendezvous")
    if os.path.exists(rendezvous):  # a previous run's file would make the ranks wait for ghosts
        os.remove(rendezvous)
    ctx = mp.start_processes(
        _entry, args=(worker, world, iface, outdir, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
