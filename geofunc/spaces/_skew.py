"""Skew-symmetric matrices, parametrized by a strict triangle."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._errors import describe, error
from .._linalg import _randn, skew_lower, skew_lower_inverse, skew_part, transpose
from ._base import AbstractSpace

__all__ = ["Skew"]

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Skew(AbstractSpace):
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

    lower: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lower, bool):
            raise error(self, "`lower` to be a bool", repr(self.lower))

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def _no_base(self, base: Any) -> None:
        if base is not None:
            raise error(self, "`base` to be None (the space has no chart centre)", describe(base))

    def to_manifold(self, Z: Tensor, base: None = None) -> Tensor:
        """``tril(Z, -1) − tril(Z, -1)ᵀ`` (``triu(Z, 1)`` if ``lower=False``)."""
        self._check_shape(Z, "Z")
        self._no_base(base)
        return skew_lower(Z, self.lower)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, None]:
        return skew_lower_inverse(X, self.lower), None

    def rebase(self, Z: Tensor, base: None) -> tuple[Tensor, None]:
        """``(tril(Z, -1), None)``: the coordinates the map reads."""
        self._check_shape(Z, "Z")
        self._no_base(base)
        return skew_lower_inverse(Z, self.lower), None

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``(G − Gᵀ)/2``."""
        self._check_shape(X, "X")
        self._check_shape(G, "G")
        self._require_same_shape(X, G, "X", "G")
        return skew_part(G)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``X + (V − Vᵀ)/2``."""
        self._check_shape(X, "X")
        self._check_shape(V, "V")
        self._require_same_shape(X, V, "X", "V")
        return X + skew_part(V)

    def project(self, Y: Tensor) -> Tensor:
        """``(Y − Yᵀ)/2``."""
        self._check_shape(Y, "Y")
        return skew_part(Y)

    def sample(
        self,
        shape: Any,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> Tensor:
        """``(G − Gᵀ)/2`` for a standard Gaussian ``G`` of shape ``shape``."""
        shape = tuple(shape)
        self._check_shape(torch.empty(shape, dtype=dtype, device="meta"), "shape")
        return skew_part(_randn(shape, generator, dtype, device))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        scale = X.abs().amax((-2, -1)).clamp(min=1.0)
        return {"max|X + Xᵀ| / max(1, max|X|)": (X + transpose(X)).abs().amax((-2, -1)) / scale}
