"""Second derivatives of the spectral maps (``project``, ``retract``, ``tangent`` of the rank/PSD
family, the polar ``project`` of the orthogonal family, Hurwitz's shift) in every mode.

Their values come from a decomposition of the detached input; their first and second derivatives
from closed-form terms that are zero in value (Note [Second derivatives of spectral maps] in
``geofunc/_linalg.py``). Before those terms existed, second derivatives silently missed the
decomposition's dependence on the input: ``d²/dt² f(retract(X, tV))`` of ``LowRank(2)`` was 4.22
where finite differences give 6.32. The oracle here is finite differences of the map itself (float64),
in plain autograd (the term as one node, built only for ``create_graph=True``: Note [Lazy
second-order terms] in ``geofunc/_fastpath.py``), under ``torch.func`` (the term as torch ops; one
node under a single ``grad``) and at points where singular values or eigenvalues tie (a rank-r point
of a rank-r space has k − r equal zero singular values). The conformance suite's ``gradgradcheck``
property checks every space's maps in plain autograd.
"""

from __future__ import annotations

import pytest
import torch

import geofunc as gf

F64 = torch.float64

SPACES = [
    (gf.LowRank(2), (6, 4)),
    (gf.LowRank(1), (3, 5)),
    (gf.FixedRank(2), (5, 4)),
    (gf.GLp(), (4, 4)),
    (gf.AlmostOrthogonal(0.5), (5, 3)),
    (gf.PSD(), (4, 4)),
    (gf.PSSDLowRank(2), (5, 5)),
    (gf.PSSDFixedRank(2), (4, 4)),
    (gf.Hurwitz(alpha=0.5), (4, 4)),
    (gf.Stiefel(), (5, 3)),
]
IDS = [f"{type(M).__name__}-{'x'.join(map(str, s))}" for M, s in SPACES]


