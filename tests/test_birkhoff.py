"""Birkhoff: Sinkhorn balancing to the exact limit, its implicit derivatives, the Fisher metric,
robustness at the vertices, and geoopt's BirkhoffPolytope as a reference.

Exactness of the balancing is checked by the characterisation of the limit (Sinkhorn's
theorem), written independently of the implementation: ``P = S(exp Z)`` iff ``P`` has unit
marginals and ``log P − Z = u 1ᵀ + 1 vᵀ``, i.e. every double difference
``E_ij − E_i0 − E_0j + E_00`` of ``E = log P − Z`` vanishes.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import needs_torch
from torch.func import grad, hessian

import geofunc as gf

F64, F32 = torch.float64, torch.float32
B = gf.Birkhoff()
#: marginal tolerance of the output, per dtype (n·ε: the rounding step's guarantee)
MARGINAL = {F32: 1e-6, F64: 1e-13}


def _marginal_error(P):
    return torch.maximum((P.sum(-1) - 1).abs().amax(-1), (P.sum(-2) - 1).abs().amax(-1))


def _structure_error(P, Z):
    """max |E_ij − E_i0 − E_0j + E_00| over entries P_ij ≥ 1e-4 (log P is exact there)."""
    E = torch.log(P.double()) - Z.double()
    D = E - E[..., :, :1] - E[..., :1, :] + E[..., :1, :1]
    ok = (P >= 1e-4) & (P[..., :, :1] >= 1e-4) & (P[..., :1, :] >= 1e-4) & (P[..., :1, :1] >= 1e-4)
    return torch.where(ok, D.abs(), torch.zeros_like(D)).amax((-2, -1))


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_balancing_reaches_the_exact_limit(scale, generator):
    """Raw scales up to 10 (where plain Sinkhorn needs > 3000 sweeps for some inputs), n ≤ 16:
    in float64 the output has the additive log structure of the limit to 1e-10 and unit
    marginals to 1e-13; in float32 it is within 1e-6·(1 + max|Z|) of the float64 limit (the
    rounding of Z itself moves the limit by ~1e-7·max|Z|)."""
    for n in (2, 3, 5, 8, 16):
        Z = scale * torch.randn(40, n, n, generator=generator, dtype=F64)
        P = B.to_manifold(Z)
        size = 1 + Z.abs().amax((-2, -1))
        assert float(_marginal_error(P).max()) <= MARGINAL[F64], (n, scale)
        assert float(P.min()) >= 0
        assert float((_structure_error(P, Z) / size).max()) <= 1e-10, (n, scale)
        P32 = B.to_manifold(Z.float())
        assert float(_marginal_error(P32).max()) <= MARGINAL[F32], (n, scale)
        assert float(((P32.double() - P).abs().amax((-2, -1)) / size).max()) <= 1e-6, (n, scale)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_any_raw_scale_gives_exact_marginals(dtype, generator):
    """Beyond the convergence range (scale 30, 100, 1000) the rounding step still makes the
    output doubly stochastic: finite, non-negative, unit marginals."""
    for scale in (30.0, 100.0, 1000.0):
        Z = (scale * torch.randn(20, 6, 6, generator=generator, dtype=F64)).to(dtype)
        P = B.to_manifold(Z)
        assert bool(torch.isfinite(P).all()) and float(P.min()) >= 0
        assert float(_marginal_error(P).max()) <= MARGINAL[dtype], scale


def test_balancing_at_raw_scale_100_reaches_the_limit():
    """Regression (Note [Sinkhorn with a fixed step count], the Levenberg–Marquardt shift): at raw scale
    ~50 and up the Newton solve was singular in every round, only sweeps ran, and the rounding step made
    another doubly stochastic matrix of the unbalanced one: to_manifold of the 3×3 Z below was
    [[.25, .5, .25], [.25, .5, .25], [.5, 0, .5]], 0.75 off its Sinkhorn limit (~ the anti-diagonal
    permutation), with exact marginals and no error. Checked by Sinkhorn's theorem: log P − Z has the
    additive structure u1ᵀ + 1vᵀ on the entries that hold the mass."""
    Z = torch.tensor([[-61.937, 126.600, 36.301], [-86.160, 83.040, -152.717], [-4.143, -60.187, 11.917]], dtype=F64)
    P = B.to_manifold(Z)
    torch.testing.assert_close(P, torch.eye(3, dtype=F64).flip(-1), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    for n in (3, 8):
        Z = 100.0 * torch.randn(64, n, n, generator=g, dtype=F64)
        P = B.to_manifold(Z)
        assert float(_marginal_error(P).max()) <= MARGINAL[F64]
        # the limit's mass sits on entries ≥ 1e-4; the structure error there is ~0 at the limit
        assert float((_structure_error(P, Z) / (1 + Z.abs().amax((-2, -1)))).max()) <= 1e-6, n


def test_two_by_two_closed_form():
    # S([[p, q], [r, s]]) = [[a, 1 − a], [1 − a, a]] with a/(1 − a) = √(ps/(qr)).
    for eps in (1e-2, 1e-6, 1e-12):
        A = torch.tensor([[1.0, 1.0], [eps, 1.0]], dtype=F64)
        a = 1.0 / (1.0 + math.sqrt(eps))
        expected = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=F64)
        torch.testing.assert_close(B.project(A), expected, atol=1e-14, rtol=0)
        torch.testing.assert_close(B.to_manifold(torch.log(A)), expected, atol=1e-14, rtol=0)


def _unrolled(Z, sweeps=300):
    """Plain Sinkhorn in the log domain, differentiated by unrolling (an independent reference)."""
    L = Z
    for _ in range(sweeps):
        L = L - torch.logsumexp(L, -1, keepdim=True)
        L = L - torch.logsumexp(L, -2, keepdim=True)
    return L.exp()


def test_implicit_derivatives_equal_unrolled_sinkhorn(generator):
    """First and second derivatives of the chart equal those of 300 unrolled sweeps (converged
    to rounding at raw scale 1): the implicit formula Π_P(P ⊙ dZ) is exact to every order."""
    Z = torch.randn(4, 4, generator=generator, dtype=F64)
    C = torch.randn(4, 4, generator=generator, dtype=F64)
    D = torch.randn(4, 4, generator=generator, dtype=F64)

    def loss(f):
        return lambda z: (f(z) * C).sum() + (f(z) * D).sum() ** 2

    ours, ref = loss(B.to_manifold), loss(_unrolled)
    torch.testing.assert_close(B.to_manifold(Z), _unrolled(Z), atol=1e-13, rtol=0)
    torch.testing.assert_close(grad(ours)(Z), grad(ref)(Z), atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(hessian(ours)(Z), hessian(ref)(Z), atol=1e-9, rtol=1e-7)
    # the VJP is self-adjoint: it is also the JVP, and it maps into the tangent space
    J = torch.func.jacrev(B.to_manifold)(Z).reshape(16, 16)
    torch.testing.assert_close(J, J.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(J.reshape(4, 4, 4, 4).sum(0), torch.zeros(4, 4, 4, dtype=F64), atol=1e-12, rtol=0)


def test_every_transform_order_gives_the_same_derivatives(generator):
    """Third derivatives by every composition of forward and reverse mode equal those of unrolled
    Sinkhorn (float64, raw scale 1). Nested forward mode (``jacfwd(jacfwd(...))``), where PyTorch drops
    a custom Function's second-order ``jvp`` term, goes through three Newton steps from the detached
    limit instead (exact to third order)."""
    Z = torch.randn(3, 3, generator=generator, dtype=F64)

    def loss(f):
        return lambda z: (f(z) ** 2).sum() + f(z)[0, 1] ** 3

    jf, jr = torch.func.jacfwd, torch.func.jacrev
    ref = jf(jr(jr(loss(_unrolled))))(Z)
    for outer, middle, inner in ((jr, jr, jr), (jf, jr, jr), (jf, jf, jr), (jf, jf, jf), (jr, jf, jf)):
        torch.testing.assert_close(outer(middle(inner(loss(B.to_manifold))))(Z), ref, atol=1e-9, rtol=1e-7)


def test_compiled_transforms_give_the_eager_derivatives():
    """``torch.compile(grad(f), fullgraph=True)`` and a compiled Hessian-vector product equal eager mode.
    Dynamo (torch 2.13) inlines an autograd.Function's forward under torch.func transforms and drops
    its backward (pytorch#193279): the compiled gradient of 3×3 points was NaN (the Sinkhorn sweeps'
    selects, differentiated), so inside torch.compile the Function's forward is torch ops with exact
    derivatives, and its backward is kept where Dynamo keeps it (plain autograd)."""
    g = torch.Generator().manual_seed(3)
    Z = 0.5 * torch.randn(4, 3, 3, generator=g, dtype=F64)
    W = torch.randn(4, 3, 3, generator=g, dtype=F64)
    V = torch.randn(4, 3, 3, generator=g, dtype=F64)

    def f(z):
        return (torch.sin(B.to_manifold(z)) * W).sum()

    def hvp(z, v):
        return torch.func.jvp(grad(f), (z,), (v,))[1]

    torch._dynamo.reset()
    compiled = torch.compile(grad(f), fullgraph=True, backend="aot_eager")(Z)
    torch.testing.assert_close(compiled, grad(f)(Z), atol=1e-12, rtol=1e-10)
    compiled_hvp = torch.compile(hvp, fullgraph=True, backend="aot_eager")(Z, V)
    torch.testing.assert_close(compiled_hvp, hvp(Z, V), atol=1e-12, rtol=1e-10)
    z = Z.clone().requires_grad_()
    plain = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(z), z)[0]
    torch.testing.assert_close(plain, grad(f)(Z), atol=1e-12, rtol=1e-10)

    # Plain autograd keeps the Function's backward, the Fisher projection with eager mode's LU solve:
    # next to a vertex (raw scale 20, float32) the compiled gradient is eager's. Through the inverse
    # that solve_vec takes inside compile it was 8e-2 off eager's (relative); through the Newton steps'
    # derivative, which compiled grad(f) must use, 1e7.
    gv = torch.Generator().manual_seed(1)
    Zv = 20.0 * torch.randn(16, 3, 3, generator=gv, dtype=F64)
    Wv = torch.randn(16, 3, 3, generator=gv, dtype=F64)

    def h(z):
        return (torch.sin(B.to_manifold(z)) * Wv.to(z.dtype)).sum()

    z32 = Zv.float().requires_grad_()
    eager = torch.autograd.grad(h(z32), z32)[0]
    torch._dynamo.reset()
    z32 = Zv.float().requires_grad_()
    compiled32 = torch.autograd.grad(torch.compile(h, fullgraph=True, backend="aot_eager")(z32), z32)[0]
    assert (compiled32 - eager).abs().max() <= 1e-4 * eager.abs().max()


@needs_torch((2, 13), "Dynamo tracing functorch's interpreter stack (2.6 cannot; tested on 2.13)")
def test_compiled_per_sample_gradient_through_retract_and_project():
    """``torch.compile(vmap(grad(f)), fullgraph=True)`` with ``f`` through ``retract`` and ``project``
    (a per-sample gradient, the Sinkhorn input computed inside the transforms) equals eager mode. Dynamo
    (torch 2.13) refused the custom Function there ("You tried to vmap over ApplyTemplate"), where it
    inlines the forward anyway (Note [Sinkhorn under torch.func inside torch.compile])."""
    from torch.func import vmap

    g = torch.Generator().manual_seed(4)
    X = B.sample((4, 3, 3), generator=g, dtype=F64)
    C = torch.randn(4, 3, 3, generator=g, dtype=F64)

    def f(x, c):
        return (torch.sin(B.retract(x, 0.1 * B.tangent(x, c))) * c).sum() + (B.project(x + 0.1 * c.abs()) * c).sum()

    def per_sample(x, c):
        return vmap(grad(f))(x, c)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(per_sample, fullgraph=True, backend="aot_eager")(X, C)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, per_sample(X, C), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------- the Fisher metric
def test_func_grad_in_float32_next_to_a_vertex_is_as_accurate_as_autograd():
    """Under ``torch.func.grad`` (no vmap level) the Fisher projection of the backward solves by LU, as
    plain autograd does (Note [Solves under torch.func]). Through the explicit inverse it took there
    before, float32 gradients next to a vertex were 1e-3 to 2e-2 off float64, relative to their largest
    entry (``retract`` with steps V/X ~ 80), against ~1e-5 under autograd (``to_manifold`` is one node there)."""
    g = torch.Generator().manual_seed(1)
    Z = 20.0 * torch.randn(16, 4, 4, generator=g, dtype=F64)
    X = B.sample((16, 4, 4), generator=g, dtype=F64)
    V = 2.0 * B.tangent(X, torch.randn(16, 4, 4, generator=g, dtype=F64))
    W = torch.randn(16, 4, 4, generator=g, dtype=F64)
    for name, fn, x in (("to_manifold", B.to_manifold, Z), ("retract", lambda x: B.retract(x, V.to(x.dtype)), X.float().double())):
        def f(x):
            return (torch.sin(fn(x)) * W.to(x.dtype)).sum()

        truth = grad(f)(x)
        x32 = x.float().requires_grad_()
        autograd = torch.autograd.grad(f(x32), x32)[0].double()
        functional = grad(f)(x.float()).double()
        scale = truth.abs().max()
        err, ref = (functional - truth).abs().max() / scale, (autograd - truth).abs().max() / scale
        assert ref <= 1e-4 and err <= 2 * ref + 1e-6, (name, err.item(), ref.item())


def test_fisher_gradient_and_projection(generator):
    X = B.sample((3, 5, 5), generator=generator, dtype=F64)
    G = torch.randn(3, 5, 5, generator=generator, dtype=F64)
    V = B.tangent(X, torch.randn(3, 5, 5, generator=generator, dtype=F64))
    R = B.egrad_to_rgrad(X, G)
    zero = torch.zeros(3, 5, dtype=F64)
    torch.testing.assert_close(R.sum(-1), zero, atol=1e-12, rtol=0)
    torch.testing.assert_close(R.sum(-2), zero, atol=1e-12, rtol=0)
    # the defining property ⟨rgrad, V⟩_X = ⟨G, V⟩ for tangent V, and X ⊙ G − rgrad ⊥_Fisher T_X
    torch.testing.assert_close(B.inner(X, R, V), (G * V).sum((-2, -1)), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(((X * G - R) * V / X).sum((-2, -1)), torch.zeros(3, dtype=F64), atol=1e-11, rtol=0)
    # the chart's derivative at its centre is the same Fisher map: d/dt to_manifold(tG, X) = Π_X(X ⊙ G)
    _, dX = torch.func.jvp(lambda t: B.to_manifold(t * G, X), (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    torch.testing.assert_close(dX, R, atol=1e-11, rtol=0)


def test_riemannian_step_is_exponentiated_gradient(generator):
    """retract(X, −η egrad_to_rgrad(X, G)) = S(X ⊙ exp(−ηG)): the row and column terms of the
    Fisher gradient are absorbed by the balancing (entropic mirror descent)."""
    X = B.sample((2, 4, 4), generator=generator, dtype=F64)
    G = torch.randn(2, 4, 4, generator=generator, dtype=F64)
    for eta in (0.1, 1.0):
        step = B.retract(X, -eta * B.egrad_to_rgrad(X, G))
        torch.testing.assert_close(step, _unrolled(torch.log(X) - eta * G), atol=1e-12, rtol=0)


def test_vertices_are_finite_where_geoopt_fails(generator):
    """At a permutation matrix (a vertex of the closed polytope) every map is finite and the
    results are right; geoopt raises (singular solve) in egrad2rgrad and gives NaN in retr."""
    P = torch.eye(5, dtype=F64)[[3, 0, 4, 1, 2]]
    G = torch.randn(5, 5, generator=generator, dtype=F64)
    assert bool(B.contains(P))
    torch.testing.assert_close(B.egrad_to_rgrad(P, G), torch.zeros_like(P), atol=1e-12, rtol=0)  # no tangent direction inside
    V = B.tangent(P, G)
    for out in (B.retract(P, 0.1 * V), B.retract(P, -0.1 * B.egrad_to_rgrad(P, G)), B.to_manifold(torch.zeros_like(P), P), B.project(P)):
        assert bool(torch.isfinite(out).all()) and bool(B.contains(out))
    torch.testing.assert_close(B.project(P), P, atol=1e-12, rtol=0)
    torch.testing.assert_close(B.to_manifold(torch.zeros_like(P), P), P, atol=1e-12, rtol=0)
    # the chart at a vertex base: finite gradients
    Z = torch.randn(5, 5, generator=generator, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad((B.to_manifold(Z, P) * G).sum(), Z)
    assert bool(torch.isfinite(g).all())
    assert float(B.inner(P, B.egrad_to_rgrad(P, G), B.egrad_to_rgrad(P, G))) == 0.0
    geoopt = pytest.importorskip("geoopt")
    R = geoopt.BirkhoffPolytope()
    with pytest.raises(RuntimeError, match="singular"):
        R.egrad2rgrad(P, G)
    assert bool(torch.isnan(R.retr(P, 0.1 * V)).all())


def test_marginals_beat_geoopt(generator):
    """geoopt's projx (100 iterations, tol 1e-5) leaves marginal residuals of 4.8e-3 on
    [[1, 1], [1e-6, 1]] and 3.9e-4 on tril(ones(4)) + 1e-6 (nearly decomposable: Sinkhorn's slow
    case) in float32; ours is within 1e-6 there and on exp(3·N(0,1)) 5×5 matrices, at the exact
    limit (its float64 counterpart has the additive log structure to 1e-10)."""
    geoopt = pytest.importorskip("geoopt")
    R = geoopt.BirkhoffPolytope()
    for A in (torch.tensor([[1.0, 1.0], [1e-6, 1.0]]), torch.tril(torch.ones(4, 4)) + 1e-6):
        assert float(_marginal_error(B.project(A))) <= MARGINAL[F32]
        assert float(_marginal_error(R.projx(A))) > 100 * MARGINAL[F32]
        torch.testing.assert_close(B.project(A).double(), B.project(A.double()), atol=1e-6, rtol=0)
    Z = 3.0 * torch.randn(50, 5, 5, generator=generator)
    ours = B.to_manifold(Z)  # = S(exp Z); project(exp Z) would first floor entries below ε·max
    assert float(_marginal_error(ours).max()) <= MARGINAL[F32]
    exact = B.to_manifold(Z.double())
    assert float((_structure_error(exact, Z.double()) / (1 + Z.abs().amax((-2, -1)).double())).max()) <= 1e-10
    torch.testing.assert_close(ours.double(), exact, atol=1e-5, rtol=0)


def test_fisher_metric_equals_geoopt(generator):
    geoopt = pytest.importorskip("geoopt")
    R = geoopt.BirkhoffPolytope()
    X = B.sample((3, 4, 4), generator=generator, dtype=F64)
    G = torch.randn(3, 4, 4, generator=generator, dtype=F64)
    U, V = (B.tangent(X, torch.randn(3, 4, 4, generator=generator, dtype=F64)) for _ in range(2))
    torch.testing.assert_close(B.egrad_to_rgrad(X, G), R.egrad2rgrad(X, G), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(B.inner(X, U, V), 4 * R.inner(X, U, V), atol=1e-12, rtol=1e-10)  # geoopt divides by n


def test_low_precision_keeps_marginals(generator):
    Z = torch.randn(3, 6, 6, generator=generator)
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        P = B.to_manifold(Z.to(dtype))
        assert P.dtype == dtype and float(_marginal_error(P.float()).max()) <= tol


def test_second_derivatives_under_vmap_equal_the_loop():
    """``vmap`` of every second-derivative transform equals the loop over the batch, which equals
    finite differences of the gradient. Regression: ``fisher_project`` solved with
    ``torch.linalg.solve_ex``, whose second derivatives torch 2.13/2.14 get wrong under
    ``vmap(hessian)`` (2.6e3 relative error here); it now goes through the inverse."""
    from torch.func import grad, hessian, jacfwd, jacrev, vmap

    d = torch.float64
    g = torch.Generator().manual_seed(4)
    M = gf.Birkhoff()
    B, n = 3, 3
    _, bases = M.from_manifold(M.sample((B, n, n), generator=g, dtype=d))
    Zs = 0.7 * torch.randn(B, n, n, generator=g, dtype=d)
    G = torch.randn(n, n, generator=g, dtype=d)

    def f(z, b):
        X = M.to_manifold(z, b)
        return (G * X).sum() + 0.3 * (G * X**2).sum()

    ref = torch.stack([hessian(f)(Zs[i], bases[i]) for i in range(B)])
    h, V = 1e-4, torch.randn(n, n, generator=g, dtype=d)
    gz = lambda z: grad(f)(z, bases[0])  # noqa: E731
    fd = (-gz(Zs[0] + 2 * h * V) + 8 * gz(Zs[0] + h * V) - 8 * gz(Zs[0] - h * V) + gz(Zs[0] - 2 * h * V)) / (12 * h)
    torch.testing.assert_close((ref[0].reshape(n * n, n * n) @ V.flatten()).reshape(n, n), fd, atol=1e-8, rtol=1e-7)
    for name, T in (("hessian", hessian), ("jacfwd(jacrev)", lambda f: jacfwd(jacrev(f))),
                    ("jacrev(jacrev)", lambda f: jacrev(jacrev(f))), ("jacfwd(grad)", lambda f: jacfwd(grad(f)))):
        torch.testing.assert_close(vmap(T(f))(Zs, bases), ref, atol=1e-10, rtol=1e-10, msg=name)
    shared = torch.stack([hessian(f)(Zs[i], bases[0]) for i in range(B)])
    torch.testing.assert_close(vmap(hessian(f), in_dims=(0, None))(Zs, bases[0]), shared, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------- half precision
# Note [the Fisher projection of a rounded point] in geofunc/spaces/_birkhoff.py. A bfloat16 point
# near a vertex, read in float32, is doubly stochastic only to its rounding: I − PᵀP had an
# eigenvalue −ε that the shift εI cancelled exactly, and egrad_to_rgrad was NaN for the whole matrix.
#: this point (reached by rsgd, momentum 0.9, lr 4, in bfloat16 at n = 4: NaN from step 76 on) and
#: the gradient there
_NEAR_VERTEX = [[0.0, 1.1595e-07, 1.5520e-38, 1.0], [1.0, 2.7001e-12, 5.9605e-08, 5.9605e-08],
                [1.1595e-07, 0.0, 1.0, 0.0], [5.5252e-11, 1.0, 5.9605e-08, 5.9605e-08]]
_NEAR_VERTEX_G = [[-0.2793, -0.1260, -0.1650, 0.5703], [0.8555, -0.1816, -0.4316, -0.2402],
                  [-0.5117, -0.1436, 0.7930, -0.1387], [-0.0635, 0.4492, -0.1953, -0.1914]]
#: marginals of the Riemannian gradient at such points: the float32 solve's rounding (measured
#: 6.9e-6; before: NaN, and up to 12.6 in float16)
HALF_TANGENT_TOL = 5e-5


def _fisher_sq_norm(X, R):
    """``Σ R²/X`` over the entries with ``X > 0``, in float64 (0/0 read as 0)."""
    X, R = X.double(), R.double()
    return torch.where(X > 0, R * R / X.clamp(min=1e-300), torch.zeros_like(X)).sum((-2, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fisher_gradient_of_rounded_points_near_vertices(dtype, generator):
    """egrad_to_rgrad at half-precision points near vertices (a permutation plus off-entries of
    2⁻²⁶ to 2⁻²¹, each representable in bfloat16: 2000 of them, and the point above) is finite,
    tangent (zero marginals) and the Fisher projection is non-expansive, ‖Π(X ⊙ G)‖_X ≤ ‖X ⊙ G‖_X
    (before: NaN for 5 of them in bfloat16 and 10 in float16, and ‖Π‖ up to 6.8 and 4e7 times ‖X ⊙ G‖)."""
    Xs = [torch.tensor(_NEAR_VERTEX)]
    Gs = [torch.tensor(_NEAR_VERTEX_G)]
    for _ in range(2000):
        n = int(torch.randint(2, 9, (1,), generator=generator))
        P = torch.eye(n)[torch.randperm(n, generator=generator)]
        E = torch.where(torch.rand(n, n, generator=generator) < 0.5, torch.tensor(0.0),
                        2.0 ** torch.randint(-26, -20, (n, n), generator=generator).float())
        Xs.append(P + E * (1 - P))
        Gs.append(torch.randn(n, n, generator=generator))
    for X, G in zip(Xs, Gs):
        X, G = X.bfloat16().to(dtype), G.to(dtype)
        R = B.egrad_to_rgrad(X, G)
        assert R.dtype == dtype and bool(torch.isfinite(R).all())
        Rd = R.double()
        assert max(float(Rd.sum(-1).abs().max()), float(Rd.sum(-2).abs().max())) <= HALF_TANGENT_TOL
        assert float(_fisher_sq_norm(X, R)) <= 1.001 * float(_fisher_sq_norm(X, X.double() * G.double())) + 1e-30


def test_rsgd_momentum_in_bfloat16_near_a_vertex_stays_finite():
    """The run that met the point above: finite to the end, on the space."""
    g = torch.Generator().manual_seed(0)
    X0 = B.sample((4, 4), generator=g, dtype=F64)
    T = B.sample((4, 4), generator=g, dtype=F64)
    opt = gf.optim.rsgd({"x": B}, lr=4.0, momentum=0.9)
    p = {"x": X0.bfloat16()}
    state = opt.init(p)
    for _ in range(100):
        p, state = opt.update({"x": (p["x"].double() - T).bfloat16()}, state, p)
    assert bool(torch.isfinite(p["x"]).all()) and bool(B.contains(p["x"]))


# ------------------------------------------------------------- float32 near the vertices
# Note [the Fisher gradient near a vertex] in geofunc/spaces/_birkhoff.py.
#: ‖R₃₂ − R₆₄‖_X ≤ F32_RGRAD_REL·‖R₆₄‖_X + F32_RGRAD_ABS·‖X ⊙ G‖_X (measured on 6000 such points:
#: 5.6e-4 relative and 9e-9 absolute; before: float32 vs float64 off by 1.2e-3·‖X ⊙ G‖_X, i.e.
#: 0.1–22 × ‖R‖, and float64 on a rounded point up to 3e4 × ‖X ⊙ G‖_X)
F32_RGRAD_REL, F32_RGRAD_ABS = 2e-3, 1.2e-7


def _near_vertex_points(count, generator, nmax=16):
    """float32 points near vertices: to_manifold of raw scale 3–300 (computed in float64 or float32)
    and mixtures (1 − t)P + tQ of a permutation P and a sample Q, t from 1 down to 1e-30."""
    for k in range(count):
        n = int(torch.randint(2, nmax + 1, (1,), generator=generator))
        scale = float(10 ** (0.5 + 2 * torch.rand(1, generator=generator)))
        if k % 3 == 0:
            X = B.to_manifold(scale * torch.randn(n, n, generator=generator, dtype=F64)).float()
        elif k % 3 == 1:
            X = B.to_manifold(scale * torch.randn(n, n, generator=generator))
        else:
            P = torch.eye(n, dtype=F64)[torch.randperm(n, generator=generator)]
            t = float(10 ** (-30 * torch.rand(1, generator=generator)))
            X = ((1 - t) * P + t * B.sample((n, n), generator=generator, dtype=F64)).float()
        yield X, torch.randn(n, n, generator=generator)


def test_float32_fisher_gradient_near_vertices_equals_float64(generator):
    """egrad_to_rgrad in float32 at 500 points near vertices equals the float64 map at the same
    (float32) inputs in the Fisher norm, relative to the result's norm (plus ε₃₂·‖X ⊙ G‖_X: the
    stored point is doubly stochastic only to its rounding, where the true result can be ~0), and is
    finite. float64 is the same map as before on sampled points (to roundoff)."""
    worst = 0.0
    for X, G in _near_vertex_points(500, generator):
        R32 = B.egrad_to_rgrad(X, G)
        R64 = B.egrad_to_rgrad(X.double(), G.double())
        assert bool(torch.isfinite(R32).all()) and bool(torch.isfinite(R64).all())
        err = float(_fisher_sq_norm(X, R32.double() - R64).sqrt())
        bound = F32_RGRAD_REL * float(_fisher_sq_norm(X, R64).sqrt()) \
            + F32_RGRAD_ABS * float(_fisher_sq_norm(X, X.double() * G.double()).sqrt())
        worst = max(worst, err / bound)
    assert worst <= 1.0, worst
    X = B.sample((4, 6, 6), generator=generator, dtype=F64)
    G = torch.randn(4, 6, 6, generator=generator, dtype=F64)
    from geofunc.spaces._birkhoff import fisher_project

    torch.testing.assert_close(B.egrad_to_rgrad(X, G), fisher_project(X, X * G), atol=1e-14, rtol=0)


# ------------------------------------------------------------- transport and momentum
def test_transport_is_the_differentiated_retraction(generator):
    """transport(X, retract(X, V), W) = d/dt retract(X, V + tW) at t = 0 (Note [Transport by the
    differentiated retraction]), W itself at Y = X; near a vertex too (float64)."""
    X = torch.cat([B.sample((3, 5, 5), generator=generator, dtype=F64),
                   B.to_manifold(8.0 * torch.randn(2, 5, 5, generator=generator, dtype=F64))])
    V = B.egrad_to_rgrad(X, torch.randn(X.shape, generator=generator, dtype=F64))
    W = B.egrad_to_rgrad(X, torch.randn(X.shape, generator=generator, dtype=F64))
    Y = B.retract(X, V)
    t0, t1 = torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
    dY = torch.func.jvp(lambda t: B.retract(X, V + t * W), (t0,), (t1,))[1]
    T = B.transport(X, Y, W)
    torch.testing.assert_close(T, dY, atol=1e-12 * float(dY.abs().max()), rtol=1e-9)
    torch.testing.assert_close(B.transport(X, X, W), W, atol=1e-15, rtol=1e-12)
    assert float(T.sum(-1).abs().max()) < 1e-15 and float(T.sum(-2).abs().max()) < 1e-15


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rsgd_momentum_converges_toward_a_target_near_a_vertex(dtype):
    """rsgd with momentum 0.9 (lr 0.5) on ½‖X − T‖², T near a vertex, 100 steps: with the projection as
    transport the loss was still 9e-3–4e-2 (float64), above momentum-free rsgd's ~6e-4; with the
    differentiated retraction it is ~3e-5, below it (momentum helps, as it should)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        T = B.to_manifold(6.0 * torch.randn(5, 5, generator=g, dtype=F64))
        X0 = B.sample((5, 5), generator=g, dtype=F64)
        loss = {}
        for name, opt in (("momentum", gf.optim.rsgd({"x": B}, lr=0.5, momentum=0.9)),
                          ("plain", gf.optim.rsgd({"x": B}, lr=0.5))):
            p = {"x": X0.to(dtype)}
            state = opt.init(p)
            for _ in range(100):
                p, state = opt.update({"x": p["x"] - T.to(dtype)}, state, p)
            loss[name] = 0.5 * float(((p["x"].double() - T) ** 2).sum())
        assert loss["momentum"] <= 2e-4 and loss["momentum"] < loss["plain"], loss


