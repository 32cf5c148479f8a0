"""The conformance properties: one public function per property, each raising AssertionError."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from typing import Any, Callable, Iterator, Optional, TypeVar, cast

import torch
import torch.utils._pytree as pytree
from torch.func import grad, hessian, jacfwd, jacrev, jvp, linearize, vmap

from .._errors import ManifoldError, first_index
from ..spaces._base import indicator_condition
from ._case import SpaceCase

__all__ = [
    "check_bad_input",
    "check_broadcast",
    "check_check",
    "check_compile",
    "check_compile_aot",
    "check_contains",
    "check_from_manifold",
    "check_gradcheck",
    "check_gradgradcheck",
    "check_hessian",
    "check_jacobians",
    "check_jvp_fd",
    "check_logabsdet",
    "check_nan",
    "check_project",
    "check_rebase",
    "check_retract",
    "check_sample",
    "check_tangent",
    "check_to_manifold",
    "check_vmap",
    "check_vmap_grad",
    "no_vmap_fallback",
]

Tensor = torch.Tensor
f64 = torch.float64

# Number of points stacked along a new leading dimension for the vmap properties.
_B = 3


# ----------------------------------------------------------------------------- helpers
def _gen(generator: Optional[torch.Generator]) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


def _randn(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(shape, generator=g, dtype=dtype, device=g.device)


def _ctx(case: SpaceCase, shape: Any, dtype: torch.dtype) -> str:
    ctx = f"[{case.id} = {case.space!r}, shape {tuple(shape)}, {dtype}]"
    if _WHERE:  # the property being run is now at this shape (Note [Context of an unexpected exception])
        _WHERE[-1] = ctx
    return ctx


# Note [Context of an unexpected exception]
# A property fails with an AssertionError whose message names the case, shape and dtype (`_ctx`).
# Any other exception raised inside one (a space's RuntimeError, a ManifoldError or TypeError on
# valid input, an IndexError in a case's `member`) would reach the user from deep inside a torch
# call with none of that. So every property is wrapped by `_property`, which re-raises such an
# exception as an AssertionError naming the property, the case, the dtype and the shape the
# property was at when it was raised (the last `_ctx` it formed: every property forms one per
# shape before calling the space), chained to the original (`raise ... from e`: its traceback is
# kept). An AssertionError passes unchanged, and so does a `_UsageError`: a property asked for
# what it cannot run (a float64-only property in float32, a case without the field it reads) is
# the caller's mistake, a ValueError, not a failure of the space. `_WHERE` is a stack (a property
# may call another); the harness is single-threaded, like the test runs it serves.
_WHERE: list[str] = []


class _UsageError(ValueError):
    """A property called with what it cannot run (Note [Context of an unexpected exception])."""


_P = TypeVar("_P", bound=Callable[..., None])


def _property(fn: _P) -> _P:
    """Wrap a property so that an unexpected exception names where it was raised
    (Note [Context of an unexpected exception])."""
    name = fn.__name__.removeprefix("check_")
    default = inspect.signature(fn).parameters["dtype"].default

    @functools.wraps(fn)
    def prop(case: SpaceCase, dtype: torch.dtype = default, *, generator: Optional[torch.Generator] = None) -> None:
        _WHERE.append(f"[{case.id} = {case.space!r}, {dtype}]")
        try:
            fn(case, dtype, generator=generator)
        except (AssertionError, _UsageError):
            raise
        except Exception as e:
            raise AssertionError(f"{_WHERE[-1]} property {name!r} raised {type(e).__name__} (not an assertion "
                                 f"of the harness: an error of the space or of the case): {e}") from e
        finally:
            _WHERE.pop()

    return cast(_P, prop)  # the identity on fn's type: the check_* functions keep their signatures


def _batch_shape(case: SpaceCase, shape: tuple[int, ...]) -> tuple[int, ...]:
    p = case.space.point_ndim
    return tuple(shape[: len(shape) - p])


def _fail(ctx: str, msg: str) -> AssertionError:
    return AssertionError(f"{ctx} {msg}")


def _close(actual: Tensor, expected: Tensor, tol: float, ctx: str, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    except AssertionError as e:
        raise _fail(ctx, f"{what}:\n{e}") from None


def _member(case: SpaceCase, X: Tensor, dtype: torch.dtype, ctx: str, what: str) -> None:
    if not torch.isfinite(X).all():
        raise _fail(ctx, f"{what} has non-finite entries")
    ok = torch.as_tensor(case.member(X, case.tol[dtype]))
    if not bool(ok.all()):
        raise _fail(ctx, f"{what} is not on the space by the case's `member` predicate (atol {case.tol[dtype]:g})")


def _point_inner(A: Tensor, B: Tensor, point_ndim: int) -> Tensor:
    prod = A * B
    return prod.sum(dim=tuple(range(-point_ndim, 0))) if point_ndim else prod


def _worst(bad: Tensor) -> str:
    """Where the first True of a batch-shaped ``bad`` is, for a message ("" for a single point)."""
    return f"(first at batch index {first_index(bad)})" if bad.ndim else ""


def _point_any(A: Tensor, point_ndim: int) -> Tensor:
    return A.flatten(start_dim=A.ndim - point_ndim).any(-1) if point_ndim else A


def _point_all(A: Tensor, point_ndim: int) -> Tensor:
    return A.flatten(start_dim=A.ndim - point_ndim).all(-1) if point_ndim else A


def _tree_index(tree: Any, i: int) -> Any:
    return pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


def _dims(tree: Any) -> Any:
    """``in_dims`` for ``vmap``: 0 for every tensor leaf of ``tree``, None elsewhere (None bases)."""
    if tree is None:
        return None
    return pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree)


def _point_and_base(case: SpaceCase, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator):
    X = case.space.sample(shape, generator=g, dtype=dtype)
    Z0, base = case.space.from_manifold(X)
    return X, Z0, base


@contextlib.contextmanager
def no_vmap_fallback() -> Iterator[None]:
    """Disable vmap's per-sample fallback loop, so that an op without a batching rule fails."""
    prev = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(prev)


def _require_f64(name: str, dtype: torch.dtype) -> None:
    if dtype != f64:
        raise _UsageError(f"{name} runs in float64 only, got {dtype}")


