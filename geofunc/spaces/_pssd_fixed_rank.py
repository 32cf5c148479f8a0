"""Positive semidefinite matrices of rank exactly r."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._linalg import Triv
from ._factorized import (
    POSITIVE_MAPS,
    EigSpace,
    eig_excess_violations,
    floor_violation,
    missing_inverse,
    normalize_f,
    positive_project_values,
    resolve_f,
    validate_rank,
    value_floor,
)

__all__ = ["PSSDFixedRank"]

Tensor = torch.Tensor


def positive_eig_violations(space: Any, lam: Tensor, r: int, n: int) -> dict[str, Tensor]:
    out = eig_excess_violations(lam, r, n)
    out.update(floor_violation(lam[..., n - r], lam.abs().amax(-1), value_floor(space.f, lam.dtype), n, n))
    return out


def positive_eig_project(space: Any, lam: Tensor, r: int) -> tuple[Tensor, Tensor]:
    n = lam.shape[-1]
    top = (torch.arange(n, device=lam.device) >= n - r).expand_as(lam)
    return positive_project_values(lam, top, value_floor(space.f, lam.dtype))


def positive_values_inverse(space: Any, mu: Tensor) -> Tensor:
    inv = resolve_f(space.f, POSITIVE_MAPS)[1]
    if inv is None:
        raise missing_inverse(space, space.f)
    return inv(mu)


@dataclasses.dataclass(frozen=True)
class PSSDFixedRank(EigSpace):
    r"""Positive semidefinite matrices of rank exactly r: :math:`\{X = X^\top \succeq 0,\ \operatorname{rank} X = r\}`.

    ``X = Q diag(f(λ)) Qᵀ`` with ``Q = Stiefel.to_manifold(tril(Z, −1)[:, :r], base)`` (n×r) and
    ``λ = diag(Z)[:r]`` (Q's coordinates read in a base-adapted orthonormal basis, as in
    :class:`PSSDLowRank`); ``f`` as in :class:`FixedRank` (``"softplus"`` = ``softplus + ε``, ε = √ε_dtype,
    a callable (then ``from_manifold`` raises) or a pair ``(f, f_inverse)``).

    * ``from_manifold``: ``eigh``, top r pairs, ``λ = f⁻¹(μ)``, ``base = Q_r``; ``rebase`` keeps ``diag(Z)[:r]``.
    * Membership: symmetric, no negative eigenvalue, the n − r smallest vanish, the r-th largest at
      least ε less the rounding ``ε_dtype·√n·λ_max`` of a computed eigenvalue, and above that rounding.
    * ``tangent``: as :class:`PSSDLowRank` (``sym(G)`` when r = n); ``project(Y)``: top r eigenvalues of
      ``sym(Y)`` clamped up to ``max(ε, √ε·λ_max)`` (a canonical point of the open set);
      ``retract(X, V) = project(X + V)``. ``logabsdet`` (r = n) ``= Σ log f(λᵢ)``.

    Example::

        >>> X = PSSDFixedRank(rank=2).to_manifold(torch.randn(4, 4))
        >>> int(torch.linalg.matrix_rank(X))
        2
    """

    rank: int
    f: Any = "softplus"
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        validate_rank(self, self.rank)
        object.__setattr__(self, "f", normalize_f(self, self.f, POSITIVE_MAPS))
        self._init_frames()

    def _rank(self, n: int) -> int:
        return self.rank

    def _values(self, lam: Tensor) -> Tensor:
        return resolve_f(self.f, POSITIVE_MAPS)[0](lam)

    def _values_inverse(self, mu: Tensor) -> Tensor:
        return positive_values_inverse(self, mu)

    def _project_values(self, lam, r):
        return positive_eig_project(self, lam, r)

    def _value_violations(self, lam, r, n):
        return positive_eig_violations(self, lam, r, n)
