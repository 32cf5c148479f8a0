"""Derivatives of the scale-invariant projections (polar factor: Stiefel, Grassmannian, Unitary; SO's
det-corrected one) at full-rank inputs of small norm.

``project(c·Y) = project(Y)`` for c > 0, so the gradient at ``c·Y`` is the gradient at ``Y`` divided by
``c``. The derivative's tie tolerance was ``√ε·max(1, σ₁)``, absolute below σ₁ = 1, and clamped the
denominators ``σᵢ + σⱼ`` of every small input: the float32 gradient of ``Stiefel.project`` at entries
~1e-4 was 32% off, and in float64 SO's was 0 from entries ~1e-12 on (Note [Polar ties relative to σ₁]
in geofunc/_linalg.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

import geofunc as gf

F32, F64, C128 = torch.float32, torch.float64, torch.complex128

CASES = [
    (gf.Stiefel(), (6, 3), F64),
    (gf.Stiefel(), (3, 6), F64),
    (gf.Grassmannian(), (5, 2), F64),
    (gf.SO(), (3, 3), F64),
    (gf.SO(), (2, 2), F64),
    (gf.Unitary(), (3, 3), C128),
]


def _loss(M, W):
    return lambda Y: (W.conj() * M.project(Y)).real.sum()


@pytest.mark.parametrize("M,shape,dtype", CASES, ids=lambda x: repr(x) if isinstance(x, gf.AbstractSpace) else None)
@pytest.mark.parametrize("scale", [1e-6, 1e-12, 1e-30])
def test_project_gradient_is_scale_covariant(M, shape, dtype, scale):
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if dtype.is_complex:
        Y = Y + 1j * torch.randn(shape, generator=g, dtype=F64)
    W = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    f = _loss(M, W)
    G1 = grad(f)(Y)
    Gs = grad(f)(scale * Y)
    torch.testing.assert_close(scale * Gs, G1, rtol=1e-7, atol=1e-9)
    # plain autograd (the one-node path) too
    Ys = (scale * Y).requires_grad_(True)
    (Ga,) = torch.autograd.grad(f(Ys), Ys)
    torch.testing.assert_close(scale * Ga, G1, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("M,shape,dtype", CASES[:4], ids=lambda x: repr(x) if isinstance(x, gf.AbstractSpace) else None)
def test_project_gradient_matches_finite_differences_at_a_small_scale(M, shape, dtype):
    g = torch.Generator().manual_seed(1)
    s = 1e-12
    Y = s * torch.randn(shape, generator=g, dtype=dtype)
    W = torch.randn(shape, generator=g, dtype=dtype)
    D = torch.randn(shape, generator=g, dtype=dtype)
    f = _loss(M, W)
    h = 1e-6 * s
    fd = (f(Y + h * D) - f(Y - h * D)) / (2 * h)
    an = (grad(f)(Y) * D).sum()
    torch.testing.assert_close(s * an, s * fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("M,shape", [(gf.Stiefel(), (6, 3)), (gf.SO(), (3, 3))], ids=repr)
def test_project_second_derivative_is_scale_covariant(M, shape):
    """d²project(c·Y) = d²project(Y)/c² (the second-order term shares the tie tolerance)."""
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(shape, generator=g, dtype=F64)
    W = torch.randn(shape, generator=g, dtype=F64)
    D = torch.randn(shape, generator=g, dtype=F64)
    f = _loss(M, W)
    H1 = jvp(grad(f), (Y,), (D,))[1]
    c = 1e-10
    Hc = jvp(grad(f), (c * Y,), (D,))[1]
    torch.testing.assert_close(c * c * Hc, H1, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("M", [gf.Stiefel(), gf.Grassmannian()], ids=repr)
@pytest.mark.parametrize("scale", [1e-4, 1e-5])
def test_float32_project_gradient_at_small_entries_is_float64_rounded(M, scale):
    g = torch.Generator().manual_seed(0)
    Y = scale * torch.randn(6, 3, generator=g, dtype=F64)
    W = torch.randn(6, 3, generator=g, dtype=F64)
    G64 = grad(_loss(M, W))(Y)
    G32 = grad(_loss(M, W.float()))(Y.float())
    assert ((G32.double() - G64).norm() / G64.norm()).item() < 1e-4


def test_polar_at_zero_keeps_a_finite_derivative():
    """A = 0 (rank deficient: no unique factor) keeps the old clamp √ε, so its derivative stays finite."""
    for M, shape in ((gf.Stiefel(), (4, 2)), (gf.SO(), (3, 3))):
        G = grad(lambda Y: M.project(Y).sum())(torch.zeros(shape, dtype=F64))
        assert bool(torch.isfinite(G).all())
