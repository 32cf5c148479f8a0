"""The sphere of radius ``r`` in the exponential-map chart centred at a movable base point."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, final

import torch

from .._fastpath import backward_without_autocast, eager_fast, tracks_derivatives
from .._linalg import real_products
from ._base import AbstractSpace, real_hyperparameter
from ._logs import theta_over_sin

__all__ = ["Sphere"]

Tensor = torch.Tensor

# Note [sqrt-free cos and sinc]
# The chart needs cos(t) and sinc(t) = sin(t)/t at t = ‖v‖. Written as functions of
# s = t² = ‖v‖² they are entire power series, C(s) = Σ (-s)^j/(2j)!, S(s) = Σ (-s)^j/(2j+1)!,
# so no sqrt appears where s is small and every derivative (grad, jacfwd, hessian) is finite
# at v = 0. Below _S_SMALL the truncated series is used (the first omitted term is
# 0.1^8/16! < 1e-21, below float64 rounding); above it sqrt/cos/sin, whose derivatives lose
# only ~eps/s relative accuracy there. Both branches are evaluated on a masked copy of s
# ("double where") so that neither produces inf/NaN that would leak into the gradient.
_S_SMALL = 0.1
_N_TERMS = 8
_COS_COEFS = tuple((-1.0) ** j / math.factorial(2 * j) for j in range(_N_TERMS))
_SINC_COEFS = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(_N_TERMS))


def _series(s: Tensor, coefs: tuple[float, ...]) -> Tensor:
    out = torch.full_like(s, coefs[-1])
    for c in reversed(coefs[:-1]):
        out = out * s + c
    return out


def _cos_sinc_sqrt(s: Tensor, m: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(cos t, sin t / t)``, ``t = m √s``, for ``s >= 0``, smooth at ``s = 0`` (Note [sqrt-free cos
    and sinc]). ``m`` (default 1) is the detached scale of :func:`_scale`: ``s`` is then the squared
    norm of the scaled vector, ``s ≥ 1`` wherever ``m > 1``, so the series branch sees ``m = 1`` only."""
    small = s < _S_SMALL  # False for NaN: NaN goes through the exact branch and stays NaN
    s_series = torch.where(small, s, torch.zeros_like(s))
    s_exact = torch.where(small, torch.ones_like(s), s)
    t = torch.sqrt(s_exact) if m is None else m * torch.sqrt(s_exact)
    cos = torch.where(small, _series(s_series, _COS_COEFS), torch.cos(t))
    sinc = torch.where(small, _series(s_series, _SINC_COEFS), torch.sin(t) / t)
    return cos, sinc


def _e1(like: Tensor) -> Tensor:
    """The first canonical basis vector of the size of the last dim of ``like``: the one row of a 1×n
    ``eye``, one write of n entries (``arange(n) == 0`` wrote an int64 and a bool vector and cast them:
    four passes, 13n bytes more, in every ``normalize``, so a third of a ``retract`` of a 1e6 vector)."""
    return torch.eye(1, like.shape[-1], dtype=like.dtype, device=like.device)[0]


def _dot(A: Tensor, B: Tensor) -> Tensor:
    """``Re⟨A, B⟩`` along the last dim (the real inner product, Note [Complex])."""
    if A.is_complex():
        return real_products(A, B).sum(-1, keepdim=True)  # Note [Real products under vmap] (geofunc/_linalg.py)
    return (A * B).sum(-1, keepdim=True)


# Note [the chart at extreme scales]
# ‖v‖² overflows for ‖v‖ ≳ 1.8e19 in float32 (1.3e154 in float64), and cos(inf) is NaN: a finite
# raw tensor became NaN. So the op chain computes ‖v‖ as m ‖v/m‖ with m = max(1, max_i |v_i|)
# (_scale): nothing overflows below the largest float, and for ‖v‖∞ ≤ 1 (m = 1) the arithmetic is
# the unscaled one. Underflow needs nothing: where ‖v‖² underflows the chart is u + v to
# rounding, which cos = sinc = 1 gives. m is detached: ‖v‖ = m ‖v/m‖ for every constant m, so
# every derivative is the exact one; the series branch (s < 0.1) only ever sees m = 1. The fast
# path reads ‖v‖ from _norm_values (float64 sums for float32; a one-op scale for float64), and
# its backward and jvp are written with t = ‖v‖ rather than s = t², as (c − σ)/t · ⟨G, v⟩/t · v,
# so no intermediate overflows or underflows either. Past ‖v‖ ~ 1/ε (1.7e7 in float32) the point
# is on the sphere but is the rounding's: the ulp of t exceeds 1, so cos t is any value.
def _scale(V: Tensor) -> Tensor:
    """``max(1, max_i |V_i|)`` along the last dim, detached (Note [the chart at extreme scales])."""
    return V.detach().abs().amax(-1, keepdim=True).clamp(min=1.0)


