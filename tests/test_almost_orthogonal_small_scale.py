"""AlmostOrthogonal.project at a full-rank input of small norm: every value clamps to 1 − λ, the map is
(1 − λ)·polar(Y), scale invariant, and its gradient at c·Y is the gradient at Y over c. The tie tolerance of
the derivative was √ε·max(1, σ₁), absolute below σ₁ = 1: the float32 gradient at entries ~1e-4 was 6× off
the float64 one (equal to finite differences) and 0 at 1e-6."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import geofunc as gf

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("M", [gf.AlmostOrthogonal(lam=0.5), gf.AlmostOrthogonal(lam=0.3, f="sigmoid")], ids=repr)
@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (3, 3)])
def test_project_gradient_at_small_entries(M, shape):
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(shape, generator=g, dtype=F64)
    W = torch.randn(shape, generator=g, dtype=F64)
    D = torch.randn(shape, generator=g, dtype=F64)
    f = lambda y, w=W: (w * M.project(y)).sum()  # noqa: E731
    small = 1e-3 * Y / torch.linalg.matrix_norm(Y, 2)  # every value below 1 − λ: clamped
    G0 = grad(f)(small)
    h = 1e-6 * 1e-3
    fd = (f(small + h * D) - f(small - h * D)) / (2 * h)
    torch.testing.assert_close((G0 * D).sum(), fd, rtol=1e-6, atol=0.0)
    for c in (1e-4, 1e-12):
        torch.testing.assert_close(c * grad(f)(c * small), 1e-0 * G0, rtol=1e-7, atol=1e-9 * G0.abs().max().item())
    G32 = grad(lambda y: (W.float() * M.project(y)).sum())((1e-3 * small).float())
    ref = grad(f)(1e-3 * small)
    assert ((G32.double() - ref).norm() / ref.norm()).item() < 1e-4
