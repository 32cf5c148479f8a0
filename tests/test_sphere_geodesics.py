"""The sphere family's closed-form geodesics (``expmap``, ``logmap``, ``dist``: Note [the sphere's
geodesics] in ``geofunc/spaces/_sphere.py``) beyond the conformance harness, which checks them on
the real cases: complex vectors against the real sphere of twice the dimension, geoopt's
``SphereExact``, the accuracy of the distance at tiny angles and near the antipode, the antipode
itself, and extreme radii."""

from __future__ import annotations

import math

import pytest
import torch

import geofunc as gf

F64 = torch.float64


def _tangent(space, X, g, scale=1.0):
    return scale * space.tangent(X, torch.randn(X.shape, dtype=X.dtype, generator=g))


@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_complex_sphere_is_the_real_sphere_of_twice_the_dimension(radius, generator):
    """``Cⁿ`` with ``Re⟨a, b⟩`` is ``R²ⁿ``: each map on complex vectors equals the real map on their
    real and imaginary parts side by side."""
    S = gf.Sphere(radius=radius)
    X = S.sample((3, 4), dtype=torch.complex128, generator=generator)
    Y = S.sample((3, 4), dtype=torch.complex128, generator=generator)
    V = _tangent(S, X, generator, radius)

    def real(T):
        return torch.view_as_real(T).flatten(-2)

    torch.testing.assert_close(S.dist(X, Y), S.dist(real(X), real(Y)), atol=1e-13, rtol=0)
    torch.testing.assert_close(real(S.expmap(X, V)), S.expmap(real(X), real(V)), atol=1e-13, rtol=0)
    torch.testing.assert_close(real(S.logmap(X, Y)), S.logmap(real(X), real(Y)), atol=1e-12, rtol=0)
    torch.testing.assert_close(S.expmap(X, S.logmap(X, Y)), Y, atol=1e-12, rtol=0)


def test_complex_oblique_columns_are_complex_spheres(generator):
    O, S = gf.Oblique(), gf.Sphere()
    X = O.sample((2, 4, 3), dtype=torch.complex128, generator=generator)
    Y = O.sample((2, 4, 3), dtype=torch.complex128, generator=generator)
    V = _tangent(O, X, generator)
    torch.testing.assert_close(O.dist(X, Y), torch.linalg.vector_norm(S.dist(X.mT, Y.mT), dim=-1), atol=1e-13, rtol=0)
    torch.testing.assert_close(O.expmap(X, V), S.expmap(X.mT, V.mT).mT, atol=1e-13, rtol=0)
    torch.testing.assert_close(O.logmap(X, Y), S.logmap(X.mT, Y.mT).mT, atol=1e-12, rtol=0)


