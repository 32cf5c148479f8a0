"""The scale-invariant projections (polar factor; SO's and AlmostOrthogonal's, whose ties are relative to σ₁)
at inputs of absurdly small norm: first derivatives computed with their second-order terms (create_graph,
torch.func) stay finite. The second-order term (~1/σ², zero in value) overflowed below σ₁ ~ 1e-19 in
float32 (1e-154 in float64) and its 0·inf made the gradient NaN (Note [Polar ties relative to σ₁])."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

import geofunc as gf

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("M,shape", [(gf.Stiefel(), (5, 3)), (gf.SO(), (3, 3)), (gf.AlmostOrthogonal(lam=0.5), (5, 3)),
                                     (gf.Grassmannian(), (5, 2))], ids=repr)
@pytest.mark.parametrize("dtype,scale", [(F32, 1e-20), (F32, 1e-30), (F32, 1e-38), (F64, 1e-160), (F64, 1e-300)])
@pytest.mark.parametrize("rank", [None, 1])
def test_first_derivative_with_second_order_terms_is_finite(M, shape, dtype, scale, rank):
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(shape, generator=g, dtype=F64)
    if rank is not None:
        Y = Y[:, :rank] @ torch.randn(rank, shape[1], generator=g, dtype=F64)
    Y = (scale * Y).to(dtype)
    W = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    D = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    f = lambda y: (W * M.project(y)).sum()
    Yr = Y.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(f(Yr), Yr, create_graph=True)
    assert G.isfinite().all()
    (H,) = torch.autograd.grad((G * D).sum(), Yr)
    assert H.isfinite().all()
    assert grad(f)(Y).isfinite().all()
    assert jvp(grad(f), (Y,), (D,))[1].isfinite().all()


def test_small_but_not_tiny_scales_keep_the_relative_tolerance():
    """Above tiny^¼ the gradient stays scale covariant (float32 at entries 1e-8)."""
    M = gf.Stiefel()
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(5, 3, generator=g, dtype=F64)
    W = torch.randn(5, 3, generator=g, dtype=F64)
    G1 = grad(lambda y: (W * M.project(y)).sum())(Y)
    c = 1e-8
    Gc = grad(lambda y: (W.float() * M.project(y)).sum())((c * Y).float())
    torch.testing.assert_close(c * Gc.double(), G1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ["polar", "Stiefel.project"])
def test_polar_gradient_at_zero_is_of_the_order_of_one_over_sqrt_eps(dtype, name):
    """At A = 0 the tolerance is √ε (relative_tie_tol), so the clamped derivative is ~1/√ε; the √ε·tiny^¼ of
    spectral_tie_tol there made it ~1e13 (float32), ~1e85 (float64)."""
    from geofunc._linalg import polar

    f = polar if name == "polar" else gf.Stiefel().project
    c = torch.randn(6, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    A = torch.zeros(6, 3, dtype=dtype, requires_grad=True)
    (G,) = torch.autograd.grad((c * f(A)).sum(), A)
    bound = 10.0 * float(c.abs().max()) / torch.finfo(dtype).eps ** 0.5
    assert bool(torch.isfinite(G).all()) and float(G.abs().max()) <= bound