def _setup(M, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = M.sample(shape, generator=g, dtype=F64)
    V = M.tangent(X, torch.randn(shape, generator=g, dtype=F64))
    W = torch.randn(shape, generator=g, dtype=F64)
    return X, V, W


def _fd2(phi, h=1e-4):
    """Central second difference of a scalar function of t at 0 (error O(h²) ~ 1e-8 here)."""
    t = torch.zeros((), dtype=F64)
    return (phi(t + h) - 2 * phi(t) + phi(t - h)) / h**2


def _tol(ref):
    return 1e-5 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("space,shape", SPACES, ids=IDS)
def test_second_derivative_along_a_retraction_curve_in_every_mode(space, shape):
    """``d²/dt² f(retract(X, tV))`` at 0 (the second-order information a Riemannian Newton step or a
    Hessian check reads) equals finite differences: plain autograd twice, torch.func.grad(grad),
    jacfwd(jacrev) and torch.autograd.functional.hessian."""
    X, V, W = _setup(space, shape)

    def phi(t):
        Y = space.retract(X, t * V)
        return (Y * W).sum() + (Y**3).sum()

    ref = _fd2(phi)
    t0 = torch.zeros((), dtype=F64)
    tr = t0.clone().requires_grad_()
    (d1,) = torch.autograd.grad(phi(tr), tr, create_graph=True)
    (d2_autograd,) = torch.autograd.grad(d1, tr)
    d2_func = torch.func.grad(torch.func.grad(phi))(t0)
    d2_fwdrev = torch.func.jacfwd(torch.func.jacrev(phi))(t0)
    d2_hess = torch.autograd.functional.hessian(phi, t0)
    for name, d2 in (("autograd", d2_autograd), ("grad(grad)", d2_func), ("jacfwd(jacrev)", d2_fwdrev), ("hessian", d2_hess)):
        assert abs(float(d2) - float(ref)) <= _tol(ref), (name, float(d2), float(ref))


@pytest.mark.parametrize("space,shape", SPACES, ids=IDS)
def test_hessian_of_project_and_tangent_matches_finite_differences_of_the_gradient(space, shape):
    """The full Hessian (in the ambient input) of ``⟨W, project(Y)⟩ + ‖project(Y)‖³`` and of
    ``⟨W, tangent(X, G)⟩``-type losses in ``X``: torch.func.hessian and plain autograd's double backward
    against central differences of the (exact, first-order) gradient."""
    X, V, W = _setup(space, shape)
    g = torch.Generator().manual_seed(1)
    Y = X + 0.05 * torch.randn(shape, generator=g, dtype=F64)
    G = torch.randn(shape, generator=g, dtype=F64)
    losses = {
        "project": (lambda y: (space.project(y) * W).sum() + (space.project(y) ** 3).sum(), Y),
        "tangent": (lambda x: (space.tangent(x, G) * W).sum() + (space.tangent(x, G) ** 2).sum(), X),
    }
    h = 1e-6
    for name, (loss, at) in losses.items():
        grad = torch.func.grad(loss)
        E = torch.eye(at.numel(), dtype=F64).reshape(-1, *shape)
        fd = torch.stack([(grad(at + h * e) - grad(at - h * e)) / (2 * h) for e in E]).reshape(*shape, *shape)
        scale = max(1.0, float(fd.abs().max()))
        H_func = torch.func.hessian(loss)(at)
        H_plain = torch.autograd.functional.hessian(loss, at)
        for how, H in (("torch.func.hessian", H_func), ("autograd double backward", H_plain)):
            err = float((H.reshape(fd.shape) - fd).abs().max())
            assert err <= 1e-5 * scale, (name, how, err, scale)


def test_ties_at_a_rank_deficient_point():
    """At a rank-1 point of ``LowRank(1)`` on 5×4 the three zero singular values tie, and so do the
    two zero eigenvalues of a rank-1 ``PSSDLowRank(1)`` 3×3 point: second derivatives of ``retract`` and
    ``tangent`` there are finite and equal finite differences (torch.linalg.svd's backward is NaN
    at such ties)."""
    for space, shape in ((gf.LowRank(1), (5, 4)), (gf.PSSDLowRank(1), (3, 3))):
        X, V, W = _setup(space, shape, seed=3)
        s = torch.linalg.svdvals(X)
        assert float(s[1:].max()) < 1e-12 * float(s[0])  # the ties

        def phi(t):
            return (space.retract(X, t * V) * W).sum() + (space.tangent(X + t * V, W) ** 2).sum()

        ref = _fd2(phi)
        d2 = torch.func.grad(torch.func.grad(phi))(torch.zeros((), dtype=F64))
        tr = torch.zeros((), dtype=F64, requires_grad=True)
        (d1,) = torch.autograd.grad(phi(tr), tr, create_graph=True)
        (d2_plain,) = torch.autograd.grad(d1, tr)
        for d in (d2, d2_plain):
            assert torch.isfinite(d) and abs(float(d) - float(ref)) <= _tol(ref), (type(space).__name__, float(d), float(ref))


@pytest.mark.parametrize("smin", [0.0, 1e-12], ids=["zero", "1e-12"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=["tall", "wide"])
def test_full_rank_low_rank_at_a_zero_singular_value(shape, smin):
    """``LowRank(min(n, k))`` on a non-square matrix keeps every singular value: ``project`` is the
    identity and ``retract(X, V) = X + V``, so their second derivatives are 0 and the Hessian of a loss of
    ``project(Y)`` is the loss's own. At a point whose smallest singular value is 0 (or below the tie
    tolerance) the complement's second-order term read ``h′ = 0`` there (right only for a truncated
    value): double backward and torch.func.hessian gave 2.6 for ``d²/dt² project(X + tD)``, where
    finite differences give ~1e-7 (Note [Zero singular values of a tall SVD map] in geofunc/_linalg.py)."""
    n, k = shape
    m = min(n, k)
    space = gf.LowRank(m)
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=F64))[0]
    Vf = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=F64))[0]
    X = U @ torch.diag(torch.tensor([2.0, 1.0, 0.5, smin], dtype=F64)) @ Vf.T
    D, W = (torch.randn(shape, generator=g, dtype=F64) for _ in range(2))
    assert bool(space.contains(X))

    def loss(y):
        P = space.project(y)
        return (P * W).sum() + (P**3).sum()

    def phi(t):
        Y = space.retract(X, t * D)
        return (Y * W).sum() + (Y**3).sum()

    # d²/dt² of the map itself: 0 exactly (finite differences ~1e-7)
    t0 = torch.zeros((), dtype=F64)
    for f in (lambda t: space.project(X + t * D), lambda t: space.retract(X, t * D)):
        d2 = torch.func.jacfwd(torch.func.jacfwd(f))(t0)
        assert float(d2.abs().max()) <= 1e-8, float(d2.abs().max())
    # along a curve, every mode, against finite differences
    ref = _fd2(phi)
    tr = t0.clone().requires_grad_()
    (d1,) = torch.autograd.grad(phi(tr), tr, create_graph=True)
    (d2_plain,) = torch.autograd.grad(d1, tr)
    for name, d2 in (("autograd", d2_plain), ("grad(grad)", torch.func.grad(torch.func.grad(phi))(t0))):
        assert abs(float(d2) - float(ref)) <= _tol(ref), (name, float(d2), float(ref))
    # the full Hessian of a loss of project: torch.func.hessian and double backward against central
    # differences of the gradient (here also the loss's own Hessian, 6 diag(P))
    grad = torch.func.grad(loss)
    h = 1e-6
    E = torch.eye(X.numel(), dtype=F64).reshape(-1, *shape)
    fd = torch.stack([(grad(X + h * e) - grad(X - h * e)) / (2 * h) for e in E]).reshape(*shape, *shape)
    exact = torch.diag((6 * X).reshape(-1)).reshape(*shape, *shape)
    assert float((fd - exact).abs().max()) <= 1e-6
    Xr = X.clone().requires_grad_()
    (gX,) = torch.autograd.grad(loss(Xr), Xr, create_graph=True)
    hvp = torch.autograd.grad((gX * D).sum(), Xr)[0]
    for how, H in (("torch.func.hessian", torch.func.hessian(loss)(X)),
                   ("autograd double backward", torch.autograd.functional.hessian(loss, X))):
        err = float((H - fd).abs().max())
        assert err <= 1e-5 * max(1.0, float(fd.abs().max())), (how, err)
    torch.testing.assert_close(hvp, (fd * D).sum((-2, -1)), atol=1e-5, rtol=0)
    assert torch.autograd.gradgradcheck(space.project, (Xr,))


