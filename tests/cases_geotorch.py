"""Conformance cases of GeoTorch 0.4.0's last two spaces: ``SL`` (det = 1) and ``Hurwitz``
(every eigenvalue with real part ≤ −alpha).

Owner: geotorch engineer. Membership predicates use ``torch.linalg`` (``slogdet``, ``inv``,
``eigvals``) independently of the spaces' own ``contains``.
"""

from __future__ import annotations

import torch
from helpers import SHAPES_SQUARE, TOL, TOL_LOOSE

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor

EXP = (torch.exp, torch.log)


# ------------------------------------------------------------------ membership predicates
def _sl(X: Tensor, atol: float) -> Tensor:
    """det X > 0 and |log det X| within ``atol`` relative to ``‖X‖_F ‖X⁻¹‖_F`` (the backward error of
    ``det X = 1`` to first order: a computed det is only known to ε·n·cond)."""
    sign, lad = torch.linalg.slogdet(X)
    cond = torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(torch.linalg.inv(X))
    return (sign > 0) & (lad.abs() <= atol * cond)


def _linearized_sl(X: Tensor, V: Tensor) -> Tensor:
    """``d det(X + tV)/dt`` at 0 over ``det X``: ``tr(X⁻¹ V)``."""
    return torch.diagonal(torch.linalg.solve(X, V), dim1=-2, dim2=-1).sum(-1)


def _hurwitz(alpha: float):
    def member(X: Tensor, atol: float) -> Tensor:
        a = torch.linalg.eigvals(X).real.amax(-1)
        return a + alpha <= atol * torch.linalg.matrix_norm(X).clamp(min=1.0)

    return member


def _zero_residual(X: Tensor, V: Tensor) -> Tensor:
    """An open subset of the n×n matrices: no linear constraint on tangent vectors."""
    return torch.zeros_like(V[..., 0, 0])


# ------------------------------------------------------------------- off-manifold inputs
def _times2(X: Tensor) -> Tensor:
    return 2.0 * X


def _negate_first_row(X: Tensor) -> Tensor:
    sign = torch.ones(X.shape[-2], dtype=X.dtype)
    sign[0] = -1.0
    return X * sign[:, None]


def _unstable(alpha: float):
    def off(X: Tensor) -> Tensor:
        # shift the whole spectrum right of −alpha: max Re λ = −alpha + 1 + |max Re λ(X)|
        a = torch.linalg.eigvals(X).real.amax(-1)
        return X + (alpha + 2.0 * a.abs() + 1.0)[..., None, None] * torch.eye(X.shape[-1], dtype=X.dtype)

    return off


GEOTORCH_CASES: list[SpaceCase] = [
    SpaceCase("SL", gf.SL(), SHAPES_SQUARE, _sl, TOL, off_manifold=_times2, linearized=_linearized_sl,
              has_logabsdet=True, project_fixes_points=False, smoke_shape=(3, 3)),
    SpaceCase("SL-exp-cayley", gf.SL(f=EXP, triv="cayley"), ((2, 2), (3, 3), (2, 3, 3)), _sl, TOL,
              off_manifold=_negate_first_row, linearized=_linearized_sl, has_logabsdet=True,
              project_fixes_points=False, raw_scales=(1.0,), smoke_shape=(3, 3)),
    SpaceCase("Hurwitz", gf.Hurwitz(), SHAPES_SQUARE, _hurwitz(0.0), TOL_LOOSE, off_manifold=_unstable(0.0),
              linearized=_zero_residual, smoke_shape=(3, 3)),
    SpaceCase("Hurwitz-alpha-cayley", gf.Hurwitz(alpha=0.5, triv="cayley"), ((1, 1), (3, 3), (2, 4, 4)),
              _hurwitz(0.5), TOL_LOOSE, off_manifold=_unstable(0.5), linearized=_zero_residual,
              smoke_shape=(3, 3)),
]
