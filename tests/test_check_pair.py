"""Note [A pair of one shape] (geofunc/spaces/_base.py): a vector of its point's type, shape, dtype and device
is checked by the point's check alone; any other pair is checked, and refused, as before."""

from __future__ import annotations

import pytest
import torch

import geofunc as gf
from geofunc.spaces._base import AbstractSpace


@pytest.mark.parametrize("space,shape", [(gf.Stiefel(), (5, 2)), (gf.Sphere(), (4,)), (gf.SO(), (3, 3))])
def test_a_matching_pair_is_checked_once(space, shape, monkeypatch):
    seen = []
    real = type(space)._check_shape

    def spy(self, X, what="X"):
        seen.append(what)
        return real(self, X, what)

    monkeypatch.setattr(type(space), "_check_shape", spy)
    X = space.sample(shape, dtype=torch.float64)
    seen.clear()
    space._check_pair(X, torch.randn(shape, dtype=torch.float64), "V")
    assert seen == ["X"]


@pytest.mark.parametrize("V,match", [
    (torch.randn(5, 3, dtype=torch.float64), "point shape"),
    (torch.randn(5, 2, dtype=torch.float32), "float32"),
    (torch.randn(2, 5, 2, dtype=torch.float64), "broadcast"),
    (torch.randn(4, 2, dtype=torch.float64), "point shape"),
    (torch.randn(5, 2, dtype=torch.float64).numpy(), "tensor"),
])
def test_other_pairs_are_refused_as_before(V, match):
    X = gf.Stiefel().sample((3, 5, 2), dtype=torch.float64)
    with pytest.raises(gf.ManifoldError, match=match):
        gf.Stiefel().retract(X, V)
    with pytest.raises(gf.ManifoldError, match=match):
        gf.Stiefel().tangent(X, V)


def test_a_batch_that_broadcasts_is_still_taken():
    X = gf.Sphere().sample((3, 4), dtype=torch.float64)
    out = gf.Sphere().tangent(X, torch.randn(4, dtype=torch.float64))
    assert out.shape == (3, 4)
