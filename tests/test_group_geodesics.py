"""The closed-form geodesics of the orthogonal family (``SO``, ``Unitary``: Note [The group's
geodesics] in ``geofunc/spaces/_orthogonal.py``; ``Grassmannian`` and ``Stiefel``: their Notes)
beyond the conformance harness (which runs them on the real cases): rotation angles against scipy,
complex frames, Edelman's formulas, the geodesic equation. Membership by ``tests/reference.py``."""

from __future__ import annotations

import math

import pytest
import torch
from reference import member

import geofunc as gf

F64 = torch.float64


def test_so3_distance_is_root_two_times_the_rotation_angle(generator):
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    S = gf.SO()
    X = S.sample((20, 3, 3), generator=generator, dtype=F64)
    Y = S.sample((20, 3, 3), generator=generator, dtype=F64)
    angle = torch.from_numpy(Rotation.from_matrix((X.mT @ Y).numpy()).magnitude())
    torch.testing.assert_close(S.dist(X, Y), math.sqrt(2.0) * angle, atol=1e-10, rtol=0)


@pytest.mark.parametrize("space, dtype", [(gf.SO(), F64), (gf.Unitary(), torch.complex128)])
def test_expmap_walks_at_unit_speed_and_dist_measures_it(space, dtype, generator):
    """``dist(X, expmap(X, tV)) = t`` for ``V`` of unit length up to the injectivity radius (π for
    a rotation angle), ``expmap`` is the chart at base ``X`` of the skew generator, on the group."""
    X = space.sample((4, 5, 5), generator=generator, dtype=dtype)
    G = torch.randn(X.shape, generator=generator, dtype=dtype)
    V = space.tangent(X, G)
    V = V / space.inner(X, V, V).sqrt()[..., None, None]
    for t in (1e-6, 1e-2, 0.5, 2.0):
        Y = space.expmap(X, t * V)
        assert member(space, Y, 1e-10)
        torch.testing.assert_close(space.dist(X, Y), torch.full((4,), t, dtype=F64), atol=1e-9, rtol=0)
        torch.testing.assert_close(space.dist(Y, X), torch.full((4,), t, dtype=F64), atol=1e-9, rtol=0)
    A = X.mH @ V
    torch.testing.assert_close(space.expmap(X, V), X @ torch.linalg.matrix_exp(A), atol=1e-12, rtol=0)


def test_the_cayley_group_keeps_the_exponential_geodesics(generator):
    """``triv`` chooses the chart and the retraction; ``expmap`` is the group's exponential either way."""
    X = gf.SO().sample((3, 3), generator=generator, dtype=F64)
    V = gf.SO().tangent(X, torch.randn(3, 3, generator=generator, dtype=F64))
    torch.testing.assert_close(gf.SO(triv="cayley").expmap(X, V), gf.SO().expmap(X, V), atol=1e-13, rtol=0)
    assert not torch.allclose(gf.SO(triv="cayley").retract(X, V), gf.SO().expmap(X, V), atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((7, 3), F64), ((2, 3, 8), F64), ((6, 2), torch.complex128)])
def test_grassmannian_geodesics(shape, dtype, generator):
    """``expmap`` is Edelman's geodesic (the subspace of ``X W cos Σ Wᴴ + U sin Σ Wᴴ``, ``V = UΣWᴴ``),
    ``dist`` measures it at unit speed up to π/2 per principal angle, wide frames (rows) too, for
    every ``triv``; tiny angles are accurate (``arccos`` would give 0)."""
    G = gf.Grassmannian()
    X = G.sample(shape, generator=generator, dtype=dtype)
    V = G.tangent(X, torch.randn(X.shape, generator=generator, dtype=dtype))
    V = V / G.inner(X, V, V).sqrt()[..., None, None]
    for t in (1e-9, 1e-3, 0.3, 1.0):
        Y = G.expmap(X, t * V)
        assert member(G, Y, 1e-10)
        d = G.dist(X, Y)
        torch.testing.assert_close(d, torch.full_like(d, t), atol=1e-12 if t < 1e-2 else 1e-9, rtol=1e-7)
    Xt, Vt = (X, V) if shape[-2] >= shape[-1] else (X.mT, V.mT)
    U, S, Wh = torch.linalg.svd(Vt, full_matrices=False)
    E = (Xt @ Wh.mH) * torch.cos(S)[..., None, :] @ Wh + (U * torch.sin(S)[..., None, :]) @ Wh
    Y = G.expmap(X, V)
    Yt = Y if shape[-2] >= shape[-1] else Y.mT
    torch.testing.assert_close(Yt @ Yt.mH, E @ E.mH, atol=1e-12, rtol=0)  # the same subspace
    torch.testing.assert_close(gf.Grassmannian(triv="cayley").expmap(X, V), Y, atol=1e-12, rtol=0)


