"""geofunc against geoopt 0.5 where the two define the same space (docs/guide/migration-geoopt.md):
the maps, the optimizers step for step, and the page's before/after program. float64, to rounding.
(The hyperbolic spaces' maps: tests/test_hyperbolic.py; the sphere's geodesics:
tests/test_sphere_geodesics.py.)"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from reference import member
from torch.func import grad

import geofunc as gf

geoopt = pytest.importorskip("geoopt", reason="the parity tests need geoopt (pip install -e .[bench])")
# geoopt compiles some of its functions with torch.jit.script on first use, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
PAGE = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "guide" / "migration-geoopt.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, re.S)
TOL = 1e-12


@pytest.mark.parametrize("pair", [0, 1], ids=["functional", "module"])
def test_the_pages_programs_before_and_after_give_the_same_points(pair):
    """The page's two programs (a functional one, an ``nn.Module`` with ``TorchOptimizer``), each
    before (geoopt) and after (geofunc): the same points."""
    assert len(BLOCKS) == 4 and all(("geoopt" in b) == (i % 2 == 0) for i, b in enumerate(BLOCKS))
    results = []
    for i in (2 * pair, 2 * pair + 1):
        namespace: dict = {"__name__": f"geoopt_migration_block{i}"}
        exec(compile(BLOCKS[i], f"docs/guide/migration-geoopt.md block {i}", "exec"), namespace)
        results.append(namespace["result"])
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=TOL, rtol=0)
    if pair == 0:
        assert member(gf.Stiefel(), results[1]["W"]) and member(gf.Sphere(), results[1]["s"])
    else:
        assert member(gf.Stiefel(), results[1]["weight"])


MAPS = [  # (geofunc space, geoopt manifold, shape)
    (gf.Stiefel(), geoopt.EuclideanStiefel(), (6, 3)),
    (gf.Stiefel(), geoopt.EuclideanStiefel(), (2, 5, 5)),
    (gf.Sphere(), geoopt.Sphere(), (3, 5)),
    (gf.Rn(), geoopt.Euclidean(ndim=0), (4,)),
]


@pytest.mark.parametrize("space, manifold, shape", MAPS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_the_maps_equal_geoopts(space, manifold, shape, generator):
    X = space.sample(shape, generator=generator, dtype=F64)
    G = torch.randn(shape, generator=generator, dtype=F64)
    U = space.tangent(X, torch.randn(shape, generator=generator, dtype=F64))
    V = space.tangent(X, torch.randn(shape, generator=generator, dtype=F64))
    Y = space.retract(X, 0.3 * U)
    pairs = {
        "project": (space.project(X + 0.1 * G), manifold.projx(X + 0.1 * G)),
        "tangent": (space.tangent(X, G), manifold.proju(X, G)),
        "egrad_to_rgrad": (space.egrad_to_rgrad(X, G), manifold.egrad2rgrad(X, G)),
        "retract": (space.retract(X, 0.3 * U), manifold.retr(X, 0.3 * U)),
        "transport": (space.transport(X, Y, V), manifold.transp(X, Y, V)),
        "inner": (space.inner(X, U, V), manifold.inner(X, U, V)),
    }
    for name, (ours, theirs) in pairs.items():
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=TOL, rtol=0, msg=name)


def test_the_other_shared_maps(generator):
    """PSD's projection is the SPD manifold's near the cone (their metrics differ; on an indefinite
    matrix geoopt's reflects the negative eigenvalues, ``|λ|``, where the nearest point clamps them);
    Birkhoff's Riemannian gradient is the Birkhoff polytope's."""
    P = gf.PSD().sample((4, 4), generator=generator, dtype=F64)
    Y = P + 0.01 * torch.randn(4, 4, generator=generator, dtype=F64)  # not symmetric
    torch.testing.assert_close(gf.PSD().project(Y), geoopt.SymmetricPositiveDefinite().projx(Y), atol=1e-10, rtol=0)
    D = torch.diag(torch.tensor([-1.0, 2.0], dtype=F64))
    torch.testing.assert_close(geoopt.SymmetricPositiveDefinite().projx(D), D.abs())
    assert float(gf.PSD().project(D)[0, 0]) < 1e-7  # the nearest point of the open cone: the floor
    B = gf.Birkhoff()
    X = B.sample((4, 4), generator=generator, dtype=F64)
    G = torch.randn(4, 4, generator=generator, dtype=F64)
    torch.testing.assert_close(B.egrad_to_rgrad(X, G), geoopt.BirkhoffPolytope().egrad2rgrad(X, G), atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 3)])
def test_the_affine_invariant_psd_is_geoopts_spd(shape, generator):
    """``PSD(metric="affine")`` and geoopt's ``SymmetricPositiveDefinite()`` (its default metric, AIM):
    every map of the metric (geoopt's ``retr`` is ``X + V + ½VX⁻¹V``, ``retract`` that point, projected
    only where it is below the value floor), ``expmap``, ``logmap``, ``dist``, the parallel transport."""
    space, manifold = gf.PSD(metric="affine"), geoopt.SymmetricPositiveDefinite()
    X, Y = (space.sample(shape, generator=generator, dtype=F64) for _ in range(2))
    G = torch.randn(shape, generator=generator, dtype=F64)
    U, V = (space.tangent(X, torch.randn(shape, generator=generator, dtype=F64)) for _ in range(2))
    pairs = {
        "tangent": (space.tangent(X, G), manifold.proju(X, G)),
        "egrad_to_rgrad": (space.egrad_to_rgrad(X, G), manifold.egrad2rgrad(X, G)),
        "inner": (space.inner(X, U, V), manifold.inner(X, U, V)),
        "retract": (space.retract(X, U), manifold.retr(X, U)),
        "expmap": (space.expmap(X, U), manifold.expmap(X, U)),
        "logmap": (space.logmap(X, Y), manifold.logmap(X, Y)),
        "dist": (space.dist(X, Y), manifold.dist(X, Y)),
        "transport": (space.transport(X, Y, V), manifold.transp(X, Y, V)),
    }
    for name, (ours, theirs) in pairs.items():
        torch.testing.assert_close(ours, theirs, atol=1e-11, rtol=1e-11, msg=name)


def _race(constraints, manifolds, params, loss, ours, theirs, steps=25, state=None):
    p, s = params, (ours.init(params) if state is None else state)
    P = {k: geoopt.ManifoldParameter(v.clone(), manifold=manifolds[k]) for k, v in params.items()}
    opt = theirs(list(P.values()))
    for _ in range(steps):
        p, s = ours.update(grad(loss)(p), s, p)
        opt.zero_grad()
        loss(P).backward()
        opt.step()
        for k in p:
            torch.testing.assert_close(p[k], P[k].detach(), atol=TOL, rtol=0)


def _mixed(generator):
    c = {"w": gf.Stiefel(), "s": gf.Sphere(), "b": None}
    params = gf.sample(c, {"w": torch.empty(6, 3, dtype=F64), "s": torch.empty(2, 4, dtype=F64),
                           "b": torch.randn(3, generator=generator, dtype=F64)}, generator=generator)
    T = {k: torch.randn(v.shape, generator=generator, dtype=F64) for k, v in params.items()}

    def loss(p):
        return sum(((p[k] - T[k]) ** 2).sum() + torch.sin(3 * p[k]).sum() for k in p)

    return c, {"w": geoopt.EuclideanStiefel(), "s": geoopt.Sphere(), "b": geoopt.Euclidean()}, params, loss


@pytest.mark.parametrize("kwargs", [dict(lr=0.05), dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                                    dict(lr=0.05, betas=(0.9, 0.6), amsgrad=True)], ids=["default", "custom", "amsgrad"])
def test_radam_equals_riemannian_adam(kwargs, generator):
    c, m, params, loss = _mixed(generator)
    _race(c, m, params, loss, gf.optim.radam(c, **kwargs), lambda ps: geoopt.optim.RiemannianAdam(ps, **kwargs))
    if kwargs.get("amsgrad"):  # the running maximum changes the steps here
        with pytest.raises(AssertionError):
            _race(c, m, params, loss, gf.optim.radam(c, **kwargs),
                  lambda ps: geoopt.optim.RiemannianAdam(ps, **{**kwargs, "amsgrad": False}))


@pytest.mark.parametrize("optimizer", ["rsgd", "radam"])
def test_optimizers_on_the_affine_invariant_psd_equal_geoopts(optimizer, generator):
    """On ``PSD(metric="affine")`` the optimizers step as geoopt's on ``SymmetricPositiveDefinite()``:
    the Riemannian gradient ``X sym(G) X``, Adam's second moment in the metric, the retraction and the
    parallel transport of the moments (with a free entry beside it)."""
    c = {"P": gf.PSD(metric="affine"), "b": None}
    params = {"P": gf.PSD().sample((2, 3, 3), generator=generator, dtype=F64), "b": torch.randn(3, generator=generator, dtype=F64)}
    T = gf.PSD().sample((2, 3, 3), generator=generator, dtype=F64)

    def loss(p):
        return ((p["P"] - T) ** 2).sum() + 0.1 * torch.logdet(p["P"]).sum() + (torch.sin(p["b"]) ** 2).sum()

    kwargs = dict(lr=0.05) if optimizer == "radam" else dict(lr=0.02, momentum=0.5)
    ours = getattr(gf.optim, optimizer)(c, **kwargs)
    theirs = {"rsgd": geoopt.optim.RiemannianSGD, "radam": geoopt.optim.RiemannianAdam}[optimizer]
    state = ours.init(params)
    if optimizer == "rsgd":  # geoopt's first momentum buffer is the raw gradient (see the momentum test below)
        trace = state[2]
        state = (*state[:2], trace._replace(trace=grad(loss)(params)), *state[3:])
    _race(c, {"P": geoopt.SymmetricPositiveDefinite(), "b": geoopt.Euclidean()}, params, loss, ours,
          lambda ps: theirs(ps, **kwargs), state=state)
    with pytest.raises(AssertionError):  # the embedded metric's steps are others
        _race(c, {"P": geoopt.SymmetricPositiveDefinite(), "b": geoopt.Euclidean()}, params, loss,
              getattr(gf.optim, optimizer)({"P": gf.PSD(), "b": None}, **kwargs), lambda ps: theirs(ps, **kwargs))


def test_rsgd_equals_riemannian_sgd(generator):
    c, m, params, loss = _mixed(generator)
    kwargs = dict(lr=0.03, weight_decay=0.05)
    _race(c, m, params, loss, gf.optim.rsgd(c, **kwargs), lambda ps: geoopt.optim.RiemannianSGD(ps, **kwargs))


@pytest.mark.parametrize("nesterov", [False, True])
def test_rsgd_momentum_differs_from_geoopts_only_by_its_first_buffer(nesterov, generator):
    """geoopt starts the momentum buffer at the raw Euclidean gradient (torch at the first gradient):
    with that initial buffer the two are equal step for step (the migration page's note)."""
    c, m, params, loss = _mixed(generator)
    kwargs = dict(lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    opt = gf.optim.rsgd(c, **kwargs)
    state = opt.init(params)
    trace = state[2]
    assert isinstance(trace, gf.optim.TraceState)
    state = (*state[:2], trace._replace(trace=grad(loss)(params)), *state[3:])
    _race(c, m, params, loss, opt, lambda ps: geoopt.optim.RiemannianSGD(ps, **kwargs), state=state)
    with pytest.raises(AssertionError):  # from the optimizer's own initial state they differ
        _race(c, m, params, loss, opt, lambda ps: geoopt.optim.RiemannianSGD(ps, **kwargs))


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_rsgd_momentum_with_geoopts_first_buffer_on_the_poincare_ball_and_with_dampening(dampening, generator):
    """The migration page's momentum note: given geoopt's first buffer (the raw gradient) ``rsgd``
    steps as ``RiemannianSGD`` on free entries, the sphere, Stiefel and the Poincaré ball; with
    dampening ``τ ≠ 0`` geoopt dampens its first gradient too (torch's first step does not), so the
    state's count must say that a step was made (count 1): with count 0 the runs part."""
    c, m, params, mixed_loss = _mixed(generator)
    c, m = {**c, "h": gf.PoincareBall(c=0.7)}, {**m, "h": geoopt.PoincareBallExact(c=torch.tensor(0.7, dtype=F64))}
    params = {**params, "h": 0.5 * gf.PoincareBall(c=0.7).sample((3, 3), generator=generator, dtype=F64)}
    T = 0.3 * torch.randn(3, 3, generator=generator, dtype=F64)

    def loss(p):
        return mixed_loss({k: v for k, v in p.items() if k != "h"}) + ((p["h"] - T) ** 2).sum() + torch.sin(3 * p["h"]).sum()

    kwargs = dict(lr=0.02, momentum=0.9, dampening=dampening, weight_decay=0.01)
    opt = gf.optim.rsgd(c, **kwargs)
    state = opt.init(params)
    trace = state[2]._replace(trace=grad(loss)(params))
    counted = (*state[:2], trace._replace(count=torch.ones_like(trace.count)), *state[3:])
    _race(c, m, params, loss, opt, lambda ps: geoopt.optim.RiemannianSGD(ps, **kwargs), state=counted if dampening else
          (*state[:2], trace, *state[3:]))
    if dampening:
        with pytest.raises(AssertionError):
            _race(c, m, params, loss, opt, lambda ps: geoopt.optim.RiemannianSGD(ps, **kwargs),
                  state=(*state[:2], trace, *state[3:]))


@pytest.mark.parametrize("name", ["poincare", "lorentz"])
@pytest.mark.parametrize("optimizer", ["rsgd", "radam"])
def test_hyperbolic_optimizers_equal_geoopts(name, optimizer, generator):
    """geofunc's retraction on the hyperbolic spaces is the exponential map: geoopt's
    ``PoincareBallExact`` (and ``Lorentz``, whose retraction is its exponential map)."""
    if name == "poincare":
        space, manifold = gf.PoincareBall(), geoopt.PoincareBallExact(c=torch.tensor(1.0, dtype=F64))
        X = 0.3 * space.sample((5, 3), generator=generator, dtype=F64)
    else:
        space, manifold = gf.Lorentz(), geoopt.Lorentz(k=torch.tensor(1.0, dtype=F64))
        X = space.sample((5, 3), generator=generator, dtype=F64)
    T = 0.2 * torch.randn(X.shape, generator=generator, dtype=F64)

    def loss(p):
        return ((p["h"] - T) ** 2).sum()

    kwargs = dict(lr=0.05)
    ours = getattr(gf.optim, optimizer)({"h": space}, **kwargs)
    theirs = {"rsgd": geoopt.optim.RiemannianSGD, "radam": geoopt.optim.RiemannianAdam}[optimizer]
    _race({"h": space}, {"h": manifold}, {"h": X}, loss, ours, lambda ps: theirs(ps, **kwargs), steps=10)


def test_proju_of_canonical_stiefel_and_birkhoff_is_their_riemannian_gradient(generator):
    """geoopt's ``proju`` on ``CanonicalStiefel`` (its default ``Stiefel()``) and ``BirkhoffPolytope`` is
    their ``egrad2rgrad``, which moves tangent vectors (not a projection); ``tangent`` is the
    orthogonal projection (idempotent, the identity on tangent vectors), so geoopt's ``proju`` ports
    to ``egrad_to_rgrad`` there (the migration page's Names table). Birkhoff's ``inner`` is ``n``
    times geoopt's, and geoopt's ``transp(x, y, v)`` is ``egrad_to_rgrad(Y, V)``."""
    for space, manifold, shape in ((gf.Stiefel(metric="canonical"), geoopt.CanonicalStiefel(), (2, 6, 3)),
                                   (gf.Birkhoff(), geoopt.BirkhoffPolytope(), (2, 4, 4))):
        X, Y = (space.sample(shape, generator=generator, dtype=F64) for _ in range(2))
        G = torch.randn(shape, generator=generator, dtype=F64)
        P = space.tangent(X, G)
        torch.testing.assert_close(space.tangent(X, P), P, atol=TOL, rtol=0)  # a projection
        torch.testing.assert_close(((G - P) * P).sum((-2, -1)), torch.zeros(2, dtype=F64), atol=TOL, rtol=0)  # orthogonal
        torch.testing.assert_close(manifold.proju(X, G), space.egrad_to_rgrad(X, G), atol=TOL, rtol=0)
        assert float((manifold.proju(X, P) - P).abs().max()) > 1e-2  # geoopt's moves a tangent vector
        if isinstance(space, gf.Birkhoff):
            U, V = (space.egrad_to_rgrad(X, torch.randn(shape, generator=generator, dtype=F64)) for _ in range(2))
            torch.testing.assert_close(space.inner(X, U, V), shape[-1] * manifold.inner(X, U, V), atol=TOL, rtol=TOL)
            torch.testing.assert_close(manifold.transp(X, Y, V), space.egrad_to_rgrad(Y, V), atol=TOL, rtol=0)


def test_stereographic_and_euclidean_stiefel_exact_as_the_adapter_maps_them(generator):
    """``geofunc.contrib.geoopt`` maps ``Stereographic(k < 0)`` to ``PoincareBall(c=−k)``: every map of
    the metric equals geoopt's (its ``retr`` is first order, ours the exponential map), and
    ``EuclideanStiefelExact`` to ``Stiefel()``, whose ``expmap`` is geoopt's ``retr`` there."""
    contrib = pytest.importorskip("geofunc.contrib.geoopt")
    manifold = geoopt.Stereographic(k=torch.tensor(-2.0, dtype=F64))
    ball = contrib.space_of(manifold)
    assert ball == gf.PoincareBall(c=2.0)
    x, y = (0.6 / 2**0.5 * gf.Sphere().sample((3, 4), generator=generator, dtype=F64) for _ in range(2))
    u = 0.3 * torch.randn(3, 4, generator=generator, dtype=F64)  # steps inside geoopt's clamp of the boundary
    pairs = {"expmap": (ball.expmap(x, u), manifold.expmap(x, u)), "logmap": (ball.logmap(x, y), manifold.logmap(x, y)),
             "dist": (ball.dist(x, y), manifold.dist(x, y)), "egrad_to_rgrad": (ball.egrad_to_rgrad(x, u), manifold.egrad2rgrad(x, u)),
             "inner": (ball.inner(x, u, u), manifold.inner(x, u, u, keepdim=True).squeeze(-1)),
             "transport": (ball.transport(x, y, u), manifold.transp(x, y, u))}
    for name, (ours, theirs) in pairs.items():
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12, msg=name)
    assert member(ball, ball.retract(x, u))
    exact = geoopt.EuclideanStiefelExact()
    assert contrib.space_of(exact) == gf.Stiefel()
    St = gf.Stiefel()
    X = St.sample((6, 3), generator=generator, dtype=F64)
    U = St.tangent(X, torch.randn(6, 3, generator=generator, dtype=F64))
    torch.testing.assert_close(exact.retr(X, U), St.expmap(X, U), atol=1e-12, rtol=0)
    assert member(St, St.expmap(X, U))


def test_a_product_with_a_euclidean_vector_factor_converts_to_geoopts(generator):
    """``Product(Sphere(), Rn())`` reads the ``Rn`` factor per entry (README Deviations, ``Rn`` judges
    each entry): on a ``(4,)`` sphere point and a ``(7,)`` vector it is a batch of 7 points of S³ × ℝ,
    and geoopt's ``ProductManifold((Sphere(), 4), (Euclidean(ndim=1), 7))`` (one point of S³ × ℝ⁷)
    is the sphere's ``inner`` plus the ``Rn`` factor's summed over its last dim (``dist``: the root of
    the sum of the ``sqdist`` s so summed). The factor-wise maps equal geoopt's as they are."""
    P = gf.Product(gf.Sphere(), gf.Rn())
    M = geoopt.ProductManifold((geoopt.SphereExact(), 4), (geoopt.Euclidean(ndim=1), 7))
    X, Y = ((gf.Sphere().sample((4,), generator=generator, dtype=F64), torch.randn(7, generator=generator, dtype=F64))
            for _ in range(2))
    U, V = (P.tangent(X, (torch.randn(4, generator=generator, dtype=F64), torch.randn(7, generator=generator, dtype=F64)))
            for _ in range(2))
    ours = P.inner(X, U, V)
    assert ours.shape == (7,)  # a batch of 7 points of S³ × ℝ
    torch.testing.assert_close(ours, gf.Sphere().inner(X[0], U[0], V[0]) + U[1] * V[1], atol=TOL, rtol=0)
    theirs = M.inner(M.pack_point(*X), M.pack_point(*U), M.pack_point(*V))
    converted = gf.Sphere().inner(X[0], U[0], V[0]) + gf.Rn().inner(X[1], U[1], V[1]).sum(-1)
    torch.testing.assert_close(converted, theirs, atol=TOL, rtol=0)
    sq = gf.Sphere().sqdist(X[0], Y[0]) + gf.Rn().sqdist(X[1], Y[1]).sum(-1)
    torch.testing.assert_close(sq.sqrt(), M.dist(M.pack_point(*X), M.pack_point(*Y)), atol=TOL, rtol=0)
    for ours_t, theirs_t in ((P.expmap(X, U), M.expmap(M.pack_point(*X), M.pack_point(*U))),
                             (P.logmap(X, Y), M.logmap(M.pack_point(*X), M.pack_point(*Y))),
                             (P.transport(X, Y, V), M.transp(M.pack_point(*X), M.pack_point(*Y), M.pack_point(*V)))):
        torch.testing.assert_close(M.pack_point(*ours_t), theirs_t, atol=TOL, rtol=0)