def test_inner_create_graph_under_a_single_torch_func_grad_level():
    """Under one ``torch.func.grad`` level the spectral maps are one node whose own backward skips the
    second-order term; a backward the user asks for inside the transformed function
    (``torch.autograd.grad(..., create_graph=True)``) differentiates the exact chain instead."""
    space, shape = gf.LowRank(2), (6, 4)
    X, V, W = _setup(space, shape)

    def outer(t):
        v = t * V

        def inner(vv):
            return (space.retract(X, vv) * W).sum() + (space.retract(X, vv) ** 3).sum()

        (gv,) = torch.autograd.grad(inner(v), v, create_graph=True)
        return (gv * V).sum()  # d/dt of this is d²/dt² inner(tV)

    ref = _fd2(lambda t: (space.retract(X, t * V) * W).sum() + (space.retract(X, t * V) ** 3).sum())
    got = torch.func.grad(outer)(torch.zeros((), dtype=F64))
    assert abs(float(got) - float(ref)) <= _tol(ref), (float(got), float(ref))


@pytest.mark.parametrize("space,shape", [(gf.LowRank(2), (6, 4)), (gf.PSSDLowRank(2), (5, 5)), (gf.Hurwitz(), (4, 4))],
                         ids=["LowRank", "PSSDLowRank", "Hurwitz"])
