"""Shared machinery of the factorized spaces (SVD type ``U diag(s) Vᵀ``, eigen type ``Q diag(λ) Qᵀ``).

Private. The concrete spaces (LowRank, FixedRank, GLp, AlmostOrthogonal, PSSDLowRank, PSSD,
PSSDFixedRank, PSD) are thin final dataclasses over the two abstract bases here.

Raw coordinates are packed into one tensor ``Z`` of the point's (tall) shape n×k, in disjoint
regions, as GeoTorch's frame does: the U-coordinates are the first r columns of the strict
lower triangle, the values the first r diagonal entries, the V-coordinates the strict upper
triangle of the first r rows (transposed). Only O((n + k) r) entries are read.

Frame charts. A square frame (r = rows) uses :class:`~geofunc.Stiefel`'s SO chart
``B φ(skew(tril(P, −1)))``. A tall frame's packed coordinates ``P`` (n×r: top r×r strictly lower,
bottom (n−r)×r free, exactly dim St(n, r) numbers) are read in an orthonormal basis adapted to
the base frame ``B`` (:func:`geofunc._linalg.stiefel_packed_chart`): the ambient direction is
``Δ = B tril(P_top, −1) + N P_bot`` with ``N`` the orthonormal complement of ``range(B)`` given by
a block Householder completion of ``B`` (from the polar factor of its top r×r block), applied
implicitly in O(n r²), then Stiefel's expm/Cayley chart at ``B``. So at every base (not only at
``I[:, :r]``, where this is GeoTorch's chart, nor only where ``B_top`` is invertible) the chart's
differential at ``P = 0`` is an isometry onto ``T_B St(n, r)`` (canonical metric), and one SGD
step on raw at zero followed by ``rebase`` is a Riemannian gradient step. Raw derivatives are
exact to all orders; derivatives in the base are exact to first order.

Spectral maps (``project``, ``retract``) and the frames used by ``tangent`` take their *value*
from a decomposition of the detached input and their *derivative* from the closed-form first
derivative (divided differences / Daleckii–Krein), added as a term that is exactly zero in value.
So they are right to rounding in value, exact to first order under every torch.func transform,
never NaN at repeated singular values or eigenvalues (where ``torch.linalg.svd``'s backward is),
but their second derivatives are not those of the map.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .._errors import describe, error
from .._linalg import haar_stiefel, stiefel_chart, stiefel_packed_chart, sym_part
from ._base import AbstractSpace, rounding_dtype
from ._orthogonal import tall, untall, validate_triv
from ._stiefel import Stiefel

Tensor = torch.Tensor
ValueMap = Callable[[Tensor], Tensor]

__all__ = ["SVDSpace", "EigSpace", "resolve_f", "floor_eps", "softplus_eps", "softplus_eps_inverse"]


# ------------------------------------------------------------------------- value maps f
def floor_eps(dtype: torch.dtype) -> float:
    """The floor of ``"softplus"``: √ε of the dtype (float32 3.5e-4, float64 1.5e-8).

    A singular value at the floor is still resolved to ~√ε relative accuracy for unit-scale
    matrices, so that rank and determinant sign stay numerically certain, also in float32.
    """
    dtype = rounding_dtype(dtype)  # a bf16 result keeps √ε of bf16 (Note [Low precision])
    out = _FLOOR_EPS.get(dtype)
    if out is None:
        out = _FLOOR_EPS[dtype] = math.sqrt(torch.finfo(dtype).eps)
    return out


_FLOOR_EPS: dict[torch.dtype, float] = {}  # torch.finfo costs microseconds per call


def softplus_eps(t: Tensor) -> Tensor:
    """``softplus(t) + ε`` with ``ε = floor_eps(dtype)``; linear above 20 (no overflow)."""
    return F.softplus(t) + floor_eps(t.dtype)


def softplus_eps_inverse(y: Tensor) -> Tensor:
    """Inverse of :func:`softplus_eps`: ``x + log(−expm1(−x))``, ``x = y − ε`` clamped up to the smallest
    normal number (so values at or below the floor give a finite, very negative coordinate)."""
    x = (y - floor_eps(y.dtype)).clamp(min=torch.finfo(y.dtype).tiny)
    return x + torch.log(-torch.expm1(-x))


def _below_one(y: Tensor) -> float:
    return 1.0 - torch.finfo(y.dtype).eps


def _asin(y: Tensor) -> Tensor:
    return torch.asin(y.clamp(-1.0, 1.0))


def _atanh(y: Tensor) -> Tensor:
    b = _below_one(y)
    return torch.atanh(y.clamp(-b, b))


def scaled_sigmoid(t: Tensor) -> Tensor:
    """``2σ(t) − 1 = tanh(t/2)``, accurate near 0."""
    return torch.tanh(0.5 * t)


def scaled_sigmoid_inverse(y: Tensor) -> Tensor:
    return 2.0 * _atanh(y)


POSITIVE_MAPS: dict[str, tuple[ValueMap, ValueMap]] = {"softplus": (softplus_eps, softplus_eps_inverse)}
UNIT_MAPS: dict[str, tuple[ValueMap, ValueMap]] = {
    "sin": (torch.sin, _asin),
    "tanh": (torch.tanh, _atanh),
    "sigmoid": (scaled_sigmoid, scaled_sigmoid_inverse),
    "scaled_sigmoid": (scaled_sigmoid, scaled_sigmoid_inverse),
}


def normalize_f(space: Any, f: Any, table: dict) -> Any:
    """Validate ``f`` (a name of ``table``, a callable or a pair ``(f, f_inverse)``); lists become tuples."""
    if isinstance(f, str):
        if f in table:
            return f
    elif callable(f):
        return f
    elif isinstance(f, (tuple, list)) and len(f) == 2 and callable(f[0]) and callable(f[1]):
        return tuple(f)
    names = ", ".join(repr(k) for k in table)
    raise error(space, f"`f` to be one of {names}, a callable or a pair (f, f_inverse) of callables", repr(f))


def resolve_f(f: Any, table: dict) -> tuple[ValueMap, Optional[ValueMap]]:
    """``(f, f_inverse)`` of a validated ``f``; ``f_inverse`` is None for a single callable."""
    if isinstance(f, str):
        return table[f]
    if callable(f):
        return f, None
    return f[0], f[1]


# --------------------------------------------------------------------------- helpers
def validate_rank(space: Any, rank: Any) -> None:
    """``rank`` must be an integer ≥ 1 (its upper bound min(n, k) is checked at the first call)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise error(space, "`rank` to be an integer ≥ 1", repr(rank))