# ------------------------------------------------------------------- per-dtype properties
@_property
def check_sample(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``sample`` lands on the space with the shape, dtype and device asked, reproducibly, and draws from
    the generator it is given alone: the global RNG is left as it was."""
    g = _gen(generator)
    M = case.space
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        before = torch.random.get_rng_state()
        X = M.sample(shape, generator=g, dtype=dtype, device="cpu")
        used_global = not torch.equal(torch.random.get_rng_state(), before)
        if tuple(X.shape) != shape or X.dtype != dtype or X.device.type != "cpu":
            raise _fail(ctx, f"sample returned shape {tuple(X.shape)}, {X.dtype} on {X.device}")
        _member(case, X, dtype, ctx, "sample(shape)")
        seed = int(torch.randint(0, 2**31, (), generator=g))
        A = M.sample(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        B = M.sample(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        if not torch.equal(A, B):
            raise _fail(ctx, "two samples from generators with the same seed differ")
        if used_global:
            raise _fail(ctx, "sample(shape, generator=g) drew from the global RNG too")
    D = M.sample(case.shapes[0], generator=g)
    if D.dtype != torch.get_default_dtype():
        raise _fail(_ctx(case, case.shapes[0], dtype), f"sample without dtype gave {D.dtype}")


@_property
def check_to_manifold(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``to_manifold(Z)`` and ``to_manifold(Z, base)`` land on the space for Gaussian ``Z`` at every raw scale."""
    g = _gen(generator)
    M = case.space
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        _, Z0, base = _point_and_base(case, shape, dtype, g)
        if tuple(Z0.shape) != shape or Z0.dtype != dtype:
            raise _fail(ctx, f"from_manifold returned a raw tensor of shape {tuple(Z0.shape)}, {Z0.dtype}")
        if case.defined_at_zero:
            _member(case, M.to_manifold(torch.zeros(shape, dtype=dtype), base), dtype, ctx, "to_manifold(0, base)")
        for scale in case.raw_scales:
            Z = _randn(shape, dtype, g, scale)
            for b, name in ((None, "None"), (base, "base")):
                X = M.to_manifold(Z, b)
                if tuple(X.shape) != shape or X.dtype != dtype:
                    raise _fail(ctx, f"to_manifold returned shape {tuple(X.shape)}, {X.dtype}")
                _member(case, X, dtype, ctx, f"to_manifold(Z at scale {scale:g}, base={name})")


@_property
def check_from_manifold(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``to_manifold(*from_manifold(X)) == X`` for sampled points and for images of ``to_manifold``."""
    g = _gen(generator)
    M = case.space
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        for X, name in ((M.sample(shape, generator=g, dtype=dtype), "sample"),
                        (M.to_manifold(_randn(shape, dtype, g)), "to_manifold(Z)")):
            Z, base = M.from_manifold(X)
            if tuple(Z.shape) != shape:
                raise _fail(ctx, f"from_manifold returned a raw tensor of shape {tuple(Z.shape)}")
            _close(M.to_manifold(Z, base), X, tol, ctx, f"to_manifold(*from_manifold(X)) != X for X = {name}")


@_property
def check_rebase(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``rebase`` keeps the point (and returns an all-zero raw tensor where ``case.rebase_zeroes``)."""
    g = _gen(generator)
    M = case.space
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        _, Z0, base = _point_and_base(case, shape, dtype, g)
        Z = Z0 + 0.5 * _randn(shape, dtype, g)
        X = M.to_manifold(Z, base)
        Z2, base2 = M.rebase(Z, base)
        if tuple(Z2.shape) != shape or Z2.dtype != dtype:
            raise _fail(ctx, f"rebase returned a raw tensor of shape {tuple(Z2.shape)}, {Z2.dtype}")
        _close(M.to_manifold(Z2, base2), X, tol, ctx, "to_manifold(*rebase(Z, base)) != to_manifold(Z, base)")
        if case.rebase_zeroes and bool((Z2 != 0).any()):
            raise _fail(ctx, f"rebase left a non-zero raw tensor (max |Z2| = {float(Z2.abs().max()):.3g})")


@_property
def check_tangent(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``tangent`` is linear, idempotent, self-adjoint, and its image satisfies the linearized constraint.

    The last is ``case.linearized(X, V) == 0`` if given; otherwise (float64 only)
    ``‖project(X + tV) − (X + tV)‖`` must decay like ``t²`` (slope 2, not 1) as ``t → 0``.
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X = M.sample(shape, generator=g, dtype=dtype)
        G, H = _randn(shape, dtype, g), _randn(shape, dtype, g)
        V, W = M.tangent(X, G), M.tangent(X, H)
        if tuple(V.shape) != shape or V.dtype != dtype:
            raise _fail(ctx, f"tangent returned shape {tuple(V.shape)}, {V.dtype}")
        _close(M.tangent(X, V), V, tol, ctx, "tangent is not idempotent: tangent(X, tangent(X, G)) != tangent(X, G)")
        _close(M.tangent(X, 2.0 * G - 3.0 * H), 2.0 * V - 3.0 * W, tol, ctx, "tangent is not linear in G")
        scale = (torch.linalg.vector_norm(G) * torch.linalg.vector_norm(H)).item()
        _close(_point_inner(V, H, p), _point_inner(G, W, p), tol * max(1.0, scale), ctx,
               "tangent is not self-adjoint: <tangent(X, G), H> != <G, tangent(X, H)>")
        if case.linearized is not None:
            res = case.linearized(X, V)
            _close(res, torch.zeros_like(res), tol * max(1.0, float(V.abs().max())), ctx,
                   "tangent vectors violate the linearized constraint")
        elif dtype == f64:
            Vn = V / (1.0 + float(V.abs().max()))
            size = 1.0 + float(X.abs().max())

            def resid(t: float) -> float:
                Y = X + t * Vn
                return float((M.project(Y) - Y).abs().max())

            r1, r2 = resid(1e-2), resid(1e-3)
            if r2 > max(r1 / 30.0, 1e-10 * size):
                raise _fail(ctx, "tangent vectors are not tangent: ‖project(X + tV) − (X + tV)‖ decays like "
                            f"t^{math.log10(r1 / r2) if r2 > 0 else float('inf'):.2f} (expected t^2): "
                            f"{r1:.3g} at t = 1e-2, {r2:.3g} at t = 1e-3")


# Note [Large steps]
# An optimizer with a large learning rate takes steps of many times the norm of a point, and a
# retraction must still land on the space there, not only at the steps of a unit tangent vector:
# check_retract also takes steps of 10× and 100× a Gaussian tangent vector (a map correct only for
# small steps, e.g. one that stops normalizing past some norm, fails). A point of a large step may
# be NaN: a space whose retraction overflows in the dtype past some step size (SL's expm-based
# retraction gives NaN past ~25×, by design) returns NaN, never a finite non-point; only finite
# points are held to `member`. The rows of a batch are judged one by one (a NaN row does not
# excuse a finite row off the space).
@_property
def check_retract(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``retract`` lands on the space, ``retract(X, 0) == X`` and ``d/dt retract(X, tV)|₀ == V`` (jvp).

    For sampled ``X`` and ``V = tangent(X, G)`` (Gaussian ``G``): ``retract(X, sV)`` is on the space
    (``case.member`` at ``case.tol[dtype]``) for ``s ∈ {0.1, 1}``; for the large steps ``s ∈ {10,
    100}`` (an optimizer's large learning rate) every finite point of ``retract(X, sV)`` is on the
    space, and a point may be NaN (Note [Large steps]); ``retract(X, 0) == X`` and the jvp to ``tol``.
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X = M.sample(shape, generator=g, dtype=dtype)
        V = M.tangent(X, _randn(shape, dtype, g))
        for s in (0.1, 1.0, 10.0, 100.0):
            X2 = M.retract(X, s * V)
            if tuple(X2.shape) != shape or X2.dtype != dtype:
                raise _fail(ctx, f"retract returned shape {tuple(X2.shape)}, {X2.dtype}")
            if s <= 1.0:
                _member(case, X2, dtype, ctx, f"retract(X, {s:g} V)")
                continue
            finite = _point_all(torch.isfinite(X2), p)
            if bool(finite.any()):
                ok = torch.as_tensor(case.member(X2[finite] if finite.ndim else X2, case.tol[dtype]))
                if not bool(ok.all()):
                    raise _fail(ctx, f"retract(X, {s:g} V), a large step, is a finite point off the space by the "
                                f"case's `member` predicate (atol {case.tol[dtype]:g}; NaN would be allowed)")
        _close(M.retract(X, torch.zeros_like(V)), X, tol, ctx, "retract(X, 0) != X")
        t0, t1 = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
        _, dX = jvp(lambda t: M.retract(X, t * V), (t0,), (t1,))
        _close(dX, V, tol, ctx, "d/dt retract(X, tV) at t = 0 (jvp) != V")


@_property
def check_project(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``project(Y)`` lands on the space; ``project(X) == X`` on it (if ``case.project_fixes_points``)."""
    g = _gen(generator)
    M = case.space
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        for scale in case.raw_scales:
            P = M.project(_randn(shape, dtype, g, scale))
            if tuple(P.shape) != shape or P.dtype != dtype:
                raise _fail(ctx, f"project returned shape {tuple(P.shape)}, {P.dtype}")
            _member(case, P, dtype, ctx, f"project(Y at scale {scale:g})")
            if case.project_fixes_points:
                _close(M.project(P), P, tol, ctx, "project is not idempotent")
        if case.project_fixes_points:
            X = M.sample(shape, generator=g, dtype=dtype)
            _close(M.project(X), X, tol, ctx, "project(X) != X for a point X")


@_property
def check_contains(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``contains`` is batch-shaped boolean, True on points, False on NaN and off-manifold input."""
    g = _gen(generator)
    M = case.space
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        bshape = _batch_shape(case, shape)
        X = M.sample(shape, generator=g, dtype=dtype)
        c = M.contains(X)
        if c.dtype != torch.bool or tuple(c.shape) != bshape:
            raise _fail(ctx, f"contains returned {c.dtype} of shape {tuple(c.shape)}, expected bool of the batch shape {bshape}")
        if not bool(c.all()):
            raise _fail(ctx, "contains is False on sampled points")
        if bool(M.contains(torch.full_like(X, math.nan)).any()):
            raise _fail(ctx, "contains is True on a NaN tensor")
        if case.off_manifold is not None:
            Y = case.off_manifold(X)
            if Y is not None:
                if bool(torch.as_tensor(case.member(Y, case.tol[dtype])).all()):
                    raise _fail(ctx, "the case's off_manifold(X) is on the space by `member` (a bad case)")
                if bool(M.contains(Y).any()):
                    raise _fail(ctx, "contains is True on off_manifold(X)")


@_property
def check_check(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``check`` passes on points; ``check`` and ``from_manifold`` raise ``ManifoldError`` naming the space
    and the measured violation (a key of ``space._violations``; for an indicator measure, ``"… (inf if
    so)"``, its condition alone will do) on NaN / off-manifold input."""
    g = _gen(generator)
    M = case.space
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X = M.sample(shape, generator=g, dtype=dtype)
        M.check(X)
        bads = [("a NaN tensor", torch.full_like(X, math.nan))]
        if case.off_manifold is not None:
            Y = case.off_manifold(X)
            if Y is not None:
                bads.append(("off_manifold(X)", Y))
        for name, Y in bads:
            for fn_name, fn in (("check", M.check), ("from_manifold", M.from_manifold)):
                try:
                    fn(Y)
                except ManifoldError as e:
                    if repr(M) not in str(e):
                        raise _fail(ctx, f"the ManifoldError of {fn_name}({name}) does not name the space: {e}") from None
                    if not any(v in str(e) or (indicator_condition(v) or v) in str(e) for v in M._violations(Y)):
                        raise _fail(ctx, f"the ManifoldError of {fn_name}({name}) names no measured violation: {e}") from None
                else:
                    raise _fail(ctx, f"{fn_name}({name}) did not raise ManifoldError")


@_property
def check_nan(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """NaN raw input gives NaN in every point; inf raw input is never a point.

    ``to_manifold(NaN)``, ``project(NaN)``, ``tangent(X, NaN)`` have a NaN in every point
    (``to_manifold`` is exempt at a shape where it is constant, e.g. the 1×1 ``Skew``);
    ``to_manifold(inf)`` and ``retract(X, NaN)`` are rejected by ``contains``.
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X, _, base = _point_and_base(case, shape, dtype, g)
        nan, inf = torch.full(shape, math.nan, dtype=dtype), torch.full(shape, math.inf, dtype=dtype)
        outs = [("project(NaN)", M.project(nan)), ("tangent(X, NaN)", M.tangent(X, nan))]
        # A chart that reads no entry of Z at this shape (the 1×1 Skew: {0}) cannot propagate NaN.
        zero = torch.zeros(shape, dtype=dtype)
        constant = torch.equal(M.to_manifold(_randn(shape, dtype, g), base), M.to_manifold(zero, base))
        if not constant:
            outs += [("to_manifold(NaN)", M.to_manifold(nan)), ("to_manifold(NaN, base)", M.to_manifold(nan, base))]
        for name, out in outs:
            if not bool(_point_any(torch.isnan(out), p).all()):
                raise _fail(ctx, f"{name} has points without NaN (a plausible point from NaN input)")
        rejected = [("retract(X, NaN)", M.retract(X, nan))]
        if not constant:
            rejected.append(("to_manifold(inf)", M.to_manifold(inf)))
        for name, out in rejected:
            if bool(M.contains(out).any()):
                raise _fail(ctx, f"contains is True on {name}")


@_property
def check_vmap(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``vmap`` (no per-sample fallback) of every map equals the batched call.

    Covers ``to_manifold`` (with and without base), ``from_manifold``, ``rebase``,
    ``tangent``, ``retract``, ``project``, the metric (``egrad_to_rgrad``, ``inner``,
    ``transport``), ``logabsdet`` (where ``case.has_logabsdet``) and ``contains`` on a stack of
    points.
    """
    g = _gen(generator)
    M = case.space
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        bshape = (_B, *shape)
        X, Z0, base = _point_and_base(case, bshape, dtype, g)
        Z, G, Y = (_randn(bshape, dtype, g) for _ in range(3))
        V = M.tangent(X, G)
        bd = _dims(base)
        pairs = [
            ("to_manifold(Z)", vmap(lambda z: M.to_manifold(z)), (Z,), M.to_manifold(Z)),
            ("to_manifold(Z, base)", vmap(lambda z, b: M.to_manifold(z, b), in_dims=(0, bd)), (Z, base),
             M.to_manifold(Z, base)),
            ("from_manifold(X)[0]", vmap(lambda x: M.from_manifold(x)[0]), (X,), M.from_manifold(X)[0]),
            ("to_manifold(*from_manifold(X))", vmap(lambda x: M.to_manifold(*M.from_manifold(x))), (X,), X),
            ("rebase(Z, base)[0]", vmap(lambda z, b: M.rebase(z, b)[0], in_dims=(0, bd)), (Z0 + Z, base),
             M.rebase(Z0 + Z, base)[0]),
            ("tangent", vmap(M.tangent), (X, G), V),
            ("retract", vmap(M.retract), (X, V), M.retract(X, V)),
            ("project", vmap(M.project), (Y,), M.project(Y)),
        ]
        X2 = M.sample(bshape, generator=g, dtype=dtype)
        W = M.tangent(X, _randn(bshape, dtype, g))
        pairs += [
            ("egrad_to_rgrad", vmap(M.egrad_to_rgrad), (X, G), M.egrad_to_rgrad(X, G)),
            ("inner", vmap(M.inner), (X, V, W), M.inner(X, V, W)),
            ("transport", vmap(M.transport), (X, X2, V), M.transport(X, X2, V)),
        ]
        if case.has_logabsdet:
            pairs.append(("logabsdet(Z, base)", vmap(lambda z, b: M.logabsdet(z, b), in_dims=(0, bd)), (Z0 + Z, base),
                          M.logabsdet(Z0 + Z, base)))
        with no_vmap_fallback():
            for name, fn, args, expected in pairs:
                try:
                    got = fn(*args)
                except RuntimeError as e:
                    raise _fail(ctx, f"vmap of {name} failed (an op without a batching rule?): {e}") from None
                _close(got, expected, tol, ctx, f"vmap of {name} != the batched call")
            c = vmap(M.contains)(X)
        if not torch.equal(c, M.contains(X)):
            raise _fail(ctx, "vmap(contains) != contains on the batch")


# ------------------------------------------------------ every map: purity, dtypes, non-finite input
def _map_calls(case: SpaceCase, shape: tuple[int, ...], dtype: torch.dtype,
               g: torch.Generator) -> list[tuple[str, Callable[..., Any], tuple]]:
    """One call of every map of the protocol on valid inputs of ``shape``: ``(name, fn, args)``."""
    M = case.space
    X, Z0, base = _point_and_base(case, shape, dtype, g)
    Z, G, H, K, Y = (_randn(shape, dtype, g) for _ in range(5))
    V, W = M.tangent(X, H), M.tangent(X, K)
    X2 = M.sample(shape, generator=g, dtype=dtype)
    calls: list[tuple[str, Callable[..., Any], tuple]] = [
        ("to_manifold(Z)", M.to_manifold, (Z,)),
        ("to_manifold(Z, base)", M.to_manifold, (Z0 + 0.5 * Z, base)),
        ("from_manifold(X)", M.from_manifold, (X,)),
        ("rebase(Z, base)", M.rebase, (Z0 + 0.5 * Z, base)),
        ("tangent(X, G)", M.tangent, (X, G)),
        ("retract(X, V)", M.retract, (X, V)),
        ("project(Y)", M.project, (Y,)),
        ("egrad_to_rgrad(X, G)", M.egrad_to_rgrad, (X, G)),
        ("inner(X, V, W)", M.inner, (X, V, W)),
        ("transport(X, X2, V)", M.transport, (X, X2, V)),
        ("contains(X)", M.contains, (X,)),
        ("check(X)", M.check, (X,)),
    ]
    if case.has_logabsdet:
        calls.append(("logabsdet(Z, base)", M.logabsdet, (Z0 + 0.5 * Z, base)))
    return calls


def _leaves(tree: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]


@_property
def check_pure(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """No map changes its inputs: after ``to_manifold``, ``from_manifold``, ``rebase``, ``tangent``,
    ``retract``, ``project``, ``egrad_to_rgrad``, ``inner``, ``transport``, ``contains``, ``check`` (and
    ``logabsdet`` where ``case.has_logabsdet``), every input tensor (bases included) equals its copy
    taken before the call, bit for bit, and its version counter (``Tensor._version``, which every
    in-place op bumps) is unchanged: an in-place op that leaves the values as they were (``X /= ‖X‖``
    on a unit vector) is caught too."""
    g = _gen(generator)
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        for name, fn, args in _map_calls(case, shape, dtype, g):
            args = pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, args)
            inputs = _leaves(args)
            copies = [t.clone() for t in inputs]
            versions = [t._version for t in inputs]
            fn(*args)
            for i, (t, c, v) in enumerate(zip(inputs, copies, versions)):
                if t._version != v or not torch.equal(t, c):
                    raise _fail(ctx, f"{name} modified its input tensor #{i} of shape {tuple(t.shape)} in place "
                                f"(version {v} -> {t._version}; values {'equal' if torch.equal(t, c) else 'changed'})")


# Note [Non-contiguous inputs]
# Fast paths read memory: a kernel that reads a tensor as if contiguous, an in-place update of a
# buffer that turns out to be a view of an input, an operator whose result keeps its input's strides
# where its fake kernel promised contiguous ones (the compiled exponential did, at degrees 1 and 2).
# Tensors that reach the maps are often not contiguous: a weight read transposed (F.linear's Wᵀ),
# a slice of a larger batch, a batch dimension moved by vmap, one base expanded over a batch (an
# in-place write into it raises). check_layouts calls every map with each
# tensor argument in turn replaced by the same values stored otherwise, and asks for the same result
# and, for the differentiable maps, the same gradient (autograd and torch.func.grad). Another layout
# may sum in another order: the results agree to the case's tolerance, or, where the map is that
# ill-conditioned at the sampled input (Birkhoff's retract next to a vertex: a relative change of one
# unit in the last place of its input moves its float64 gradient by 1e-6), to within
# _LAYOUT_SLACK times what such a perturbation of the contiguous input moves it (three draws). A
# layout read wrongly moves results by their own size.
_LAYOUTS: tuple[tuple[str, Callable[[Tensor], Tensor]], ...] = (
    ("stored transposed", lambda t: t.mT.contiguous().mT),
    ("every other entry of a wider tensor", lambda t: torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]),
)
_LAYOUT_GRADS = ("to_manifold(Z, base)", "retract(X, V)", "project(Y)", "logabsdet(Z, base)")
_LAYOUT_SLACK = 8.0


def _max_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between the float leaves of two results: 0 where the entries are
    equal (the same infinity) or both NaN, inf where only one is NaN (a NaN must not read as no difference)."""
    out = 0.0
    for x, y in zip(_leaves(a), _leaves(b)):
        if x.dtype != torch.bool and x.numel():
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            d = torch.where(same, 0.0, (x - y).abs().nan_to_num(nan=math.inf))
            out = max(out, float(d.max()))
    return out


def _same_result(got: Any, expected: Any, jittered: Callable[[], Any], tol: float, ctx: str, what: str) -> None:
    """``got`` equals ``expected`` (booleans exactly, floats to ``tol`` relative to the largest entry, or
    within _LAYOUT_SLACK times the spread of ``jittered()`` results: Note [Non-contiguous inputs])."""
    for x, y in zip(_leaves(got), _leaves(expected)):
        if x.dtype == torch.bool and not torch.equal(x, y):
            raise _fail(ctx, f"{what} differs")
    try:
        for x, y in zip(_leaves(got), _leaves(expected)):
            if x.dtype != torch.bool:
                scale = max(1.0, float(y.abs().max())) if y.numel() and bool(torch.isfinite(y).all()) else 1.0
                torch.testing.assert_close(x, y, atol=tol * scale, rtol=tol, equal_nan=True)
    except AssertionError as e:
        spread = max(_max_diff(jittered(), expected) for _ in range(3))
        diff = _max_diff(got, expected)
        if not diff <= _LAYOUT_SLACK * spread:
            raise _fail(ctx, f"{what}: off by {diff:.3g}, where a relative change of one unit in the last place of the "
                        f"contiguous input moves it by at most {spread:.3g}:\n{e}") from None


def _jitter(t: Tensor, g: torch.Generator) -> Tensor:
    """``t`` times ``1 + ε·N(0, 1)`` entrywise (ε its dtype's machine epsilon), contiguous."""
    real = t.real.dtype if t.is_complex() else t.dtype
    return t * (1 + torch.finfo(real).eps * _randn(tuple(t.shape), real, g))


@_property
def check_layouts(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """Every map gives the same result when a tensor argument is stored transposed or as every other
    entry of a wider tensor (same values, not contiguous), one argument at a time, and when one batch
    entry of an argument is expanded over the batch (stride 0) as when it is copied; so do the gradients
    in the first argument of ``to_manifold``, ``retract``, ``project`` and ``logabsdet``, under
    autograd and ``torch.func.grad``. "The same": to the case's tolerance, or as close as rounding of
    the input allows at that input (Note [Non-contiguous inputs])."""
    g = _gen(generator)
    tol = case.tol[dtype]
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        for name, fn, args in _map_calls(case, shape, dtype, g):
            expected = fn(*args)
            for i, a in enumerate(args):
                if not isinstance(a, Tensor) or a.ndim < 2 or a.numel() == 0:
                    continue

                def with_arg(t: Tensor, i: int = i) -> Any:
                    moved = list(args)
                    moved[i] = t
                    return fn(*moved)

                for how, lay in _LAYOUTS:
                    _same_result(with_arg(lay(a)), expected, lambda a=a, f=with_arg: f(_jitter(a, g)), tol, ctx,
                                 f"{name} with argument #{i} {how}")
                if a.ndim > case.space.point_ndim and a.shape[0] > 1:
                    # one point (base, vector) broadcast over the batch by expand (stride 0): other values,
                    # so against the same values made contiguous
                    e = a[:1].expand_as(a)
                    what = f"{name} with argument #{i} one entry expanded over the batch (stride 0)"
                    try:
                        copied = with_arg(e.contiguous())
                    except ManifoldError:  # other arguments made for a's other entries may not fit it
                        continue
                    try:
                        got = with_arg(e)
                    except Exception as err:
                        raise _fail(ctx, f"{what} raised {type(err).__name__} where the copies did not: {err}") from None
                    _same_result(got, copied, lambda e=e, f=with_arg: f(_jitter(e.contiguous(), g)), tol, ctx, what)
            x0 = args[0].detach()
            if name not in _LAYOUT_GRADS or x0.ndim < 2 or x0.numel() == 0:
                continue
            W = _randn(tuple(expected.shape), expected.dtype, g)

            def f(x: Tensor, *rest: Any) -> Tensor:
                y = fn(x, *rest)
                return (y * W).real.sum() if y.is_complex() else (y * W).sum()

            ref = torch.func.grad(f)(x0, *args[1:])
            jittered = lambda: torch.func.grad(f)(_jitter(x0, g), *args[1:])  # noqa: E731
            for how, lay in _LAYOUTS:
                x = lay(x0.clone()).requires_grad_()
                got = torch.autograd.grad(f(x, *args[1:]), x)[0]
                _same_result(got, ref, jittered, tol, ctx, f"the gradient of {name} in its argument {how} (autograd)")
                got = torch.func.grad(f)(lay(x0.clone()), *args[1:])
                _same_result(got, ref, jittered, tol, ctx, f"the gradient of {name} in its argument {how} (torch.func.grad)")


# Note [dtypes under the other default]
# A map must return its input's dtype. A constant made without `dtype=` (torch.ones(n), a Python
# scalar tensor) takes the *default* dtype, and the type promotion of a product with it then
# decides the result's: float64 for a float32 input when the default is float64, float32 where
# an explicit `.float()` slipped in. With the default equal to the input's dtype such a constant
# changes nothing, so check_dtypes runs the maps with the default set to the other dtype of the
# two (float64 for float32 input, float32 otherwise), restored afterwards.
_OTHER_DEFAULT = {torch.float32: f64, f64: torch.float32}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: f64}.get(dtype, dtype)


@_property
def check_dtypes(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """Every map returns its input's dtype and device: the tensors of ``to_manifold``,
    ``from_manifold`` and ``rebase`` (raw tensors *and* every floating tensor of the bases),
    ``tangent``, ``retract``, ``project``, ``egrad_to_rgrad``, ``transport`` and ``logabsdet`` have
    ``dtype``; ``inner`` its real dtype and the batch shape; ``contains`` is ``bool``. The maps run
    with the default dtype set to the other of float32/float64 (Note [dtypes under the other
    default])."""
    g = _gen(generator)
    real = _real_dtype(dtype)
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        calls = _map_calls(case, shape, dtype, g)
        device = calls[0][2][0].device
        bshape = _batch_shape(case, shape)
        with _default_dtype(_OTHER_DEFAULT.get(real, f64)):
            for name, fn, args in calls:
                out = fn(*args)
                if name.startswith("check"):
                    continue
                want = (torch.bool if name.startswith("contains")
                        else real if name.startswith(("inner", "logabsdet")) else dtype)
                for i, t in enumerate(_leaves(out)):
                    if not (t.is_floating_point() or t.is_complex() or name.startswith("contains")):
                        continue  # an integer/bool tensor in a base (a permutation, a sign) has its own dtype
                    if t.dtype != want or t.device != device:
                        what = f"tensor #{i} of its result" if isinstance(out, tuple) else "its result"
                        raise _fail(ctx, f"{name} returned {what} in {t.dtype} on {t.device} for {dtype} input on "
                                    f"{device} (expected {want}; default dtype {torch.get_default_dtype()})")
                if name.startswith("inner") and tuple(out.shape) != bshape:
                    raise _fail(ctx, f"{name} returned shape {tuple(out.shape)}, expected the batch shape {bshape}")


@_property
def check_nonfinite(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """The NaN/inf policy (README, "NaN and inf") for the maps besides those of :func:`check_nan`:
    no map turns inf or NaN input into a plausible value.

    Inputs: ``+inf`` in every entry, ``−inf`` in every entry, and ``inf`` in the last entry of
    every point (the rest Gaussian: a map may pass over an entry it does not read, as
    ``Lorentz.project`` drops ``y₀`` and SO's chart the upper triangle, so the entry is the last,
    which every map reads). Then, per point of the batch:

    * ``project(Y)`` and ``retract(X, V)`` are refused by ``contains``, and so is
      ``to_manifold(−inf)`` (``check_nan`` takes ``+inf``);
    * ``tangent(X, G)``, ``egrad_to_rgrad(X, G)``, ``transport(X, Y, V)``, ``inner(X, U, V)`` (in
      either vector) and ``logabsdet(Z)`` (where ``case.has_logabsdet``) have a non-finite entry
      (NaN or inf: ``Rn.tangent(X, inf) = inf`` is no plausible vector either); for NaN input too,
      except ``tangent``, which ``check_nan`` holds to NaN.

    A chart that reads no entry of its input at a shape (the 1×1 ``Skew``) is exempt for
    ``to_manifold`` and ``logabsdet``, as in ``check_nan``.
    """
    g = _gen(generator)
    M = case.space
    p = M.point_ndim
    for shape in case.shapes:
        ctx = _ctx(case, shape, dtype)
        X, _, base = _point_and_base(case, shape, dtype, g)
        X2 = M.sample(shape, generator=g, dtype=dtype)
        V = M.tangent(X, _randn(shape, dtype, g))
        one = _randn(shape, dtype, g)
        if p:
            one.view(*one.shape[: one.ndim - p], -1)[..., -1] = math.inf
        else:
            one.fill_(math.inf)
        bads = [("inf", torch.full(shape, math.inf, dtype=dtype)), ("−inf", torch.full(shape, -math.inf, dtype=dtype)),
                ("inf in the last entry of every point", one)]
        zero = torch.zeros(shape, dtype=dtype)
        constant = torch.equal(M.to_manifold(_randn(shape, dtype, g), base), M.to_manifold(zero, base))
        for bname, B in bads:
            points = [(f"project({bname})", M.project(B)), (f"retract(X, {bname})", M.retract(X, B))]
            if bname == "−inf" and not constant:
                points.append((f"to_manifold({bname})", M.to_manifold(B)))
            for name, out in points:
                if bool(M.contains(out).any()):
                    raise _fail(ctx, f"contains is True on {name} (a plausible point from non-finite input)")
        nan = torch.full(shape, math.nan, dtype=dtype)
        for bname, B in (*bads, ("NaN", nan)):
            vectors = [(f"egrad_to_rgrad(X, {bname})", M.egrad_to_rgrad(X, B)),
                       (f"transport(X, Y, {bname})", M.transport(X, X2, B)),
                       (f"inner(X, {bname}, V)", M.inner(X, B, V)),
                       (f"inner(X, V, {bname})", M.inner(X, V, B))]
            if bname != "NaN":
                vectors.append((f"tangent(X, {bname})", M.tangent(X, B)))
            if case.has_logabsdet and not constant:
                vectors.append((f"logabsdet({bname})", M.logabsdet(B)))
            for name, out in vectors:
                nd = p if tuple(out.shape) == shape else 0  # inner and logabsdet are batch-shaped
                finite = ~_point_any(~torch.isfinite(out), nd)
                if bool(finite.any()):
                    raise _fail(ctx, f"{name} has finite points (a plausible value from non-finite input) {_worst(finite)}")


def _batches_of_3(case: SpaceCase, dtype: torch.dtype, generator: Optional[torch.Generator]):
    """Per shape of the case: the generator, the shape, the shape with a leading batch of 3 and its
    context for messages."""
    g = _gen(generator)
    for shape in case.shapes:
        full = (3, *shape)
        yield g, shape, full, _ctx(case, full, dtype)


@_property
def check_batch_isolation(case: SpaceCase, dtype: torch.dtype = f64, *,
                          generator: Optional[torch.Generator] = None) -> None:
    """A bad point of a batch leaves the other points' results as they were (float64).

    Each shape of the case gets a leading batch of 3; its middle point's input is replaced by NaN,
    by ``+inf`` and by the same Gaussian entries times 1e6 (a diverged ensemble member, an
    overflowing sample). The other two points' results of ``to_manifold`` (with and without a base),
    ``project``, ``tangent``, ``egrad_to_rgrad``, ``retract``, ``transport``, ``inner``,
    ``logabsdet`` (where ``case.has_logabsdet``), the gradient of a linear loss of ``to_manifold``
    by autograd and by ``torch.func.grad``, its ``jvp`` and its ``vmap`` must equal those of the clean
    batch, to ``tol = case.tol[float64]`` relative to ``max(1, |expected|)``. A choice made once for a
    whole batch from a reduction over it (an exponential's degree, an iteration count, a scale, an
    early exit) that a NaN poisons or an extreme point drives fails here; a single point's own
    result is not checked (``check_nan``, ``check_nonfinite``).
    """
    _require_f64("batch_isolation", dtype)
    M, tol = case.space, case.tol[f64]
    for g, shape, full, ctx in _batches_of_3(case, dtype, generator):
        X, _, base = _point_and_base(case, full, dtype, g)
        X2 = M.sample(full, generator=g, dtype=dtype)
        Z, G, C = (_randn(full, dtype, g) for _ in range(3))
        U = M.tangent(X, _randn(full, dtype, g))

        def maps(Z: Tensor, G: Tensor) -> dict[str, Tensor]:
            V = 0.1 * M.tangent(X, G)
            Zg = Z.clone().requires_grad_()
            out = {
                "to_manifold(Z)": M.to_manifold(Z),
                "to_manifold(Z, base)": M.to_manifold(Z, base),
                "project(Z)": M.project(Z),
                "tangent(X, G)": M.tangent(X, G),
                "egrad_to_rgrad(X, G)": M.egrad_to_rgrad(X, G),
                "retract(X, V)": M.retract(X, V),
                "transport(X, Y, V)": M.transport(X, X2, V),
                "inner(X, U, V)": M.inner(X, U, V),
                "autograd of to_manifold": torch.autograd.grad((M.to_manifold(Zg, base) * C).sum(), Zg)[0],
                "torch.func.grad of to_manifold": grad(lambda z: (M.to_manifold(z, base) * C).sum())(Z),
                "jvp of to_manifold": jvp(lambda z: M.to_manifold(z, base), (Z,), (C,))[1],
                "vmap of to_manifold": vmap(M.to_manifold)(Z),
            }
            if case.has_logabsdet:
                out["logabsdet(Z)"] = M.logabsdet(Z, base)
            return out

        ref = maps(Z, G)
        for bad_name, fill in (("NaN", lambda t: torch.full_like(t, math.nan)),
                               ("+inf", lambda t: torch.full_like(t, math.inf)),
                               ("1e6 ×", lambda t: 1e6 * t)):
            Zb, Gb = Z.clone(), G.clone()
            Zb[1], Gb[1] = fill(Z[1]), fill(G[1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # overflow in the bad point is its own business
                got = maps(Zb, Gb)
            for name, out in got.items():
                keep, want = out[0::2].detach(), ref[name][0::2].detach()
                if not bool(torch.isfinite(keep).all() == torch.isfinite(want).all()):
                    raise _fail(ctx, f"{name}: a {bad_name} point at batch index 1 made the other points non-finite")
                scale = want.abs().clamp(min=1.0)
                err = ((keep - want).abs() / scale).max()
                if not bool(err <= tol):
                    raise _fail(ctx, f"{name}: a {bad_name} point at batch index 1 changed the other points' results "
                                     f"by {float(err):.3g} (relative; tol {tol:g}): a choice made for the whole batch")


@_property
def check_broadcast(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """A map's arguments broadcast over their batch dims, and so does its result (float64).

    Each shape of the case gets a batch of 3 points; every map of several arguments is called with
    one argument batched and the others single (a batch of points and one shared vector, one point
    and a batch of vectors, ...): ``to_manifold(Z, base)``, ``tangent``, ``egrad_to_rgrad``,
    ``retract``, ``transport`` (each of its three arguments batched in turn), ``inner`` (the point,
    then the vectors), ``expmap``, ``logmap`` and ``dist`` where the space implements them, and
    ``logabsdet(Z, base)`` where ``case.has_logabsdet``. The result must have the batch shape ``(3,)``
    (a point's or a vector's shape after it, or none for a batch-shaped value) and equal the
    three results of the single calls to ``tol = case.tol[float64]`` relative to ``max(1, |x|)`` (NaN
    where they are NaN). A map that ignores one of its arguments (an embedded metric's ``inner``
    reads no point; ``Sym.tangent`` is ``sym(G)`` wherever ``X`` is) still returns one value per
    point of the batch: a sum over the batch is otherwise silently short.
    """
    from ._geodesic import implements  # (_geodesic imports this module)

    _require_f64("broadcast", dtype)
    M, tol = case.space, case.tol[f64]
    for g, shape, full, ctx in _batches_of_3(case, dtype, generator):
        X, Y = M.sample(full, generator=g, dtype=dtype), M.sample(full, generator=g, dtype=dtype)
        _, base = M.from_manifold(X)
        x0, y0 = X[0], Y[0]
        _, base0 = M.from_manifold(x0)
        Z, Gb = _randn(full, dtype, g), _randn(full, dtype, g)
        G0 = _randn(tuple(shape), dtype, g)
        U0, V0 = M.tangent(x0, _randn(tuple(shape), dtype, g)), 0.1 * M.tangent(x0, G0)
        Ub, Vb = M.tangent(x0, _randn(full, dtype, g)), 0.1 * M.tangent(x0, Gb)
        B, S = True, False  # which arguments are batched
        calls: list[tuple[str, Callable[..., Tensor], tuple[tuple[Any, bool], ...]]] = [
            ("to_manifold(Z batched, base single)", M.to_manifold, ((Z, B), (base0, S))),
            ("to_manifold(Z single, base batched)", M.to_manifold, ((Z[0], S), (base, B))),
            ("tangent(X batched, G single)", M.tangent, ((X, B), (G0, S))),
            ("tangent(X single, G batched)", M.tangent, ((x0, S), (Gb, B))),
            ("egrad_to_rgrad(X batched, G single)", M.egrad_to_rgrad, ((X, B), (G0, S))),
            ("egrad_to_rgrad(X single, G batched)", M.egrad_to_rgrad, ((x0, S), (Gb, B))),
            ("retract(X batched, V single)", M.retract, ((X, B), (V0, S))),
            ("retract(X single, V batched)", M.retract, ((x0, S), (Vb, B))),
            ("transport(X batched, Y single, V single)", M.transport, ((X, B), (y0, S), (V0, S))),
            ("transport(X single, Y batched, V single)", M.transport, ((x0, S), (Y, B), (V0, S))),
            ("transport(X single, Y single, V batched)", M.transport, ((x0, S), (y0, S), (Vb, B))),
            ("inner(X batched, U single, V single)", M.inner, ((X, B), (U0, S), (V0, S))),
            ("inner(X single, U batched, V single)", M.inner, ((x0, S), (Ub, B), (V0, S))),
            ("inner(X single, U single, V batched)", M.inner, ((x0, S), (U0, S), (Vb, B))),
        ]
        if implements(M, "expmap"):
            calls += [("expmap(X batched, V single)", M.expmap, ((X, B), (V0, S))),
                      ("expmap(X single, V batched)", M.expmap, ((x0, S), (Vb, B)))]
        if implements(M, "logmap"):
            near = M.retract(x0, Vb)  # within reach of x0 (the logarithm's domain)
            calls += [("logmap(X single, Y batched)", M.logmap, ((x0, S), (near, B))),
                      ("logmap(X batched, Y single)", M.logmap, ((near, B), (x0, S)))]
        if implements(M, "dist"):
            calls += [("dist(X batched, Y single)", M.dist, ((X, B), (y0, S))),
                      ("dist(X single, Y batched)", M.dist, ((x0, S), (Y, B)))]
        if case.has_logabsdet:
            calls += [("logabsdet(Z single, base batched)", M.logabsdet, ((Z[0], S), (base, B))),
                      ("logabsdet(Z batched, base single)", M.logabsdet, ((Z, B), (base0, S)))]
        for name, f, args in calls:
            if not any(b and any(isinstance(t, Tensor) for t in pytree.tree_leaves(a)) for a, b in args):
                continue  # the batched argument is a None base: nothing is batched
            out = f(*(a for a, _ in args))
            singles = [f(*(_tree_index(a, i) if b else a for a, b in args)) for i in range(3)]
            want = torch.stack(singles)
            if tuple(out.shape) != tuple(want.shape):
                raise _fail(ctx, f"{name} returned shape {tuple(out.shape)}, expected {tuple(want.shape)} "
                                 f"(the batch of 3, then the single calls' shape {tuple(singles[0].shape)})")
            nan = torch.isnan(want)
            if not bool((torch.isnan(out) == nan).all()):
                raise _fail(ctx, f"{name}: NaN where the single calls are not NaN, or the reverse")
            err = ((out - want).abs() / want.abs().clamp(min=1.0)).masked_fill(nan, 0.0).max()
            if not bool(err <= tol):
                raise _fail(ctx, f"{name} differs from the single calls by {float(err):.3g} (relative; tol {tol:g})")


# ----------------------------------------------------------------- float64-only properties
def _smoke_inputs(case: SpaceCase, g: torch.Generator, shape: Optional[tuple[int, ...]] = None):
    shape = case.smoke if shape is None else shape
    X, Z0, base = _point_and_base(case, shape, f64, g)
    return shape, X, base, _randn(shape, f64, g)


def _derivative_shapes(case: SpaceCase) -> list[tuple[int, ...]]:
    """``case.smoke`` and, for a matrix space, its transpose (a wide shape for a tall one) if the
    space takes it: the shapes of gradcheck, hessian and compile."""
    s = case.smoke
    out = [s]
    if case.space.point_ndim == 2 and len(s) >= 2 and s[-1] != s[-2]:
        t = (*s[:-2], s[-1], s[-2])
        try:
            case.space.sample(t, generator=torch.Generator().manual_seed(0), dtype=f64)
        except ManifoldError:
            pass  # a shape the space does not take (e.g. a square-only or fixed-width adapter)
        else:
            out.append(t)
    return out


@_property
def check_gradcheck(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.autograd.gradcheck`` (float64) of ``to_manifold`` at random ``Z`` (and at ``Z = 0`` if
    smooth), of ``tangent`` in ``(X, G)`` and of ``retract`` in ``(X, V)``, on the smoke shape and
    its transpose (a wide shape); and of ``tangent`` and ``retract`` where one point meets a batch of
    two vectors (their batches broadcast: the gradient in the point sums over the batch), unless
    every entry is its own point (``point_ndim = 0``: the shapes must match). Also of every other map
    in all its arguments (Note [Gradients of every map]): ``project`` near a point, ``egrad_to_rgrad``,
    ``inner``, ``transport`` to a point ``Y = retract(X, W)`` at length 0.2 in the metric (at most half
    ``case.geodesic_radius``), and ``dist``, ``expmap``, ``logmap`` there where the space implements
    them and the case does not skip their property."""
    # Note [Gradients of every map]
    # gradgradcheck differentiates a map's backward numerically, so it holds the second derivative to
    # the first one the map computes, right or wrong: a project whose gradient was 1.1× the true one
    # passed it, and no other property differentiated egrad_to_rgrad, transport, inner, dist, expmap
    # or logmap (only sqdist's second derivative at Y = X reads inner and logmap). Their gradients are
    # what a loss of distances, a differentiable optimizer step (MAML through geofunc.optim, which
    # calls egrad_to_rgrad, retract and transport) or a projected forward pass trains with.
    from ._geodesic import implements

    _require_f64("gradcheck", dtype)
    g = _gen(generator)
    M = case.space
    for sh in _derivative_shapes(case):
        shape, X, base, Z = _smoke_inputs(case, g, sh)
        ctx = _ctx(case, shape, f64)
        G = _randn(shape, f64, g)
        V = M.tangent(X, G)
        checks: list[tuple[str, Callable[..., Tensor], tuple[Tensor, ...]]] = [
            ("to_manifold at random Z", lambda z, base=base: M.to_manifold(z, base), (Z,)),
            ("tangent", M.tangent, (X, G)),
            ("retract", M.retract, (X, V)),
        ]
        if case.smooth and case.defined_at_zero:
            checks.append(("to_manifold at Z = 0", lambda z, base=base: M.to_manifold(z, base), (torch.zeros(shape, dtype=f64),)))
        if M.point_ndim > 0:
            G2 = _randn((2, *shape), f64, g)
            checks += [("tangent, one point against a batch of 2 vectors", M.tangent, (X, G2)),
                       ("retract, one point against a batch of 2 tangent vectors", M.retract,
                        (X, M.tangent(X.expand(G2.shape), G2)))]
        U = M.tangent(X, _randn(shape, f64, g))
        W = M.tangent(X, _randn(shape, f64, g))
        length = M.inner(X, W, W).clamp(min=1e-300).sqrt()
        W = W * (min(0.2, 0.5 * case.geodesic_radius) / length).reshape(length.shape + (1,) * M.point_ndim)
        Y = M.retract(X, W)
        checks += [("project near a point", M.project, (X + _randn(shape, f64, g, 0.05),)),
                   ("egrad_to_rgrad", M.egrad_to_rgrad, (X, G)),
                   ("inner", M.inner, (X, U, V)),
                   ("transport", M.transport, (X, Y, V))]
        checks += [(name, getattr(M, name), args) for name, args in (("dist", (X, Y)), ("expmap", (X, W)),
                                                                      ("logmap", (X, Y)))
                   if implements(M, name) and name not in case.skip]
        for name, fn, args in checks:
            # (contiguous: a step scaled per point of an empty frame has a stride-0 dim, which gradcheck refuses)
            args = tuple(a.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True) for a in args)
            try:
                torch.autograd.gradcheck(fn, args)
            except Exception as e:  # gradcheck raises GradcheckError (a RuntimeError)
                raise _fail(ctx, f"gradcheck of {name} failed: {e}") from None


@_property
def check_gradgradcheck(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.autograd.gradgradcheck`` (float64): second derivatives of ``tangent`` in ``(X, G)``, of
    ``retract`` in ``(X, V)`` and of ``project`` at a point and near one, on the smoke shape (the
    spectral maps take their value from a detached decomposition: their second derivatives are
    written out, Note [Second derivatives of spectral maps]; ``to_manifold``'s are the hessian
    property's)."""
    _require_f64("gradgradcheck", dtype)
    g = _gen(generator)
    M = case.space
    shape, X, base, Z = _smoke_inputs(case, g)
    ctx = _ctx(case, shape, f64)
    G = _randn(shape, f64, g)
    V = M.tangent(X, G)
    Y = X + _randn(shape, f64, g, 0.05)
    checks: list[tuple[str, Callable[..., Tensor], tuple[Tensor, ...]]] = [
        ("tangent", M.tangent, (X, G)),
        ("retract", M.retract, (X, V)),
        ("project at a point", M.project, (X,)),
        ("project near a point", M.project, (Y,)),
    ]
    for name, fn, args in checks:
        args = tuple(a.detach().clone().requires_grad_(True) for a in args)
        try:
            torch.autograd.gradgradcheck(fn, args)
        except Exception as e:  # GradcheckError (a RuntimeError)
            raise _fail(ctx, f"gradgradcheck of {name} failed: {e}") from None


@_property
def check_jvp_fd(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``jvp`` of ``to_manifold`` (in ``Z``) and of ``retract`` (in ``V``) equals central finite differences (float64)."""
    _require_f64("jvp_fd", dtype)
    g = _gen(generator)
    M = case.space
    shape, X, base, Z = _smoke_inputs(case, g)
    ctx = _ctx(case, shape, f64)
    V = M.tangent(X, _randn(shape, f64, g))
    h = 1e-6
    for name, fn, at in (("to_manifold", lambda z: M.to_manifold(z, base), Z),
                         ("retract(X, ·)", lambda v: M.retract(X, v), V)):
        d = _randn(shape, f64, g)
        _, jv = jvp(fn, (at,), (d,))
        fd = (fn(at + h * d) - fn(at - h * d)) / (2 * h)
        _close(jv, fd, 1e-6 * max(1.0, float(fd.abs().max())), ctx, f"jvp of {name} != central finite differences")


@_property
def check_jacobians(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``jacfwd == jacrev`` of ``to_manifold`` at random ``Z`` and at ``Z = 0`` (float64, smooth spaces)."""
    _require_f64("jacobians", dtype)
    g = _gen(generator)
    M = case.space
    shape, X, base, Z = _smoke_inputs(case, g)
    ctx = _ctx(case, shape, f64)
    fn = lambda z: M.to_manifold(z, base)  # noqa: E731
    for name, at in _derivative_points(case, Z):
        Jf, Jr = jacfwd(fn)(at), jacrev(fn)(at)
        if not bool(torch.isfinite(Jf).all()):
            raise _fail(ctx, f"jacfwd of to_manifold at {name} is not finite")
        _close(Jf, Jr, 1e-9, ctx, f"jacfwd != jacrev of to_manifold at {name}")


# Note [linearize's metadata]
# torch.func.linearize traces the jvp with make_fx on real tensors, which records each node's
# metadata as a fake tensor: with no fake mode in reach (torch 2.13's extract_val), it builds a
# new FakeTensorMode for every node, each capturing the Python stack: ~35% of the property's time
# (a rank chart's maps: ~1,000 nodes a trace). A TracingContext holding one FakeTensorMode is
# where detect_fake_mode looks first, so every node's metadata comes from that one mode. The
# trace, the graph, its constant folding and the values are unchanged (the mode is never entered:
# no dispatch mode is active, and the maps' fake-mode checks see none); only the metadata's
# bookkeeping is shared. Measured (LowRank-2, the property alone): 7.0 → 4.2 s.
def _one_fake_mode() -> contextlib.AbstractContextManager[Any]:
    """A TracingContext with one FakeTensorMode for make_fx's node metadata (Note [linearize's metadata])."""
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode

        active = TracingContext.try_get()
    except (ImportError, AttributeError):  # (a torch without them: the metadata's own modes)
        return contextlib.nullcontext()
    if active is not None:  # already inside one (e.g. a compiled caller): leave it
        return contextlib.nullcontext()
    return tracing(TracingContext(FakeTensorMode()))


@_property
def check_linearize(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.func.linearize`` gives ``jvp``'s value and tangent (float64): of ``to_manifold`` on the
    case's first shape and the smoke shape, of ``retract(X, ·)`` and ``project`` on the smoke shape.
    linearize traces the jvp with make_fx and folds the tangent-free part into constants, so a value
    read into Python fails there and an in-place op whose result is unused is dropped (1×1 rank
    charts' tangents were 20–130% off: Note [Traced by make_fx] in ``geofunc/_fastpath.py``)."""
    _require_f64("linearize", dtype)
    g = _gen(generator)
    M = case.space
    runs = []
    for sh in dict.fromkeys([tuple(case.shapes[0]), tuple(case.smoke)]):
        shape, X, base, Z = _smoke_inputs(case, g, sh)
        runs.append((shape, "to_manifold", lambda z, base=base: M.to_manifold(z, base), Z))
        if sh == tuple(case.smoke):
            V = M.tangent(X, _randn(shape, f64, g))
            runs.append((shape, "retract(X, ·)", lambda v, X=X: M.retract(X, v), V))
            runs.append((shape, "project", M.project, X + 0.01 * _randn(shape, f64, g)))
    for shape, name, fn, at in runs:
        ctx = _ctx(case, shape, f64)
        d = _randn(shape, f64, g)
        value, tangent = jvp(fn, (at,), (d,))
        try:
            with warnings.catch_warnings():  # torch's own, from any linearize (torch 2.13)
                warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node", UserWarning)
                warnings.filterwarnings("ignore", ".*torch.jit.script.* is deprecated", DeprecationWarning)
                with _one_fake_mode():
                    lin_value, jfn = linearize(fn, at)
                lin_tangent = jfn(d)
        except Exception as e:  # noqa: BLE001 (any failure of the trace is the finding)
            raise _fail(ctx, f"torch.func.linearize of {name} raised {type(e).__name__}: {e}") from None
        tol = 1e-10 * max(1.0, float(tangent.abs().max()))
        _close(lin_value, value, tol, ctx, f"linearize's value of {name} != the map's")
        _close(lin_tangent, tangent, tol, ctx, f"linearize's tangent of {name} != jvp's")


def _derivative_points(case: SpaceCase, Z: Tensor) -> list[tuple[str, Tensor]]:
    """Where the derivative checks run: a random ``Z`` and the chart centre ``Z = 0`` (if defined)."""
    points = [("random Z", Z)]
    if case.defined_at_zero:
        points.append(("Z = 0", torch.zeros_like(Z)))
    return points


@_property
def check_hessian(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """The hessian of a scalar loss of ``to_manifold`` at random ``Z`` and at ``Z = 0`` is finite,
    symmetric, and equals central finite differences of the gradient along random directions
    (``(∇L(Z + hD) − ∇L(Z − hD))/2h``, ``h = 1e-5``, float64), on the smoke shape and its transpose."""
    _require_f64("hessian", dtype)
    g = _gen(generator)
    M = case.space
    for sh in _derivative_shapes(case):
        shape, X, base, Z = _smoke_inputs(case, g, sh)
        ctx = _ctx(case, shape, f64)
        C, D = _randn(shape, f64, g), _randn(shape, f64, g)

        def loss(z: Tensor, base: Any = base, C: Tensor = C, D: Tensor = D) -> Tensor:
            Xz = M.to_manifold(z, base)
            return (Xz * C).sum() + (Xz * D).sum() ** 2

        n = math.prod(shape)
        gfn = grad(loss)
        h = 1e-5
        for name, at in _derivative_points(case, Z):
            Hm = hessian(loss)(at).reshape(n, n)
            if not bool(torch.isfinite(Hm).all()):
                raise _fail(ctx, f"hessian at {name} is not finite")
            _close(Hm, Hm.T, 1e-8 * max(1.0, float(Hm.abs().max())), ctx, f"hessian at {name} is not symmetric")
            for _ in range(2):
                d = _randn(shape, f64, g)
                fd = ((gfn(at + h * d) - gfn(at - h * d)) / (2 * h)).reshape(n)
                _close(Hm @ d.reshape(n), fd, 1e-6 * max(1.0, float(fd.abs().max())), ctx,
                       f"hessian at {name} != finite differences of the gradient")


def _second_directional(loss: Callable[[Tensor], Tensor], at: Tensor, d: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The gradient of the scalar ``loss`` at ``at`` (autograd; zero where ``loss`` does not depend on
    its argument) and its second directional derivative along ``d`` three ways: ``{"double backward",
    "jvp of jvp", "grad of jvp"}``."""
    xr = at.detach().clone().requires_grad_(True)
    out = loss(xr)
    g1 = torch.zeros_like(xr)
    twice = 0.0  # a map that does not depend on its argument (the flat spaces' egrad_to_rgrad)
    if out.requires_grad:
        (g1,) = torch.autograd.grad(out, xr, create_graph=True)
        if g1.requires_grad:
            (g2,) = torch.autograd.grad((g1 * d).sum(), xr, allow_unused=True)
            twice = 0.0 if g2 is None else float((g2 * d).sum())
    ff = float(jvp(lambda x: jvp(loss, (x,), (d,))[1], (at,), (d,))[1])
    rf = float((grad(lambda x: jvp(loss, (x,), (d,))[1])(at) * d).sum())
    return g1.detach(), {"double backward": twice, "jvp of jvp": ff, "grad of jvp": rf}


@_property
def check_nested_forward(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """Second directional derivatives through forward mode equal plain autograd's double backward
    (float64, to ``1e-8`` relative): ``jvp`` of ``jvp`` (forward over forward) and ``grad`` of ``jvp``
    (reverse over forward), for a scalar loss of ``to_manifold`` (random ``Z`` and ``Z = 0``),
    ``retract(X, ·)``, ``project`` near a point, ``transport(X, retract(X, ·), U)``,
    ``egrad_to_rgrad(·, G)`` and, where the space has them, ``expmap(X, ·)`` and ``logmap(X, ·)``, on
    the smoke shape. torch's forward-mode rules of ``linalg.solve``, ``slogdet``
    and ``det`` drop a second-order term when differentiated again (torch 2.13; Note [Solves under
    torch.func]): a map built on them fails here, which ``hessian`` (forward over reverse) and
    ``gradgradcheck`` (reverse over reverse) do not see."""
    from ._geodesic import implements

    _require_f64("nested_forward", dtype)
    g = _gen(generator)
    M = case.space
    shape, X, base, Z = _smoke_inputs(case, g)
    ctx = _ctx(case, shape, f64)
    C, G = _randn(shape, f64, g), _randn(shape, f64, g)
    V = M.tangent(X, G)
    V = 0.3 * V / max(1.0, float(V.abs().max()))  # a moderate step: inside every injectivity radius
    maps: list[tuple[str, Callable[[Tensor], Tensor], Tensor]] = [
        (f"to_manifold at {name}", lambda z: M.to_manifold(z, base), at) for name, at in _derivative_points(case, Z)]
    maps += [("retract(X, ·)", lambda v: M.retract(X, v), V),
             ("project near a point", M.project, X + _randn(shape, f64, g, 0.05))]
    U = M.tangent(X, _randn(shape, f64, g))
    maps += [("transport(X, retract(X, ·), U)", lambda v: M.transport(X, M.retract(X, v), U), V),
             ("egrad_to_rgrad(·, G)", lambda x: M.egrad_to_rgrad(x, G), X)]
    if implements(M, "expmap"):
        maps.append(("expmap(X, ·)", lambda v: M.expmap(X, M.tangent(X, v)), V))
    if implements(M, "logmap"):
        maps.append(("logmap(X, ·)", lambda y: M.logmap(X, y), M.retract(X, V)))
    for name, fn, at in maps:

        def loss(x: Tensor, fn: Callable[[Tensor], Tensor] = fn) -> Tensor:
            out = fn(x)
            return (out * C).sum() + (out * C).sum() ** 2  # a quadratic term: the second derivative is not 0

        _, second = _second_directional(loss, at, _randn(shape, f64, g))
        ref = second.pop("double backward")
        tol = 1e-8 * max(1.0, abs(ref))
        for how, got in second.items():
            if not abs(got - ref) <= tol:
                raise _fail(ctx, f"{how} of {name}: second directional derivative {got!r} != {ref!r} from "
                                 "autograd's double backward")


@_property
def check_vmap_grad(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``vmap(grad(loss))`` over a stack of raw tensors and bases equals the loop of ``grad(loss)``."""
    _require_f64("vmap_grad", dtype)
    g = _gen(generator)
    M = case.space
    shape = (_B, *case.smoke)
    ctx = _ctx(case, shape, f64)
    _, _, base = _point_and_base(case, shape, f64, g)
    Z, C = _randn(shape, f64, g), _randn(shape, f64, g)

    def loss(z: Tensor, b: Any, c: Tensor) -> Tensor:
        return (M.to_manifold(z, b) * c).sum()

    with no_vmap_fallback():
        try:
            got = vmap(grad(loss), in_dims=(0, _dims(base), 0))(Z, base, C)
        except RuntimeError as e:
            raise _fail(ctx, f"vmap(grad(loss)) failed: {e}") from None
    loop = torch.stack([grad(loss)(Z[i], _tree_index(base, i), C[i]) for i in range(_B)])
    _close(got, loop, 1e-10, ctx, "vmap(grad(loss)) != loop of grad(loss)")


@_property
def check_compile(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` of ``to_manifold``: same value and
    gradient as eager. In float64 (to ``1e-10``) on the smoke shape; in the case's other dtype
    (float32: to ``tol``) on its transpose, a wide shape (the smoke shape if the space takes no
    transpose); a float64-only case runs both shapes in float64. One compilation per shape and
    dtype (each costs seconds)."""
    g = _gen(generator)
    M = case.space
    tol = 1e-10 if dtype == f64 else case.tol[dtype]

    def f(z: Tensor, b: Any) -> Tensor:
        return M.to_manifold(z, b)

    shapes = _derivative_shapes(case)
    if any(d != f64 for d in case.dtypes):
        shapes = shapes[:1] if dtype == f64 else shapes[-1:]
    for sh in shapes:
        X, _, base = _point_and_base(case, sh, dtype, g)
        Z, C = _randn(sh, dtype, g), _randn(sh, dtype, g)
        ctx = _ctx(case, sh, dtype)
        torch._dynamo.reset()
        try:
            cf = torch.compile(f, fullgraph=True, backend="aot_eager")
            Zc = Z.clone().requires_grad_(True)
            try:
                out = cf(Zc, base)
            except Exception as e:
                raise _fail(ctx, f"torch.compile(fullgraph=True) of to_manifold failed: {type(e).__name__}: {e}") from None
            (gc,) = torch.autograd.grad((out * C).sum(), Zc)
            Ze = Z.clone().requires_grad_(True)
            ref = f(Ze, base)
            (ge,) = torch.autograd.grad((ref * C).sum(), Ze)
            _close(out.detach(), ref.detach(), tol, ctx, "compiled to_manifold != eager")
            _close(gc, ge, tol * max(1.0, float(ge.abs().max())), ctx, "gradient of compiled to_manifold != eager")
        finally:
            torch._dynamo.reset()


# Note [Compiling the other maps]
# check_compile traces to_manifold with backend="aot_eager", forward and backward, twice per case
# (~1 s each on the CI box). The other maps need the same contract, torch.compile(fullgraph=True):
# no graph break, which Dynamo decides (a branch on a tensor value, `.item()`, an untraceable
# call), before any backend runs. So check_compile_maps traces them all in *one* function with
# backend="eager" (Dynamo's graph, run as is): half of aot_eager's cost (measured over the
# built-in cases: 29 s against 52 s), one compilation per case. What it leaves out is AOT
# autograd's own tracing of those maps (functionalization, fake-tensor kernels, the backward):
# check_compile_aot (Note [AOT autograd's tracing of the maps]), which traces the same maps
# through Dynamo first, so that check_space runs check_compile_maps only where a case skips it.
_MAPS_BACKEND = "eager"
# The maps besides to_manifold that check_compile_maps compiles, in one graph.
_COMPILED_MAPS = ("tangent", "retract", "project", "egrad_to_rgrad", "inner", "transport", "contains", "logabsdet")


@_property
def check_compile_maps(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.compile(fullgraph=True)`` of the maps besides ``to_manifold`` (:func:`check_compile`):
    ``tangent``, ``retract``, ``project``, ``egrad_to_rgrad``, ``inner``, ``transport``,
    ``contains`` and ``logabsdet`` (where ``case.has_logabsdet``), traced together as one function
    (one compilation per case, ``backend="eager"``: Note [Compiling the other maps]): every value
    equals eager to ``1e-10`` relative (float64, on the smoke shape). A graph break in any map
    fails it; the failure names the first map that does not compile alone. :func:`check_compile_aot`
    compiles the same maps through Dynamo and then AOT autograd; :func:`check_space` runs this one
    only where the case skips that."""
    _require_f64("compile_maps", dtype)
    g = _gen(generator)
    M = case.space
    shape = case.smoke
    ctx = _ctx(case, shape, f64)
    X, Z0, base = _point_and_base(case, shape, f64, g)
    G, H, Y, Z = (_randn(shape, f64, g) for _ in range(4))
    V = M.tangent(X, H)
    X2 = M.sample(shape, generator=g, dtype=f64)
    # The inputs are arguments of the compiled function, not constants it closes over.
    args = (X, G, V, Y, X2, Z0 + 0.5 * Z, base)

    def run(names: tuple[str, ...], X: Tensor, G: Tensor, V: Tensor, Y: Tensor, X2: Tensor, Zb: Tensor,
            b: Any) -> dict[str, Any]:
        table = {
            "tangent": lambda: M.tangent(X, G),
            "retract": lambda: M.retract(X, V),
            "project": lambda: M.project(Y),
            "egrad_to_rgrad": lambda: M.egrad_to_rgrad(X, G),
            "inner": lambda: M.inner(X, V, V),
            "transport": lambda: M.transport(X, X2, V),
            "contains": lambda: M.contains(X),
            "logabsdet": lambda: M.logabsdet(Zb, b),
        }
        return {n: table[n]() for n in names}

    names = tuple(n for n in _COMPILED_MAPS if n != "logabsdet" or case.has_logabsdet)
    expected = run(names, *args)
    torch._dynamo.reset()
    try:
        try:
            got = torch.compile(functools.partial(run, names), fullgraph=True, backend=_MAPS_BACKEND)(*args)
        except Exception as e:
            for n in names:  # which map: compile each alone (the failure path only)
                torch._dynamo.reset()
                try:
                    torch.compile(functools.partial(run, (n,)), fullgraph=True, backend=_MAPS_BACKEND)(*args)
                except Exception as e1:
                    raise _fail(ctx, f"torch.compile(fullgraph=True) of {n} failed: {type(e1).__name__}: {e1}") from None
            raise _fail(ctx, f"torch.compile(fullgraph=True) of {', '.join(names)} together failed "
                        f"(each compiles alone): {type(e).__name__}: {e}") from None
    finally:
        torch._dynamo.reset()
    for n in names:
        for a, b in zip(_leaves(got[n]), _leaves(expected[n])):
            if a.dtype == torch.bool:
                if not torch.equal(a, b):
                    raise _fail(ctx, f"compiled {n} != eager")
            else:
                scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
                _close(a, b, 1e-10 * scale, ctx, f"compiled {n} != eager")



# Note [AOT autograd's tracing of the maps]
# check_compile_maps runs Dynamo's graph as is (backend="eager"): a graph break shows there, but
# AOT autograd never traces the maps. A training step compiled whole (geofunc.optim's update in
# tests/test_optim.py: backend="aot_eager"; inductor's default backend) runs them through it:
# functionalization, the fake-tensor kernels, and the backward, traced ahead of time from the
# derivative formulas and from a custom operator's registered backward, which Dynamo never looks
# at (it leaves an operator opaque and the backward to eager autograd: a backward that branches
# on a value runs there, and fails AOT's trace). So check_compile_aot compiles the differentiable
# maps with backend="aot_eager" (fullgraph=True, dynamic=False) on inputs that require grad, so
# that AOT autograd traces the joint forward and backward graph, and `contains` beside them
# (forward only); the values and the gradients of a random linear functional of each map's
# output must equal eager. Each map takes its own copies of the inputs (distinct leaves of the
# one graph), so a wrong gradient names its map and argument.
# Cost: all maps in one function, one trace per case on the smoke shape: ~1.6 s a case, ~90 s
# over the built-in cases on a 2-core box, of which Dynamo's trace is ~35 s, the same as
# check_compile_maps'. Since Dynamo's trace is the first half of this one (a graph break fails
# both), check_space runs check_compile_maps only where a case skips check_compile_aot: ~55 s more
# than check_compile_maps alone, not ~90 s. What that leaves out: the maps' Dynamo graph with
# inputs that do not require grad (an optimizer's step) where it differs, which a space's branch
# on requires_grad or grad mode would make; for the built-in spaces it is the same graph except
# Birkhoff's (its Sinkhorn autograd.Function is one node of the graph with grad, inlined without),
# checked once. from_manifold and rebase are compiled in the same function, forward only, on
# inputs that do not require grad: a training step compiled whole may re-centre its charts
# (DESIGN's Riemannian gradient descent: any optimizer on Z, then rebase), and AOT autograd then
# traces rebase too (+~5 s over the built-in cases: the same one trace per case).
# Under torch.no_grad() the maps with derivative terms take their value-only path inside compile too
# (Note [Compiled maps that nothing differentiates] in geofunc/_fastpath.py): a different graph, the
# one a compiled optimizer update or projection under no_grad runs. So the differentiated maps are
# compiled once more, under no_grad, forward only, and must equal eager under no_grad (a second trace
# per case, cheaper: no backward).
_AOT_BACKEND = "aot_eager"
# The maps check_compile_aot compiles, with their arguments' names; all but _AOT_FORWARD are
# differentiated (logabsdet where case.has_logabsdet, in Z).
_AOT_MAPS = {"tangent": ("X", "G"), "retract": ("X", "V"), "project": ("Y",), "egrad_to_rgrad": ("X", "G"),
             "inner": ("X", "U", "V"), "transport": ("X", "Y", "V"), "logabsdet": ("Z", "base"), "contains": ("X",),
             "from_manifold": ("X",), "rebase": ("Z", "base")}
_AOT_FORWARD = frozenset({"contains", "from_manifold", "rebase"})


def _aot_inputs(case: SpaceCase, g: torch.Generator) -> dict[str, tuple[Any, ...]]:
    """The arguments of the maps :func:`check_compile_aot` compiles (float64, the smoke shape)."""
    M = case.space
    shape = case.smoke
    X, Z0, base = _point_and_base(case, shape, f64, g)
    G, H, K, Y, Z = (_randn(shape, f64, g) for _ in range(5))
    U, V = M.tangent(X, H), M.tangent(X, K)
    X2 = M.sample(shape, generator=g, dtype=f64)
    inputs: dict[str, tuple[Any, ...]] = {
        "tangent": (X, G), "retract": (X, V), "project": (Y,), "egrad_to_rgrad": (X, G), "inner": (X, U, V),
        "transport": (X, X2, V), "logabsdet": (Z0 + 0.5 * Z, base), "contains": (X,),
        "from_manifold": (X,), "rebase": (Z0 + 0.5 * Z, base),
    }
    if not case.has_logabsdet:
        del inputs["logabsdet"]
    return inputs


def _aot_leaves(inputs: dict[str, tuple[Any, ...]], names: Any) -> dict[str, tuple[Any, ...]]:
    """Fresh copies of the maps' tensor arguments, leaves that require grad (not those of the maps of
    ``_AOT_FORWARD``, nor bases: a tree of tensors passes unchanged)."""
    def leaf(a: Any, grad: bool) -> Any:
        return a.detach().clone().requires_grad_(grad) if isinstance(a, Tensor) else a

    return {n: tuple(leaf(a, n not in _AOT_FORWARD and _AOT_MAPS[n][i] != "base") for i, a in enumerate(inputs[n]))
            for n in names}


def _aot_run(M: Any, inputs: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    return {n: getattr(M, n)(*args) for n, args in inputs.items()}


def _aot_grads(out: dict[str, Any], cots: dict[str, Tensor], inputs: dict[str, tuple[Any, ...]]
               ) -> dict[str, Optional[Tensor]]:
    """Gradients of ``Σ_maps ⟨out, cot⟩`` in every argument that requires grad, named
    ``"map(…) in arg"`` (None: unused): one backward through the one graph."""
    wrt = {f"{n}({', '.join(_AOT_MAPS[n])}) in {_AOT_MAPS[n][i]}": a
           for n in cots for i, a in enumerate(inputs[n]) if isinstance(a, Tensor) and a.requires_grad}
    terms = [(out[n] * cots[n]).sum() for n in cots if out[n].requires_grad]
    if not terms:
        return dict.fromkeys(wrt)
    return dict(zip(wrt, torch.autograd.grad(sum(terms), list(wrt.values()), allow_unused=True)))


def _aot_compile(M: Any, inputs: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    torch._dynamo.reset()
    return torch.compile(functools.partial(_aot_run, M), fullgraph=True, dynamic=False, backend=_AOT_BACKEND)(inputs)


def _aot_compile_named(M: Any, inputs: dict[str, tuple[Any, ...]], alone: Callable[[str], dict[str, tuple[Any, ...]]],
                       ctx: str, where: str = "") -> dict[str, Any]:
    """:func:`_aot_compile` of every map of ``inputs``; if that fails, the first map that does not compile
    alone (on the inputs ``alone(name)``; the failure path only) is named in the failure."""
    try:
        return _aot_compile(M, inputs)
    except Exception as e:
        for n in inputs:
            try:
                _aot_compile(M, alone(n))
            except Exception as e1:
                raise _fail(ctx, f'torch.compile(fullgraph=True, backend="aot_eager") of {n}{where} failed: '
                            f"{type(e1).__name__}: {e1}") from None
        raise _fail(ctx, f'torch.compile(fullgraph=True, backend="aot_eager") of {", ".join(inputs)}{where} together '
                    f"failed (each compiles alone): {type(e).__name__}: {e}") from None


def _aot_close(a: Tensor, b: Tensor, ctx: str, what: str) -> None:
    if a.dtype == torch.bool:
        if not torch.equal(a, b):
            raise _fail(ctx, f"{what} compiled by AOT autograd != eager")
        return
    scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
    _close(a, b, 1e-10 * scale, ctx, f"{what} compiled by AOT autograd != eager")


@_property
def check_compile_aot(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``torch.compile(fullgraph=True, dynamic=False, backend="aot_eager")`` of the maps besides
    ``to_manifold`` (:func:`check_compile`), traced by AOT autograd, forward and backward (Note [AOT
    autograd's tracing of the maps]): ``tangent``, ``retract``, ``project``, ``egrad_to_rgrad``,
    ``inner``, ``transport`` and ``logabsdet`` (where ``case.has_logabsdet``) on inputs that require
    grad, and ``contains``, ``from_manifold`` and ``rebase`` (forward only), as one function (float64,
    on the smoke shape). Every value, and the
    gradient in every input of a random linear functional of each map's output, equals eager to
    ``1e-10`` relative. The differentiated maps are compiled again under ``torch.no_grad()`` (where
    a map may leave its derivative terms out), and equal eager there. A failure to compile names the
    first map that does not compile alone."""
    _require_f64("compile_aot", dtype)
    g = _gen(generator)
    M = case.space
    ctx = _ctx(case, case.smoke, f64)
    inputs = _aot_inputs(case, g)
    eager_in = _aot_leaves(inputs, inputs)
    expected = _aot_run(M, eager_in)
    cots = {n: _randn(tuple(expected[n].shape), f64, g) for n in inputs if n not in _AOT_FORWARD}
    compiled_in = _aot_leaves(inputs, inputs)
    try:
        got = _aot_compile_named(M, compiled_in, lambda n: _aot_leaves(inputs, (n,)), ctx)
        for n in inputs:
            for a, b in zip(_leaves(got[n]), _leaves(expected[n])):
                _aot_close(a.detach(), b.detach(), ctx, n)
        try:
            grads = _aot_grads(got, cots, compiled_in)
        except Exception as e:
            raise _fail(ctx, f"the backward of the maps compiled by AOT autograd failed: "
                        f"{type(e).__name__}: {e}") from None
    finally:
        torch._dynamo.reset()
    for what, b in _aot_grads(expected, cots, eager_in).items():
        a = grads[what]
        if a is None or b is None:  # an input the map does not use: no gradient, or a zero one
            if (a is None) != (b is None) and bool(((b if a is None else a) != 0).any()):
                raise _fail(ctx, f"the gradient of {what} is {'missing' if a is None else 'present'} compiled, "
                            f"not in eager")
            continue
        _aot_close(a, b, ctx, f"the gradient of {what}")
    _check_compile_no_grad(M, inputs, ctx)


def _check_compile_no_grad(M: Any, inputs: dict[str, tuple[Any, ...]], ctx: str) -> None:
    """The differentiated maps of :func:`check_compile_aot` compiled under ``torch.no_grad()`` equal eager there."""
    plain = {n: tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
             for n, args in inputs.items() if n not in _AOT_FORWARD}
    with torch.no_grad():
        expected = _aot_run(M, plain)
        try:
            got = _aot_compile_named(M, plain, lambda n: {n: plain[n]}, ctx, " under torch.no_grad()")
        finally:
            torch._dynamo.reset()
    for n in plain:
        for a, b in zip(_leaves(got[n]), _leaves(expected[n])):
            _aot_close(a, b, ctx, f"{n} under torch.no_grad()")


_LOGABSDET_SIZES = (1, 2, 3, 5, 8)


def _logabsdet_shapes(case: SpaceCase) -> list[tuple[int, ...]]:
    if case.logabsdet_shapes is not None:
        return [tuple(s) for s in case.logabsdet_shapes]
    out = list(case.shapes)
    for n in _LOGABSDET_SIZES:
        if (n, n) in out:
            continue
        try:
            case.space.logabsdet(torch.zeros(n, n, dtype=f64))
        except ManifoldError:
            continue  # a size the space has no logabsdet at (e.g. rank < n)
        out.append((n, n))
    return out


@_property
def check_logabsdet(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """``logabsdet(Z, base) == slogdet(to_manifold(Z, base))[1]``, values and gradients (float64),
    on ``case.logabsdet_shapes`` (default: the case's shapes and the square sizes 1, 2, 3, 5, 8)."""
    _require_f64("logabsdet", dtype)
    g = _gen(generator)
    M = case.space
    for shape in _logabsdet_shapes(case):
        ctx = _ctx(case, shape, f64)
        _, Z0, base = _point_and_base(case, shape, f64, g)
        for name, Z in (("random Z", Z0 + _randn(shape, f64, g)), ("Z at the centre", Z0)):
            Za = Z.clone().requires_grad_(True)
            Zb = Z.clone().requires_grad_(True)
            la = M.logabsdet(Za, base)
            lb = torch.linalg.slogdet(M.to_manifold(Zb, base))[1]
            _close(la.detach(), lb.detach(), 1e-8, ctx, f"logabsdet != slogdet at {name}")
            (ga,) = torch.autograd.grad(la.sum(), Za)
            (gb,) = torch.autograd.grad(lb.sum(), Zb)
            _close(ga, gb, 1e-7, ctx, f"gradient of logabsdet != gradient of slogdet at {name}")


_ODD_SHAPES = ((), (3,), (0, 3), (3, 0), (2, 3), (3, 2), (2, 2, 3))


@_property
def check_bad_input(case: SpaceCase, dtype: torch.dtype = f64, *, generator: Optional[torch.Generator] = None) -> None:
    """Odd shapes either work or raise ``ManifoldError`` naming the space (never another exception);
    an integer tensor, a ``sample`` shape that is not integers (an int ``n`` means ``(n,)``), and
    ``tangent``/``retract`` with batch dims that do not broadcast, raise ``ManifoldError``."""
    _require_f64("bad_input", dtype)
    M = case.space
    shape = case.smoke
    ctx = _ctx(case, shape, f64)
    tests: list[tuple[str, Callable[[], Any]]] = [
        (f"to_manifold(integer tensor of shape {shape})", lambda: M.to_manifold(torch.zeros(shape, dtype=torch.int64))),
        (f"project(integer tensor of shape {shape})", lambda: M.project(torch.zeros(shape, dtype=torch.int64))),
    ]
    for name, fn in tests:
        try:
            fn()
        except ManifoldError as e:
            if repr(M) not in str(e):
                raise _fail(ctx, f"the ManifoldError of {name} does not name the space: {e}") from None
        except Exception as e:
            raise _fail(ctx, f"{name} raised {type(e).__name__} instead of ManifoldError: {e}") from None
        else:
            raise _fail(ctx, f"{name} did not raise ManifoldError")
    # sample: a shape that is not a tuple of non-negative integers is a ManifoldError; an int n
    # means (n,) (a vector: a point of a vector space, a ManifoldError for a matrix space).
    for bad in (2.5, "3", (3, 2.0), (3, -1), None):
        try:
            M.sample(bad, dtype=f64)
        except ManifoldError as e:
            if repr(M) not in str(e):
                raise _fail(ctx, f"the ManifoldError of sample({bad!r}) does not name the space: {e}") from None
        except Exception as e:
            raise _fail(ctx, f"sample({bad!r}) raised {type(e).__name__} instead of ManifoldError: {e}") from None
        else:
            raise _fail(ctx, f"sample({bad!r}) did not raise ManifoldError")
    n = shape[-1] if shape else 3  # (a smoke shape () of a space of scalar points, point_ndim 0)
    try:
        x = M.sample(n, dtype=f64)
    except ManifoldError:
        pass
    except Exception as e:
        raise _fail(ctx, f"sample({n}) raised {type(e).__name__} instead of a point of shape ({n},) or ManifoldError: {e}") from None
    else:
        if not isinstance(x, Tensor) or tuple(x.shape) != (n,):
            raise _fail(ctx, f"sample({n}) did not return a point of shape ({n},)")
    # tangent/retract with batch dims that do not broadcast with X's: a shape error.
    X = M.sample((2, *shape), generator=_gen(generator), dtype=f64)
    for name, fn in (("tangent", M.tangent), ("retract", M.retract)):
        try:
            fn(X, torch.zeros((3, *shape), dtype=f64))
        except ManifoldError as e:
            if repr(M) not in str(e):
                raise _fail(ctx, f"the ManifoldError of {name} on mismatched batch dims does not name the space: {e}") from None
        except Exception as e:
            raise _fail(ctx, f"{name}(X of shape {(2, *shape)}, V of shape {(3, *shape)}) raised "
                        f"{type(e).__name__} instead of ManifoldError: {e}") from None
        else:
            raise _fail(ctx, f"{name}(X of shape {(2, *shape)}, V of shape {(3, *shape)}) did not raise ManifoldError")
    for odd in _ODD_SHAPES:
        for name, fn in (("to_manifold", lambda s: M.to_manifold(torch.ones(s, dtype=f64))),
                         ("project", lambda s: M.project(torch.ones(s, dtype=f64))),
                         ("contains", lambda s: M.contains(torch.ones(s, dtype=f64))),
                         ("sample", lambda s: M.sample(s, dtype=f64))):
            try:
                fn(odd)
            except ManifoldError as e:
                if repr(M) not in str(e):
                    raise _fail(ctx, f"the ManifoldError of {name} on shape {odd} does not name the space: {e}") from None
            except Exception as e:
                raise _fail(ctx, f"{name} on shape {odd} raised {type(e).__name__} instead of ManifoldError: {e}") from None
