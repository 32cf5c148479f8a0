"""``PSD(metric=...)``: the affine-invariant metric beside the embedded one (Note [The metrics of PSD]
in ``geofunc/spaces/_psd.py``), beyond the conformance harness (which runs both metrics on real
matrices) and geoopt's maps (``tests/test_geoopt_parity.py``): the invariance that names the metric,
Hermitian matrices, the embedded metric's segments, derivatives where eigenvalues repeat, errors.
Membership by ``tests/reference.py``."""

from __future__ import annotations

import math

import pytest
import torch
from reference import member

import geofunc as gf

F64, C128 = torch.float64, torch.complex128
AFFINE = gf.PSD(metric="affine")


def _tangent(space, X, generator):
    return space.tangent(X, torch.randn(X.shape, generator=generator, dtype=X.dtype))


@pytest.mark.parametrize("dtype", [F64, C128])
def test_the_affine_invariant_metric_is_invariant_under_congruence(dtype, generator):
    """For invertible ``A``: ``dist(AXAᴴ, AYAᴴ) = dist(X, Y)``, ``logmap(AXAᴴ, AYAᴴ) = A logmap(X, Y) Aᴴ``,
    ``inner(AXAᴴ, AUAᴴ, AVAᴴ) = inner(X, U, V)``, ``transport`` and ``expmap`` equivariant; the
    embedded metric is not invariant (its distance changes)."""
    X, Y = (AFFINE.sample((3, 4, 4), generator=generator, dtype=dtype) for _ in range(2))
    U, V = _tangent(AFFINE, X, generator), _tangent(AFFINE, X, generator)
    A = torch.randn(3, 4, 4, generator=generator, dtype=dtype) + 2 * torch.eye(4, dtype=dtype)

    def act(M):
        return A @ M @ A.mH

    torch.testing.assert_close(AFFINE.dist(act(X), act(Y)), AFFINE.dist(X, Y), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(AFFINE.logmap(act(X), act(Y)), act(AFFINE.logmap(X, Y)), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(AFFINE.inner(act(X), act(U), act(V)), AFFINE.inner(X, U, V), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(AFFINE.transport(act(X), act(Y), act(V)), act(AFFINE.transport(X, Y, V)), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(AFFINE.expmap(act(X), act(U)), act(AFFINE.expmap(X, U)), atol=1e-9, rtol=1e-9)
    assert not torch.allclose(gf.PSD().dist(act(X), act(Y)), gf.PSD().dist(X, Y), rtol=1e-3)


@pytest.mark.parametrize("dtype", [F64, C128])
def test_the_affine_invariant_geodesics(dtype, generator):
    """At every pair: ``expmap(X, logmap(X, Y)) = Y``, ``‖logmap‖ = dist``, ``logmap`` tangent
    (Hermitian), ``dist(X, expmap(X, tV)) = t`` for unit ``V`` (a complete metric: any ``t``), the
    geodesic's midpoint is the matrix geometric mean ``X #½ Y`` (for commuting X, Y: √(XY)), the
    transport is an isometry that carries the velocity to the velocity; Riemannian gradient
    identity ``inner(X, egrad_to_rgrad(X, G), V) = Re tr(GᴴV)``."""
    X, Y = (AFFINE.sample((3, 4, 4), generator=generator, dtype=dtype) for _ in range(2))
    L = AFFINE.logmap(X, Y)
    torch.testing.assert_close(L, L.mH, atol=1e-12, rtol=0)
    torch.testing.assert_close(AFFINE.expmap(X, L), Y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(AFFINE.inner(X, L, L).sqrt(), AFFINE.dist(X, Y), atol=1e-10, rtol=1e-10)
    V = _tangent(AFFINE, X, generator)
    V = V / AFFINE.inner(X, V, V).sqrt()[..., None, None]
    for t in (1e-6, 0.5, 3.0, 10.0):
        Z = AFFINE.expmap(X, t * V)
        assert member(gf.PSD(), Z, 1e-8 * max(1.0, float(Z.abs().max())))
        torch.testing.assert_close(AFFINE.dist(X, Z), torch.full((3,), t, dtype=F64), atol=1e-8 * t, rtol=1e-8)
    D = torch.diag_embed(torch.rand(3, 4, generator=generator, dtype=F64) + 0.5).to(dtype)
    E = torch.diag_embed(torch.rand(3, 4, generator=generator, dtype=F64) + 0.5).to(dtype)
    mid = AFFINE.expmap(D, 0.5 * AFFINE.logmap(D, E))
    torch.testing.assert_close(mid, torch.diag_embed((torch.diagonal(D, dim1=-2, dim2=-1) * torch.diagonal(E, dim1=-2, dim2=-1)).sqrt()),
                               atol=1e-12, rtol=0)
    T = AFFINE.transport(X, Y, V)
    torch.testing.assert_close(AFFINE.inner(Y, T, T), AFFINE.inner(X, V, V), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(AFFINE.transport(X, Y, L), -AFFINE.logmap(Y, X), atol=1e-9, rtol=1e-9)
    G = torch.randn(X.shape, generator=generator, dtype=dtype)
    lhs = AFFINE.inner(X, AFFINE.egrad_to_rgrad(X, G), V)
    torch.testing.assert_close(lhs, (G.conj() * V).sum((-2, -1)).real, atol=1e-10, rtol=1e-10)


def test_the_affine_retraction_stays_in_the_cone_for_every_step(generator):
    """``X + V + ½VX⁻¹V ⪰ ½X``: positive definite for every symmetric ``V``, however large, where the
    embedded ``project(X + V)`` clamps (a different point); second order: it agrees with ``expmap`` to
    O(t³)."""
    X = AFFINE.sample((4, 4), generator=generator, dtype=F64)
    V = _tangent(AFFINE, X, generator)
    for t in (1.0, 10.0, 100.0):
        R = AFFINE.retract(X, t * V)
        assert member(gf.PSD(), R, 1e-8 * float(R.abs().max()))
        assert float(torch.linalg.eigvalsh(R - 0.5 * X).min()) > -1e-8 * float(R.abs().max())
    errs = [float((AFFINE.retract(X, t * V) - AFFINE.expmap(X, t * V)).abs().max()) for t in (1e-2, 5e-3)]
    assert 6.0 < errs[0] / errs[1] < 10.0  # halving t divides the error by ~8


def test_the_embedded_metrics_segments(generator):
    """The embedded metric's closed forms on the convex cone: ``logmap = Y − X``, ``dist = ‖Y − X‖_F``,
    ``expmap = X + V`` while it stays positive definite and NaN past the boundary (never a point off the
    cone); ``transport`` the identity on symmetric matrices."""
    S = gf.PSD()
    X, Y = (S.sample((2, 3, 3), generator=generator, dtype=F64) for _ in range(2))
    torch.testing.assert_close(S.logmap(X, Y), Y - X, atol=1e-15, rtol=0)
    torch.testing.assert_close(S.dist(X, Y), torch.linalg.matrix_norm(Y - X), atol=1e-15, rtol=0)
    torch.testing.assert_close(S.expmap(X, Y - X), Y, atol=1e-15, rtol=0)
    out = S.expmap(X, -2 * X)  # −X: outside the cone
    assert torch.isnan(out).all()
    V = _tangent(S, X, generator)
    torch.testing.assert_close(S.transport(X, Y, V), V, atol=1e-15, rtol=0)


def _second(f, x, d, h=1e-4):
    return (f(x + h * d) - 2 * f(x) + f(x - h * d)) / h**2


@pytest.mark.parametrize("where", ["identity", "coincident", "generic"])
def test_affine_maps_have_exact_derivatives_where_eigenvalues_repeat(where, generator):
    """At ``X = I`` (every eigenvalue repeats) and ``Y = X``: gradcheck of ``logmap``, ``expmap``,
    ``transport`` and ``inner`` in all arguments, and second directional derivatives of a loss of
    ``logmap`` and ``expmap`` (in either argument; ``transport`` in ``X``) from double backward and from
    ``torch.func`` (forward over forward) against second differences of values; the Riemannian gradient of ``½ dist²(·, Y)`` is
    ``−logmap(·, Y)`` (the Fréchet-mean gradient)."""
    X = torch.eye(3, dtype=F64) if where == "identity" else AFFINE.sample((3, 3), generator=generator, dtype=F64)
    Y = X.clone() if where == "coincident" else AFFINE.sample((3, 3), generator=generator, dtype=F64)
    V = _tangent(AFFINE, X, generator)
    W = torch.randn(3, 3, generator=generator, dtype=F64)
    args = [a.clone().requires_grad_() for a in (X, Y, V)]
    assert torch.autograd.gradcheck(lambda X, Y: AFFINE.logmap(X, Y), args[:2])
    assert torch.autograd.gradcheck(lambda X, V: AFFINE.expmap(X, V), (args[0], args[2]))
    assert torch.autograd.gradcheck(lambda X, Y, V: AFFINE.transport(X, Y, V), args)
    assert torch.autograd.gradcheck(lambda X, V: AFFINE.inner(X, V, V), (args[0], args[2]))
    # in X too: the roots X^{±1/2} are differentiated twice there (their spectral second derivatives)
    for fn, x0 in ((lambda Y: (W * AFFINE.logmap(X, Y)).sum(), Y), (lambda V: (W * AFFINE.expmap(X, V)).sum(), V),
                   (lambda X: (W * AFFINE.logmap(X, Y)).sum(), X), (lambda X: (W * AFFINE.expmap(X, V)).sum(), X),
                   (lambda X: (W * AFFINE.transport(X, Y, V)).sum(), X)):
        for _ in range(2):
            d = torch.randn(3, 3, generator=generator, dtype=F64)
            d = d + d.mT
            fd = float(_second(fn, x0, d))
            ff = float(torch.func.jvp(lambda x: torch.func.jvp(fn, (x,), (d,))[1], (x0,), (d,))[1])
            xr = x0.clone().requires_grad_()
            (g,) = torch.autograd.grad(fn(xr), xr, create_graph=True)
            (g2,) = torch.autograd.grad((g * d).sum(), xr)
            tol = 1e-5 * max(1.0, abs(fd))
            assert abs(ff - fd) < tol and abs(float((g2 * d).sum()) - fd) < tol, (fd, ff, float((g2 * d).sum()))
    if where != "coincident":
        Xr = X.clone().requires_grad_()
        (G,) = torch.autograd.grad(0.5 * AFFINE.dist(Xr, Y) ** 2, Xr)
        torch.testing.assert_close(AFFINE.egrad_to_rgrad(X, G), -AFFINE.logmap(X, Y), atol=1e-9, rtol=1e-9)


def test_a_karcher_mean_by_riemannian_gradient_descent(generator):
    """The Fréchet (Karcher) mean of commuting matrices under the affine-invariant metric is their
    geometric mean ``exp(mean log)``: reached by ``X ← expmap(X, mean logmap(X, Yᵢ))``, and by
    ``gf.optim.rsgd`` on ``½ Σ dist²`` (where the embedded metric's mean is the arithmetic one)."""
    Q = gf.SO().sample((4, 4), generator=generator, dtype=F64)
    lams = torch.rand(5, 4, generator=generator, dtype=F64) * 3 + 0.2
    Ys = Q @ torch.diag_embed(lams) @ Q.mT
    target = Q @ torch.diag_embed(lams.log().mean(0).exp()) @ Q.mT
    X = torch.eye(4, dtype=F64)
    for _ in range(20):
        X = AFFINE.expmap(X, AFFINE.logmap(X.expand_as(Ys), Ys).mean(0))
    torch.testing.assert_close(X, target, atol=1e-10, rtol=0)
    opt = gf.optim.rsgd({"X": AFFINE}, lr=1.0 / 5)
    params = {"X": torch.eye(4, dtype=F64)}
    state = opt.init(params)

    def loss(p):
        return 0.5 * (AFFINE.dist(p["X"].expand_as(Ys), Ys) ** 2).sum()

    for _ in range(30):
        params, state = opt.update(torch.func.grad(loss)(params), state, params)
    torch.testing.assert_close(params["X"], target, atol=1e-8, rtol=0)


def test_a_metric_that_is_not_one_of_the_two_is_refused():
    with pytest.raises(gf.ManifoldError, match=r"PSD\(.*metric='log-euclidean'\): expected `metric` to be one of "
                                               r"'embedded', 'affine', got 'log-euclidean'"):
        gf.PSD(metric="log-euclidean")
    assert repr(gf.PSD()) == "PSD(f='softplus', triv='expm')"
    assert repr(AFFINE) == "PSD(f='softplus', triv='expm', metric='affine')" and AFFINE != gf.PSD()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_maps_in_low_precision(dtype, generator):
    """float32 and bfloat16 (computed in float32, Note [Low precision]): the maps land in the cone and
    agree with float64 to the dtype's accuracy."""
    X, Y = (AFFINE.sample((2, 4, 4), generator=generator, dtype=F64) for _ in range(2))
    V = _tangent(AFFINE, X, generator)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for name, got, want in (("expmap", AFFINE.expmap(X.to(dtype), V.to(dtype)), AFFINE.expmap(X, V)),
                            ("retract", AFFINE.retract(X.to(dtype), V.to(dtype)), AFFINE.retract(X, V)),
                            ("logmap", AFFINE.logmap(X.to(dtype), Y.to(dtype)), AFFINE.logmap(X, Y)),
                            ("transport", AFFINE.transport(X.to(dtype), Y.to(dtype), V.to(dtype)), AFFINE.transport(X, Y, V))):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, atol=tol * max(1.0, float(want.abs().max())), rtol=tol, msg=name)


@pytest.mark.parametrize(("dtype", "lam"), [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["float32", "float64"])
def test_embedded_expmap_is_nan_where_not_a_point_by_contains(dtype, lam, generator):
    """``X + sym(V)`` whose least eigenvalue is positive but below the space's floor passed Cholesky and
    came back finite, a matrix ``contains`` and ``from_manifold`` refuse; now NaN there (the space's own
    test), and a point of the space where the sum is one."""
    M = gf.PSD()
    Q = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=dtype))[0]
    X = Q @ torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=dtype)) @ Q.mT
    for first, on in ((lam, False), (0.5, True)):
        Y = Q @ torch.diag(torch.tensor([first, 2.0, 3.0], dtype=dtype)) @ Q.mT
        E = M.expmap(X, Y - X)
        if on:
            assert member(M, E) and bool(torch.isfinite(E).all())
        else:
            assert bool(torch.isnan(E).all()), E


@pytest.mark.parametrize("cond", [1e3, 1e4, 1e5])
def test_affine_maps_of_ill_conditioned_float32_points(cond, generator):
    """float32 points of condition number 1e3–1e5 (members of the space in float32): ``dist``,
    ``logmap`` and ``transport`` of the rounded points equal the float64 matrix functions of them
    (``scipy.linalg``: generalized eigenvalues, ``X logm(X⁻¹Y)``, ``(YX⁻¹)^½ V (X⁻¹Y)^½``) to float32's
    rounding of the result (Note [Affine maps of rounded points]). ``X^-½ Y X^-½`` spreads over
    cond², so computed in float32 they were ~ε·cond² off (dist 5% at cond 1e4), NaN at cond 1e5."""
    sl = pytest.importorskip("scipy.linalg")
    n = 4
    Q = torch.linalg.qr(torch.randn(2, 4, n, n, generator=generator, dtype=F64))[0]
    lam = torch.logspace(0, float(torch.log10(torch.tensor(cond))), n, dtype=F64)
    X, Y = (q @ torch.diag(lam) @ q.mT for q in Q)
    X, Y = ((0.5 * (A + A.mT)).float() for A in (X, Y))
    assert member(AFFINE, X) and member(AFFINE, Y)
    V = AFFINE.tangent(X, torch.randn(X.shape, generator=generator, dtype=F64).float())
    tol = 100 * torch.finfo(torch.float32).eps
    d, L, P = AFFINE.dist(X, Y), AFFINE.logmap(X, Y), AFFINE.transport(X, Y, V)
    for i in range(4):
        x, y, v = (t[i].double().numpy() for t in (X, Y, V))
        w = sl.eigh(y, x, eigvals_only=True)
        assert abs(float(d[i]) - float((torch.from_numpy(w).log() ** 2).sum().sqrt())) < tol * max(1.0, float(d[i]))
        ref_L = torch.from_numpy((x @ sl.logm(sl.solve(x, y))).real)
        assert float((L[i].double() - ref_L).abs().max()) < tol * float(ref_L.abs().max())
        E = sl.sqrtm(y @ sl.inv(x)).real
        ref_P = torch.from_numpy(E @ v @ E.T)
        assert float((P[i].double() - ref_P).abs().max()) < tol * float(ref_P.abs().max())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
def test_affine_maps_at_a_non_finite_point_are_nan_per_point(bad, generator):
    """Note [NaN policy]: the affine maps read X through its inverse, and the inverse of a matrix with ±inf on
    its diagonal is finite: inner was a finite number at no point (found by probing every entry of every map's
    arguments). Every entry of a point now makes inner NaN there (and retract, egrad_to_rgrad and transport not
    finite), and leaves the other point as it was."""
    P = gf.PSD(metric="affine")
    X, Y = (P.sample((2, 3, 3), generator=generator, dtype=torch.float64) for _ in range(2))
    U = P.tangent(X, torch.randn(2, 3, 3, generator=generator, dtype=torch.float64))
    maps = {"inner": lambda A: P.inner(A, U, U), "retract": lambda A: P.retract(A, 0.1 * U),
            "egrad_to_rgrad": lambda A: P.egrad_to_rgrad(A, U), "transport": lambda A: P.transport(A, Y, U)}
    clean = {k: f(X) for k, f in maps.items()}
    for i in range(3):
        for j in range(3):
            Xb = X.clone()
            Xb[0, i, j] = bad
            for k, f in maps.items():  # inner NaN; the products carry the entry into their own (Note [NaN policy])
                out = f(Xb)
                assert bool(torch.isnan(out[0]).all()) if k == "inner" else not bool(torch.isfinite(out[0]).all()), (
                    k, i, j, out[0])
                assert torch.equal(out[1], clean[k][1]), (k, i, j)