def _finite_or_zero(X: Tensor, point_ndim: int = 2) -> tuple[Tensor, Tensor]:
    """``X`` with non-finite points replaced by 0 (LAPACK refuses them) and the batch mask of those points."""
    bad = ~torch.isfinite(X).flatten(start_dim=X.ndim - point_ndim).all(-1)
    return torch.where(bad[(...,) + (None,) * point_ndim], torch.zeros_like(X), X), bad


def _flag(bad: Tensor, v: Tensor) -> Tensor:
    """A violation measure that is +inf on non-finite points."""
    return torch.where(bad, torch.full_like(v, math.inf), v)


def rank_tol(smax: Tensor, n: int, k: int) -> Tensor:
    """Numerical rank tolerance ``4 ε √max(n, k) · σ₁``: singular values below it are rounding noise."""
    return 4.0 * torch.finfo(smax.dtype).eps * math.sqrt(max(n, k)) * smax


def _tie_tol(s: Tensor) -> Tensor:
    smax = s.abs().amax(-1, keepdim=True).clamp(min=1.0)
    return math.sqrt(torch.finfo(s.dtype).eps) * smax


def _divided(num: Tensor, dgi: Tensor, dgj: Tensor, den: Tensor, tol: Tensor) -> Tensor:
    """``num / den`` (a divided difference), ``(dgi + dgj)/2`` where ``|den| ≤ tol`` (ties)."""
    close = den.abs() <= tol
    return torch.where(close, 0.5 * (dgi + dgj), num / torch.where(close, torch.ones_like(den), den))


