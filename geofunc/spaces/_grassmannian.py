"""The Grassmannian of k-dimensional subspaces of Rⁿ, represented by orthonormal frames."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._linalg import Triv, chol_qr, haar_stiefel, polar, transpose
from ._base import AbstractSpace
from ._orthogonal import check_base, orthonormality_error, tall, untall, validate_triv
from ._stiefel import frame_chart

__all__ = ["Grassmannian"]

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Grassmannian(AbstractSpace):
    r"""k-dimensional subspaces of Rⁿ, :math:`\mathrm{Gr}(n, k) = \mathrm{St}(n, k) / O(k)`.

    A point is an orthonormal frame ``(*batch, n, k)`` spanning the subspace (no canonical
    representative is enforced); wide matrices are transposed in and out. Below, ``X`` is tall.

    * ``to_manifold(Z, base) = φ(W) Y`` with ``Y = base`` (None: the first k columns of the
      identity), ``C = (I − YYᵀ)Z`` and the horizontal generator ``W = CYᵀ − YCᵀ``: the
      Stiefel chart without the vertical part ``Ω`` (the component of ``Z`` along ``Y`` is not
      read; with ``base=None`` that is the top k×k block, as in GeoTorch). O(n k²) plus a
      2k×2k problem. For n = k the space is a single point and the map is constant.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``; one SGD
      step of size η on ``Z = 0`` then ``rebase`` is ``X⁺ = φ(−η(G Xᵀ − X Gᵀ)) X`` with ``G``
      replaced by its horizontal part ``(I − XXᵀ)G``.
    * ``tangent(X, G) = (I − XXᵀ) G`` (the horizontal space); ``retract(X, V) = qf(X + V)``;
      ``project(Y)`` = polar factor; ``sample`` = Haar-uniform frame (uniform subspace).

    Example::

        >>> X = Grassmannian().to_manifold(torch.randn(5, 2))
        >>> X.shape
        torch.Size([5, 2])
    """

    triv: Triv = "expm"

    def __post_init__(self) -> None:
        validate_triv(self, self.triv)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what)

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        check_base(self, Z, base)
        Zt, tr = tall(Z)
        Bt = None if base is None else tall(base)[0]
        return untall(frame_chart(Zt, Bt, self.triv, horizontal=True), tr)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return torch.zeros_like(X), X

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        return torch.zeros_like(Z), self.to_manifold(Z, base)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_shape(X, "X")
        self._require_same_shape(X, G, "X", "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        return untall(Gt - Xt @ (transpose(Xt) @ Gt), tr)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_shape(X, "X")
        self._require_same_shape(X, V, "X", "V")
        Xt, tr = tall(X)
        return untall(chol_qr(Xt + tall(V)[0]), tr)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        return polar(Y)

    def sample(self, shape, *, generator=None, dtype=None, device=None) -> Tensor:
        shape = tuple(shape)
        self._check_shape(torch.empty(shape, dtype=dtype or torch.get_default_dtype(), device="meta"), "shape")
        tr = shape[-2] < shape[-1]
        tshape = shape[:-2] + (shape[-1], shape[-2]) if tr else shape
        return untall(haar_stiefel(tshape, generator, dtype, device), tr)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        return {"max|XᵀX − I|": orthonormality_error(tall(X)[0])}
