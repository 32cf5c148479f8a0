"""geofunc.hyperbolic, PoincareBall and Lorentz: the maths, geoopt references, the float32 boundary.

Float64 identities and references are held to 1e-10 (closed forms, rounding only). The float32
near-boundary tests compare with the exact distance *of the same float32 inputs*, computed in
float64 from the arcosh form (which has no cancellation there), at relative 1e-5: float32
rounding of the result plus the float32 arithmetic after the float64 gap (measured worst case
1e-7 over 120 pairs at c‖x‖² = 1 − 1e-5 and 1 − 1e-6).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import geofunc as gf
from reference import member
from geofunc import hyperbolic as hyp

F64 = torch.float64
F32 = torch.float32
TIGHT = 1e-10  # float64 closed forms and identities


def _ball_points(shape, c, generator, radius=0.6, dtype=F64):
    """Points of norm ≤ radius/√c (well inside: where geoopt's float clamps are inactive)."""
    x = torch.randn(shape, generator=generator, dtype=F64)
    r = radius * torch.rand(shape[:-1] + (1,), generator=generator, dtype=F64)
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True) * r / math.sqrt(c)).to(dtype)


def _close(a, b, tol=TIGHT):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------- references vs geoopt
geoopt = pytest.importorskip("geoopt", reason="the reference tests need geoopt (pip install -e .[bench])")
from geoopt.manifolds.lorentz import math as lmath  # noqa: E402
from geoopt.manifolds.stereographic import math as smath  # noqa: E402


@pytest.mark.parametrize("c", [1.0, 0.3, 2.5])
def test_poincare_functions_equal_geoopt(c, generator):
    k = torch.tensor(-c, dtype=F64)
    x, y = _ball_points((7, 4), c, generator), _ball_points((7, 4), c, generator)
    v, a = torch.randn(7, 4, generator=generator, dtype=F64), torch.randn(7, 4, generator=generator, dtype=F64)
    M = torch.randn(7, 3, 4, generator=generator, dtype=F64)
    r = torch.randn(7, generator=generator, dtype=F64)
    _close(hyp.mobius_add(x, y, c=c), smath.mobius_add(x, y, k=k))
    _close(hyp.mobius_scalar_mul(r, x, c=c), smath.mobius_scalar_mul(r[:, None], x, k=k))
    _close(hyp.mobius_matvec(M, x, c=c), smath.mobius_matvec(M, x, k=k))
    _close(hyp.gyration(x, y, v, c=c), smath.gyration(x, y, v, k=k))
    _close(hyp.dist(x, y, c=c), smath.dist(x, y, k=k))
    _close(hyp.expmap(x, 0.3 * v, c=c), smath.expmap(x, 0.3 * v, k=k))
    _close(hyp.logmap(x, y, c=c), smath.logmap(x, y, k=k))
    _close(hyp.expmap0(v, c=c), smath.expmap0(v, k=k))
    _close(hyp.logmap0(y, c=c), smath.logmap0(y, k=k))
    _close(hyp.parallel_transport(x, y, v, c=c), smath.parallel_transport(x, y, v, k=k))
    _close(hyp.conformal_factor(x, c=c), smath.lambda_x(x, k=k, keepdim=True))
    for signed in (False, True):
        _close(hyp.dist2plane(x, y, a, c=c, signed=signed), smath.dist2plane(x, y, a, k=k, signed=signed))
    xs = _ball_points((3, 5, 4), c, generator)
    w = torch.rand(3, 5, generator=generator, dtype=F64)
    _close(hyp.weighted_midpoint(xs, w, c=c), smath.weighted_midpoint(xs, w, k=k, reducedim=[-2]))


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_poincare_ball_space_equals_geoopt(c, generator):
    B, R = gf.PoincareBall(c=c), geoopt.PoincareBall(c=torch.tensor(c, dtype=F64))  # geoopt's default c is float32
    x, y = _ball_points((6, 3), c, generator), _ball_points((6, 3), c, generator)
    G, U, V = (torch.randn(6, 3, generator=generator, dtype=F64) for _ in range(3))
    _close(B.egrad_to_rgrad(x, G), R.egrad2rgrad(x, G))
    _close(B.inner(x, U, V), R.inner(x, U, V, keepdim=True).squeeze(-1))  # (geoopt broadcasts λ without keepdim)
    _close(B.expmap(x, 0.3 * U), R.expmap(x, 0.3 * U))
    _close(B.retract(x, 0.3 * U), R.expmap(x, 0.3 * U))
    _close(B.logmap(x, y), R.logmap(x, y))
    _close(B.dist(x, y), R.dist(x, y))
    _close(B.transport(x, y, V), R.transp(x, y, V))


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_lorentz_space_equals_geoopt(k, generator):
    H, R = gf.Lorentz(k=k), geoopt.Lorentz(k=torch.tensor(k, dtype=F64))
    kt = torch.tensor(k, dtype=F64)
    x, y = H.sample((6, 4), generator=generator, dtype=F64), H.sample((6, 4), generator=generator, dtype=F64)
    G = torch.randn(6, 4, generator=generator, dtype=F64)
    U, V = H.tangent(x, torch.randn(6, 4, generator=generator, dtype=F64)), H.tangent(x, G)
    _close(H.dist(x, y), lmath.dist(x, y, k=kt))
    _close(H.expmap(x, 0.5 * U), lmath.expmap(x, 0.5 * U, k=kt))
    _close(H.logmap(x, y), lmath.logmap(x, y, k=kt))
    _close(H.egrad_to_rgrad(x, G), R.egrad2rgrad(x, G))
    _close(H.inner(x, U, V), R.inner(x, U, V))
    _close(H.transport(x, y, U), R.transp(x, y, U))
    _close(H.project(G), R.projx(G))
    # tangent is the Euclidean projection onto T_x, geoopt's proju the Minkowski one (README, migration
    # guide): both tangent, equal on tangent vectors, different elsewhere
    mink = lambda a, b: (a[..., 1:] * b[..., 1:]).sum(-1) - a[..., 0] * b[..., 0]  # noqa: E731
    T, P = H.tangent(x, G), R.proju(x, G)
    assert float(mink(x, T).abs().max()) < 1e-10 and float(mink(x, P).abs().max()) < 1e-10
    assert float((T - P).abs().max()) > 1e-2
    _close(H.tangent(x, U), R.proju(x, U))


# ------------------------------------------------------------------------ identities
def test_mobius_gyrogroup_identities(generator):
    c = 0.7
    x, y, z = (_ball_points((5, 3), c, generator) for _ in range(3))
    zero = torch.zeros_like(x)
    _close(hyp.mobius_add(x, zero, c=c), x)
    _close(hyp.mobius_add(zero, x, c=c), x)
    _close(hyp.mobius_add(-x, x, c=c), zero)
    _close(hyp.mobius_add(-x, hyp.mobius_add(x, y, c=c), c=c), y)  # left cancellation
    # gyrocommutativity: x ⊕ y = gyr[x, y](y ⊕ x); the gyration is an isometry
    _close(hyp.mobius_add(x, y, c=c), hyp.gyration(x, y, hyp.mobius_add(y, x, c=c), c=c))
    g = hyp.gyration(x, y, z, c=c)
    _close(torch.linalg.vector_norm(g, dim=-1), torch.linalg.vector_norm(z, dim=-1))
    # scalar multiplication: 1 ⊗ x = x, (r + s) ⊗ x = (r ⊗ x) ⊕ (s ⊗ x), r ⊗ (s ⊗ x) = (rs) ⊗ x
    _close(hyp.mobius_scalar_mul(1.0, x, c=c), x)
    lhs = hyp.mobius_scalar_mul(0.7 + 1.6, x, c=c)
    _close(lhs, hyp.mobius_add(hyp.mobius_scalar_mul(0.7, x, c=c), hyp.mobius_scalar_mul(1.6, x, c=c), c=c))
    _close(hyp.mobius_scalar_mul(0.5, hyp.mobius_scalar_mul(3.0, x, c=c), c=c), hyp.mobius_scalar_mul(1.5, x, c=c))
    # matvec: (MN) ⊗ x = M ⊗ (N ⊗ x); I ⊗ x = x; M ⊗ x = r ⊗ x for M = rI
    M, N = torch.randn(3, 3, generator=generator, dtype=F64), torch.randn(3, 3, generator=generator, dtype=F64)
    _close(hyp.mobius_matvec(M @ N, x, c=c), hyp.mobius_matvec(M, hyp.mobius_matvec(N, x, c=c), c=c))
    _close(hyp.mobius_matvec(torch.eye(3, dtype=F64), x, c=c), x)
    _close(hyp.mobius_matvec(2.5 * torch.eye(3, dtype=F64), x, c=c), hyp.mobius_scalar_mul(2.5, x, c=c))
    # the distance is gyro-translation invariant: d(z ⊕ x, z ⊕ y) = d(x, y)
    _close(hyp.dist(hyp.mobius_add(z, x, c=c), hyp.mobius_add(z, y, c=c), c=c), hyp.dist(x, y, c=c))


def test_exp_log_dist_transport_identities(generator):
    c = 1.3
    x, y = _ball_points((6, 4), c, generator), _ball_points((6, 4), c, generator)
    v, w = torch.randn(6, 4, generator=generator, dtype=F64), torch.randn(6, 4, generator=generator, dtype=F64)
    lam = hyp.conformal_factor(x, c=c)
    _close(hyp.expmap(x, hyp.logmap(x, y, c=c), c=c), y)
    u = 0.2 * v
    _close(hyp.logmap(x, hyp.expmap(x, u, c=c), c=c), u)
    _close(hyp.dist(x, hyp.expmap(x, u, c=c), c=c), (lam * torch.linalg.vector_norm(u, dim=-1, keepdim=True)).squeeze(-1))
    _close(hyp.expmap(torch.zeros_like(v), v, c=c), hyp.expmap0(v, c=c))
    _close(hyp.logmap(torch.zeros_like(y), y, c=c), hyp.logmap0(y, c=c))
    _close(hyp.dist(x, y, c=c), hyp.dist(y, x, c=c))
    # parallel transport is an isometry for λ²⟨·,·⟩, and transports log_x(y) to −log_y(x)
    P = hyp.parallel_transport(x, y, v, c=c)
    Q = hyp.parallel_transport(x, y, w, c=c)
    lam_y = hyp.conformal_factor(y, c=c)
    _close(lam_y**2 * (P * Q).sum(-1, keepdim=True), lam**2 * (v * w).sum(-1, keepdim=True))
    _close(hyp.parallel_transport(x, y, hyp.logmap(x, y, c=c), c=c), -hyp.logmap(y, x, c=c))
    _close(hyp.parallel_transport(x, x, v, c=c), v)


def test_weighted_midpoint_of_two_points_is_the_geodesic_midpoint(generator):
    c = 0.8
    x, y = _ball_points((5, 3), c, generator), _ball_points((5, 3), c, generator)
    m = hyp.weighted_midpoint(torch.stack([x, y], dim=-2), c=c)
    _close(hyp.dist(x, m, c=c), hyp.dist(m, y, c=c))
    _close(hyp.dist(x, m, c=c), 0.5 * hyp.dist(x, y, c=c))
    # equivariance under a gyrotranslation z ⊕ ·
    z = _ball_points((5, 3), c, generator)
    xs = torch.stack([x, y, z], dim=-2)
    w = torch.rand(5, 3, generator=generator, dtype=F64)
    moved = hyp.mobius_add(z.unsqueeze(-2).expand_as(xs), xs, c=c)
    _close(hyp.weighted_midpoint(moved, w, c=c), hyp.mobius_add(z, hyp.weighted_midpoint(xs, w, c=c), c=c))


def test_dist2plane_is_the_distance_to_the_nearest_point_of_the_plane(generator):
    # In the disk (n = 2) the gyroplane through p with normal a is the geodesic through p
    # in the direction a⊥: minimise d(x, exp_p(t a⊥)) over t on a fine grid, then refine.
    c = 1.0
    p, x = _ball_points((2,), c, generator), _ball_points((2,), c, generator)
    a = torch.randn(2, generator=generator, dtype=F64)
    perp = torch.stack([-a[1], a[0]])
    ts = torch.linspace(-8.0, 8.0, 20001, dtype=F64)
    line = hyp.expmap(p.expand(len(ts), 2), ts[:, None] * perp / hyp.conformal_factor(p, c=c), c=c)
    d_line = hyp.dist(x.expand_as(line), line, c=c).min()
    torch.testing.assert_close(hyp.dist2plane(x, p, a, c=c), d_line, atol=1e-6, rtol=0)
    # a point of the plane is at distance 0; the signed distance changes sign across it
    on = hyp.expmap(p, 0.3 * perp, c=c)
    torch.testing.assert_close(hyp.dist2plane(on, p, a, c=c), torch.tensor(0.0, dtype=F64), atol=1e-12, rtol=0)
    s1 = hyp.dist2plane(hyp.expmap(p, 0.1 * a, c=c), p, a, c=c, signed=True)
    s2 = hyp.dist2plane(hyp.expmap(p, -0.1 * a, c=c), p, a, c=c, signed=True)
    assert float(s1) > 0 > float(s2)