def _exp_chart_smooth(Z: Tensor, U: Tensor, r: float) -> Tensor:
    """:func:`_exp_chart` as differentiable torch ops, exact to every order at ``v = 0``."""
    V = Z - _dot(Z, U) * U
    m = _scale(V)
    W = V / m
    cos, sinc = _cos_sinc_sqrt(_dot(W, W), m)
    return r * (cos * U + sinc * V)


# Note [the sphere chart's fast path]
# In plain eager mode the chart runs as one autograd node (_ExpChart) instead of the ~50 small
# ops of _exp_chart_smooth (most of them the power series): its forward evaluates cos/sinc
# directly (value-accurate everywhere, sinc(0) = 1) and its backward is the closed-form
# vector-Jacobian product below, O(n) and a dozen ops. With x = r(c u + σ v), v = z − a u,
# a = ⟨z, u⟩, s = ⟨v, v⟩, t = √s, c = cos t, σ = sinc t and g = (c − σ)/s (g(0) = −1/3):
#   dx/r = (g v − σ u)⟨v, dv⟩ + σ dv + c du,   dv = dz − ⟨dz, u⟩u − ⟨z, du⟩u − a du.
# g ⟨G, v⟩ is computed as (c − σ)/t̂ · ⟨G, v⟩/t̂, t̂ = max(t, 1e-15), without a series (and
# without s, which overflows: Note [the chart at extreme scales]): the absolute error ~ε/t of
# the first factor is multiplied by ⟨G, v⟩ v/t̂ = O(t), so the gradient keeps an absolute error
# ~ε‖G‖ for every t (below 1e-15 the whole term is < 1e-30 ‖G‖; the clamp keeps it finite, 0/0
# at v = 0 included, in float32 too). When a graph is being built (create_graph=True: second
# derivatives are wanted) the backward differentiates _exp_chart_smooth instead, so higher
# derivatives stay exact at v = 0. Under torch.func transforms, torch.compile, other dtypes
# or tensor subclasses the smooth ops run directly (geofunc/_fastpath.py).
_T_TINY = 1e-15


def _norm_values(V: Tensor) -> Tensor:
    """``‖V‖`` (last dim, kept) of float32/float64 values, without overflow or underflow (Note [the
    chart at extreme scales]); the fast path's, about as cheap as the ``√⟨v, v⟩`` it replaced. A
    float32 vector's squares are summed in float64, where no float32 square overflows or
    underflows. Float64 is scaled by ``m = max(1, ‖v‖₁)`` (one op, where ``max|v_i|`` is two):
    ``‖v/m‖ ≥ 1/√n`` when ``m > 1``, so only entries below 1e-154 of the largest are lost."""
    if V.dtype == torch.float32:
        return torch.linalg.vector_norm(V, dim=-1, keepdim=True, dtype=torch.float64).float()
    # (out of place: batch-shaped, and an in-place update breaks selective activation checkpointing,
    # Note [In place under a dispatch mode] in geofunc/_fastpath.py)
    m = torch.linalg.vector_norm(V, 1, dim=-1, keepdim=True).clamp(min=1.0)
    return torch.linalg.vector_norm(V / m, dim=-1, keepdim=True) * m