def test_first_derivatives_agree_across_modes_and_vmap_without_grad(space, shape):
    """The lazy node (plain autograd), the one node under grad and the torch ops under vmap(grad)
    give the same first derivatives; vmap alone (nothing differentiated) gives the same values."""
    X, V, W = _setup(space, shape)
    Vr = V.clone().requires_grad_()
    (plain,) = torch.autograd.grad((space.retract(X, Vr) * W).sum(), Vr)
    f = torch.func.grad(lambda v: (space.retract(X, v) * W).sum())
    torch.testing.assert_close(f(V), plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.func.vmap(f)(V.expand(3, *shape))[1], plain, atol=1e-10, rtol=0)
    Gs = torch.randn(3, *shape, dtype=F64)
    batched = torch.func.vmap(space.tangent, in_dims=(None, 0))(X, Gs)
    torch.testing.assert_close(batched, torch.stack([space.tangent(X, G) for G in Gs]), atol=1e-12, rtol=0)


def _names(T):
    seen, todo = set(), [T.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f.name() not in seen:
            seen.add(f.name())
            todo.extend(g for g, _ in f.next_functions)
    return seen


@pytest.mark.parametrize("wrt", ["X", "G", "both"])
@pytest.mark.parametrize("space,shape,off,gshape", [
    (gf.LowRank(2), (7, 5), 0.3, None), (gf.LowRank(3), (4, 9), 0.3, None), (gf.FixedRank(2), (3, 6, 4), 0.3, None),
    (gf.LowRank(2), (6, 4), 0.0, None), (gf.LowRank(2), (6, 4), 0.3, (3, 6, 4)),
    (gf.LowRank(2), (1, 4, 7), 0.3, (2, 4, 7)), (gf.LowRank(2), (2, 6, 4), 0.3, (6, 4))],
                         ids=["LowRank-tall", "LowRank-wide", "FixedRank-batched", "LowRank-on-the-set",
                              "G-batched", "X-batch-broadcast", "X-batched"])
def test_rank_tangent_node_first_derivatives_are_the_chains(space, shape, off, gshape, wrt):
    """``tangent`` in plain autograd is one node whose backward is the thin frames' adjoint written
    out (``_thin_tangent``): its gradients in X and G, off the rank-r set (a full-rank X) and on
    it, and with batches that broadcast, equal the exact map's torch ops (``torch.func.vjp``)."""
    X, _, _ = _setup(space, shape)
    g = torch.Generator().manual_seed(1)
    X = X + off * torch.randn(shape, generator=g, dtype=F64)
    G = torch.randn(gshape or shape, generator=g, dtype=F64)
    W = torch.randn(torch.broadcast_shapes(X.shape, G.shape), generator=g, dtype=F64)
    x, gg = X.clone().requires_grad_(wrt != "G"), G.clone().requires_grad_(wrt != "X")
    T = space.tangent(x, gg)
    assert "_ClosedFormBackward" in _names(T)
    wanted = [t for t in (x, gg) if t.requires_grad]
    got = torch.autograd.grad(T, wanted, W)
    ref = torch.func.vjp(space.tangent, X, G)[1](W)
    for a, b in zip(got, [r for r, t in zip(ref, (x, gg)) if t.requires_grad]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("space,shape", [(gf.LowRank(2), (6, 4)), (gf.FixedRank(2), (4, 6)), (gf.PSSDLowRank(2), (5, 5))],
                         ids=["LowRank", "FixedRank-wide", "PSSDLowRank"])
def test_second_derivatives_with_respect_to_the_base(space, shape):
    """The rank family completes its base frames through the polar factor of their top block
    (``_packed_direction`` in ``geofunc/_linalg.py``): ``to_manifold``'s second derivatives in the base
    (meta-learning a base) are exact (they were not before the polar factor's second-order term)."""
    g = torch.Generator().manual_seed(0)
    X = space.sample(shape, generator=g, dtype=F64)
    Z, base = space.from_manifold(X)
    Z = Z + 0.1 * torch.randn(shape, generator=g, dtype=F64)
    bases = base if isinstance(base, tuple) else (base,)
    args = tuple(b.detach().clone().requires_grad_() for b in bases)

    def f(*b):
        return space.to_manifold(Z, b if isinstance(base, tuple) else b[0])

    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("space,shape", SPACES, ids=IDS)
def test_results_can_be_modified_in_place_under_autograd(space, shape):
    """The one-node forms of the maps return fresh tensors, not views of their inputs: an in-place
    op on a result that requires grad is allowed, and the gradient is that of the chain."""
    X, V, W = _setup(space, shape)
    for name, f in (("retract", lambda x, v: space.retract(x, v)), ("tangent", lambda x, v: space.tangent(x, v)),
                    ("project", lambda x, v: space.project(x + v))):
        x, v = X.clone().requires_grad_(), V.clone().requires_grad_()
        Y = f(x, v)
        Y.mul_(2.0)
        gx, gv = torch.autograd.grad((Y * W).sum(), (x, v), allow_unused=True)
        rx, rv = torch.func.grad(lambda a, b: (2.0 * f(a, b) * W).sum(), argnums=(0, 1))(X, V)
        for got, ref in ((gx, rx), (gv, rv)):
            if got is None:
                assert float(ref.abs().max()) == 0.0, name
            else:
                torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name}: {m}")



def _matmul_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("space,shape,name", [
    (gf.Stiefel(), (256, 8), "project"), (gf.LowRank(4), (256, 8), "retract"),
    (gf.LowRank(4), (256, 8), "tangent"), (gf.PSSDLowRank(2), (24, 24), "project")],
    ids=["Stiefel-polar", "LowRank-retract", "LowRank-tangent", "PSSDLowRank-project"])
def test_single_jvp_builds_no_second_order_term(space, shape, name, monkeypatch):
    """Under one ``torch.func.jvp`` level (and vmap: ``jacfwd``) the spectral maps leave their
    second-order term out (Note [Lazy second-order terms]: "first"): it cannot change a first-order
    tangent, and built it was 70% of the work (jvp of Stiefel 1024×16 ``project``: 131 n·k² of matmul
    FLOPs, 38 without it). The tangent is the adjoint of the exact vjp (which keeps the chain), and
    the same as with the term built; ``jvp`` of ``grad`` (a Hessian-vector product) still gets its
    second derivative (the other tests here)."""
    from geofunc import _fastpath

    X, V, W = _setup(space, shape)
    g = torch.Generator().manual_seed(2)
    T = torch.randn((2, *shape), generator=g, dtype=F64)
    fn = {"project": lambda y: space.project(y), "retract": lambda v: space.retract(X, v),
          "tangent": lambda x: space.tangent(x, W)}[name]
    at = {"project": X + 0.1 * T[1], "retract": 0.1 * V, "tangent": X}[name]
    jvp = lambda t: torch.func.jvp(fn, (at,), (t,))[1]  # noqa: E731
    tangent = jvp(T[0])
    (pullback,) = torch.func.vjp(fn, at)[1](W)
    torch.testing.assert_close((tangent * W).sum(), (T[0] * pullback).sum(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.func.vmap(jvp)(T)[0], tangent, atol=1e-12, rtol=1e-12)
    first = _matmul_flops(lambda: jvp(T[0]))
    monkeypatch.setattr(_fastpath, "_sole_jvp", lambda tensors, kinds: False, raising=False)  # the chain, as before
    chained = jvp(T[0])
    torch.testing.assert_close(chained, tangent, atol=1e-12, rtol=1e-12)
    both = _matmul_flops(lambda: jvp(T[0]))
    assert first <= 0.7 * both, (first, both)  # 0.28 (Stiefel, LowRank retract) to 0.52 (PSSDLowRank); was 1


def _compiled_flops(fn, *args):
    """The result of ``torch.compile(fn, fullgraph=True)(*args)`` and the matmul FLOPs of the graph it captured."""
    from torch.utils.flop_counter import FlopCounterMode

    counted = []

    def backend(gm, example_inputs):
        def run(*a):
            with FlopCounterMode(display=False) as counter:
                out = gm(*a)
            counted.append(counter.get_total_flops())
            return out
        return run

    torch._dynamo.reset()
    try:
        out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    finally:
        torch._dynamo.reset()
    return out, counted[-1]


@pytest.mark.parametrize("space,shape,name", [
    (gf.LowRank(4), (256, 16), "retract"), (gf.LowRank(4), (256, 16), "tangent"),
    (gf.PSSDLowRank(3), (32, 32), "project"), (gf.Stiefel(), (64, 16), "project")],
    ids=["LowRank-retract", "LowRank-tangent", "PSSDLowRank-project", "Stiefel-polar"])
def test_compiled_maps_under_no_grad_build_no_derivative_terms(space, shape, name):
    """Inside ``torch.compile`` under ``no_grad`` with no forward-mode level, nothing differentiates:
    the captured graph is the value alone, as in eager mode (Note [Compiled maps that nothing
    differentiates]); it carried every derivative term before (24–30× the eager matmul FLOPs). With
    grad mode on, and under a ``jvp`` traced inside the compiled function, the chain stays and
    derivatives are eager's."""
    X, V, W = _setup(space, shape)
    fn = {"project": lambda x, v: space.project(x + 0.1 * v), "retract": lambda x, v: space.retract(x, 0.1 * v),
          "tangent": lambda x, v: space.tangent(x, v)}[name]
    with torch.no_grad():
        eager = fn(X, V)
        eager_flops = _matmul_flops(lambda: fn(X, V))
        compiled, flops = _compiled_flops(fn, X, V)
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=1e-12)
    assert flops <= eager_flops, (flops, eager_flops)
    # grad mode on: the terms are built (the compiled graph keeps what a caller may differentiate)
    _, chain_flops = _compiled_flops(fn, X, V)
    assert chain_flops > 3 * eager_flops, (chain_flops, eager_flops)
    # a jvp traced under no_grad keeps its first-order terms: eager's tangent
    jvp = lambda x, v: torch.func.jvp(lambda y: fn(y, v), (x,), (W,))[1]  # noqa: E731
    with torch.no_grad():
        (tangent, _), ref = _compiled_flops(jvp, X, V), jvp(X, V)
    torch.testing.assert_close(tangent, ref, atol=1e-10, rtol=1e-8)


def test_compiled_map_under_no_grad_is_not_reused_where_derivatives_are_taken():
    """The value-only graph compiled under ``no_grad`` must not serve a later call that differentiates:
    grad mode is one of the compiled graph's guards, and a dual tensor of a user's forward-mode level
    is traced again (its tangent is eager's)."""
    import torch.autograd.forward_ad as fwAD

    space = gf.LowRank(2)
    X, V, W = _setup(space, (6, 4))
    fn = lambda x: space.project(x + 0.1 * V)  # noqa: E731
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            compiled(X)
            with fwAD.dual_level():
                got = fwAD.unpack_dual(compiled(fwAD.make_dual(X, W))).tangent
                ref = fwAD.unpack_dual(fn(fwAD.make_dual(X, W))).tangent
        assert got is not None
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)
        Xr = X.clone().requires_grad_()
        (got,) = torch.autograd.grad((compiled(Xr) * W).sum(), Xr)
        (ref,) = torch.autograd.grad((fn(Xr) * W).sum(), Xr)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)
    finally:
        torch._dynamo.reset()