@pytest.mark.parametrize("c", [1.0, 0.25])
def test_poincare_lorentz_isometry(c, generator):
    x, y = _ball_points((6, 3), c, generator, radius=0.95), _ball_points((6, 3), c, generator, radius=0.95)
    H = gf.Lorentz(k=1.0 / c)
    Lx, Ly = hyp.poincare_to_lorentz(x, c=c), hyp.poincare_to_lorentz(y, c=c)
    q = -Lx[..., 0] ** 2 + (Lx[..., 1:] ** 2).sum(-1)
    torch.testing.assert_close(q, torch.full_like(q, -1.0 / c), atol=1e-9, rtol=1e-9)
    assert bool((Lx[..., 0] > 0).all())
    _close(hyp.lorentz_to_poincare(Lx, c=c), x)
    torch.testing.assert_close(H.dist(Lx, Ly), hyp.dist(x, y, c=c), atol=1e-9, rtol=1e-9)
    # the two models' exponential maps correspond under the isometry (its differential maps v to dφ v)
    v = 0.3 * torch.randn(6, 3, generator=generator, dtype=F64)
    _, dv = jvp(lambda p: hyp.poincare_to_lorentz(p, c=c), (x,), (v,))
    torch.testing.assert_close(H.expmap(Lx, dv), hyp.poincare_to_lorentz(hyp.expmap(x, v, c=c), c=c), atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------- the metric of the spaces
@pytest.mark.parametrize(
    ("space", "shape"),
    [(gf.PoincareBall(), (5, 3)), (gf.PoincareBall(c=2.0), (5, 3)), (gf.Lorentz(), (5, 4)), (gf.Lorentz(k=0.5), (5, 4))],
    ids=["Poincare", "Poincare-c2", "Lorentz", "Lorentz-k0.5"],
)
def test_riemannian_gradient_exp_log_and_transport(space, shape, generator):
    x, y = space.sample(shape, generator=generator, dtype=F64), space.sample(shape, generator=generator, dtype=F64)
    G = torch.randn(shape, generator=generator, dtype=F64)
    V = space.tangent(x, torch.randn(shape, generator=generator, dtype=F64))
    # ⟨egrad_to_rgrad(x, G), V⟩_x = ⟨G, V⟩ for every tangent V (the defining property)
    _close(space.inner(x, space.egrad_to_rgrad(x, G), V), (G * V).sum(-1))
    # the Riemannian gradient of ½ d(·, y)² is −log_x(y), and one exact step lands on y
    Gd = grad(lambda a: 0.5 * (space.dist(a, y) ** 2).sum())(x)
    rg = space.egrad_to_rgrad(x, Gd)
    _close(rg, -space.logmap(x, y), 1e-9)
    _close(space.expmap(x, -rg), y, 1e-9)
    # d(x, exp_x(V)) = ‖V‖_x, and parallel transport preserves the metric
    _close(space.dist(x, space.expmap(x, 0.4 * V)), 0.4 * space.inner(x, V, V).sqrt(), 1e-9)
    W = space.tangent(x, G)
    PV, PW = space.transport(x, y, V), space.transport(x, y, W)
    _close(space.inner(y, PV, PW), space.inner(x, V, W), 1e-9)
    _close(space.tangent(y, PV), PV, 1e-9)


def test_lorentz_chart_reads_the_tangent_part_of_the_raw_vector(generator):
    H = gf.Lorentz()
    base = H.sample((4, 3), generator=generator, dtype=F64)
    Z = torch.randn(4, 3, generator=generator, dtype=F64)
    _close(H.to_manifold(Z, base), H.expmap(base, H.tangent(base, Z)))
    normal = torch.cat([-base[..., :1], base[..., 1:]], dim=-1)  # J x: the Euclidean normal
    _close(H.to_manifold(Z + 3.0 * normal, base), H.to_manifold(Z, base))
    origin = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    _close(H.to_manifold(Z), H.to_manifold(Z, origin.expand(4, 3)))


def test_sample_is_the_stated_wrapped_normal(generator):
    # d(0, x)² = ‖v‖² with v ~ N(0, I/n): mean 1, variance 2/n; a 6σ band for 4000 draws.
    for space, shape in ((gf.PoincareBall(c=0.5), (4000, 5)), (gf.Lorentz(k=2.0), (4000, 6))):
        X = space.sample(shape, generator=generator, dtype=F64)
        origin = space.to_manifold(torch.zeros(shape, dtype=F64))
        d2 = space.dist(origin, X) ** 2
        sigma = math.sqrt(2.0 / 5.0 / shape[0])
        assert abs(float(d2.mean()) - 1.0) < 6 * sigma, type(space).__name__
        L = space.logmap(origin, X)  # ambient tangent vectors at the origin
        assert float(L.mean(0).abs().max()) < 6 * math.sqrt(1.0 / shape[0])


# ---------------------------------------------------- float32 at the boundary of the ball
def _near_boundary(gap, n, c, generator, sep):
    """Two float32 points with c‖x‖² ≈ 1 − gap, ``sep·gap`` apart (the hard regime)."""
    x = torch.randn(n, generator=generator, dtype=F64)
    x = x / torch.linalg.vector_norm(x) * math.sqrt((1 - gap) / c)
    y = x + sep * gap * torch.randn(n, generator=generator, dtype=F64) / math.sqrt(c)
    y = y / torch.linalg.vector_norm(y) * math.sqrt((1 - gap) / c)
    return x.to(F32), y.to(F32)


def _exact_dist(x, y, c):
    """The distance of the given (float32) points, in float64 from the arcosh form (no cancellation)."""
    x, y = x.double(), y.double()
    gx = 1 - c * (x * x).sum(-1)
    gy = 1 - c * (y * y).sum(-1)
    u = 2 * c * ((x - y) ** 2).sum(-1) / (gx * gy)
    return torch.log1p(u + torch.sqrt(u * (u + 2))) / math.sqrt(c)


@pytest.mark.parametrize("gap", [1e-5, 1e-6])
@pytest.mark.parametrize("sep", [1.0, 30.0, 3000.0])
def test_float32_near_boundary_distance_is_accurate(gap, sep, generator):
    c = 1.0
    for _ in range(5):
        x, y = _near_boundary(gap, 4, c, generator, sep)
        ref = _exact_dist(x, y, c)
        torch.testing.assert_close(hyp.dist(x, y, c=c).double(), ref, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(gf.PoincareBall().dist(x, y).double(), ref, atol=1e-7, rtol=1e-5)


def test_float32_near_boundary_values_and_gradients_are_finite(generator):
    """c‖x‖² = 1 − 1e-5 in float32: every map and its gradient is finite, and the maps that
    return points stay in the ball (the regime where geoopt clamps to 1 − 4e-3)."""
    c = 1.0
    x, y = _near_boundary(1e-5, 3, c, generator, 10.0)
    xs = torch.stack([x, -y, 0.5 * x])
    ys = torch.stack([y, y, -x])
    v = torch.randn(3, 3, generator=generator, dtype=F32)
    a = torch.randn(3, 3, generator=generator, dtype=F32)
    M = torch.randn(3, 2, 3, generator=generator, dtype=F32)
    B = gf.PoincareBall()
    maps = {
        "mobius_add": lambda x, y: hyp.mobius_add(x, y, c=c),
        "dist": lambda x, y: hyp.dist(x, y, c=c),
        "expmap": lambda x, y: hyp.expmap(x, 1e-3 * y, c=c),
        "logmap": lambda x, y: hyp.logmap(x, y, c=c),
        "logmap0": lambda x, y: hyp.logmap0(x, c=c),
        "transport": lambda x, y: hyp.parallel_transport(x, y, v, c=c),
        "scalar_mul": lambda x, y: hyp.mobius_scalar_mul(0.5, x, c=c),
        "matvec": lambda x, y: hyp.mobius_matvec(M, x, c=c),
        "dist2plane": lambda x, y: hyp.dist2plane(x, y, a, c=c),
        "midpoint": lambda x, y: hyp.weighted_midpoint(torch.stack([x, y], -2), c=c),
        "to_lorentz": lambda x, y: hyp.poincare_to_lorentz(x, c=c),
        "egrad_to_rgrad": lambda x, y: B.egrad_to_rgrad(x, y),
        "inner": lambda x, y: B.inner(x, y, y),
        "to_manifold": lambda x, y: B.to_manifold(y, x),
    }
    returns_points = {"mobius_add", "expmap", "scalar_mul", "matvec", "midpoint", "to_manifold"}
    for name, f in maps.items():
        xg, yg = xs.clone().requires_grad_(True), ys.clone().requires_grad_(True)
        out = f(xg, yg)
        assert bool(torch.isfinite(out).all()), f"{name}: non-finite value"
        gx, gy = torch.autograd.grad(out.sum(), (xg, yg), allow_unused=True)
        for g in (gx, gy):
            assert g is None or bool(torch.isfinite(g).all()), f"{name}: non-finite gradient"
        if name in returns_points:
            assert bool(B.contains(out.detach()).all()), f"{name}: left the ball"
    # near-boundary exp/log round trip and transport isometry, in float32
    u = hyp.logmap(x, y, c=c)
    torch.testing.assert_close(hyp.expmap(x, u, c=c), y, atol=1e-6, rtol=0)
    w = torch.randn(3, generator=generator, dtype=F32) * 1e-5
    P = hyp.parallel_transport(x, y, w, c=c)
    torch.testing.assert_close(float(B.inner(y, P, P)), float(B.inner(x, w, w)), rtol=1e-3, atol=0)


def test_points_at_the_float_boundary_are_clamped_not_nan():
    B = gf.PoincareBall()
    x = torch.tensor([1.0, 0.0])  # on the boundary: no point of the open ball
    for out in (B.project(x), B.to_manifold(torch.tensor([1e4, 0.0])), hyp.mobius_add(x, x)):
        assert bool(torch.isfinite(out).all()) and bool(B.contains(out))
        assert float(torch.linalg.vector_norm(out)) <= 1 - hyp.ball_margin(torch.float32) + 1e-7
    assert not bool(B.contains(x))
    assert bool(torch.isfinite(B.dist(x, torch.zeros(2))))
    assert bool(torch.isnan(B.to_manifold(torch.tensor([float("nan"), 0.0]))).any())
    assert bool(torch.isnan(hyp.dist(torch.tensor([float("nan"), 0.0]), torch.zeros(2))))


def test_lorentz_float32_far_from_origin_stays_finite(generator):
    H = gf.Lorentz()
    X = H.to_manifold(torch.tensor([[0.0, 30.0, 0.0], [0.0, 8.0, 1.0]]))
    assert bool(torch.isfinite(X).all()) and bool(H.contains(X).all())
    origin = H.to_manifold(torch.zeros(3))
    d = H.dist(origin.expand_as(X), X)
    assert float(d[0]) <= 0.5 * math.log(1 / torch.finfo(F32).eps) + math.log(2) + 1e-3  # the stated cap
    torch.testing.assert_close(float(d[1]), math.sqrt(65.0), rtol=1e-3, atol=0)
    Z = torch.tensor([0.0, 3.0, -2.0], requires_grad=True)
    (g,) = torch.autograd.grad(H.dist(origin, H.to_manifold(Z)), Z)
    assert bool(torch.isfinite(g).all())


# ---------------------------------------------------------------- transforms and errors
def test_functions_compose_with_torch_func(generator):
    c = 0.9
    x, y = _ball_points((4, 3), c, generator), _ball_points((4, 3), c, generator)
    M = torch.randn(2, 3, generator=generator, dtype=F64)
    _close(vmap(lambda a, b: hyp.mobius_add(a, b, c=c))(x, y), hyp.mobius_add(x, y, c=c))
    _close(vmap(lambda a, b: hyp.dist(a, b, c=c))(x, y), hyp.dist(x, y, c=c))
    _close(vmap(lambda a: hyp.mobius_matvec(M, a, c=c))(x), hyp.mobius_matvec(M, x, c=c))
    # smooth at 0: jacobians of exp0/log0/scalar_mul/matvec at the origin are finite and agree
    z = torch.zeros(3, dtype=F64)
    for f in (lambda v: hyp.expmap0(v, c=c), lambda v: hyp.logmap0(v, c=c), lambda v: hyp.mobius_scalar_mul(2.0, v, c=c),
              lambda v: hyp.mobius_matvec(M, v, c=c), lambda v: hyp.expmap(x[0], v, c=c), lambda v: hyp.logmap(x[0], x[0] + v, c=c)):
        Jf, Jr = jacfwd(f)(z), jacrev(f)(z)
        assert bool(torch.isfinite(Jf).all())
        _close(Jf, Jr)
        Hs = hessian(lambda v: f(v).sum())(z)
        assert bool(torch.isfinite(Hs).all())
    _close(jacfwd(lambda v: hyp.expmap0(v, c=c))(z), torch.eye(3, dtype=F64))
    # a hyperbolic linear layer (Ganea et al.) compiles in one graph and matches eager
    def layer(x, M, b, p, a):
        h = hyp.mobius_add(hyp.mobius_matvec(M, x, c=c), b, c=c)
        return hyp.dist2plane(h, p, a, c=c, signed=True)

    args = (x, M, 0.1 * y[0, :2], 0.2 * y[1, :2], torch.randn(2, generator=generator, dtype=F64))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        _close(compiled(*args), layer(*args))
    finally:
        torch._dynamo.reset()


def test_bad_input_raises_manifold_error():
    x = torch.zeros(3)
    for bad_c in (0.0, -1.0, float("nan"), "1", True):
        with pytest.raises(gf.ManifoldError, match="geofunc.hyperbolic.dist"):
            hyp.dist(x, x, c=bad_c)
    with pytest.raises(gf.ManifoldError, match="mobius_add"):
        hyp.mobius_add(torch.zeros(3, dtype=torch.int64), x)
    with pytest.raises(gf.ManifoldError, match="mobius_matvec"):
        hyp.mobius_matvec(torch.zeros(2, 4), x)
    with pytest.raises(gf.ManifoldError, match="weighted_midpoint"):
        hyp.weighted_midpoint(torch.zeros(3, 2), torch.ones(2))
    for bad in (0.0, -2.0, float("inf")):
        with pytest.raises(gf.ManifoldError, match="PoincareBall"):
            gf.PoincareBall(c=bad)
        with pytest.raises(gf.ManifoldError, match="Lorentz"):
            gf.Lorentz(k=bad)
    with pytest.raises(gf.ManifoldError, match="n ≥ 1"):
        gf.Lorentz().to_manifold(torch.zeros(4, 1))



def test_mismatched_vectors_raise_manifold_error():
    """Vectors of different lengths, dtypes or non-broadcasting batches were torch's unnamed size error
    inside a product, or (float32 with float64) a silent promotion to float64; each function with
    several vectors now names the argument. Broadcasting batches and equal dtypes still work."""
    x = torch.full((4, 3), 0.1, dtype=F64)
    calls = {
        "mobius_add": lambda a, b: hyp.mobius_add(a, b),
        "dist": lambda a, b: hyp.dist(a, b),
        "expmap": lambda a, b: hyp.expmap(a, b),
        "logmap": lambda a, b: hyp.logmap(a, b),
        "gyration": lambda a, b: hyp.gyration(a, b, b),
        "parallel_transport": lambda a, b: hyp.parallel_transport(a, b, b),
        "dist2plane": lambda a, b: hyp.dist2plane(a, b, b),
    }
    bad = {"vector length": torch.full((4, 5), 0.1, dtype=F64), "dtype": x.float(),
           "batch": torch.full((3, 3), 0.1, dtype=F64)}
    for name, call in calls.items():
        for what, y in bad.items():
            with pytest.raises(gf.ManifoldError, match=f"geofunc.hyperbolic.{name}: expected .*{what}"):
                call(x, y)
        assert call(x, x[:1] * 2.0).shape[0] == 4  # a batch of 1 broadcasts
    with pytest.raises(gf.ManifoldError, match="mobius_matvec: expected `M` of the dtype"):
        hyp.mobius_matvec(torch.eye(3), x)
    with pytest.raises(gf.ManifoldError, match="weighted_midpoint: expected `weights`"):
        hyp.weighted_midpoint(x, torch.ones(4))

def test_learnable_curvature(generator):
    """``c`` may be a 0-d tensor: the maps equal those at the float value, and the gradient in
    ``c`` equals central finite differences (float64)."""
    x, y = _ball_points((4, 3), 0.5, generator), _ball_points((4, 3), 0.5, generator)
    M = torch.randn(2, 3, generator=generator, dtype=F64)

    def f(c):
        h = hyp.mobius_add(hyp.mobius_matvec(M, x, c=c), hyp.expmap0(y[:, :2], c=c), c=c)
        return hyp.dist(h, hyp.logmap0(h, c=c), c=c).sum() + hyp.dist2plane(x, y, y, c=c).sum()

    c = torch.tensor(0.7, dtype=F64)
    _close(f(c), f(0.7))
    g = grad(f)(c)
    h = 1e-6
    torch.testing.assert_close(g, (f(c + h) - f(c - h)) / (2 * h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distances_are_smooth_in_a_small_learnable_curvature(dtype):
    """``dist`` and ``dist2plane`` were computed through ``1/√c``, whose two terms of ∂d/∂c (each ~ d/c)
    cancel: the float32 gradient was 0.32 for 0.16 at c = 1e-6, −1023 at 1e-10 (float64 from 1e-16). Now
    both are smooth in c down to 0: the gradient equals its c → 0 limit (the value at c = 1e-3, to its
    O(c) change) at every c down to 1e-30, and ``dist`` there is the Euclidean limit 2‖y − x‖."""
    x = torch.tensor([0.3, 0.1], dtype=dtype)
    y = torch.tensor([-0.2, 0.5], dtype=dtype)
    p, a = torch.tensor([0.1, -0.2], dtype=dtype), torch.tensor([0.4, 0.7], dtype=dtype)

    def dd(f, c):
        return grad(f)(torch.tensor(c, dtype=dtype))

    dist = lambda c: hyp.dist(x, y, c=c)  # noqa: E731
    plane = lambda c: hyp.dist2plane(x, p, a, c=c)  # noqa: E731
    ref = {f: float(grad(lambda c: f(c))(torch.tensor(1e-3, dtype=F64).to(dtype))) for f in (dist, plane)}
    for c in (1e-5, 1e-6, 1e-8, 1e-10, 1e-20, 1e-30):
        for f in (dist, plane):
            torch.testing.assert_close(float(dd(f, c)), ref[f], atol=2e-3, rtol=2e-3)
    c = torch.tensor(1e-30, dtype=dtype)
    torch.testing.assert_close(hyp.dist(x, y, c=c), 2 * torch.linalg.vector_norm(y - x), atol=1e-6, rtol=1e-6)


def test_mobius_scalar_mul_takes_every_real_number():
    """``r`` may be any real number, as ``c`` may: a ``Fraction`` raised a TypeError from ``r·a`` and an int too
    large for a float (``10**400``) an OverflowError from ``abs(r)·20``. A Fraction is its float; a huge int is
    ``±inf``, whose result is the boundary point in the direction of ``r·x`` (as for every huge ``r``)."""
    import fractions

    x = torch.tensor([[0.3, 0.1], [-0.2, 0.05]], dtype=F64)
    for c in (1.0, torch.tensor(0.5, dtype=F64)):
        torch.testing.assert_close(hyp.mobius_scalar_mul(fractions.Fraction(1, 2), x, c=c),
                                   hyp.mobius_scalar_mul(0.5, x, c=c), atol=0, rtol=0)
        for big in (10**400, -(10**400)):
            torch.testing.assert_close(hyp.mobius_scalar_mul(big, x, c=c),
                                       hyp.mobius_scalar_mul(math.inf if big > 0 else -math.inf, x, c=c), atol=0, rtol=0)


def test_a_tensor_curvature_not_positive_gives_nan_and_one_not_0d_is_refused():
    """A tensor ``c`` ≤ 0 gave plausible values (``dist`` 0, a finite Möbius sum) where the number ≤ 0
    is refused; now NaN (no data is read: it may be traced). A ``c`` of shape (4,) was torch's size
    error, one of shape (1,) silently taken: both refused by name."""
    x, y = torch.tensor([0.3, 0.1]), torch.tensor([-0.2, 0.5])
    for c in (-1.0, -1e-3, 0.0):
        ct = torch.tensor(c)
        for out in (hyp.dist(x, y, c=ct), hyp.mobius_add(x, y, c=ct), hyp.expmap0(x, c=ct), hyp.dist2plane(x, y, y, c=ct)):
            assert bool(torch.isnan(out).all()), (c, out)
    for bad in (torch.ones(4), torch.ones(1), torch.tensor(1)):
        with pytest.raises(gf.ManifoldError, match="geofunc.hyperbolic.dist: expected a curvature `c` > 0"):
            hyp.dist(x, y, c=bad)


def test_bad_arguments_of_the_ball_functions_are_named():
    """Arguments the functions cannot take are a ``ManifoldError`` naming the function, what it expected and
    what it got (``mobius_scalar_mul`` with geoopt's ``(*batch, 1)`` coefficients gave a ``(B, B, n)`` result
    for ``(B, n)`` points, without a word): ``weighted_midpoint`` with weights that are not a tensor raised an AttributeError while
    wording its own message, and with a batch that does not broadcast torch's unnamed size error;
    ``mobius_matvec`` with ``M`` and ``x`` of batches that do not broadcast, torch's size error;
    ``mobius_scalar_mul`` with an ``r`` that is no number, a TypeError from ``abs``, with a tensor ``r``
    whose shape does not broadcast with the batch, torch's size error, and with a bool (``True`` or a bool
    tensor), read as the coefficients 1 and 0 without a word; a curvature too large
    for a float (``c=10**400``), an OverflowError."""
    x = torch.tensor([[[0.1, 0.2], [-0.3, 0.1], [0.0, 0.4]]] * 2, dtype=F64)  # (2, 3, 2): 2 sets of 3 points
    calls = {
        "weighted_midpoint": [lambda: hyp.weighted_midpoint(x, [1.0, 1.0, 1.0]), lambda: hyp.weighted_midpoint(x, 0.5),
                              lambda: hyp.weighted_midpoint(x, torch.ones(3, 3, dtype=F64))],
        "mobius_matvec": [lambda: hyp.mobius_matvec(torch.ones(3, 2, 2, dtype=F64), x[:, 0]),
                          lambda: hyp.mobius_matvec(torch.ones(2, 2, 2, dtype=F64), x[0])],
        "mobius_scalar_mul": [lambda r=r: hyp.mobius_scalar_mul(r, x)
                              for r in ("a", None, [0.5], torch.ones(4, dtype=F64), True, torch.ones(2, 3, dtype=torch.bool),
                                        torch.ones(1, 1, 1, dtype=F64))]
                             + [lambda: hyp.mobius_scalar_mul(torch.ones(3, 1, dtype=F64), x[0])],
        "dist": [lambda: hyp.dist(x, x, c=10**400)],
    }
    for fn, cs in calls.items():
        for call in cs:
            with pytest.raises(gf.ManifoldError, match=rf"geofunc\.hyperbolic\.{fn}: expected .*, got "):
                call()
    # what broadcasts still works: one weight vector for every set, one matrix for every point
    torch.testing.assert_close(hyp.weighted_midpoint(x, torch.ones(3, dtype=F64)), hyp.weighted_midpoint(x),
                               atol=1e-15, rtol=0)
    assert hyp.mobius_matvec(torch.eye(2, dtype=F64), x).shape == (2, 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_poincare_to_lorentz_keeps_the_lorentz_clamp(dtype):
    """The isometry's result is a Lorentz point under that space's stated clamp (distance ≤ T√k from
    the origin): unclamped, a float32 point at ball radius 0.99999 (distance 12.2) was accepted by
    ``Lorentz.contains`` and at Lorentz distance 0 from one at 0.999. Inside the clamp it is exact."""
    from geofunc.spaces._lorentz import _max_distance

    for c in (1.0, 2.0):
        H = gf.Lorentz(k=1.0 / c)
        T = _max_distance(dtype) / c**0.5
        o = H.to_manifold(torch.zeros(4, dtype=dtype))
        far = torch.tensor([[1 - 1e-5, 0.0, 0.0], [0.0, 0.0, -(1 - 1e-12)]], dtype=dtype) / c**0.5
        L = hyp.poincare_to_lorentz(far, c=c)
        assert H.contains(L).all() and member(H, L)
        assert (H.dist(o, L) <= T * (1 + 1e-3)).all()
        near = torch.tensor([[0.3, -0.2, 0.1]], dtype=dtype) / c**0.5
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(H.dist(o, hyp.poincare_to_lorentz(near, c=c)), hyp.dist(torch.zeros_like(near), near, c=c),
                                   atol=tol, rtol=tol)


def _fd_hessian(f, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central finite differences of ``grad(f)`` (float64), one column per entry of ``x``."""
    g = grad(f)
    E = torch.eye(x.numel(), dtype=x.dtype).reshape(-1, *x.shape)
    return torch.stack([((g(x + h * e) - g(x - h * e)) / (2 * h)).reshape(-1) for e in E], dim=1)


def _second_derivatives(f, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``f``'s hessian at ``x`` four ways: forward-over-reverse, reverse-over-reverse, ``grad(grad)``
    along each axis, and a double backward under plain autograd."""
    n = x.numel()
    xr = x.detach().clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    eager = torch.stack([torch.autograd.grad(g1.reshape(-1)[i], xr, retain_graph=True)[0].reshape(-1) for i in range(n)])
    E = torch.eye(n, dtype=x.dtype).reshape(-1, *x.shape)
    return {
        "hessian": hessian(f)(x).reshape(n, n),
        "jacrev(jacrev)": jacrev(jacrev(f))(x).reshape(n, n),
        "grad(grad)": torch.stack([grad(lambda z, e=e: (grad(f)(z) * e).sum())(x).reshape(-1) for e in E]),
        "double backward": eager,
    }


@pytest.mark.parametrize("with_base", [False, True])
def test_lorentz_second_derivatives_at_the_chart_centre(with_base, generator):
    """At Z = 0 (where every step after a rebase is differentiated) each way of taking the hessian
    equals finite differences of the gradient. Regressions: reverse-over-reverse was NaN there (the
    norm's 0/0 derivative in the overflow cap), and on torch 2.14 the forward-over-reverse hessian
    lost a term, clamp(min=0)'s derivative at 0 having changed from 1 to 0 (Note [Derivatives at the
    boundary of a clamp] in geofunc/spaces/_lorentz.py)."""
    d = torch.float64
    for k in (1.0, 2.0):
        M = gf.Lorentz(k=k)
        shape = (2, 4)
        base = M.from_manifold(M.sample(shape, generator=generator, dtype=d))[1] if with_base else None
        C, D = torch.randn(shape, generator=generator, dtype=d), torch.randn(shape, generator=generator, dtype=d)

        def loss(z, M=M, base=base, C=C, D=D):
            X = M.to_manifold(z, base)
            return (X * C).sum() + (X * D).sum() ** 2

        Z = torch.zeros(shape, dtype=d)
        fd = _fd_hessian(loss, Z)
        assert fd.abs().amax() > 0.1  # the term a wrong convention drops is not small
        for name, H in _second_derivatives(loss, Z).items():
            assert torch.isfinite(H).all(), name
            torch.testing.assert_close(H, fd, atol=1e-6 * max(1.0, float(fd.abs().amax())), rtol=0, msg=name)


def test_lorentz_logmap_and_transport_second_derivatives_at_coincident_points(generator):
    """``logmap(X, Y)`` and ``transport(X, Y, V)`` as ``Y = to_manifold(z, X)`` passes through ``X``
    (z = 0): ⟨x − y, x − y⟩_L is 0 there (≥ 0 for every Y on the sheet, quadratic in z), and its
    clamp's derivative convention must not decide their second derivatives."""
    d = torch.float64
    M = gf.Lorentz(k=1.5)
    X = M.sample((3, 4), generator=generator, dtype=d)
    V = M.tangent(X, torch.randn(3, 4, generator=generator, dtype=d))
    C, D = torch.randn(3, 4, generator=generator, dtype=d), torch.randn(3, 4, generator=generator, dtype=d)
    maps = {"logmap": lambda y: M.logmap(X, y), "transport": lambda y: M.transport(X, y, V)}
    for name, fn in maps.items():

        def loss(z, fn=fn):
            W = fn(M.to_manifold(z, X))
            return (W * C).sum() + (W * D).sum() ** 2

        Z = torch.zeros(3, 4, dtype=d)
        fd = _fd_hessian(loss, Z)
        assert fd.abs().amax() > 0.1
        for how, H in _second_derivatives(loss, Z).items():
            assert torch.isfinite(H).all(), (name, how)
            torch.testing.assert_close(H, fd, atol=1e-6 * max(1.0, float(fd.abs().amax())), rtol=0, msg=f"{name}: {how}")


# ------------------------------------------- against a 60-digit oracle (found by a fuzz pass)
# Each test below failed on the code before it: the oracle is the textbook closed form in mpmath
# at 60 digits, evaluated at the very (float) inputs geofunc received, or an exact identity.
pytest.importorskip("mpmath")
from mpmath.ctx_mp import MPContext  # noqa: E402

mp = MPContext()  # a context of its own: 60 digits here, the global mpmath.mp untouched
mp.dps = 60


class _Exact:
    """Ungar's closed forms at 60 digits (no rewriting: the precision resolves every cancellation)."""

    def __init__(self, c):
        self.c = mp.mpf(c)

    @staticmethod
    def vec(x):
        return [mp.mpf(float(t)) for t in x]

    @staticmethod
    def dot(a, b):
        return mp.fsum(x * y for x, y in zip(a, b))

    def add(self, x, y):
        c, xy, x2, y2 = self.c, self.dot(x, y), self.dot(x, x), self.dot(y, y)
        den = 1 + 2 * c * xy + c * c * x2 * y2
        return [((1 + 2 * c * xy + c * y2) * a + (1 - c * x2) * b) / den for a, b in zip(x, y)]

    def dist(self, x, y):
        w = self.add([-t for t in x], y)
        return 2 / mp.sqrt(self.c) * mp.atanh(mp.sqrt(self.c * self.dot(w, w)))

    def expmap(self, x, v):
        sc, nv = mp.sqrt(self.c), mp.sqrt(self.dot(v, v))
        lam = 2 / (1 - self.c * self.dot(x, x))
        return self.add(x, [mp.tanh(sc * lam * nv / 2) / (sc * nv) * t for t in v])

    def clamp(self, x, dtype):
        """The stated clamp: ``x`` radially into ``√c‖x‖ ≤ 1 − ball_margin(dtype)``, as floats."""
        m = 1 - mp.mpf(hyp.ball_margin(dtype))
        r = mp.sqrt(self.c * self.dot(x, x))
        return torch.tensor([float(t * m / r if r > m else t) for t in x], dtype=dtype)

    def gyr(self, u, v, w):
        return self.add([-t for t in self.add(u, v)], self.add(u, self.add(v, w)))

    def midpoint(self, xs, ws):
        num, den = [mp.mpf(0)] * len(xs[0]), mp.mpf(0)
        for x, w in zip(xs, ws):
            lam = 2 / (1 - self.c * self.dot(x, x))
            num = [a + w * lam * b for a, b in zip(num, x)]
            den += w * (lam - 1)
        k = [t / den for t in num]  # the Klein point; ½ ⊗ k:
        nk = mp.sqrt(self.c * self.dot(k, k))
        return [mp.tanh(mp.atanh(nk) / 2) / nk * t for t in k]


def _unit(n, generator):
    u = torch.randn(n, generator=generator, dtype=F64)
    return u / torch.linalg.vector_norm(u)


@pytest.mark.parametrize("c", [1.0, 0.4])
def test_expmap_beyond_the_tanh_cap_is_the_exact_map_then_the_clamp(c, generator):
    """θ = √c λ_x‖v‖/2 > 40: the cap used to clamp θ inside tanh(θ)/θ without rescaling v, so the
    second summand left the ball (exp_0([50, 0, 0]) was [0.8, 0, 0], distance 2.2 instead of 34.7;
    the direction was wrong for x ≠ 0; not monotone in ‖v‖). Now: the exact map, clamped."""
    E, sc = _Exact(c), math.sqrt(c)
    B = gf.PoincareBall(c=c)
    xs = [torch.zeros(3, dtype=F64), torch.tensor([0.999, 0.0, 0.0], dtype=F64), torch.tensor([0.3, 0.2, 0.0], dtype=F64)]
    xs += [0.9 * _unit(3, generator) for _ in range(3)]
    for x in xs:
        x = x / sc
        lam = float(hyp.conformal_factor(x, c=c))
        for direction in (torch.tensor([-60.0, 10.0, 5.0], dtype=F64), _unit(3, generator)):
            u = direction / torch.linalg.vector_norm(direction)
            last = -1.0
            for theta in (10.0, 30.0, 39.9, 40.1, 45.0, 50.0, 100.0, 1e4, 1e12):
                v = (2 * theta / (sc * lam)) * u
                got = hyp.expmap(x, v, c=c)
                ref = E.clamp(E.expmap(E.vec(x), E.vec(v)), F64)
                torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
                for out in (B.expmap(x, v), B.retract(x, v), B.to_manifold(v, x)):
                    torch.testing.assert_close(out, got, atol=1e-15, rtol=0)
                # monotone along the ray, up to the rounding of points at the clamp (~2ε/δ = 0.25)
                d = float(hyp.dist(x, got, c=c))
                assert d >= last - 0.3 / sc, (theta, d, last)
                last = max(last, d)
            # finite derivatives beyond the cap, in v and in x
            vv, xx = v.clone().requires_grad_(), x.clone().requires_grad_()
            gv, gx = torch.autograd.grad((hyp.expmap(xx, vv, c=c) * u.flip(0)).sum(), (vv, xx))
            assert bool(torch.isfinite(gv).all() and torch.isfinite(gx).all())
            assert bool(torch.isfinite(hessian(lambda w: (hyp.expmap(x, w, c=c) * u.flip(0)).sum())(v)).all())
    # float32: the boundary point of the geodesic, in the direction of the exact map
    x = torch.tensor([0.3, 0.2, 0.0]) / sc
    v = torch.tensor([-60.0, 10.0, 5.0])
    torch.testing.assert_close(hyp.expmap(x, v, c=c), E.clamp(E.expmap(E.vec(x), E.vec(v)), F32), atol=1e-6, rtol=0)


def test_lorentz_expmap_beyond_the_cap_keeps_the_exact_direction():
    """‖v‖_L/√k > 40: cosh and sinh θ/θ were taken at 40 while v kept its length, so the mix of x and
    v (the direction of the result) was off (0.4° at 41, 19° at 100). Now the result is the capped
    point in the direction of the exact exponential."""
    for k in (1.0, 2.0):
        H = gf.Lorentz(k=k)
        x = H.to_manifold(torch.tensor([0.0, 2.0, 0.0], dtype=F64))
        u = H.tangent(x, torch.tensor([0.0, 0.0, 1.0], dtype=F64))
        u = u / H.inner(x, u, u).sqrt()
        X = _Exact.vec(x)
        for s in (30.0, 41.0, 60.0, 100.0, 1e3, 1e12):
            v = s * math.sqrt(k) * u
            V = _Exact.vec(v)
            th = mp.mpf(s)
            e = [mp.cosh(th) * a + mp.sinh(th) / th * b for a, b in zip(X[1:], V[1:])]
            ne = mp.sqrt(_Exact.dot(e, e))
            got = H.expmap(x, v)
            gb = got[1:] / torch.linalg.vector_norm(got[1:])
            torch.testing.assert_close(gb, torch.tensor([float(t / ne) for t in e], dtype=F64), atol=1e-12, rtol=0)
            assert bool(H.contains(got))


@pytest.mark.parametrize(("dtype", "gap"), [(F32, 1e-4), (F32, 1e-5), (F32, 1e-6), (F64, 1e-9), (F64, 1e-12)])
def test_gyration_near_the_boundary(dtype, gap, generator):
    """gyr[u, v] w for u ≈ −v near the boundary: A and B of Ungar's form are differences of O(c)
    numbers (float32 at √c‖u‖ = 0.99999: gyr[u, −u] w had norm 147.8 for ‖w‖ = 0.79; float64 at
    1 − 1e-9: relative error 79). Oracle: gyr[u, −u] = identity, and the 60-digit closed form."""
    E = _Exact(1.0)
    eps = torch.finfo(dtype).eps
    # float64 gaps are computed in float64 (relative error ε/gap, the conditioning in the inputs)
    tol = 2e-6 if dtype == F32 else 100 * eps / gap
    for _ in range(6):
        u = (_unit(3, generator) * math.sqrt(1 - gap)).to(dtype)
        w = torch.randn(3, generator=generator, dtype=F64).to(dtype)
        assert torch.equal(hyp.gyration(u, -u, w), w)
        for eta in (1e-3, 1.0, 30.0):
            v = -(u.double() + eta * gap * torch.randn(3, generator=generator, dtype=F64))
            v = (v / torch.linalg.vector_norm(v) * math.sqrt(1 - 2 * gap)).to(dtype)
            ref = torch.tensor([float(t) for t in E.gyr(E.vec(u), E.vec(v), E.vec(w))], dtype=F64)
            got = hyp.gyration(u, v, w).double()
            torch.testing.assert_close(got, ref, atol=tol * float(torch.linalg.vector_norm(w)), rtol=0)


@pytest.mark.parametrize(("dtype", "gap"), [(F32, 1e-3), (F32, 1e-4), (F32, 1e-5), (F64, 1e-9), (F64, 1e-12)])
def test_weighted_midpoint_near_the_boundary(dtype, gap, generator):
    """The Klein point of the textbook form has gap (Poincaré gap)², lost to rounding: the midpoint
    of one point at radius 0.9999 (float32) came back 1.24 away, 9.61 at 1 − 1e-12 (float64).
    Oracle: the midpoint of one point (or of weights (0, 1)) is that point; the 60-digit closed form."""
    eps = torch.finfo(dtype).eps
    for _ in range(4):
        y = (_unit(3, generator) * math.sqrt(1 - gap)).to(dtype)
        x = torch.tensor([0.05, 0.0, 0.0], dtype=dtype)
        for m in (hyp.weighted_midpoint(y[None]), hyp.weighted_midpoint(torch.stack([x, y]), torch.tensor([0.0, 1.0], dtype=dtype)),
                  hyp.weighted_midpoint(torch.stack([y, y, y]), torch.tensor([0.2, 3.0, 0.7], dtype=dtype))):
            torch.testing.assert_close(m, y, atol=4 * eps, rtol=0)
    if dtype == F64:
        return  # (several float64 points: the float64 gaps' rounding ε/gap dominates, as in every map)
    E = _Exact(1.0)
    for spread in (1e-3, 1e-2, 0.3):
        d = _unit(3, generator)
        xs = d + spread * torch.randn(5, 3, generator=generator, dtype=F64)
        gaps = gap * (1 + 3 * torch.rand(5, 1, generator=generator, dtype=F64))
        xs = (xs / torch.linalg.vector_norm(xs, dim=-1, keepdim=True) * (1 - gaps).sqrt()).to(dtype)
        w = torch.rand(5, generator=generator, dtype=F64).to(dtype)
        ref = E.midpoint([E.vec(t) for t in xs], E.vec(w))
        lam = 2 / (1 - E.dot(ref, ref))
        err = E.dist(E.vec(hyp.weighted_midpoint(xs, w)), ref)
        assert float(err) <= 20 * eps * float(lam), (spread, float(err), 20 * eps * float(lam))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_weighted_midpoint_of_weights_of_any_scale(dtype, generator):
    """The midpoint of the weights w and s·w (s > 0) is one point (Note [weights of any scale]). W² and
    the products of Q overflowed or underflowed: weights of scale 1e20 gave the origin in float32 (1e160
    in float64), of scale 1e-30 a point 0.62 away from the midpoint, without an error. The derivative
    in w scales as 1/s (float64)."""
    xs = _ball_points((4, 3), 1.0, generator, dtype=dtype)
    w = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=dtype)
    ref = hyp.weighted_midpoint(xs, w)
    tol = {F32: 1e-6, F64: 1e-14}[dtype]
    scales = {F32: (1e-40, 1e-30, 1e-20, 1e20, 1e30), F64: (1e-300, 1e-200, 1e-160, 1e160, 1e200, 1e300)}[dtype]
    for s in scales:
        torch.testing.assert_close(hyp.weighted_midpoint(xs, w * s), ref, atol=tol, rtol=0, msg=f"scale {s:g}")
    if dtype == F64:
        J = torch.func.jacrev(lambda w: hyp.weighted_midpoint(xs, w))
        for s in (1e-200, 1e200):
            torch.testing.assert_close(J(w * s) * s, J(w), atol=1e-12, rtol=0, msg=f"scale {s:g}")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_lorentz_expmap_is_as_accurate_as_the_map_is_conditioned(dtype, generator):
    """Long steps toward the origin: cosh θ x + sinh θ v/θ cancels terms of size x₀ sinh θ, and θ
    from ⟨v, v⟩_L = ‖v̄‖² − v₀² carried a relative error ε x₀², so the sum left the geodesic (float64,
    d(o, x) = 12: exp_x(log_x(y)) 24 away from y, the exact map of the same v 1.7e-3 away). The
    map now goes through the origin (Note [the exponential map through the origin]): its distance
    from the 60-digit exponential of the same stored x, v is within a few ε x₀ sinh θ, the rounding
    that the map's conditioning amplifies (it was up to 1e7 times that)."""
    eps = torch.finfo(dtype).eps
    for k in (1.0, 2.0):
        H, sk = gf.Lorentz(k=k), math.sqrt(k)
        for D in ((2.0, 4.0, 6.0) if dtype == F32 else (4.0, 8.0, 12.0)):
            for ratio in (0.0, 0.7, 1.0):
                p = _unit(4, generator) * math.tanh(D / 2) * sk
                q = _unit(4, generator) * math.tanh(ratio * D / 2) * sk
                x, y = hyp.poincare_to_lorentz(p.to(dtype), c=1 / k), hyp.poincare_to_lorentz(q.to(dtype), c=1 / k)
                v = H.logmap(x, y)
                # the exact map of the stored spatial parts (x₀ and v₀ as the hyperboloid and tangency fix them)
                xb, vb = _Exact.vec(x[1:]), _Exact.vec(v[1:])
                x0 = mp.sqrt(k + _Exact.dot(xb, xb))
                v0 = _Exact.dot(xb, vb) / x0
                th = mp.sqrt(_Exact.dot(vb, vb) - v0 * v0) / sk
                ch, shc = mp.cosh(th), mp.sinh(th) / th
                e = [ch * x0 + shc * v0] + [ch * a + shc * b for a, b in zip(xb, vb)]
                got = _Exact.vec(H.expmap(x, v)[1:])
                got = [mp.sqrt(k + _Exact.dot(got, got))] + got
                u = (mp.fsum(a * b for a, b in zip(got[1:], e[1:])) - got[0] * e[0]) / -k  # cosh of the distance / √k
                err = float(sk * mp.acosh(max(u, mp.mpf(1))))
                bound = 10 * eps * float(x0 / sk) * float(mp.sinh(th)) + 1e-12
                assert err <= bound, (k, D, ratio, err, bound)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_huge_finite_inputs_give_boundary_points(dtype):
    """‖y‖² overflowed (1e20 in float32, 1e155 in float64) and m/√inf = 0 made a huge finite input
    the origin: project, expmap0, r ⊗ x, M ⊗ x, expmap. Now the boundary point in its direction
    (Note [norms without overflow]), with finite gradients."""
    B = gf.PoincareBall()
    m = 1 - hyp.ball_margin(dtype)
    x = torch.tensor([0.5, -0.2, 0.1], dtype=dtype)
    xhat = x.double() / torch.linalg.vector_norm(x.double())
    scales = [1e20, 1e30, 3e38] if dtype == F32 else [1e155, 1e200, 1e300, 1.7e308]
    for s in scales:
        v = torch.tensor([1.0, 1.0, -0.5], dtype=dtype) * s
        vhat = torch.tensor([1.0, 1.0, -0.5], dtype=F64) / 1.5
        cases = {
            "project": (hyp.project(v), vhat),
            "PoincareBall.project": (B.project(v), vhat),
            "expmap0": (hyp.expmap0(v), vhat),
            "to_manifold": (B.to_manifold(v), vhat),
            "scalar_mul": (hyp.mobius_scalar_mul(s, x), xhat),
            "scalar_mul (negative, tensor)": (hyp.mobius_scalar_mul(torch.tensor(-s, dtype=dtype), x), -xhat),
            "matvec": (hyp.mobius_matvec(torch.eye(3, dtype=dtype) * (s / 10), x), xhat),
        }
        for name, (out, direction) in cases.items():
            assert bool(torch.isfinite(out).all()) and bool(B.contains(out)), (name, s)
            torch.testing.assert_close(out.double(), m * direction, atol=8 * torch.finfo(dtype).eps, rtol=0, msg=f"{name} at {s:g}")
        # exp_x of a huge v: the exact map's boundary point, as for θ just above the cap
        ref = hyp.expmap(x, (100 * vhat).to(dtype))
        torch.testing.assert_close(hyp.expmap(x, v), ref, atol=8 * torch.finfo(dtype).eps, rtol=0)
        torch.testing.assert_close(B.to_manifold(v, x), ref, atol=8 * torch.finfo(dtype).eps, rtol=0)
        vv = v.clone().requires_grad_()
        for f in (lambda w: hyp.expmap(x, w), lambda w: hyp.expmap0(w), lambda w: hyp.project(w)):
            (g,) = torch.autograd.grad((f(vv) * x).sum(), vv)
            assert bool(torch.isfinite(g).all())
    # huge r against a tiny x, whose ‖x‖² underflows: r ⊗ x = tanh(r artanh‖x‖) x/‖x‖ (tanh(1) e₁)
    tiny = 1e-25 if dtype == F32 else 1e-160
    for r in (1.0 / tiny, torch.tensor(1.0 / tiny, dtype=dtype)):
        out = hyp.mobius_scalar_mul(r, torch.tensor([tiny, 0.0, 0.0], dtype=dtype))
        torch.testing.assert_close(out.double(), torch.tensor([math.tanh(1.0), 0.0, 0.0], dtype=F64),
                                   atol=4 * torch.finfo(dtype).eps, rtol=0)
    # Lorentz: huge raw tensors stay finite points at the distance cap, in the exact direction
    H = gf.Lorentz()
    Z = torch.tensor([0.0, 1.0, 1.0, -0.5], dtype=dtype) * scales[1]
    X = H.to_manifold(Z)
    assert bool(H.contains(X)) and bool(torch.isfinite(X).all())
    torch.testing.assert_close(X[1:].double() / torch.linalg.vector_norm(X[1:].double()), vhat, atol=1e-6, rtol=0)


def test_project_margin_outside_its_range_is_refused():
    """``project``'s ``margin`` δ (points at √c‖x‖ ≤ 1 − δ) was not checked: δ = −0.5 returned points of norm
    1.5 (outside the ball), δ = 2 the boundary point opposite to ``x``, ``True`` (read as 1) the origin, NaN
    NaN, all without an error. A number outside [0, 1) or no number is a ManifoldError naming the function;
    a 0-d tensor (not read) gives NaN outside [0, 1), as a tensor ``c`` ≤ 0 does; valid margins still work."""
    x = torch.tensor([[3.0, 4.0], [0.1, 0.2]], dtype=F64)
    for bad in (-0.5, -1e-12, 1.0, 2.0, float("nan"), float("inf"), True, "0.1", torch.ones(2, dtype=F64) * 0.1,
                torch.tensor(0, dtype=torch.int64)):
        with pytest.raises(gf.ManifoldError, match=r"geofunc\.hyperbolic\.project: expected `margin` .*, got "):
            hyp.project(x, margin=bad)
    for bad in (-0.5, 1.0, 2.0):
        assert bool(torch.isnan(hyp.project(x, margin=torch.tensor(bad, dtype=F64))[0]).all()), bad
    for m in (0.0, 0.25, torch.tensor(0.25, dtype=F64)):
        y = hyp.project(x, c=4.0, margin=m)
        torch.testing.assert_close(2.0 * torch.linalg.vector_norm(y[0]), 1.0 - torch.as_tensor(m, dtype=F64),
                                   atol=1e-15, rtol=0)
        torch.testing.assert_close(y[1], x[1], atol=0, rtol=0)  # inside: unchanged


def test_poincare_metric_at_non_finite_points_is_nan():
    """egrad_to_rgrad and inner read X through its gap, clamped at ε: X = [0.1, inf] gave
    3.6e-15·G, a plausible finite gradient (Note [NaN policy]). Non-finite X gives NaN; a finite X
    on or outside the boundary reads as a point at the float boundary, as in every other map."""
    B = gf.PoincareBall()
    G = torch.tensor([1.0, -2.0])
    for bad in (torch.tensor([0.1, math.inf]), torch.tensor([math.nan, 0.0]), torch.tensor([-math.inf, 0.0])):
        assert bool(torch.isnan(B.egrad_to_rgrad(bad, G)).all())
        assert bool(torch.isnan(B.inner(bad, G, G)))
        assert bool(torch.isnan(B.tangent(bad, G)).all())
        assert bool(torch.isnan(hyp.conformal_factor(bad)).all())
    # finite, on or outside the boundary: the clamped gap ε (as dist, logmap and transport read it)
    eps = torch.finfo(F32).eps
    for out in (torch.tensor([0.1, 5.0]), torch.tensor([1.0, 0.0])):
        torch.testing.assert_close(B.egrad_to_rgrad(out, G), 0.25 * eps**2 * G)
        torch.testing.assert_close(B.inner(out, G, G), 4.0 * (G * G).sum() / eps**2)
    # lorentz_to_poincare of an inf x₀ was the plausible point 0
    assert bool(torch.isnan(hyp.lorentz_to_poincare(torch.tensor([math.inf, 1.0, 0.0]))).all())
    # and a batch keeps its finite rows
    X = torch.tensor([[0.1, 0.2], [0.1, math.inf]])
    rg = B.egrad_to_rgrad(X, G.expand(2, 2))
    assert bool(torch.isfinite(rg[0]).all()) and bool(torch.isnan(rg[1]).all())


# ----------------------------------------------------------------- half precision (Lorentz, Poincaré)
# Note [the hyperboloid in low precision] in geofunc/spaces/_lorentz.py. Before it, rsgd with
# momentum minimizing ½ d(x, t)² on Lorentz went to NaN in float16 (targets from d(o, t) ≈ 3 on) and,
# in bfloat16, ran out to the float32 clamp 8.66 (d(x, t) = 9.9 for a target at distance 2): the
# clamp was float32's, and the maps read the rounded x₀ of stored points and tangent vectors.
HALF = [torch.bfloat16, torch.float16]
#: the Lorentz clamp T (k = 1) of points stored in each dtype: ½ log(1/ε) + log 2 (3.12 and 4.16)
LORENTZ_T = {d: 0.5 * math.log(1.0 / torch.finfo(d).eps) + math.log(2.0) for d in HALF}
#: max hyperbolic distance between the half-precision and the float64 optimizer runs, targets
#: inside the clamp (measured after the fix: bfloat16 0.014, float16 0.003; before: bfloat16 11.4,
#: float16 NaN)
HALF_RUN_TOL = {torch.bfloat16: 0.05, torch.float16: 0.015}


def _directions(B, n, generator, lorentz=True):
    d = torch.randn(B, n + (1 if lorentz else 0), generator=generator, dtype=F64)
    if lorentz:
        d[:, 0] = 0
    return d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)


def _rsgd_to_target(M, dtype, x0, t, steps=150):
    """rsgd (lr 0.1, momentum 0.9) on ½ d(x, t)² from ``x0`` in ``dtype`` (``t`` rounded to ``dtype``)."""
    opt = gf.optim.rsgd({"x": M}, lr=0.1, momentum=0.9)
    p, tt = {"x": x0.to(dtype)}, t.to(dtype)
    state = opt.init(p)

    def f(x):
        return 0.5 * M.dist(x, tt).pow(2).sum()

    for _ in range(steps):
        p, state = opt.update({"x": grad(f)(p["x"])}, state, p)
    return p["x"]


def _lorentz_read(X):
    """A stored Lorentz point in float64, lifted from its spatial part (how the maps read it)."""
    return gf.Lorentz().project(X.double())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lorentz_rsgd_momentum_in_half_precision_follows_float64(dtype, generator):
    H = gf.Lorentz()
    radii = {torch.bfloat16: (1.0, 2.0, 2.9), torch.float16: (1.0, 2.0, 3.5)}[dtype]  # inside the clamp
    R = torch.tensor(radii, dtype=F64).repeat_interleave(4).unsqueeze(-1)
    x0 = H.to_manifold(0.5 * _directions(R.shape[0], 4, generator))
    t = H.to_manifold(R * _directions(R.shape[0], 4, generator))
    ref = _rsgd_to_target(H, F64, x0, t)
    out = _rsgd_to_target(H, dtype, x0, t)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert bool(H.contains(out).all())
    err = float(H.dist(_lorentz_read(out), ref).max())
    assert err <= HALF_RUN_TOL[dtype], f"{dtype}: {err:.3g} from the float64 run"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lorentz_rsgd_momentum_in_half_precision_stays_within_the_clamp(dtype, generator):
    """Beyond the clamp: a target at distance 6 is approached to the clamp's sphere (the nearest
    representable points, d(x, t) = 6 − T) and never left; random gradients with momentum stay
    finite and inside it (before: NaN within 1 to 170 steps, points at distance 8.67)."""
    H, T = gf.Lorentz(), LORENTZ_T[dtype]
    o = H.to_manifold(torch.zeros(5, dtype=F64))
    x0 = H.to_manifold(0.5 * _directions(8, 4, generator))
    t = H.to_manifold(6.0 * _directions(8, 4, generator))
    out = _rsgd_to_target(H, dtype, x0, t)
    assert bool(torch.isfinite(out).all()) and bool(H.contains(out).all())
    X = _lorentz_read(out)
    assert float(H.dist(o, X).max()) <= T + 0.01
    torch.testing.assert_close(H.dist(X, t), torch.full((8,), 6.0 - T, dtype=F64), atol=HALF_RUN_TOL[dtype], rtol=0)
    for momentum, nesterov in ((0.9, False), (0.95, True)):
        opt = gf.optim.rsgd({"x": H}, lr=0.2, momentum=momentum, nesterov=nesterov)
        p = {"x": H.sample((32, 5), generator=generator, dtype=dtype)}
        state = opt.init(p)
        for _ in range(200):
            p, state = opt.update({"x": torch.randn(32, 5, generator=generator).to(dtype)}, state, p)
        assert bool(torch.isfinite(p["x"]).all()) and bool(H.contains(p["x"]).all())
        assert float(H.dist(o, _lorentz_read(p["x"])).max()) <= T + 0.01
    # the clamp of every point returned in that dtype (project of a far point included)
    far = H.to_manifold(8.0 * _directions(4, 4, generator)).to(dtype)
    assert float(H.dist(o, _lorentz_read(H.project(far))).max()) <= T + 0.01


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lorentz_maps_read_half_precision_points_on_the_hyperboloid(dtype, generator):
    """inner, dist and transport of half-precision points at distance 2.5 (x₀ = 6.1, inside both
    clamps) and unit tangent vectors, against float64 on the unrounded inputs: errors ~ε x₀ (read
    from the spatial parts), not ε x₀² (the stored x₀, v₀). Measured after: bfloat16 ≤ 0.026, float16
    ≤ 0.0039; before: 0.21 and 0.027 (0.5 and 0.046 on other draws)."""
    tol = {torch.bfloat16: 0.08, torch.float16: 0.01}[dtype]
    H = gf.Lorentz()
    X = H.to_manifold(2.5 * _directions(64, 4, generator))

    def unit_tangent():
        V = H.egrad_to_rgrad(X, torch.randn(X.shape, generator=generator, dtype=F64))
        return V / H.inner(X, V, V).sqrt().unsqueeze(-1)

    U, V = unit_tangent(), unit_tangent()
    Y = H.expmap(X, 0.5 * unit_tangent())
    x, u, v, y = (a.to(dtype) for a in (X, U, V, Y))
    assert H.dist(x, y).dtype == dtype
    for got, want in ((H.inner(x, u, v), H.inner(X, U, V)), (H.dist(x, y), H.dist(X, Y))):
        err = float((got.double() - want).abs().max())
        assert err <= tol, err
    D = H.tangent(Y, H.transport(x, y, v).double() - H.transport(X, Y, V))  # the error, as a vector at Y
    err = float(H.inner(Y, D, D).clamp(min=0).sqrt().max())
    assert err <= tol, err


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_poincare_rsgd_momentum_in_half_precision(dtype, generator):
    """The ball had no such problem (its clamp is already the stored dtype's margin δ = 8ε, distance
    log(2/δ): 3.47 in bfloat16, 5.55 in float16, and its maps read points through their gaps): inside
    the margin the runs follow float64 (measured: bfloat16 0.006, float16 0.0008 at distance 2);
    beyond it they stay at the margin."""
    P = gf.PoincareBall()
    R = torch.tensor([1.0, 2.0], dtype=F64).repeat_interleave(4).unsqueeze(-1)
    x0 = P.to_manifold(0.25 * _directions(8, 4, generator, lorentz=False))
    t = P.to_manifold(0.5 * R * _directions(8, 4, generator, lorentz=False))  # λ₀ = 2: distance R
    ref = _rsgd_to_target(P, F64, x0, t)
    out = _rsgd_to_target(P, dtype, x0, t)
    assert bool(torch.isfinite(out).all()) and bool(P.contains(out).all())
    assert float(P.dist(out.double(), ref).max()) <= {torch.bfloat16: 0.03, torch.float16: 0.005}[dtype]
    far = P.to_manifold(3.0 * _directions(8, 4, generator, lorentz=False))  # distance 6
    out = _rsgd_to_target(P, dtype, x0, far)
    assert bool(torch.isfinite(out).all()) and bool(P.contains(out).all())
    o = torch.zeros(4, dtype=F64)
    margin = math.log(2.0 / gf.hyperbolic.ball_margin(dtype))
    assert float(P.dist(o, out.double()).max()) <= margin + 0.05


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("c", [1.0, 0.5])
def test_half_precision_functions_are_the_rounding_of_float32(dtype, c, generator):
    """The functions of ``geofunc.hyperbolic`` take the spaces' low-precision policy (Note [Hyperbolic
    functions in low precision]): on half-precision points inside the ball, up to c‖x‖² ≈ 0.998, each
    result is finite and the rounding of the float32 function of the same stored values, and every
    returned point is inside the ball as stored. Computed in float16 itself, ``dist`` and ``logmap``
    were inf/NaN for points at c‖x‖² = 0.99 (81% of pairs; all at 0.998) and bfloat16 distances there
    were half the float32 ones (11.8 for 24.5), where ``PoincareBall.dist`` was right; under autocast,
    ``mobius_matvec`` of float32 input returned bf16."""
    n, B = 16, 128
    fns = {
        "mobius_add": lambda x, y, v, M: hyp.mobius_add(x, y, c=c),
        "mobius_scalar_mul": lambda x, y, v, M: hyp.mobius_scalar_mul(2.0, x, c=c),
        "mobius_matvec": lambda x, y, v, M: hyp.mobius_matvec(M, x, c=c),
        "expmap": lambda x, y, v, M: hyp.expmap(x, v, c=c),
        "expmap0": lambda x, y, v, M: hyp.expmap0(v, c=c),
        "logmap": lambda x, y, v, M: hyp.logmap(x, y, c=c),
        "logmap0": lambda x, y, v, M: hyp.logmap0(x, c=c),
        "dist": lambda x, y, v, M: hyp.dist(x, y, c=c),
        "gyration": lambda x, y, v, M: hyp.gyration(x, y, v, c=c),
        "parallel_transport": lambda x, y, v, M: hyp.parallel_transport(x, y, v, c=c),
        "project": lambda x, y, v, M: hyp.project(3.0 * v, c=c),
        "conformal_factor": lambda x, y, v, M: hyp.conformal_factor(x, c=c),
        "weighted_midpoint": lambda x, y, v, M: hyp.weighted_midpoint(torch.stack([x, y], -2), c=c),
        "dist2plane": lambda x, y, v, M: hyp.dist2plane(x, y, v, c=c),
    }
    points = {"mobius_add", "mobius_scalar_mul", "mobius_matvec", "expmap", "expmap0", "project", "weighted_midpoint"}
    for r in (0.3, 0.9, 0.99, 0.995, 0.999):
        x, y = (r / math.sqrt(c) * _directions(B, n, generator, lorentz=False)).to(dtype), \
            (r / math.sqrt(c) * _directions(B, n, generator, lorentz=False)).to(dtype)
        v = torch.randn(B, n, generator=generator, dtype=F64).to(dtype)
        M = (torch.randn(n, n, generator=generator, dtype=F64) / n**0.5).to(dtype)
        for name, fn in fns.items():
            got = fn(x, y, v, M)
            want = fn(x.float(), y.float(), v.float(), M.float())
            if name in points:  # returned points keep the stored dtype's margin (float32's is 8·1.2e-7)
                want = hyp.project(want, c=c, margin=hyp.ball_margin(dtype))
            assert got.dtype == dtype, name
            assert bool(torch.isfinite(got).all()), (name, r)
            eps = torch.finfo(dtype).eps  # within an ulp or two of the rounding of the float32 value
            torch.testing.assert_close(got.float(), want.to(dtype).float(), atol=2 * eps, rtol=2 * eps,
                                       msg=f"{name} at {r}")
            if name in points:
                assert bool((c * got.double().pow(2).sum(-1) < 1).all()), (name, r)
            with torch.autocast("cpu", dtype=dtype):  # float32 input: computed as without autocast
                under = fn(x.float(), y.float(), v.float(), M.float())
            assert under.dtype == torch.float32 and torch.equal(under, fn(x.float(), y.float(), v.float(), M.float())), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1.0, 0.5])
def test_points_outside_the_ball_read_as_the_boundary_point(dtype, c):
    """Note [points on or outside the boundary]: a finite point on or outside the boundary reads, in
    every map, as the point at the float boundary in its direction. Its gap alone was clamped, so
    dist(0, [100, 0]) was 0.02 (not monotone in the radius: 17.3 at [1, 0], 18.0 at [3, 0])."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(4, 3, generator=g, dtype=dtype)
    u = u / u.norm(dim=-1, keepdim=True)
    eps = torch.finfo(dtype).eps
    boundary = u * (math.sqrt(1.0 - eps) / math.sqrt(c))  # gap ε: the clamped gap
    x = 0.3 * torch.randn(4, 3, generator=g, dtype=dtype) / math.sqrt(c)
    v = 0.2 * torch.randn(4, 3, generator=g, dtype=dtype)
    a = torch.randn(4, 3, generator=g, dtype=dtype)
    M = torch.randn(4, 2, 3, generator=g, dtype=dtype)
    maps = {
        "dist(x, ·)": lambda y: hyp.dist(x, y, c=c), "dist(·, x)": lambda y: hyp.dist(y, x, c=c),
        "logmap(x, ·)": lambda y: hyp.logmap(x, y, c=c), "logmap(·, x)": lambda y: hyp.logmap(y, x, c=c),
        "logmap0": lambda y: hyp.logmap0(y, c=c), "expmap": lambda y: hyp.expmap(y, v, c=c),
        "transport": lambda y: hyp.parallel_transport(y, x, v, c=c), "mobius_add": lambda y: hyp.mobius_add(y, x, c=c),
        "scalar_mul": lambda y: hyp.mobius_scalar_mul(0.5, y, c=c), "matvec": lambda y: hyp.mobius_matvec(M, y, c=c),
        "gyration": lambda y: hyp.gyration(y, x, v, c=c), "dist2plane": lambda y: hyp.dist2plane(y, x, a, c=c),
        "midpoint": lambda y: hyp.weighted_midpoint(torch.stack([y, x], -2), c=c),
        "to_lorentz": lambda y: hyp.poincare_to_lorentz(y, c=c),
        "ball.dist": lambda y: gf.PoincareBall(c=c).dist(x, y), "ball.logmap": lambda y: gf.PoincareBall(c=c).logmap(x, y),
    }
    # every point on or outside reads as one point (the float boundary's, within an ulp of its
    # direction), whatever its radius; a point an ε inside reads within the boundary's sensitivity
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    ref = {name: f(u * (1.5 / math.sqrt(c))) for name, f in maps.items()}
    for scale in (1.001, 3.0, 100.0, 1e20):  # (radius 1 itself rounds to either side)
        y = u * (scale / math.sqrt(c))
        for name, f in maps.items():
            got = f(y)
            assert torch.isfinite(got).all(), (name, scale)
            torch.testing.assert_close(got, ref[name], rtol=tol, atol=tol, msg=f"{name} at radius {scale}")
    near = {name: f(boundary) for name, f in maps.items()}  # gap 1–4 ε after rounding: d within log 4
    for name in ("dist(x, ·)", "dist(·, x)", "ball.dist"):
        assert ((near[name] - ref[name]).abs() <= math.log(4.0) / math.sqrt(c) + tol).all(), name
    radii = torch.tensor([0.5, 0.9, 0.999, 1.0, 3.0, 100.0, 1e30], dtype=dtype)
    d = hyp.dist(torch.zeros(3, dtype=dtype), radii[:, None] * u[0] / math.sqrt(c), c=c)
    assert bool((d[1:] >= d[:-1]).all()), d


def test_samples_at_high_curvature_are_cut_at_the_clamp(generator):
    """``sample`` draws in Riemannian units (E d(0, x)² = 1) whatever the curvature, so where the clamp
    of returned points is near 1 its tail is cut there (docs/spaces/hyperbolic.md): ``Lorentz(k=0.01)``
    in float32 (clamp T√k = 0.87) puts a large share of its samples on the clamp, each a point of
    the space; the documented recipe ``expmap0(v/(2√(cn)))`` spreads in units of the curvature radius."""
    k = 0.01
    H = gf.Lorentz(k=k)
    X = H.sample((4000, 3), generator=generator, dtype=F32)
    assert member(H, X)
    o = torch.tensor([math.sqrt(k), 0.0, 0.0], dtype=F64)
    d = H.dist(o.expand(X.shape), X.double())
    cap = (0.5 * math.log(1 / torch.finfo(F32).eps) + math.log(2)) * math.sqrt(k)
    assert float(d.max()) <= cap * (1 + 1e-4)  # (the float32 rounding of a point at the clamp)
    assert 0.35 < float((d > cap * (1 - 1e-3)).double().mean()) < 0.6 and float((d ** 2).mean()) < 0.7
    c, n = 1 / k, 2
    v = torch.randn(20000, n, generator=generator, dtype=F64)
    x = hyp.expmap0(v / (2 * math.sqrt(c * n)), c=c)
    d2 = gf.PoincareBall(c=c).dist(torch.zeros_like(x), x) ** 2
    assert abs(float(d2.mean()) * c - 1) < 0.05


def _lorentz_pair_exact(k, x, y):
    """60-digit dist and logmap of the lifts ``(√(k + ‖x̄‖²), x̄)`` of the stored spatial parts."""
    k = mp.mpf(k)
    xb, yb = _Exact.vec(x[1:]), _Exact.vec(y[1:])
    X = [mp.sqrt(k + _Exact.dot(xb, xb))] + xb
    Y = [mp.sqrt(k + _Exact.dot(yb, yb))] + yb
    u = -(-X[0] * Y[0] + _Exact.dot(xb, yb)) / k - 1
    d = mp.sqrt(k) * mp.acosh(1 + u)
    psi = mp.acosh(1 + u) / mp.sqrt(u * (u + 2))
    return d, [psi * (b - a - u * a) for a, b in zip(X, Y)]


@pytest.mark.parametrize("k", [0.1, 1.0, 10.0])
def test_lorentz_float32_pairs_beyond_the_clamp_are_exact(k, generator):
    """float32 points beyond the clamp of returned points (distance 8.66√k) are accepted by
    `contains`, and dist/logmap/transport evaluated ⟨y − x, y − x⟩_L in float32 (relative rounding
    ε x₀²): a pair 0.01√k apart at distance 12√k from the origin was 133% off in dist and logmap
    (9% at 8√k, inside the clamp), the transport 5.5× off. They now read each point as the float64
    lift of its stored spatial part and compute in float64 (Note [the hyperboloid's pair maps in
    double precision]); measured after: ≤ 6e-8 relative against 60 digits up to 12√k."""
    H, sk = gf.Lorentz(k=k), math.sqrt(k)
    for r, dd in ((1.0, 0.01), (8.0, 0.01), (8.0, 1.0), (12.0, 0.01), (12.0, 1.0)):
        X64 = H.to_manifold(r * sk * _directions(8, 3, generator))
        V = H.tangent(X64, torch.randn(X64.shape, generator=generator, dtype=F64))
        Y64 = H.expmap(X64, dd * sk * V / H.inner(X64, V, V).sqrt().unsqueeze(-1))
        x, y = X64.float(), Y64.float()
        assert bool(H.contains(x).all() and H.contains(y).all())
        d, L = H.dist(x, y), H.logmap(x, y)
        assert d.dtype == L.dtype == F32
        for i in range(x.shape[0]):
            de, le = _lorentz_pair_exact(k, x[i], y[i])
            assert abs(float(d[i]) - float(de)) <= 2e-6 * float(de), (r, dd, float(d[i]), float(de))
            # the ambient error less its part along x (normal to the hyperboloid there: u x carries
            # the rounding of u times x₀, off the tangent space, not along it)
            xl = torch.tensor([float(t) for t in [mp.sqrt(k + _Exact.dot(_Exact.vec(x[i, 1:]), _Exact.vec(x[i, 1:])))]], dtype=F64)
            xl = torch.cat([xl, x[i, 1:].double()])
            le = torch.tensor([float(t) for t in le], dtype=F64)

            e = L[i].double() - le
            e = e - (e * xl).sum() / (xl * xl).sum() * xl
            err = float(torch.linalg.vector_norm(e) / torch.linalg.vector_norm(le))
            assert err <= 2e-6, (r, dd, err)
        # transport of a unit vector, as read from its spatial part, against float64 on the lifts
        xl, yl = (torch.cat([torch.sqrt(k + (a[..., 1:].double() ** 2).sum(-1, keepdim=True)), a[..., 1:].double()], -1) for a in (x, y))
        W = H.tangent(xl, torch.randn(xl.shape, generator=generator, dtype=F64))
        W = W / H.inner(xl, W, W).sqrt().unsqueeze(-1)
        w = W.float()
        W = torch.cat([(xl[..., 1:] * w[..., 1:].double()).sum(-1, keepdim=True) / xl[..., :1], w[..., 1:].double()], -1)
        T, Te = H.transport(x, y, w), H.transport(xl, yl, W)
        D = H.tangent(yl, T.double() - Te)
        err = float(H.inner(yl, D, D).clamp(min=0).sqrt().max())
        tol = 4 * torch.finfo(F32).eps * math.cosh(r)  # the float32 rounding of the result (~ε x₀/√k)
        assert err <= tol, (r, dd, err, tol)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [0.5, 2.0])
def test_lorentz_radial_pairs_far_out_are_exact(dtype, k):
    """Note [the hyperboloid's distance without cancellation]: a pair along one ray from the origin
    (and the origin with a far point) is fixed by its stored spatial parts to ~ε, but ⟨y − x, y − x⟩_L
    cancels there to a part in ~x₀y₀/k: float64 pairs 1e-3√k apart at 18√k were 14× off in dist and
    0.12 in logmap (at 12√k: 9e-4), pairs √k apart at 25√k 11× off, and d(o, x) at 40√k was 0; float32
    pairs (read as float64 lifts) 5e-4 off at 12√k, 3% at 18√k. Oracle: 60 digits of the same stored
    inputs (float32 ones computed in float64). Beyond the rounding of x̄ across its ray, ε₆₄ sinh(d(o, x)/√k),
    nothing is resolved: dist is allowed that, squared, on top of a few ulps of its dtype."""
    H, sk, eps = gf.Lorentz(k=k), math.sqrt(k), torch.finfo(F64).eps
    g = torch.Generator().manual_seed(3)
    radii = (12.0, 18.0, 25.0, 30.0) if dtype == F64 else (12.0, 18.0, 25.0)
    for R in radii:
        u = _directions(4, 3, g, lorentz=False)
        for s in (1e-3, 1.0, R):  # s = R: the origin
            xb, yb = sk * math.sinh(R) * u, sk * math.sinh(R - s) * u
            lift = lambda b: torch.cat([torch.sqrt(k + (b * b).sum(-1, keepdim=True)), b], -1)  # noqa: E731
            x, y = lift(xb).to(dtype), lift(yb).to(dtype)
            assert bool(H.contains(x).all() and H.contains(y).all())
            d, L = H.dist(x, y), H.logmap(x, y)
            for i in range(x.shape[0]):
                de, le = _lorentz_pair_exact(k, x[i], y[i])
                tol = 8 * torch.finfo(dtype).eps * float(de) + sk * (eps * math.sinh(R)) ** 2  # result's rounding
                assert abs(float(d[i]) - float(de)) <= tol, (R, s, float(d[i]), float(de))
                if R <= 18.0:
                    xl = torch.cat([torch.sqrt(k + (x[i, 1:].double() ** 2).sum()).reshape(1), x[i, 1:].double()])
                    le = torch.tensor([float(t) for t in le], dtype=F64)
                    e = L[i].double() - le
                    e = e - (e * xl).sum() / (xl * xl).sum() * xl  # less its part along x (as above)
                    err = float(torch.linalg.vector_norm(e) / torch.linalg.vector_norm(le))
                    assert err <= (1e-9 if dtype == F64 else 2e-6), (R, s, err)
    # d(o, x) at 40√k in float64 (it was 0), and a pair 510√k apart (cosh d − 1 ~ 1e221: u(u + 2) overflowed)
    o = torch.tensor([sk, 0.0, 0.0], dtype=F64)
    x = torch.tensor([sk * math.cosh(40.0), sk * math.sinh(40.0), 0.0], dtype=F64)
    assert abs(float(H.dist(o, x)) - 40.0 * sk) <= 1e-13 * 40.0 * sk
    x = torch.tensor([sk * math.cosh(300.0), sk * math.sinh(300.0), 0.0], dtype=F64)
    y = torch.tensor([sk * math.cosh(210.0), -sk * math.sinh(210.0), 0.0], dtype=F64)
    assert abs(float(H.dist(x, y)) - 510.0 * sk) <= 1e-13 * 510.0 * sk
    L = H.logmap(x, y)
    assert bool(torch.isfinite(L).all()) and abs(float(L[1] / L[0]) - math.tanh(300.0)) <= 1e-13


@pytest.mark.parametrize("k", [0.5, 2.0])
def test_lorentz_transport_far_out_is_exact(k):
    """Note [the hyperboloid's transport without cancellation]: ⟨y − x, v⟩_L cancelled to a part in
    ~x₀²/k for a radial tangent vector v (v̄ of size x₀‖v‖_L along x̄): float64, moving a radial unit
    vector 1e-3√k (or √k) along the ray at 18√k was 5–20% off (1e-6 at 12√k, 1e3 at 25√k), against
    the ~ε x₀ to which the stored inputs fix it. Oracle: 60 digits of the exact transport of the
    same stored inputs, points read as the lifts of their spatial parts and v by its spatial part
    (as expmap reads it); the result is read the same way at y, the error in the metric there."""
    H, sk, eps = gf.Lorentz(k=k), math.sqrt(k), torch.finfo(F64).eps
    g = torch.Generator().manual_seed(5)
    u, q = _directions(1, 3, g, lorentz=False)[0], _directions(1, 3, g, lorentz=False)[0]
    q = q - (q @ u) * u
    q = q / torch.linalg.vector_norm(q)

    def mink(a, b):
        return -a[0] * b[0] + mp.fsum(s * t for s, t in zip(a[1:], b[1:]))

    def lift(b):
        return [mp.sqrt(k + _Exact.dot(b, b))] + b

    def lift_tangent(x, vb):
        return [_Exact.dot(x[1:], vb) / x[0]] + vb

    for R in (12.0, 18.0, 25.0):
        xb = sk * math.sinh(R) * u
        x = torch.cat([torch.sqrt(k + (xb * xb).sum()).reshape(1), xb])
        radial = torch.cat([torch.tensor([math.sinh(R)], dtype=F64), math.cosh(R) * u])  # unit, along the ray
        across = torch.cat([torch.zeros(1, dtype=F64), q])  # unit, across it
        # along the ray (out, in, to the origin) and off it
        for b, phi in ((R + 1e-3, 0.0), (R - 1.0, 0.0), (0.0, 0.0), (R - 0.5, 0.3 / math.sinh(R)), (R, 1e-3 / math.sinh(R))):
            yb = sk * math.sinh(b) * (math.cos(phi) * u + math.sin(phi) * q)
            y = torch.cat([torch.sqrt(k + (yb * yb).sum()).reshape(1), yb])
            for v in (radial, across, 0.6 * radial + 0.8 * across):
                out = H.transport(x, y, v)
                X, Y = lift(_Exact.vec(x[1:])), lift(_Exact.vec(y[1:]))
                V = lift_tangent(X, _Exact.vec(v[1:]))
                c = mink(Y, V) / (k - mink(X, Y))
                P = [a + c * (s + t) for a, s, t in zip(V, X, Y)]
                E = [a - b for a, b in zip(lift_tangent(Y, _Exact.vec(out[1:])), P)]
                err = float(mp.sqrt(max(mink(E, E), 0)) / mp.sqrt(mink(V, V)))
                tol = 4 * eps * math.cosh(R)  # the stored x̄'s rounding across its ray, ε x₀/√k
                assert err <= tol, (R, b, phi, err, tol)


@pytest.mark.parametrize("k", [0.5, 2.0])
def test_lorentz_metric_far_out_and_radam_there(k):
    """Note [the metric through the origin]: inner read −U₀V₀ + ⟨Ū, V̄⟩, which cancels to a part in
    ~x₀²/k for radial tangent vectors: in float64 the squared norm of a radial unit vector was 0.5
    at 18√k and 0 or −0.5 at 18.6√k (inside the clamp), and radam, whose second moment is that
    norm, then took a step of length lr/eps: a point pulled 1e-3√k toward the origin from 18.68√k
    landed at the clamp on the far side. Now the norm is exact to ~ε x₀/√k and the step is lr."""
    H, sk, eps = gf.Lorentz(k=k), math.sqrt(k), torch.finfo(F64).eps
    g = torch.Generator().manual_seed(7)
    u = _directions(256, 3, g, lorentz=False)
    o = H.to_manifold(torch.zeros(4, dtype=F64)).expand(256, 4)
    for R in (12.0, 18.0, 18.6, 18.68):
        xb = sk * math.sinh(R) * u
        x = torch.cat([torch.sqrt(k + (xb * xb).sum(-1, keepdim=True)), xb], -1)
        radial = torch.cat([torch.full((256, 1), math.sinh(R), dtype=F64), math.cosh(R) * u], -1)  # ‖·‖_L = 1
        for s in (1.0, 1e-3):
            err = (H.inner(x, s * radial, s * radial) / (s * s) - 1.0).abs().max()
            assert float(err) <= 8 * eps * math.cosh(R), (R, s, float(err))
        opt = gf.optim.radam({"x": H}, lr=1e-3 * sk)
        G = torch.func.grad(lambda p: H.dist(p["x"], o).sum())({"x": x})
        p, _ = opt.update(G, opt.init({"x": x}), {"x": x})
        moved = H.dist(p["x"], o) - R * sk  # one Adam step: lr, toward the origin
        torch.testing.assert_close(moved, torch.full_like(moved, -1e-3 * sk), atol=1e-9 * math.cosh(R), rtol=0)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_lorentz_transport_and_metric_of_a_non_finite_entry_are_nan(dtype):
    """Note [NaN policy]: transport and inner read v₀ (and inner x) only through the spatial parts
    (Notes [the hyperboloid's transport without cancellation], [the metric through the origin]), so a
    NaN/inf v₀ gave a transport with finite spatial entries, and an inf x̄ entry an inner of ±inf
    (before those notes: a finite inner). Every entry of every argument now makes them NaN."""
    H = gf.Lorentz(k=0.8)
    g = torch.Generator().manual_seed(11)
    X, Y = H.sample((2, 4), generator=g, dtype=dtype), H.sample((2, 4), generator=g, dtype=dtype)
    V = H.tangent(X, torch.randn(2, 4, generator=g, dtype=dtype))
    for i in range(4):
        for bad in (math.nan, math.inf, -math.inf):
            for which in range(3):
                args = [X.clone(), Y.clone(), V.clone()]
                args[which][0, i] = bad
                T = H.transport(*args)
                assert bool(torch.isnan(T[0]).all()) and bool(torch.isfinite(T[1]).all()), (i, bad, which, T)
                if which != 1:
                    ip = H.inner(args[0], args[2], V)
                    assert bool(torch.isnan(ip[0])) and bool(torch.isfinite(ip[1])), (i, bad, which, ip)


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
def test_lorentz_maps_of_a_non_finite_entry_are_nan(dtype):
    """Note [NaN policy]: a NaN/inf in any entry of a point, x₀ included, gives a value with no finite entry (NaN,
    or ±inf where an entry is a product with the inf) and leaves its neighbour as it was. ``project`` is the lift
    of the spatial part and never read y₀, and ``expmap`` (so ``to_manifold`` from a base), ``dist`` and ``logmap``
    read x₀ (y₀, v₀) through the spatial parts: a NaN or inf y₀ in ``project``, an inf x₀ in ``expmap``, gave a
    finite point of the hyperboloid, and an inf x₀ a finite distance (found by a probe of every entry of every
    map's arguments). ``project``, ``dist`` and ``logmap`` are NaN there."""
    H = gf.Lorentz(k=0.8)
    g = torch.Generator().manual_seed(12)
    X, Y = (H.sample((2, 4), generator=g, dtype=F64).to(dtype) for _ in range(2))
    G = torch.randn(2, 4, generator=g, dtype=F64).to(dtype)
    V = H.tangent(X, G)
    clean = {"project": H.project(X), "tangent": H.tangent(X, G), "egrad_to_rgrad": H.egrad_to_rgrad(X, G),
             "retract": H.retract(X, V), "expmap": H.expmap(X, V), "to_manifold": H.to_manifold(G, X)}
    for i in range(4):
        for bad in (math.nan, math.inf, -math.inf):
            Xb = X.clone()
            Xb[0, i] = bad
            got = {"project": H.project(Xb), "tangent": H.tangent(Xb, G), "egrad_to_rgrad": H.egrad_to_rgrad(Xb, G),
                   "retract": H.retract(Xb, V), "expmap": H.expmap(Xb, V), "to_manifold": H.to_manifold(G, Xb)}
            for name, out in got.items():  # NaN (project), or not finite in any entry (inf·x₀ stays ±inf)
                assert not bool(torch.isfinite(out[0]).any()), (name, i, bad, out)
                assert bool(torch.isnan(out[0]).all()) or name != "project", (i, bad, out)
                assert out.dtype == dtype and torch.equal(out[1], clean[name][1]), (name, i, bad)
            pair = {"dist(X, Y)": (H.dist(Xb, Y), H.dist(X, Y)), "dist(Y, X)": (H.dist(Y, Xb), H.dist(Y, X)),
                    "logmap(X, Y)": (H.logmap(Xb, Y), H.logmap(X, Y)), "logmap(Y, X)": (H.logmap(Y, Xb), H.logmap(Y, X))}
            for name, (out, ref) in pair.items():
                assert bool(torch.isnan(out[0]).all()), (name, i, bad, out)
                assert torch.equal(out[1], ref[1]), (name, i, bad)


def test_poincare_float32_point_just_inside_the_float_boundary_reads_at_gap_eps():
    """Pins the documented gap clamp (docs/spaces/hyperbolic.md): a float32 point that `contains`
    accepts (c‖x‖² < 1 summed in float32) but whose float64 gap is below ε reads as the point at
    gap ε on its ray, log(ε/gap)/√c from where it is."""
    c, eps = 10.0, torch.finfo(F32).eps
    P = gf.PoincareBall(c=c)
    x = (torch.tensor([0.6, 0.8, 0.0], dtype=F64) * math.sqrt((1 - 9e-8) / c)).float()
    gap = 1 - c * float((x.double() ** 2).sum())
    assert bool(P.contains(x)) and 0 < gap < eps
    got = float(P.dist(torch.zeros(3), x))
    want = 2 / math.sqrt(c) * math.atanh(math.sqrt(1 - eps))  # the point at gap ε
    assert abs(got - want) <= 1e-5 * want, (got, want)
    true = 2 / math.sqrt(c) * math.atanh(math.sqrt(1 - gap))
    assert abs((true - got) - math.log(eps / gap) / math.sqrt(c)) <= 1e-3, (true, got)


def test_mobius_scalar_mul_broadcasting_batch_shapes_are_taken():
    """Only geoopt's ``(*batch, 1)`` (as many dims as ``x``, last 1) is refused: an ``r`` of as many dims whose
    last is not 1, or of more dims than ``x``, broadcasts with the batch shape."""
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    r = torch.randn(2, 3, generator=g, dtype=F64)
    out = hyp.mobius_scalar_mul(r, x)
    assert out.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], hyp.mobius_scalar_mul(float(r[i, j]), x[j]), atol=TIGHT, rtol=0)
    out = hyp.mobius_scalar_mul(torch.tensor([[0.5], [-2.0]], dtype=F64), x[0])
    assert out.shape == (2, 1, 4)
    torch.testing.assert_close(out[1, 0], hyp.mobius_scalar_mul(-2.0, x[0]), atol=TIGHT, rtol=0)


@pytest.mark.parametrize("k", [6, 9, 12, 15])
def test_float64_near_the_boundary_is_within_the_stated_limits(k, generator):
    """The module docstring's limits of the representation, float64 points at ‖x‖ = 1 − 10⁻ᵏ: their gap
    ``g`` is known to ~ε/g relative, so ``dist`` is within a few ε/g absolute and its gradient within a
    few ε/g relative of the exact values *of the same inputs*; ``expmap(x, logmap(x, y))`` is within
    about ε·sinh(d) of ``y`` (measured worst ratios over 240 pairs: 1.0, 0.6 and 2.3; the bounds below 4, 8 and 32)."""
    E, eps = _Exact(1.0), torch.finfo(F64).eps
    for _ in range(4):
        u, w = _unit(3, generator), _unit(3, generator)
        x = (1 - 10.0**-k) * u
        g = float(1 - E.dot(E.vec(x), E.vec(x)))
        for y in ((1 - 10.0**-k) * (u + 1e-2 * w) / torch.linalg.vector_norm(u + 1e-2 * w), 0.5 * w):
            X, Y = E.vec(x), E.vec(y)
            d = E.dist(X, Y)
            assert abs(float(hyp.dist(x, y)) - float(d)) <= 4 * eps / g, (k, float(d))
            yr = y.clone().requires_grad_(True)
            hyp.dist(x, yr).backward()
            # ∂/∂y arcosh(A), A = 1 + 2‖y − x‖²/(g_x g_y): (∂A/∂y)/√(A² − 1)
            gx, gy, D2 = 1 - E.dot(X, X), 1 - E.dot(Y, Y), E.dot([b - a for a, b in zip(X, Y)], [b - a for a, b in zip(X, Y)])
            A = 1 + 2 * D2 / (gx * gy)
            exact = [(4 * (b - a) / (gx * gy) + 4 * D2 * b / (gx * gy * gy)) / mp.sqrt(A * A - 1) for a, b in zip(X, Y)]
            err = mp.sqrt(mp.fsum((mp.mpf(float(a)) - b) ** 2 for a, b in zip(yr.grad, exact)))
            assert float(err / mp.sqrt(E.dot(exact, exact))) <= 8 * eps / min(g, float(1 - E.dot(Y, Y))), k
            back = hyp.expmap(x, hyp.logmap(x, y))
            assert float(E.dist(E.vec(back), Y)) <= 32 * eps * float(mp.sinh(d)), (k, float(d))