def test_nested_forward_mode_keeps_the_value_next_to_a_vertex():
    """Under nested forward mode (and inside torch.compile) the value is the balanced limit plus a term
    that is 0 in value and carries the three Newton steps' derivatives. Next to a vertex (float32, raw
    scale 50) their solve can break down: that term was NaN, and so was the value. The balancing there is
    eager mode's (Note [Balancing under vmap]; it was the fixed count, 6e-10 off this batch's), and so is
    vmap's: all three are the same tensor."""
    g = torch.Generator().manual_seed(1)
    Z = (50.0 * torch.randn(16, 3, 3, generator=g, dtype=F64)).float()
    V = torch.randn(16, 3, 3, generator=g).float()
    inner = lambda z: torch.func.jvp(B.to_manifold, (z,), (V,))[0]  # noqa: E731
    X = torch.func.jvp(inner, (Z,), (V,))[0]  # two forward levels: the Newton-step path
    torch.testing.assert_close(X, torch.func.vmap(B.to_manifold)(Z), rtol=0, atol=0)
    torch.testing.assert_close(X, B.to_manifold(Z), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_eager_early_exit_equals_the_fixed_count_and_is_taken(dtype, generator, monkeypatch):
    """In eager mode the Newton rounds stop one round after every matrix is balanced to 8nε (Note
    [Eager early exit of the Newton rounds]); where no value is read (the fixed count: a trace on
    another device; here _early_exit_tol patched to None) all rounds run. The two agree to rounding,
    on Gaussian raw inputs of scale 0.1 to 10 and next to decomposable matrices (where the first round
    within the tolerance was still 2e-6 off in float32: the extra round is what this pins), and the
    exit is taken: at raw scale 1 a call runs at most 4 of the rounds, under vmap too (Note [Balancing
    under vmap]: it ran all of them)."""
    from geofunc.spaces import _birkhoff

    tol = {F32: 1e-6, F64: 1e-14}[dtype]
    early_exit_tol = _birkhoff._early_exit_tol

    def fixed_count(fn, *args):
        monkeypatch.setattr(_birkhoff, "_early_exit_tol", lambda L: None)
        try:
            return fn(*args)
        finally:
            monkeypatch.setattr(_birkhoff, "_early_exit_tol", early_exit_tol)

    for n in (2, 3, 5, 16):
        for scale in (0.1, 1.0, 3.0, 10.0):
            Z = (scale * torch.randn(16, n, n, generator=generator, dtype=F64)).to(dtype)
            torch.testing.assert_close(B.to_manifold(Z), fixed_count(B.to_manifold, Z), atol=tol, rtol=0)
            torch.testing.assert_close(torch.func.vmap(B.to_manifold)(Z), B.to_manifold(Z), atol=0, rtol=0)
    for A in (torch.tril(torch.ones(4, 4)) + 1e-6, torch.tensor([[1.0, 1.0], [1e-6, 1.0]])):
        A = A.to(dtype)
        torch.testing.assert_close(B.project(A), fixed_count(B.project, A), atol=tol, rtol=0)
    rounds = []
    step = _birkhoff._newton_step
    monkeypatch.setattr(_birkhoff, "_newton_step", lambda L: rounds.append(1) or step(L))
    B.to_manifold(torch.randn(8, 5, 5, generator=generator, dtype=F64).to(dtype))
    assert 1 <= len(rounds) <= 4, len(rounds)
    rounds.clear()
    torch.func.vmap(B.to_manifold)(torch.randn(8, 5, 5, generator=generator, dtype=F64).to(dtype))
    assert 1 <= len(rounds) <= 4, len(rounds)
    rounds.clear()
    fixed_count(B.to_manifold, torch.randn(8, 5, 5, generator=generator, dtype=F64).to(dtype))
    assert len(rounds) == _birkhoff._NEWTON


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_inside_autocast_is_the_backward_after_it(dtype) -> None:
    """Regression (Note [Backward formulas under autocast] in geofunc/_fastpath.py): Sinkhorn's
    adjoint ran in the autocast dtype when ``loss.backward()`` was called inside the region, though
    its forward ran in float32: the gradient of a retraction was 0.5% to 18 000x off the one taken
    after the region (bf16, three seeds), silently. It is now the same gradient."""
    M = gf.Birkhoff()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        X = M.sample((2, 5, 5), generator=g)
        Z, C = 5 * torch.randn(2, 5, 5, generator=g), torch.randn(2, 5, 5, generator=g)
        grads = []
        for inside in (True, False):
            z = Z.clone().requires_grad_()
            with torch.autocast("cpu", dtype=dtype):
                loss = ((M.retract(X, M.tangent(X, z)) @ C).float() * C).sum()
                if inside:
                    loss.backward()
            if not inside:
                loss.backward()
            grads.append(z.grad)
        assert torch.isfinite(grads[0]).all()
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5 * float(grads[1].abs().max()))