def _rotation_planes(thetas, n):
    A = torch.zeros(n, n, dtype=F64)
    for i, t in enumerate(thetas):
        A[2 * i, 2 * i + 1], A[2 * i + 1, 2 * i] = t, -t
    return torch.linalg.matrix_exp(A)


def _near_tie_cases():
    """(name, space, X, fn of the base) with eigenvalues of a spectral map's argument 3e-8 apart: above
    the tie tolerance (√ε ≈ 1.5e-8), where a second divided difference from values was O(1) off."""
    g = torch.Generator().manual_seed(0)
    n = 4
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    Q = Q * torch.linalg.det(Q)  # det +1
    P = gf.PSD(metric="affine")
    X = Q @ torch.diag(1 + 3e-8 * torch.arange(n, dtype=F64)) @ Q.T  # X^±½ of nearly tied eigenvalues
    Y = P.retract(X, 0.3 * P.tangent(X, torch.randn(n, n, generator=g, dtype=F64)))
    U = torch.randn(n, n, generator=g, dtype=F64)
    S = gf.SO()
    Xs = S.sample((n, n), generator=g, dtype=F64)
    Ys = Xs @ Q @ _rotation_planes([1.0, 1.0 + 3e-8], n) @ Q.T  # two rotation angles 3e-8 apart
    G = gf.Grassmannian()
    Xg = G.sample((6, 2), generator=g, dtype=F64)
    Ug, _, Vh = torch.linalg.svd(G.tangent(Xg, torch.randn(6, 2, generator=g, dtype=F64)), full_matrices=False)
    Yg = G.expmap(Xg, Ug @ torch.diag(torch.tensor([1.0, 1.0 + 3e-8], dtype=F64)) @ Vh)  # principal angles 3e-8 apart
    return [("PSD-affine transport", P, X, lambda x: P.transport(x, Y, P.tangent(x, U))),
            ("PSD-affine expmap", P, X, lambda x: P.expmap(x, 0.3 * P.tangent(x, U))),
            ("SO logmap", S, Xs, lambda x: S.logmap(x, Ys)),
            ("Grassmannian logmap", G, Xg, lambda x: G.logmap(x, Yg))]