def spectral_svd(Y: Tensor, g_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """``U diag(g) Vᵀ`` for a tall ``Y = U diag(s) Vᵀ`` (thin SVD), ``(g, g') = g_fn(s, U, Vh)``.

    Value from the SVD of ``Y.detach()``; first derivative (exact, any transform) from
    ``dF = U (Sym(E) ∘ Δ⁻ + Skew(E) ∘ Δ⁺) Vᵀ + (I − UUᵀ) dY V diag(g/s) Vᵀ`` with
    ``E = Uᵀ dY V``, ``Δ⁻ᵢⱼ = (gᵢ − gⱼ)/(sᵢ − sⱼ)``, ``Δ⁺ᵢⱼ = (gᵢ + gⱼ)/(sᵢ + sⱼ)`` (``g'`` at ties).
    ``g`` may depend on the index (truncation) and on locally constant signs (det fixes).
    NaN/inf input gives NaN.
    """
    Y0 = Y.detach()
    Ys, _ = _finite_or_zero(Y0)
    U, s, Vh = torch.linalg.svd(Ys, full_matrices=False)
    g, dg = g_fn(s, U, Vh)
    g, dg = g.detach(), dg.detach()
    out = (U * g.unsqueeze(-2)) @ Vh
    D = Y - Y0  # zero in value (NaN where Y is not finite); carries every tangent
    V = Vh.mT
    E = U.mT @ D @ V
    tol = _tie_tol(s).unsqueeze(-1)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    gi, gj = g.unsqueeze(-1), g.unsqueeze(-2)
    dgi, dgj = dg.unsqueeze(-1), dg.unsqueeze(-2)
    dminus = _divided(gi - gj, dgi, dgj, si - sj, tol)
    dplus = _divided(gi + gj, dgi, dgj, si + sj, tol)
    K = 0.5 * (E + E.mT) * dminus + 0.5 * (E - E.mT) * dplus
    out = out + U @ K @ Vh
    if Y.shape[-2] > Y.shape[-1]:
        t = tol.squeeze(-1)
        ratio = torch.where(s > t, g / torch.where(s > t, s, torch.ones_like(s)), dg)
        R = D @ V - U @ E
        out = out + (R * ratio.unsqueeze(-2)) @ Vh
    return out


def spectral_eigh(Y: Tensor, g_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """``Q diag(g) Qᵀ`` for ``sym(Y) = Q diag(λ) Qᵀ`` (ascending), ``(g, g') = g_fn(λ, Q)``.

    Value from ``eigh`` of the detached symmetric part; exact first derivative
    ``Q (Qᵀ dS Q ∘ Γ) Qᵀ`` with the divided differences ``Γᵢⱼ = (gᵢ − gⱼ)/(λᵢ − λⱼ)`` (Daleckii–Krein;
    ``g'`` at ties). The result is exactly symmetric. NaN/inf input gives NaN.
    """
    S = sym_part(Y)
    S0 = S.detach()
    Ss, _ = _finite_or_zero(S0)
    lam, Q = torch.linalg.eigh(Ss)
    g, dg = g_fn(lam, Q)
    g, dg = g.detach(), dg.detach()
    out = sym_part((Q * g.unsqueeze(-2)) @ Q.mH)
    D = S - S0
    E = Q.mH @ D @ Q
    tol = _tie_tol(lam).unsqueeze(-1)
    gam = _divided(g.unsqueeze(-1) - g.unsqueeze(-2), dg.unsqueeze(-1), dg.unsqueeze(-2),
                   lam.unsqueeze(-1) - lam.unsqueeze(-2), tol)
    return out + sym_part(Q @ (E * gam) @ Q.mH)


def top_frames(X: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Orthonormal bases ``(U, V)`` of the top-r left/right singular subspaces of a tall ``X``.

    Value from the SVD of ``X.detach()``; first derivative ``dU = (I − UUᵀ) dX V S⁻¹``,
    ``dV = (I − VVᵀ) dXᵀ U S⁻¹``, exact (projector-wise) where ``X`` has rank r.
    """
    X0 = X.detach()
    Xs, _ = _finite_or_zero(X0)
    U, s, Vh = torch.linalg.svd(Xs, full_matrices=False)
    U, s, V = U[..., :r], s[..., :r], Vh[..., :r, :].mT
    t = rank_tol(s[..., :1], X.shape[-2], X.shape[-1]).clamp(min=torch.finfo(s.dtype).tiny)
    inv = torch.where(s > t, 1.0 / torch.where(s > t, s, torch.ones_like(s)), torch.zeros_like(s)).unsqueeze(-2)
    D = X - X0
    DV, DtU = D @ V, D.mT @ U
    return U + (DV - U @ (U.mT @ DV)) * inv, V + (DtU - V @ (V.mT @ DtU)) * inv


def top_eigframe(X: Tensor, r: int) -> Tensor:
    """Orthonormal basis ``Q`` of the top-r eigenspace of ``sym(X)`` (value from detached ``eigh``;
    ``dQ = (I − QQᵀ) dS Q Λ⁻¹``, exact where ``X`` is symmetric of rank r)."""
    S = sym_part(X)
    S0 = S.detach()
    Ss, _ = _finite_or_zero(S0)
    lam, Q = torch.linalg.eigh(Ss)
    lam, Q = lam[..., -r:], Q[..., -r:]
    t = rank_tol(lam.abs().amax(-1, keepdim=True), X.shape[-1], X.shape[-1]).clamp(min=torch.finfo(lam.dtype).tiny)
    inv = torch.where(lam.abs() > t, 1.0 / torch.where(lam.abs() > t, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    DQ = (S - S0) @ Q
    return Q + (DQ - Q @ (Q.mT @ DQ)) * inv.unsqueeze(-2)


def separated_values(batch: tuple[int, ...], r: int, generator, dtype, device) -> Tensor:
    """``r`` random values in (0, 1], descending, consecutive gaps ≥ 1/(2r): ``tᵢ = (r − i − ξᵢ/2)/r``."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if device is None and generator is not None:
        device = generator.device
    xi = torch.rand(batch + (r,), generator=generator, dtype=dtype, device=device)
    i = torch.arange(r, dtype=dtype, device=device)
    return (r - i - 0.5 * xi) / r


def _det_sign(A: Tensor) -> Tensor:
    return torch.linalg.slogdet(A)[0]


def flip_last_column(V: Tensor, d: Tensor) -> Tensor:
    """``V`` with its last column multiplied by ``d`` (batch-shaped ±1)."""
    ones = torch.ones_like(V[..., 0, :-1])
    return V * torch.cat([ones, d.unsqueeze(-1)], dim=-1).unsqueeze(-2)


def frame_chart_packed(st: Stiefel, P: Tensor, B: Optional[Tensor]) -> Tensor:
    """The frame ``U`` (n×r) of packed coordinates ``P`` at the base frame ``B`` (None: ``I[:, :r]``).

    Square (r = n): Stiefel's SO chart ``B φ(skew(tril(P, −1)))``. Tall: the coordinates are read
    in an orthonormal basis adapted to ``B`` (:func:`geofunc._linalg.stiefel_packed_chart`, block
    Householder completion, O(n r²)), so that the chart's differential at ``P = 0`` is an isometry
    at every base; at ``B = None`` this is GeoTorch's chart, built without an n×n identity and
    without the r×r polar decomposition that a base needs.
    """
    n, r = P.shape[-2], P.shape[-1]
    if n == r:
        return st.to_manifold(P, B)
    st._require_base(P, B)
    if B is None:
        return stiefel_chart(torch.eye(n, r, dtype=P.dtype, device=P.device), P, st.triv)
    return stiefel_packed_chart(B, P, st.triv)


def _nan_where_not_finite(*tensors: Optional[Tensor]) -> Tensor:
    """Per point: 0 where every entry of every given (n×k batch) tensor is finite, NaN elsewhere.

    ``0 ×`` the detached sums (one pass each, ~20× cheaper than ``isfinite(T).all()`` on CPU; a
    sum overflows only for entries ~1e34 in float32, where the point is not finite either):
    added to a result, it makes the result NaN exactly where its point is, with no autograd
    node and nothing in the backward (``torch.where`` on the result allocates in its backward).
    """
    out = None
    for T in tensors:
        if T is not None:
            t = T.detach()
            t = (t.abs() if t.is_complex() else t).sum(dim=(-2, -1))
            out = t if out is None else out + t
    assert out is not None
    return out * 0.0


def _log_values(space: Any, s: Tensor) -> Tensor:
    """``Σ log|f(sᵢ)|`` (no ``abs`` for a named map of ``POSITIVE_MAPS``, positive by
    construction: one autograd node less)."""
    v = space._values(s)
    positive = isinstance(space, PositiveValues) and isinstance(space.f, str)
    return torch.log(v if positive else v.abs()).sum(-1)


def _nan_like_batch(Z: Tensor) -> Tensor:
    """``0·ΣZ`` over the point dims: zero, but NaN where a raw entry is NaN/inf (for logabsdet)."""
    return 0.0 * Z.sum(dim=(-2, -1))


# ------------------------------------------------------------------------- SVD type
@dataclasses.dataclass(frozen=True)
class SVDSpace(AbstractSpace):
    """Abstract: ``X = U diag(σ(s)) Vᵀ`` with ``U ∈ St(n, r)``, ``V ∈ St(k, r)`` (tall form n ≥ k).

    A subclass sets ``triv`` (a field) and implements ``_rank(n, k)``, ``_values(s)``,
    ``_values_inverse(σ)``, ``_project_values(s, d)`` and ``_value_violations(σ, X)``;
    ``_square_only``, ``_det_positive(n, k)`` and ``_tangent_kind`` are static switches.
    """

    _square_only = False

    # ------------------------------------------------------------ hooks
    def _rank(self, n: int, k: int) -> int:
        raise NotImplementedError

    def _values(self, s: Tensor) -> Tensor:
        raise NotImplementedError

    def _values_inverse(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def _project_values(self, s: Tensor, r: int, d: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(g, g')`` of the singular values ``s`` (descending, all min(n, k) of them) for ``project``."""
        raise NotImplementedError

    def _value_violations(self, s: Tensor, r: int, n: int, k: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _det_positive(self, n: int, k: int) -> bool:
        return False

    def _tangent_kind(self, n: int, k: int) -> str:
        """``"fixed_rank"``, ``"identity"`` (open set) or ``"stiefel"``."""
        r = self._rank(n, k)
        return "identity" if r == min(n, k) else "fixed_rank"

    def _has_logabsdet(self, n: int, k: int) -> bool:
        return n == k == self._rank(n, k)

    # ------------------------------------------------------------ shapes
    def _init_frames(self) -> None:
        validate_triv(self, self.triv)  # type: ignore[attr-defined]
        object.__setattr__(self, "_stiefel", Stiefel(triv=self.triv))  # type: ignore[attr-defined]

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        n, k = self._require_matrix(X, what, square=self._square_only)
        self._rank_for(max(n, k), min(n, k), X, what)

    def _rank_for(self, n: int, k: int, X: Tensor, what: str) -> int:
        r = self._rank(n, k)
        if r > min(n, k):
            raise error(self, f"`{what}` of matrices with min(n, k) ≥ rank = {r}", f"shape {tuple(X.shape)}")
        return r

    def _sizes(self, X: Tensor) -> tuple[int, int, int]:
        n, k = max(X.shape[-2:]), min(X.shape[-2:])
        return n, k, self._rank(n, k)

    def _bases(self, base: Any, n: int, k: int, r: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if base is None:
            return None, None
        expected = f"`base` to be None or a pair (U, V) of frames of shapes (..., {n}, {r}) and (..., {k}, {r}) (tall form, as from_manifold returns)"
        if not isinstance(base, (tuple, list)) or len(base) != 2:
            raise error(self, expected, describe(base))
        for B, shape in zip(base, ((n, r), (k, r))):
            if B is not None and (not isinstance(B, torch.Tensor) or B.ndim < 2 or tuple(B.shape[-2:]) != shape):
                raise error(self, expected, f"({describe(base[0])}, {describe(base[1])})")
        return base[0], base[1]

    # ------------------------------------------------------------ the maps
    def _factors(self, Z: Tensor, base: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """``(U, s_raw, V, Zt, transposed)`` of a raw tensor."""
        self._check_shape(Z, "Z")
        Zt, tr = tall(Z)
        n, k = Zt.shape[-2:]
        r = self._rank(n, k)
        Ub, Vb = self._bases(base, n, k, r)
        Uc = torch.tril(Zt[..., :, :r], -1)
        Vc = torch.triu(Zt[..., :r, :], 1).mT
        s = torch.diagonal(Zt, dim1=-2, dim2=-1)[..., :r]
        st: Stiefel = self._stiefel  # type: ignore[attr-defined]
        return frame_chart_packed(st, Uc, Ub), s, frame_chart_packed(st, Vc, Vb), Zt, tr

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        U, s, V, _, tr = self._factors(Z, base)
        X = (U * (self._values(s) + (s - s)).unsqueeze(-2)) @ V.mT  # s − s: NaN for ±inf raw values
        return untall(X, tr)

    def _pack(self, s_raw: Tensor, n: int, k: int, tr: bool) -> Tensor:
        r = s_raw.shape[-1]
        Zt = F.pad(torch.diag_embed(s_raw), (0, k - r, 0, n - r))
        return untall(Zt, tr)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        Xt, tr = tall(X)
        n, k = Xt.shape[-2:]
        r = self._rank(n, k)
        U, s, Vh = torch.linalg.svd(_finite_or_zero(Xt)[0], full_matrices=False)
        U, s, V = U[..., :r], s[..., :r], Vh[..., :r, :].mT
        if self._det_positive(n, k):
            V = flip_last_column(V, _det_sign(U) * _det_sign(V))
        nan = _nan_like_batch(Xt)  # NaN points stay NaN (under transforms, where no check runs)
        return self._pack(self._values_inverse(s) + nan[..., None], n, k, tr), (U + nan[..., None, None], V + nan[..., None, None])

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """Keep the value coordinates, move the U/V coordinates into the bases (no SVD)."""
        U, s, V, Zt, tr = self._factors(Z, base)
        return self._pack(s, Zt.shape[-2], Zt.shape[-1], tr), (U, V)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        Xt, tr = tall(X)
        Gt = tall(G)[0]
        n, k = Xt.shape[-2:]
        kind = self._tangent_kind(n, k)
        if kind == "identity":
            return G + 0.0 * X
        if kind == "stiefel":
            return untall(Gt - Xt @ sym_part(Xt.mT @ Gt), tr)
        U, V = top_frames(Xt, self._rank(n, k))
        UG = U.mT @ Gt
        GV = Gt @ V
        return untall(U @ UG + (GV - U @ (UG @ V)) @ V.mT, tr)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_pair(X, V, "V")
        return self.project(X + V)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        Yt, tr = tall(Y)
        n, k = Yt.shape[-2:]
        r = self._rank(n, k)
        det = self._det_positive(n, k)

        def g_fn(s: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
            d = _det_sign(U) * _det_sign(Vh) if det else None
            return self._project_values(s, r, d)

        return untall(spectral_svd(Yt, g_fn), tr)

    def sample(self, shape, *, generator=None, dtype=None, device=None) -> Tensor:
        shape = self._sample_shape(shape, dtype)
        tr = shape[-2] < shape[-1]
        n, k = max(shape[-2:]), min(shape[-2:])
        r = self._rank(n, k)
        batch = shape[:-2]
        U = haar_stiefel(batch + (n, r), generator, dtype, device)
        V = haar_stiefel(batch + (k, r), generator, dtype, device)
        t = separated_values(batch, r, generator, dtype, U.device)
        if self._det_positive(n, k):
            V = flip_last_column(V, _det_sign(U) * _det_sign(V))
        return untall((U * self._sample_values(t).unsqueeze(-2)) @ V.mT, tr)

    def _sample_values(self, t: Tensor) -> Tensor:
        """Singular values of samples from separated ``t`` in (0, 1]: (0.5, 1.5] by default."""
        return 0.5 + t

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``Σ log|σᵢ|`` of the value coordinates (n = k = rank only): O(n) after the raw map."""
        self._check_shape(Z, "Z")
        n, k = Z.shape[-2:]
        if not self._has_logabsdet(n, k):
            raise error(self, "square raw tensors of full rank (n = k = rank) for logabsdet", f"shape {tuple(Z.shape)}")
        r = self._rank(n, k)
        Ub, Vb = self._bases(base, n, k, r)
        # NaN/inf anywhere in Z or a base makes the point NaN: say so, without adding a
        # full-matrix term to the backward.
        return _log_values(self, torch.diagonal(Z, dim1=-2, dim2=-1)) + _nan_where_not_finite(Z, Ub, Vb)

    # ------------------------------------------------------------ membership
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        Xs, bad = _finite_or_zero(X)
        s = torch.linalg.svdvals(Xs)
        n, k, r = self._sizes(X)
        out = {"non-finite entries (inf if any)": _flag(bad, torch.zeros_like(s[..., 0]))}
        out.update({name: _flag(bad, v) for name, v in self._value_violations(s, r, n, k).items()})
        if self._det_positive(n, k):
            sign = torch.linalg.slogdet(Xs)[0]
            out["det(X) ≤ 0 (inf if so)"] = _flag(bad, torch.where(sign > 0, torch.zeros_like(sign), torch.full_like(sign, math.inf)))
        return out


def excess_violation(s: Tensor, r: int) -> dict[str, Tensor]:
    """``σ_{r+1}/max(1, σ₁)``: the singular values past the rank must vanish (relative to the norm)."""
    if s.shape[-1] <= r:
        return {}
    scale = s[..., 0].clamp(min=1.0)
    return {f"σ_(rank+1)/max(1, σ_1) (rank {r})": s[..., r] / scale}


def floor_violation(s_r: Tensor, smax: Tensor, floor: float, n: int, k: int) -> dict[str, Tensor]:
    """The smallest kept value must be clearly positive: ``max(0, c − σ_r)/c`` with
    ``c = max(0.999·floor − δ, δ)``, ``δ = ε √max(n, k) · σ₁`` the rounding error of a computed
    singular value (``floor`` = the floor of the value map, 0 for a user map).

    ``δ`` is subtracted from the floor because a point that ``to_manifold`` built with its
    smallest value exactly at the floor has a *computed* ``σ_r`` off by up to ``δ``: with
    ``σ₁ ~ 100`` in float32 (raw values ~50) that is a third of the floor, and without the
    slack ``from_manifold`` rejected the library's own points. ``σ_r > δ`` still means the
    rank is numerically certain.
    """
    delta = torch.finfo(rounding_dtype(s_r.dtype)).eps * math.sqrt(max(n, k)) * smax
    c = torch.maximum(0.999 * floor - delta, delta).clamp(min=torch.finfo(s_r.dtype).tiny)
    return {"(c − σ_rank)/c, c = max(floor of f − δ, δ), δ = ε√n·σ₁": (c - s_r).clamp(min=0.0) / c}


def clamp_level(smax: Tensor, floor: float) -> Tensor:
    """Where ``project`` of an open space clamps values up to: ``max(floor, √ε · max(1, σ₁))``
    (``smax`` of shape (..., 1)), far above the numerical rank tolerance."""
    return (math.sqrt(torch.finfo(rounding_dtype(smax.dtype)).eps) * smax.abs().clamp(min=1.0)).clamp(min=floor)


def value_floor(f: Any, dtype: torch.dtype) -> float:
    """The floor of the value map: ``floor_eps`` for ``"softplus"``, 0 for a user map."""
    return floor_eps(dtype) if isinstance(f, str) and f == "softplus" else 0.0


def positive_project_values(s: Tensor, keep: Tensor, floor: float, d: Optional[Tensor] = None,
                            last: int = -1) -> tuple[Tensor, Tensor]:
    """``(g, g')`` for the open spaces: kept values clamped up to :func:`clamp_level`, others 0.

    With ``d`` (the sign det(U)·det(V) of a square full-rank SVD), the value at index ``last``
    (the smallest) becomes ``−c`` where ``d < 0``: the nearest point of the closure of the
    det > 0 component, pushed inside by ``c``.
    """
    c = clamp_level(s.abs().amax(-1, keepdim=True), floor)
    g = torch.where(keep, torch.maximum(s, c), torch.zeros_like(s))
    dg = (keep & (s > c)).to(s.dtype)
    if d is not None:
        neg = (d < 0).unsqueeze(-1) & (torch.arange(s.shape[-1], device=s.device) == (s.shape[-1] + last) % s.shape[-1])
        g = torch.where(neg, -c.expand_as(s), g)
        dg = torch.where(neg, torch.zeros_like(dg), dg)
    return g, dg


def missing_inverse(space: Any, f: Any) -> Exception:
    return error(space, "`f` given as a pair (f, f_inverse) (or a name) so that from_manifold can invert it",
                 f"the single callable {f!r}: no inverse was given")


class PositiveValues:
    """Mixin of the spaces whose kept values are ``f(t) > 0`` (GLp, FixedRank, PSD, PSSDFixedRank):
    ``f`` is the dataclass field of the space, a name of ``POSITIVE_MAPS``, a callable or a pair."""

    def _values(self, t: Tensor) -> Tensor:
        return resolve_f(self.f, POSITIVE_MAPS)[0](t)  # type: ignore[attr-defined]

    def _values_inverse(self, v: Tensor) -> Tensor:
        inv = resolve_f(self.f, POSITIVE_MAPS)[1]  # type: ignore[attr-defined]
        if inv is None:
            raise missing_inverse(self, self.f)  # type: ignore[attr-defined]
        return inv(v)


# ----------------------------------------------------------------------- eigen type
@dataclasses.dataclass(frozen=True)
class EigSpace(AbstractSpace):
    """Abstract: ``X = Q diag(f(λ)) Qᵀ`` with ``Q ∈ St(n, r)`` (square points).

    A subclass sets ``triv`` and implements ``_rank(n)``, ``_values``, ``_values_inverse``,
    ``_project_values(λ ascending, r)`` and ``_value_violations(λ ascending, r, n)``.
    """

    _smooth_values = True

    def _rank(self, n: int) -> int:
        raise NotImplementedError

    def _values(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    def _values_inverse(self, mu: Tensor) -> Tensor:
        raise NotImplementedError

    def _project_values(self, lam: Tensor, r: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _value_violations(self, lam: Tensor, r: int, n: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _init_frames(self) -> None:
        validate_triv(self, self.triv)  # type: ignore[attr-defined]
        object.__setattr__(self, "_stiefel", Stiefel(triv=self.triv))  # type: ignore[attr-defined]

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        n, _ = self._require_matrix(X, what, square=True)
        r = self._rank(n)
        if r > n:
            raise error(self, f"`{what}` with n ≥ rank = {r}", f"shape {tuple(X.shape)}")

    def _base(self, base: Any, n: int, r: int) -> Optional[Tensor]:
        if base is None:
            return None
        if not isinstance(base, torch.Tensor) or base.ndim < 2 or tuple(base.shape[-2:]) != (n, r):
            raise error(self, f"`base` to be None or a frame Q of shape (..., {n}, {r}) (as from_manifold returns)", describe(base))
        return base

    def _factors(self, Z: Tensor, base: Any) -> tuple[Tensor, Tensor]:
        self._check_shape(Z, "Z")
        n = Z.shape[-1]
        r = self._rank(n)
        Qb = self._base(base, n, r)
        Qc = torch.tril(Z[..., :, :r], -1)
        lam = torch.diagonal(Z, dim1=-2, dim2=-1)[..., :r].real  # complex Z: the real part (Hermitian X)
        st: Stiefel = self._stiefel  # type: ignore[attr-defined]
        return frame_chart_packed(st, Qc, Qb), lam

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        Q, lam = self._factors(Z, base)
        return sym_part((Q * (self._values(lam) + (lam - lam)).unsqueeze(-2)) @ Q.mH)  # NaN for ±inf raw values

    def _pack(self, lam_raw: Tensor, n: int) -> Tensor:
        r = lam_raw.shape[-1]
        return F.pad(torch.diag_embed(lam_raw), (0, n - r, 0, n - r))

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        n = X.shape[-1]
        r = self._rank(n)
        lam, Q = torch.linalg.eigh(_finite_or_zero(sym_part(X))[0])
        lam, Q = lam[..., -r:].flip(-1), Q[..., -r:].flip(-1)  # top r, descending
        nan = _nan_like_batch(X.abs() if X.is_complex() else X)
        return self._pack(self._values_inverse(lam) + nan[..., None], n).to(X.dtype), Q + nan[..., None, None]

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """Keep the eigenvalue coordinates, move the Q coordinates into the base (no eigh)."""
        Q, lam = self._factors(Z, base)
        return self._pack(lam, Z.shape[-1]).to(Z.dtype), Q

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        n = X.shape[-1]
        r = self._rank(n)
        Gs = sym_part(G)
        if r == n:
            return Gs + 0.0 * X
        Q = top_eigframe(X, r)
        QG = Q.mT @ Gs
        return sym_part(2.0 * Q @ QG - Q @ (QG @ Q) @ Q.mT)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_pair(X, V, "V")
        return self.project(X + V)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        r = self._rank(Y.shape[-1])
        return spectral_eigh(Y, lambda lam, Q: self._project_values(lam, r))

    def sample(self, shape, *, generator=None, dtype=None, device=None) -> Tensor:
        shape = self._sample_shape(shape, dtype)
        n = shape[-1]
        r = self._rank(n)
        Q = haar_stiefel(shape[:-2] + (n, r), generator, dtype, device)
        t = separated_values(shape[:-2], r, generator, Q.real.dtype, Q.device)
        return sym_part((Q * (0.5 + t).unsqueeze(-2)) @ Q.mH)

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``Σ log|f(λᵢ)|`` of the eigenvalue coordinates (rank = n only): O(n) after the raw map."""
        self._check_shape(Z, "Z")
        n = Z.shape[-1]
        r = self._rank(n)
        if r != n:
            raise error(self, "a full-rank space (rank = n) for logabsdet", f"rank {r} for shape {tuple(Z.shape)}")
        Qb = self._base(base, n, r)
        return _log_values(self, torch.diagonal(Z, dim1=-2, dim2=-1).real) + _nan_where_not_finite(Z, Qb)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        Xs, bad = _finite_or_zero(X)
        S = sym_part(Xs)
        lam = torch.linalg.eigvalsh(S)
        n = X.shape[-1]
        scale = lam.abs().amax(-1).clamp(min=1.0)
        out = {"max|X − Xᵀ|/max(1, ‖X‖₂)": (Xs - Xs.mH).abs().amax(dim=(-2, -1)) / scale}
        out.update(self._value_violations(lam, self._rank(n), n))
        return {name: _flag(bad, v) for name, v in out.items()}


def eig_excess_violations(lam: Tensor, r: int, n: int) -> dict[str, Tensor]:
    """PSSD of rank ≤ r: no eigenvalue below 0 and the n − r smallest vanish (relative to ‖X‖₂)."""
    scale = lam.abs().amax(-1).clamp(min=1.0)
    out = {"max(0, −λ_min)/max(1, ‖X‖₂)": (-lam[..., 0]).clamp(min=0.0) / scale}
    if r < n:
        out[f"max|λ_(n−rank)|/max(1, ‖X‖₂) (rank {r})"] = lam[..., : n - r].abs().amax(-1) / scale
    return out
