"""Symmetric positive definite matrices."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._linalg import Triv
from ._base import cached_attribute, compute_cached
from ._factorized import EigSpace
from ._orthogonal import validate_triv
from ._values import POSITIVE_MAPS, Positive, normalize_f

__all__ = ["PSD"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class PSD(EigSpace):
    r"""Symmetric positive definite matrices: :math:`\{X \in \mathbb{R}^{n\times n} : X = X^\top \succ 0\}`.

    ``X = Q diag(f(λ)) Qᵀ`` with ``Q = base · φ(skew(tril(Z, −1)))`` (the SO chart of :class:`Stiefel`),
    ``λ = diag(Z)``; ``f`` = ``"softplus"`` (``softplus + ε``, ε = √ε_dtype), a callable (then
    ``from_manifold`` raises) or a pair ``(f, f_inverse)`` — e.g. ``(torch.exp, torch.log)``.

    * ``from_manifold``: ``eigh``, ``diag(Z) = f⁻¹(μ)``, ``base = Q``; ``rebase`` keeps ``diag(Z)``.
    * ``logabsdet(Z, base) = Σ log f(λᵢ)`` (exact, O(n) after reading the diagonal).
    * ``tangent(X, G) = sym(G)`` (open in the symmetric matrices); ``project(Y)``: eigenvalues of
      ``sym(Y)`` clamped up to ``max(ε, √ε·λ_max)`` (a canonical point); ``retract(X, V) = project(X + V)``
      (``= X + V`` for small symmetric ``V``). ``sample``: ``Q diag(0.5 + t) Qᵀ``, ``Q`` Haar on O(n),
      ``t_i`` independent and uniform on ``((n − i + ½)/n, (n − i + 1)/n]``, i = 1..n.

    Complex tensors: Hermitian positive definite matrices ``Q diag(f(λ)) Qᴴ`` with ``Q`` unitary
    (the Unitary chart of the strict lower triangle: the column phases of ``Q`` do not change
    ``X``), ``λ = Re diag(Z)``, ``sym(G) = (G + Gᴴ)/2``; ``sample`` draws ``Q`` Haar on U(n)
    (Note [Complex]).

    Example::

        >>> X = PSD().to_manifold(torch.randn(3, 3))
        >>> bool((torch.linalg.eigvalsh(X) > 0).all())
        True
    """

    f: Any = "softplus"
    triv: Triv = "expm"
    accepts_complex: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "f", normalize_f(self, self.f, POSITIVE_MAPS))
        validate_triv(self, self.triv)
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    @cached_attribute
    def _value_map(self) -> Positive:
        return Positive(self.f)

    def _rank(self, n: int) -> int:
        return n