def _chart_parts(Z: Tensor, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(a, v, t, c, σ)`` of Note [the sphere chart's fast path] (values, no graph)."""
    a = _dot(Z, U)
    V = torch.addcmul(Z, a, U, value=-1.0)
    t = _norm_values(V)
    c = torch.cos(t)
    # sin(t)/t, not special.sinc(t/π): the rounding of t/π (~ε t) would make c and σ disagree
    # for large t (‖x‖ off by 4e-3 at t = 3e4 in float32).
    sinc = torch.where(t == 0, 1.0, torch.sin(t) / t)
    return a, V, t, c, sinc


def _chart_values(Z: Tensor, U: Tensor, r: float) -> Tensor:
    _, V, _, c, sinc = _chart_parts(Z, U)
    X = torch.addcmul(c * U, sinc, V)
    return X if r == 1.0 else X * r


def _radial(t: Tensor, c: Tensor, sinc: Tensor, p: Tensor) -> Tensor:
    """``g p = (c − σ) p / t²`` as ``(c − σ)/t̂ · p/t̂``, ``t̂ = max(t, 1e-15)`` (``p = ⟨·, v⟩``;
    Note [the sphere chart's fast path])."""
    tc = t.clamp(min=_T_TINY)
    return (c - sinc) / tc * (p / tc)


class _ExpChart(torch.autograd.Function):
    """``r (cos‖v‖ u + sinc‖v‖ v)`` as one node (Note [the sphere chart's fast path]).

    Used in plain eager mode only (never under torch.func transforms or torch.compile, which
    run :func:`_exp_chart_smooth`), so the cheaper legacy ``forward(ctx, ...)`` form is used.
    """

    @staticmethod
    def forward(ctx: Any, Z: Tensor, U: Tensor, r: float) -> Tensor:  # type: ignore[override]
        a, V, t, c, sinc = _chart_parts(Z, U)
        # Saved tensors, not a context attribute: saved_tensors_hooks see them, so activation checkpointing
        # (use_reentrant=False) frees them and save_on_cpu moves them (on the attribute, a checkpointed
        # chart kept v alive: as much memory as Z). jvp, run within apply, reads the attribute.
        ctx.save_for_backward(Z, U, a, V, t, c, sinc)
        ctx.save_for_forward(Z, U)
        ctx.r = r
        ctx.parts = (a, V, t, c, sinc) if torch.autograd.forward_ad._current_level >= 0 else None
        X = torch.addcmul(c * U, sinc, V)
        return X if r == 1.0 else X * r

    @staticmethod
    @backward_without_autocast
    def backward(ctx: Any, G: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:  # type: ignore[override]
        Z, U, a, V, t, c, sinc = ctx.saved_tensors
        need_z, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        r = ctx.r
        graph = torch.is_grad_enabled()
        if graph or torch.autograd.forward_ad._current_level >= 0:
            # A graph is wanted (create_graph=True), or a dual level takes the tangent of this backward
            # (forward over reverse, even without create_graph: the closed form below is of values
            # that carry no tangents, so the gradient's tangent would lack the chart's second
            # derivative): differentiate the smooth ops instead.
            wrt = [T for T, need in ((Z, need_z), (U, need_u)) if need]
            with torch.enable_grad():
                X = _exp_chart_smooth(Z, U, r)
            grads = iter(torch.autograd.grad(X, wrt, G, create_graph=graph, allow_unused=True))
            return (next(grads) if need_z else None), (next(grads) if need_u else None), None
        if r != 1.0:
            G = G * r
        Gu = _dot(G, U)
        k = _radial(t, c, sinc, _dot(G, V)) - sinc * Gu  # the coefficient of ⟨v, dv⟩
        gz = gu = None
        if need_z:
            # P(σ G + k v) with P = I − u uᵀ (dv = P dz), using P v = v (v ⊥ u to rounding).
            gz = torch.addcmul(sinc * torch.addcmul(G, Gu, U, value=-1.0), k, V)
        if need_u:
            gu = (c - sinc * a) * G - (a * k) * V - (k * _dot(V, U) + sinc * Gu) * Z
        return gz, gu, None

    @staticmethod
    def jvp(ctx: Any, dZ: Optional[Tensor], dU: Optional[Tensor], _dr: Any) -> Tensor:  # type: ignore[override]
        Z, U = ctx.saved_tensors
        a, V, t, c, sinc = ctx.parts
        dV = torch.zeros_like(V) if dZ is None else dZ - _dot(dZ, U) * U
        if dU is not None:
            dV = dV - _dot(Z, dU) * U - a * dU
        p = _dot(V, dV)
        dX = _radial(t, c, sinc, p) * V - (sinc * p) * U + sinc * dV
        if dU is not None:
            dX = dX + c * dU
        return dX if ctx.r == 1.0 else dX * ctx.r


def _exp_chart(Z: Tensor, U: Tensor, r: float) -> Tensor:
    """``r (cos‖v‖ U + sinc‖v‖ v)``, ``v = Z − ⟨Z, U⟩ U``: the chart at the unit vectors ``U`` (last dim)."""
    if not eager_fast(Z, U):
        return _exp_chart_smooth(Z, U, r)
    if tracks_derivatives(Z, U):
        return _ExpChart.apply(Z, U, r)
    return _chart_values(Z, U, r)


def normalize(Y: Tensor, r: float) -> Tensor:
    """``r Y / ‖Y‖`` along the last dim; ``r e_1`` where ``Y = 0`` (finite value and gradient there).

    ``Y`` is first divided by its largest entry (detached): ``‖Y‖`` itself underflows to 0 for
    float32 vectors of size ~1e-23 (which then became ``e_1``) and overflows for ~1e19 (which
    became 0). The map is scale-invariant, so dividing by a constant changes no derivative.
    An inf entry gives ``inf/inf`` = NaN: still never a plausible point.
    """
    m = Y.detach().abs().amax(dim=-1, keepdim=True)
    zero = m == 0
    Y = torch.where(zero, _e1(Y), Y / torch.where(zero, torch.ones_like(m), m))
    return r * Y / _vector_norm(Y)


# Note [Norms of long float32 vectors]
# torch.linalg.vector_norm of a float32 CPU vector accumulates its squares with an error that grows
# with the length (relative 2e-7 at 1e4 entries, 1e-5 at 1e6, 8e-5 at 4e6; torch 2.13, 1 thread), so
# Sphere(1e6) points from sample/project/retract, the charts' unit base and SphereEmbedded's chart were
# 1e-5 to 1e-4 off the sphere, where Sphere's chart (float64 sum, _norm_values) gave 1e-7. A sum of
# the squares is pairwise (relative 5e-8 at 1e6, 1e-9 at 4e6) at ~1.3x vector_norm's time there; below
# _LONG_VECTOR entries vector_norm is as accurate and ~2.5 us cheaper per call, so short vectors (the
# hot path) keep it.
# The inputs are scaled (normalize: by their largest entry; _unit_base: a point of norm ~1), so no
# square overflows, and one that underflows is below 1e-38 of the sum. Complex vectors keep
# vector_norm (the sum of squares would need |z|²).
_LONG_VECTOR = 1 << 14


def _vector_norm(Y: Tensor) -> Tensor:
    """``‖Y‖`` along the last dim (kept), accurate for long real vectors (Note [Norms of long float32
    vectors]); ``Y`` scaled so that its squares do not overflow."""
    if Y.shape[-1] > _LONG_VECTOR and not Y.is_complex():
        return (Y * Y).sum(-1, keepdim=True).sqrt()
    return torch.linalg.vector_norm(Y, dim=-1, keepdim=True)


def _unit_base(base: Tensor, r: float = 1.0) -> Tensor:
    # base / ‖base‖ equals base / r for a valid base; normalising (rather than dividing by r)
    # keeps the rounding error of long runs of `rebase` from accumulating in the norm. A radius
    # other than 1 is divided out first: ‖base‖ overflows (underflows) in float32 for r ≳ 1e19
    # (r ≲ 1e-19), which made a valid base the zero vector.
    if r != 1.0:
        base = base / r
    return base / _vector_norm(base)


def sphere_tangent(X: Tensor, G: Tensor, r: float) -> Tensor:
    """``G − ⟨G, X⟩ X / r²`` along the last dim (as ``G − ⟨G, u⟩ u``, ``u = X / r``: ``r²`` overflows
    float32 for ``r ≳ 1e19``)."""
    if r != 1.0:
        X = X / r
    return G - _dot(G, X) * X


# Note [the sphere's geodesics]
# On the sphere of radius r the geodesics are great circles, in closed form: with x̂ = x/r,
# Exp_x(v) = r (cos θ x̂ + sinc θ v̂), v̂ = P_x̂ v / r, θ = ‖v̂‖: the exponential chart itself
# (_exp_chart with Z = v/r at U = x̂: smooth at v = 0, safe at every scale, one node in eager mode).
# dist(x, y) = 2r atan2(‖ŷ − x̂‖, ‖ŷ + x̂‖), accurate for every angle (arccos⟨x̂, ŷ⟩ loses half the
# digits near 0 and π) and symmetric. Log_x(y) = r (θ / sin θ) P_x̂ ŷ, with P_x̂ ŷ formed from
# ŷ − x̂ (or ŷ + x̂ past the right angle: P_x̂ x̂ = 0), so that no O(1) terms cancel. Up to the right
# angle θ/sin θ is φ(1 − ½‖ŷ − x̂‖²) (Note [Logarithms as spectral maps]: a series near 0), smooth in
# ŷ − x̂, so that second derivatives at y = x are exact (through norms, double backward was NaN);
# past it sin θ = ‖P_x̂ ŷ‖. At y = x it is 0 (θ/sin θ → 1); at the antipode no geodesic is the
# shortest: NaN, never a plausible vector. The vector transport stays the projection (geoopt's Sphere; what rsgd and
# radam carry their moments with), not the parallel transport along the great circle.
def sphere_dist(X: Tensor, Y: Tensor, r: float) -> Tensor:
    """``2r atan2(‖ŷ − x̂‖, ‖ŷ + x̂‖)`` along the last dim, batch-shaped (Note [the sphere's geodesics])."""
    x, y = _unit_base(X, r), _unit_base(Y, r)
    n = torch.linalg.vector_norm
    return 2.0 * r * torch.atan2(n(y - x, dim=-1), n(y + x, dim=-1))


def sphere_expmap(X: Tensor, V: Tensor, r: float) -> Tensor:
    """``r (cos θ x̂ + sinc θ v̂)`` along the last dim (Note [the sphere's geodesics])."""
    return _exp_chart(V if r == 1.0 else V / r, _unit_base(X, r), r)


def _sphere_log(X: Tensor, Y: Tensor, r: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``r (θ / sin θ) P_x̂ ŷ`` along the last dim, finite everywhere; the mask (``(*batch, 1)``) of the
    antipodes, where it means nothing (Note [the sphere's geodesics]); the mask of the pairs within a right
    angle and the angle θ read past it (``(*batch, 1)`` too)."""
    x, y = _unit_base(X, r), _unit_base(Y, r)
    d, e = y - x, y + x
    near = _dot(x, y) >= 0
    # Up to the right angle: θ/sin θ = φ(cos θ) at cos θ = 1 − ½‖ŷ − x̂‖², a smooth function of d (no norm):
    # exact first and second derivatives at y = x, where norms have none (double backward was NaN there).
    u = 0.5 * _dot(d, d)
    ratio_near = theta_over_sin(1.0 - u.clamp(max=1.0))[0]
    w_near = d - _dot(x, d) * x  # P_x̂ ŷ
    # Past it: θ = 2 atan2(‖d‖, ‖e‖), sin θ = ‖P_x̂ e‖; the squared norms are floored at `tiny` so that this
    # unselected branch has finite derivatives at y = x too (the values change only below √tiny).
    tiny = torch.finfo(u.dtype).tiny
    w_far = e - _dot(x, e) * x
    s2 = _dot(w_far, w_far)
    theta = 2.0 * torch.atan2(u.clamp(min=tiny).sqrt() * math.sqrt(2.0), _dot(e, e).clamp(min=tiny).sqrt())
    ratio_far = theta / s2.clamp(min=tiny).sqrt()
    antipode = (s2 <= 0) & ~near
    return r * torch.where(near, ratio_near * w_near, ratio_far * w_far), antipode, near, theta


def sphere_logmap(X: Tensor, Y: Tensor, r: float) -> Tensor:
    """``r (θ / sin θ) P_x̂ ŷ`` along the last dim; NaN at the antipode (Note [the sphere's geodesics])."""
    L, antipode, _, _ = _sphere_log(X, Y, r)
    return torch.where(antipode, torch.full_like(L, float("nan")), L)


def sphere_sqdist(X: Tensor, Y: Tensor, r: float) -> Tensor:
    """``dist(X, Y)²`` along the last dim, batch-shaped: ``‖Log_x(y)‖²`` (as smooth as the logarithm, exact
    second derivatives at ``y = x``), and ``(π r)²`` at the antipode, where the logarithm is NaN (no shortest
    geodesic) but the distance is ``π r``; there the gradient is 0 (the unselected branch is finite). Past the
    right angle ``(r θ)²`` itself (Note [The squared distance past the right angle])."""
    # Note [The squared distance past the right angle]
    # Past it ‖Log‖² = (θ/‖w‖)² ‖w‖² (w = P_x̂ ê, ê = ŷ + x̂): equal to θ² in value, but its derivative is two terms of
    # size θ²/‖w‖ that cancel, to rounding: within ~1e-15 of the antipode (‖w‖ of rounding) the gradient's norm was
    # up to 71 (float64, r = 1) where ‖∇ d²‖ = 2 d ≤ 2π r (15 at ‖ŷ + x̂‖ = 3e-16, 6.9 at 1e-14). θ = 2 atan2(‖ŷ − x̂‖, ‖ê‖)
    # has a bounded derivative there; the same number up to rounding.
    L, antipode, near, theta = _sphere_log(X, Y, r)
    sq = torch.where(near.squeeze(-1), real_products(L, L).sum(-1), ((r * theta) ** 2).squeeze(-1))  # Note [Real products under vmap]
    return torch.where(antipode.squeeze(-1), torch.full_like(sq, (math.pi * r) ** 2), sq)


def validate_radius(space: Any) -> None:
    """``radius`` must be a finite real number > 0; stored as a float (a hyperparameter, normalized)."""
    real_hyperparameter(space, "radius", "`radius` to be a finite real number > 0 (a Python number)", strict=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RadiusSphere(AbstractSpace):
    """Abstract: vectors (last dimension) of norm ``radius``. Everything but the chart is shared by
    :class:`Sphere` and :class:`~geofunc.SphereEmbedded`: ``tangent(X, G) = G − ⟨G, X⟩ X / r²``,
    ``retract(X, V) = r (X + V) / ‖X + V‖``, ``project(Y) = r Y / ‖Y‖`` (``r e_1`` where the
    vector is 0), uniform ``sample`` (the default: ``project`` of a Gaussian) and the membership
    measure ``|‖x‖ − r| / r``. Subclasses implement ``to_manifold`` and ``_from_manifold``.
    """

    radius: float = 1.0

    point_ndim: ClassVar[int] = 1

    def __post_init__(self) -> None:
        validate_radius(self)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_vector(X, what)

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_pair(X, G, "G")
        return sphere_tangent(X, G, self.radius)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_pair(X, V, "V")
        return normalize(X + V, self.radius)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        return normalize(Y, self.radius)

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """The great circle from ``X`` along ``V``: ``r (cos θ x̂ + sinc θ v̂)``, ``x̂ = X/r``,
        ``v̂ = P_x̂ V / r``, ``θ = ‖v̂‖`` (Note [the sphere's geodesics])."""
        self._check_pair(X, V, "V")
        return sphere_expmap(X, V, self.radius)

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """The inverse of :meth:`expmap`: ``r (θ / sin θ) P_x̂ ŷ``, ``θ = dist(X, Y)/r``; NaN where ``Y = −X``
        (no shortest geodesic)."""
        self._check_pair(X, Y, "Y")
        return sphere_logmap(X, Y, self.radius)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """The great-circle distance ``2r atan2(‖ŷ − x̂‖, ‖ŷ + x̂‖)``, batch-shaped."""
        self._check_pair(X, Y, "Y")
        return sphere_dist(X, Y, self.radius)

    def sqdist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``dist(X, Y)²``, batch-shaped: ``inner(X, L, L)``, ``L = logmap(X, Y)`` (exact second derivatives
        at ``Y = X``), and ``(π r)²`` at the antipode, where ``logmap`` is NaN but the distance is defined."""
        self._check_pair(X, Y, "Y")
        return sphere_sqdist(X, Y, self.radius)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        # ‖x/r‖ rather than ‖x‖/r: ‖x‖ of a valid point overflows float32 for r ≳ 1e19.
        Xu = X if self.radius == 1.0 else X / self.radius
        return {"|‖x‖ − r| / r": (torch.linalg.vector_norm(Xu, dim=-1) - 1.0).abs()}


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sphere(RadiusSphere):
    r"""Vectors (last dimension) of norm ``radius``.

    .. math::

        S^{n-1}_r = \{x \in \mathbb{R}^n : \|x\| = r\}

    The last dimension is the vector; leading dimensions are a batch of independent
    points, so a ``(*batch, k, n)`` tensor is a product of ``k`` spheres (rows of norm
    ``r``; for unit *columns* use :class:`Oblique`).

    * ``to_manifold(Z, base)``: the exponential chart centred at ``base`` (a point of norm
      ``r``; ``None`` means ``r e_1``). With ``u = base / ‖base‖`` and
      ``v = Z − ⟨Z, u⟩ u`` (the tangent part of ``Z``),
      ``X = r (cos‖v‖ u + sinc‖v‖ v)``, i.e. ``X = r Exp_u(v)``. It is smooth everywhere,
      at ``Z = 0`` included: cos and sinc are evaluated as power series in ``‖v‖²``
      near 0, so ``grad``, ``jacfwd``, ``hessian`` and ``vmap`` of them are finite there.
      In plain eager mode the chart is a single autograd node with a closed-form O(n)
      backward (the same derivatives, to rounding; second derivatives through
      ``create_graph=True`` differentiate the series form).
    * ``from_manifold(X) = (zeros, X)``; ``rebase(Z, base) = (zeros, to_manifold(Z, base))``.
    * ``tangent(X, G) = G − ⟨G, X⟩ X / r²``.
    * ``retract(X, V) = r (X + V) / ‖X + V‖``.
    * ``project(Y) = r Y / ‖Y‖``, the nearest point. ``Y = 0`` has no nearest point (all
      are at distance ``r``): ``project`` then returns the canonical point ``r e_1`` with
      a zero gradient, never NaN; so does ``retract`` where ``X + V = 0``.
    * ``sample``: uniform (a normalized standard Gaussian).

    Riemannian gradient descent: one SGD step of size ``η`` on ``Z`` at ``Z = 0`` followed
    by :meth:`rebase` moves the point ``x = r u`` to ``x⁺ = r Exp_u(−η r P_u g)``,
    ``P_u = I − u uᵀ``, ``g`` the Euclidean gradient in ``x`` (the chart's differential at 0
    is ``r P_u``; a step of ``η`` on ``Z`` is a Riemannian step of ``η r²`` on ``x``).

    Complex vectors (``x ∈ Cⁿ``, ``‖x‖ = r``: the sphere S^{2n−1} of R²ⁿ) are accepted with the
    real inner product ``⟨a, b⟩ = Re(aᴴb)`` in every formula above (Note [Complex]);
    ``sample(dtype=complex…)`` is uniform on that sphere.

    NaN or inf raw input (``Z``, ``Y``, ``V``) gives NaN in the affected points, never a
    plausible point; :meth:`contains` is False on them. Finite raw input of any scale (1e-30 to
    1e30 in float32, 1e-300 to 1e300 in float64) gives a point; past ``‖v‖ ~ 1/ε`` it is the
    rounding's (cos of a number whose ulp exceeds 1). Errors: ``radius <= 0`` (or not a
    finite real number) raises :class:`~geofunc.ManifoldError` at construction, a 0-d or
    empty tensor at the first call.

    Example:
        >>> import torch, geofunc as gf
        >>> S = gf.Sphere(radius=2.0)
        >>> X = S.to_manifold(torch.zeros(3, 4))          # three copies of 2 e_1
        >>> X[0]
        tensor([2., 0., 0., 0.])
        >>> Z, base = S.from_manifold(X)
        >>> bool(torch.equal(Z, torch.zeros(3, 4))), bool(S.contains(base).all())
        (True, True)

    Reference: M. Lezcano-Casado, "Trivializations for gradient-based optimization on
    manifolds", NeurIPS 2019 (dynamic trivializations).
    """

    _base_kind: ClassVar[str | None] = "point"  # what its base is (AbstractSpace._refine_base)

    accepts_complex: ClassVar[bool] = True

    def to_manifold(self, Z: Tensor, base: Tensor | None = None) -> Tensor:
        """``r Exp_u(Z − ⟨Z, u⟩ u)``, ``u = base / ‖base‖`` (``e_1`` if ``base`` is None)."""
        self._check_shape(Z, "Z")
        if base is None:
            U = _e1(Z)
        else:
            self._require_base(Z, base)
            U = _unit_base(base, self.radius)
        return _exp_chart(Z, U, self.radius)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X
