"""Hurwitz: derivatives of ``from_manifold`` (the Lyapunov certificate) in every mode.

``to_manifold(*from_manifold(X)) = X`` on the space (an open set), so its derivative along any
direction ``V`` is ``V``: an oracle that needs no other implementation. ``from_manifold`` inverted
the certificate ``P`` with ``torch.cholesky_inverse``, whose forward-mode derivative is wrong on
torch 2.13 (``jvp`` of the round trip 2–8% off ``V``; reverse mode was exact)."""

from __future__ import annotations

import pytest
import torch

import geofunc as gf

F64 = torch.float64


@pytest.mark.parametrize("space", [gf.Hurwitz(), gf.Hurwitz(alpha=0.5, triv="cayley")], ids=["expm", "alpha-cayley"])
def test_from_manifold_round_trip_derivative_is_the_identity(space):
    g = torch.Generator().manual_seed(0)
    X = space.sample((2, 4, 4), generator=g, dtype=F64)
    V = torch.randn(2, 4, 4, generator=g, dtype=F64)
    C = torch.randn(2, 4, 4, generator=g, dtype=F64)

    def round_trip(x):
        return space.to_manifold(*space.from_manifold(x))

    _, jv = torch.func.jvp(round_trip, (X,), (V,))
    torch.testing.assert_close(jv, V, atol=1e-8, rtol=0)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(round_trip(torch.autograd.forward_ad.make_dual(X, V))).tangent
    torch.testing.assert_close(tangent, V, atol=1e-8, rtol=0)
    gr = torch.func.grad(lambda x: (round_trip(x) * C).sum())(X)
    torch.testing.assert_close(gr, C, atol=1e-8, rtol=0)
    # the raw coordinates themselves against central differences
    h = 1e-6
    fd = (space.from_manifold(X + h * V)[0] - space.from_manifold(X - h * V)[0]) / (2 * h)
    torch.testing.assert_close(torch.func.jvp(lambda x: space.from_manifold(x)[0], (X,), (V,))[1], fd, atol=1e-6, rtol=0)
