"""``gf.Product`` on tuples of DTensors: 2 gloo processes on the loopback interface (``tests/distributed_tools.py``).

Every map of a product is its factors' maps, each routing its own DTensors (Note [DTensor factors of a
product] in ``geofunc/spaces/_product.py``): batch-sharded factors map their own shards and keep their
placements. Routed by the product (its ``point_ndim`` 2, whatever the factors'), a tuple of batch-sharded
vectors was all-gathered on every call and the factors not of the leading tensor's shape came back
``Replicate`` (a sharded table whole on every rank after one optimizer step). One spawn computes the maps
on DTensors; the tests compare values with the plain calls (float64) and the placements with the inputs'.
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_tools import requires_gloo, spawn_results
from helpers import FSDP2_ON_CPU, needs_torch

import geofunc as gf

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "DTensor on the CPU (gloo)")]

WORLD = 2
ATOL = 1e-12  # float64
F64 = torch.float64


def _spaces() -> dict:
    return {
        "hyperbolic": gf.Product(gf.PoincareBall(c=0.7), gf.Lorentz(k=1.3)),
        "matrices": gf.Product(gf.Unitary(), gf.Sphere(), gf.SO()),
        "nested": gf.Product(gf.Product(gf.PoincareBall(), gf.Sphere()), gf.Lorentz()),
    }


def _points(name: str, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    P = _spaces()[name]
    shapes = {"hyperbolic": ((6, 4), (6, 5)), "matrices": ((6, 3, 3), (6, 5), (6, 3, 3)),
              "nested": (((6, 4), (6, 3)), (6, 5))}[name]
    dtypes = {"matrices": (torch.complex128, F64, F64)}.get(name)
    if dtypes is None:
        return P.sample(shapes, generator=g, dtype=F64)
    return tuple(M.sample(s, generator=g, dtype=d) for M, s, d in zip(P.factors, shapes, dtypes))


def _tangent(P, X, seed: int):
    g = torch.Generator().manual_seed(seed)
    return P.tangent(X, torch.utils._pytree.tree_map(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype), X))


MAPS = {
    "tangent": lambda P, X, Y, U: P.tangent(X, U),
    "retract": lambda P, X, Y, U: P.retract(X, U),
    "transport": lambda P, X, Y, U: P.transport(X, Y, U),
    "egrad_to_rgrad": lambda P, X, Y, U: P.egrad_to_rgrad(X, U),
    "inner": lambda P, X, Y, U: P.inner(X, U, U),
    "dist": lambda P, X, Y, U: P.dist(X, Y),
    "round trip": lambda P, X, Y, U: P.to_manifold(*P.from_manifold(X)),
    "contains": lambda P, X, Y, U: P.contains(X),
    "rsgd step": lambda P, X, Y, U: gf.optim.rsgd({"p": P}, 0.1).update({"p": U}, gf.optim.rsgd({"p": P}, 0.1).init({"p": X}), {"p": X})[0]["p"],
}


def _leaves(t):
    return torch.utils._pytree.tree_leaves(t)


def worker(rank: int, world: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results: dict = {}
    for name, P in _spaces().items():
        X, Y = _points(name, 1), _points(name, 2)
        U = _tangent(P, X, 3)
        d = lambda T: torch.utils._pytree.tree_map(lambda t: distribute_tensor(t, mesh, [Shard(0)]), T)  # noqa: E731
        for map_name, f in MAPS.items():
            try:
                out = f(P, d(X), d(Y), d(U))
                results[name, map_name] = [
                    (t.full_tensor(), str(tuple(t.placements))) if isinstance(t, DTensor) else (t, "plain")
                    for t in _leaves(out)]
            except Exception as e:  # noqa: BLE001  (reported to the test, which names it)
                results[name, map_name] = f"{type(e).__name__}: {e}"
        bad = torch.utils._pytree.tree_map(lambda t: t.clone(), X)
        leaves = _leaves(bad)
        leaves[-1][-1].mul_(3.0)  # the last point of the last factor: on rank 1's shard
        try:
            P.check(d(bad))
            results[name, "check"] = "accepted"
        except gf.ManifoldError:
            results[name, "check"] = "refused"
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(worker, WORLD, tmp_path_factory.mktemp("dtensor_product"), timeout=120)


@pytest.mark.parametrize("name", list(_spaces()))
@pytest.mark.parametrize("map_name", list(MAPS))
def test_maps_on_batch_sharded_factors_keep_their_shards(results, name, map_name):
    """The values are the plain maps'; every result with a batch dimension is ``Shard(0)``, as the points
    (the second factor of ``hyperbolic``, the factors after the first of the others, were ``Replicate``)."""
    P = _spaces()[name]
    X, Y = _points(name, 1), _points(name, 2)
    want = _leaves(MAPS[map_name](P, X, Y, _tangent(P, X, 3)))
    for rank, r in enumerate(results):
        got = r[name, map_name]
        assert not isinstance(got, str), (rank, got)
        assert len(got) == len(want)
        for i, ((value, placements), w) in enumerate(zip(got, want)):
            torch.testing.assert_close(value, w, atol=ATOL, rtol=0, msg=f"rank {rank}, leaf {i}")
            assert placements == "(Shard(dim=0),)", (rank, i, placements)


@pytest.mark.parametrize("name", list(_spaces()))
def test_check_refuses_a_point_off_one_factor_on_every_rank(results, name):
    assert [r[name, "check"] for r in results] == ["refused"] * WORLD
