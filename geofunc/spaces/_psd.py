"""Symmetric positive definite matrices."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from .._errors import error
from .._linalg import Triv, poison, sanitize, sym_part, wide_dtype
from ._base import _space_repr, cached_attribute, compute_cached
from ._factorized import EigSpace, spectral_eigh
from ._orthogonal import validate_triv
from ._values import POSITIVE_MAPS, Positive, normalize_f

__all__ = ["PSD"]

Tensor = torch.Tensor

_METRICS = ("embedded", "affine")


def _inv(X: Tensor) -> Tensor:
    """``X⁻¹``, NaN where ``X`` has a NaN/inf entry (Note [NaN policy]: the inverse of a matrix with inf on its
    diagonal is finite, so the affine metric at such a point was a finite number)."""
    return torch.linalg.inv_ex(sanitize(X))[0] + poison(X)


# The spectral maps of the affine-invariant metric: (g, g', g'') of the eigenvalues (Note [The metrics of PSD]).
def _sqrt(X: Tensor) -> Tensor:
    return spectral_eigh(X, lambda lam, Q: (lam.sqrt(), 0.5 * lam.rsqrt(), -0.25 * lam.rsqrt() / lam))


def _rsqrt(X: Tensor) -> Tensor:
    return spectral_eigh(X, lambda lam, Q: (lam.rsqrt(), -0.5 * lam.rsqrt() / lam, 0.75 * lam.rsqrt() / (lam * lam)))


def _roots(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(X^½, X^-½)`` from one decomposition: ``X^½ = X X^-½`` (the two commute)."""
    Ri = _rsqrt(X)
    return sym_part(X @ Ri), Ri


# Note [Affine maps of rounded points]
# X^-½ Y X^-½ has eigenvalues spread over cond(X)·cond(Y), so computed in float32 its small ones were
# off by ε·cond² where the affine maps of the (rounded) points are conditioned like ε·cond: dist 5e-2
# off at cond 1e4 and NaN at 1e5 for float32 members of the space, logmap and transport alike. For
# lower precisions dist, logmap and transport compute in float64 (as SO's and the Grassmannian's
# logarithms do) and round the result back; expmap, retract, inner and egrad_to_rgrad, within their
# conditioning in float32 (expmap 1e-5 at cond 1e4), and the optimizers' retraction, stay as they were.
# (wide_dtype in geofunc/_linalg.py: MPS, without float64, keeps its dtype.)


def _exp(X: Tensor) -> Tensor:
    return spectral_eigh(X, lambda lam, Q: (lam.exp(), lam.exp(), lam.exp()))


