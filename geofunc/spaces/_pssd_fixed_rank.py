"""Positive semidefinite matrices of rank exactly r."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._linalg import Triv
from ._factorized import (
    POSITIVE_MAPS,
    PositiveValues,
    EigSpace,
    eig_excess_violations,
    floor_violation,
    normalize_f,
    positive_project_values,
    validate_rank,
    value_floor,
)

__all__ = ["PSSDFixedRank"]

Tensor = torch.Tensor


class PositiveEigValues(PositiveValues):
    """Mixin of PSD and PSSDFixedRank: the top ``r`` eigenvalues are ``f(λ) > 0`` (ascending
    ``lam``), kept above the floor of ``f`` by ``project``, the others 0."""

    def _project_values(self, lam: Tensor, r: int) -> tuple[Tensor, Tensor]:
        n = lam.shape[-1]
        top = (torch.arange(n, device=lam.device) >= n - r).expand_as(lam)
        return positive_project_values(lam, top, value_floor(self.f, lam.dtype))  # type: ignore[attr-defined]

    def _value_violations(self, lam: Tensor, r: int, n: int) -> dict[str, Tensor]:
        out = eig_excess_violations(lam, r, n)
        floor = value_floor(self.f, lam.dtype)  # type: ignore[attr-defined]
        out.update(floor_violation(lam[..., n - r], lam.abs().amax(-1), floor, n, n))
        return out


@dataclasses.dataclass(frozen=True)
class PSSDFixedRank(PositiveEigValues, EigSpace):
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
      ``retract(X, V) = project(X + V)``. ``logabsdet`` (r = n) ``= Σ log f(λᵢ)``. ``sample``: as
      :class:`PSSDLowRank`'s.

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

