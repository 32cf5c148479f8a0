"""Matrices of rank exactly r."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._linalg import Triv
from ._base import cached_attribute, compute_cached
from ._factorized import SVDSpace, validate_rank
from ._orthogonal import validate_triv
from ._values import POSITIVE_MAPS, Positive, normalize_f

__all__ = ["FixedRank"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class FixedRank(SVDSpace):
    r"""Matrices of rank exactly r: :math:`\{X \in \mathbb{R}^{n\times k} : \operatorname{rank} X = r\}`.

    As :class:`LowRank` with singular values ``f(s) > 0``: ``X = U diag(f(s)) Vᵀ``. ``f`` is
    ``"softplus"`` (``softplus(t) + ε``, ε = √ε_dtype: 3.5e-4 in float32, 1.5e-8 in float64,
    inverse ``y ↦ x + log(−expm1(−x))``, ``x = y − ε``), a callable (then ``from_manifold``
    raises) or a pair ``(f, f_inverse)``.

    * Square full rank (n = k = r): all of GL(n), both signs of the determinant, reached through
      the bases: ``sign det X = det(U_b) det(V_b)``, so ``from_manifold`` (bases from the SVD) and
      ``rebase`` keep the sign of the point and every raw step keeps it too; ``base=None`` is
      ``det > 0`` (:class:`GLp` is that component). ``logabsdet = Σ log f(sᵢ)``.
    * Membership: ``σ_{r+1} ≤ atol·max(1, σ₁)`` and ``σ_r`` at least the floor ε less the
      rounding ``δ = ε_dtype·√n·σ₁`` of a computed singular value, and above ``δ`` (for a user
      ``f``: above ``δ``).
    * ``project``: truncated SVD with the kept singular values clamped up to ``max(ε,
      4ε_dtype√max(n, k)·σ₁)``: a member is kept, otherwise a canonical point, the set being open. ``tangent`` = the fixed-rank tangent space (``G`` if r = min(n, k));
      ``retract(X, V) = project(X + V)``. ``sample``: as :class:`LowRank`'s (square full rank: both
      signs of the determinant, each with probability ½).

    Example::

        >>> X = FixedRank(rank=2).to_manifold(torch.randn(5, 3))
        >>> torch.linalg.svdvals(X)[1] > 0
        tensor(True)
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

    def _rank(self, n: int, k: int) -> int:
        return self.rank