def test_sphere_equals_geoopt_sphere_exact(generator):
    geoopt = pytest.importorskip("geoopt")
    S, R = gf.Sphere(), geoopt.SphereExact()
    X = S.sample((6, 5), dtype=F64, generator=generator)
    Y = S.sample((6, 5), dtype=F64, generator=generator)
    V = _tangent(S, X, generator, 0.7)
    torch.testing.assert_close(S.expmap(X, V), R.expmap(X, V), atol=1e-13, rtol=0)
    torch.testing.assert_close(S.logmap(X, Y), R.logmap(X, Y), atol=1e-12, rtol=0)
    torch.testing.assert_close(S.dist(X, Y), R.dist(X, Y), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dist_and_logmap_are_accurate_at_tiny_angles_and_near_the_antipode(dtype):
    """``arccos⟨x, y⟩`` is 0 (float32: up to 3e-4 off) at an angle of 1e-5; the ``atan2`` form is
    right to a few ε relative, and so is the logarithm's length, at both ends of [0, π]."""
    S = gf.Sphere(radius=3.0)
    eps = torch.finfo(dtype).eps
    for theta in (1e-5, 1e-3, 1.0, math.pi - 1e-3):
        t = torch.tensor([theta], dtype=F64)
        X = torch.tensor([3.0, 0.0, 0.0], dtype=F64)
        Y = 3.0 * torch.cat([torch.cos(t), torch.sin(t), torch.zeros(1, dtype=F64)])
        X, Y = X.to(dtype), Y.to(dtype)
        # the stored Y is the rounding of the exact point: its own angle is theta to ~ε
        d = float(S.dist(X, Y))
        assert abs(d - 3.0 * theta) <= 3.0 * 8 * eps * max(theta, 1e-2) + 3.0 * 4 * eps, (theta, d)
        L = S.logmap(X, Y)
        assert abs(float(torch.linalg.vector_norm(L.double())) - d) <= 3.0 * 16 * eps * max(d, 1.0)


def test_logmap_is_zero_at_the_point_and_nan_at_the_antipode():
    S = gf.Sphere()
    X = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    assert torch.equal(S.logmap(X, X), torch.zeros_like(X))
    assert torch.isnan(S.logmap(X, -X)).all()  # no shortest geodesic: never a plausible vector
    torch.testing.assert_close(S.dist(X, -X), torch.full((2,), math.pi, dtype=F64), atol=1e-15, rtol=0)
    # the gradient of the distance at X = Y is finite (a subgradient), that of logmap the projection
    Xr = X.clone().requires_grad_()
    S.dist(Xr, X).sum().backward()
    assert torch.isfinite(Xr.grad).all()
    J = torch.autograd.functional.jacobian(lambda y: S.logmap(X[:1], y), X[:1])[0, :, 0, :]
    x = X[0]
    torch.testing.assert_close(J, torch.eye(3, dtype=F64) - torch.outer(x, x), atol=1e-12, rtol=0)



@pytest.mark.parametrize("space, X, Y", [
    (gf.Sphere(), torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=F64),
     torch.tensor([[-0.6, -0.8, 0.0], [0.0, 1.0, 0.0]], dtype=F64)),
    (gf.Sphere(radius=2.5), torch.tensor([[2.5], [-2.5], [2.5]], dtype=F64), torch.tensor([[-2.5], [-2.5], [2.5]], dtype=F64)),
    (gf.SphereEmbedded(), torch.tensor([[1.0], [-1.0]], dtype=F64), torch.tensor([[-1.0], [-1.0]], dtype=F64)),
    (gf.Oblique(), torch.tensor([[1.0, -1.0, 1.0]], dtype=F64), torch.tensor([[1.0, 1.0, -1.0]], dtype=F64)),
    (gf.Sphere(), torch.tensor([1.0, 0.0], dtype=torch.complex128), torch.tensor([-1.0, 0.0], dtype=torch.complex128)),
])
def test_sqdist_is_dist_squared_at_the_antipode(space, X, Y):
    """At the antipode the logarithm is NaN (no shortest geodesic) but the distance is π r: ``sqdist``
    is ``dist²`` there too, not NaN. On S⁰ (vectors of length 1) and a one-row ``Oblique`` every pair of
    points differing in sign is antipodal, i.e. most random pairs (sqdist was NaN for them)."""
    d = space.dist(X, Y)
    torch.testing.assert_close(space.sqdist(X, Y), d**2, atol=1e-12, rtol=1e-12)
    assert torch.isnan(space.logmap(X, Y)).any()  # the logarithm stays NaN there
    Yr = Y.clone().requires_grad_()
    space.sqdist(X, Yr).sum().backward()
    assert torch.isfinite(Yr.grad).all()

