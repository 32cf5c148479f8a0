"""``geofunc.hyperbolic`` on DTensors: 2 gloo processes on the loopback interface (``tests/distributed_tools.py``).

The functions are not routed (Note [Hyperbolic functions in low precision]): each is a composition of
torch ops, which DTensor runs on any placement. One spawn computes every function's value and the
gradient of a loss with respect to its first argument on DTensor arguments sharded on a batch dimension
(``Shard(0)``), on the vectors' own dimension (``Shard(-1)``) and replicated; the tests compare them with
the plain calls, in float64. ``weighted_midpoint``'s backward raised torch's "got mixed torch.Tensor and
DTensor" on every rank (Note [the sign of the Einstein midpoint] in ``geofunc/hyperbolic.py``).

A plain tensor beside a DTensor is a ManifoldError naming the argument (Note [plain tensors beside DTensors]
in ``geofunc/hyperbolic.py``), where it was torch's "aten.sub.Tensor got mixed torch.Tensor and DTensor".
So is a plain leading point with a DTensor after it in a space's map (Note [A plain point beside DTensors]).
"""

from __future__ import annotations

import os
import warnings

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


#: The names of each case's tensor arguments, as the function's messages call them.
NAMES = {
    "weighted_midpoint": ("x", "weights"), "mobius_add": ("x", "y"), "mobius_scalar_mul": ("r", "x"),
    "mobius_matvec": ("M", "x"), "gyration": ("u", "v", "w"), "dist": ("x", "y"), "expmap": ("x", "v"),
    "logmap": ("x", "y"), "parallel_transport": ("x", "y", "v"), "dist2plane": ("x", "p", "a"),
}


def _mixed_cases() -> dict:
    """(name, mask): the case's arguments, DTensor where mask says so, plain elsewhere (at least one of each),
    and ("<fn> (DTensor c)", ...): plain points with a DTensor curvature."""
    out = {}
    for name, (fn, args) in _cases().items():
        if name not in NAMES:
            continue
        n = len(args)
        for bits in range(1, 2**n - 1):
            out[name, tuple(bool(bits >> i & 1) for i in range(n))] = (fn, args)
    return out


def _plain_scalars(x):
    """Calls with plain 0-d curvature or coefficient beside DTensor points, and their plain-tensor values."""
    c = torch.tensor(C, dtype=torch.float64)
    r = torch.tensor(1.5, dtype=torch.float64)
    return {
        "dist (0-d c)": lambda x: H.dist(x, x.flip(0), c=c),
        "mobius_scalar_mul (0-d r)": lambda x: H.mobius_scalar_mul(r, x, c=C),
        "project (0-d margin)": lambda x: H.project(x, c=C, margin=torch.tensor(0.5, dtype=torch.float64)),
    }


