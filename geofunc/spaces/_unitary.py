"""The unitary group U(n)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._linalg import haar_stiefel, poisoned_zero, polar
from ._orthogonal import MatrixGroup, orthonormality_error

__all__ = ["Unitary", "complex_dtype"]

Tensor = torch.Tensor

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def complex_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The complex dtype a space of complex points samples in: ``dtype`` if complex, else the
    complex dtype of ``dtype`` (``None``: of the default dtype; float32 → complex64)."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return _COMPLEX.get(dtype, dtype)


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Unitary(MatrixGroup):
    r"""Unitary matrices: :math:`U(n) = \{X \in \mathbb{C}^{n\times n} : X^H X = I\}`.

    Points are complex ``(*batch, n, n)`` tensors (complex64 or complex128; a real tensor raises
    :class:`~geofunc.ManifoldError`: use :class:`SO` for real rotations). As a real manifold
    U(n) has dimension n²; the metric is ``Re tr(UᴴV)`` (Note [Complex]).

    * ``to_manifold(Z, base) = base · φ(A)``, ``A = L − Lᴴ + i·diag(Im Z)`` with ``L`` the strict
      lower triangle of ``Z``: a skew-Hermitian matrix read from n² real coordinates (the strict
      upper triangle and the real diagonal of ``Z`` are not read). ``φ`` = ``triv``: ``"expm"``
      (onto U(n)), ``"cayley"`` (``(I − A/2)⁻¹(I + A/2)``, cannot reach eigenvalue −1) or a
      callable mapping skew-Hermitian matrices to unitary ones. ``base=None`` is the identity.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``.
    * ``tangent(X, G) = X skew(XᴴG)`` with ``skew(B) = (B − Bᴴ)/2``;
      ``retract(X, V) = X φ(skew(XᴴV))`` (``expm`` for a callable ``triv``);
      ``project(Y)`` = the polar factor ``U Vᴴ`` of ``Y = U S Vᴴ`` (the nearest unitary matrix).
    * ``sample`` is Haar-uniform: QR of a complex Ginibre matrix, phases of ``diag R`` moved
      into ``Q``; ``sample(dtype=None)`` is complex of the default dtype.
    * ``logabsdet(Z, base) = 0``.

    Example::

        >>> import torch, geofunc as gf
        >>> X = gf.Unitary().to_manifold(torch.randn(3, 3, dtype=torch.complex128))
        >>> bool(torch.allclose(X.mH @ X, torch.eye(3, dtype=X.dtype)))
        True
    """

    accepts_complex: ClassVar[bool] = True
    _complex_only: ClassVar[bool] = True

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)
        self._require_complex(X, what)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        return polar(Y)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        dtype = complex_dtype(dtype)
        # row-major, as its maps return: Note [Square samples in row-major layout] in geofunc/_linalg.py
        return haar_stiefel(self._sample_shape(shape, dtype), generator, dtype, device).contiguous()

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        return {"max|XᴴX − I|": orthonormality_error(X)}

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_base(Z, base)
        return poisoned_zero(Z, base)[..., 0, 0].real
