"""Invertible square matrices with positive determinant."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._linalg import Triv
from ._base import cached_attribute, compute_cached
from ._factorized import SVDSpace
from ._orthogonal import validate_triv
from ._values import POSITIVE_MAPS, Positive, normalize_f

__all__ = ["GLp"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class GLp(SVDSpace):
    r"""Invertible matrices with positive determinant: :math:`GL^+(n) = \{X \in \mathbb{R}^{n\times n} : \det X > 0\}`.

    ``X = U diag(f(s)) Vᵀ`` with ``U = U_b φ(skew(tril(Z, −1)))``, ``V = V_b φ(skew(triu(Z, 1)ᵀ))``
    (SO charts through :class:`Stiefel`), ``s = diag(Z)``, ``base = (U_b, V_b)``; ``f`` as in
    :class:`FixedRank` (default ``softplus + ε``, ε = √ε_dtype). ``det X = det(U_b) det(V_b) Π f(sᵢ)``:
    positive for ``base=None`` and for every base ``from_manifold`` returns (it flips a column of
    ``V`` where the SVD gives det(U)det(V) = −1); ``from_manifold`` rejects ``det X ≤ 0``.

    * ``logabsdet(Z, base) = Σ log f(sᵢ)``: O(n) after reading the diagonal, exact.
    * ``tangent(X, G) = G`` (open set); ``project(Y)``: SVD, singular values clamped up to
      ``max(ε, 4ε_dtype√n·σ₁)`` (a member is kept: Note [Members are fixed points of project]) and,
      where ``det Y ≤ 0``, the smallest replaced by ``−max(ε, √ε·σ₁)`` (the nearest point of the
      closure, pushed inside): a canonical point; ``retract(X, V) = project(X + V)`` (``= X + V``
      for small ``V``, ``X`` at ``V = 0``). ``sample``: ``U diag(σ) Vᵀ``, ``U, V`` Haar on O(n)
      with the last column of ``V`` multiplied by ``det U det V``, ``σ_i = 0.5 + t_i``, ``t_i``
      independent and uniform on ``((n − i + ½)/n, (n − i + 1)/n]``, i = 1..n.

    Example::

        >>> M = GLp()
        >>> Z = torch.randn(4, 4)
        >>> torch.allclose(M.logabsdet(Z), torch.linalg.slogdet(M.to_manifold(Z))[1], atol=1e-4)
        True
    """

    f: Any = "softplus"
    triv: Triv = "expm"

    _det_positive: ClassVar[bool] = True
    _base_det_positive: ClassVar[bool] = True  # det U_b det V_b = −1 is refused (Note [The sign of a base])

    def __post_init__(self) -> None:
        object.__setattr__(self, "f", normalize_f(self, self.f, POSITIVE_MAPS))
        validate_triv(self, self.triv)
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _value_map(self) -> Positive:
        return Positive(self.f)

    def _rank(self, n: int, k: int) -> int:
        return n
