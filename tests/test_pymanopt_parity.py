"""geofunc against pymanopt 2.2 (numpy), the second reference library where the two define the same
map (DESIGN §6.4: geoopt or pymanopt): the closed-form geodesics of Grassmannian, SO, Unitary,
Stiefel, Sphere, Oblique, and the affine-invariant PSD's metric. float64, to rounding, per point.
pymanopt's SO and U(n) represent a tangent vector at ``X`` by its Lie-algebra element ``Ω`` (ours is
``XΩ``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geofunc as gf

manifolds = pytest.importorskip("pymanopt.manifolds", reason="the parity tests need pymanopt (pip install -e .[bench])")

F64, C128 = torch.float64, torch.complex128
TOL = 1e-12


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _close(ours, theirs, what, tol=TOL):
    torch.testing.assert_close(ours, _t(theirs).to(ours.dtype).reshape(ours.shape), atol=tol, rtol=tol, msg=what)


def _pair(space, shape, dtype, generator, near=None):
    X = space.sample(shape, generator=generator, dtype=dtype)
    if near is None:
        return X, space.sample(shape, generator=generator, dtype=dtype)
    V = space.tangent(X, torch.randn(shape, generator=generator, dtype=dtype))
    V = near * V / space.inner(X, V, V).sqrt()
    return X, space.expmap(X, V)


@pytest.mark.parametrize("n, k", [(6, 2), (7, 3), (4, 4)])
def test_grassmannian_geodesics_equal_pymanopts(n, k, generator):
    G, M = gf.Grassmannian(), manifolds.Grassmann(n, k)
    for near in (1e-3, 0.5, 1.4):
        X, Y = _pair(G, (n, k), F64, generator, near=near if n > k else None)
        V = G.tangent(X, torch.randn(n, k, generator=generator, dtype=F64))
        _close(G.expmap(X, V), M.exp(X.numpy(), V.numpy()), "expmap")
        _close(G.logmap(X, Y), M.log(X.numpy(), Y.numpy()), "logmap", 1e-10)
        if n > k:
            _close(G.dist(X, Y), M.dist(X.numpy(), Y.numpy()), "dist", 1e-10)
        else:  # Gr(n, n) is one point: pymanopt's arccos of cosines ~1 keeps half the digits (2.6e-8), ours 0
            assert float(G.dist(X, Y)) < 1e-12 and M.dist(X.numpy(), Y.numpy()) < 1e-7


@pytest.mark.parametrize("space, manifold, dtype", [(gf.SO(), manifolds.SpecialOrthogonalGroup(5), F64),
                                                    (gf.Unitary(), manifolds.UnitaryGroup(4), C128)],
                         ids=["SO", "Unitary"])
def test_group_geodesics_equal_pymanopts(space, manifold, dtype, generator):
    n = 5 if dtype == F64 else 4
    for _ in range(3):
        X, Y = _pair(space, (n, n), dtype, generator)
        V = space.tangent(X, torch.randn(n, n, generator=generator, dtype=dtype))
        _close(space.expmap(X, V), manifold.exp(X.numpy(), (X.mH @ V).numpy()), "expmap")
        _close(space.logmap(X, Y), X.numpy() @ manifold.log(X.numpy(), Y.numpy()), "logmap", 1e-10)
        _close(space.dist(X, Y), manifold.dist(X.numpy(), Y.numpy()), "dist", 1e-10)


def test_the_affine_invariant_psd_equals_pymanopts_spd(generator):
    P, M = gf.PSD(metric="affine"), manifolds.SymmetricPositiveDefinite(4)
    for _ in range(3):
        X, Y = _pair(P, (4, 4), F64, generator)
        U, V = (P.tangent(X, torch.randn(4, 4, generator=generator, dtype=F64)) for _ in range(2))
        G = torch.randn(4, 4, generator=generator, dtype=F64)
        x, u, v = X.numpy(), U.numpy(), V.numpy()
        _close(P.inner(X, U, V), M.inner_product(x, u, v), "inner", 1e-10)
        _close(P.egrad_to_rgrad(X, G), M.euclidean_to_riemannian_gradient(x, G.numpy()), "egrad_to_rgrad")
        _close(P.retract(X, U), M.retraction(x, u), "retract", 1e-10)
        _close(P.expmap(X, U), M.exp(x, u), "expmap", 1e-10)
        _close(P.logmap(X, Y), M.log(x, Y.numpy()), "logmap", 1e-10)
        _close(P.dist(X, Y), M.dist(x, Y.numpy()), "dist", 1e-10)


def test_stiefel_sphere_oblique_geodesics_equal_pymanopts(generator):
    St, M = gf.Stiefel(), manifolds.Stiefel(6, 3)
    X = St.sample((6, 3), generator=generator, dtype=F64)
    V = St.tangent(X, torch.randn(6, 3, generator=generator, dtype=F64))
    _close(St.expmap(X, V), M.exp(X.numpy(), V.numpy()), "Stiefel expmap")
    for space, manifold, shape in ((gf.Sphere(), manifolds.Sphere(5), (5,)), (gf.Oblique(), manifolds.Oblique(4, 3), (4, 3))):
        X, Y = _pair(space, shape, F64, generator)
        V = space.tangent(X, torch.randn(shape, generator=generator, dtype=F64))
        _close(space.expmap(X, V), manifold.exp(X.numpy(), V.numpy()), f"{space!r} expmap")
        _close(space.logmap(X, Y), manifold.log(X.numpy(), Y.numpy()), f"{space!r} logmap", 1e-10)
        _close(space.dist(X, Y), manifold.dist(X.numpy(), Y.numpy()), f"{space!r} dist", 1e-10)