def test_project_result_can_be_modified_in_place_under_autograd(generator):
    """project returned Sinkhorn's output itself, which its backward reads: an in-place op on the result
    (allowed on every other map's, to_manifold's and retract's included) raised at backward."""
    X = B.sample((4, 4), generator=generator, dtype=F64)
    G, W = (torch.randn(4, 4, generator=generator, dtype=F64) for _ in range(2))
    g = G.clone().requires_grad_()
    P = B.project(X + 0.1 * g)
    P.mul_(2.0)
    got = torch.autograd.grad((P * W).sum(), g)[0]
    ref = grad(lambda a: (2.0 * B.project(X + 0.1 * a) * W).sum())(G)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_second_derivatives_next_to_a_face_equal_finite_differences():
    """Regression (Note [the Fisher gradient near a vertex]): Sinkhorn's backward and jvp took the Fisher
    projection through ``fisher_project``, whose shift and cancellation are errors of ε relative to
    eigenvalues of I − PᵀP ~1e-12 next to a face: through ``retract`` at step ratio |V/X| = 72 (float64)
    ``jvp(grad(f))`` was 0.1–0.5% off central differences of ``grad(f)`` at every step size (seeds 4, 5,
    11 of 12), and the reverse-over-reverse Hessian was asymmetric by 4e-3. Now the differences converge
    to it (error ∝ h²) and the Hessian is symmetric."""
    from torch.func import jacrev, jvp

    n = 4
    for seed in (4, 5, 11):
        g = torch.Generator().manual_seed(seed)
        X = B.sample((n, n), generator=g, dtype=F64)
        V0 = B.tangent(X, torch.randn(n, n, generator=g, dtype=F64))
        W = torch.randn(n, n, generator=g, dtype=F64)
        D = B.tangent(X, torch.randn(n, n, generator=g, dtype=F64))
        V = V0 * 72.0 / float((V0 / X).abs().max())

        def f(v):
            return (torch.sin(B.retract(X, v)) * W).sum()

        hv = jvp(grad(f), (V,), (D,))[1]
        h = 1e-4
        fd = (grad(f)(V + h * D) - grad(f)(V - h * D)) / (2 * h)
        scale = float(hv.abs().max())
        assert float((hv - fd).abs().max()) <= 1e-6 * scale, seed
        H = jacrev(jacrev(f))(V).reshape(n * n, n * n)
        assert float((H - H.T).abs().max()) <= 1e-10 * float(H.abs().max()), seed
        torch.testing.assert_close((H @ D.flatten()).reshape(n, n), hv, atol=1e-9 * scale, rtol=0)