def _space_cases() -> dict:
    """name: (map, ((tensor, as a DTensor?), ...)), float64; a plain leading point with a DTensor after it."""
    import geofunc as gf

    g = torch.Generator().manual_seed(1)
    f64 = dict(dtype=torch.float64, generator=g)
    B, L, P = gf.PoincareBall(c=C), gf.Lorentz(k=2.0), gf.Product(gf.PoincareBall(c=C), gf.Sphere())
    x, y, v = B.sample((4, 3), **f64), B.sample((4, 3), **f64), torch.randn(4, 3, **f64)
    X, Y = L.sample((4, 4), **f64), L.sample((4, 4), **f64)
    S, F = gf.Stiefel(), gf.Stiefel().sample((4, 5, 2), **f64)
    p = P.sample(((4, 3), (4, 3)), **f64)
    return {
        "PoincareBall.dist": (lambda x, y: B.dist(x, y), ((x, False), (y, True))),
        "PoincareBall.expmap": (lambda x, v: B.expmap(x, v), ((x, False), (v, True))),
        "PoincareBall.logmap": (lambda x, y: B.logmap(x, y), ((x, False), (y, True))),
        "PoincareBall.inner": (lambda x, u, v: B.inner(x, u, v), ((x, False), (v, True), (v, True))),
        "PoincareBall.transport": (lambda x, y, v: B.transport(x, y, v), ((x, False), (y, False), (v, True))),
        "PoincareBall.egrad_to_rgrad": (lambda x, v: B.egrad_to_rgrad(x, v), ((x, False), (v, True))),
        "PoincareBall.to_manifold": (lambda z, b: B.to_manifold(z, b), ((v, False), (x, True))),
        "Lorentz.dist": (lambda x, y: L.dist(x, y), ((X, False), (Y, True))),
        "Lorentz.logmap": (lambda x, y: L.logmap(x, y), ((X, False), (Y, True))),
        "Stiefel.tangent": (lambda x, g: S.tangent(x, g), ((F, False), (torch.randn(4, 5, 2, **f64), True))),
        # a product point may hold DTensor and plain factors side by side (the factors decide): not refused
        "Product (DTensor, plain) factors": (lambda a, b: P.tangent((a, p[1]), (b, p[1])), ((p[0], True), (v, True))),
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
    # Note [plain tensors beside DTensors] in geofunc/hyperbolic.py: a ManifoldError naming the plain argument
    for (name, mask), (fn, args) in _mixed_cases().items():
        placed = tuple(distribute_tensor(t, mesh, [Shard(0)]) if m else t for t, m in zip(args, mask))
        try:
            fn(*placed)
            results["mixed", name, mask] = "no error"
        except Exception as e:  # noqa: BLE001
            results["mixed", name, mask] = f"{type(e).__name__}: {e}"
    x = _cases()["dist"][1][0]
    for name, f in _plain_scalars(x).items():
        xd = distribute_tensor(x, mesh, [Shard(0)])
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = f(xd).full_tensor()
            # (a 0-d r made (1,) beside DTensors was replicated with torch's UserWarning)
            results["mixed", name, None] = [str(w.message) for w in caught] or out
        except Exception as e:  # noqa: BLE001
            results["mixed", name, None] = f"{type(e).__name__}: {e}"
    try:
        H.dist(x, x.flip(0), c=distribute_tensor(torch.tensor(C, dtype=torch.float64), mesh, [Replicate()]))
        results["mixed", "dist (DTensor c)", None] = "no error"
    except Exception as e:  # noqa: BLE001
        results["mixed", "dist (DTensor c)", None] = f"{type(e).__name__}: {e}"
    # Note [A plain point beside DTensors] in geofunc/_dtensor.py: the spaces' maps, a plain lead
    for name, (fn, args) in _space_cases().items():
        try:
            fn(*(distribute_tensor(t, mesh, [Shard(0)]) if m else t for t, m in args))
            results["space", name] = "no error"
        except Exception as e:  # noqa: BLE001
            results["space", name] = f"{type(e).__name__}: {e}"
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


@pytest.mark.parametrize("name, mask", list(_mixed_cases()))
def test_a_plain_tensor_beside_a_dtensor_is_a_manifold_error_naming_it(results, name, mask):
    # torch's "aten.sub.Tensor got mixed torch.Tensor and DTensor" from inside the formula, before
    plain = NAMES[name][mask.index(False)]
    for rank, r in enumerate(results):
        got = r["mixed", name, mask]
        assert got.startswith(f"ManifoldError: geofunc.hyperbolic.{name.split()[0]}: expected `{plain}` to be a DTensor"), (rank, got)


def test_a_dtensor_curvature_beside_plain_points_is_a_manifold_error(results):
    for rank, r in enumerate(results):
        got = r["mixed", "dist (DTensor c)", None]
        assert got.startswith("ManifoldError: geofunc.hyperbolic.dist: expected `x` to be a DTensor like `c`"), (rank, got)


@pytest.mark.parametrize("name", ["dist (0-d c)", "mobius_scalar_mul (0-d r)", "project (0-d margin)"])
def test_plain_0d_scalars_beside_dtensors_are_scalars(results, name):
    x = _cases()["dist"][1][0]
    want = _plain_scalars(x)[name](x)
    for rank, r in enumerate(results):
        got = r["mixed", name, None]
        assert isinstance(got, torch.Tensor), (rank, got)  # an error, or the warnings raised
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"rank {rank}")


@pytest.mark.parametrize("name", [n for n in _space_cases() if not n.startswith("Product")])
def test_a_space_map_with_a_plain_lead_beside_a_dtensor_is_a_manifold_error(results, name):
    # torch's "aten.sub.Tensor got mixed torch.Tensor and DTensor" from inside the map, before
    space, map_name = name.split(".")
    for rank, r in enumerate(results):
        got = r["space", name]
        assert isinstance(got, str) and got.startswith("ManifoldError: ") and f"{space}(" in got, (rank, got)
        assert f".{map_name}: expected the leading tensor argument" in got and "a DTensor" in got, (rank, got)


def test_a_product_of_dtensor_and_plain_factors_is_still_mapped(results):
    for rank, r in enumerate(results):
        got = r["space", "Product (DTensor, plain) factors"]
        assert got == "no error", (rank, got)
