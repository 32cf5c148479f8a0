"""Matrices whose singular values lie in [1 − λ, 1 + λ]."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._linalg import Triv
from ._base import cached_attribute, compute_cached, real_hyperparameter
from ._factorized import SVDSpace
from ._orthogonal import validate_triv
from ._values import UNIT_MAPS, Unit, normalize_f

__all__ = ["AlmostOrthogonal"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class AlmostOrthogonal(SVDSpace):
    r"""Almost orthogonal matrices: :math:`\{X \in \mathbb{R}^{n\times k} : \sigma_i(X) \in [1-\lambda, 1+\lambda]\}`.

    Every shape (wide ones transposed in and out; below n ≥ k, rank k), ``lam`` in [0, 1]
    (0: the Stiefel manifold; 1: singular values in [0, 2]).

    * ``to_manifold(Z, base) = U diag(1 + λ f(s)) Vᵀ`` with ``U ∈ St(n, k)``, ``V ∈ SO-chart(k)`` the
      :class:`Stiefel` charts of ``tril(Z, −1)`` and ``triu(Z, 1)ᵀ`` at ``base = (U_b, V_b)``,
      ``s = diag(Z)`` (a tall ``U``'s coordinates read in a base-adapted orthonormal basis, as in
      :class:`LowRank`). ``f``: ``"sin"`` (default), ``"tanh"``, ``"sigmoid"`` (= ``2σ(t) − 1 = tanh(t/2)``,
      also ``"scaled_sigmoid"``), a callable (no ``from_manifold``) or a pair ``(f, f_inverse)``;
      with image [a, b] the singular values lie in [1 + λa, 1 + λb].
    * ``from_manifold``: SVD, ``s = f⁻¹((σ − 1)/λ)`` (0 if λ = 0); ``rebase`` keeps ``diag(Z)``.
    * ``tangent``: ``G`` for λ > 0 (the set has interior), Stiefel's ``G − X sym(XᵀG)`` for λ = 0;
      ``project(Y)`` = ``U clamp(σ, 1 − λ, 1 + λ) Vᵀ``, the nearest point (the polar factor for λ = 0);
      ``retract(X, V) = project(X + V)``. ``sample``: ``U diag(σ) Vᵀ`` with independent Haar
      frames and ``σ_i = 1 + 0.9λ(2t_i − 1)``, ``t_i`` independent and uniform on
      ``((r − i + ½)/r, (r − i + 1)/r]``, i = 1..r, r = min(n, k) (spread over [1 − 0.9λ, 1 + 0.9λ]).
    * ``logabsdet`` (square only) ``= Σ log|1 + λ f(sᵢ)|``.

    Example::

        >>> X = AlmostOrthogonal(lam=0.5).to_manifold(torch.randn(3, 5))
        >>> s = torch.linalg.svdvals(X); bool(((s >= 0.5 - 1e-5) & (s <= 1.5 + 1e-5)).all())
        True
    """

    lam: float
    _: dataclasses.KW_ONLY  # the rest by keyword only (DESIGN §1; Note [Hyperparameters by keyword])
    f: Any = "sin"
    triv: Triv = "expm"

    def __post_init__(self) -> None:
        real_hyperparameter(self, "lam", "`lam` to be a number in [0, 1]", high=1.0)
        object.__setattr__(self, "f", normalize_f(self, self.f, UNIT_MAPS))
        validate_triv(self, self.triv)
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _value_map(self) -> Unit:
        return Unit(self.lam, self.f)

    def _rank(self, n: int, k: int) -> int:
        return k
