"""``geofunc.contrib.geoopt.constraints`` of a model sharded by FSDP2: 2 gloo processes on the loopback
interface (``tests/distributed_tools.py``).

``fully_shard`` replaces each parameter by a plain ``DTensor`` Parameter and drops a ``ManifoldParameter``'s
``manifold``: ``constraints(model)`` after it returned ``{}``, and ``TorchOptimizer`` trained the points
freely, off their manifold (an embedding on the unit Poincaré ball reached norm 15 in 20 ``radam`` steps).
Now that call raises a ``ManifoldError`` naming the order that works (Note [ManifoldParameters sharded by
FSDP2] in ``geofunc/contrib/geoopt.py``), and constraints read before ``fully_shard`` keep the points on
their manifold.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_tools import requires_gloo, spawn_results
from helpers import FSDP2_ON_CPU, needs_torch

import geofunc as gf

pytest.importorskip("geoopt")

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "FSDP2 and DTensor on the CPU (gloo)"),
              pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:DeprecationWarning")]

WORLD = 2


def _embedding() -> torch.nn.Module:
    import geoopt

    torch.manual_seed(0)
    emb = torch.nn.Embedding(8, 2)
    ball = geoopt.PoincareBall(c=1.0)
    emb.weight = geoopt.ManifoldParameter(ball.projx(torch.randn(8, 2) * 0.5), manifold=ball)
    return emb


def worker(rank: int, world: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from geofunc.contrib.geoopt import constraints

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    emb = _embedding()
    before = constraints(emb)
    fully_shard(emb, mesh=mesh)
    for what, arg in (("module", emb), ("pairs", list(emb.named_parameters()))):
        try:
            out[what] = constraints(arg)
        except gf.ManifoldError as e:
            out[what] = str(e)
    opt = gf.optim.TorchOptimizer(emb.named_parameters(), before, gf.optim.radam, lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        (-emb(torch.arange(8)).norm(dim=-1).sum()).backward()  # pushes every point outwards
        opt.step()
    out["before"] = repr(before)
    out["trained"] = emb.weight.full_tensor().detach()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(worker, WORLD, tmp_path_factory.mktemp("fsdp_geoopt"), timeout=90)


def test_constraints_after_fully_shard_are_refused_on_every_rank(results):
    """After ``fully_shard`` no parameter has a ``manifold``: a ``ManifoldError`` naming the order that
    works, on every rank (it returned ``{}``, and the points were trained freely)."""
    for rank, r in enumerate(results):
        for what in ("module", "pairs"):
            assert isinstance(r[what], str), (rank, what, r[what])
            assert "before fully_shard" in r[what] and "'weight'" in r[what], (rank, r[what])


def test_constraints_read_before_fully_shard_keep_the_points_on_the_ball(results):
    for rank, r in enumerate(results):
        assert r["before"] == repr({"weight": gf.PoincareBall(c=1.0)}), (rank, r["before"])
        assert bool(gf.PoincareBall().contains(r["trained"]).all()), (rank, r["trained"].norm(dim=-1).max())
