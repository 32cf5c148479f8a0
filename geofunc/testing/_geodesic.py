"""Properties of the closed-form geodesic maps ``dist``, ``expmap`` and ``logmap`` (float64), run on
the spaces that implement them (Note [Which spaces have the closed forms])."""

from __future__ import annotations

from typing import Optional

import torch

from .._errors import first_index
from ..spaces._base import AbstractSpace
from ..spaces._product import Product
from ._case import SpaceCase
from ._geometry import _STEPS, _point_norm, _scalar_close, _small_steps, _vectors_close
from ._properties import (_batch_shape, _close, _ctx, _fail, _gen, _member, _property, _randn, _require_f64,
                          _second_directional, _worst, f64)

__all__ = [
    "check_dist",
    "check_expmap",
    "check_expmap_geodesic",
    "check_logmap",
    "check_logmap_dist",
    "check_transport_isometry",
    "check_transport_parallel",
    "implements",
]

Tensor = torch.Tensor

# Note [Which spaces have the closed forms]
# AbstractSpace.dist, .expmap and .logmap raise ManifoldError ("no closed form implemented"); a
# space that has one overrides the method. So a property of these maps applies where the space's
# class defines a method other than AbstractSpace's (`implements`), and is reported skipped
# ("needs ...") elsewhere. An override is called, and anything it raises, a ManifoldError included,
# fails the property with the context of Note [Context of an unexpected exception]: a space whose
# override has no closed form in some configuration lists the property in `case.skip` with the
# reason instead of passing silently. A Product has a closed form where each of its factors has
# (Note [Closed forms of a product] in geofunc/spaces/_product.py): `implements` asks the factors.


def implements(space: AbstractSpace, name: str) -> bool:
    """Whether ``space`` implements the closed-form map ``name`` (``"dist"``, ``"expmap"`` or
    ``"logmap"``): its class defines a method other than :class:`~geofunc.AbstractSpace`'s, which
    raises ``ManifoldError`` (Note [Which spaces have the closed forms]); for a
    :class:`~geofunc.Product`, whether every factor implements it."""
    if isinstance(space, Product):
        return all(implements(M, name) for M in space.factors)
    method = getattr(type(space), name, None)
    return method is not None and method is not getattr(AbstractSpace, name)


def _expand(a: Tensor, point_ndim: int) -> Tensor:
    """A batch-shaped ``a`` with ``point_ndim`` trailing singleton dims, to scale points."""
    return a.reshape(tuple(a.shape) + (1,) * point_ndim)


