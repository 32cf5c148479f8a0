"""Properties that pin the geometry, not just the plumbing: the tangent space is the whole tangent
space, ``project`` is the nearest point, ``contains`` flips at the documented tolerance, and
``sample`` follows its documented distribution."""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Optional

import torch
from torch.func import grad, jacfwd

from .._errors import ManifoldError
from ._case import SpaceCase, documented_atol
from ._properties import (
    _batch_shape,
    _close,
    _ctx,
    _derivative_shapes,
    _fail,
    _gen,
    _point_and_base,
    _property,
    _randn,
    _require_f64,
    _UsageError,
    _worst,
    f64,
)

__all__ = [
    "FALSE_ALARM",
    "check_contains_batch",
    "check_float32_maps",
    "check_grad_float32",
    "check_membership",
    "check_membership_large",
    "check_metric",
    "check_project_nearest",
    "check_project_nearest_chart",
    "check_project_normal",
    "check_retract_refines",
    "check_retract_small_steps",
    "check_sample_distribution",
    "check_sample_distribution_f32",
    "check_sample_independent",
    "check_tangent_space",
]

Tensor = torch.Tensor
f32 = torch.float32

# Points with more entries than this are not differentiated into full Jacobians.
_JACOBIAN_MAX = 64
# Samples per point shape of the distribution test.
_N_SAMPLES = 4000
#: Probability that ``check_sample_distribution`` fails on a correct ``sample``, per case and
#: point shape (Bonferroni over its statistics, normal approximation of the sample means).
FALSE_ALARM = 1e-6


def _point_norm(A: Tensor, point_ndim: int) -> Tensor:
    """Frobenius norm over the point dims: batch-shaped."""
    if point_ndim == 0:
        return A.abs()
    return torch.linalg.vector_norm(A.flatten(start_dim=A.ndim - point_ndim), dim=-1)


