"""``Stiefel(metric=...)``: the canonical metric beside the embedded one (Note [The metrics of Stiefel]
in ``geofunc/spaces/_stiefel.py``), beyond the conformance harness (which runs both metrics on real
and complex frames): the geodesic equation of each metric, the exponential map against an n×n
``matrix_exp``, Wen–Yin's Cayley step, dynamic trivialization as canonical-metric gradient descent,
geoopt's ``CanonicalStiefel`` (the default ``geoopt.Stiefel()``), errors. Membership by
``tests/reference.py``."""

from __future__ import annotations

import pytest
import torch
from reference import member
from torch.func import grad, jvp

import geofunc as gf

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64, C128 = torch.float64, torch.complex128
CANONICAL = gf.Stiefel(metric="canonical")
SHAPES = [(7, 3), (3, 7), (5, 5), (4, 3), (2, 6, 2)]


def _tangent(space, X, generator):
    return space.tangent(X, torch.randn(X.shape, generator=generator, dtype=X.dtype))


def _tall(*As):
    return [A.mH if A.shape[-2] < A.shape[-1] else A for A in As]


def _geodesic_residuals(space, X, V, t=0.7):
    """``Y, Y', Y''`` of ``t ↦ expmap(X, tV)`` by forward mode (tall), and the residuals of both
    metrics' geodesic equations (Edelman, Arias & Smith 1998, eqs. 2.7 and 2.41):
    embedded ``Y'' + Y(Y'ᴴY')``, canonical ``Y'' + Y'Y'ᴴY + Y((YᴴY')² + Y'ᴴY')``."""
    def curve(s):
        return space.expmap(X, s * V)

    def velocity(s):
        return jvp(curve, (s,), (torch.ones_like(s),))[1]

    t = torch.tensor(t, dtype=F64)
    Y, Y1 = jvp(curve, (t,), (torch.ones_like(t),))
    Y2 = jvp(velocity, (t,), (torch.ones_like(t),))[1]
    Y, Y1, Y2 = _tall(Y, Y1, Y2)
    YhY1 = Y.mH @ Y1
    embedded = Y2 + Y @ (Y1.mH @ Y1)
    canonical = Y2 + Y1 @ Y1.mH @ Y + Y @ (YhY1 @ YhY1 + Y1.mH @ Y1)
    return {"embedded": embedded.abs().amax(), "canonical": canonical.abs().amax()}


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_expmap_solves_the_geodesic_equation_of_its_metric(shape, dtype, generator):
    """``t ↦ expmap(X, tV)`` solves its own metric's geodesic equation (second derivatives by forward
    mode, to 1e-12) and, off the square case where the two metrics' geodesics coincide, not the other
    metric's; its speed in the metric is constant."""
    for metric, other in (("canonical", "embedded"), ("embedded", "canonical")):
        M = gf.Stiefel(metric=metric)
        X = M.sample(shape, generator=generator, dtype=dtype)
        V = _tangent(M, X, generator)
        res = _geodesic_residuals(M, X, V)
        assert float(res[metric]) < 1e-12
        if min(shape[-2:]) < max(shape[-2:]):
            assert float(res[other]) > 1e-3
        for t in (0.3, 1.5):
            Y = M.expmap(X, t * V)
            Y1 = jvp(lambda s: M.expmap(X, s * V), (torch.tensor(t, dtype=F64),), (torch.tensor(1.0, dtype=F64),))[1]
            torch.testing.assert_close(M.inner(Y, Y1, Y1), M.inner(X, V, V), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_canonical_expmap_is_the_orbit_of_the_horizontal_generator(shape, dtype, generator):
    """``expmap(X, V) = matrix_exp(W) X`` with the n×n skew(-Hermitian) ``W = XΩXᴴ + CXᴴ − XCᴴ``
    (``Ω = XᴴV``, ``C = (I − XXᴴ)V``) built here with ``torch.linalg.matrix_exp``; ``WX = V``;
    ``retract`` is the same map (``triv="expm"``), the Cayley of ``W`` for ``triv="cayley"``."""
    X = CANONICAL.sample(shape, generator=generator, dtype=dtype)
    V = _tangent(CANONICAL, X, generator)
    Xt, Vt = _tall(X, V)
    n = Xt.shape[-2]
    Om = Xt.mH @ Vt
    C = Vt - Xt @ Om
    W = Xt @ Om @ Xt.mH + C @ Xt.mH - Xt @ C.mH
    torch.testing.assert_close(W @ Xt, Vt, atol=1e-12, rtol=0)
    want = torch.linalg.matrix_exp(W) @ Xt
    got = _tall(CANONICAL.expmap(X, V))[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(CANONICAL.retract(X, V), CANONICAL.expmap(X, V), atol=1e-12, rtol=1e-12)
    eye = torch.eye(n, dtype=dtype)
    cay = torch.linalg.solve(eye - W / 2, eye + W / 2) @ Xt
    got = _tall(gf.Stiefel(triv="cayley", metric="canonical").retract(X, V))[0]
    torch.testing.assert_close(got, cay, atol=1e-12, rtol=1e-12)
    assert member(gf.Stiefel(), CANONICAL.expmap(X, 3.0 * V), 1e-10)


def test_square_frames_canonical_is_half_the_embedded_metric(generator):
    """For n = k (all of O(n)) the canonical metric is half the embedded one: ``inner`` halves, the
    Riemannian gradient doubles, the geodesics are the same curves."""
    E = gf.Stiefel()
    X = E.sample((3, 4, 4), generator=generator, dtype=F64)
    U, V = _tangent(E, X, generator), _tangent(E, X, generator)
    G = torch.randn(X.shape, generator=generator, dtype=F64)
    torch.testing.assert_close(CANONICAL.inner(X, U, V), 0.5 * E.inner(X, U, V), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(CANONICAL.egrad_to_rgrad(X, G), 2 * E.egrad_to_rgrad(X, G), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(CANONICAL.expmap(X, V), E.expmap(X, V), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [F64, C128])
def test_the_canonical_metric(dtype, generator):
    """``inner`` weighs a tangent ``XΩ + C`` as ``‖Ω‖²/2 + ‖C‖²`` (the rotations inside the frame at
    half weight); ``egrad_to_rgrad(X, G) = G − XGᴴX`` is tangent and represents ``Re tr(GᴴV)``;
    ``tangent`` and ``transport`` do not depend on the metric."""
    X = CANONICAL.sample((2, 7, 3), generator=generator, dtype=dtype)
    V = _tangent(CANONICAL, X, generator)
    Om = X.mH @ V
    C = V - X @ Om
    want = 0.5 * (Om.abs() ** 2).sum((-2, -1)) + (C.abs() ** 2).sum((-2, -1))
    torch.testing.assert_close(CANONICAL.inner(X, V, V), want, atol=1e-13, rtol=1e-13)
    G = torch.randn(X.shape, generator=generator, dtype=dtype)
    R = CANONICAL.egrad_to_rgrad(X, G)
    torch.testing.assert_close(CANONICAL.tangent(X, R), R, atol=1e-13, rtol=0)
    torch.testing.assert_close(CANONICAL.inner(X, R, V), (G.conj() * V).real.sum((-2, -1)), atol=1e-12, rtol=1e-12)
    Y = CANONICAL.sample((2, 7, 3), generator=generator, dtype=dtype)
    torch.testing.assert_close(CANONICAL.transport(X, Y, V), gf.Stiefel().transport(X, Y, V), atol=0, rtol=0)
    torch.testing.assert_close(CANONICAL.tangent(X, G), gf.Stiefel().tangent(X, G), atol=0, rtol=0)


def _stiefel_loss(A, brockett=False):
    """``−tr(XᵀAX)`` (minimized by the top-k eigenspace of symmetric ``A``; constant for square frames)
    or Brockett's ``−tr(XᵀAXN)``, ``N = diag(1, …, k)`` (minimized by the top-k eigenvectors in order)."""
    def loss(X):
        d = (X.mT @ A @ X).diagonal(dim1=-2, dim2=-1)
        if brockett:
            d = d * torch.arange(1, d.shape[-1] + 1, dtype=d.dtype)
        return -d.sum()
    return loss


@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (5, 5)], ids=str)
def test_rsgd_on_the_canonical_metric_is_wen_yins_cayley_step(shape, generator):
    """``rsgd`` on ``Stiefel(triv="cayley", metric="canonical")`` is Wen & Yin's (2013) curvilinear
    step ``X⁺ = (I + η/2 A)⁻¹(I − η/2 A)X``, ``A = GXᵀ − XGᵀ`` (written here with an n×n solve, tall
    form), step for step over 5 steps; the embedded metric's step differs."""
    n = max(shape)
    A = torch.randn(n, n, generator=generator, dtype=F64)
    A = A + A.mT
    loss = _stiefel_loss(A, brockett=True)
    M = gf.Stiefel(triv="cayley", metric="canonical")
    X0 = M.sample(shape, generator=generator, dtype=F64)
    eta = 0.05
    opt = gf.optim.rsgd({"w": M}, lr=eta)
    params = {"w": X0}
    state = opt.init(params)
    ref = _tall(X0)[0]
    eye = torch.eye(n, dtype=F64)
    for _ in range(5):
        g = grad(lambda p: loss(_tall(p["w"])[0]))(params)
        params, state = opt.update(g, state, params)
        G = grad(loss)(ref)
        W = G @ ref.mT - ref @ G.mT
        ref = torch.linalg.solve(eye + eta / 2 * W, (eye - eta / 2 * W) @ ref)
        torch.testing.assert_close(_tall(params["w"])[0], ref, atol=1e-12, rtol=1e-12)
    emb = gf.optim.rsgd({"w": gf.Stiefel(triv="cayley")}, lr=eta)
    p_emb, _ = emb.update(grad(lambda p: loss(_tall(p["w"])[0]))({"w": X0}), emb.init({"w": X0}), {"w": X0})
    assert not torch.allclose(p_emb["w"], opt.update(grad(lambda p: loss(_tall(p["w"])[0]))({"w": X0}),
                                                      opt.init({"w": X0}), {"w": X0})[0]["w"], atol=1e-6)


@pytest.mark.parametrize("triv", ["expm", "cayley"])
@pytest.mark.parametrize("shape", [(8, 3), (3, 8), (5, 5)], ids=str)
def test_dynamic_trivialization_is_canonical_gradient_descent(shape, triv, generator):
    """One SGD step on the chart's raw tensor at ``Z = 0`` followed by ``rebase`` is one ``rsgd``
    step of the canonical metric with the same ``triv`` (the class docstring's claim): the chart's
    differential at 0 is the canonical metric's isometry onto the tangent space."""
    n = max(shape)
    A = torch.randn(n, n, generator=generator, dtype=F64)
    loss = _stiefel_loss(A + A.mT, brockett=True)
    M = gf.Stiefel(triv=triv, metric="canonical")
    X = M.sample(shape, generator=generator, dtype=F64)
    eta = 0.1
    Z, base = M.from_manifold(X)
    gZ = grad(lambda z: loss(_tall(M.to_manifold(z, base))[0]))(Z)
    _, X_triv = M.rebase(Z - eta * gZ, base)
    opt = gf.optim.rsgd({"w": M}, lr=eta)
    g = grad(lambda p: loss(_tall(p["w"])[0]))({"w": X})
    X_rgd = opt.update(g, opt.init({"w": X}), {"w": X})[0]["w"]
    torch.testing.assert_close(X_triv, X_rgd, atol=1e-12, rtol=1e-12)


def test_riemannian_optimizers_descend_on_the_canonical_metric(generator):
    """``radam`` and ``rsgd`` with momentum on the canonical metric reach the top-3 eigenspace of a
    symmetric matrix (the trace of the projected matrix within 1e-6 of the sum of the top 3
    eigenvalues), on the manifold throughout; the adaptive scale reads the canonical norm."""
    A = torch.randn(12, 12, generator=generator, dtype=F64)
    A = A + A.mT
    loss = _stiefel_loss(A)
    best = torch.linalg.eigvalsh(A)[-3:].sum()
    for M in (CANONICAL, gf.Stiefel(triv="cayley", metric="canonical")):
        for opt in (gf.optim.radam({"w": M}, lr=0.05), gf.optim.rsgd({"w": M}, lr=0.01, momentum=0.9)):
            params = {"w": M.sample((12, 3), generator=generator, dtype=F64)}
            state = opt.init(params)
            for _ in range(600):
                params, state = opt.update(grad(lambda p: loss(p["w"]))(params), state, params)
            assert member(gf.Stiefel(), params["w"], 1e-10)
            assert abs(float(-loss(params["w"]) - best)) < 1e-6


geoopt = pytest.importorskip("geoopt")


@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 5)], ids=str)
def test_geoopt_canonical_stiefel(shape, generator):
    """Against ``geoopt.Stiefel()`` (``CanonicalStiefel``): ``inner`` and ``egrad2rgrad`` equal to
    rounding. Its retraction ``retr(x, u)`` is the Cayley of ``A = uxᵀ − xuᵀ``, which is ours at
    ``u + xxᵀu`` (equal to rounding): the rotations inside the frame taken twice, so it is not first
    order on tangent vectors with ``xᵀu ≠ 0`` (its velocity is ``u + xxᵀu``; ours is ``u``), and
    trajectories differ (README: From geoopt)."""
    theirs = geoopt.Stiefel()
    assert isinstance(theirs, geoopt.CanonicalStiefel)
    X = CANONICAL.sample(shape, generator=generator, dtype=F64)
    U, V = _tangent(CANONICAL, X, generator), _tangent(CANONICAL, X, generator)
    G = torch.randn(shape, generator=generator, dtype=F64)
    torch.testing.assert_close(CANONICAL.inner(X, U, V), theirs.inner(X, U, V), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(CANONICAL.egrad_to_rgrad(X, G), theirs.egrad2rgrad(X, G), atol=1e-13, rtol=1e-13)
    cay = gf.Stiefel(triv="cayley", metric="canonical")
    torch.testing.assert_close(theirs.retr(X, U), cay.retract(X, U + X @ (X.mT @ U)), atol=1e-12, rtol=1e-12)
    t = 1e-6
    ours_velocity = (cay.retract(X, t * U) - cay.retract(X, -t * U)) / (2 * t)
    their_velocity = (theirs.retr(X, t * U) - theirs.retr(X, -t * U)) / (2 * t)
    torch.testing.assert_close(ours_velocity, U, atol=1e-8, rtol=0)
    torch.testing.assert_close(their_velocity, U + X @ (X.mT @ U), atol=1e-8, rtol=0)


def test_metric_errors_and_repr():
    """A metric other than the two is a ``ManifoldError`` naming both; the default is left out of
    the repr (reprs of existing models are unchanged); the metric is part of the space's identity."""
    with pytest.raises(gf.ManifoldError, match="'embedded', 'canonical'"):
        gf.Stiefel(metric="euclidean")
    assert repr(gf.Stiefel()) == "Stiefel(triv='expm')"
    assert repr(CANONICAL) == "Stiefel(triv='expm', metric='canonical')"
    assert CANONICAL != gf.Stiefel() and CANONICAL == gf.Stiefel(metric="canonical")
    with pytest.raises(gf.ManifoldError, match="logmap"):
        CANONICAL.logmap(CANONICAL.sample((4, 2)), CANONICAL.sample((4, 2)))
