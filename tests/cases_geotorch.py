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


def _perturb_sl(X: Tensor, a: float) -> Tensor:
    """``c·X`` with ``|log det(cX)| = a·‖X‖_F‖X⁻¹‖_F`` (the measure is blind to the scale ``c``)."""
    n = X.shape[-1]
    K = torch.linalg.matrix_norm(X) * torch.linalg.matrix_norm(torch.linalg.inv(X))
    return X * torch.exp(a * K / n)[..., None, None]


def _perturb_hurwitz(alpha: float):
    def perturb(X: Tensor, a: float) -> Tensor:
        """``X + tI`` with ``max Re λ + alpha = a·max(1, ‖X + tI‖_F)`` (a shift moves every eigenvalue by t)."""
        eye = torch.eye(X.shape[-1], dtype=X.dtype)
        top = torch.linalg.eigvals(X.double()).real.amax(-1).to(X.dtype)
        t = torch.zeros_like(top)
        for _ in range(4):  # ‖X + tI‖ barely moves with t: a fixed point in a few steps
            scale = torch.linalg.matrix_norm(X + t[..., None, None] * eye).clamp(min=1.0)
            t = a * scale - alpha - top
        return X + t[..., None, None] * eye

    return perturb


def _dim_sl(ps: tuple) -> int:
    return ps[-1] * ps[-1] - 1


def _dim_open(ps: tuple) -> int:
    return ps[-1] * ps[-1]


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


_CANONICAL_SL = ("project is a canonical point (GLp's canonical point rescaled to det = 1, as DESIGN allows), "
                 "not the nearest point of {det = 1}")
_CANONICAL_HURWITZ = ("project is a canonical point (the least shift of the spectrum inside), not the nearest "
                      "point of the (non-convex) set of alpha-stable matrices")
_SKIP_SL = {"project_normal": _CANONICAL_SL, "project_nearest": _CANONICAL_SL}
_SKIP_HURWITZ = {"project_normal": _CANONICAL_HURWITZ, "project_nearest": _CANONICAL_HURWITZ}
# softplus + ε with ε = √ε_dtype: the float32 map differs from the float64 one by ~3.5e-4 by design.
_SOFTPLUS = 2e-3

GEOTORCH_CASES: list[SpaceCase] = [
    SpaceCase("SL", gf.SL(), SHAPES_SQUARE, _sl, TOL, off_manifold=_times2, linearized=_linearized_sl,
              has_logabsdet=True, project_fixes_points=False, smoke_shape=(3, 3), dim=_dim_sl, perturb=_perturb_sl,
              float32_shift=_SOFTPLUS, skip=_SKIP_SL),
    SpaceCase("SL-exp-cayley", gf.SL(f=EXP, triv="cayley"), ((2, 2), (3, 3), (2, 3, 3)), _sl, TOL,
              off_manifold=_negate_first_row, linearized=_linearized_sl, has_logabsdet=True,
              project_fixes_points=False, raw_scales=(1.0,), smoke_shape=(3, 3), dim=_dim_sl, perturb=_perturb_sl,
              skip=_SKIP_SL),
    SpaceCase("Hurwitz", gf.Hurwitz(), SHAPES_SQUARE, _hurwitz(0.0), TOL_LOOSE, off_manifold=_unstable(0.0),
              linearized=_zero_residual, smoke_shape=(3, 3), dim=_dim_open, perturb=_perturb_hurwitz(0.0),
              skip=_SKIP_HURWITZ),
    SpaceCase("Hurwitz-alpha-cayley", gf.Hurwitz(alpha=0.5, triv="cayley"), ((1, 1), (3, 3), (2, 4, 4)),
              _hurwitz(0.5), TOL_LOOSE, off_manifold=_unstable(0.5), linearized=_zero_residual,
              smoke_shape=(3, 3), dim=_dim_open, perturb=_perturb_hurwitz(0.5), skip=_SKIP_HURWITZ),
]
