"""The Stiefel manifold of orthonormal frames."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._linalg import expm, eye_like, frame_chart, poisoned_zero, skew_part, sym_part, transpose
from ._orthogonal import FrameSpace, empty_frame, tall, untall

__all__ = ["Stiefel"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class Stiefel(FrameSpace):
    r"""Orthonormal frames: :math:`\mathrm{St}(n, k) = \{X \in \mathbb{R}^{n\times k} : X^\top X = I_k\}`.

    Points are ``(*batch, n, k)``; a wide matrix (n < k) has orthonormal rows and is handled by
    transposing in and out. Below, ``X`` is tall (n ≥ k).

    * ``to_manifold(Z, base)``: with ``Y = base`` (None: the first k columns of the identity),
      ``Ω`` the skew matrix of the strict lower triangle of ``YᵀZ`` and ``C = (I − YYᵀ)Z``,
      ``X = φ(W) Y`` with the skew generator ``W = YΩYᵀ + CYᵀ − YCᵀ`` and ``φ`` = ``triv``
      (``"expm"``, ``"cayley"`` or a callable skew → orthogonal). ``W`` has rank ≤ 2k, so
      ``φ(W)Y`` costs O(n k²) plus a 2k×2k exponential (or solve), never an n×n one where
      n ≥ 2k (a callable ``triv`` receives the n×n ``W``; so do frames with n < 2k, where ``W``
      is the smaller matrix and the 2k×2k one is not orthogonal to rounding at large raw
      scales). For n = k the chart is SO's:
      ``X = Y φ(skew_lower(Z))``.
    * ``from_manifold(X) = (0, X)``, ``rebase(Z, base) = (0, to_manifold(Z, base))``: the base is
      the frame itself, no completion to a square matrix is needed. Riemannian gradient
      descent: one SGD step of size η on ``Z = 0`` then ``rebase`` is exactly
      ``X⁺ = φ(−η(G Xᵀ − X Gᵀ)) X`` (the canonical-metric geodesic for ``expm``, Wen–Yin's
      Cayley step for ``cayley``).
    * ``tangent(X, G) = G − X sym(XᵀG)``; ``retract(X, V) = qf(X + V)`` (QR with positive
      diagonal, by CholeskyQR2, O(n k²)); ``project(Y)`` = the polar factor ``U Vᵀ`` of
      ``Y = U S Vᵀ``; ``sample`` is Haar-uniform.
    * ``logabsdet`` (square only) is 0.

    An empty dimension (``n×0`` or ``0×k``, GeoTorch's ``nn.Linear(0, 3)``): the space is one point, the
    empty frame; every map returns an empty tensor of the broadcast shape.

    Complex frames (``XᴴX = I``, real dimension 2nk − k²) are accepted: ``ᵀ`` reads ``ᴴ``
    above, ``Ω`` is skew-Hermitian (its imaginary diagonal read from ``Im diag(YᴴZ)``),
    ``sample`` is Haar (QR of a complex Gaussian with the phases fixed) (Note [Complex]).

    Example::

        >>> X = Stiefel().to_manifold(torch.randn(5, 2))
        >>> torch.allclose(X.mT @ X, torch.eye(2), atol=1e-5)
        True
    """


    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_base(Z, base)
        Zt, tr = tall(Z)
        Bt = None if base is None else tall(base)[0]
        E = empty_frame(Zt, Bt)
        if E is not None:
            return untall(E, tr)
        return untall(frame_chart(Zt, Bt, self.triv, horizontal=False), tr)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        return untall(Gt - Xt @ sym_part(transpose(Xt) @ Gt), tr)

    # Note [Stiefel's geodesics]
    # For the embedded metric the geodesic from X along a tangent V is (Edelman, Arias & Smith 1998,
    # eq. 2.7) Y(t) = [X, V] expm(t [[A, −S], [I, A]]) [I; 0] expm(−tA), A = XᴴV (skew), S = VᴴV:
    # a 2k×2k and a k×k exponential, O(n k²). V is first made tangent (its tangent part), so
    # expmap(X, V) = expmap(X, tangent(X, V)). There is no closed-form distance (nor logmap): a
    # boundary-value problem. For n = k it is X expm(XᴴV), the orthogonal group's.
    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """The geodesic of the embedded metric from ``X`` along ``V`` at time 1 (Note [Stiefel's geodesics])."""
        self._check_pair(X, V, "V")
        Xt, tr = tall(X)
        Vt = tall(V)[0]
        Xt, Vt = torch.broadcast_tensors(Xt, Vt)
        if 0 in Xt.shape[-2:]:  # the empty frame
            return untall(0.0 * (Xt + Vt), tr)
        Vt = Vt - Xt @ sym_part(transpose(Xt) @ Vt)
        A = skew_part(transpose(Xt) @ Vt)
        S = transpose(Vt) @ Vt
        k = A.shape[-1]
        M = torch.cat([torch.cat([A, -S], dim=-1), torch.cat([eye_like(A).expand_as(A), A], dim=-1)], dim=-2)
        E = expm(M)[..., :k]
        return untall((Xt @ E[..., :k, :] + Vt @ E[..., k:, :]) @ expm(-A), tr)

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        self._require_matrix(Z, "Z", square=True)
        self._require_base(Z, base)
        return poisoned_zero(Z, base)[..., 0, 0].real  # real for complex frames too, as Unitary's
