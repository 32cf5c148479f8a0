"""torch.func workflows beyond single maps: functionalize, against the same calls without it.

``torch.func.functionalize`` has no rule for a custom ``autograd.Function`` (torch 2.13), so the maps
through the matrix exponential and Sinkhorn raised "NYI: Functionalize rule for custom_function_call"
there (Note [Functions under functionalize] in geofunc/_fastpath.py). Every comparison is float64
against the same computation without functionalize.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functionalize, grad, jacrev, vmap
from torch.fx.experimental.proxy_tensor import make_fx

import geofunc as gf
from reference import member

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: the same ops, or the exponential's static schedule

# one space per path that took a custom Function: the exponential (dense, frame, rank, eigen,
# Hurwitz, complex) and Sinkhorn
FUNCTIONALIZE = [
    (gf.SO(), (4, 4), F64), (gf.Stiefel(), (5, 3), F64), (gf.PSD(), (4, 4), F64), (gf.LowRank(2), (5, 4), F64),
    (gf.GLp(), (3, 3), F64), (gf.SL(), (3, 3), F64), (gf.Hurwitz(alpha=0.1), (3, 3), F64), (gf.Birkhoff(), (4, 4), F64),
    (gf.Unitary(), (3, 3), torch.complex128),
]


@pytest.mark.parametrize("space,shape,dtype", FUNCTIONALIZE, ids=[type(s).__name__ for s, _, _ in FUNCTIONALIZE])
def test_maps_and_their_gradients_under_functionalize(space, shape, dtype, generator):
    X = space.sample((2, *shape), generator=generator, dtype=dtype)
    Z, base = space.from_manifold(X)
    Z = Z + 0.1 * torch.randn(Z.shape, generator=generator, dtype=dtype)
    A = torch.randn(Z.shape, generator=generator, dtype=dtype)
    V = space.tangent(X, 0.1 * A)

    def loss(z):
        return (space.to_manifold(z, base) * A.conj()).real.sum() ** 2

    point = functionalize(space.to_manifold)(Z, base)
    torch.testing.assert_close(point, space.to_manifold(Z, base), **TOL)
    assert member(space, point)
    torch.testing.assert_close(functionalize(space.retract)(X, V), space.retract(X, V), **TOL)
    torch.testing.assert_close(functionalize(space.project)(X + 0.1 * A), space.project(X + 0.1 * A), **TOL)
    ref = grad(loss)(Z)
    torch.testing.assert_close(grad(functionalize(loss))(Z), ref, **TOL)
    torch.testing.assert_close(functionalize(grad(loss))(Z), ref, **TOL)
    if not dtype.is_complex:  # jacrev takes real inputs only
        torch.testing.assert_close(vmap(jacrev(functionalize(loss)))(Z[:, None]), vmap(jacrev(loss))(Z[:, None]), **TOL)


def test_a_traced_functionalized_gradient(generator):
    """make_fx(functionalize(...)), the use functionalize is for (one space: tracing costs seconds)."""
    space = gf.SO()
    Z = 0.3 * torch.randn(4, 4, generator=generator, dtype=F64)
    A = torch.randn(4, 4, generator=generator, dtype=F64)

    def loss(z):
        return (space.to_manifold(z) * A).sum() ** 2

    traced = make_fx(functionalize(grad(loss), remove="mutations_and_views"))(Z)
    torch.testing.assert_close(traced(Z), grad(loss)(Z), **TOL)


def test_an_optimizer_step_under_functionalize(generator):
    c = {"w": gf.SO(), "p": gf.Birkhoff()}
    params = {"w": gf.SO().sample((2, 4, 4), generator=generator, dtype=F64),
              "p": gf.Birkhoff().sample((3, 3), generator=generator, dtype=F64)}
    grads = {k: torch.randn(v.shape, generator=generator, dtype=F64) for k, v in params.items()}
    opt = gf.optim.radam(c, 0.05)
    state = opt.init(params)
    got, _ = functionalize(opt.update)(grads, state, params)
    ref, _ = opt.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], **TOL)


# one path each that read values in plain eager mode: the exponential's degree choice (SO 40×40), the
# one-node tall chart (Stiefel 16×4), the frame exponential (k ≥ 32), the rank chart
MAKE_FX = [(gf.SO(), (40, 40)), (gf.Stiefel(), (16, 4)), (gf.Stiefel(), (80, 32)), (gf.LowRank(2), (16, 12)),
           (gf.Grassmannian(), (8, 3))]


@pytest.mark.parametrize("operators", [True, False], ids=["operators", "static"])
@pytest.mark.parametrize("space,shape", MAKE_FX, ids=[f"{type(s).__name__}-{n}x{k}" for s, (n, k) in MAKE_FX])
def test_make_fx_of_a_chart_and_its_gradient_holds_at_other_values(space, shape, operators, generator, monkeypatch):
    """``make_fx(f, tracing_mode="real")`` of a chart and its plain-autograd gradient: the eager fast paths
    read the exponential's degree and squarings into Python, which raised "trying to get value out of a
    tracing tensor" (SO 40×40, frames with k ≥ 32) or, where the read value was not traced (the one-node
    charts' small exponentials), was baked into the graph: replayed at a raw tensor 30× larger, the
    graph's points were off the space (errors up to 1e5), silently. While make_fx traces, the exponential
    is the runtime-choosing operator (or, without it, the static schedule), as inside torch.compile
    (Note [Traced by make_fx] in geofunc/_fastpath.py)."""
    from geofunc import _expm

    if not operators:
        monkeypatch.setattr(_expm, "_COMPILED_OPS", False)
        monkeypatch.setattr(_expm, "_FRAME_OPS", False)
    W = torch.randn(shape, generator=generator, dtype=F64)

    def f(Z):
        Z = Z.detach().requires_grad_()
        X = space.to_manifold(Z)
        return X, torch.autograd.grad((X * W).sum(), Z)[0]

    Z = torch.randn(shape, generator=generator, dtype=F64)
    traced = make_fx(f, tracing_mode="real")(0.1 * Z)
    for scale in (0.1, 3.0):
        for got, ref in zip(traced(scale * Z), f(scale * Z)):
            torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("space,shape", MAKE_FX, ids=[f"{type(s).__name__}-{n}x{k}" for s, (n, k) in MAKE_FX])
def test_make_fx_before_dispatch_of_a_chart_holds_at_other_values(space, shape, generator):
    """``make_fx(f, tracing_mode="real", pre_dispatch=True)`` (torch.export's tracer) keeps its proxy mode off
    the dispatch mode stack: the eager fast paths ran and their degree choice was baked into the graph
    (replayed at a raw tensor 30× larger: Stiefel 16×4 1e6 off, LowRank 1e8, Grassmannian 2e2, silently) or
    raised "a tracing tensor" (SO 40×40, frames with k ≥ 32). Note [Traced by make_fx before dispatch]."""
    Z = torch.randn(shape, generator=generator, dtype=F64)
    traced = make_fx(lambda Z: space.to_manifold(Z), tracing_mode="real", pre_dispatch=True)(0.1 * Z)
    for scale in (0.1, 3.0):
        torch.testing.assert_close(traced(scale * Z), space.to_manifold(scale * Z), **TOL)


@pytest.mark.parametrize("pre_dispatch", [False, True], ids=["make_fx", "pre_dispatch"])
@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("space", [gf.LowRank(2), gf.FixedRank(2)], ids=["LowRank", "FixedRank"])
def test_make_fx_of_a_chart_at_bases_holds_at_other_bases(space, mode, pre_dispatch, generator):
    """The rank family's chart at bases keeps the stacked bases' factors in a cache (Note [Base factor
    cache] in geofunc/_linalg.py) that eager calls fill. A trace whose bases are its inputs must compute the
    factors in the graph: taken from the cache (real values), they were baked in as constants, and the
    graph replayed at other bases was 3.4 off (LowRank) and 7.7 off (FixedRank), silently (mutant X08); under
    ``pre_dispatch=True`` the cache's comparison raised "a tracing tensor". Fake and symbolic traces have no
    values to cache. The chart and its gradient against eager at the traced bases and at others."""
    shape = (10, 8)
    X1 = space.sample(shape, generator=generator, dtype=F64)
    X2 = space.sample(shape, generator=generator, dtype=F64)
    (Z1, b1), (Z2, b2) = space.from_manifold(X1), space.from_manifold(X2)
    Z1 = Z1 + 0.1 * torch.randn(Z1.shape, generator=generator, dtype=F64)
    W = torch.randn(shape, generator=generator, dtype=F64)

    def f(Z, base, W):
        if pre_dispatch:  # (a trace before autograd does not take autograd.grad inside)
            return (space.to_manifold(Z, base),)
        Z = Z.detach().requires_grad_()
        X = space.to_manifold(Z, base)
        return X, torch.autograd.grad((X * W).sum(), Z)[0]

    space.to_manifold(Z1, b1)  # eager: the cache now holds the factors at b1
    traced = make_fx(f, tracing_mode=mode, pre_dispatch=pre_dispatch)(Z1, b1, W)
    for Z, base in ((Z1, b1), (Z2, b2)):
        for got, ref in zip(traced(Z, base, W), f(Z, base, W)):
            torch.testing.assert_close(got, ref, **TOL)


def test_make_fx_before_dispatch_under_another_dispatch_mode_holds_at_other_values(generator):
    """A pre-dispatch trace taken under another dispatch mode (FlopCounterMode, a user's logging mode): the
    regular dispatch stack is non-empty and holds no PROXY mode, so the pre-dispatch proxy mode must still be
    read (Note [Traced by make_fx before dispatch]); the fast path's degree was baked in (Stiefel 16×4: 4e5
    off at a raw tensor 30× larger, silently)."""
    from torch.utils.flop_counter import FlopCounterMode

    space = gf.Stiefel()
    Z = torch.randn(16, 4, generator=generator, dtype=F64)
    with FlopCounterMode(display=False):
        traced = make_fx(lambda Z: space.to_manifold(Z), tracing_mode="real", pre_dispatch=True)(0.1 * Z)
    for scale in (0.1, 3.0):
        torch.testing.assert_close(traced(scale * Z), space.to_manifold(scale * Z), **TOL)


def test_a_pre_dispatch_trace_in_another_thread_leaves_this_thread_eager():
    """torch's pre-dispatch mode slot is one for the process; the trace is this thread's only where its
    PreDispatch key is included (Note [Traced by make_fx before dispatch]). While another thread traces,
    this thread is eager: its membership checks run (read as traced, from_manifold of an off-space point
    was accepted silently) and its fast paths stay on."""
    import threading

    from geofunc._fastpath import eager_fast, make_fx_tracing

    inside, done, seen = threading.Event(), threading.Event(), []

    def f(Z):
        inside.set()
        done.wait(30)
        seen.append(make_fx_tracing())  # the tracing thread itself sees its trace
        return Z * 2

    t = threading.Thread(target=lambda: make_fx(f, tracing_mode="real", pre_dispatch=True)(torch.ones(3)))
    t.start()
    try:
        assert inside.wait(30)
        X = torch.eye(3, dtype=F64)
        here = (make_fx_tracing(), eager_fast(X))
        with pytest.raises(gf.ManifoldError, match="expected a point on the space"):
            gf.SO().from_manifold(2.0 * X)
    finally:
        done.set()
        t.join(30)
    assert here == (False, True)
    assert seen == [True]
