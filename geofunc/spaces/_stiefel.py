"""The Stiefel manifold of orthonormal frames."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._errors import error
from .._linalg import (Triv, adjoint_by_value, expm, eye_like, frame_chart, poisoned_zero, real_products, refine_frame,
                       resolve_triv, skew_part, sym_part, transpose)
from ._base import _space_repr
from ._orthogonal import FrameSpace, empty_frame, tall, untall

__all__ = ["Stiefel"]

Tensor = torch.Tensor

_METRICS = ("embedded", "canonical")


def _column_inners(A: Tensor, B: Tensor) -> Tensor:
    """``Re diag(AᴴB)``, ``(*batch, k)``: its sum is ``Re tr(AᴴB)``. Summed last, after the metric's
    combination, so that no elementwise op meets a 0-dim per-sample tensor (which torch's ``vmap``
    refuses over an empty batch)."""
    return real_products(A, B).sum(dim=-2)  # Note [Real products under vmap] (geofunc/_linalg.py)


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
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

    ``metric``: the Riemannian metric, which ``inner``, ``egrad_to_rgrad``, ``retract`` and
    ``expmap`` follow (the chart, ``tangent``, ``project`` and ``transport`` do not depend on it;
    Note [The metrics of Stiefel]):

    * ``"embedded"`` (default; geoopt's ``EuclideanStiefel``, pymanopt's ``Stiefel``):
      ``Re tr(UᴴV)``, ``egrad_to_rgrad = tangent``, the QR retraction above, ``expmap`` Edelman's
      geodesic (Note [Stiefel's geodesics]).
    * ``"canonical"`` (geoopt's default ``Stiefel()``): ``Re tr(Uᴴ(I − ½XXᴴ)V)``,
      ``egrad_to_rgrad(X, G) = G − X Gᴴ X``, ``retract(X, V) = φ(W) X`` (the chart centred at ``X``
      with ``W`` built from ``V``'s tangent part: ``WX = V``; ``φ`` = ``triv``: Wen–Yin's Cayley step
      for ``"cayley"``, the exponential map for ``"expm"`` and for a callable, which need not be a
      retraction); ``expmap(X, V) = expm(W) X``, the canonical geodesic, O(n k²).
    * ``transport(X, Y, V) = tangent(Y, V)`` in both: the projection is orthogonal in either metric.
    * No ``logmap``/``dist`` in either (boundary-value problems without a closed form).

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

    metric: str = "embedded"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in _METRICS:
            raise error(self, f"`metric` to be one of {', '.join(map(repr, _METRICS))}", repr(self.metric))

    def __repr__(self) -> str:  # the metric only where it is not the default: reprs stay as they were
        return _space_repr(self).replace(", metric='embedded'", "")

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

    # Note [The metrics of Stiefel]
    # The canonical metric Re tr(Uᴴ(I − ½XXᴴ)V) (Edelman, Arias & Smith 1998, §2.4) is the quotient
    # metric of O(n)/O(n − k) (U(n)/U(n − k)): a tangent V = XΩ + C (Ω = XᴴV skew, XᴴC = 0) is the
    # velocity WX of the horizontal skew generator W = XΩXᴴ + CXᴴ − XCᴴ, and its length is ½‖W‖²_F:
    # ‖Ω‖²/2 + ‖C‖². The rotations inside the frame weigh half what they weigh in the embedded metric
    # (for n = k the canonical metric is half the embedded one). Its geodesics are the orbits
    # expm(tW) X, so the exponential map is the frame chart centred at X (the chart's own W is this one
    # for tangent Z), O(n k²); with the Cayley map the same chart is Wen & Yin's (2013) curve, whose
    # step from the Euclidean gradient G is (I + η/2 A)⁻¹(I − η/2 A) X, A = GXᴴ − XGᴴ, which is
    # W(−η·egrad_to_rgrad(X, G)). The Riemannian gradient G − XGᴴX follows from the metric (the
    # tangent R with ⟨R, V⟩_X = Re tr(GᴴV) for every tangent V). Both metrics split the ambient space
    # as X·sym ⊕ X·skew ⊕ X⊥·anything with the first orthogonal to the others, so tangent(Y, ·) is the
    # orthogonal projection in either, and the transport (the projection) is the same.
    # geoopt's CanonicalStiefel retracts with A = uXᴴ − Xuᴴ = W(u + XXᴴu): its step's velocity is
    # u + XΩ, the rotations inside the frame taken twice (not a first-order retraction); its
    # egrad2rgrad and inner are these.
    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """``Re tr(UᴴV)`` (embedded metric) or ``Re tr(Uᴴ(I − ½XXᴴ)V)`` (canonical), batch-shaped."""
        if self.metric == "embedded":
            return super().inner(X, U, V)
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        Xt, Ut, Vt = tall(X)[0], tall(U)[0], tall(V)[0]
        Xh = adjoint_by_value(Xt)  # Note [Real products under vmap] (geofunc/_linalg.py)
        return (_column_inners(Ut, Vt) - 0.5 * _column_inners(Xh @ Ut, Xh @ Vt)).sum(dim=-1)

    def sample(self, shape: Any, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
               device: Any = None) -> Tensor:
        """Haar-uniform frames (QR of a Gaussian, signs fixed), laid out as :meth:`retract` returns them
        (Note [Square samples in row-major layout] in geofunc/_linalg.py): QR's column-major tall frames
        for the embedded metric, row-major ones for the canonical metric, whose retraction is the chart
        centred at ``X`` (a compiled optimizer step started from a sample compiled a second graph after
        its first update). Same values."""
        X = super().sample(shape, generator=generator, dtype=dtype, device=device)
        if self.metric == "embedded":
            return X
        Xt, tr = tall(X)
        return untall(Xt.contiguous(), tr)

    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """``tangent(X, G)`` (embedded metric) or ``G − X Gᴴ X`` (canonical)."""
        if self.metric == "embedded":
            return self.tangent(X, G)
        self._check_pair(X, G, "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        return untall(Gt - Xt @ (transpose(Gt) @ Xt), tr)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``qf(X + V)`` (embedded metric) or ``φ(W) X``, the chart centred at ``X`` (canonical; Note
        [The metrics of Stiefel])."""
        if self.metric == "embedded":
            return super().retract(X, V)
        self._check_pair(X, V, "V")
        return self._orbit(X, V, "expm" if callable(self.triv) else self.triv)

    def _orbit(self, X: Tensor, V: Tensor, triv: Triv) -> Tensor:
        """``φ(W) X`` with ``W`` the horizontal skew generator of ``V``'s tangent part (``WX = V``):
        ``X φ(XᴴV)`` for square frames, the frame chart centred at ``X`` for tall ones."""
        Xt, tr = tall(X)
        Vt = tall(V)[0]
        Xt, Vt = torch.broadcast_tensors(Xt, Vt)
        if 0 in Xt.shape[-2:]:  # the empty frame
            return untall(0.0 * (Xt + Vt), tr)
        # the step refined, not its centre: it carries the centre's rounding and φ's error on long steps
        # together (Note [Retractions that multiply]; Note [Long steps on the group] in _orthogonal.py)
        if Xt.shape[-2] == Xt.shape[-1]:
            return untall(refine_frame(Xt @ resolve_triv(triv)(skew_part(transpose(Xt) @ Vt))), tr)
        Vt = Vt - Xt @ sym_part(transpose(Xt) @ Vt)
        return untall(refine_frame(frame_chart(Vt, Xt, triv)), tr)

    # Note [Stiefel's geodesics]
    # For the embedded metric the geodesic from X along a tangent V is (Edelman, Arias & Smith 1998,
    # eq. 2.7) Y(t) = [X, V] expm(t [[A, −S], [I, A]]) [I; 0] expm(−tA), A = XᴴV (skew), S = VᴴV:
    # a 2k×2k and a k×k exponential, O(n k²). V is first made tangent (its tangent part), so
    # expmap(X, V) = expmap(X, tangent(X, V)). There is no closed-form distance (nor logmap): a
    # boundary-value problem. For n = k it is X expm(XᴴV), the orthogonal group's, computed so.
    # Long geodesics: the 2k×2k matrix has norm ~‖V‖² and is far from normal (its exponential's
    # entries grow as ‖V‖ where the geodesic's stay bounded), so float32 results came back off the
    # space by ~ε‖V‖² (1e-4 at ‖V‖_F = 100 for square frames, 4e-3 at 1e4 for tall ones) and NaN at 1e5
    # (Note [Too far to be a point] in geofunc/_expm.py). With D = diag(I, νI),
    # [X, V] expm(M) = [X, V/ν] expm(D M D⁻¹) D and D [I; 0] = [I; 0], so the exponential is taken of
    # [[A, −S/ν], [νI, A]] with ν = √(1 + ‖V‖²_F), whose blocks are all O(‖V‖) (skew when V's singular
    # values are equal). ν is a constant of the formula (the value does not depend on it), so it is
    # detached: every derivative is the geodesic's. The result is then refined by one Newton–Schulz
    # step (as the group's steps: Note [Long steps on the group] in _orthogonal.py); on the space the
    # refinement's derivative is the identity on tangents, and the geodesic stays on the space for
    # every V, so derivatives of every order are unchanged. float32 geodesics of length up to 1e5 land
    # on the space, their values the float64 geodesic's to ~ε·length (the long geodesic's own
    # conditioning).
    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """The geodesic of the metric from ``X`` along ``V`` at time 1: Edelman's (embedded, Note
        [Stiefel's geodesics]) or ``expm(W) X`` (canonical, Note [The metrics of Stiefel])."""
        self._check_pair(X, V, "V")
        if self.metric == "canonical":
            return self._orbit(X, V, "expm")
        Xt, tr = tall(X)
        Vt = tall(V)[0]
        Xt, Vt = torch.broadcast_tensors(Xt, Vt)
        if 0 in Xt.shape[-2:]:  # the empty frame
            return untall(0.0 * (Xt + Vt), tr)
        if Xt.shape[-2] == Xt.shape[-1]:  # the group's geodesic
            return untall(refine_frame(Xt @ expm(skew_part(transpose(Xt) @ Vt))), tr)
        Vt = Vt - Xt @ sym_part(transpose(Xt) @ Vt)
        A = skew_part(transpose(Xt) @ Vt)
        S = transpose(Vt) @ Vt
        k = A.shape[-1]
        # D M D⁻¹ with D = diag(I, νI): blocks of norm O(‖V‖), not ‖V‖² (Note [Stiefel's geodesics])
        nu = torch.sqrt(1.0 + S.detach().diagonal(dim1=-2, dim2=-1).real.sum(dim=-1))[..., None, None]
        I = eye_like(A).expand_as(A) * nu
        M = torch.cat([torch.cat([A, -S / nu], dim=-1), torch.cat([I.to(A.dtype), A], dim=-1)], dim=-2)
        E = expm(M)[..., :k]
        return untall(refine_frame((Xt @ E[..., :k, :] + (Vt / nu) @ E[..., k:, :]) @ expm(-A)), tr)

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        self._require_matrix(Z, "Z", square=True)
        self._require_base(Z, base)
        return poisoned_zero(Z, base)[..., 0, 0].real  # real for complex frames too, as Unitary's