def _unit_tangent(case: SpaceCase, X: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(V, ok)``: ``V = tangent(X, G)`` for a Gaussian ``G``, rescaled to unit length in the metric
    (``inner(X, V, V) = 1``) where ``ok``; 0 where ``ok`` is False (batch-shaped): a point whose
    tangent space is ``{0}`` (``Gr(n, n)``), where the projection of a unit ``G`` is rounding, or
    whose ``inner`` is not positive (``check_metric``'s failure, not this property's)."""
    M = case.space
    p = M.point_ndim
    G = _randn(tuple(X.shape), f64, g)
    V = M.tangent(X, G / _expand(_point_norm(G, p), p))
    s = M.inner(X, V, V)
    ok = (_point_norm(V, p) > 1e-6) & (s > 0) & torch.isfinite(s)
    r = torch.where(ok, torch.where(ok, s, torch.ones_like(s)).rsqrt(), torch.zeros_like(s))
    return V * _expand(r, p), ok


def _sampled(case: SpaceCase, generator: Optional[torch.Generator]):
    """Per shape of the case: the generator, the shape, its context for messages and a point ``X``
    sampled in float64 (drawn when the loop reaches the shape, so the draws interleave with the
    loop body's as written)."""
    g = _gen(generator)
    for shape in case.shapes:
        yield g, shape, _ctx(case, shape, f64), case.space.sample(shape, generator=g, dtype=f64)


def _require_batch_shaped(case: SpaceCase, shape: tuple[int, ...], d: Tensor, ctx: str, what: str) -> None:
    bshape = _batch_shape(case, shape)
    if tuple(d.shape) != bshape or d.dtype != f64:
        raise _fail(ctx, f"{what} returned shape {tuple(d.shape)}, {d.dtype}; expected the batch shape {bshape}, "
                    "torch.float64")


# ------------------------------------------------------------------------------------ dist
# Note [dist and the metric]
# A distance can be a metric and still not be the space's: 2·dist is one. What ties dist to
# `inner` is its first order: for V of unit length in the metric, e(t) = |dist(X, retract(X, tV))/t
# − 1| → 0, as O(t) for any retraction (the second-order term of the retraction against the
# geodesic's), and to rounding for retract = expmap. As in Note [the small-step test], e(t) is
# measured at t = 0.1, 0.01, 0.001 and held to the constant the map shows at the largest step:
# e(t) ≤ 10·q·t + floor, q = max(e(0.1)/0.1, 1e-2). A distance off by a constant factor 1 + c has
# e(t) = |c| at every t, past that bound within two decades of t (by the smallest step for every
# c > 1e-4); a distance off only for small steps is measured against the steps above. The floor is
# the rounding of a distance computed by a formula that cancels (arccos of an inner product, arcosh
# of a Minkowski product): relative error ≲ ε·(max(1, ‖X‖)/(t‖V‖))², ‖V‖ the Euclidean norm,
# with a factor 100; 2·10⁻⁶ at t = 1e-3 for the Poincaré ball's points, far below the bound.
_DIST_STEPS = (1e-1, 1e-2, 1e-3)


@_property
def check_dist(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``dist`` is a distance, and the one of the metric ``inner`` (float64; spaces that implement it).

    On every shape of the case, at sampled points ``X``, ``Y``, ``W`` (``tol = case.tol[float64]``), per point:

    * ``dist`` is batch-shaped; ``dist(X, X) = 0`` (to ``tol``); ``dist(X, Y) ≥ 0``; symmetric,
      ``dist(Y, X) = dist(X, Y)`` (to ``tol·max(1, dist)``); the triangle inequality
      ``dist(X, W) ≤ dist(X, Y) + dist(Y, W)`` (to ``tol·max(1, dist(X, Y) + dist(Y, W))``), also for
      ``Y = retract(X, V/2)``, ``W = retract(X, V)`` (``V`` below), where it is tight;
    * it agrees with the metric to first order: for ``V = tangent(X, G)`` rescaled to unit length
      in the metric (``inner(X, V, V) = 1``), ``e(t) = |dist(X, retract(X, tV))/t − 1|`` at
      ``t ∈ {0.1, 0.01, 0.001}`` is ``O(t)``: ``e(t) ≤ 10·q·t + rounding`` with ``q = max(e(0.1)/0.1,
      1e-2)`` (Note [dist and the metric]). A ``dist`` off by a constant factor fails, and so do
      ``inner`` and ``egrad_to_rgrad`` that agree with each other on another metric (the Poincaré
      ball's conformal factor ``λ`` in place of ``λ²``), which ``check_metric`` cannot tell.
    """
    _require_f64("dist", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    tol = case.tol[f64]
    eps = torch.finfo(f64).eps
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        X, Y, W = (M.sample(shape, generator=g, dtype=f64) for _ in range(3))
        dxx, dxy = M.dist(X, X), M.dist(X, Y)
        _require_batch_shaped(case, shape, dxx, ctx, "dist(X, X)")
        _require_batch_shaped(case, shape, dxy, ctx, "dist(X, Y)")
        one = torch.ones_like(dxy)
        _scalar_close(dxx, torch.zeros_like(dxx), tol * one, ctx, "dist(X, X) != 0")
        bad = ~(dxy >= 0)
        if bool(bad.any()):
            raise _fail(ctx, f"dist is negative (or NaN) on sampled points: dist(X, Y) = {float(dxy[bad].min()):.3g} "
                        f"{_worst(bad)}")
        _scalar_close(M.dist(Y, X), dxy, tol * torch.maximum(one, dxy), ctx,
                      "dist is not symmetric: dist(Y, X) != dist(X, Y)")
        dyw, dxw = M.dist(Y, W), M.dist(X, W)
        bad = ~(dxw <= dxy + dyw + tol * torch.maximum(one, dxy + dyw))
        if bool(bad.any()):
            i = first_index(bad)
            raise _fail(ctx, f"dist breaks the triangle inequality on sampled X, Y, W: dist(X, W) = {float(dxw[i]):.10g} "
                        f"> dist(X, Y) + dist(Y, W) = {float(dxy[i]):.10g} + {float(dyw[i]):.10g} {_worst(bad)}")
        V, ok = _unit_tangent(case, X, g)
        # and on triples along one retraction curve, X, retract(X, V/2), retract(X, V), where it is (near)
        # tight: a dist that is a superadditive function of the distance (θ + θ³) keeps it on random
        # triples and breaks it there
        Y2, W2 = M.retract(X, 0.5 * V), M.retract(X, V)
        d1, d2, d3 = M.dist(X, Y2), M.dist(Y2, W2), M.dist(X, W2)
        bad = ok & ~(d3 <= d1 + d2 + tol * torch.maximum(one, d1 + d2))
        if bool(bad.any()):
            i = first_index(bad)
            raise _fail(ctx, f"dist breaks the triangle inequality along a retraction curve: dist(X, retract(X, V)) = "
                        f"{float(d3[i]):.10g} > dist(X, Y) + dist(Y, retract(X, V)) = {float(d1[i]):.10g} + "
                        f"{float(d2[i]):.10g} with Y = retract(X, V/2), inner(X, V, V) = 1 {_worst(bad)}")
        # the first order: dist(X, retract(X, tV))/t → √inner(X, V, V) = 1
        ratio = _point_norm(X, p).clamp(min=1.0) / _point_norm(V, p).clamp(min=1e-300)
        errs = []
        for t in _DIST_STEPS:
            d = M.dist(X, M.retract(X, t * V))
            errs.append(torch.where(ok, (d / t - 1.0).abs(), torch.zeros_like(d)))
        q = torch.clamp(errs[0] / _DIST_STEPS[0], min=1e-2)
        for t, e in zip(_DIST_STEPS[1:], errs[1:]):
            bound = 10.0 * q * t + 1e2 * eps * (ratio / t) ** 2
            bad = ~(e <= bound)
            if bool(bad.any()):
                i = first_index(bad)
                table = ", ".join(f"{s:g}: {float(err[i]):.3g}" for s, err in zip(_DIST_STEPS, errs))
                raise _fail(ctx, f"dist does not agree with the metric: |dist(X, retract(X, tV))/t − √inner(X, V, V)| "
                            f"with inner(X, V, V) = 1 is not O(t): at t = {t:g} it is {float(e[i]):.3g} > "
                            f"{float(bound[i]):.3g} = 10·(its value at t = {_DIST_STEPS[0]:g})/t₀·t + rounding "
                            f"{_worst(bad)}; by t: {table} (a dist scaled by a constant, or inner and egrad_to_rgrad "
                            "on another metric than dist's)")


# ---------------------------------------------------------------------------------- expmap
@_property
def check_expmap(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``expmap`` is a retraction onto the space (float64; spaces that implement it).

    On every shape of the case, at sampled ``X``, for ``V = tangent(X, G)`` with ``‖G‖ = 1`` per point: ``expmap(X, 0) == X``
    (to ``tol = case.tol[float64]``, relative to ``max(1, max|X|)``); ``expmap(X, tV)`` is on the space
    by ``case.member`` and by ``contains`` at ``t ∈ {1e-1, 1e-2, 1e-3, 1e-4, 1}``; and it is first
    order, ``d/dt expmap(X, tV)|₀ = V``, by the finite differences of :func:`check_retract_small_steps`:
    ``‖expmap(X, tV) − (X + tV)‖ = O(t²)`` from ``t = 0.1`` down to ``1e-4`` (Note [the small-step
    test]). An ``expmap`` with its step scaled (``expmap(X, 2V)``) or off to first order fails.
    """
    _require_f64("expmap", dtype)
    M, p, tol = case.space, case.space.point_ndim, case.tol[f64]
    for g, shape, ctx, X in _sampled(case, generator):
        E0 = M.expmap(X, torch.zeros_like(X))
        if tuple(E0.shape) != shape or E0.dtype != f64:
            raise _fail(ctx, f"expmap returned shape {tuple(E0.shape)}, {E0.dtype}")
        _vectors_close(E0, X, tol, ctx, "expmap(X, 0) != X")
        G = _randn(shape, f64, g)
        V = M.tangent(X, G / _expand(_point_norm(G, p), p))
        _small_steps(case, ctx, "expmap", M.expmap, X, V)
        _member(case, M.expmap(X, V), f64, ctx, "expmap(X, V) (‖V‖ ≤ 1)")  # _small_steps checks t ≤ 0.1
        for t in (*_STEPS, 1.0):
            c = M.contains(M.expmap(X, t * V))
            if not bool(c.all()):
                raise _fail(ctx, f"contains refuses expmap(X, {t:g} V) (‖V‖ ≤ 1), a point by the case's `member` "
                            f"{_worst(~c)}")


def _pairs(r: float) -> tuple[tuple[float, float], ...]:
    """The ``(s, t)`` of :func:`check_expmap_geodesic`: both within ``r`` of 0."""
    return ((0.0, r), (-0.5 * r, 0.5 * r), (0.25 * r, r), (0.0, 1e-3 * r))


@_property
def check_expmap_geodesic(case: SpaceCase, dtype: torch.dtype = f64, *,
                          generator: Optional[torch.Generator] = None) -> None:
    """``t ↦ expmap(X, tV)`` is a geodesic at unit speed for ``dist`` (float64; spaces that implement
    ``expmap`` and ``dist``).

    On every shape of the case, at sampled ``X``, for ``V = tangent(X, G)`` rescaled to unit length in the metric
    (``inner(X, V, V) = 1``) and ``r = case.geodesic_radius`` (0.5 by default; within the injectivity
    radius): ``dist(expmap(X, sV), expmap(X, tV)) = |t − s|`` for ``(s, t) ∈ {(0, r), (−r/2, r/2),
    (r/4, r), (0, r/1000)}``, per point, to ``tol·max(1, |t − s|)`` with ``tol = case.tol[float64]``.
    An ``expmap`` that walks the geodesic at another speed (its step scaled), a ``dist`` scaled, or an
    ``inner`` on another metric than theirs fails.
    """
    _require_f64("expmap_geodesic", dtype)
    M, tol = case.space, case.tol[f64]
    for g, shape, ctx, X in _sampled(case, generator):
        V, ok = _unit_tangent(case, X, g)
        for s, t in _pairs(case.geodesic_radius):
            d = M.dist(M.expmap(X, s * V), M.expmap(X, t * V))
            _require_batch_shaped(case, shape, d, ctx, "dist")
            want = torch.full_like(d, abs(t - s))
            _scalar_close(torch.where(ok, d, want), want, tol * want.clamp(min=1.0), ctx,
                          f"expmap(X, tV) is not a geodesic at unit speed: dist(expmap(X, {s:g} V), expmap(X, {t:g} V)) "
                          f"!= |t − s| for inner(X, V, V) = 1")


# ---------------------------------------------------------------------------------- logmap
@_property
def check_logmap(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``logmap`` is the inverse of ``expmap`` and lands in the tangent space (float64; spaces that
    implement ``logmap`` and ``expmap``).

    On every shape of the case, at sampled ``X`` (``tol = case.tol[float64]``; vectors compared to ``tol`` relative to
    ``max(1, max|expected|)``), per point: ``logmap(X, X) == 0``; for ``V = tangent(X, G)`` of
    length ``a`` in the metric, ``a ∈ {r, r/100}`` (``r = case.geodesic_radius``, within the
    injectivity radius), ``L = logmap(X, expmap(X, V)) == V``; and ``L`` and ``logmap(X, Y)`` for
    ``Y = retract(X, W)``, ``W`` of length ``r``, are tangent: ``tangent(X, L) == L``. A ``logmap``
    right only to first order (the chord ``tangent(X, Y − X)``) or scaled fails.
    """
    _require_f64("logmap", dtype)
    M, tol, r = case.space, case.tol[f64], case.geodesic_radius
    for g, shape, ctx, X in _sampled(case, generator):
        L0 = M.logmap(X, X)
        if tuple(L0.shape) != shape or L0.dtype != f64:
            raise _fail(ctx, f"logmap returned shape {tuple(L0.shape)}, {L0.dtype}")
        _close(L0, torch.zeros_like(L0), tol * max(1.0, float(X.abs().max())), ctx, "logmap(X, X) != 0")
        V, _ = _unit_tangent(case, X, g)
        W, _ = _unit_tangent(case, X, g)
        for a in (r, 1e-2 * r):
            L = M.logmap(X, M.expmap(X, a * V))
            _vectors_close(L, a * V, tol, ctx, f"logmap(X, expmap(X, V)) != V for V of length {a:g} in the metric: "
                           "logmap is not the inverse of expmap")
            _vectors_close(M.tangent(X, L), L, tol, ctx,
                           f"logmap(X, Y) is not tangent at X for Y = expmap(X, V), V of length {a:g}: tangent(X, L) != L")
        L = M.logmap(X, M.retract(X, r * W))
        _vectors_close(M.tangent(X, L), L, tol, ctx,
                       f"logmap(X, Y) is not tangent at X for Y = retract(X, W), W of length {r:g}: tangent(X, L) != L")


@_property
def check_logmap_dist(case: SpaceCase, dtype: torch.dtype = f64, *,
                      generator: Optional[torch.Generator] = None) -> None:
    """``logmap`` has the length ``dist`` in the metric (float64; spaces that implement ``logmap`` and
    ``dist``): ``inner(X, L, L) = dist(X, Y)²`` for ``L = logmap(X, Y)``, on every shape of the case, at sampled ``X`` and
    ``Y = retract(X, W)`` near it, ``W = tangent(X, G)`` of length ``a ∈ {r, r/100}`` in the metric
    (``r = case.geodesic_radius``), per point, to ``tol·max(1, dist²)`` (``tol = case.tol[float64]``).
    A ``logmap`` or ``dist`` scaled, or an ``inner`` on another metric than theirs, fails.
    """
    _require_f64("logmap_dist", dtype)
    M, tol, r = case.space, case.tol[f64], case.geodesic_radius
    for g, shape, ctx, X in _sampled(case, generator):
        W, _ = _unit_tangent(case, X, g)
        for a in (r, 1e-2 * r):
            Y = M.retract(X, a * W)
            L = M.logmap(X, Y)
            ll = M.inner(X, L, L)
            d = M.dist(X, Y)
            _require_batch_shaped(case, shape, d, ctx, "dist(X, Y)")
            _scalar_close(ll, d * d, tol * (d * d).clamp(min=1.0), ctx,
                          f"inner(X, L, L) != dist(X, Y)² for L = logmap(X, Y), Y = retract(X, W) with W of length "
                          f"{a:g} in the metric")


@_property
def check_sqdist(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``sqdist`` is ``dist²`` and is smooth where ``dist`` is not (float64; spaces that implement
    ``logmap`` and ``dist``). On every shape of the case, at sampled ``X``: ``sqdist(X, Y) = dist(X, Y)²``
    for ``Y = retract(X, W)``, ``W`` of length ``r = case.geodesic_radius`` in the metric (to
    ``tol·max(1, dist²)``); at ``Y = X`` it is 0 with a zero gradient, and its second derivative in
    ``Y`` along a tangent ``V`` is ``2 inner(X, V, V)`` (the Hessian of the squared distance at its
    minimum is twice the metric), from double backward, ``jvp`` of ``jvp`` and ``grad`` of ``jvp``, to ``1e-8``
    relative. A logarithm through norms (whose double backward is NaN at 0) fails here."""
    _require_f64("sqdist", dtype)
    M, tol, r = case.space, case.tol[f64], case.geodesic_radius
    for g, shape, ctx, X in _sampled(case, generator):
        W, _ = _unit_tangent(case, X, g)
        V, _ = _unit_tangent(case, X, g)
        Y = M.retract(X, r * W)
        d = M.dist(X, Y)
        sq = M.sqdist(X, Y)
        _require_batch_shaped(case, shape, sq, ctx, "sqdist(X, Y)")
        _scalar_close(sq, d * d, tol * (d * d).clamp(min=1.0), ctx, f"sqdist(X, Y) != dist(X, Y)² for Y = retract(X, W), "
                      f"W of length {r:g} in the metric")
        g1, second = _second_directional(lambda y: M.sqdist(X, y).sum(), X, V)
        if not bool(torch.isfinite(g1).all()) or (g1.numel() and float(g1.abs().max()) > tol):
            raise _fail(ctx, f"the gradient of sqdist(X, ·) at X is not 0 (max |entry| {float(g1.abs().max())!r})")
        want = float(2.0 * M.inner(X, V, V).sum())
        for how, got in second.items():
            if not abs(got - want) <= 1e-8 * max(1.0, abs(want)):
                raise _fail(ctx, f"the second derivative of sqdist(X, ·) at X along tangent V by {how} is {got!r}, "
                                 f"expected 2 inner(X, V, V) = {want!r}")


# ------------------------------------------------------------------------------- transport
# Note [Which transports are checked]
# check_metric holds every transport to what any vector transport is: linear in V and into the
# tangent space at the target. Whether it preserves the metric, or is the parallel transport along
# the geodesic, is a documented property of a space, not a consequence of the protocol (the default,
# the projection tangent(Y, V), is neither): the case says so (`case.transport`), and the properties
# below hold it to its word. The parallel transport is pinned by two facts about one geodesic from X
# to Y (within the injectivity radius): it carries the geodesic's velocity to its velocity,
# P(logmap(X, Y)) = −logmap(Y, X), and it composes along the geodesic, P_{Z→Y} P_{X→Z} = P_{X→Y} for
# Z on it. An isometric transport that also rotates the tangent space by an angle growing with
# dist(X, Y) passes the isometry and fails both.


def _transport_pairs(case: SpaceCase, X: Tensor, g: torch.Generator) -> list[tuple[str, Tensor]]:
    """Targets ``Y`` for transports from ``X``: near (``retract`` by ``r`` and ``r/100`` in the metric,
    ``r = case.geodesic_radius``), and an independent sample (anywhere)."""
    M = case.space
    W, _ = _unit_tangent(case, X, g)
    r = case.geodesic_radius
    return [(f"Y = retract(X, W), W of length {a:g}", M.retract(X, a * W)) for a in (r, 1e-2 * r)] + [
        ("Y sampled", M.sample(tuple(X.shape), generator=g, dtype=f64))]


@_property
def check_transport_isometry(case: SpaceCase, dtype: torch.dtype = f64, *,
                             generator: Optional[torch.Generator] = None) -> None:
    """``transport`` preserves the metric (float64; cases with ``transport`` ``"isometric"`` or
    ``"parallel"``, Note [Which transports are checked]).

    On every shape of the case, at sampled ``X``, for ``U``, ``V = tangent(X, G)`` of unit length in the
    metric and targets ``Y`` near ``X`` and sampled independently: ``transport(X, X, V) == V`` and
    ``inner(Y, transport(X, Y, U), transport(X, Y, V)) == inner(X, U, V)`` per point, to ``tol``
    (``case.tol[float64]``) relative to ``max(1, max|V|)`` and to 1. The projection
    ``tangent(Y, V)`` (the protocol's default transport) fails where the tangent spaces differ.
    """
    _require_f64("transport_isometry", dtype)
    M, tol = case.space, case.tol[f64]
    for g, shape, ctx, X in _sampled(case, generator):
        U, ok_u = _unit_tangent(case, X, g)
        V, ok_v = _unit_tangent(case, X, g)
        _vectors_close(M.transport(X, X, V), V, tol, ctx, "transport(X, X, V) != V")
        want = M.inner(X, U, V)
        for name, Y in _transport_pairs(case, X, g):
            got = M.inner(Y, M.transport(X, Y, U), M.transport(X, Y, V))
            _require_batch_shaped(case, shape, got, ctx, "inner")
            got = torch.where(ok_u & ok_v, got, want)
            _scalar_close(got, want, tol * torch.ones_like(want), ctx,
                          f"transport is not an isometry ({name}): inner(Y, T(U), T(V)) != inner(X, U, V) for U, V "
                          "of unit length")


@_property
def check_transport_parallel(case: SpaceCase, dtype: torch.dtype = f64, *,
                             generator: Optional[torch.Generator] = None) -> None:
    """``transport`` is the parallel transport along the geodesic (float64; cases with ``transport``
    ``"parallel"`` whose space implements ``expmap`` and ``logmap``, Note [Which transports are checked]).

    On every shape of the case, at sampled ``X`` and ``Y = expmap(X, W)`` for ``W`` of length
    ``a ∈ {r, r/100}`` in the metric (``r = case.geodesic_radius``), with ``Z = expmap(X, W/2)`` the
    geodesic's midpoint and ``V = tangent(X, G)`` of unit length, per point, to ``tol``
    (``case.tol[float64]``) relative to ``max(1, max|expected|)``:
    ``transport(X, Y, logmap(X, Y)) == −logmap(Y, X)`` (the velocity is carried to the velocity) and
    ``transport(Z, Y, transport(X, Z, V)) == transport(X, Y, V)`` (it composes along the geodesic).
    """
    _require_f64("transport_parallel", dtype)
    M, tol, r = case.space, case.tol[f64], case.geodesic_radius
    for g, shape, ctx, X in _sampled(case, generator):
        W, _ = _unit_tangent(case, X, g)
        V, _ = _unit_tangent(case, X, g)
        for a in (r, 1e-2 * r):
            Y = M.expmap(X, a * W)
            Z = M.expmap(X, 0.5 * a * W)
            _vectors_close(M.transport(X, Y, M.logmap(X, Y)), -M.logmap(Y, X), tol, ctx,
                           f"transport(X, Y, logmap(X, Y)) != −logmap(Y, X) for Y = expmap(X, W), W of length {a:g}: "
                           "not the parallel transport along the geodesic (the velocity is not carried to the velocity)")
            _vectors_close(M.transport(Z, Y, M.transport(X, Z, V)), M.transport(X, Y, V), tol, ctx,
                           f"transport(Z, Y, transport(X, Z, V)) != transport(X, Y, V) for Z the midpoint of the geodesic "
                           f"from X to Y = expmap(X, W), W of length {a:g}: not the parallel transport along it")
