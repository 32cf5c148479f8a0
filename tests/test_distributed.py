"""DistributedDataParallel over a geofunc-constrained model: 2 gloo processes on 127.0.0.1.

Each rank starts from its own random initialization and sees its own data; DDP broadcasts
rank 0's parameters *and buffers* (the bases of the constraints) at construction and averages
the gradients of the raw parameters, so every rank takes the same optimizer step and the
replicas stay bit-identical, on the manifold, through Adam steps and an ``update_base``.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import member
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import geofunc as gf
import geofunc.nn as gnn

WORLD = 2
STEPS = 6


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    gnn.orthogonal(model[0])
    gnn.sphere(model[2], radius=2.0)
    return model


def _worker(rank: int, iface: str, outdir: str) -> None:
    torch.set_num_threads(1)
    # Loopback only, and no port of ours: the ranks meet through a file in this run's own tmp dir
    # (two concurrent test runs cannot collide), and gloo's sockets bind to the loopback interface
    # (by default gloo binds to whatever the hostname resolves to). A lost peer fails in 60 s.
    os.environ["GLOO_SOCKET_IFNAME"] = iface
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(outdir, 'rendezvous')}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.manual_seed(1000 + rank)  # a different initialization on every rank ...
        model = _model()
        ddp = DDP(model)  # ... replaced by rank 0's parameters and bases
        opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(rank)  # different data on every rank
        losses = []
        for step in range(STEPS):
            x = torch.randn(16, 6, generator=g)
            y = torch.randn(16, 3, generator=g)
            opt.zero_grad()
            loss = (ddp(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step == STEPS // 2:
                gnn.update_base(model[0])  # dynamic trivialization, on every rank alike
                gnn.update_base(model[2])
        torch.save({"state": model.state_dict(), "losses": losses, "weight0": model[0].weight.detach(),
                    "weight2": model[2].weight.detach()}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
@pytest.mark.skipif(_loopback_interface() is None, reason="no loopback network interface")
def test_ddp_replicas_end_bit_identical_and_on_the_manifold(tmp_path):
    args = (_loopback_interface(), str(tmp_path))
    ctx = mp.start_processes(_worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
                p.join()
            pytest.fail("distributed workers did not finish within 120 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["losses"] != r1["losses"]  # the ranks did see different data
    assert r0["state"].keys() == r1["state"].keys()
    assert "0.parametrizations.weight.0.base" in r0["state"]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert torch.equal(r0["weight0"], r1["weight0"])
    W, S = r0["weight0"], r0["weight2"]
    assert member(gf.Stiefel(), W) and member(gf.Sphere(radius=2.0), S)
    # the chart was re-centred mid-training and has moved since
    assert r0["state"]["0.parametrizations.weight.original"].abs().max() > 0
