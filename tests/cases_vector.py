"""Conformance cases of the vector spaces: Rn, Sym, Skew, Sphere, Oblique.

Membership predicates, dimensions, boundary perturbations and sample moments come from
``tests/reference.py`` (written with ``torch.linalg``, independently of the spaces).
"""

from __future__ import annotations

import math

import reference as ref
import torch
from helpers import SHAPES_MATRIX, SHAPES_SQUARE, SHAPES_VECTOR, TOL

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor


_finite = ref.finite
_symmetric = ref.symmetric
_skew = ref.skew
_on_sphere = ref.on_sphere
_unit_columns = ref.unit_columns


def _break_symmetry(X: Tensor) -> Tensor | None:
    if X.shape[-1] == 1:
        return None  # every 1×1 matrix is symmetric
    return X + torch.triu(torch.ones_like(X), 1)


def _break_skew(X: Tensor) -> Tensor:
    return X + torch.eye(X.shape[-1], dtype=X.dtype)


VECTOR_CASES = [
    SpaceCase(
        "Rn",
        gf.Rn(),
        shapes=((), (5,), (1, 1), (3, 6), (2, 3, 5, 2)),
        member=_finite,
        tol=TOL,
        off_manifold=lambda X: torch.full_like(X, math.inf),
        smoke_shape=(2, 3),
        dim=ref.dim_rn,
        moments=ref.moments_rn,
        skip={"membership": "every finite tensor is a point: membership has no tolerance to flip at"},
    ),
    SpaceCase(
        "Sym",
        gf.Sym(),
        shapes=SHAPES_SQUARE,
        member=_symmetric,
        tol=TOL,
        off_manifold=_break_symmetry,
        smoke_shape=(3, 3),
        dim=ref.dim_sym,
        perturb=ref.perturb_symmetry,
        moments=ref.moments_sym,
    ),
    SpaceCase(
        "Sym-upper",
        gf.Sym(lower=False),
        shapes=((1, 1), (4, 4), (2, 3, 3)),
        member=_symmetric,
        tol=TOL,
        off_manifold=_break_symmetry,
        smoke_shape=(3, 3),
        dim=ref.dim_sym,
        perturb=ref.perturb_symmetry,
        moments=ref.moments_sym,
    ),
    SpaceCase(
        "Skew",
        gf.Skew(),
        shapes=SHAPES_SQUARE,
        member=_skew,
        tol=TOL,
        off_manifold=_break_skew,
        smoke_shape=(3, 3),
        dim=ref.dim_skew,
        perturb=ref.perturb_skew,
        moments=ref.moments_skew,
    ),
    SpaceCase(
        "Skew-upper",
        gf.Skew(lower=False),
        shapes=((1, 1), (4, 4), (2, 3, 3)),
        member=_skew,
        tol=TOL,
        off_manifold=_break_skew,
        smoke_shape=(3, 3),
        dim=ref.dim_skew,
        perturb=ref.perturb_skew,
        moments=ref.moments_skew,
    ),
    SpaceCase(
        "Sphere",
        gf.Sphere(),
        shapes=SHAPES_VECTOR,
        member=_on_sphere(1.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        smoke_shape=(2, 4),
        dim=ref.dim_sphere,
        perturb=ref.perturb_norm,
        moments=ref.moments_sphere(1.0),
    ),
    SpaceCase(
        "Sphere-r2.5",
        gf.Sphere(radius=2.5),
        shapes=((1,), (6,), (2, 3, 4)),
        member=_on_sphere(2.5),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 0.5 * X,
        smoke_shape=(2, 4),
        dim=ref.dim_sphere,
        perturb=ref.perturb_norm,
        moments=ref.moments_sphere(2.5),
    ),
    SpaceCase(
        "Oblique",
        gf.Oblique(),
        shapes=SHAPES_MATRIX,
        member=_unit_columns,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        smoke_shape=(4, 3),
        dim=ref.dim_oblique,
        perturb=ref.perturb_norm,
        moments=ref.moments_oblique,
    ),
]

# geofunc.nn's projection-chart sphere (GeoTorch's `sphere(..., embedded=True)`): its chart
# r·Z/‖Z‖ is singular at Z = 0, so the derivative checks run at a random Z only.
VECTOR_CASES.append(
    SpaceCase(
        "SphereEmbedded",
        gf.SphereEmbedded(radius=2.0),
        shapes=((1,), (6,), (2, 3, 4)),
        member=_on_sphere(2.0),
        tol=TOL,
        off_manifold=lambda X: 0.5 * X,
        defined_at_zero=False,
        smoke_shape=(2, 4),
        dim=ref.dim_sphere,
        perturb=ref.perturb_norm,
        moments=ref.moments_sphere(2.0),
    )
)
