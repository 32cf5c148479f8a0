"""``eps`` of the GeoTorch classes' ``sample`` (the least kept singular value / eigenvalue)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import geofunc as gf
import geofunc.nn as gnn

CLASSES = [lambda: gnn.FixedRank((4, 3), 2), lambda: gnn.GLp((3, 3)), lambda: gnn.SL((3, 3)),
           lambda: gnn.PSSDFixedRank((3, 3), 2), lambda: gnn.PSD((3, 3))]


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("eps", [math.nan, math.inf, -1.0, "x", True, None, torch.tensor(math.nan),
                                 torch.tensor([1e-3, 1e-3]), np.True_, np.complex128(1e-3),
                                 torch.tensor(True)], ids=repr)
def test_bad_sample_eps_is_refused(make, eps):
    M = make()
    with pytest.raises(gf.ManifoldError, match=rf"{type(M).__name__}\.sample .*expected `eps` .*finite non-negative real number, got"):
        M.sample(eps=eps)


@pytest.mark.parametrize("make", CLASSES)
def test_valid_sample_eps(make):
    torch.manual_seed(0)
    M = make()
    for eps in [0, 5e-6, 0.5, np.float64(1e-3), torch.tensor(1e-3)]:
        X = M.sample(eps=eps)
        assert bool(torch.isfinite(X).all()) and M.in_manifold(X)
    with pytest.raises(gf.ManifoldError, match=r"got nan"):  # positional, as GeoTorch's signature
        M.sample(torch.nn.init.xavier_normal_, math.nan)
