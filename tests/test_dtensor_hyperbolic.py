"""``geofunc.hyperbolic`` on DTensors: 2 gloo processes on the loopback interface (``tests/distributed_tools.py``).

The functions are not routed (Note [Hyperbolic functions in low precision]): each is a composition of
torch ops, which DTensor runs on any placement. One spawn computes every function's value and the
gradient of a loss with respect to its first argument on DTensor arguments sharded on a batch dimension
(``Shard(0)``), on the vectors' own dimension (``Shard(-1)``) and replicated; the tests compare them with
the plain calls, in float64. ``weighted_midpoint``'s backward raised torch's "got mixed torch.Tensor and
DTensor" on every rank (Note [the sign of the Einstein midpoint] in ``geofunc/hyperbolic.py``).
"""

from __future__ import annotations

import os

import pytest
import torch
from distributed_tools import requires_gloo, spawn_results
from helpers import FSDP2_ON_CPU, needs_torch

from geofunc import hyperbolic as H

pytestmark = [pytest.mark.slow, *requires_gloo, needs_torch(FSDP2_ON_CPU, "DTensor on the CPU (gloo)")]

WORLD = 2
ATOL = 1e-12  # float64; a sharded vector dimension sums its squares in another order
PLACEMENTS = ("Shard(0)", "Shard(-1)", "Replicate()")
C = 0.5


def _cases() -> dict:
    """name: (function, arguments) in float64, the same on every process."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64, generator=g)
    x, y = H.project(torch.randn(6, 4, **f64) * 0.4), H.project(torch.randn(6, 4, **f64) * 0.4)
    v, a = torch.randn(6, 4, **f64), torch.randn(6, 4, **f64)
    pts, w = H.project(torch.randn(6, 5, 4, **f64) * 0.4), torch.rand(6, 5, **f64) + 0.1
    return {
        "weighted_midpoint": (lambda p, w: H.weighted_midpoint(p, w, c=C), (pts, w)),
        "weighted_midpoint (equal weights)": (lambda p: H.weighted_midpoint(p, c=C), (pts,)),
        "mobius_add": (lambda x, y: H.mobius_add(x, y, c=C), (x, y)),
        "mobius_scalar_mul": (lambda r, x: H.mobius_scalar_mul(r, x, c=C), (torch.rand(6, **f64) * 2, x)),
        "mobius_matvec": (lambda M, x: H.mobius_matvec(M, x, c=C), (torch.randn(6, 3, 4, **f64), x)),
        "gyration": (lambda x, y, v: H.gyration(x, y, v, c=C), (x, y, v)),
        "dist": (lambda x, y: H.dist(x, y, c=C), (x, y)),
        "expmap": (lambda x, v: H.expmap(x, v, c=C), (x, v)),
        "logmap": (lambda x, y: H.logmap(x, y, c=C), (x, y)),
        "parallel_transport": (lambda x, y, v: H.parallel_transport(x, y, v, c=C), (x, y, v)),
        "dist2plane": (lambda x, p, a: H.dist2plane(x, p, a, c=C, signed=True), (x, y, a)),
        "poincare_to_lorentz": (lambda x: H.poincare_to_lorentz(x, c=C), (x,)),
    }


def _value_and_grad(fn, args):
    first = args[0].detach().clone().requires_grad_(True)
    out = fn(first, *args[1:])
    (out * out).sum().backward()
    return out.detach(), first.grad


def worker(rank: int, world: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results: dict = {}
    for name, (fn, args) in _cases().items():
        for placement in PLACEMENTS:
            def place(t):
                p = Shard(t.ndim - 1) if placement == "Shard(-1)" else Shard(0) if placement == "Shard(0)" else Replicate()
                return distribute_tensor(t, mesh, [p])

            try:
                out, grad = _value_and_grad(fn, tuple(place(t) for t in args))
                results[name, placement] = (out.full_tensor(), grad.full_tensor())
            except Exception as e:  # noqa: BLE001  (reported to the test, which names it)
                results[name, placement] = f"{type(e).__name__}: {e}"
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_results(worker, WORLD, tmp_path_factory.mktemp("dtensor_hyperbolic"), timeout=120)


@pytest.mark.parametrize("name", list(_cases()))
def test_values_and_gradients_on_dtensors_equal_the_plain_ones(results, name):
    fn, args = _cases()[name]
    want, want_grad = _value_and_grad(fn, args)
    for rank, r in enumerate(results):
        for placement in PLACEMENTS:
            got = r[name, placement]
            assert not isinstance(got, str), (rank, placement, got)
            torch.testing.assert_close(got[0], want, atol=ATOL, rtol=0, msg=f"rank {rank}, {placement}")
            torch.testing.assert_close(got[1], want_grad, atol=ATOL, rtol=0, msg=f"rank {rank}, {placement}: gradient")
