"""DistributedDataParallel over a geofunc-constrained model: 2 gloo processes on 127.0.0.1.

Each rank starts from its own random initialization and sees its own data; DDP broadcasts
rank 0's parameters *and buffers* (the bases of the constraints) at construction and averages
the gradients of the raw parameters, so every rank takes the same optimizer step and the
replicas stay bit-identical, on the manifold, through Adam steps and an ``update_base``.
(Process handling: ``tests/distributed_tools.py``.)
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_tools import requires_gloo, spawn
from reference import member
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import geofunc as gf
import geofunc.nn as gnn

pytestmark = [pytest.mark.slow, *requires_gloo]

WORLD = 2
STEPS = 6


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    gnn.orthogonal(model[0])
    gnn.sphere(model[2], radius=2.0)
    return model


def worker(rank: int, world: int, outdir: str) -> None:
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


def test_ddp_replicas_end_bit_identical_and_on_the_manifold(tmp_path):
    spawn(worker, WORLD, tmp_path, timeout=120)
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