def test_grassmannian_dist_of_one_point_spaces_and_its_gradient_at_a_coincidence(generator):
    G = gf.Grassmannian()
    X = G.sample((4, 4), generator=generator, dtype=F64)  # Gr(4, 4): one point
    Q = gf.SO().sample((4, 4), generator=generator, dtype=F64)
    assert float(G.dist(X, X @ Q)) < 1e-7
    Xe = torch.zeros(5, 0, dtype=F64)  # Gr(5, 0): the empty frame
    assert G.dist(Xe, Xe).shape == () and float(G.dist(Xe, Xe)) == 0.0
    Xr = G.sample((6, 2), generator=generator, dtype=F64).requires_grad_()
    G.dist(Xr, Xr.detach()).backward()  # repeated principal angles (all 0): still a finite gradient
    assert torch.isfinite(Xr.grad).all()


@pytest.mark.parametrize("shape, dtype", [((7, 3), F64), ((2, 2, 6), F64), ((5, 2), torch.complex128), ((4, 4), F64)])
def test_stiefel_expmap_is_a_geodesic_of_the_embedded_metric(shape, dtype, generator):
    """``t ↦ expmap(X, tV)`` has constant speed ``‖V‖`` and its acceleration is normal to the manifold
    (``tangent(Y, Ÿ) = 0``, central differences), which a mere retraction (the QR one) fails; on
    square frames it is the orthogonal group's ``X expm(XᴴV)``."""
    S = gf.Stiefel()
    X = S.sample(shape, generator=generator, dtype=dtype)
    V = S.tangent(X, torch.randn(X.shape, generator=generator, dtype=dtype))
    speed = S.inner(X, V, V).sqrt()
    h = 1e-4
    for t in (0.0, 0.4, 1.3):
        Y = S.expmap(X, t * V)
        assert member(S, Y, 1e-10)
        Yp, Ym = S.expmap(X, (t + h) * V), S.expmap(X, (t - h) * V)
        vel, acc = (Yp - Ym) / (2 * h), (Yp - 2 * Y + Ym) / h**2
        torch.testing.assert_close(S.inner(Y, vel, vel).sqrt(), speed, atol=1e-7, rtol=1e-7)
        tang = S.tangent(Y, acc)
        scale = torch.linalg.vector_norm(acc.flatten(-2), dim=-1).clamp(min=1.0)
        assert bool((torch.linalg.vector_norm(tang.flatten(-2), dim=-1) <= 1e-5 * scale).all()), t
        R = S.retract(X, t * V)
        if t > 1 and shape[-2] != shape[-1]:  # the QR retraction is not a geodesic
            Rp, Rm = S.retract(X, (t + h) * V), S.retract(X, (t - h) * V)
            racc = S.tangent(R, (Rp - 2 * R + Rm) / h**2)
            assert bool((torch.linalg.vector_norm(racc.flatten(-2), dim=-1) > 1e-3).any())
    if shape[-2] == shape[-1]:
        torch.testing.assert_close(S.expmap(X, V), gf.SO().expmap(X, V), atol=1e-12, rtol=0)
