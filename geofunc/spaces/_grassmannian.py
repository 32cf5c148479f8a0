"""The Grassmannian of k-dimensional subspaces of Rⁿ, represented by orthonormal frames."""

from __future__ import annotations

import dataclasses
from typing import Any, final

import torch

from .._linalg import frame_chart, poison, poisoned_zero, polar, refine_frame, sanitize, transpose, wide_dtype
from ._factorized import spectral_eigh
from ._logs import atan_ratio
from ._orthogonal import FrameSpace, empty_frame, tall, untall

__all__ = ["Grassmannian"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Grassmannian(FrameSpace):
    r"""k-dimensional subspaces of Rⁿ, :math:`\mathrm{Gr}(n, k) = \mathrm{St}(n, k) / O(k)`.

    A point is an orthonormal frame ``(*batch, n, k)`` spanning the subspace (no canonical
    representative is enforced); wide matrices are transposed in and out. Below, ``X`` is tall.

    * ``to_manifold(Z, base) = φ(W) Y`` with ``Y = base`` (None: the first k columns of the
      identity), ``C = (I − YYᵀ)Z`` and the horizontal generator ``W = CYᵀ − YCᵀ``: the
      Stiefel chart without the vertical part ``Ω`` (the component of ``Z`` along ``Y`` is not
      read; with ``base=None`` that is the top k×k block, as in GeoTorch). O(n k²) plus a
      2k×2k problem (for n < 2k, the n×n ``W``: Note [Reduced tall chart]). For n = k the space
      is a single point and the map is constant.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``; one SGD
      step of size η on ``Z = 0`` then ``rebase`` is ``X⁺ = φ(−η(G Xᵀ − X Gᵀ)) X`` with ``G``
      replaced by its horizontal part ``(I − XXᵀ)G``.
    * ``tangent(X, G) = (I − XXᵀ) G`` (the horizontal space); ``retract(X, V) = qf(X + V)``;
      ``project(Y)`` = polar factor; ``sample`` = Haar-uniform frame (uniform subspace).

    An empty dimension (``n×0`` or ``0×k``, GeoTorch's ``nn.Linear(0, 3)``): the space is one point, the
    empty frame; every map returns an empty tensor of the broadcast shape.

    Complex frames (subspaces of Cⁿ, real dimension 2k(n − k)) are accepted: ``ᵀ`` reads ``ᴴ``
    above, tangent vectors satisfy ``XᴴV = 0`` (Note [Complex]).

    Example::

        >>> X = Grassmannian().to_manifold(torch.randn(5, 2))
        >>> X.shape
        torch.Size([5, 2])
    """


    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_base(Z, base)
        Zt, tr = tall(Z)
        Bt = None if base is None else tall(base)[0]
        E = empty_frame(Zt, Bt)
        if E is not None:
            return untall(E, tr)
        X = frame_chart(Zt, Bt, self.triv, horizontal=True)
        if Zt.shape[-2] == Zt.shape[-1]:
            # Gr(n, n) is one point: the constant chart's gradient is 0, except at a NaN/inf raw tensor,
            # whose point and gradient are NaN (Note [NaN policy]); a term 0 in value and derivative
            X = X + poisoned_zero(Zt)
        return untall(X, tr)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        return untall(Gt - Xt @ (transpose(Xt) @ Gt), tr)

    # Note [The Grassmannian's geodesics]
    # For a horizontal V (XᴴV = 0) the geodesic from the subspace of X is expm(t(VXᴴ − XVᴴ)) X (Edelman,
    # Arias & Smith 1998): the "expm" chart at base X of the raw tensor V, which reads only V's
    # horizontal part, so expmap is that chart (smooth at V = 0, O(n k²), whatever `triv` is). The
    # distance is the norm of the principal angles θ_i = atan2(sin θ_i, cos θ_i), the cosines the
    # singular values of XᴴY and the sines those of (I − XXᴴ)Y (paired in reverse order): each is
    # accurate where the other is not (arccos loses half the digits of small angles), and singular
    # values (not vectors) keep the gradient finite where angles repeat (Y = X). The logarithm
    # U diag(θ) Wᴴ of M = (I − XXᴴ)Y(XᴴY)⁻¹ = U diag(tan θ) Wᴴ (Absil, Mahony & Sepulchre 2004) is
    # M h(MᴴM), h(a) = arctan(√a)/√a, a spectral map of the Hermitian MᴴM (Note [Logarithms as
    # spectral maps] in geofunc/spaces/_logs.py): no singular vectors; unique for principal angles
    # < π/2 (XᴴY singular is the cut locus); independent of the frame chosen for Y's subspace. It is
    # evaluated at the half-way subspace (Note [The Grassmannian's logarithm near the cut locus]).
    # The chart's point is refined by one Newton–Schulz step: a chart at extreme raw scales is off the
    # space by ~ε‖W‖ (README, "Extreme raw scales"), a geodesic is not (float32 lengths of 1e4 came back
    # 1e-4 off orthonormal); on the space the refinement's derivative is the identity on tangents and
    # the geodesic stays on it for every V, so the derivatives are the geodesic's (Note [Long steps on
    # the group] in _orthogonal.py).
    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``expm(VXᴴ − XVᴴ) X`` for the horizontal part of ``V``: the geodesic (Note [The Grassmannian's
        geodesics])."""
        self._check_pair(X, V, "V")
        Yt, tr = tall((self if self.triv == "expm" else Grassmannian()).to_manifold(V, X))
        return untall(refine_frame(Yt), tr)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``‖θ‖`` over the principal angles ``θ_i`` between the subspaces of ``X`` and ``Y``, batch-shaped."""
        self._check_pair(X, Y, "Y")
        Xt, Yt = tall(X)[0], tall(Y)[0]
        C = transpose(Xt) @ Yt  # a NaN/inf entry of X or Y reaches C: poison(C) (Note [NaN policy])
        cos = torch.linalg.svdvals(sanitize(C))  # descending
        # the sines from (I − XXᴴ)(Y − X): exactly 0 at Y = X, so is the gradient there (Note [Distances from
        # differences] in _orthogonal.py; Y − XC gave noise angles and a noise gradient of norm up to 2.8)
        D = Yt - Xt
        sin = torch.linalg.svdvals(sanitize(D - Xt @ (transpose(Xt) @ D))).flip(-1)  # ascending: paired with the cosines
        return torch.linalg.vector_norm(torch.atan2(sin, cos), dim=-1) + poison(C)[..., 0, 0]

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """The horizontal ``V`` at ``X`` with ``expmap(X, V)`` spanning ``Y``'s subspace, for principal
        angles below π/2 (at π/2, one of the minimizing geodesics' vectors; Note [The Grassmannian's
        geodesics]); exact first and second derivatives."""
        self._check_pair(X, Y, "Y")
        Xt, tr = tall(X)
        Yt = tall(Y)[0]
        E = empty_frame(Xt, Yt)
        if E is not None:
            return untall(E, tr)
        # Note [The Grassmannian's logarithm near the cut locus]
        # ‖M‖ = tan θ_max, so the eigenvalues of MᴴM spread over tan²θ_max and its small ones (the
        # other angles) were off by ε tan²θ_max where the map is conditioned like ε/(π/2 − θ_max):
        # float64 points at θ_max = π/2 − 1e-6 gave a logarithm 3e-5 off, π/2 − 1e-7 3e-3, π/2 − 1e-8
        # 1e4 and π/2 − 1e-10 1e78 (silently, finite); float32 ones 5e-3 off at π/2 − 1e-3, NaN from
        # π/2 − 1e-5. The logarithm is taken of the half-way subspace instead: with C = P cos Θ Qᴴ
        # and its polar factor W = P Qᴴ, Y − XC = U sin Θ Qᴴ and C + W = P (I + cos Θ) Qᴴ, so
        #   M½ = (Y − XC)(C + W)⁻¹ = U tan(Θ/2) Pᴴ,   log = U Θ Pᴴ = 2 M½ h(M½ᴴM½),
        # h(a) = arctan(√a)/√a as before. tan(θ/2) ≤ 1 and C + W has singular values 1 + cos θ ∈ [1, 2],
        # so nothing spreads: the error is W's, within the map's own conditioning (float64, one angle
        # near π/2: 2e-15 down to π/2 − 1e-12; two: ~ε/(π/2 − θ_max), 5e-11 at 1e-6, 2e-6 at 1e-10, as
        # for one angle of complex frames, whose phase is read from cos θ). W is `polar` (no singular
        # vectors in the derivatives: finite where angles repeat, at Y = X; exact first and second
        # derivatives). At
        # the cut locus itself (an angle of exactly π/2) W is one of the polar factors and the result
        # one of the minimizing geodesics' vectors (it was inf/NaN). Lower precisions still compute
        # in float64 (as SO's logarithm refines in float64), the result rounded back: the logarithm
        # of the rounded points is then exact to float32's rounding. Cost: one k×k SVD more (1.3–2×).
        wide = wide_dtype(Xt)
        Xw, Yw = Xt.to(wide), Yt.to(wide)
        C = transpose(Xw) @ Yw
        # (Y − XC)(C + W)⁻¹ by the inverse: solve's second derivatives are wrong under forward-mode nestings
        # (Note [Solves under torch.func] in geofunc/_linalg.py); C + W is k×k with condition number ≤ 2
        M = (Yw - Xw @ C) @ torch.linalg.inv_ex(C + polar(C))[0]
        H = spectral_eigh(transpose(M) @ M, lambda lam, Q: atan_ratio(lam))
        return untall((2 * (M @ H)).to(Xt.dtype), tr)