# ------------------------------------------------------------------------- tangent space
@_property
def check_tangent_space(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``tangent`` projects onto the *whole* tangent space, and onto nothing more (float64).

    At points ``X = to_manifold(Z, base)``, with ``J`` the Jacobian of the chart ``Z ↦
    to_manifold(Z, base)`` and ``P`` the matrix of ``G ↦ tangent(X, G)`` (both formed with
    ``torch.func.jacfwd``, on every point shape of the case with at most 64 entries, unbatched):

    * ``P J = J``: the projection fixes every vector in the image of the chart's differential
      (a projection onto part of the tangent space, such as ``0·G``, fails);
    * ``rank P = dim M`` (``case.dim``), and ``rank P J = dim M`` except at ``Z = 0`` with
      ``base=None`` (a singular point of a rank-constrained set): the image is the whole
      tangent space and nothing more (the Grassmannian's horizontal space is smaller than
      the Stiefel tangent space it sits in).

    For a quotient (``case.quotient``: points are representatives, as the Grassmannian's
    frames) the chart's differential away from its centre has a vertical part that ``tangent``
    removes, so there only the rank of ``P J`` is asserted; ``P J = J`` at the centres.

    The points: a random ``Z`` at ``base=None`` and at a sampled base, the chart centre at a
    sampled base (``from_manifold(sample)``) and ``Z = 0`` at ``base=None`` (if
    ``case.defined_at_zero``).
    """
    _require_f64("tangent_space", dtype)
    g = _gen(generator)
    M = case.space
    ran = False
    for ps in case.point_shapes:
        n = math.prod(ps)
        if n == 0 or n > _JACOBIAN_MAX:
            continue
        ran = True
        ctx = _ctx(case, ps, f64)
        _, Zc, base = _point_and_base(case, ps, f64, g)
        # (name, Z, base, generic: rank J = dim M expected, centre: Z is a chart centre)
        points: list[tuple[str, Tensor, Any, bool, bool]] = [
            ("a random Z", _randn(ps, f64, g), None, True, False),
            ("a random Z at a sampled base", Zc + 0.5 * _randn(ps, f64, g), base, True, False),
            ("the chart centre at a sampled base", Zc, base, True, True),
        ]
        if case.defined_at_zero:
            points.append(("Z = 0", torch.zeros(ps, dtype=f64), None, False, True))
        d = None if case.dim is None else int(case.dim(ps))
        for name, Z, b, generic, centre in points:

            def chart(z: Tensor, b: Any = b) -> Tensor:
                return M.to_manifold(z, b)

            X = chart(Z)
            J = jacfwd(chart)(Z).reshape(n, n)
            P = jacfwd(lambda G: M.tangent(X, G))(torch.zeros_like(X)).reshape(n, n)
            if not (bool(torch.isfinite(J).all()) and bool(torch.isfinite(P).all())):
                raise _fail(ctx, f"the chart's Jacobian or the tangent projection at {name} is not finite")
            PJ = P @ J
            if centre or not case.quotient:
                err = float((PJ - J).abs().max())
                scale = max(1.0, float(J.abs().max()))
                if err > 1e-8 * scale:
                    raise _fail(ctx, f"tangent(X, ·) does not fix the image of the chart's differential at {name}: "
                                f"max |P J − J| = {err:.3g} (|J| ≤ {scale:.3g}); the projection misses part of the tangent space")
            if d is None:
                continue
            rp = int((torch.linalg.svdvals(P) > 0.5).sum())
            if rp != d:
                raise _fail(ctx, f"the tangent projection at {name} has rank {rp}, expected dim M = {d}")
            if generic:
                s = torch.linalg.svdvals(PJ)
                rj = int((s > 1e-7 * s[0]).sum()) if bool(s[0] > 0) else 0
                if rj != d:
                    raise _fail(ctx, f"the projected differential of the chart at {name} has rank {rj}, expected dim M = {d}")
    if not ran:
        raise _fail(_ctx(case, case.shapes[0], f64), f"no point shape with at most {_JACOBIAN_MAX} entries to form Jacobians on")


# ------------------------------------------------------------------------------- metric
def _euclid(A: Tensor, B: Tensor, point_ndim: int) -> Tensor:
    """``Re ⟨A, B⟩`` of the ambient representation per point (``Re Σ conj(a) b``), batch-shaped."""
    P = A.conj() * B if A.is_complex() else A * B
    P = P.sum(dim=tuple(range(-point_ndim, 0))) if point_ndim else P
    return P.real if P.is_complex() else P


def _scalar_close(actual: Tensor, expected: Tensor, bound: Tensor, ctx: str, what: str) -> None:
    """``|actual − expected| ≤ bound`` per point (batch-shaped tensors), NaN failing."""
    err = (actual - expected).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = tuple(int(j) for j in torch.nonzero(bad)[0]) if bad.ndim else ()
        raise _fail(ctx, f"{what}: {float(actual[i]):.10g} != {float(expected[i]):.10g} (|difference| "
                    f"{float(err[i]):.3g} > {float(bound[i]):.3g}) {_worst(bad)}")


def _vectors_close(actual: Tensor, expected: Tensor, tol: float, ctx: str, what: str) -> None:
    """``_close`` with ``atol`` scaled by ``max(1, max |expected|)``."""
    _close(actual, expected, tol * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0), ctx, what)


@_property
def check_metric(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """The metric is a metric, ``egrad_to_rgrad`` is the gradient for it, ``transport`` lands where it should.

    At sampled points ``X``, for Gaussian ambient ``G`` and tangent ``U = tangent(X, ·)``,
    ``V = tangent(X, ·)`` (``⟨·, ·⟩`` the Euclidean product of the ambient representation, the
    real part ``Re Σ conj(a) b`` for complex tensors: Note [Complex] in
    ``geofunc/spaces/_base.py``), per point:

    * ``R = egrad_to_rgrad(X, G)`` is tangent, ``tangent(X, R) == R``, and it is the Riemannian
      gradient for ``inner``: ``inner(X, R, V) == ⟨G, V⟩`` (``Df(X)[V]`` for ``G = ∇f(X)``; with
      ``R`` tangent this pins ``R`` whatever the metric: the Poincaré ball's ``G/λ²``, the
      Lorentz model's Minkowski gradient, Birkhoff's Fisher gradient, the projection for an
      embedded metric). ``inner`` and ``egrad_to_rgrad`` that agree with each other on another
      metric pass here: :func:`~geofunc.testing.check_dist` ties ``inner`` to ``dist`` where the
      space implements it;
    * ``inner`` is batch-shaped, symmetric, bilinear (``inner(X, 2U − 3V, V) ==
      2 inner(X, U, V) − 3 inner(X, V, V)``) and positive: ``inner(X, V, V) > 0`` where ``V ≠ 0``;
    * ``T = transport(X, Y, V)`` is tangent at ``Y``, ``tangent(Y, T) == T``, for ``Y =
      retract(X, W)`` (near) and a sampled ``Y`` (far); ``transport(X, X, V) == V``; and
      ``transport`` is linear in ``V`` (a vector transport is a linear map ``T_X → T_Y``):
      ``transport(X, Y, 2U − 3V) == 2 transport(X, Y, U) − 3 transport(X, Y, V)`` at the sampled ``Y``
      (a term quadratic in ``V`` that vanishes at ``Y = X`` fails).

    Tolerances: ``tol = case.tol[dtype]``; scalar identities to ``tol·max(1, s)`` with ``s`` the
    Cauchy–Schwarz bound of the terms (``‖G‖‖V‖`` for the gradient identity, ``|U|_X |V|_X`` in
    the metric's own norm for symmetry and bilinearity); vector identities to ``tol`` relative to
    ``max(1, max |entry|)``.
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        bshape = tuple(shape[: len(shape) - p])
        X = M.sample(shape, generator=g, dtype=dtype)
        G = _randn(shape, dtype, g)
        U, V, W = (M.tangent(X, _randn(shape, dtype, g)) for _ in range(3))
        # positivity first: the metric's norms scale the other bounds
        uu, vv = M.inner(X, U, U), M.inner(X, V, V)
        if tuple(vv.shape) != bshape:
            raise _fail(ctx, f"inner returned shape {tuple(vv.shape)}, expected the batch shape {bshape}")
        for name, A, aa in (("U", U, uu), ("V", V, vv)):
            nonzero = _point_norm(A, p) > 0
            bad = nonzero & ~(aa > 0)
            if bool(bad.any()):
                raise _fail(ctx, f"inner is not positive on tangent vectors: inner(X, {name}, {name}) = "
                            f"{float(aa[bad].min()):.3g} ≤ 0 for a non-zero tangent {name} {_worst(bad)}")
        nu, nv = uu.clamp(min=0).sqrt(), vv.clamp(min=0).sqrt()
        one = torch.ones_like(nv)
        _scalar_close(M.inner(X, U, V), M.inner(X, V, U), tol * torch.maximum(one, nu * nv), ctx,
                      "inner is not symmetric: inner(X, U, V) != inner(X, V, U)")
        _scalar_close(M.inner(X, 2.0 * U - 3.0 * V, V), 2.0 * M.inner(X, U, V) - 3.0 * vv,
                      tol * torch.maximum(one, (2.0 * nu + 3.0 * nv) * nv), ctx,
                      "inner is not bilinear: inner(X, 2U − 3V, V) != 2 inner(X, U, V) − 3 inner(X, V, V)")
        # the Riemannian gradient
        R = M.egrad_to_rgrad(X, G)
        if tuple(R.shape) != shape or R.dtype != dtype:
            raise _fail(ctx, f"egrad_to_rgrad returned shape {tuple(R.shape)}, {R.dtype}")
        _vectors_close(M.tangent(X, R), R, tol, ctx,
                       "egrad_to_rgrad(X, G) is not tangent: tangent(X, R) != R for R = egrad_to_rgrad(X, G)")
        for name, A in (("V", V), ("W", W)):
            _scalar_close(M.inner(X, R, A), _euclid(G, A, p),
                          tol * torch.maximum(one, _point_norm(G, p) * _point_norm(A, p)), ctx,
                          f"egrad_to_rgrad is not the gradient for inner: inner(X, egrad_to_rgrad(X, G), {name}) "
                          f"!= ⟨G, {name}⟩ for a tangent {name}")
        # transport
        _vectors_close(M.transport(X, X, V), V, tol, ctx, "transport(X, X, V) != V")
        for yname, Y in (("Y = retract(X, W) near X", M.retract(X, W)),
                         ("a sampled Y", M.sample(shape, generator=g, dtype=dtype))):
            T = M.transport(X, Y, V)
            if tuple(T.shape) != shape or T.dtype != dtype:
                raise _fail(ctx, f"transport returned shape {tuple(T.shape)}, {T.dtype}")
            _vectors_close(M.tangent(Y, T), T, tol, ctx,
                           f"transport(X, Y, V) is not tangent at Y for {yname}: tangent(Y, T) != T")
        # linearity, at the last (sampled, far) Y
        _vectors_close(M.transport(X, Y, 2.0 * U - 3.0 * V), 2.0 * M.transport(X, Y, U) - 3.0 * T, tol, ctx,
                       "transport is not linear in V: transport(X, Y, 2U − 3V) != 2 transport(X, Y, U) − "
                       "3 transport(X, Y, V) for a sampled Y")


# ------------------------------------------------------------------- small-step retraction
# Note [the small-step test]
# A retraction is first-order: e(t) = ‖retract(X, tV) − (X + tV)‖ = O(t²). check_retract looks at
# t = 0 (value, and the derivative by jvp) and at two large steps; a map can be right there and
# wrong in between: one that drops steps below a threshold (but not 0), or one off by c‖tV‖ in
# some direction (torch differentiates ‖tV‖ to 0 at t = 0, so the jvp sees nothing), is off by
# O(t). So e(t) is measured at t = 1e-1 … 1e-4 and held to the constant the map shows at the
# largest step: e(t) ≤ 10·q·t² + floor, q = e(0.1)/0.1² (at least 1e-2, for flat spaces whose
# retraction is exact). For a true retraction e(t)/t² tends to the size of its second-order term
# and is nearly constant over these steps (the built-in spaces stay below 0.14 of the bound); an
# O(t) error grows e(t)/t² by 10 per decade, past the factor 10 within one decade, and an error
# that appears only below some step size is measured against the constant of the steps above it.
# The floor, 1e3·ε·max(1, ‖X‖), is rounding: at t = 1e-4, t² = 1e-8 is far above it in float64,
# which is why the property runs in float64 only. V is tangent(X, G) for a unit G, not a tangent
# vector rescaled to unit norm: where the tangent space is {0} (Gr(n, n), a 1×1 Skew) that would
# blow rounding up to a unit vector that no retraction follows.
_STEPS = (1e-1, 1e-2, 1e-3, 1e-4)


@_property
def check_retract_small_steps(case: SpaceCase, dtype: torch.dtype = f64, *,
                              generator: Optional[torch.Generator] = None) -> None:
    """``retract`` is a retraction at every step size, not only at those of :func:`check_retract`
    (float64).

    For sampled ``X`` and ``V = tangent(X, G)`` with ``‖G‖ = 1`` per point (so ``‖V‖ ≤ 1``), at
    ``t ∈ {1e-1, 1e-2, 1e-3, 1e-4}``: ``retract(X, tV)`` is on the space (``case.member``), and
    per point ``e(t) = ‖retract(X, tV) − (X + tV)‖ ≤ 10·q·t² + 1e3·ε·max(1, ‖X‖)`` with
    ``q = max(e(0.1)/0.1², 1e-2)``: the error is ``O(t²)``, with the constant the map shows at the
    largest step (Note [the small-step test]). A retraction right at ``t = 0`` (value and ``jvp``,
    which ``check_retract`` checks) and at large steps but wrong in between (a dead zone that drops
    small steps, a step off by ``O(‖tV‖)``) fails. ``retract(X, 0) == X`` is ``check_retract``'s.
    """
    _require_f64("retract_small_steps", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        X = M.sample(shape, generator=g, dtype=f64)
        G = _randn(shape, f64, g)
        V = M.tangent(X, G / _point_norm(G, p).reshape(tuple(G.shape[: G.ndim - p]) + (1,) * p))
        _small_steps(case, ctx, "retract", M.retract, X, V)


@_property
def check_retract_refines(case: SpaceCase, dtype: torch.dtype = f64, *,
                          generator: Optional[torch.Generator] = None) -> None:
    """``retract`` does not carry its base point's error (float64): an optimizer's points do not drift.

    For sampled ``X``, ``Y = case.perturb(X, 1e-6)`` (off the space by 1e-6 in the space's measure,
    as rounding leaves a point after many steps in float32, or one step in bf16) and a tangent
    ``V`` at ``Y``: ``retract(Y, 0.1 V)`` is on the space by the case's ``member`` at ``case.tol``
    (float64's, ~1e-10), so the error is not passed on. A retraction that multiplies ``Y`` by a
    group element (``Y expm(...)``) or adds to it without correcting it kept the 1e-6, and an
    optimizer's float32 points drifted off the space linearly in the number of steps (Note
    [Retractions that multiply] in ``geofunc/_linalg.py``). Applies where the case gives ``perturb``.
    """
    _require_f64("retract_refines", dtype)
    if case.perturb is None:
        raise _UsageError(f"{case.id}: check_retract_refines needs `case.perturb`")
    g = _gen(generator)
    M = case.space
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        X = M.sample(shape, generator=g, dtype=f64)
        Y = case.perturb(X, 1e-6)
        if Y is None:
            continue
        V = M.tangent(Y, _randn(shape, f64, g))
        R = M.retract(Y, 0.1 * V)
        if not (bool(torch.isfinite(R).all()) and bool(torch.as_tensor(case.member(R, case.tol[f64])).all())):
            raise _fail(ctx, f"retract(Y, 0.1 V) from a point Y off the space by 1e-6 is not on the space by the "
                             f"case's `member` (atol {case.tol[f64]:g}): the retraction carries its base point's error, "
                             f"and an optimizer's points drift")


def _small_steps(case: SpaceCase, ctx: str, name: str, fn: Callable[[Tensor, Tensor], Tensor], X: Tensor,
                 V: Tensor) -> None:
    """Note [the small-step test] of the map ``fn`` (``retract``, ``expmap``) at float64 points ``X``
    and tangent ``V`` with ``‖V‖ ≤ 1``: ``fn(X, tV)`` is on the space by ``case.member`` and
    ``‖fn(X, tV) − (X + tV)‖ = O(t²)``, per point, at the steps ``_STEPS``."""
    p = case.space.point_ndim
    eps = torch.finfo(f64).eps
    floor = 1e3 * eps * _point_norm(X, p).clamp(min=1.0)
    errs = []
    for t in _STEPS:
        Xt = fn(X, t * V)
        if not (bool(torch.isfinite(Xt).all()) and bool(torch.as_tensor(case.member(Xt, case.tol[f64])).all())):
            raise _fail(ctx, f"{name}(X, tV) at t = {t:g} (‖V‖ ≤ 1) is not on the space by the case's `member`")
        errs.append(_point_norm(Xt - (X + t * V), p))
    q = torch.clamp(errs[0] / _STEPS[0] ** 2, min=1e-2)
    for t, e in zip(_STEPS[1:], errs[1:]):
        bound = 10.0 * q * t * t + floor
        bad = ~(e <= bound)
        if bool(bad.any()):
            i = tuple(int(j) for j in torch.nonzero(bad)[0]) if bad.ndim else ()
            table = ", ".join(f"{s:g}: {float(err[i]):.3g}" for s, err in zip(_STEPS, errs))
            raise _fail(ctx, f"{name}(X, tV) − (X + tV) is not O(t²) (‖V‖ ≤ 1): at t = {t:g} the error is "
                        f"{float(e[i]):.3g} > {float(bound[i]):.3g} = 10·(error at t = {_STEPS[0]:g})/t₀²·t² + "
                        f"rounding {_worst(bad)}; errors by t: {table}")


# ------------------------------------------------------------------------ nearest point
def _project_inputs(case: SpaceCase, shape: tuple[int, ...], g: torch.Generator) -> list[tuple[str, Tensor]]:
    X = case.space.sample(shape, generator=g, dtype=f64)
    return [("a Gaussian Y", _randn(shape, f64, g)),
            ("Y = X + 0.1 G near a point X", X + 0.1 * _randn(shape, f64, g)),
            ("Y = −X + 0.1 G far from the space", -X + 0.1 * _randn(shape, f64, g))]


@_property
def check_project_normal(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """First-order optimality of ``project`` (float64): ``Y − project(Y)`` is normal to the tangent
    space at ``project(Y)``, i.e. ``‖tangent(P, Y − P)‖ ≤ 10·tol·max(1, ‖Y‖)`` per point.

    Inputs: a Gaussian ``Y``, ``X + 0.1 G`` and ``−X + 0.1 G`` for sampled ``X``. Holds where
    ``project`` is the nearest point and ``project(Y)`` a smooth point of the space; a set with
    a boundary (``project`` lands on it, where the normal cone is not the normal space) or an
    open set whose ``project`` pushes points inside skips it with the reason (``case.skip``).
    """
    _require_f64("project_normal", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    tol = 10.0 * case.tol[f64]
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        for name, Y in _project_inputs(case, shape, g):
            P = M.project(Y)
            T = M.tangent(P, Y - P)
            nT = _point_norm(T, p)
            bound = tol * _point_norm(Y, p).clamp(min=1.0)
            bad = ~(nT <= bound)
            if bool(bad.any()):
                raise _fail(ctx, f"Y − project(Y) is not normal to the tangent space at project(Y) for {name}: "
                            f"‖tangent(P, Y − P)‖ = {float(nT.max()):.3g} > {float(bound.max()):.3g} {_worst(bad)}")


@_property
def check_project_nearest(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``project(Y)`` is the nearest point: no point of the space comes closer to ``Y`` (float64).

    With ``P = project(Y)``, every candidate ``X`` must satisfy ``‖Y − X‖ ≥ ‖Y − P‖ −
    (case.project_slack + tol)·max(1, ‖Y‖)`` per point. Candidates: retractions
    ``retract(P, tV)`` for ``t ∈ {1e-3, 1e-2, 0.1, 0.5, 1}`` along the descent direction
    ``V = tangent(P, Y − P)`` and two random tangent directions, and samples. Inputs as in
    :func:`check_project_normal`. For an open space whose ``project`` returns the nearest point of
    the closure pushed inside by a documented margin, ``case.project_slack`` is that margin
    (relative to ``max(1, ‖Y‖)``).
    """
    _require_f64("project_nearest", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    slack = case.project_slack + case.tol[f64]
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        for name, Y in _project_inputs(case, shape, g):
            P = M.project(Y)
            d0 = _point_norm(Y - P, p)
            bound = d0 - slack * _point_norm(Y, p).clamp(min=1.0)
            candidates: list[tuple[str, Tensor]] = [("a sample", M.sample(shape, generator=g, dtype=f64))]
            directions = [("the descent direction tangent(P, Y − P)", M.tangent(P, Y - P))]
            directions += [(f"random tangent direction {i}", M.tangent(P, _randn(shape, f64, g))) for i in (1, 2)]
            for dname, V in directions:
                for t in (1e-3, 1e-2, 0.1, 0.5, 1.0):
                    candidates.append((f"retract(P, {t:g}·V) along {dname}", M.retract(P, t * V)))
            for cname, X in candidates:
                d = _point_norm(Y - X, p)
                bad = d < bound
                if bool(bad.any()):
                    i = torch.nonzero(bad)[0] if bad.ndim else ()
                    i = tuple(int(j) for j in i)
                    raise _fail(ctx, f"project is not the nearest point for {name}: {cname} is at distance "
                                f"{float(d[i]):.6g} < ‖Y − project(Y)‖ = {float(d0[i]):.6g} {_worst(bad)}")


# ----------------------------------------------------------------------- membership
def _judge(M: Any, Y: Tensor, ctx: str, what: str, inside: bool, atol: Optional[float] = None) -> None:
    """``contains(Y)`` accepts and ``check(Y)`` passes every point of ``Y`` (``inside``), or ``contains``
    refuses every one and ``check`` raises; with ``atol``, ``contains(Y, atol)``/``check(Y, atol)``
    judge by the ``atol`` given, not the default (``check_membership``: a space that ignored an
    explicit ``atol`` passed every other property)."""
    kw = {} if atol is None else {"atol": atol}
    call = "" if atol is None else f"(Y, atol={atol:g})"
    why = "" if atol is None else ": the explicit atol is not the tolerance"
    got = M.contains(Y, **kw)
    if inside and not bool(got.all()):
        raise _fail(ctx, f"contains{call} refuses {what} {_worst(~got)}{why}")
    if not inside and bool(got.any()):
        raise _fail(ctx, f"contains{call} accepts {what} {_worst(got)}{why or ': the tolerance is looser than documented'}")
    try:
        M.check(Y, **kw)
    except ManifoldError as e:
        if inside:
            raise _fail(ctx, f"check{call} raises on {what}{why}: {e}") from None
    else:
        if not inside:
            raise _fail(ctx, f"check{call} passes {what}{why}")


@_property
def check_membership(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``contains`` and ``check`` flip at the documented tolerance, per dtype: between 0.5× and 2×
    of it (so certainly between 0.1× and 10×).

    For sampled points ``X`` and ``atol =`` :func:`~geofunc.testing.documented_atol` ``(dtype,
    point shape)`` (``1e-4`` float32, ``1e-9`` float64, written independently of the library),
    ``Y = case.perturb(X, c·atol)`` violates the constraint by exactly ``c·atol``: for
    ``c ∈ {0.1, 0.5}`` every point is accepted by ``contains(Y)`` and ``check(Y)`` passes; for
    ``c ∈ {2, 10}`` every point is refused and ``check(Y)`` raises ``ManifoldError``. An explicit
    ``atol`` is the tolerance: ``contains(Y, atol=a)`` and ``check(Y, atol=a)`` refuse the point at
    ``c = 0.5`` with ``a`` 4× below its violation and accept the one at ``c = 2`` with ``a`` 4× above.
    The case's own ``member`` predicate must agree at ``atol`` (else the case is wrong). Applies where
    the case gives ``perturb``.
    """
    if case.perturb is None:
        raise _UsageError(f"{case.id}: check_membership needs `case.perturb`")
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    ran = False
    explicit: list[tuple[Tensor, str, str, float, bool]] = []
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X = M.sample(shape, generator=g, dtype=dtype)
        atol = documented_atol(dtype, tuple(shape[len(shape) - p:]) if p else ())
        for c, inside in ((0.1, True), (0.5, True), (2.0, False), (10.0, False)):
            Y = case.perturb(X, c * atol)
            if Y is None:
                continue
            ran = True
            what = f"a point perturbed by {c:g}× the documented atol {atol:g}"
            if bool(torch.as_tensor(case.member(Y, atol)).all()) != inside:
                raise _fail(ctx, f"the case's `member` predicate {'refuses' if inside else 'accepts'} {what} (a bad case)")
            _judge(M, Y, ctx, what, inside)
            if c in (0.5, 2.0):  # an explicit atol is the tolerance: 4× either side of the violation
                explicit.append((Y, ctx, what, c * atol * (0.25 if inside else 4.0), not inside))
    if not ran:
        raise _fail(_ctx(case, case.shapes[0], dtype), "case.perturb gave no perturbation at any shape "
                    "(skip the property with a reason instead)")
    for Y, ctx, what, a, accept in explicit:  # after the default tolerance's verdicts (their messages first)
        _judge(M, Y, ctx, what, accept, atol=a)


# ----------------------------------------------------------------------- distribution
def _z_threshold(m: int) -> float:
    """The two-sided normal quantile at ``FALSE_ALARM / m`` (Bonferroni over ``m`` statistics)."""
    return statistics.NormalDist().inv_cdf(1.0 - FALSE_ALARM / (2.0 * m))


@_property
def check_sample_distribution(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``sample`` follows its documented distribution, by moments (float64).

    For every point shape of the case, ``N = 4000`` samples are drawn in one call and every
    statistic of ``case.moments`` (e.g. ``E[X_ij] = 0``, ``E[X_ij²] = 1/n`` and trace moments for
    Haar measure; ``E[x] = 0``, ``E[x xᵀ] = r² I/n`` and ``P(x_i > 0) = 1/2`` for the uniform
    sphere) is z-tested: ``|mean − expected| · √N / sd ≤ z*``, ``sd`` the sample standard deviation
    and ``z*`` the two-sided normal quantile at ``FALSE_ALARM / m`` for ``m`` statistics
    (Bonferroni; ``z* ≈ 5.3`` for ``m = 10``, ``5.7`` for ``m = 100``). So a correct ``sample``
    fails with probability below ``FALSE_ALARM = 1e-6`` per case and point shape (under the
    normal approximation of a mean of 4000 draws); the fixed seed makes each run reproducible.
    A statistic with ``sd = 0`` must equal its expectation to ``1e-9``.
    """
    _require_f64("sample_distribution", dtype)
    if case.moments is None:
        raise _UsageError(f"{case.id}: check_sample_distribution needs `case.moments`")
    g = _gen(generator)
    N = _N_SAMPLES
    for ps in case.point_shapes:
        ctx = _ctx(case, (N, *ps), f64)
        X = case.space.sample((N, *ps), generator=g, dtype=f64)
        _moments_z_test(case, X, ctx, N, const_sd=1e-12, const_tol=1e-9, what="sample statistic")


def _moments_z_test(case: SpaceCase, X: Tensor, ctx: str, N: int, *, const_sd: float, const_tol: float,
                    what: str) -> None:
    """The z-test of ``case.moments(X)`` for ``N`` float64 points ``X`` (``check_sample_distribution``):
    a statistic with ``sd ≤ const_sd`` (relative to ``max(1, |expected|)``) must equal its expectation
    to ``const_tol`` (relative)."""
    assert case.moments is not None
    stats = case.moments(X)
    rows: list[tuple[str, Tensor, Tensor]] = []
    for name, (values, expected) in stats.items():
        v = values.reshape(N, -1).to(f64)
        mu = torch.as_tensor(expected, dtype=f64).expand(values.shape[1:]).reshape(-1)
        rows.append((name, v, mu))
    m = sum(v.shape[1] for _, v, _ in rows)
    if m == 0:
        raise _fail(ctx, "case.moments gave no statistic")
    zstar = _z_threshold(m)
    for name, v, mu in rows:
        mean, sd = v.mean(0), v.std(0)
        const = sd <= const_sd * mu.abs().clamp(min=1.0)
        z = torch.where(const, torch.zeros_like(mean), (mean - mu) * math.sqrt(N) / torch.where(const, torch.ones_like(sd), sd))
        off = const & ((mean - mu).abs() > const_tol * mu.abs().clamp(min=1.0))
        if bool(off.any()):
            j = int(torch.nonzero(off)[0])
            raise _fail(ctx, f"{what} {name}[{j}] is constant {float(mean[j]):.6g} over {N} draws, "
                        f"expected {float(mu[j]):.6g}: not the documented distribution")
        j = int(z.abs().argmax())
        if float(z[j].abs()) > zstar:
            raise _fail(ctx, f"{what} {name}[{j}]: mean {float(mean[j]):.5g} over {N} draws, expected "
                        f"{float(mu[j]):.5g} (z = {float(z[j]):.2f}, |z| > {zstar:.2f}: false-alarm rate "
                        f"{FALSE_ALARM:g} per check): not the documented distribution")


# ------------------------------------------------------------------- float32 derivatives
@_property
def check_grad_float32(case: SpaceCase, dtype: torch.dtype = f32, *, generator: Optional[torch.Generator] = None) -> None:
    """float32 derivatives are float64's, rounded: the gradient of ``⟨C, to_manifold(Z, base)⟩``
    and of ``⟨C, retract(X, V)⟩`` (in ``X`` and ``V``) computed in float32 equals the one computed in
    float64 at the same (rounded) inputs within ``(tol[float32] + case.float32_shift)·max(1,
    max|grad|)``, on the smoke shape and its transpose. Applies to cases that run float32."""
    if dtype != f32:
        raise _UsageError(f"grad_float32 runs in float32 only, got {dtype}")
    g = _gen(generator)
    M = case.space
    tol = case.tol[f32] + case.float32_shift
    for shape in _derivative_shapes(case):
        ctx = _ctx(case, shape, f32)
        X, Zc, base = _point_and_base(case, shape, f32, g)
        Z, C, G = (_randn(shape, f32, g) for _ in range(3))
        V = M.tangent(X, G)

        def lift(t: Any) -> Any:
            return torch.utils._pytree.tree_map(lambda a: a.to(f64) if isinstance(a, Tensor) else a, t)

        checks: list[tuple[str, Callable[..., Tensor], tuple]] = [
            ("to_manifold at a random Z", lambda z, b: (M.to_manifold(z, b) * C.to(z.dtype)).sum(), (Z, None)),
            ("to_manifold at a random Z at a sampled base", lambda z, b: (M.to_manifold(z, b) * C.to(z.dtype)).sum(),
             (Zc + 0.5 * Z, base)),
            ("retract in (X, V)", lambda x, v: (M.retract(x, v) * C.to(x.dtype)).sum(), (X, 0.5 * V)),
        ]
        for name, fn, args in checks:
            argnums = (0, 1) if name.startswith("retract") else 0
            g32 = grad(fn, argnums=argnums)(*args)
            g64 = grad(fn, argnums=argnums)(*lift(args))
            for a, b in zip(torch.utils._pytree.tree_leaves(g32), torch.utils._pytree.tree_leaves(g64)):
                if not bool(torch.isfinite(a).all()):
                    raise _fail(ctx, f"the float32 gradient of {name} is not finite")
                scale = max(1.0, float(b.abs().max()))
                _close(a.to(f64), b, tol * scale, ctx, f"the float32 gradient of {name} != the float64 one")


@_property
def check_float32_maps(case: SpaceCase, dtype: torch.dtype = f32, *, generator: Optional[torch.Generator] = None) -> None:
    """float32 maps are float64's, rounded: ``tangent(X, G)``, ``egrad_to_rgrad(X, G)``,
    ``transport(X, Y, V)`` and ``inner(X, V, W)`` computed in float32 equal the same maps computed in
    float64 at the same (float32) inputs, within ``(tol[float32] + case.float32_shift)·max(1,
    max|result|)``, on every shape of the case (``X``, ``Y`` sampled in float32, ``V``, ``W``
    tangent). A map wrong in float32 only (a rank-deficient projection, a factor off, a branch on the
    dtype) fails, where the float32 properties that test a map against itself do not. Applies to
    cases that run float32."""
    if dtype != f32:
        raise _UsageError(f"float32_maps runs in float32 only, got {dtype}")
    g = _gen(generator)
    M = case.space
    tol = case.tol[f32] + case.float32_shift
    for shape in case.shapes:
        ctx = _ctx(case, shape, f32)
        X = M.sample(shape, generator=g, dtype=f32)
        Y = M.sample(shape, generator=g, dtype=f32)
        G = _randn(shape, f32, g)
        V = M.tangent(X, _randn(shape, f32, g))
        W = M.tangent(X, _randn(shape, f32, g))
        maps: list[tuple[str, Callable[..., Tensor], tuple[Tensor, ...]]] = [
            ("tangent(X, G)", M.tangent, (X, G)), ("egrad_to_rgrad(X, G)", M.egrad_to_rgrad, (X, G)),
            ("transport(X, Y, V)", M.transport, (X, Y, V)), ("inner(X, V, W)", M.inner, (X, V, W))]
        for name, fn, args in maps:
            a = fn(*args)
            b = fn(*(t.to(f64) for t in args))
            _vectors_close(a.to(f64), b, tol, ctx, f"float32 {name} != float64 {name} at the same inputs")


# ------------------------------------------------------------------- membership, batched
@_property
def check_contains_batch(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``contains`` and ``check`` judge each point of a batch on its own, and accept the chart centres.

    * ``contains(to_manifold(0, base))`` (``base`` from ``from_manifold`` of a sample) and, if
      ``case.defined_at_zero``, ``contains(to_manifold(0))`` are True wherever the case's ``member``
      accepts the point (a relative violation measure that divides by ``max|X|`` is 0/0 at ``X = 0``);
    * on every batched shape, with only the first point ``X₀`` moved off the space along a normal
      direction ``N = G − tangent(X₀, G)`` (``G`` Gaussian) by ``1e-2·max(1, ‖X₀‖)`` (100× the
      float32 tolerance; a move ``member`` does not refuse is skipped): ``contains`` is False on
      that point and True on every other, and ``check`` raises ``ManifoldError`` (a verdict for the
      whole batch, ``all`` or ``any`` of its points, fails).
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    atol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X, _, base = _point_and_base(case, shape, dtype, g)
        zero = torch.zeros(shape, dtype=dtype)
        centres = [("to_manifold(0, base)", M.to_manifold(zero, base))]
        if case.defined_at_zero:
            centres.append(("to_manifold(0)", M.to_manifold(zero)))
        for name, P in centres:
            if bool(torch.as_tensor(case.member(P, atol)).all()) and not bool(M.contains(P).all()):
                raise _fail(ctx, f"contains is False on {name}, a point by the case's `member` {_worst(~M.contains(P))}")
        if math.prod(_batch_shape(case, shape)) < 2:
            continue
        Xf = X.reshape(-1, *X.shape[X.ndim - p:])
        G = _randn(tuple(Xf.shape[1:]), dtype, g)
        N = G - M.tangent(Xf[0], G)
        n = float(_point_norm(N, p))
        if n == 0.0:
            continue
        Yf = Xf.clone()
        Yf[0] = Xf[0] + 1e-2 * max(1.0, float(_point_norm(Xf[0], p))) * N / n
        if bool(torch.as_tensor(case.member(Yf[:1], atol)).all()):
            continue  # the move does not leave the space by the case's predicate: nothing to assert
        Y = Yf.reshape(X.shape)
        c = M.contains(Y).reshape(-1)
        if bool(c[0]):
            raise _fail(ctx, "contains accepts the first point of a batch moved off the space along a normal direction")
        if not bool(c[1:].all()):
            raise _fail(ctx, "contains refuses points of a batch that are on the space (only the first point is off): "
                        "one verdict for the whole batch")
        try:
            M.check(Y)
        except ManifoldError:
            pass
        else:
            raise _fail(ctx, "check passes a batch whose first point is off the space (the others on it)")


# Note [Large point shapes]
# The documented tolerance grows like √(size/64) above 64 entries (documented_atol), a growth that
# check_membership, run at the case's (small) shapes, never sees: a space that ignores it passes.
# check_membership_large runs check_membership at one point shape per case where the growth is more
# than 2× (so the 0.5×/2× flips tell the grown tolerance from the base one): the largest dim of a
# point shape of the case raised to 1024, or, for a space that takes square points only (SO, Sym,
# ...) every dim equal to the largest one raised to 300; the first such shape the space samples and
# case.perturb perturbs. tests/test_conformance.py pins a few such shapes by hand as well.
def _large_point_shapes(case: SpaceCase) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for ps in case.point_shapes:
        if not ps:
            continue
        m = max(ps)
        i = list(ps).index(m)
        for c in (tuple(1024 if j == i else d for j, d in enumerate(ps)), tuple(300 if d == m else d for d in ps)):
            if c not in out:
                out.append(c)
    return out


@_property
def check_membership_large(case: SpaceCase, dtype: torch.dtype = f64, *,
                           generator: Optional[torch.Generator] = None) -> None:
    """:func:`check_membership` at one large point shape, where the documented tolerance has grown
    by more than 2× (Note [Large point shapes]): ``contains`` and ``check`` flip between 0.5× and
    2× of the *grown* tolerance ``documented_atol(dtype, shape)``. Applies where the case gives
    ``perturb``; a case with no large shape that the space samples and ``perturb`` perturbs passes
    without a check."""
    if case.perturb is None:
        raise _UsageError(f"{case.id}: check_membership_large needs `case.perturb`")
    for big in _large_point_shapes(case):
        try:
            X = case.space.sample(big, generator=torch.Generator().manual_seed(0), dtype=dtype)
        except ManifoldError:
            continue  # a shape the space does not take
        if case.perturb(X, 1e-3) is None:
            continue
        _ctx(case, big, dtype)
        check_membership(dataclasses.replace(case, shapes=(big,)), dtype, generator=generator)
        return


# ------------------------------------------------------------------------ nearest point, chart
@_property
def check_project_nearest_chart(case: SpaceCase, dtype: torch.dtype = f64, *,
                                generator: Optional[torch.Generator] = None) -> None:
    """``project(Y)`` is the nearest point, against candidates reached through the chart (float64).

    :func:`check_project_nearest` tries ``retract(P, tV)``; a space whose ``retract`` goes through
    ``project`` can only reach points ``project`` gives, so a ``project`` that is not the nearest
    point (an eigenvalue floor, a missing sign fix) hides there. Here the candidates are
    ``to_manifold(Z − t·∇/‖∇‖, base)`` for ``(Z, base) = from_manifold(P)``, ``∇`` the gradient
    of ``Z ↦ ‖to_manifold(Z, base) − Y‖²`` and ``t ∈ {1e-3, 1e-2, 0.1, 1}``, with the bound of
    :func:`check_project_nearest`: ``‖Y − X‖ ≥ ‖Y − P‖ − (case.project_slack + tol)·max(1, ‖Y‖)``
    per point. Inputs: a Gaussian ``Y`` and ``−X + 0.1 G`` for a sampled ``X``. Skipped with
    ``project_nearest`` (``case.skip``).
    """
    _require_f64("project_nearest_chart", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    slack = case.project_slack + case.tol[f64]
    for shape in case.shapes:
        ctx = _ctx(case, shape, f64)
        X = M.sample(shape, generator=g, dtype=f64)
        for name, Y in (("a Gaussian Y", _randn(shape, f64, g)),
                        ("Y = −X + 0.1 G far from the space", -X + 0.1 * _randn(shape, f64, g))):
            P = M.project(Y)
            Z, base = M.from_manifold(P)
            d0 = _point_norm(Y - P, p)
            bound = d0 - slack * _point_norm(Y, p).clamp(min=1.0)
            D = grad(lambda z: ((M.to_manifold(z, base) - Y) ** 2).sum())(Z)
            nD = _point_norm(D, p).clamp(min=1e-300)
            D = D / (nD.reshape(tuple(nD.shape) + (1,) * p) if p else nD)
            for t in (1e-3, 1e-2, 0.1, 1.0):
                d = _point_norm(Y - M.to_manifold(Z - t * D, base), p)
                bad = d < bound
                if bool(bad.any()):
                    i = tuple(int(j) for j in torch.nonzero(bad)[0]) if bad.ndim else ()
                    raise _fail(ctx, f"project is not the nearest point for {name}: the chart step of {t:g} from "
                                f"project(Y) down the distance is at {float(d[i]):.6g} < ‖Y − project(Y)‖ = "
                                f"{float(d0[i]):.6g} {_worst(bad)}")


# ----------------------------------------------------------------------- distribution, more
_N_PAIRS = 2000


@_property
def check_sample_independent(case: SpaceCase, dtype: torch.dtype = f64, *,
                             generator: Optional[torch.Generator] = None) -> None:
    """The points of one ``sample`` call are independent (float64): for every point shape, ``A =
    sample((2000, 2, *ps))`` centred by its mean, the products ``⟨A[i, 0], A[i, 1]⟩`` (along the
    inner batch dim) and ``⟨A[2j, 0], A[2j+1, 0]⟩`` (along the outer one) have mean 0, z-tested as
    in :func:`check_sample_distribution` (false-alarm rate below ``FALSE_ALARM`` per case); if a
    product is constant, it must be 0 (a space with one point). A sampler that repeats points along
    a batch dim (``X[i // 2]``) or couples them fails; the moments of one point cannot tell. Products
    within rounding of the points' scale (``sd ≤ 1e-12 ‖A‖²``, centred) are a space with one point too:
    what is left after centring is rounding, whose signs need not balance."""
    _require_f64("sample_independent", dtype)
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    N = _N_PAIRS
    zstar = _z_threshold(2 * len(case.point_shapes))
    for ps in case.point_shapes:
        ctx = _ctx(case, (N, 2, *ps), f64)
        A = M.sample((N, 2, *ps), generator=g, dtype=f64)
        scale = float(_euclid(A, A, p).mean())  # ‖point‖², before centring
        A = A - A.mean(dim=(0, 1), keepdim=True)
        for name, a, b in (("A[i, 0] and A[i, 1]", A[:, 0], A[:, 1]), ("A[2j, 0] and A[2j+1, 0]", A[0::2, 0], A[1::2, 0])):
            s = _euclid(a, b, p).reshape(-1)
            sd = float(s.std())
            if sd <= 1e-12 * scale:
                if float(s.abs().max()) > 1e-12 * scale:
                    raise _fail(ctx, f"the points {name} of one sample call are not independent: ⟨a, b⟩ = "
                                f"{float(s[0]):.6g} for every pair")
                continue
            z = float(s.mean()) * math.sqrt(s.numel()) / sd
            if abs(z) > zstar:
                raise _fail(ctx, f"the points {name} of one sample call are correlated: mean ⟨a, b⟩ = "
                            f"{float(s.mean()):.5g} over {s.numel()} pairs (z = {z:.2f}, |z| > {zstar:.2f})")


@_property
def check_sample_distribution_f32(case: SpaceCase, dtype: torch.dtype = f32, *,
                                  generator: Optional[torch.Generator] = None) -> None:
    """:func:`check_sample_distribution` on float32 samples: ``sample`` follows its documented
    distribution in float32 too (a sampler with a float32 branch). The statistics are computed in
    float64 from the float32 points, the same z-test at the same false-alarm rate; a statistic with
    ``sd ≤ 1e-6`` (relative) must equal its expectation to ``1e-4`` (float32 rounding). Applies to
    cases that give ``moments`` and run float32."""
    if dtype != f32:
        raise _UsageError(f"sample_distribution_f32 runs in float32 only, got {dtype}")
    if case.moments is None:
        raise _UsageError(f"{case.id}: check_sample_distribution_f32 needs `case.moments`")
    g = _gen(generator)
    N = _N_SAMPLES
    for ps in case.point_shapes:
        ctx = _ctx(case, (N, *ps), f32)
        X = case.space.sample((N, *ps), generator=g, dtype=f32).to(f64)
        _moments_z_test(case, X, ctx, N, const_sd=1e-6, const_tol=1e-4, what="float32 sample statistic")
