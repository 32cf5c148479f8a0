"""Hermitian matrices, parametrized by a triangle with a real diagonal."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._linalg import transpose
from ._triangular import TriangleSpace
from ._unitary import complex_dtype

__all__ = ["Hermitian"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Hermitian(TriangleSpace):
    r"""Hermitian ``n×n`` matrices.

    .. math::

        \mathrm{Herm}(n) = \{X \in \mathbb{C}^{n \times n} : X = X^H\}

    Points are complex ``(*batch, n, n)`` tensors (complex64 or complex128; a real tensor raises
    :class:`~geofunc.ManifoldError`: use :class:`Sym`); a real vector space of dimension n²
    with the metric ``Re tr(UᴴV)``.

    * ``to_manifold(Z) = L + Lᴴ + diag(Re Z)`` with ``L`` the strict lower triangle of ``Z``
      (upper if ``lower=False``): the imaginary part of the diagonal and the other strict
      triangle are not read.
    * ``from_manifold(X) = (tril(X), None)`` (``triu`` if ``lower=False``);
      ``rebase(Z, None) = (tril(Z), None)``.
    * ``tangent(X, G) = (G + Gᴴ)/2``; ``retract(X, V) = X + (V + Vᴴ)/2``;
      ``project(Y) = (Y + Yᴴ)/2`` (the nearest Hermitian matrix).
    * ``sample``: ``(G + Gᴴ)/2`` for a standard complex Gaussian ``G`` (the Gaussian unitary
      ensemble up to scale); ``sample(dtype=None)`` is complex of the default dtype.

    Example:
        >>> import torch, geofunc as gf
        >>> gf.Hermitian().to_manifold(torch.tensor([[1 + 5j, 9j], [2 + 1j, 3]]))
        tensor([[1.+0.j, 2.-1.j],
                [2.+1.j, 3.+0.j]])
    """

    _sign: ClassVar[float] = 1.0
    accepts_complex: ClassVar[bool] = True
    _complex_only: ClassVar[bool] = True

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        super()._check_shape(X, what)
        self._require_complex(X, what)

    def _frame(self, Z: Tensor) -> Tensor:
        strict = torch.tril(Z, -1) if self.lower else torch.triu(Z, 1)
        # .real before the diagonal (Note [The imaginary diagonal under torch.compile(grad)] in geofunc/_linalg.py)
        return strict + transpose(strict) + torch.diag_embed(torch.diagonal(Z.real, dim1=-2, dim2=-1).to(Z.dtype))

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        return super().sample(shape, generator=generator, dtype=complex_dtype(dtype), device=device)
