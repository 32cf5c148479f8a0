"""Derivatives of the spectral projections of the rank/PSD family (and PSD's affine-invariant maps) at
well-conditioned inputs of small norm.

The divided differences (gᵢ ∓ gⱼ)/(sᵢ ∓ sⱼ) of a spectral map were replaced by the mean slope wherever the
gap was below √ε·max(1, s₁), a tolerance absolute below s₁ = 1. The value maps are piecewise linear with
kinks (the lift c of Positive, the r-th value of a truncation, the jump of the odd extension at 0), so
the mean slope across a kink is O(1) wrong: the float32 gradient of GLp/FixedRank/PSSDFixedRank.project
at entries ~1e-4 was 0, LowRank(2)'s 11× off, PSSDLowRank(2)'s 85%, and PSD's affine expmap 2.6%
(Note [Spectral ties relative to the spectrum] in geofunc/spaces/_factorized.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jvp

import geofunc as gf

F32, F64 = torch.float32, torch.float64
VALUES = torch.tensor([1.0, 0.8, 0.6, 0.4], dtype=F64)


def _orth(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _point(shape, sym, g):
    """A well-conditioned input: singular values (eigenvalues) 1, 0.8, 0.6(, 0.4)."""
    n, k = shape
    U, V = _orth(n, g), _orth(k, g)
    m = min(n, k)
    if sym:
        return U @ torch.diag(VALUES[:n]) @ U.mT
    return U[:, :m] @ torch.diag(VALUES[:m]) @ V[:, :m].mT


def _loss(M, W):
    return lambda Y: (W * M.project(Y)).sum()


# Positively homogeneous maps (no floor): project(c·Y) = c·project(Y), so the gradient does not depend on c.
HOMOGENEOUS = [
    (gf.LowRank(2), (5, 3), False),
    (gf.LowRank(2), (3, 5), False),
    (gf.LowRank(2), (4, 4), False),
    (gf.PSSDLowRank(2), (4, 4), True),
    (gf.PSSDLowRank(1), (3, 3), True),
]


@pytest.mark.parametrize("M,shape,sym", HOMOGENEOUS, ids=lambda x: repr(x) if isinstance(x, gf.AbstractSpace) else None)
@pytest.mark.parametrize("dtype,scale", [(F32, 1e-4), (F32, 1e-7), (F64, 1e-9), (F64, 1e-30)])
def test_homogeneous_project_gradient_is_scale_free(M, shape, sym, dtype, scale):
    g = torch.Generator().manual_seed(0)
    Y = _point(shape, sym, g)
    W = torch.randn(shape, generator=g, dtype=F64)
    D = torch.randn(shape, generator=g, dtype=F64)
    if sym:
        D = D + D.mT
    f64 = _loss(M, W)
    G1 = grad(f64)(Y)
    f = _loss(M, W.to(dtype))
    Ys = (scale * Y).to(dtype).requires_grad_(True)
    (Gs,) = torch.autograd.grad(f(Ys), Ys)  # plain autograd (one node)
    Gf = grad(f)(Ys.detach())  # torch.func (the chain)
    J1 = jvp(f64, (Y,), (D,))[1]
    Js = jvp(f, (Ys.detach(),), (D.to(dtype),))[1]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == F32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(Gs.double(), G1, **tol)
    torch.testing.assert_close(Gf.double(), G1, **tol)
    torch.testing.assert_close(Js.double(), J1, **tol)


# Positive value maps: below the lift c every kept value becomes c, the map is c times a frame map
# (GLp: c·SO.project; FixedRank(r): c·U_r V_rᵀ; PSSDFixedRank(r): c·Q_r Q_rᵀ), whose derivative is ~c/s.
LIFTED = [
    (gf.GLp(), (4, 4), False),
    (gf.FixedRank(4), (4, 4), False),
    (gf.FixedRank(2), (5, 3), False),
    (gf.FixedRank(3), (5, 3), False),
    (gf.FixedRank(2), (3, 5), False),
    (gf.PSSDFixedRank(2), (4, 4), True),
]


def _lifted_reference(M, Y, c, r):
    """c times the frame map of a float64 Y (rank r kept; GLp: the det sign on the last value)."""
    if isinstance(M, gf.PSSDFixedRank):
        Q = torch.linalg.eigh(0.5 * (Y + Y.mT))[1][:, -r:]
        return c * Q @ Q.mT
    U, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    d = torch.ones_like(s)
    d[r:] = 0
    if isinstance(M, gf.GLp):
        d[-1] = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    return c * (U * d) @ Vh


@pytest.mark.parametrize("M,shape,sym", LIFTED, ids=lambda x: repr(x) if isinstance(x, gf.AbstractSpace) else None)
@pytest.mark.parametrize("dtype,scale", [(F32, 1e-5), (F32, 1e-7), (F64, 1e-9), (F64, 1e-12)])
def test_lifted_project_gradient_matches_finite_differences(M, shape, sym, dtype, scale):
    """Every value is below the lift c = √ε (the floor of "softplus"): the map is c times a frame map,
    differentiated in float64 by central differences."""
    g = torch.Generator().manual_seed(1)
    Y = scale * _point(shape, sym, g)
    W = torch.randn(shape, generator=g, dtype=F64)
    D = torch.randn(shape, generator=g, dtype=F64)
    if sym:
        D = D + D.mT
    c = math.sqrt(torch.finfo(dtype).eps)
    r = M.rank if hasattr(M, "rank") else min(shape)
    if dtype == F64:  # the space's own float64 map agrees with the reference there
        torch.testing.assert_close(M.project(Y), _lifted_reference(M, Y, c, r), rtol=1e-10, atol=1e-10 * c)
    ref = lambda Y: (W * _lifted_reference(M, Y, c, r)).sum()
    h = 1e-6 * scale
    fd = (ref(Y + h * D) - ref(Y - h * D)) / (2 * h)
    f = _loss(M, W.to(dtype))
    Yd = Y.to(dtype).requires_grad_(True)
    (G,) = torch.autograd.grad(f(Yd), Yd)
    J = jvp(M.project, (Yd.detach(),), (D.to(dtype),))[1]
    rtol = 1e-4 if dtype == F32 else 1e-7
    unit = c / scale  # the derivative's size
    torch.testing.assert_close((G.double() * D).sum() / unit, fd / unit, rtol=rtol, atol=rtol)
    torch.testing.assert_close((W * J.double()).sum() / unit, fd / unit, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_psd_affine_expmap_gradient_at_small_eigenvalues(dtype):
    """X^½ and X^-½ (scale λ, not 1) took eigenvalues of X closer than √ε as ties: the float32 gradient of
    the affine expmap at eigenvalues ~1e-4 was 2.6% off."""
    g = torch.Generator().manual_seed(2)
    s = 1e-4 if dtype == F32 else 1e-9
    X = s * _point((4, 4), True, g)
    V = torch.randn(4, 4, generator=g, dtype=F64)
    V = 0.3 * s * (V + V.mT)
    W = torch.randn(4, 4, generator=g, dtype=F64)
    D = torch.randn(4, 4, generator=g, dtype=F64)
    D = D + D.mT
    M = gf.PSD(metric="affine")
    f = lambda X: (W.to(X.dtype) * M.expmap(X, V.to(X.dtype))).sum()
    h = 1e-6 * s
    fd = (f(X + h * D) - f(X - h * D)) / (2 * h)
    Xd = X.to(dtype).requires_grad_(True)
    (G,) = torch.autograd.grad(f(Xd), Xd)
    torch.testing.assert_close((G.double() * D).sum(), fd, rtol=1e-4 if dtype == F32 else 1e-7, atol=0.0)


@pytest.mark.parametrize("M,shape,sym", [(gf.GLp(), (4, 4), False), (gf.FixedRank(2), (5, 3), False),
                                         (gf.LowRank(2), (5, 3), False), (gf.PSD(), (4, 4), True),
                                         (gf.PSSDFixedRank(2), (4, 4), True), (gf.PSSDLowRank(2), (4, 4), True)],
                         ids=lambda x: repr(x) if isinstance(x, gf.AbstractSpace) else None)
@pytest.mark.parametrize("dtype,scales", [(F32, [1.0, 1e-6, 1e-12, 1e-30, 1e-38]), (F64, [1.0, 1e-9, 1e-30, 1e-300])])
def test_rank_deficient_tied_and_tiny_inputs_stay_finite(M, shape, sym, dtype, scales):
    """First and second derivatives finite at rank-deficient, tied, zero and tiny inputs (below tiny^¼ the
    ties are absolute again, so the second-order terms do not overflow)."""
    g = torch.Generator().manual_seed(3)
    n, k = shape
    m = min(n, k)
    spectra = [VALUES[:m], torch.tensor([1.0] + [0.0] * (m - 1), dtype=F64),
               torch.tensor([1.0, 0.5] + [0.0] * (m - 2), dtype=F64), torch.ones(m, dtype=F64)]
    U, V = _orth(n, g), _orth(k, g)
    for vals in spectra:
        for s in scales:
            Y0 = U[:, :m] @ torch.diag(vals) @ (U[:, :m] if sym else V[:, :m]).mT
            Y = (s * Y0).to(dtype).requires_grad_(True)
            W = torch.randn(shape, generator=g, dtype=F64).to(dtype)
            D = torch.randn(shape, generator=g, dtype=F64).to(dtype)
            (G,) = torch.autograd.grad((W * M.project(Y)).sum(), Y, create_graph=True)
            (H,) = torch.autograd.grad((G * D).sum(), Y)
            J = jvp(M.project, (Y.detach(),), (D,))[1]
            for t in (G, H, J):
                assert t.isfinite().all(), (vals, s)
    Z = torch.zeros(shape, dtype=dtype, requires_grad=True)
    (G,) = torch.autograd.grad(M.project(Z).sum(), Z)
    assert G.isfinite().all()


def test_unit_scale_derivatives_unchanged():
    """At σ₁ ≥ 1 the tolerance is the same number as before: the exact tie of a multiple of I still takes
    the mean slope (GLp at 2·I: the identity's derivative)."""
    M = gf.GLp()
    Y = 2.0 * torch.eye(3, dtype=F64)
    D = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(jvp(M.project, (Y,), (D,))[1], D, rtol=1e-12, atol=1e-12)


def test_lowrank_project_derivative_at_a_gap_of_three_sqrt_eps():
    """A gap of at least √ε·s₁ is a divided difference: LowRank(2)'s kink between s₂ and s₃ at s₂ − s₃ =
    3√ε·s₁ (float64) has a derivative ~1e7; a tolerance 10× larger took the pair as tied (slope ½)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    gap = 3.0 * math.sqrt(torch.finfo(F64).eps)
    Y = U @ torch.diag(torch.tensor([1.0, 0.5, 0.5 - gap, 0.2], dtype=F64)) @ V.mT
    W = torch.randn(4, 4, generator=g, dtype=F64)
    M = gf.LowRank(2)
    _, dP = jvp(M.project, (Y,), (W,))
    h = 1e-6 * gap  # smooth within the gap: central differences far inside it
    fd = (M.project(Y + h * W) - M.project(Y - h * W)) / (2 * h)
    assert float(fd.abs().max()) > 1e6
    torch.testing.assert_close(dP, fd, rtol=0, atol=1e-2 * float(fd.abs().max()))
