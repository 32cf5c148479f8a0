"""SL.project is scale invariant, as its docstring defines it (values lifted to √ε·σ₁, then rescaled by
|det|^{-1/n}): project(c·Y) = project(Y) for c > 0.

The value map lifted to √ε·max(1, σ₁), clamped at the absolute floor of f: a well-conditioned 3×3 Y of
entries ~1e-4 in float32 (~1e-8 in float64) had every singular value lifted to the floor and came out
1.2 from project(Y), float32 and float64 disagreeing by as much; Y of entries near the largest float
gave NaN (Note [SL's canonical point is scale invariant] in geofunc/spaces/_sl.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import geofunc as gf

F32, F64 = torch.float32, torch.float64
M = gf.SL()


def _Y(seed=1, shape=(4, 3, 3)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("scale", [1e-4, 1e-8, 1e-20, 1e20])
def test_project_is_scale_invariant(dtype, scale):
    Y = _Y()
    ref = M.project(Y)  # float64, scale 1
    P = M.project((scale * Y).to(dtype))
    assert bool(M.contains(P).all())
    tol = 1e-5 if dtype == F32 else 1e-12
    torch.testing.assert_close(P.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_project_at_the_largest_float_is_a_point(dtype):
    Y = _Y()
    Y = Y / Y.abs().amax((-2, -1), keepdim=True) * torch.finfo(dtype).max
    P = M.project(Y.to(dtype))
    assert bool(torch.isfinite(P).all()) and bool(M.contains(P).all())


def test_project_keeps_its_value_at_unit_scale_and_its_nan_policy():
    Y = _Y(2)
    Y[1, 2, 0] = float("nan")
    Y[2, 0, 1] = float("inf")
    P = M.project(Y)
    bad = torch.tensor([False, True, True, False])
    assert bool(torch.isnan(P[bad]).all()) and bool(torch.isfinite(P[~bad]).all())
    assert bool(M.contains(P[~bad]).all())
    torch.testing.assert_close(M.project(torch.zeros(3, 3, dtype=F64)), torch.eye(3, dtype=F64))  # Y = 0: as before


def test_project_gradient_is_scale_covariant():
    Y, W = _Y(3, (3, 3)), _Y(4, (3, 3))
    f = lambda y: (W * M.project(y)).sum()  # noqa: E731
    G1 = grad(f)(Y)
    for c in (1e-6, 1e-12):
        torch.testing.assert_close(c * grad(f)(c * Y), G1, rtol=1e-7, atol=1e-9)
