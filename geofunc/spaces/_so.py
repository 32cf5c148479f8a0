"""The special orthogonal group SO(n)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._linalg import haar_so, poison, poisoned_zero, relative_tie_tol
from ._factorized import spectral_svd
from ._orthogonal import MatrixGroup, orthonormality_error

__all__ = ["SO"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class SO(MatrixGroup):
    r"""Special orthogonal matrices: :math:`SO(n) = \{X \in \mathbb{R}^{n\times n} : X^\top X = I,\ \det X = 1\}`.

    Points are ``(*batch, n, n)`` tensors.

    * ``to_manifold(Z, base) = base · φ(A)``, ``A = L − Lᵀ`` with ``L`` the strict lower
      triangle of ``Z`` (the diagonal and upper triangle of ``Z`` are not read), ``φ`` the
      trivialization ``triv``: ``"expm"`` (surjective), ``"cayley"``
      (``(I − A/2)⁻¹(I + A/2)``, cheaper, cannot reach eigenvalue −1) or a callable mapping
      batched skew matrices to SO(n). ``base=None`` is the identity.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``.
      Riemannian gradient descent: one SGD step of size η on ``Z = 0`` followed by
      ``rebase`` is exactly ``X⁺ = φ(−η (G Xᵀ − X Gᵀ)) X`` for the Euclidean gradient ``G``.
    * ``tangent(X, G) = X skew(XᵀG)``; ``retract(X, V) = X φ(skew(XᵀV))`` (``expm`` for a
      callable ``triv``); ``project(Y)`` = the nearest matrix of SO(n): the polar factor with
      the determinant corrected by flipping the least singular direction.
    * ``sample`` is Haar-uniform (QR of a Gaussian with signs fixed, det +1 read from
      ``slogdet`` so that large float32 samples are right too).
    * ``logabsdet(Z, base) = 0``.

    Example::

        >>> M = SO()
        >>> X = M.to_manifold(torch.randn(3, 3))
        >>> bool(M.contains(X))
        True
    """

    _base_det_positive: ClassVar[bool] = True  # a base of det −1 is refused (Note [The sign of a base])

    def project(self, Y: Tensor) -> Tensor:
        """The nearest rotation ``U diag(1, …, 1, det(UVᵀ)) Vᵀ`` of ``Y = U Σ Vᵀ``; value from the SVD,
        exact first derivatives (finite at repeated singular values, e.g. at every rotation: Note
        [Polar derivative] in ``geofunc/_linalg.py``), through the spectral map of the factorized spaces."""
        self._check_shape(Y, "Y")

        def g_fn(s: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
            d = torch.linalg.slogdet(U)[0] * torch.linalg.slogdet(Vh)[0]
            ones = torch.ones_like(s)
            return torch.cat([ones[..., :-1], d.unsqueeze(-1)], dim=-1), torch.zeros_like(s)

        # (g = ±1 is scale invariant, as the polar factor: ties relative to σ₁, Note [Polar ties relative
        # to σ₁] in geofunc/_linalg.py)
        return spectral_svd(Y, g_fn, relative_tie_tol) + poison(Y)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        shape = self._sample_shape(shape, dtype)
        return haar_so(shape, generator, dtype, device)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        sign = torch.linalg.slogdet(X)[0]
        det_bad = torch.where(sign > 0, torch.zeros_like(sign), torch.full_like(sign, float("inf")))
        return {"max|XᵀX − I|": orthonormality_error(X), "det(X) ≤ 0 (inf when negative)": det_bad}

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_base(Z, base)
        return poisoned_zero(Z, base)[..., 0, 0]