def test_extreme_radii_in_float32():
    for r in (1e-20, 1e20):
        S = gf.Sphere(radius=r)
        X = S.sample((4, 3), generator=torch.Generator().manual_seed(0))
        Y = S.sample((4, 3), generator=torch.Generator().manual_seed(1))
        d = S.dist(X, Y)
        assert torch.isfinite(d).all() and bool((d <= math.pi * r * (1 + 1e-6)).all())
        L = S.logmap(X, Y)
        torch.testing.assert_close(S.expmap(X, L) / r, Y / r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("space, shape", [(gf.Sphere(), (4,)), (gf.Oblique(), (4, 3)), (gf.SO(), (3, 3)),
                                          (gf.Grassmannian(), (5, 2)), (gf.PSD(metric="affine"), (3, 3))])
def test_a_proximal_term_under_grad_of_grad_is_finite_at_the_anchor(space, shape, generator):
    """MAML-style: the inner step's loss has a proximal term ``sqdist(θ, θ₀)`` and the outer gradient
    differentiates through the inner gradient at ``θ = θ₀``. With ``sqdist`` the second derivative is
    finite and is the metric (2·inner along a tangent); ``dist ** 2`` there is NaN (double backward
    through a norm at 0), which ``sqdist`` exists to avoid. The sphere's logarithm went through norms
    too (its double backward at y = x was NaN)."""
    X0 = space.sample(shape, generator=generator, dtype=F64)
    V = space.tangent(X0, torch.randn(shape, generator=generator, dtype=F64))

    def outer(t, how):
        X = X0 + 0.0 * t  # depends on t, equal to X0 in value
        prox = (lambda Y: space.sqdist(X0, Y)) if how == "sqdist" else (lambda Y: space.dist(X0, Y) ** 2)
        g = torch.func.grad(lambda Y: prox(Y).sum())(X + t * V)
        return (g * V).sum()

    t = torch.zeros((), dtype=F64)
    second = torch.func.grad(outer)(t, "sqdist")
    torch.testing.assert_close(second, 2 * space.inner(X0, V, V).sum(), atol=1e-9, rtol=1e-9)
    if isinstance(space, (gf.Sphere, gf.Oblique, gf.SO)):  # (PSD's dist is through eigvalsh, the Grassmannian's
        assert not torch.isfinite(torch.func.grad(outer)(t, "dist")).all()  # sines are rounding there: finite)


@pytest.mark.parametrize("name", ["Sphere", "SphereEmbedded", "Oblique"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sqdist_in_low_precision_computes_in_float32(name, dtype):
    """Note [Low precision]: every map computes bf16/fp16 points in float32 and rounds its result once. The
    closed-form sqdist of Sphere and Oblique computed in the stored dtype (bf16: 54% off for points 0.01 apart,
    where the float32 value rounded is 0.4% off); it is float32's value rounded."""
    g = torch.Generator().manual_seed(0)
    M = getattr(gf, name)()
    shp = (64, 4, 3) if name == "Oblique" else (64, 4)
    X = M.sample(shp, generator=g, dtype=torch.float64)
    Y = M.retract(X, 1e-2 * M.tangent(X, torch.randn(shp, generator=g, dtype=torch.float64)))
    Xl, Yl = X.to(dtype), Y.to(dtype)
    ref = M.sqdist(Xl.float(), Yl.float()).to(dtype)
    got = M.sqdist(Xl, Yl)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol={torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype], atol=0)


@pytest.mark.parametrize("space, X, Y", [
    (gf.Sphere(), torch.tensor([0.6, 0.8, 0.0], dtype=F64), torch.tensor([-0.6, -0.8, 0.0], dtype=F64)),
    (gf.Sphere(radius=2.5), torch.tensor([2.5], dtype=F64), torch.tensor([-2.5], dtype=F64)),
    (gf.Oblique(), torch.tensor([[1.0, -1.0, 1.0]], dtype=F64), torch.tensor([[1.0, 1.0, -1.0]], dtype=F64)),
])
def test_sqdist_gradient_is_zero_at_the_antipode(space, X, Y):
    """At the antipode dist² is at its maximum (π r)² and not differentiable (π r − dist is a cone there):
    sqdist's gradient is the subgradient 0 in both arguments, as its docstring says."""
    Xr, Yr = X.clone().requires_grad_(), Y.clone().requires_grad_()
    space.sqdist(Xr, Yr).sum().backward()
    assert torch.equal(Xr.grad, torch.zeros_like(X)) and torch.equal(Yr.grad, torch.zeros_like(Y))


@pytest.mark.parametrize("space, shape", [(gf.Sphere(), (5,)), (gf.Sphere(radius=2.0), (5,)), (gf.Oblique(), (5, 3))])
def test_sqdist_gradient_is_bounded_beside_the_antipode(space, shape):
    """Note [The squared distance past the right angle]: within rounding of the antipode (‖ŷ + x̂‖ of 1e-16 to
    1e-14) sqdist's gradient was the difference of two terms of size θ²/‖P_x̂(ŷ + x̂)‖: norms up to 71 (11× the
    bound; float64), where ‖grad d²‖ = 2 d ‖grad d‖ ≤ 2 π r on every side (per column of an Oblique point). Its
    norm, and its value there."""
    g = torch.Generator().manual_seed(0)
    r = getattr(space, "radius", 1.0)
    X = space.sample(shape, generator=g, dtype=F64)
    E = space.tangent(-X, torch.randn(shape, generator=g, dtype=F64))
    E = E / torch.linalg.vector_norm(E, dim=-1, keepdim=True) if isinstance(space, gf.Sphere) else E / E.norm(dim=-2, keepdim=True)
    bound = 2 * math.pi * r * (1 + 1e-9) * (shape[-1] if isinstance(space, gf.Oblique) else 1) ** 0.5
    for t in (1e-14, 1e-15, 3e-16, 1e-16):
        for Y in (space.project(-X + t * r * E), -X * (1 - 2 ** -52), -X * (1 + 2 ** -52)):
            G = torch.func.grad(lambda y: space.sqdist(X, y))(Y)
            assert float(torch.linalg.vector_norm(space.tangent(Y, G))) <= bound
            torch.testing.assert_close(space.sqdist(X, Y), space.dist(X, Y) ** 2, atol=1e-12 * r * r, rtol=0)
