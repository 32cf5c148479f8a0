"""Positive semidefinite matrices of rank at most r."""

from __future__ import annotations

import dataclasses

import torch

from .._linalg import Triv
from ._factorized import EigSpace, eig_excess_violations, validate_rank

__all__ = ["PSSDLowRank"]

Tensor = torch.Tensor


class AbsEigValues:
    """Mixin of PSSD and PSSDLowRank: eigenvalues ``|λ|``; ``project`` keeps the top ``r``
    eigenvalues (ascending ``lam``) clipped at 0, the others 0."""

    def _values(self, lam: Tensor) -> Tensor:
        return lam.abs()

    def _values_inverse(self, mu: Tensor) -> Tensor:
        return mu.abs()

    def _project_values(self, lam: Tensor, r: int) -> tuple[Tensor, Tensor]:
        n = lam.shape[-1]
        top = torch.arange(n, device=lam.device) >= n - r
        g = torch.where(top, lam.clamp(min=0.0), torch.zeros_like(lam))
        return g, (top & (lam > 0)).to(lam.dtype)

    def _value_violations(self, lam: Tensor, r: int, n: int) -> dict[str, Tensor]:
        return eig_excess_violations(lam, r, n)


@dataclasses.dataclass(frozen=True)
class PSSDLowRank(AbsEigValues, EigSpace):
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
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        validate_rank(self, self.rank)
        self._init_frames()

    def _rank(self, n: int) -> int:
        return self.rank
