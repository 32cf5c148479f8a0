"""Conformance cases of the orthogonal family (SO, Stiefel, Grassmannian).

Membership predicates, dimensions, boundary perturbations and sample moments come from
``tests/reference.py`` (written with ``torch.linalg``, independently of the spaces).
"""

from __future__ import annotations

import reference as ref
import torch
from helpers import SHAPES_MATRIX, SHAPES_SQUARE, TOL_LOOSE

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor


_orthonormal = ref.orthonormal
_special_orthogonal = ref.special_orthogonal


def _scale(X: Tensor) -> Tensor | None:
    return 1.01 * X


def _flip(X: Tensor) -> Tensor:
    return X * torch.cat([-torch.ones(1, dtype=X.dtype), torch.ones(X.shape[-1] - 1, dtype=X.dtype)])


def _linearized_stiefel(X: Tensor, V: Tensor) -> Tensor:
    Xt, Vt = (X, V) if X.shape[-2] >= X.shape[-1] else (X.mT, V.mT)
    return Xt.mT @ Vt + Vt.mT @ Xt


def _horizontal(X: Tensor, V: Tensor) -> Tensor:
    """The Grassmannian's tangent (horizontal) vectors at a frame ``X``: ``XᵀV = 0``, stronger
    than the Stiefel condition ``XᵀV + VᵀX = 0``."""
    Xt, Vt = (X, V) if X.shape[-2] >= X.shape[-1] else (X.mT, V.mT)
    return Xt.mT @ Vt


def _stiefel_case(name: str, space: gf.Stiefel, shapes: tuple) -> SpaceCase:
    """A case of ``Stiefel`` (any ``triv``, any ``metric``): orthonormal frames, tall and wide."""
    return SpaceCase(
        name,
        space,
        shapes=shapes,
        member=_orthonormal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_scale,
        linearized=_linearized_stiefel,
        smoke_shape=(5, 2),
        dim=ref.dim_stiefel,
        perturb=ref.perturb_gram,
        moments=ref.moments_frames,
    )


def _so_case(name: str, space: gf.SO, shapes: tuple) -> SpaceCase:
    """A case of ``SO`` (any ``triv``): rotations, with the exact log-determinant 0."""
    return SpaceCase(
        name,
        space,
        shapes=shapes,
        member=_special_orthogonal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_flip,
        linearized=_linearized_stiefel,
        has_logabsdet=True,
        smoke_shape=(3, 3),
        dim=ref.dim_skew,
        perturb=ref.perturb_gram,
        moments=ref.moments_so,
    )


# The chart applies expm/Cayley to raw tensors of scale 100 too: float32 rounding there is
# ~1e-5 per entry, hence the looser comparison tolerance.
ORTHOGONAL_CASES = [
    _so_case("SO", gf.SO(), SHAPES_SQUARE),
    _so_case("SO-cayley", gf.SO(triv="cayley"), ((2, 2), (2, 4, 4))),
    _stiefel_case("Stiefel", gf.Stiefel(), SHAPES_MATRIX),
    _stiefel_case("Stiefel-cayley", gf.Stiefel(triv="cayley"), ((4, 4), (6, 3), (3, 6), (2, 5, 2))),
    # the canonical metric (geoopt's default Stiefel): the same chart, another metric and retraction
    _stiefel_case("Stiefel-canonical", gf.Stiefel(metric="canonical"), SHAPES_MATRIX),
    _stiefel_case("Stiefel-canonical-cayley", gf.Stiefel(triv="cayley", metric="canonical"),
                  ((4, 4), (6, 3), (3, 6), (2, 5, 2), (9, 2))),
    SpaceCase(
        "Grassmannian",
        gf.Grassmannian(),
        shapes=SHAPES_MATRIX,
        member=_orthonormal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_scale,
        linearized=_horizontal,
        smoke_shape=(5, 2),
        dim=ref.dim_grassmannian,
        quotient=True,
        perturb=ref.perturb_gram,
        moments=ref.moments_frames,
    ),
]
