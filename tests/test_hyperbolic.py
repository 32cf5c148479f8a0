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
