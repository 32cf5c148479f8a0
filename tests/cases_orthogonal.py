"""Conformance cases of the orthogonal family (SO, Stiefel, Grassmannian).

Membership predicates are written with ``torch.linalg`` independently of the spaces'
own ``contains``/``_violations``.
"""

from __future__ import annotations

import torch
from helpers import SHAPES_MATRIX, SHAPES_SQUARE, TOL_LOOSE

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor


def _orthonormal(X: Tensor, atol: float) -> Tensor:
    Xt = X if X.shape[-2] >= X.shape[-1] else X.mT
    k = Xt.shape[-1]
    gram = Xt.mT @ Xt
    return torch.linalg.matrix_norm(gram - torch.eye(k, dtype=X.dtype), ord=2) <= atol


def _special_orthogonal(X: Tensor, atol: float) -> Tensor:
    return _orthonormal(X, atol) & (torch.linalg.det(X) > 0.5)


def _scale(X: Tensor) -> Tensor | None:
    return 1.01 * X


def _flip(X: Tensor) -> Tensor:
    return X * torch.cat([-torch.ones(1, dtype=X.dtype), torch.ones(X.shape[-1] - 1, dtype=X.dtype)])


def _linearized_stiefel(X: Tensor, V: Tensor) -> Tensor:
    Xt, Vt = (X, V) if X.shape[-2] >= X.shape[-1] else (X.mT, V.mT)
    return Xt.mT @ Vt + Vt.mT @ Xt


# The chart applies expm/Cayley to raw tensors of scale 100 too: float32 rounding there is
# ~1e-5 per entry, hence the looser comparison tolerance.
ORTHOGONAL_CASES = [
    SpaceCase(
        "SO",
        gf.SO(),
        shapes=SHAPES_SQUARE,
        member=_special_orthogonal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_flip,
        linearized=_linearized_stiefel,
        has_logabsdet=True,
        smoke_shape=(3, 3),
    ),
    SpaceCase(
        "SO-cayley",
        gf.SO(triv="cayley"),
        shapes=((2, 2), (2, 4, 4)),
        member=_special_orthogonal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_flip,
        linearized=_linearized_stiefel,
        has_logabsdet=True,
        smoke_shape=(3, 3),
    ),
    SpaceCase(
        "Stiefel",
        gf.Stiefel(),
        shapes=SHAPES_MATRIX,
        member=_orthonormal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_scale,
        linearized=_linearized_stiefel,
        smoke_shape=(5, 2),
    ),
    SpaceCase(
        "Stiefel-cayley",
        gf.Stiefel(triv="cayley"),
        shapes=((4, 4), (6, 3), (3, 6), (2, 5, 2)),
        member=_orthonormal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_scale,
        linearized=_linearized_stiefel,
        smoke_shape=(5, 2),
    ),
    SpaceCase(
        "Grassmannian",
        gf.Grassmannian(),
        shapes=SHAPES_MATRIX,
        member=_orthonormal,
        rebase_zeroes=True,
        tol=TOL_LOOSE,
        off_manifold=_scale,
        linearized=_linearized_stiefel,
        smoke_shape=(5, 2),
    ),
]
