"""Conformance cases of the new geometries: PoincareBall, Lorentz, Birkhoff.

Membership predicates are written with ``torch.linalg`` from the definitions of the sets,
independently of the spaces' own ``contains``/``_violations``.
"""

from __future__ import annotations

import dataclasses

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



def _ball_dim(ps: tuple[int, ...]) -> int:
    return ps[-1]


def _hyperboloid_dim(ps: tuple[int, ...]) -> int:
    return ps[-1] - 1


def _birkhoff_dim(ps: tuple[int, ...]) -> int:
    return (ps[-1] - 1) ** 2


def _ball_moments(c: float):
    """``sample = expmap0(v/2)``, ``v ~ N(0, I/n)``: recover ``v = 2 artanh(√c‖x‖) x/(√c‖x‖)``."""

    def moments(X: Tensor):
        n = X.shape[-1]
        r = c**0.5 * torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        v = 2.0 * torch.atanh(r) / r * X
        return {"v": (v, 0.0), "v vᵀ": (v.unsqueeze(-1) * v.unsqueeze(-2), torch.eye(n, dtype=X.dtype) / n)}

    return moments


def _hyperboloid_moments(k: float):
    """``sample = exp_o((0, v))``, ``v ~ N(0, I/n)``: ``v = d(o, x) x̄/‖x̄‖``, ``d = √k arcosh(x₀/√k)``."""

    def moments(X: Tensor):
        n = X.shape[-1] - 1
        d = k**0.5 * torch.acosh(X[..., :1] / k**0.5)
        v = d * X[..., 1:] / torch.linalg.vector_norm(X[..., 1:], dim=-1, keepdim=True)
        return {"v": (v, 0.0), "v vᵀ": (v.unsqueeze(-1) * v.unsqueeze(-2), torch.eye(n, dtype=X.dtype) / n)}

    return moments


def _scale_hyperboloid(k: float):
    """``s·X`` with ``|⟨sX, sX⟩_L + k| / (k + ‖sX‖²)`` equal to ``amount`` (``s > 1``)."""

    def perturb(X: Tensor, amount: float) -> Tensor:
        n2 = (X * X).sum(-1, keepdim=True)
        s2 = k * (1.0 + amount) / (k - amount * n2)
        return torch.sqrt(s2) * X

    return perturb


def _birkhoff_moments(X: Tensor):
    n = X.shape[-1]
    return {"X": (X, 1.0 / n)}  # rows and columns are exchangeable


def _perturb_marginals(X: Tensor, amount: float) -> Tensor:
    E = torch.zeros_like(X)
    E[..., 0, 0] = amount
    return X + E


_OPEN_BALL = ("the ball is open: membership is the strict inequality c‖x‖² < 1 with no tolerance, "
              "so there is no violation of a given size")
_CANONICAL_PROJECT = "project is a canonical point"


_FIELDS = {f.name for f in dataclasses.fields(SpaceCase)}


def _case(*args, **kwargs) -> SpaceCase:
    """A ``SpaceCase`` with the geometry fields (``dim``, ``perturb``, ``moments``, ``project_slack``,
    ``skip``) of the conformance harness of issue 12; a ``SpaceCase`` without them (before that
    harness lands) gets the others only."""
    return SpaceCase(*args, **{k: v for k, v in kwargs.items() if k in _FIELDS})


GEOMETRY_CASES = [
    _case(
        "PoincareBall",
        gf.PoincareBall(),
        shapes=SHAPES_VECTOR,
        member=in_ball(1.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_outside_ball(1.0),
        smoke_shape=(2, 3),
        dim=_ball_dim,
        moments=_ball_moments(1.0),
        project_slack=8 * torch.finfo(torch.float64).eps,
        skip={"membership": _OPEN_BALL,
              "project_normal": "project returns the nearest point of the closed ball √c‖x‖ ≤ 1 − δ (a set with a "
                                "boundary, where Y − project(Y) is normal to the sphere, not to the ball's tangent space ℝⁿ)"},
    ),
    _case(
        "PoincareBall-c0.5",
        gf.PoincareBall(c=0.5),
        shapes=((1,), (6,), (2, 3, 4)),
        member=in_ball(0.5),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_outside_ball(0.5),
        smoke_shape=(2, 3),
        dim=_ball_dim,
        moments=_ball_moments(0.5),
        project_slack=8 * torch.finfo(torch.float64).eps / 0.5**0.5,
        skip={"membership": _OPEN_BALL,
              "project_normal": "project returns the nearest point of the closed ball √c‖x‖ ≤ 1 − δ (a set with a "
                                "boundary, where Y − project(Y) is normal to the sphere, not to the ball's tangent space ℝⁿ)"},
    ),
    _case(
        "Lorentz",
        gf.Lorentz(),
        shapes=((2,), (5,), (3, 4), (2, 3, 3)),
        member=on_hyperboloid(1.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_minkowski_normal,
        smoke_shape=(2, 3),
        dim=_hyperboloid_dim,
        perturb=_scale_hyperboloid(1.0),
        moments=_hyperboloid_moments(1.0),
        skip={"project_normal": _CANONICAL_PROJECT + " (the vertical projection (√(k + ‖ȳ‖²), ȳ)), not the Euclidean nearest",
              "project_nearest": _CANONICAL_PROJECT + " (the vertical projection (√(k + ‖ȳ‖²), ȳ)), not the Euclidean nearest"},
    ),
    _case(
        "Lorentz-k2",
        gf.Lorentz(k=2.0),
        shapes=((2,), (6,), (2, 3, 4)),
        member=on_hyperboloid(2.0),
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        linearized=_minkowski_normal,
        smoke_shape=(2, 3),
        dim=_hyperboloid_dim,
        perturb=_scale_hyperboloid(2.0),
        moments=_hyperboloid_moments(2.0),
        skip={"project_normal": _CANONICAL_PROJECT + " (the vertical projection (√(k + ‖ȳ‖²), ȳ)), not the Euclidean nearest",
              "project_nearest": _CANONICAL_PROJECT + " (the vertical projection (√(k + ‖ȳ‖²), ȳ)), not the Euclidean nearest"},
    ),
    _case(
        "Birkhoff",
        gf.Birkhoff(),
        shapes=SHAPES_SQUARE,
        member=doubly_stochastic,
        tol=TOL,
        rebase_zeroes=True,
        off_manifold=_break_marginals,
        linearized=_zero_marginals,
        smoke_shape=(3, 3),
        dim=_birkhoff_dim,
        perturb=_perturb_marginals,
        moments=_birkhoff_moments,
        skip={"project_normal": _CANONICAL_PROJECT + " (Sinkhorn balancing of max(Y, ε·max|Y|)): the Euclidean nearest "
                                "point of the closed polytope lies on its boundary for most Y",
              "project_nearest": _CANONICAL_PROJECT + " (Sinkhorn balancing of max(Y, ε·max|Y|)): the Euclidean nearest "
                                 "point of the closed polytope lies on its boundary for most Y"},
    ),
]
