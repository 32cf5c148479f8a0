"""Matrices of rank at most r."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from .._linalg import Triv
from ._factorized import SVDSpace, validate_rank
from ._orthogonal import validate_triv
from ._values import Identity, ValueMap

__all__ = ["LowRank"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class LowRank(SVDSpace):
    r"""Matrices of rank at most r: :math:`\{X \in \mathbb{R}^{n\times k} : \operatorname{rank} X \le r\}`.

    Points are ``(*batch, n, k)``; wide matrices are transposed in and out, below n ≥ k.

    * ``to_manifold(Z, base) = U diag(s) Vᵀ`` with ``U = Stiefel.to_manifold(tril(Z, −1)[:, :r], U_b)``
      (n×r), ``s = diag(Z)[:r]`` (raw, may be negative) and
      ``V = Stiefel.to_manifold(triu(Z, 1)[:r, :]ᵀ, V_b)`` (k×r); ``base = (U_b, V_b)`` (None: the
      first r columns of the identity). The frame coordinates are packed coordinates in an orthonormal
      basis adapted to the base (block Householder completion, O(n r²)): the chart's differential at
      zero is an isometry at every base, so SGD on raw + ``rebase`` is Riemannian gradient descent.
      Cost O((n + k) r²) plus the n×k product: no n×n matrix, no SVD of the point (only r×r ones
      of the bases' top blocks).
    * ``from_manifold(X)``: thin SVD, ``base = (U_r, V_r)``, ``Z`` zero but ``diag(Z)[:r] = σ_{1..r}``.
      ``rebase`` keeps ``diag(Z)[:r]`` and moves the frames into the base (no SVD).
    * ``tangent`` at a rank-r point: ``P_U G + G P_V − P_U G P_V`` (the fixed-rank tangent space);
      ``project`` = truncated SVD (the nearest point, Eckart–Young); ``retract(X, V) =
      project(X + V)``. ``sample``: ``U diag(σ) Vᵀ`` with independent Haar frames ``U`` (n×r), ``V``
      (k×r) and singular values ``σ_i = 0.5 + t_i``, ``t_i`` independent and uniform on ``((r − i + ½)/r, (r − i + 1)/r]``, i = 1..r
      (so 1.5 ≥ σ₁ > … > σ_r > 0.5, gaps of at least 1/(2r)).
    * ``logabsdet`` (n = k = r only) ``= Σ log|sᵢ|``.

    Example::

        >>> X = LowRank(rank=2).to_manifold(torch.randn(6, 4))
        >>> int(torch.linalg.matrix_rank(X))
        2
    """

    rank: int
    _: dataclasses.KW_ONLY  # the rest by keyword only (DESIGN §1; Note [Hyperparameters by keyword])
    triv: Triv = "expm"

    _value_map: ClassVar[ValueMap] = Identity()

    def __post_init__(self) -> None:
        validate_rank(self, self.rank)
        validate_triv(self, self.triv)

    def _rank(self, n: int, k: int) -> int:
        return self.rank
