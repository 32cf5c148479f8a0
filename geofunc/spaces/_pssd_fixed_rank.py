"""Positive semidefinite matrices of rank exactly r."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._linalg import Triv
from ._base import cached_attribute, compute_cached
from ._factorized import EigSpace, validate_rank
from ._orthogonal import validate_triv
from ._values import POSITIVE_MAPS, Positive, normalize_f

__all__ = ["PSSDFixedRank"]

Tensor = torch.Tensor


@final
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
      ``retract(X, V) = project(X + V)``. ``logabsdet`` (r = n) ``= Σ log f(λᵢ)``. ``sample``: as
      :class:`PSSDLowRank`'s.

    Example::

        >>> X = PSSDFixedRank(rank=2).to_manifold(torch.randn(4, 4))
        >>> int(torch.linalg.matrix_rank(X))
        2
    """

    rank: int
    _: dataclasses.KW_ONLY  # the rest by keyword only (DESIGN §1; Note [Hyperparameters by keyword])
    f: Any = "softplus"
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        validate_rank(self, self.rank)
        object.__setattr__(self, "f", normalize_f(self, self.f, POSITIVE_MAPS))
        validate_triv(self, self.triv)
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _value_map(self) -> Positive:
        return Positive(self.f)

    def _rank(self, n: int) -> int:
        return self.rank
