"""Skew-symmetric matrices, parametrized by a strict triangle."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from .._linalg import skew_lower, skew_lower_inverse
from ._triangular import TriangleSpace

__all__ = ["Skew"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Skew(TriangleSpace):
    r"""Skew-symmetric ``n×n`` matrices.

    .. math::

        \mathfrak{so}(n) = \{X \in \mathbb{R}^{n \times n} : X = -X^\top\}

    Acts on the last two dimensions ``(*batch, n, n)``; leading dimensions are a batch.

    * ``to_manifold(Z) = tril(Z, -1) − tril(Z, -1)ᵀ`` (``lower=True``; ``triu(Z, 1)``
      otherwise). The diagonal and the other triangle of ``Z`` are not read (NaN there
      included).
    * ``from_manifold(X) = (tril(X, -1), None)`` (``triu(X, 1)`` if ``lower=False``), so
      ``rebase(Z, None) = (tril(Z, -1), None)``: there is no base.
    * ``tangent(X, G) = (G − Gᵀ)/2``; ``retract(X, V) = X + (V − Vᵀ)/2``;
      ``project(Y) = (Y − Yᵀ)/2`` (the nearest skew-symmetric matrix).
    * ``sample``: ``(G − Gᵀ)/2`` for a standard Gaussian ``G``.

    NaN or inf in the entries a map reads gives NaN/inf in the output, which
    :meth:`contains` rejects. A vector, a non-square or empty matrix, a non-floating
    tensor or a ``base`` that is not None raises :class:`~geofunc.ManifoldError`; a
    non-bool ``lower`` raises at construction.

    Example:
        >>> import torch, geofunc as gf
        >>> gf.Skew().to_manifold(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
        tensor([[ 0., -2.],
                [ 2.,  0.]])
        >>> gf.Skew().from_manifold(torch.tensor([[0.0, -2.0], [2.0, 0.0]]))[0]
        tensor([[0., 0.],
                [2., 0.]])
    """

    _sign: ClassVar[float] = -1.0

    def _frame(self, Z: Tensor) -> Tensor:
        """``tril(Z, -1) − tril(Z, -1)ᵀ`` (``triu(Z, 1)`` if ``lower=False``)."""
        return skew_lower(Z, self.lower)

    def _coords(self, X: Tensor) -> Tensor:
        return skew_lower_inverse(X, self.lower)