def _log(X: Tensor) -> Tensor:
    return spectral_eigh(X, lambda lam, Q: (lam.log(), 1.0 / lam, -1.0 / (lam * lam)))


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class PSD(EigSpace):
    r"""Symmetric positive definite matrices: :math:`\{X \in \mathbb{R}^{n\times n} : X = X^\top \succ 0\}`.

    ``X = Q diag(f(λ)) Qᵀ`` with ``Q = base · φ(skew(tril(Z, −1)))`` (the SO chart of :class:`Stiefel`),
    ``λ = diag(Z)``; ``f`` = ``"softplus"`` (``softplus + ε``, ε = √ε_dtype), a callable (then
    ``from_manifold`` raises) or a pair ``(f, f_inverse)`` — e.g. ``(torch.exp, torch.log)``.

    * ``from_manifold``: ``eigh``, ``diag(Z) = f⁻¹(μ)``, ``base = Q``; ``rebase`` keeps ``diag(Z)``.
    * ``logabsdet(Z, base) = Σ log f(λᵢ)`` (exact, O(n) after reading the diagonal).
    * ``tangent(X, G) = sym(G)`` (open in the symmetric matrices); ``project(Y)``: eigenvalues of
      ``sym(Y)`` clamped up to ``max(ε, 4ε_dtype√n·λ_max)`` (a member is kept; else a canonical point); ``retract(X, V) = project(X + V)``
      (``= X + V`` for small symmetric ``V``). ``sample``: ``Q diag(0.5 + t) Qᵀ``, ``Q`` Haar on O(n),
      ``t_i`` independent and uniform on ``((n − i + ½)/n, (n − i + 1)/n]``, i = 1..n.

    ``metric``: the Riemannian metric, which ``inner``, ``egrad_to_rgrad``, ``retract``, ``transport``
    and the geodesic maps (``expmap``, ``logmap``, ``dist``) follow (the chart, ``tangent`` and
    ``project`` do not depend on it; Note [The metrics of PSD]):

    * ``"embedded"`` (default, GeoTorch's): ``⟨U, V⟩ = tr(UV)``, the Riemannian gradient ``sym(G)``,
      ``retract`` as above, ``transport`` the identity on symmetric matrices. The cone is convex, so
      the geodesics are segments: ``logmap(X, Y) = Y − X``, ``dist = ‖Y − X‖_F``,
      ``expmap(X, V) = X + V`` (NaN where that leaves the cone: the metric is incomplete).
    * ``"affine"`` (the affine-invariant metric, geoopt's ``SymmetricPositiveDefinite`` default;
      Pennec, Fillard & Ayache 2006): ``⟨U, V⟩_X = tr(X⁻¹UX⁻¹V)``, the Riemannian gradient
      ``X sym(G) X``, ``retract(X, V) = project(X + V + ½VX⁻¹V)`` (second order; positive definite for
      every symmetric ``V``), ``expmap(X, V) = X^½ exp(X^-½ V X^-½) X^½``, ``logmap(X, Y) =
      X^½ log(X^-½ Y X^-½) X^½``, ``dist = ‖log(X^-½ Y X^-½)‖_F``, ``transport`` the parallel transport
      ``E V Eᵀ``, ``E = X^½ (X^-½ Y X^-½)^½ X^-½``. Complete: every pair has its geodesic.

    Complex tensors: Hermitian positive definite matrices ``Q diag(f(λ)) Qᴴ`` with ``Q`` unitary
    (the Unitary chart of the strict lower triangle: the column phases of ``Q`` do not change
    ``X``), ``λ = Re diag(Z)``, ``sym(G) = (G + Gᴴ)/2``; ``sample`` draws ``Q`` Haar on U(n)
    (Note [Complex]).

    Example::

        >>> X = PSD().to_manifold(torch.randn(3, 3))
        >>> bool((torch.linalg.eigvalsh(X) > 0).all())
        True
    """

    f: Any = "softplus"
    triv: Triv = "expm"
    metric: str = "embedded"
    accepts_complex: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "f", normalize_f(self, self.f, POSITIVE_MAPS))
        validate_triv(self, self.triv)
        if self.metric not in _METRICS:
            raise error(self, f"`metric` to be one of {', '.join(map(repr, _METRICS))}", repr(self.metric))
        compute_cached(self)  # not inside a compiled region (cached_attribute)

    def __repr__(self) -> str:  # the metric only where it is not the default: reprs stay as they were
        return _space_repr(self).replace(", metric='embedded'", "")

    # Note [The metrics of PSD]
    # Every map of the affine-invariant metric is written with spectral maps of symmetric (Hermitian)
    # matrices (spectral_eigh: X^½, X^-½, exp, log, √ with their first and second derivatives), never
    # with eigenvectors that autograd would differentiate: exact first and second derivatives under
    # every transform, also where eigenvalues repeat (X = I, Y = X). Inverses by inv (solve's and
    # slogdet's second derivatives are wrong under forward-mode nestings: Note [Solves under
    # torch.func] in geofunc/_linalg.py). With the embedded metric the cone is an open convex subset of
    # the symmetric matrices with their flat metric: segments are its geodesics.
    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """``sym(G)`` (embedded metric) or ``X sym(G) X`` (affine-invariant)."""
        if self.metric == "embedded":
            return super().egrad_to_rgrad(X, G)
        self._check_pair(X, G, "G")
        return sym_part(X @ sym_part(G) @ X)

    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """``Re tr(UᴴV)`` (embedded metric) or ``Re tr(X⁻¹UX⁻¹V)`` (affine-invariant), batch-shaped."""
        if self.metric == "embedded":
            return super().inner(X, U, V)
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        Xi = _inv(X)
        A, B = Xi @ U, Xi @ V
        out = (A * B.mT).sum(dim=(-2, -1))  # tr(AB)
        return out.real if out.is_complex() else out

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``project(X + V)`` (embedded metric) or ``project(X + V + ½ V X⁻¹ V)`` (affine-invariant,
        ``V`` read as ``sym(V)``: geoopt's retraction)."""
        if self.metric == "embedded":
            return super().retract(X, V)
        self._check_pair(X, V, "V")
        Vs = sym_part(V)
        return self.project(X + Vs + 0.5 * (Vs @ _inv(X) @ Vs))

    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """``sym(V)`` (embedded metric) or the affine-invariant parallel transport along the geodesic
        from ``X`` to ``Y``: ``X^½ M^½ (X^-½ V X^-½) M^½ X^½``, ``M = X^-½ Y X^-½``."""
        if self.metric == "embedded":
            return super().transport(X, Y, V)
        self._check_pair(X, Y, "Y")
        self._check_pair(X, V, "V")
        w = wide_dtype(X)  # Note [Affine maps of rounded points]
        R, Ri = _roots(X.to(w))
        E = _sqrt(Ri @ Y.to(w) @ Ri)
        return sym_part(R @ E @ sym_part(Ri @ V.to(w) @ Ri) @ E @ R).to(V.dtype)

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``X + sym(V)`` (embedded metric: NaN where that is not a point of the space, by
        :meth:`contains`) or ``X^½ exp(X^-½ V X^-½) X^½`` (affine-invariant)."""
        self._check_pair(X, V, "V")
        Vs = sym_part(V)
        if self.metric == "embedded":
            Y = X + Vs
            # the space's own test (its floor), not Cholesky's: a least eigenvalue of 1e-6 in float32 passed
            # Cholesky and was a finite matrix that contains and from_manifold refused
            with torch.no_grad():
                on = self.contains(Y.detach())
            return Y * torch.where(on, 1.0, torch.nan).to(Y.real.dtype)[..., None, None]
        R, Ri = _roots(X)
        return sym_part(R @ _exp(Ri @ Vs @ Ri) @ R)

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """``Y − X`` (embedded metric) or ``X^½ log(X^-½ Y X^-½) X^½`` (affine-invariant)."""
        self._check_pair(X, Y, "Y")
        if self.metric == "embedded":
            return sym_part(Y - X)
        w = wide_dtype(X)  # Note [Affine maps of rounded points]
        R, Ri = _roots(X.to(w))
        return sym_part(R @ _log(Ri @ Y.to(w) @ Ri) @ R).to(X.dtype)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``‖Y − X‖_F`` (embedded metric) or ``‖log(X^-½ Y X^-½)‖_F`` (affine-invariant), batch-shaped."""
        self._check_pair(X, Y, "Y")
        if self.metric == "embedded":
            return torch.linalg.matrix_norm(Y - X)
        w = wide_dtype(X)
        Ri = _rsqrt(X.to(w))  # Note [Affine maps of rounded points]
        # log λ as log1p(μ), μ the eigenvalues of X^-½ (Y − X) X^-½: exactly 0 at Y = X, so is the gradient
        # (Note [Distances from differences] in _orthogonal.py; X^-½ Y X^-½ gave noise of ~ε·cond(X))
        W = sym_part(Ri @ (Y.to(w) - X.to(w)) @ Ri)  # eigvalsh raises on NaN: sanitize, then poison (Note [NaN policy])
        mu = torch.linalg.eigvalsh(sanitize(W))
        # 1 + μ has lost a λ below ~ε (Y much smaller than X: μ = −1 exactly, log1p −inf, a distance of inf where it
        # is finite): those λ (μ < −½) are read from X^-½ Y X^-½ itself, whose ascending eigenvalues pair with μ's
        lam = torch.linalg.eigvalsh(sanitize(sym_part(Ri @ Y.to(w) @ Ri)))
        near = mu > -0.5  # (the unused branch's argument replaced: no 0·inf in either gradient)
        logs = torch.where(near, torch.log1p(torch.where(near, mu, torch.zeros_like(mu))),
                           torch.log(torch.where(near, torch.ones_like(lam), lam)))
        d = torch.linalg.vector_norm(logs, dim=-1) + poison(W)[..., 0, 0]
        return d.to(X.real.dtype)

    @cached_attribute
    def _value_map(self) -> Positive:
        return Positive(self.f)

    def _rank(self, n: int) -> int:
        return n
