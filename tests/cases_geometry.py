"""Conformance cases of the new geometries: PoincareBall, Lorentz, Birkhoff.

Membership predicates are written with ``torch.linalg`` from the definitions of the sets,
independently of the spaces' own ``contains``/``_violations``.
"""

from __future__ import annotations

import torch
from helpers import SHAPES_SQUARE, SHAPES_VECTOR, TOL

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor


def in_ball(c: float):
    """The open ball ``c‖x‖² < 1`` (finite entries); open, so ``atol`` plays no role."""

    def member(X: Tensor, atol: float) -> Tensor:
        del atol
        r2 = c * torch.linalg.vector_norm(X, dim=-1) ** 2
        return torch.isfinite(X).all(-1) & (r2 < 1.0)

    return member


def _outside_ball(c: float):
    def off(X: Tensor) -> Tensor:
        n = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        return 1.5 * X / (c**0.5 * n)

    return off


def on_hyperboloid(k: float):
    """``−x₀² + ‖x̄‖² = −k`` to a relative ``atol`` (of ``k + ‖x‖²``), and ``x₀ > 0``."""

    def member(X: Tensor, atol: float) -> Tensor:
        q = -X[..., 0] ** 2 + torch.linalg.vector_norm(X[..., 1:], dim=-1) ** 2
        scale = k + torch.linalg.vector_norm(X, dim=-1) ** 2
        return ((q + k).abs() <= atol * scale) & (X[..., 0] > 0)

    return member


def _minkowski_normal(X: Tensor, V: Tensor) -> Tensor:
    """``⟨x, v⟩_L``: zero for tangent vectors."""
    return -X[..., 0] * V[..., 0] + (X[..., 1:] * V[..., 1:]).sum(-1)


def doubly_stochastic(X: Tensor, atol: float) -> Tensor:
    """Unit row and column sums and non-negative entries, to ``atol``."""
    ones = torch.ones(X.shape[-1], dtype=X.dtype)
    rows = torch.linalg.vector_norm(X @ ones - 1.0, ord=float("inf"), dim=-1)
    cols = torch.linalg.vector_norm(X.mT @ ones - 1.0, ord=float("inf"), dim=-1)
    return (rows <= atol) & (cols <= atol) & (X.amin((-2, -1)) >= -atol)


def _zero_marginals(X: Tensor, V: Tensor) -> Tensor:
    del X
    return torch.cat([V.sum(-1), V.sum(-2)], dim=-1)


def _break_marginals(X: Tensor) -> Tensor:
    E = torch.zeros_like(X)
    E[..., 0, 0] = 0.1
    return X + E


GEOMETRY_CASES = [
    SpaceCase(
        "PoincareBall",
        gf.PoincareBall(),
        shapes=SHAPES_VECTOR,
        member=in_ball(1.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_outside_ball(1.0),
        smoke_shape=(2, 3),
    ),
    SpaceCase(
        "PoincareBall-c0.5",
        gf.PoincareBall(c=0.5),
        shapes=((1,), (6,), (2, 3, 4)),
        member=in_ball(0.5),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_outside_ball(0.5),
        smoke_shape=(2, 3),
    ),
    SpaceCase(
        "Lorentz",
        gf.Lorentz(),
        shapes=((2,), (5,), (3, 4), (2, 3, 3)),
        member=on_hyperboloid(1.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_minkowski_normal,
        smoke_shape=(2, 3),
    ),
    SpaceCase(
        "Lorentz-k2",
        gf.Lorentz(k=2.0),
        shapes=((2,), (6,), (2, 3, 4)),
        member=on_hyperboloid(2.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_minkowski_normal,
        smoke_shape=(2, 3),
    ),
    SpaceCase(
        "Birkhoff",
        gf.Birkhoff(),
        shapes=SHAPES_SQUARE,
        member=doubly_stochastic,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_break_marginals,
        linearized=_zero_marginals,
        smoke_shape=(3, 3),
    ),
]
