"""Positive semidefinite matrices."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from .._linalg import Triv
from ._factorized import EigSpace
from ._orthogonal import validate_triv
from ._values import Abs, ValueMap

__all__ = ["PSSD"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class PSSD(EigSpace):
    r"""Positive semidefinite matrices: :math:`\{X \in \mathbb{R}^{n\times n} : X = X^\top \succeq 0\}`.

    ``X = Q diag(|λ|) Qᵀ`` with ``Q = base · φ(skew(tril(Z, −1)))`` (the SO chart of :class:`Stiefel`)
    and ``λ = diag(Z)``; ``base`` an orthogonal n×n matrix (None: the identity).

    * ``from_manifold``: ``eigh``, ``base = Q``, ``diag(Z) = λ``; ``rebase`` keeps ``diag(Z)``.
    * ``tangent(X, G) = sym(G)``; ``project(Y)``: eigenvalues of ``sym(Y)`` clipped at 0 (the nearest
      point); ``retract(X, V) = project(X + V)``. ``sample``: as :class:`PSD`'s.

    Complex tensors: Hermitian positive semidefinite matrices ``Q diag(|λ|) Qᴴ``, ``Q`` unitary,
    ``λ = Re diag(Z)``, as for :class:`PSD` (Note [Complex]).
    * ``logabsdet = Σ log|λᵢ|``.

    Example::

        >>> X = PSSD().to_manifold(torch.randn(3, 3))
        >>> bool((torch.linalg.eigvalsh(X) > -1e-6).all())
        True
    """

    triv: Triv = "expm"
    accepts_complex: ClassVar[bool] = True

    _value_map: ClassVar[ValueMap] = Abs()

    def __post_init__(self) -> None:
        validate_triv(self, self.triv)

    def _rank(self, n: int) -> int:
        return n
