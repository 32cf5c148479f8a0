"""Conformance cases of the new geometries: PoincareBall, Lorentz, Birkhoff.

Membership predicates, dimensions, boundary perturbations and sample moments come from
``tests/reference.py`` (written with ``torch.linalg``, independently of the spaces).
"""

from __future__ import annotations

import reference as ref
import torch
from helpers import SHAPES_SQUARE, SHAPES_VECTOR, TOL

import geofunc as gf
from geofunc.testing import SpaceCase

Tensor = torch.Tensor


def _outside_ball(c: float):
    def off(X: Tensor) -> Tensor:
        return 1.5 * X / (c**0.5 * torch.linalg.vector_norm(X, dim=-1, keepdim=True))

    return off


def _minkowski_normal(X: Tensor, V: Tensor) -> Tensor:
    """``⟨x, v⟩_L``: zero for tangent vectors."""
    return -X[..., 0] * V[..., 0] + (X[..., 1:] * V[..., 1:]).sum(-1)


def _zero_marginals(X: Tensor, V: Tensor) -> Tensor:
    del X
    return torch.cat([V.sum(-1), V.sum(-2)], dim=-1)


def _ball_skips() -> dict[str, str]:
    return {
        "membership": "the ball is open: membership is the strict inequality c‖x‖² < 1 with no tolerance, so there "
        "is no violation of a given size to flip at",
        "project_normal": "project returns the nearest point of the closed ball √c‖x‖ ≤ 1 − δ, a set with a boundary "
        "(there Y − project(Y) is normal to the sphere, not to the tangent space ℝⁿ); project_nearest checks it",
    }


def _canonical_project(what: str) -> dict[str, str]:
    reason = f"project is a canonical point ({what}), not the Euclidean nearest point"
    return {"project_normal": reason, "project_nearest": reason}


def _ball(case_id: str, c: float, shapes) -> SpaceCase:
    return SpaceCase(
        case_id,
        gf.PoincareBall(c=c),
        shapes=shapes,
        member=ref.in_ball(c),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_outside_ball(c),
        smoke_shape=(2, 3),
        dim=ref.dim_ball,
        moments=ref.moments_ball(c),
        # the nearest point of the closure pushed inside by the margin δ = 8ε (float64)
        project_slack=8 * torch.finfo(torch.float64).eps / c**0.5,
        skip=_ball_skips(),
        transport="parallel",
    )


def _hyperboloid(case_id: str, k: float, shapes) -> SpaceCase:
    return SpaceCase(
        case_id,
        gf.Lorentz(k=k),
        shapes=shapes,
        member=ref.on_hyperboloid(k),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_minkowski_normal,
        smoke_shape=(2, 3),
        dim=ref.dim_hyperboloid,
        perturb=ref.perturb_hyperboloid(k),
        moments=ref.moments_hyperboloid(k),
        skip=_canonical_project("the vertical projection (√(k + ‖ȳ‖²), ȳ)"),
        transport="parallel",
    )


GEOMETRY_CASES = [
    _ball("PoincareBall", 1.0, SHAPES_VECTOR),
    _ball("PoincareBall-c0.5", 0.5, ((1,), (6,), (2, 3, 4))),
    _hyperboloid("Lorentz", 1.0, ((2,), (5,), (3, 4), (2, 3, 3))),
    _hyperboloid("Lorentz-k2", 2.0, ((2,), (6,), (2, 3, 4))),
    SpaceCase(
        "Birkhoff",
        gf.Birkhoff(),
        shapes=SHAPES_SQUARE,
        member=ref.doubly_stochastic,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: ref.perturb_marginals(X, 0.1),
        linearized=_zero_marginals,
        smoke_shape=(3, 3),
        dim=ref.dim_birkhoff,
        perturb=ref.perturb_marginals,
        moments=ref.moments_birkhoff,
        skip=_canonical_project("Sinkhorn balancing of max(Y, ε·max|Y|); the Euclidean nearest point of the closed "
                                "polytope lies on its boundary for most Y"),
    ),
]
