"""Positive semidefinite matrices of rank at most r."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from .._linalg import Triv
from ._factorized import EigSpace, validate_rank
from ._orthogonal import validate_triv
from ._values import Abs, ValueMap

__all__ = ["PSSDLowRank"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class PSSDLowRank(EigSpace):
    r"""Positive semidefinite matrices of rank at most r: :math:`\{X = X^\top \succeq 0,\ \operatorname{rank} X \le r\}`.

    Square points ``(*batch, n, n)``.

    * ``to_manifold(Z, base) = Q diag(|λ|) Qᵀ`` with ``Q = Stiefel.to_manifold(tril(Z, −1)[:, :r], base)``
      (n×r; ``base=None``: the first r columns of the identity) and ``λ = diag(Z)[:r]``; the upper
      triangle is not read. The Q coordinates are packed coordinates in an orthonormal basis adapted
      to the base (block Householder completion, O(n r²); see :class:`LowRank`). O(n r²) plus the
      n×n product.
    * ``from_manifold``: ``eigh``, top r eigenpairs (descending), ``base = Q_r``; ``rebase`` keeps
      ``diag(Z)[:r]`` and moves ``Q`` into the base (no ``eigh``).
    * ``tangent(X, G) = P S + S P − P S P``, ``S = sym(G)``, ``P = QQᵀ`` (the tangent space of the rank-r
      stratum; ``sym(G)`` when r = n); ``project(Y)``: top-r eigenvalues of ``sym(Y)`` clipped at 0 (the
      nearest point); ``retract(X, V) = project(X + V)``. ``sample``: ``Q diag(0.5 + t) Qᵀ``, ``Q`` a Haar n×r frame,
      ``t_i`` independent and uniform on ``((r − i + ½)/r, (r − i + 1)/r]``, i = 1..r.
    * ``logabsdet`` (r = n only) ``= Σ log|λᵢ|``.

    Example::

        >>> X = PSSDLowRank(rank=2).to_manifold(torch.randn(4, 4))
        >>> bool((torch.linalg.eigvalsh(X) > -1e-6).all())
        True
    """

    rank: int
    _: dataclasses.KW_ONLY  # the rest by keyword only (DESIGN §1; Note [Hyperparameters by keyword])
    triv: Triv = "expm"

    _value_map: ClassVar[ValueMap] = Abs()

    def __post_init__(self) -> None:
        validate_rank(self, self.rank)
        validate_triv(self, self.triv)

    def _rank(self, n: int) -> int:
        return self.rank