def _limit_distance_bound(P, Z):
    """Sinkhorn's theorem on the entries that hold the mass, as in _structure_error, plus marginals."""
    return torch.maximum(_structure_error(P, Z) / (1 + Z.abs().amax((-2, -1))), _marginal_error(P.double()))


# p17's raw tensor: × 10, its Sinkhorn limit is the anti-diagonal permutation, which the fixed count does not reach
P17_Z = torch.tensor([[-61.937, 126.600, 36.301], [-86.160, 83.040, -152.717], [-4.143, -60.187, 11.917]], dtype=F64)


def test_eager_mode_balances_past_the_fixed_count_or_gives_nan():
    """Regression (Note [Eager Newton rounds past the fixed count]): past raw scale ~150 (float64) the
    fixed 24 Newton rounds stopped short and the rounding step returned another doubly stochastic matrix,
    finite, up to 1 off the limit: p17's Z × 10 gave [[.25, .5, .25], [.25, .5, .25], [.5, 0, .5]] (its
    limit is the anti-diagonal permutation), × 3 was 3e-3 off. Eager mode now runs more rounds: float64
    reaches the limit, and float32 is within 1e-3 of the float64 limit of its input or NaN."""
    Z0 = P17_Z.clone()
    for factor in (1.5, 3.0, 10.0):
        P = B.to_manifold(factor * Z0)
        torch.testing.assert_close(P, torch.eye(3, dtype=F64).flip(-1), atol=1e-6, rtol=0, msg=str(factor))
    g = torch.Generator().manual_seed(0)
    for n in (3, 8, 16):
        for scale in (300.0, 1000.0):
            Z = scale * torch.randn(32, n, n, generator=g, dtype=F64)
            P = B.to_manifold(Z)
            assert bool(torch.isfinite(P).all()), (n, scale)
            assert float(_limit_distance_bound(P, Z).max()) <= 1e-6, (n, scale)
            Z32 = Z.float()
            ref = B.to_manifold(Z32.double())
            P32 = B.to_manifold(Z32).double()
            off = (P32 - ref).abs().amax((-2, -1))
            assert bool(((off <= 1e-3) | P32.isnan().all(-1).all(-1)).all()), (n, scale, float(off.nan_to_num(0).max()))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_compiled_maps_balance_as_eager_mode_does(dtype, monkeypatch):
    """Note [Compiled balancing]: inside torch.compile (CPU) the balancing is eager mode's, one operator
    in the graph, not the fixed count unrolled: past raw scale ~150 (float64; ~100 float32) the fixed
    count stopped short and the compiled to_manifold was a doubly stochastic matrix up to 1 off the limit
    (p17's Z × 10: [[.25, .5, .25], …]; float32 n = 16 at scale 100: 0.23), where eager mode reaches it
    or gives NaN. Compiled values (to_manifold, retract, and their gradients) equal eager mode's, NaN
    where it is NaN."""
    Z0 = P17_Z.clone()
    g = torch.Generator().manual_seed(0)
    Zs = [(10.0 * Z0).to(dtype)[None], 100.0 * torch.randn(8, 16, 16, generator=g, dtype=dtype),
          3.0 * torch.randn(4, 5, 5, generator=g, dtype=dtype)]
    targets = []

    def count(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        traced = torch.compile(B.to_manifold, fullgraph=True, backend=count)
        traced(Zs[0])
        assert targets.count("geofunc.sinkhorn_balance") == 1 and len(targets) < 300, len(targets)
        torch._dynamo.reset()
        to_manifold = torch.compile(B.to_manifold, fullgraph=True, dynamic=False, backend="aot_eager")
        retract = torch.compile(B.retract, fullgraph=True, dynamic=False, backend="aot_eager")
        for Z in Zs:
            C = torch.randn(Z.shape, generator=g, dtype=dtype)
            got, want = [], []
            for fn, out in ((to_manifold, got), (B.to_manifold, want)):
                Zr = Z.clone().requires_grad_()
                P = fn(Zr)
                (G,) = torch.autograd.grad((P.nan_to_num(0.0) * C).sum(), Zr)
                out += [P.detach(), G]
            torch.testing.assert_close(got[0], want[0], atol=0, rtol=0, equal_nan=True, msg=str(Z.shape))
            torch.testing.assert_close(got[1], want[1], atol=1e-10 if dtype == F64 else 1e-4, rtol=1e-6,
                                       equal_nan=True, msg=str(Z.shape))
            X = want[0].nan_to_num(1.0 / Z.shape[-1])
            V = B.tangent(X, torch.randn(Z.shape, generator=g, dtype=dtype))
            torch.testing.assert_close(retract(X, 20.0 * V), B.retract(X, 20.0 * V), atol=0, rtol=0, equal_nan=True)
        if dtype == F64:  # an oracle beside eager mode: the limit of p17's Z × 10 is the anti-diagonal permutation
            torch.testing.assert_close(to_manifold(Zs[0])[0], torch.eye(3, dtype=F64).flip(-1), atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()
    # the operator itself: schema, fake kernel, vmap, AOT dispatch; values only (no gradient flows through it)
    for L in (Zs[1], Zs[1].clone().requires_grad_()):
        torch.library.opcheck(torch.ops.geofunc.sinkhorn_balance.default, (L,))
        assert not torch.ops.geofunc.sinkhorn_balance(L).requires_grad
    torch.testing.assert_close(torch.func.vmap(torch.ops.geofunc.sinkhorn_balance)(Zs[2][:, None]),
                               torch.ops.geofunc.sinkhorn_balance(Zs[2])[:, None], atol=0, rtol=0)
    # vmap balances as eager mode does (Note [Balancing under vmap]); the fixed count (where no value is
    # read: _early_exit_tol patched to None) stops short on p17's input: these inputs tell the two apart
    from geofunc.spaces import _birkhoff

    for Z in Zs:
        for how in (torch.func.vmap, torch.func.functionalize):  # (functionalize: 1.0 off at raw scale 300, float32)
            torch.testing.assert_close(how(B.to_manifold)(Z), B.to_manifold(Z), atol=0, rtol=0, equal_nan=True,
                                       msg=f"{how.__name__} {tuple(Z.shape)}")
    with monkeypatch.context() as m:
        m.setattr(_birkhoff, "_early_exit_tol", lambda L: None)
        fixed = B.to_manifold(Zs[0])
    assert not torch.allclose(fixed.nan_to_num(0.0), B.to_manifold(Zs[0]).nan_to_num(0.0), atol=1e-2)


def test_eager_mode_gives_nan_where_the_cap_is_not_enough(monkeypatch):
    """Where the rounds past the fixed count run out (the cap lowered to one extra round here), the
    unbalanced matrix is NaN, value and gradient, and its balanced neighbour in the batch is its value alone (to rounding);
    under vmap too (Note [Balancing under vmap]: the fixed count ran there, and gave the unbalanced matrix a finite
    point 1 off its limit)."""
    from geofunc.spaces import _birkhoff

    Z0 = P17_Z.clone()
    Z1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    Z = torch.stack([10.0 * Z0, Z1]).requires_grad_()
    monkeypatch.setattr(_birkhoff, "_NEWTON_CAP", _birkhoff._NEWTON + 1)
    P = B.to_manifold(Z)
    assert bool(P[0].isnan().all()) and bool(torch.isfinite(P[1]).all())
    torch.testing.assert_close(P[1], B.to_manifold(Z1), atol=1e-14, rtol=0)  # its batch ran more rounds
    (G,) = torch.autograd.grad((P[1] * torch.arange(9.0, dtype=F64).reshape(3, 3)).sum() + P[0].sum(), Z)
    assert bool(G[0].isnan().all()) and bool(torch.isfinite(G[1]).all())
    Pv = torch.func.vmap(B.to_manifold)(Z.detach())
    torch.testing.assert_close(Pv, P.detach(), atol=0, rtol=0, equal_nan=True)


def test_float32_balancing_at_raw_scale_50_reaches_the_limit():
    """Note [Sinkhorn with a fixed step count]: the Levenberg–Marquardt shift μ = √ε·‖1 − c‖∞ keeps float32
    at raw scale 50 on its Sinkhorn limit; a shift 10× smaller left an 8×8 input of this batch 0.2 off it (relative to
    1 + max|Z|), with exact marginals and no error."""
    g = torch.Generator().manual_seed(2)
    n = 8
    Z = 50.0 * torch.randn(64, n, n, generator=g, dtype=F64)
    P = B.to_manifold(Z.float())
    assert bool(torch.isfinite(P).all())
    assert float(_marginal_error(P).max()) <= MARGINAL[F32]
    assert float((_structure_error(P, Z) / (1 + Z.abs().amax((-2, -1)))).max()) <= 1e-5
