"""Symmetric matrices, parametrized by a triangle."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from .._linalg import transpose
from ._triangular import TriangleSpace

__all__ = ["Sym"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sym(TriangleSpace):
    r"""Symmetric ``n×n`` matrices.

    .. math::

        \mathrm{Sym}(n) = \{X \in \mathbb{R}^{n \times n} : X = X^\top\}

    Acts on the last two dimensions ``(*batch, n, n)``; leading dimensions are a batch.

    * ``to_manifold(Z) = tril(Z) + tril(Z, -1)ᵀ`` (``lower=True``; ``triu(Z) + triu(Z, 1)ᵀ``
      otherwise): the triangle is copied onto the other one, the diagonal counted once.
      The other strict triangle of ``Z`` is not read (NaN there included).
    * ``from_manifold(X) = (tril(X), None)`` (``triu`` if ``lower=False``), so
      ``rebase(Z, None) = (tril(Z), None)``: there is no base.
    * ``tangent(X, G) = (G + Gᵀ)/2``; ``retract(X, V) = X + (V + Vᵀ)/2``;
      ``project(Y) = (Y + Yᵀ)/2`` (the nearest symmetric matrix).
    * ``sample``: ``(G + Gᵀ)/2`` for a standard Gaussian ``G`` (the Gaussian orthogonal
      ensemble up to scale).

    NaN or inf in the entries a map reads gives NaN/inf in the output, which
    :meth:`contains` rejects. A vector, a non-square or empty matrix, a non-floating
    tensor or a ``base`` that is not None raises :class:`~geofunc.ManifoldError`; a
    non-bool ``lower`` raises at construction.

    Example:
        >>> import torch, geofunc as gf
        >>> gf.Sym().to_manifold(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
        tensor([[1., 2.],
                [2., 3.]])
        >>> gf.Sym(lower=False).from_manifold(torch.tensor([[1.0, 2.0], [2.0, 3.0]]))[0]
        tensor([[1., 2.],
                [0., 3.]])
    """

    _sign: ClassVar[float] = 1.0

    def _frame(self, Z: Tensor) -> Tensor:
        """``tril(Z) + tril(Z, -1)ᵀ`` (``triu`` if ``lower=False``)."""
        triangle = torch.tril(Z) if self.lower else torch.triu(Z)
        strict = torch.tril(Z, -1) if self.lower else torch.triu(Z, 1)
        return triangle + transpose(strict)