@pytest.mark.parametrize("case", range(4), ids=["PSD-affine-transport", "PSD-affine-expmap", "SO-logmap", "Grassmannian-logmap"])
def test_second_derivatives_in_the_base_at_near_ties(case):
    """Hessian-vector products in the base point (double backward and ``jvp`` of ``grad``) of maps built
    on ``spectral_eigh`` with a smooth ``h`` (X^±½, exp, the logarithms' φ), where two eigenvalues are
    3e-8 apart, against finite differences of the gradient along the manifold (Note [Near ties of smooth
    spectral maps]): they were 20% (PSD transport), 29% (PSD expmap), 1.5% (SO logmap) and 5% (Grassmannian
    logmap) off."""
    name, M, X, fn = _near_tie_cases()[case]
    g = torch.Generator().manual_seed(1)
    C = torch.randn(X.shape, generator=g, dtype=F64)
    D = M.tangent(X, torch.randn(X.shape, generator=g, dtype=F64))
    D = D / D.norm()

    def loss(x):
        return (fn(x) * C).sum()

    def gradient(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(loss(x), x)[0]

    fds = [(gradient(M.retract(X, h * D)) - gradient(M.retract(X, -h * D))) / (2 * h) for h in (2e-3, 1e-3)]
    ref = (4 * fds[1] - fds[0]) / 3  # Richardson: error ~1e-8 here
    xr = X.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(loss(xr), xr, create_graph=True)
    (twice,) = torch.autograd.grad((g1 * D).sum(), xr)
    fwd_rev = torch.func.jvp(torch.func.grad(loss), (X,), (D,))[1]
    tol = 1e-6 * float(ref.abs().max())
    for how, got in (("double backward", twice), ("jvp of grad", fwd_rev)):
        err = float((got - ref).abs().max())
        assert err <= tol, (name, how, err, tol)
