"""``eps`` of the GeoTorch classes' ``in_manifold*`` methods (Note [The tolerance of in_manifold])."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import geofunc as gf
import geofunc.nn as gnn

CLASSES = [
    lambda: gnn.SO((3, 3)), lambda: gnn.Stiefel((4, 3)), lambda: gnn.Grassmannian((4, 3)),
    lambda: gnn.Sphere((3,)), lambda: gnn.SphereEmbedded((3,)), lambda: gnn.Rn((3,)),
    lambda: gnn.Skew((3, 3)), lambda: gnn.Symmetric(size=(3, 3)), lambda: gnn.LowRank((4, 3), 2),
    lambda: gnn.FixedRank((4, 3), 2), lambda: gnn.GLp((3, 3)), lambda: gnn.SL((3, 3)),
    lambda: gnn.AlmostOrthogonal((3, 3), 0.5), lambda: gnn.PSD((3, 3)), lambda: gnn.PSSD((3, 3)),
    lambda: gnn.PSSDLowRank((3, 3), 2), lambda: gnn.PSSDFixedRank((3, 3), 2), lambda: gnn.Hurwitz((3, 3)),
]
BAD = [-1.0, -1e-30, math.nan, -math.inf, "x", True, None, torch.tensor([1e-3, 1e-3]), torch.tensor(-1.0),
       torch.tensor(math.nan), torch.tensor(1e-3 + 0j), [1e-3], np.True_, np.array(True), np.complex128(1e-3),
       np.array(1e-3 + 1j), torch.tensor(True)]  # (a bool tensor: not 1.0, as True)


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("eps", BAD, ids=repr)
def test_bad_eps_is_refused(make, eps):
    torch.manual_seed(0)
    M = make()
    X = M.sample()
    if eps is None and type(M).__name__ == "Skew":  # None is Skew's default: GeoTorch's tolerances
        assert M.in_manifold(X, eps=eps)
        return
    with pytest.raises(gf.ManifoldError, match=rf"{type(M).__name__}\.in_manifold: expected `eps` to be a non-negative real number.*got"):
        M.in_manifold(X, eps=eps)


@pytest.mark.parametrize("make", CLASSES)
def test_valid_eps_still_accepted(make):
    torch.manual_seed(0)
    M = make()
    X = M.sample()
    assert M.in_manifold(X)
    for eps in [1e-3, np.float64(1e-3), torch.tensor(1e-3), torch.tensor([1e-3]), torch.tensor(1e-3, requires_grad=True)]:
        assert M.in_manifold(X, eps=eps)


def test_positional_and_static_eps():
    X = torch.zeros(3, 3)
    assert gnn.Skew.in_manifold(X, None) and gnn.Symmetric.in_manifold(X, 0)
    with pytest.raises(gf.ManifoldError, match=r"Symmetric\.in_manifold: .*got -1\.0"):
        gnn.Symmetric.in_manifold(X, -1.0)
    M = gnn.SO((3, 3))
    assert M.in_manifold(torch.eye(3), True, 1e-4)
    with pytest.raises(gf.ManifoldError, match=r"SO\.in_manifold: .*got nan"):
        M.in_manifold(torch.eye(3), True, math.nan)


def test_singular_value_and_eigen_methods():
    S = torch.tensor([2.0, 1.0, 0.0])
    M = gnn.LowRank((4, 3), 2)
    assert M.in_manifold_singular_values(S, 1e-5)
    with pytest.raises(gf.ManifoldError, match=r"LowRank\.in_manifold_singular_values: .*got nan"):
        M.in_manifold_singular_values(S, math.nan)
    H = gnn.Hurwitz((3, 3))
    with pytest.raises(gf.ManifoldError, match=r"Hurwitz\.in_manifold_eigen: .*got -1\.0"):
        H.in_manifold_eigen(-torch.eye(3), eps=-1.0)
