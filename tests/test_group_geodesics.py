"""The matrix groups' closed-form geodesics (``SO``, ``Unitary``: Note [The group's geodesics] in
``geofunc/spaces/_orthogonal.py``) beyond the conformance harness (which runs them on the real
cases): rotation angles against scipy, the complex group, the chart's relation."""

from __future__ import annotations

import math

import pytest
import torch

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
        assert bool(space.contains(Y).all())
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
