"""Symmetric matrices, parametrized by a triangle."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._errors import describe, error
from .._linalg import _randn, sym_part, transpose
from ._base import AbstractSpace

__all__ = ["Sym"]

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Sym(AbstractSpace):
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

    lower: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lower, bool):
            raise error(self, "`lower` to be a bool", repr(self.lower))

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def _no_base(self, base: Any) -> None:
        if base is not None:
            raise error(self, "`base` to be None (the space has no chart centre)", describe(base))

    def _triangle(self, Z: Tensor) -> Tensor:
        return torch.tril(Z) if self.lower else torch.triu(Z)

    def to_manifold(self, Z: Tensor, base: None = None) -> Tensor:
        """``tril(Z) + tril(Z, -1)ᵀ`` (``triu`` if ``lower=False``)."""
        self._check_shape(Z, "Z")
        self._no_base(base)
        strict = torch.tril(Z, -1) if self.lower else torch.triu(Z, 1)
        return self._triangle(Z) + transpose(strict)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, None]:
        return self._triangle(X), None

    def rebase(self, Z: Tensor, base: None) -> tuple[Tensor, None]:
        """``(tril(Z), None)``: the coordinates the map reads."""
        self._check_shape(Z, "Z")
        self._no_base(base)
        return self._triangle(Z), None

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``(G + Gᵀ)/2``."""
        self._check_shape(X, "X")
        self._check_shape(G, "G")
        self._require_same_shape(X, G, "X", "G")
        return sym_part(G)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``X + (V + Vᵀ)/2``."""
        self._check_shape(X, "X")
        self._check_shape(V, "V")
        self._require_same_shape(X, V, "X", "V")
        return X + sym_part(V)

    def project(self, Y: Tensor) -> Tensor:
        """``(Y + Yᵀ)/2``."""
        self._check_shape(Y, "Y")
        return sym_part(Y)

    def sample(
        self,
        shape: Any,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> Tensor:
        """``(G + Gᵀ)/2`` for a standard Gaussian ``G`` of shape ``shape``."""
        shape = tuple(shape)
        self._check_shape(torch.empty(shape, dtype=dtype, device="meta"), "shape")
        return sym_part(_randn(shape, generator, dtype, device))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        scale = X.abs().amax((-2, -1)).clamp(min=1.0)
        return {"max|X − Xᵀ| / max(1, max|X|)": (X - transpose(X)).abs().amax((-2, -1)) / scale}
