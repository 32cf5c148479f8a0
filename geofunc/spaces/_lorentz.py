"""The Lorentz (hyperboloid) model: hyperbolic space of curvature −1/k in Minkowski space."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, final

import torch

from .._errors import error
from ..hyperbolic import _arcoshc, _ARG_MAX, _cap, _cosh, _scaled, _sinhc
from .._linalg import _randn, poison, wide_dtype
from ._base import AbstractSpace, real_hyperparameter, rounding_dtype

__all__ = ["Lorentz"]

Tensor = torch.Tensor


def _gaussian(shape: tuple[int, ...], generator: Optional[torch.Generator], dtype: Optional[torch.dtype], device) -> Tensor:
    """A standard Gaussian of ``shape`` from ``generator`` (on its device unless ``device`` is given)."""
    return _randn(shape, generator, dtype, device)  # Note [No generator=None]


def _max_distance(dtype: torch.dtype) -> float:
    """``T``: points are kept within distance ``T√k`` of the origin (Note [the hyperboloid's precision]).

    ``T = min(½ log(1/ε) + log 2, log(max) − 4)`` with ``ε`` and ``max`` of the dtype the result is
    stored in (a bfloat16/float16 result is computed in float32: Note [the hyperboloid in low
    precision]): 8.66 in float32, 18.7 in float64, 3.12 in bfloat16, 4.16 in float16 (the overflow
    term binds for none of them).
    """
    stored = torch.finfo(rounding_dtype(dtype))
    return min(0.5 * math.log(1.0 / stored.eps) + math.log(2.0), math.log(stored.max) - 4.0)


# Note [the hyperboloid's precision]
# A point at distance d from the origin has coordinates of size x₀ ≈ √k e^{d/√k}/2, and the
# Minkowski forms that measure anything near it (⟨x − y, x − y⟩_L for distances, ⟨x, v⟩_L for
# tangency) are differences of terms of size x₀²|·|², so their relative rounding error is ε·x₀²
# (k = 1). At x₀ = 1/√ε it is 1: nothing about the neighbourhood of the point is resolved any
# more, and an optimizer's momentum, transported there, grows by that factor every step until
# it overflows (observed: rsgd with momentum on random gradients, NaN after 15 steps with a
# cap at the float64 overflow limit). So every point returned is kept at x₀ ≤ √k/√ε, i.e. at
# distance ≤ T√k with T = ½ log(1/ε) + log 2. PoincareBall resolves more (14.6 in float32).
# There the stored point itself still resolves its neighbourhood to √ε (its rounding moves it by
# up to ε x₀, across the radius), the floor the open spaces keep too (Note [Low precision] in
# spaces/_base.py); ε is that of the dtype the point is stored in (Note [the hyperboloid in low
# precision]).


# Note [the hyperboloid in low precision]
# A bfloat16/float16 point is computed in float32 and rounded (Note [Low precision] in
# spaces/_base.py), and so is an optimizer's momentum; both are read back from the rounded copy.
# Two things followed, measured with rsgd (momentum 0.9) minimizing d(x, t)²/2:
# 1. The clamp was computed with float32's ε (T = 8.66 in bfloat16, 7.09 in float16 from the
#    overflow term), where a stored bfloat16 point at x₀ = 2896 is off the hyperboloid by up to
#    ε x₀² (9e3 measured) and its rounding can move it by 6 across the radius (ε x₀ = 23 to first
#    order): it resolves nothing, and rsgd with momentum ran there and on to NaN. T now takes ε of
#    the stored dtype (rounding_dtype; Note [the hyperboloid's precision]): 3.12 in bfloat16, 4.16
#    in float16, the distances at which a stored point still resolves √ε (0.09, 0.03).
# 2. The stored x₀ carries a rounding of ε x₀, so ⟨x, x⟩_L + k is off by ~ε x₀², and every
#    Minkowski form evaluated at the stored point (⟨x − y, x − y⟩_L in dist and logmap, the
#    transport's ⟨D, V⟩_L, tangency) inherits that error; so does ⟨u, v⟩_L from the rounding of the
#    time coordinates u₀, v₀ of tangent vectors (≲ ε x₀²‖u‖_L‖v‖_L). So in a bfloat16/float16
#    call a point is read as the lift (√(k + ‖x̄‖²), x̄) of its stored spatial part (the float32
#    point on the hyperboloid within rounding of the stored one; not capped: an input is read as
#    precisely as it is stored) and a tangent vector at it as (⟨x̄, v̄⟩/x₀, v̄), as expmap reads it
#    anyway (Note [the exponential map through the origin]). The rounding of v̄ (≤ ε x₀‖v‖_L) then
#    meets ū − (⟨x̄, ū⟩/x₀²) x̄, of size ≤ ‖u‖_L, so ⟨u, v⟩_L is off by ≲ ε x₀‖u‖_L‖v‖_L (float16 at
#    x₀ = 7.4: 0.23 in 355, against 13.5 before). On points and tangent vectors both readings are the
#    identity in exact arithmetic, so derivatives along the space are unchanged; in float32 and
#    float64 they are skipped (a dtype test).
# Before (d(o, t) = 4, 150 steps): bfloat16 ended at the clamp 8.66, 8.0 from t; float16 NaN (and
# NaN within 1–170 steps on random gradients, in both). After: within 0.014 (bfloat16, d(o, t) ≤ 3)
# and 0.003 (float16, d(o, t) ≤ 4) of the float64 run, at the clamp's sphere (d(x, t) = d(o, t) − T)
# for farther targets, finite on random gradients (tests/test_hyperbolic.py). Limit: in float16 a
# tangent vector at x₀ has ambient entries up to ~x₀ times its length, and egrad_to_rgrad scales a
# Euclidean gradient by up to ~x₀² (1024 at the clamp), so a momentum buffer of random Euclidean
# gradients with entries N(0, 10²) at the clamp overflowed float16 within 10 steps (inf, then NaN:
# never a plausible point; entries N(0, 1): finite for 300 steps).


# Note [the hyperboloid's pair maps in double precision]
# dist, logmap and transport measure a pair through ⟨y − x, y − x⟩_L and ⟨y − x, v⟩_L, whose
# rounding is ε x₀² relative (Note [the hyperboloid's precision]); the clamp keeps the points the
# space returns where that is ≤ 1, but `contains` accepts any point, and a float32 point beyond it
# (built elsewhere, or converted) got garbage without a word: at distance 12 from the origin,
# dist and logmap of a pair 0.01 apart were 133% off (distance 8, inside the clamp: 9%), the
# transport 5.5× off (ambient norm), and the stored x₀ (off the hyperboloid by ε x₀²) put the same
# error into far pairs. So for float32 (and bfloat16/float16, computed in float32) these three
# maps read each point as the float64 lift (√(k + ‖x̄‖²), x̄) of its stored spatial part, and a
# tangent vector as (⟨x̄, v̄⟩/x₀, v̄) (as Note [the hyperboloid in low precision] does in float32),
# compute in float64 and round back: ε x₀²/k is then ≤ 2e-9 up to distance 8.66√k, 1.5e-6 at
# 12√k and ≤ 1 up to 18.7√k (float64's own clamp), so float32 pairs match 60-digit values of the
# same stored inputs to ≤ 2e-6 relative up to 12√k (tests/test_hyperbolic.py). dist and logmap no
# longer evaluate ⟨y − x, y − x⟩_L, which still cancelled along a ray (Note [the hyperboloid's distance
# without cancellation]), nor does transport read ⟨y − x, v⟩_L (Note [the hyperboloid's transport
# without cancellation]). On points and
# tangent vectors the readings are the identity in exact arithmetic, so Riemannian gradients are
# unchanged. MPS has no float64: there they compute as before. Cost (CPU, 1 thread, 1024 points
# in H⁷): dist 69 → 176 µs, logmap 117 → 213 µs, transport 68 → 215 µs.


# Note [Derivatives at the boundary of a clamp]
# Minkowski forms that are ≥ 0 in exact arithmetic are clamped at 0 against rounding: ⟨x − y,
# x − y⟩_L (0 at y = x), and formerly ⟨v, v⟩_L of a tangent vector in expmap (0 at the chart
# centre v = 0, the point where every step after a rebase is differentiated; expmap now takes θ²
# as a sum of squares, Note [the exponential map through the origin]). The clamp's derivative
# exactly at its bound is a convention that torch changed: 1 up to 2.13, 0 from 2.14 (and 0.5 for
# a tensor bound), so on torch 2.14 the hessian of the chart at its centre lost the cosh″ term (2.3
# off in float64; tests/test_conformance.py's hessian at Z = 0 caught it). These forms are
# quadratic at 0, so their first derivative vanishes there either way, but the second does not:
# _nonneg keeps the identity's derivative at 0 on every version (where(t < 0, 0, t) selects t
# itself at 0), and no other clamp may sit at such a point.
def _nonneg(t: Tensor) -> Tensor:
    """``max(t, 0)`` with derivative 1 at ``t = 0`` on every torch version (NaN stays NaN)."""
    return torch.where(t < 0, torch.zeros_like(t), t)


# Note [the exponential map through the origin]
# exp_x(v) = cosh θ x + sinh θ v/θ (θ = ‖v‖_L/√k; k = 1 below) adds terms of size x₀ sinh θ that
# cancel to a point of size y₀ when the geodesic heads back toward the origin, so θ must agree with
# the v it multiplies to ~ε. But θ² = ‖v̄‖² − v₀² is itself a difference of terms of size (θx₀)²:
# its relative error ~ε x₀² put the sum off the geodesic by ~ε x₀³ sinh θ. In float64 at
# d(o, x) = 12, exp_x(log_x(y)) for y at d(o, y) = 8.4 was 24 away from y, where the exact map of
# the same stored v is 1.7e-3 away (float32 at d = 6: 11 against 3.9e-2); the error was up to 1e7
# times the map's own conditioning. So the map goes through the origin. The boost B_x (the isometry
# o ↦ x that fixes the directions orthogonal to x̄) takes v to w = B_x⁻¹v = (0, v̄ − βx̄) with
# β = ⟨x̄, v̄⟩/(x₀(x₀ + 1)) (v₀ = ⟨x̄, v̄⟩/x₀ by tangency), θ = ‖w‖ is a sum of squares, and
#   exp_x(v) = B_x exp_o(w):   ȳ = z̄ + (⟨x̄, z̄⟩/(x₀ + 1) + cosh θ) x̄,   z̄ = sinh θ w/θ
# (with k: β = ⟨x̄, v̄⟩/(x₀(x₀ + √k)), θ = ‖w‖/√k, ⟨x̄, z̄⟩/(√k(x₀ + √k))). Whatever w's rounding,
# this is the exact exponential of the tangent vector B_x w, so θ and the direction always agree:
# an error of w along the geodesic moves the point along it (by ~ε x₀ θ), one across it is of
# the size of v's own rounding (ε‖v‖ ~ ε x₀ θ, which exp_x amplifies by sinh θ/θ). What is left is
# the rounding of the two terms of ȳ, ~ε x₀ sinh θ: the map's own conditioning (measured: at most
# 3·ε x₀ sinh θ from the exact map of the same stored x, v, against up to 1e7· before;
# tests/test_hyperbolic.py). The map reads v̄ alone (v₀ is implied by tangency, as the result's
# ȳ₀ is by the hyperboloid), and in exact arithmetic it is the same function of a tangent v, so
# derivatives in v (and in Z of to_manifold) are unchanged. At the origin (base None, sample)
# x̄ = 0 and it is z̄ alone.
def _minkowski(U: Tensor, V: Tensor) -> Tensor:
    """``⟨U, V⟩_L = −U₀V₀ + Σ_{i≥1} U_i V_i`` along the last dim, keepdim."""
    P = U * V
    return P[..., 1:].sum(-1, keepdim=True) - P[..., :1]


def _flip(X: Tensor) -> Tensor:
    """``J X`` with ``J = diag(−1, 1, …, 1)``."""
    return torch.cat([-X[..., :1], X[..., 1:]], dim=-1)


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Lorentz(AbstractSpace):
    r"""The hyperboloid model of hyperbolic space of curvature :math:`-1/k` (last dimension).

    .. math::

        \mathbb{H}^n_k = \{x \in \mathbb{R}^{n+1} : \langle x, x\rangle_L = -k,\ x_0 > 0\}, \qquad
        \langle u, v\rangle_L = -u_0 v_0 + \textstyle\sum_{i \ge 1} u_i v_i

    with the metric :math:`\langle\cdot,\cdot\rangle_L` on the tangent spaces
    :math:`T_x = \{v : \langle x, v\rangle_L = 0\}`. Points are ``(*batch, n + 1)`` tensors,
    ``n ≥ 1``; the origin is :math:`o = (\sqrt k, 0, \dots, 0)`.
    :func:`geofunc.hyperbolic.lorentz_to_poincare` (with ``c = 1/k``) is the isometry to
    :class:`PoincareBall`.

    * ``to_manifold(Z, base) = expmap(base, tangent(base, Z))``: the raw vector is made
      tangent by the Euclidean orthogonal projection onto :math:`T_{\text{base}}` (at the
      origin: ``Z₀`` is dropped), then
      :math:`\exp_x(v) = \cosh(\|v\|_L/\sqrt k)\,x + \sqrt k\sinh(\|v\|_L/\sqrt k)\,v/\|v\|_L`,
      evaluated as power series in :math:`\|v\|_L^2` near 0 (smooth at ``Z = 0``, every
      order). ``base=None`` is the origin.
    * ``from_manifold(X) = (0, X)``; ``rebase(Z, base) = (0, to_manifold(Z, base))``.
    * ``tangent(X, G) = G − (⟨x, G⟩_L/‖x‖²) Jx`` (``J = diag(−1, 1, …, 1)``, ``Jx`` the
      Euclidean normal): the Euclidean orthogonal projection onto :math:`T_x`.
    * ``egrad_to_rgrad(X, G) = JG + (⟨x, G⟩/k) x``: the Riemannian gradient for the
      Minkowski metric (``⟨egrad_to_rgrad(X, G), V⟩_L = ⟨G, V⟩`` for tangent ``V``);
      ``inner(X, U, V) = ⟨U, V⟩_L``.
    * ``retract(X, V) = expmap(X, tangent(X, V))`` (exact for tangent ``V``); ``transport``:
      parallel transport :math:`v + \frac{\langle y - x, v\rangle_L}{k - \langle x, y\rangle_L}(x + y)`;
      ``dist`` :math:`= \sqrt k\,\operatorname{arcosh}(-\langle x, y\rangle_L/k)`, evaluated as
      ``arcosh(1 + u)``, :math:`u = \langle x - y, x - y\rangle_L / 2k` (no cancellation for
      nearby points); ``logmap`` :math:`= \frac{d}{\sqrt k \sinh(d/\sqrt k)}\,(y - x - u\,x)`.
    * ``project(Y) = (√(k + ‖Ȳ‖²), Ȳ)`` (``Ȳ = Y[..., 1:]``): the vertical projection onto the
      upper sheet, which fixes points; every map that returns a point ends with it, so
      rounding never drifts off the hyperboloid. It is a canonical point, not the Euclidean
      nearest one.
    * ``sample``: the wrapped normal at the origin, ``expmap(o, (0, v))``, ``v ~ N(0, I/n)``
      (Riemannian units: ``d(o, x) = ‖v‖``, ``E d(o, x)² = 1``); rotation invariant.

    ``expmap`` goes through the origin (``B_x exp_o(B_x⁻¹ v)`` with the boost ``B_x``: Note [the
    exponential map through the origin]), so its error is that of the map's own conditioning,
    ``~ε x₀ sinh(‖v‖_L/√k)``, and it reads the spatial part ``v̄`` of ``v`` (``v₀`` is implied by tangency).

    Stated clamps: ``‖v‖_L/√k`` is capped at 40 in ``expmap`` (``v`` rescaled along itself, so the
    direction is the exact one; no intermediate overflows for any finite ``v``), and every point
    returned is kept within distance ``T√k`` of the origin
    (``‖x̄‖ ≤ √k sinh T``, ``T = ½ log(1/ε) + log 2``: 8.66 in float32, 18.7 in float64, 3.12 in
    bfloat16, 4.16 in float16, with ``ε`` of the stored dtype), beyond which the rounding of
    ``⟨·,·⟩_L`` exceeds the quantities it measures (relative error ``ε x₀²``). In a bfloat16/float16
    call a point argument is read as the lift ``(√(k + ‖x̄‖²), x̄)`` of its stored spatial part and a
    tangent vector as ``(⟨x̄, v̄⟩/x₀, v̄)`` (Note [the hyperboloid in low precision]). Membership: the relative residual
    ``|⟨x, x⟩_L + k| / (k + ‖x‖²) ≤ atol`` and ``x₀ > 0``. NaN or inf raw input gives NaN.
    The model is ill-conditioned far from the origin (coordinates grow like ``e^d``): for
    larger radii use float64, or :class:`PoincareBall` (14.6 in float32, 34.7 in float64).
    ``dist``, ``logmap`` and ``transport`` of float32 (and lower) points compute in float64 from the
    lifts of their spatial parts and round back, so points beyond the clamp (which ``contains``
    accepts) get them exact to float32 rounding up to distance ~12√k (Note [the hyperboloid's pair
    maps in double precision]).

    Example:
        >>> import torch, geofunc as gf
        >>> H = gf.Lorentz(k=1.0)
        >>> x = H.to_manifold(torch.tensor([0.0, 1.0, 0.0]))   # distance 1 from (1, 0, 0)
        >>> bool(torch.allclose(H.dist(H.to_manifold(torch.zeros(3)), x), torch.tensor(1.0)))
        True

    Reference: M. Nickel, D. Kiela, *Learning Continuous Hierarchies in the Lorentz Model of
    Hyperbolic Geometry*, ICML 2018.
    """

    _base_kind: ClassVar[str | None] = "point"  # what its base is (AbstractSpace._refine_base)

    k: float = 1.0

    point_ndim: ClassVar[int] = 1

    def __post_init__(self) -> None:
        real_hyperparameter(self, "k", "`k` > 0 (a finite Python number; the curvature is −1/k)", strict=True)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        n = self._require_vector(X, what)
        if n < 2:
            raise error(self, f"`{what}` to be vectors (..., n + 1) with n ≥ 1", f"shape {tuple(X.shape)}")

    def _origin(self, like: Tensor) -> Tensor:
        e0 = (torch.arange(like.shape[-1], device=like.device) == 0).to(like.dtype)
        return math.sqrt(self.k) * e0

    # ------------------------------------------------------------------ maps
    def _vertical(self, Y: Tensor) -> Tensor:
        """``(√(k + ‖ȳ‖²), ȳ)`` with ``ȳ`` capped at ``‖ȳ‖ ≤ √k sinh T`` (:func:`_max_distance`)."""
        return self._lift(Y[..., 1:])

    def _lift(self, yb: Tensor) -> Tensor:
        """The point ``(√(k + ‖ȳ‖²), ȳ)`` of the spatial part ``ȳ``, capped at ``‖ȳ‖ ≤ √k sinh T``."""
        ys = _cap(yb, math.sqrt(self.k) * math.sinh(_max_distance(yb.dtype)))
        return torch.cat([torch.sqrt(self.k + (ys * ys).sum(-1, keepdim=True)), ys], dim=-1)

    def _read(self, X: Tensor) -> Tensor:
        """A point argument as the maps read it: ``X`` itself, except in a bfloat16/float16 call, where
        it is the lift ``(√(k + ‖x̄‖²), x̄)`` of its stored spatial part (Note [the hyperboloid in low precision])."""
        return X if rounding_dtype(X.dtype) == X.dtype else self._relift(X)

    def _relift(self, X: Tensor) -> Tensor:
        """``(√(k + ‖x̄‖²), x̄)``: the point of the hyperboloid above the point argument ``X``'s spatial
        part (uncapped, unlike :meth:`_lift`; a NaN or inf ``x₀`` stays NaN)."""
        xb = X[..., 1:]
        x0 = torch.sqrt(self.k + (xb * xb).sum(-1, keepdim=True)) + 0.0 * X[..., :1]  # a NaN or inf x₀ stays NaN
        return torch.cat([x0, xb], dim=-1)

    def _read_tangent(self, X: Tensor, V: Tensor) -> Tensor:
        """A tangent vector at the (read) point ``X`` as the maps read it: ``V`` itself, except in a
        bfloat16/float16 call, where ``v₀`` is implied by tangency, ``⟨x̄, v̄⟩/x₀`` (Note [the hyperboloid
        in low precision])."""
        return V if rounding_dtype(V.dtype) == V.dtype else self._lift_tangent(X, V)

    @staticmethod
    def _lift_tangent(X: Tensor, V: Tensor) -> Tensor:
        """``(⟨x̄, v̄⟩/x₀, v̄)``: the tangent vector at the point ``X`` with ``V``'s spatial part."""
        vb = V[..., 1:]
        return torch.cat([(X[..., 1:] * vb).sum(-1, keepdim=True) / X[..., :1] + 0.0 * V[..., :1], vb], dim=-1)

    def _tangent(self, X: Tensor, G: Tensor) -> Tensor:
        return G - (_minkowski(X, G) / (X * X).sum(-1, keepdim=True)) * _flip(X)

    def _exp_origin(self, ws: Tensor, s: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """``(sinh θ/θ · w, θ²)`` for ``w = s·ws`` (``q = ‖ws‖²``; Note [norms without overflow] in
        ``geofunc/hyperbolic.py``), ``θ = ‖w‖/√k`` capped at 40 (the stated clamp): beyond it ``w`` is
        rescaled along itself, so that the direction of the result is the exact one."""
        k = self.k
        inside = q <= (_ARG_MAX * _ARG_MAX * k) / (s * s)
        s = torch.where(inside, s, 1.0)
        t = torch.where(inside, (s * s) * q / k, _ARG_MAX * _ARG_MAX)  # θ², ≥ 0 exactly
        f = torch.where(inside, s, (_ARG_MAX * math.sqrt(k)) / torch.sqrt(torch.where(inside, 1.0, q)))
        return ws * (_sinhc(t) * f), t

    def _expmap(self, X: Tensor, V: Tensor) -> Tensor:
        # Note [the exponential map through the origin]; v̄ = s·vs (Note [norms without overflow]).
        sk = math.sqrt(self.k)
        x0, xb = X[..., :1], X[..., 1:]
        h = x0 + sk
        vs, s, _ = _scaled(V[..., 1:])
        ws = vs - ((xb * vs).sum(-1, keepdim=True) / (x0 * h)) * xb  # the transport of v to the origin, /s
        zb, t = self._exp_origin(ws, s, (ws * ws).sum(-1, keepdim=True))  # the spatial part of exp_o(w)
        return self._lift(zb + ((xb * zb).sum(-1, keepdim=True) / (sk * h) + _cosh(t)) * xb)

    def _expmap_origin(self, Vb: Tensor) -> Tensor:
        """``expmap(o, (0, v̄))`` from the spatial part ``v̄``: ``(√k cosh θ, √k sinh θ v̄/‖v̄‖)``, ``θ = ‖v̄‖/√k``."""
        return self._lift(self._exp_origin(*_scaled(Vb))[0])

    def to_manifold(self, Z: Tensor, base: Optional[Tensor] = None) -> Tensor:
        """``expmap(base, tangent(base, Z))``; ``base=None`` is the origin ``(√k, 0, …, 0)``."""
        self._check_shape(Z, "Z")
        if base is None:
            return self._expmap_origin(Z[..., 1:])
        self._require_base(Z, base)
        B = self._read(base)
        return self._expmap(B, self._tangent(B, Z)) + poison(base, ndim=1)  # (x₀ of the base: as expmap)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G − (⟨x, G⟩_L/‖x‖²) Jx``: the Euclidean orthogonal projection onto ``T_x``."""
        self._check_pair(X, G, "G")
        return self._tangent(self._read(X), G)

    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """``JG + (⟨x, G⟩/k) x`` (the Minkowski-metric gradient; ``J = diag(−1, 1, …, 1)``)."""
        self._check_pair(X, G, "G")
        X = self._read(X)
        return _flip(G) + ((X * G).sum(-1, keepdim=True) / self.k) * X

    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """``⟨U, V⟩_L = −U₀V₀ + Σ Uᵢ Vᵢ``, batch-shaped; evaluated as ``⟨B_X⁻¹U, B_X⁻¹V⟩`` from the
        spatial parts (Note [the metric through the origin])."""
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        X = self._read(X)  # Note [the hyperboloid in low precision]: the identity in float32/float64
        # Note [the metric through the origin]
        # −U₀V₀ + ⟨Ū, V̄⟩ cancels to a part in ~x₀²/k for tangent vectors with a radial part (ū of
        # size x₀‖u‖_L along x̄): in float64 the squared norm of a radial unit vector was 0.5 at 18√k
        # and −0.5 or 0 at 18.6√k (inside the clamp, 18.7√k), so radam's second moment of such a
        # gradient was 0 and its step 1/eps long: the point went to the clamp on the far side of the
        # origin. The boost B_x (Note [the exponential map through the origin]) is an isometry that
        # takes T_x to T_o, u to (0, w̄), w̄ = ū − (⟨x̄, ū⟩/(x₀(x₀ + √k))) x̄ (u₀ implied by tangency, as
        # expmap reads u), so ⟨u, v⟩_L = ⟨w̄_u, w̄_v⟩: w̄ loses ~ε x₀ to the cancellation in its radial
        # part (the floor of a stored x̄'s rounding across its ray), the sum of products nothing.
        # Equal for tangent vectors in exact arithmetic, so derivatives along the space are unchanged.
        x0, xb = X[..., :1], X[..., 1:]
        h = x0 * (x0 + math.sqrt(self.k))
        ub, vb = U[..., 1:], V[..., 1:]
        wu = ub - ((xb * ub).sum(-1, keepdim=True) / h) * xb
        wv = vb - ((xb * vb).sum(-1, keepdim=True) / h) * xb
        return ((wu * wv).sum(-1, keepdim=True) + poison(X, U[..., :1], V[..., :1], ndim=1)).squeeze(-1)  # Note [NaN policy]

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``expmap(X, tangent(X, V))``."""
        self._check_pair(X, V, "V")
        X = self._read(X)
        return self._expmap(X, self._tangent(X, V))

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``cosh(‖V‖_L/√k) X + √k sinh(‖V‖_L/√k) V/‖V‖_L`` for tangent ``V``, then the vertical projection.

        Evaluated as ``B_X exp_o(B_X⁻¹ V)`` from ``V``'s spatial part (Note [the exponential map
        through the origin]): accurate to the map's own conditioning far from the origin."""
        self._check_pair(X, V, "V")
        # x₀ and v₀ are read through the spatial parts only, so an inf there gave a finite point: Note [NaN policy]
        return self._expmap(self._read(X), V) + poison(X, V, ndim=1)

    def _read_pair(self, X: Tensor, Y: Tensor, V: Optional[Tensor] = None) -> tuple:
        """The points ``X``, ``Y`` (and a tangent vector ``V`` at ``X``) as the pair maps read them: for
        float32 (and lower) points, in float64 as the lifts of their stored spatial parts (Note [the
        hyperboloid's pair maps in double precision]); else as :meth:`_read` does."""
        w = wide_dtype(X)
        if w == X.dtype:  # float64, or MPS (no float64)
            X, Y = self._read(X), self._read(Y)
            return X, Y, None if V is None else self._read_tangent(X, V)
        X, Y = self._relift(X.to(w)), self._relift(Y.to(w))
        return X, Y, None if V is None else self._lift_tangent(X, V.to(w))

    def _u(self, X: Tensor, Y: Tensor) -> Tensor:
        """``u = −⟨x, y⟩_L/k − 1 = ⟨x − y, x − y⟩_L / 2k ≥ 0``, without cancellation (Note [the
        hyperboloid's distance without cancellation])."""
        return self._pair(X, Y)[0]

    def _pair(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(u, close, τ, W/√(‖x̄‖‖ȳ‖), ‖x̄‖, ‖ȳ‖)`` of :meth:`_u`'s note; the last four are meaningful
        where ``close`` (stand-ins elsewhere: ‖x̄‖ = ‖ȳ‖ = 1)."""
        # Note [the hyperboloid's distance without cancellation]
        # ⟨D, D⟩_L = ‖D̄‖² − D₀² (D = y − x) cancels to a part in ~x₀y₀/k where D̄ runs along x̄: a
        # radial pair 1e-3 apart at distance 18 (float64, inside the clamp) came out 14× off, one at 12
        # 9e-4 off, a pair 1 apart at 25 11× off, and d(o, x) for x at 40 was 0 (float32 points, read
        # as float64 lifts: 5e-4 at 12, where Note [the hyperboloid's pair maps in double precision]
        # promised 2e-6), though the stored spatial parts fix such distances to ~ε. With a, b the
        # distances of x, y from the origin and φ the angle between x̄ and ȳ,
        #   u = cosh d − 1 = (cosh(b − a) − 1) + sinh a sinh b (1 − cos φ),
        # two terms ≥ 0, and each is read from differences: sinh(b − a) = τ = ⟨D̄, S̄⟩/(‖ȳ‖x₀ + y₀‖x̄‖)
        # (S̄ = x̄ + ȳ; ‖ȳ‖² − ‖x̄‖² = ⟨D̄, S̄⟩), cosh(b − a) − 1 = τ²/(1 + √(1 + τ²)), and
        # k sinh a sinh b (1 − cos φ) = ‖W‖²/(2‖x̄‖‖ȳ‖) with W = ‖ȳ‖x̄ − ‖x̄‖ȳ = r ȳ − ‖ȳ‖D̄,
        # r = ‖ȳ‖ − ‖x̄‖ = ⟨D̄, S̄⟩/(‖x̄‖ + ‖ȳ‖). The norms are not smooth at x̄ = 0, so that form is
        # taken only for pairs close to each other, ⟨x̄, ȳ⟩ > (α + β)/2 below (so both norms are
        # nonzero), with safe stand-ins elsewhere (no NaN reaches a derivative). Other pairs take
        #   k u = x₀y₀ − k − ⟨x̄, ȳ⟩ = α + β − ⟨x̄, ȳ⟩,  α = ‖x̄‖² y₀/(x₀ + √k),  β = √k ‖ȳ‖²/(y₀ + √k)
        # (x₀ − √k = ‖x̄‖²/(x₀ + √k)), smooth (also at x̄ = 0 or ȳ = 0) and without cancellation
        # while ⟨x̄, ȳ⟩ ≤ (α + β)/2. Both forms are u in exact arithmetic on the hyperboloid, so
        # derivatives along the space are unchanged (second ones too: tested at the origin and at
        # Y = X). What is left is the rounding of the stored points: W's cancellation for a radial
        # pair is that of x̄'s own rounding across the ray, ε‖x̄‖ (float64 beyond ~36√k, where
        # ε sinh(d/√k) passes 1, no point resolves anything across its ray). Cost (CPU, 1 thread,
        # 1024 points in H⁷, ~50 small ops): float64 dist 80 → 233 µs, logmap 117 → 268 µs; float32
        # 170 → 314, 205 → 354 µs.
        k, sk = self.k, math.sqrt(self.k)
        x0, xb, y0, yb = X[..., :1], X[..., 1:], Y[..., :1], Y[..., 1:]
        D = Y - X
        sx, sy = (xb * xb).sum(-1, keepdim=True), (yb * yb).sum(-1, keepdim=True)
        c = (xb * yb).sum(-1, keepdim=True)
        ab = sx * (y0 / (x0 + sk)) + sk * sy / (y0 + sk)  # (no product of three large factors)
        u_apart = (ab - c) / k
        close = c > 0.5 * ab
        nx = torch.sqrt(torch.where(close, sx, torch.ones_like(sx)))
        ny = torch.sqrt(torch.where(close, sy, torch.ones_like(sy)))
        Db = D[..., 1:]
        ds = (Db * (xb + yb)).sum(-1, keepdim=True)
        tau = ds / (ny * x0 + y0 * nx)
        W = ((ds / (nx + ny)) * yb - ny * Db) / torch.sqrt(nx * ny)  # ‖W‖²/(‖x̄‖‖ȳ‖) without overflow
        u_far = tau * tau / (1.0 + torch.sqrt(1.0 + tau * tau)) + (W * W).sum(-1, keepdim=True) / (2.0 * k)
        u = torch.where(close, u_far, u_apart)
        return _nonneg(u), close, tau, W, nx, ny

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """``ψ(u)(y − x − u x)``, ``ψ(u) = arcosh(1 + u)/√(u(u + 2))`` (smooth at ``Y = X``)."""
        self._check_pair(X, Y, "Y")
        out = X.dtype
        bad = poison(X, Y, ndim=1)  # x₀, y₀ are read through the spatial parts: Note [NaN policy]
        X, Y, _ = self._read_pair(X, Y)
        u = self._u(X, Y) + bad
        p = _arcoshc(u)
        return (p * (Y - X) - (p * u) * X).to(out)  # (p u) first: u X overflows from d ~ 355 on

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``√k arcosh(1 + u)``, ``u = ⟨x − y, x − y⟩_L/2k``, batch-shaped (gradient 0 at ``X = Y``)."""
        self._check_pair(X, Y, "Y")
        out = X.dtype
        bad = poison(X, Y, ndim=1)  # x₀, y₀ are read through the spatial parts: Note [NaN policy]
        X, Y, _ = self._read_pair(X, Y)
        u = self._u(X, Y) + bad
        pos = u > 0
        w = torch.sqrt(torch.where(pos, u, torch.ones_like(u))) * torch.sqrt(u + 2.0)  # √(u(u + 2)) without overflow
        d = math.sqrt(self.k) * torch.log1p(u + w)
        return torch.where(pos | torch.isnan(u), d, torch.zeros_like(d)).squeeze(-1).to(out)

    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """Parallel transport ``V + ⟨Y, V⟩_L/(k − ⟨X, Y⟩_L) (X + Y)``, with ``⟨Y, V⟩_L`` and
        ``k − ⟨X, Y⟩_L = k(2 + u) ≥ 2k`` evaluated without cancellation (``V`` read by its spatial part,
        ``v₀ = ⟨x̄, v̄⟩/x₀``, as :meth:`expmap` reads it): exact to ``~ε x₀/√k`` far from the origin, and
        the identity at ``X = Y``."""
        self._check_pair(X, Y, "Y")
        self._check_pair(X, V, "V")
        out = V.dtype
        X, Y, V = self._read_pair(X, Y, V)
        # Note [the hyperboloid's transport without cancellation]
        # ⟨y, v⟩_L = ⟨D, v⟩_L = −D₀v₀ + ⟨D̄, v̄⟩ cancels to a part in ~x₀²/k where v has a radial
        # part (v̄ of size x₀‖v‖_L along x̄) and D runs along the ray: the transport of a radial unit
        # vector over 1e-3√k at 18√k (float64, inside the clamp) was 5–20% off, at 12√k 1e-6, at 25√k
        # 7e7× off, though the stored inputs fix it to ~ε x₀ (the rounding of x̄ across its ray); and
        # 2k + ⟨D, D⟩_L/2 cancelled likewise. With the terms of Note [the hyperboloid's distance
        # without cancellation] (a, b the points' distances from the origin, τ = sinh(b − a), W =
        # ‖ȳ‖x̄ − ‖x̄‖ȳ), and v₀ = ⟨x̄, v̄⟩/x₀ by tangency,
        #   ⟨y, v⟩_L = ⟨x₀ȳ − y₀x̄, v̄⟩/x₀,   x₀ȳ − y₀x̄ = (kτ x̄ − x₀W)/‖x̄‖
        # (its part along x̄ is x₀⟨ȳ, x̂⟩ − y₀‖x̄‖ = kτ − x₀‖W‖²/(2‖x̄‖²‖ȳ‖), across x̄ it is −x₀W/‖x̄‖
        # less that same ‖W‖² term), so ⟨y, v⟩_L = (kτ v₀ − ⟨W, v̄⟩)/‖x̄‖: no large terms, for the close
        # pairs of that note. Other pairs read ⟨ȳ, v̄⟩ − y₀v₀ (its two terms do not cancel by more
        # than a factor ~2 there; at y = o, or x = o, it is one term), and k − ⟨x, y⟩_L = k(2 + u).
        # v₀ is implied by v̄, as expmap reads v (Note [the exponential map through the origin]):
        # the stored v₀'s own rounding, ε x₀‖v‖_L, times D₀ ~ x₀‖D‖ was the same x₀² error. For a
        # tangent v and a point on the hyperboloid these are ⟨y, v⟩_L in exact arithmetic, so
        # derivatives along the space are unchanged. What is left is ~ε x₀ (measured: ≤ 2ε x₀ from
        # the exact transport of the same stored inputs, at 5–30√k; tests/test_hyperbolic.py). Cost (CPU,
        # 1 thread, 1024 points in H⁷, a loaded machine): float64 transport 0.30 → 1.3 ms, float32 0.72 →
        # 2.0 ms; an rsgd step with momentum 2.75 → 4.0 ms, a radam step 3.7 → 4.9 ms.
        k = self.k
        u, close, tau, W, nx, ny = self._pair(X, Y)
        x0, xb, vb = X[..., :1], X[..., 1:], V[..., 1:]
        v0 = (xb * vb).sum(-1, keepdim=True) / x0
        # ⟨W, v̄⟩ with W's part along x̄ taken as ‖W‖²/(2‖x̄‖‖ȳ‖) ≥ 0 (exact, second order in the
        # angle) and not as computed: W's rounding there (ε‖ȳ‖‖D̄‖) met v̄'s radial part (x₀v₀/‖x̄‖)
        # and was the same x₀² error again. W is _pair's W/√(‖x̄‖‖ȳ‖) (no overflow), ⟨x̂, v̄⟩ = x₀v₀/‖x̄‖.
        r = x0 * v0 / nx  # ⟨x̂, v̄⟩
        Wv = torch.sqrt(ny / nx) * ((W * vb).sum(-1, keepdim=True) - (W * xb).sum(-1, keepdim=True) * r / nx)
        yv_close = (k * tau * v0 - 0.5 * (W * W).sum(-1, keepdim=True) * r) / nx - Wv
        yv_apart = (Y[..., 1:] * vb).sum(-1, keepdim=True) - Y[..., :1] * v0
        yv = torch.where(close, yv_close, yv_apart) + poison(X, Y, V, ndim=1)  # (x₀, v₀ barely read) Note [NaN policy]
        return (V + (yv / (k * (2.0 + u))) * (X + Y)).to(out)

    def project(self, Y: Tensor) -> Tensor:
        """``(√(k + ‖Ȳ‖²), Ȳ)``: the vertical projection onto the upper sheet; NaN where ``Y`` has a NaN/inf entry,
        ``y₀`` too, which the projection does not read (Note [NaN policy])."""
        self._check_shape(Y, "Y")
        return self._vertical(Y) + poison(Y, ndim=1)

    def sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """The wrapped normal at the origin: ``expmap(o, (0, v))``, ``v ~ N(0, I/n)``."""
        shape = self._sample_shape(shape, dtype)
        v = _gaussian(shape, generator, dtype, device)
        return self._expmap_origin(v[..., 1:] / math.sqrt(shape[-1] - 1))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        q = _minkowski(X, X).squeeze(-1)
        rel = (q + self.k).abs() / (self.k + (X * X).sum(-1))
        x0 = X[..., 0]
        sheet = torch.where(x0 > 0, torch.zeros_like(x0), torch.full_like(x0, math.inf))
        return {"|⟨x, x⟩_L + k| / (k + ‖x‖²)": rel, "x₀ ≤ 0 (lower sheet; inf if so)": sheet}
