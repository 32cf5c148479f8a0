"""Second derivative of the spectral abscissa (Hurwitz) at inputs of small norm. ½d²λᵢ = Σ MᵢⱼMⱼᵢ/(λᵢ − λⱼ)
left out pairs closer than √ε·max(1, max|λ|), absolute below 1: at Y with entries ~1e-4 (float32) or ~1e-9
(float64) every pair, and the second derivative was 0 (the abscissa is positively homogeneous: d²a(c·Y) =
d²a(Y)/c)."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

from geofunc.spaces._hurwitz import _abscissa

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("dtype,scale", [(F32, 1e-4), (F32, 1e-7), (F64, 1e-9), (F64, 1e-30)])
def test_abscissa_second_derivative_is_scale_covariant(dtype, scale):
    g = torch.Generator().manual_seed(0)
    P = torch.randn(4, 4, generator=g, dtype=F64) + 3 * torch.eye(4, dtype=F64)
    Y = P @ torch.diag(torch.tensor([1.0, 0.5, -0.3, -0.8], dtype=F64)) @ torch.linalg.inv(P)
    D = torch.randn(4, 4, generator=g, dtype=F64)
    f = lambda Y: _abscissa(Y).sum()
    H1 = jvp(grad(f), (Y,), (D,))[1]
    Hs = jvp(grad(f), ((scale * Y).to(dtype),), (D.to(dtype),))[1]
    tol = dict(rtol=2e-3, atol=2e-3 * H1.abs().max().item()) if dtype == F32 else dict(rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(scale * Hs.double(), H1, **tol)


@pytest.mark.parametrize("dtype,scale", [(F32, 1.0), (F32, 1e-30), (F64, 1e-300)])
def test_abscissa_second_derivative_finite_at_ties_and_tiny_inputs(dtype, scale):
    D = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    f = lambda Y: _abscissa(Y).sum()
    for Y in (torch.zeros(3, 3, dtype=dtype), scale * torch.eye(3, dtype=dtype),
              scale * torch.diag(torch.tensor([1.0, 0.5, 0.2])).to(dtype)):
        assert jvp(grad(f), (Y,), (D,))[1].isfinite().all()


@pytest.mark.parametrize("dtype, scale", [(F32, 1e-40), (F64, 1e-308)])
def test_abscissa_derivatives_finite_at_subnormal_eigenvalues(dtype, scale):
    """The pair terms are dropped below the floor tiny^¼ of max|λ|: without it (√ε·max|λ| alone, which
    underflows at subnormal eigenvalues) 1/gap overflowed and even the first derivative was non-finite."""
    D = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    Y = scale * torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=F64)).to(dtype)
    assert float(Y[2, 2]) != 0.0  # subnormal, not flushed
    g, h = jvp(grad(lambda Y: _abscissa(Y).sum()), (Y,), (D,))
    assert bool(g.isfinite().all()) and bool(h.isfinite().all())
