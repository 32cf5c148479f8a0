"""Note [Distances from differences] (geofunc/spaces/_orthogonal.py): dist at Y = X is exactly 0 with a
gradient of exactly 0 (a norm's at 0), in every transform; at Y a tiny step from X its Riemannian gradient
is the unit vector away from X; away from X the gradient matches finite differences (float64)."""

import pytest
import torch
from torch.func import grad, vmap

import geofunc as gf

F64, C128 = torch.float64, torch.complex128

CASES = [
    ("SO", gf.SO(), (4, 4), torch.float64), ("SO-f32", gf.SO(), (4, 4), torch.float32),
    ("U", gf.Unitary(), (3, 3), C128), ("U-c64", gf.Unitary(), (3, 3), torch.complex64),
    ("Gr", gf.Grassmannian(), (5, 2), F64), ("Gr-f32", gf.Grassmannian(), (5, 2), torch.float32),
    ("GrC", gf.Grassmannian(), (5, 2), C128), ("Gr-wide", gf.Grassmannian(), (2, 5), F64),
    ("PSD-affine", gf.PSD(metric="affine"), (3, 3), F64), ("PSD-affine-f32", gf.PSD(metric="affine"), (3, 3), torch.float32),
    ("PSD-affine-C", gf.PSD(metric="affine"), (3, 3), C128),
    ("Sphere", gf.Sphere(), (4,), F64), ("Oblique", gf.Oblique(), (3, 2), F64), ("PSD", gf.PSD(), (3, 3), F64),
    ("Poincare", gf.PoincareBall(), (3,), F64), ("Lorentz", gf.Lorentz(), (4,), F64),
]


def _point_and_unit_tangent(space, shape, dtype, seed):
    """A sampled point, a unit tangent vector there, and the generator that drew them (for further draws)."""
    g = torch.Generator().manual_seed(seed)
    X = space.sample(shape, generator=g, dtype=dtype)
    V = space.tangent(X, torch.randn(shape, generator=g, dtype=dtype))
    return X, V / space.inner(X, V, V).sqrt(), g


@pytest.mark.parametrize("name, space, shape, dtype", CASES, ids=[c[0] for c in CASES])
def test_dist_gradient_at_equal_points_is_zero(name, space, shape, dtype):
    g = torch.Generator().manual_seed(0)
    X = space.sample((6,) + shape, generator=g, dtype=dtype)
    assert bool((space.dist(X, X.clone()) == 0).all())
    # eager
    Y = X.clone().requires_grad_()
    (G,) = torch.autograd.grad(space.dist(X, Y).sum(), Y)
    assert bool((G == 0).all()), float(G.abs().max())
    # torch.func.grad and vmap of it
    G = grad(lambda y: space.dist(X, y).sum())(X.clone())
    assert bool((G == 0).all()), float(G.abs().max())
    G = vmap(grad(lambda x, y: space.dist(x, y)))(X, X.clone())
    assert bool((G == 0).all()), float(G.abs().max())


@pytest.mark.parametrize("name, space, shape, dtype", [c for c in CASES if c[3] in (F64, C128)],
                         ids=[c[0] for c in CASES if c[3] in (F64, C128)])
def test_dist_gradient_next_to_equal_points_is_the_unit_direction(name, space, shape, dtype):
    X, V, _ = _point_and_unit_tangent(space, shape, dtype, 1)
    Y = space.expmap(X, 1e-8 * V)
    G = grad(lambda y: space.dist(X, y))(Y)
    assert bool(torch.isfinite(G).all())
    rg = space.egrad_to_rgrad(Y, G)
    torch.testing.assert_close(space.inner(Y, rg, rg).sqrt(), torch.ones((), dtype=F64), atol=1e-6, rtol=0)
    # pointing away from X: along the transported step
    assert float(space.inner(Y, rg, space.tangent(Y, V))) > 1 - 1e-6


@pytest.mark.parametrize("name, space, shape, dtype", [c for c in CASES if c[3] in (F64, C128)],
                         ids=[c[0] for c in CASES if c[3] in (F64, C128)])
def test_dist_gradient_matches_finite_differences(name, space, shape, dtype):
    X, V, g = _point_and_unit_tangent(space, shape, dtype, 2)
    Y = space.expmap(X, 0.3 * V)
    W = space.tangent(Y, torch.randn(shape, generator=g, dtype=dtype))
    G = grad(lambda y: space.dist(X, y))(Y)
    h = 1e-6
    fd = (space.dist(X, space.expmap(Y, h * W)) - space.dist(X, space.expmap(Y, -h * W))) / (2 * h)
    ad = (G.conj() * W).real.sum() if dtype.is_complex else (G * W).sum()
    assert abs(float(fd - ad)) < 1e-7, (float(fd), float(ad))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1e-12, 1e-17, 1e-30])
def test_psd_affine_dist_to_a_much_smaller_point(dtype, c):
    # log λ as log1p(μ), μ = λ − 1: a λ below ~ε (Y much smaller than X) made μ = −1 exactly and dist(X, Y) inf
    # (1e-17, 1e-30) or relatively off (1e-12: 8e-7), while dist(Y, X) was exact; the affine metric is symmetric
    M = gf.PSD(metric="affine")
    g = torch.Generator().manual_seed(0)
    X = M.sample((3, 3), generator=g, dtype=dtype)
    Y = (c * X).requires_grad_()
    exact = torch.tensor(3.0, dtype=F64).sqrt() * abs(torch.tensor(c, dtype=F64).log())
    tol = dict(rtol=1e-13 if dtype == torch.float64 else 1e-6, atol=0.0)
    d = M.dist(X, Y)
    torch.testing.assert_close(d.double(), exact, **tol)
    torch.testing.assert_close(M.dist(Y, X).double(), exact, **tol)
    (gY,) = torch.autograd.grad(d, Y)
    assert bool(torch.isfinite(gY).all())
