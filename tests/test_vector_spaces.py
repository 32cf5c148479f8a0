"""Space-specific tests of Rn, Sym, Skew, Sphere and Oblique: errors, NaN input, the sphere chart
at Z = 0 under every transform, and the Riemannian-gradient-descent identity of the sphere.

The generic contract (membership, inverses, transforms, compile...) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TIGHT
from reference import member
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import geofunc as gf
from geofunc.spaces._sphere import _S_SMALL, _cos_sinc_sqrt
from geofunc.testing import no_vmap_fallback

f64 = torch.float64
MATRIX_SPACES = [gf.Sym(), gf.Sym(lower=False), gf.Skew(), gf.Skew(lower=False), gf.Oblique()]
ALL_SPACES = [gf.Rn(), *MATRIX_SPACES, gf.Sphere(), gf.Sphere(radius=3.0)]


def _raises(fn, *fragments: str, values_ok: bool = False) -> str:
    with pytest.raises(gf.ManifoldError) as info:
        fn()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    if not values_ok:
        assert "tensor(" not in msg, f"a message must not print tensor values: {msg!r}"
    return msg


# --------------------------------------------------------------------------- construction
@pytest.mark.parametrize("radius", [0, 0.0, -1.0, math.nan, math.inf, "1", True, None, torch.tensor(1.0)])
def test_sphere_bad_radius(radius):
    # (the repr of a space built with a 0-d tensor shows it; the "got" part describes it by shape)
    _raises(lambda: gf.Sphere(radius=radius), "Sphere", "radius", "expected", "got", values_ok=True)


@pytest.mark.parametrize("cls", [gf.Sym, gf.Skew])
@pytest.mark.parametrize("lower", ["yes", 1, None])
def test_bad_lower(cls, lower):
    _raises(lambda: cls(lower=lower), cls.__name__, "lower", "bool")


def test_hyperparameters_are_hashable_values():
    assert gf.Sphere(radius=2) == gf.Sphere(radius=2.0)
    assert hash(gf.Sphere(radius=2)) == hash(gf.Sphere(radius=2.0))
    assert repr(gf.Sphere(radius=2)) == "Sphere(radius=2.0)"
    assert gf.Sym() != gf.Sym(lower=False)
    assert len({gf.Rn(), gf.Rn(), gf.Oblique(), gf.Skew(), gf.Skew()}) == 3
    with pytest.raises(Exception):
        gf.Sphere().radius = 2.0  # frozen


# --------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("space", MATRIX_SPACES, ids=repr)
def test_vector_to_matrix_space(space):
    for fn in (space.to_manifold, space.project, space.contains, space.from_manifold):
        _raises(lambda: fn(torch.zeros(3)), repr(space), "matrices", "(3,)")


@pytest.mark.parametrize("space", [gf.Sym(), gf.Skew(lower=False)], ids=repr)
def test_non_square(space):
    _raises(lambda: space.to_manifold(torch.zeros(3, 4)), repr(space), "square", "(3, 4)")
    _raises(lambda: space.sample((2, 3, 4)), repr(space), "square")
    _raises(lambda: space.tangent(torch.zeros(3, 3), torch.zeros(4, 4)), repr(space), "G")


def test_sphere_shapes():
    S = gf.Sphere()
    _raises(lambda: S.to_manifold(torch.zeros(())), "Sphere(radius=1.0)", "vectors", "()")
    _raises(lambda: S.to_manifold(torch.zeros(3, 0)), "vectors", "(3, 0)")
    _raises(lambda: S.to_manifold(torch.zeros(3, dtype=torch.int64)), "floating")
    _raises(lambda: S.to_manifold(torch.zeros(2, 3), torch.zeros(2, 4)), "base", "(2, 4)")
    _raises(lambda: S.to_manifold(torch.zeros(3), [1.0, 0.0, 0.0]), "base", "list")
    _raises(lambda: gf.Oblique().to_manifold(torch.zeros(3, 2), torch.zeros(2, 3)), "base")


@pytest.mark.parametrize("space", [gf.Rn(), gf.Sym(), gf.Skew(), gf.nn.SphereEmbeddedSpace()], ids=repr)
def test_static_spaces_reject_a_base(space):
    Z = torch.zeros(3, 3)
    _raises(lambda: space.to_manifold(Z, Z), repr(space), "base", "None")
    _raises(lambda: space.rebase(Z, Z), repr(space), "base")


def test_rn_accepts_every_float_shape_and_rejects_integers():
    R = gf.Rn()
    for shape in [(), (0,), (3,), (2, 0, 4)]:
        Z = torch.zeros(shape)
        assert R.to_manifold(Z) is Z
        assert R.contains(Z).shape == Z.shape
    _raises(lambda: R.to_manifold(torch.zeros(3, dtype=torch.int32)), "Rn()", "floating")


def test_check_names_the_violation():
    msg = _raises(lambda: gf.Sphere(radius=2.0).check(torch.ones(2, 3)), "Sphere(radius=2.0)", "‖x‖", "atol", "(0,)")
    assert "(2, 3)" in msg
    _raises(lambda: gf.Oblique().check(2 * torch.eye(3)), "Oblique()", "‖X[:, j]‖")
    _raises(lambda: gf.Sym().check(torch.tensor([[0.0, 1.0], [0.0, 0.0]])), "Sym(lower=True)", "X − Xᵀ")
    _raises(lambda: gf.Skew().check(torch.eye(2)), "Skew(lower=True)", "X + Xᵀ")
    _raises(lambda: gf.Rn().check(torch.tensor([0.0, math.inf])), "Rn()", "non-finite", "(1,)")


# ------------------------------------------------------------------------------ the maps
def test_sym_skew_frames(generator):
    Z = torch.randn(2, 4, 4, generator=generator, dtype=f64)
    L, U = torch.tril(Z), torch.triu(Z)
    assert torch.equal(gf.Sym().to_manifold(Z), L + torch.tril(Z, -1).mT)
    assert torch.equal(gf.Sym(lower=False).to_manifold(Z), U + torch.triu(Z, 1).mT)
    assert torch.equal(gf.Skew().to_manifold(Z), torch.tril(Z, -1) - torch.tril(Z, -1).mT)
    assert torch.equal(gf.Skew(lower=False).to_manifold(Z), torch.triu(Z, 1) - torch.triu(Z, 1).mT)
    for space, tri in [(gf.Sym(), L), (gf.Sym(lower=False), U), (gf.Skew(), torch.tril(Z, -1))]:
        X = space.to_manifold(Z)
        Z2, base = space.from_manifold(X)
        assert base is None and torch.equal(Z2, tri)
        assert torch.equal(space.rebase(Z, None)[0], tri)
        assert torch.equal(space.project(X), X)


def test_oblique_is_the_sphere_on_columns(generator):
    Z = torch.randn(2, 3, 6, generator=generator, dtype=f64)  # wide: no transposition
    B = gf.Oblique().sample((2, 3, 6), generator=generator, dtype=f64)
    O, S = gf.Oblique(), gf.Sphere()
    torch.testing.assert_close(O.to_manifold(Z, B), S.to_manifold(Z.mT, B.mT).mT, rtol=0, atol=TIGHT)
    torch.testing.assert_close(O.to_manifold(Z), S.to_manifold(Z.mT).mT, rtol=0, atol=TIGHT)
    torch.testing.assert_close(O.tangent(B, Z), S.tangent(B.mT, Z.mT).mT, rtol=0, atol=TIGHT)
    torch.testing.assert_close(O.retract(B, Z), S.retract(B.mT, Z.mT).mT, rtol=0, atol=TIGHT)
    torch.testing.assert_close(torch.linalg.vector_norm(O.project(Z), dim=-2), torch.ones(2, 6, dtype=f64))


def test_sphere_radius_scales_the_maps(generator):
    Z = torch.randn(4, 5, generator=generator, dtype=f64)
    for r in (0.5, 3.0):
        torch.testing.assert_close(gf.Sphere(radius=r).to_manifold(Z), r * gf.Sphere().to_manifold(Z))
        torch.testing.assert_close(gf.Sphere(radius=r).project(Z), r * gf.Sphere().project(Z))


def test_project_at_zero_is_canonical_with_zero_gradient():
    for r in (1.0, 2.5):
        S = gf.Sphere(radius=r)
        Y = torch.zeros(2, 3, dtype=f64, requires_grad=True)
        X = S.project(Y)
        assert torch.equal(X.detach(), torch.tensor([[r, 0.0, 0.0]] * 2, dtype=f64))
        (gY,) = torch.autograd.grad(X.sum(), Y)
        assert torch.equal(gY, torch.zeros_like(gY))
        x = S.sample((3,), dtype=f64)
        assert torch.equal(S.retract(x, -x), torch.tensor([r, 0.0, 0.0], dtype=f64))
    col = gf.Oblique().project(torch.tensor([[0.0, 3.0], [0.0, 4.0]]))
    assert torch.equal(col, torch.tensor([[1.0, 0.6], [0.0, 0.8]]))


# ------------------------------------------------------------------------------ NaN input
def test_nan_propagates_per_point(generator):
    S = gf.Sphere()
    Z = torch.randn(3, 4, generator=generator)
    Z[1, 2] = math.nan
    for out in (S.to_manifold(Z), S.project(Z), S.to_manifold(Z, S.sample((3, 4), generator=generator))):
        assert torch.isnan(out[1]).all()
        assert torch.isfinite(out[[0, 2]]).all()
    assert S.contains(S.to_manifold(Z)).tolist() == [True, False, True]
    Z[1, 2] = math.inf
    assert S.contains(S.to_manifold(Z)).tolist() == [True, False, True]

    O = gf.Oblique()
    Zo = torch.randn(4, 3, generator=generator)
    Zo[0, 1] = math.nan
    X = O.to_manifold(Zo)
    assert torch.isnan(X[:, 1]).all() and torch.isfinite(X[:, [0, 2]]).all()
    assert not bool(O.contains(X))


def test_nan_in_sym_skew_reads_only_the_triangle():
    Z = torch.zeros(3, 3)
    Z[2, 0] = math.nan  # in the lower triangle: read
    X = gf.Sym().to_manifold(Z)
    assert torch.isnan(X[2, 0]) and torch.isnan(X[0, 2]) and not bool(gf.Sym().contains(X))
    assert not bool(gf.Skew().contains(gf.Skew().to_manifold(Z)))
    Z = torch.zeros(3, 3)
    Z[0, 2] = math.nan  # upper triangle: not read by the lower frame (documented)
    assert torch.equal(gf.Sym().to_manifold(Z), torch.zeros(3, 3))
    assert torch.isnan(gf.Sym(lower=False).to_manifold(Z)).any()
    assert torch.isnan(gf.Sym().project(Z)).any()


def test_rn_nan_passes_through():
    Z = torch.tensor([[1.0, math.nan], [math.inf, -2.0]])
    assert gf.Rn().to_manifold(Z) is Z
    assert gf.Rn().contains(Z).tolist() == [[True, False], [False, True]]


# ------------------------------------------------------------------ the sphere chart at 0
def test_series_branch_matches_the_exact_formula():
    s = torch.tensor([0.0, 1e-300, 1e-12, 1e-4, 0.05, _S_SMALL * (1 - 1e-9), _S_SMALL, 0.5, 4.0, 1e4], dtype=f64)
    cos, sinc = _cos_sinc_sqrt(s)
    t = s.sqrt()
    exact_sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    torch.testing.assert_close(cos, torch.cos(t), rtol=0, atol=1e-15)
    torch.testing.assert_close(sinc, exact_sinc, rtol=0, atol=1e-15)
    # derivatives in s agree across the branch point (d/ds cos√s = −sinc√s / 2)
    sp = torch.tensor([_S_SMALL * (1 - 1e-9), _S_SMALL * (1 + 1e-9)], dtype=f64)
    dcos = vmap(grad(lambda x: _cos_sinc_sqrt(x)[0]))(sp)
    torch.testing.assert_close(dcos, -0.5 * _cos_sinc_sqrt(sp)[1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_sphere_derivatives_at_zero(radius, generator):
    S = gf.Sphere(radius=radius)
    base = S.sample((5,), generator=generator, dtype=f64)
    u = base / radius
    P = torch.eye(5, dtype=f64) - torch.outer(u, u)
    c = torch.randn(5, generator=generator, dtype=f64)
    Z0 = torch.zeros(5, dtype=f64)

    def f(z):
        return S.to_manifold(z, base)

    torch.testing.assert_close(f(Z0), base, rtol=0, atol=TIGHT)
    torch.testing.assert_close(grad(lambda z: (f(z) * c).sum())(Z0), radius * P @ c, rtol=0, atol=TIGHT)
    torch.testing.assert_close(jacfwd(f)(Z0), radius * P, rtol=0, atol=TIGHT)
    torch.testing.assert_close(jacrev(f)(Z0), radius * P, rtol=0, atol=TIGHT)
    # d²X/dZ² at 0 in direction w: −r ‖P w‖² u (the geodesic's acceleration)
    w = torch.randn(5, generator=generator, dtype=f64)
    H = hessian(lambda z: (f(z) * c).sum())(Z0)
    torch.testing.assert_close(w @ H @ w, -radius * (P @ w).square().sum() * (u @ c), rtol=0, atol=1e-10)
    # batched: vmap of jacfwd and of grad at a stack of zeros, no per-sample fallback
    bases = S.sample((3, 5), generator=generator, dtype=f64)
    with no_vmap_fallback():
        J = vmap(jacfwd(lambda z, b: S.to_manifold(z, b)))(torch.zeros(3, 5, dtype=f64), bases)
        g = vmap(grad(lambda z, b: (S.to_manifold(z, b) * c).sum()))(torch.zeros(3, 5, dtype=f64), bases)
    for i in range(3):
        ui = bases[i] / radius
        Pi = torch.eye(5, dtype=f64) - torch.outer(ui, ui)
        torch.testing.assert_close(J[i], radius * Pi, rtol=0, atol=TIGHT)
        torch.testing.assert_close(g[i], radius * Pi @ c, rtol=0, atol=TIGHT)
    for at in (Z0, 1e-8 * w, 0.3 * w / w.norm()):  # 0, deep in the series branch, at its edge
        z = at.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(f, (z,))
        assert torch.autograd.gradgradcheck(f, (z,))


@pytest.mark.parametrize("radius", [1.0, 0.3, 4.0])
def test_sphere_rgd_identity(radius, generator):
    """One SGD step of size η on Z at 0, then rebase: x⁺ = r Exp_u(−η r P_u g) (float64, 1e-12)."""
    S = gf.Sphere(radius=radius)
    A = torch.randn(6, 6, generator=generator, dtype=f64)
    A = A + A.mT

    def loss(x):
        return 0.5 * x @ A @ x + x.sum()

    x = S.sample((6,), generator=generator, dtype=f64)
    Z, base = S.from_manifold(x)
    eta = 0.05
    Z = Z - eta * grad(lambda z: loss(S.to_manifold(z, base)))(Z)
    Z, x_new = S.rebase(Z, base)
    assert torch.equal(Z, torch.zeros_like(Z))

    u = x / radius
    g = A @ x + 1.0  # Euclidean gradient at x
    w = -eta * radius * (g - (g @ u) * u)
    nw = w.norm()
    expected = radius * (torch.cos(nw) * u + torch.sin(nw) / nw * w)
    torch.testing.assert_close(x_new, expected, rtol=0, atol=TIGHT)
    torch.testing.assert_close(S.to_manifold(Z, x_new), expected, rtol=0, atol=TIGHT)


def test_long_rebase_runs_do_not_drift(generator):
    S = gf.Sphere(radius=2.0)
    Z, base = S.from_manifold(S.sample((8, 16), generator=generator))
    for _ in range(300):
        Z, base = S.rebase(Z + 0.1 * torch.randn(8, 16, generator=generator), base)
    err = (torch.linalg.vector_norm(base, dim=-1) - 2.0).abs().max()
    assert err < 1e-5, err


def test_sphere_large_raw_input_stays_on_the_sphere(generator):
    S = gf.Sphere()
    Z = 1e4 * torch.randn(100, 7, generator=generator)
    assert member(S, S.to_manifold(Z))
    assert member(gf.Oblique(), gf.Oblique().to_manifold(Z))


@pytest.mark.parametrize("scale", [1e-30, 1e-42, 1e20, 1e30])
def test_project_and_retract_of_tiny_and_huge_vectors(scale):
    # ‖Y‖ underflowed to 0 (Y = 1e-30·(1, 1, 0) became the canonical e_1, a wrong but plausible
    # point) or overflowed to inf (Y = 1e20·(1, 2, 0) became the zero vector) in float32.
    for dtype in (torch.float32, f64):
        Y = scale * torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, -4.0]], dtype=dtype)
        if not bool(torch.isfinite(Y).all()) or not bool((Y[:, 0] != 0).all()):
            continue  # not representable in this dtype
        expected = torch.tensor([[1.0, 2.0, 0.0], [0.6, 0.0, -0.8]], dtype=f64)
        expected[0] /= math.sqrt(5.0)
        for r in (1.0, 2.5):
            S = gf.Sphere(radius=r)
            torch.testing.assert_close(S.project(Y).double(), r * expected, atol=1e-6, rtol=1e-6)
            if scale > 1:  # X + V = Y exactly only where X is negligible next to V
                x = S.sample((2, 3), dtype=dtype)
                torch.testing.assert_close(S.retract(x, Y - x).double(), r * expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gf.Oblique().project(Y.mT).double(), expected.mT, atol=1e-6, rtol=1e-6)
    # the gradient of a rescaled normalization is still the exact one
    Y = torch.tensor([0.3, -1.2, 0.5], dtype=f64, requires_grad=True)
    S = gf.Sphere(radius=2.0)
    C = torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    (g,) = torch.autograd.grad((S.project(Y) * C).sum(), Y)
    y = Y.detach()
    n = torch.linalg.vector_norm(y)
    torch.testing.assert_close(g, 2.0 * (C / n - y * (y @ C) / n**3))
    H = hessian(lambda t: (S.project(t) * C).sum())(Y.detach())
    Hr = hessian(lambda t: (2.0 * t / torch.linalg.vector_norm(t) * C).sum())(Y.detach())
    torch.testing.assert_close(H, Hr)


@pytest.mark.parametrize("space", ALL_SPACES, ids=repr)
def test_sample_device_dtype_and_generator(space, generator):
    shape = (2, 3) if space.point_ndim < 2 or isinstance(space, gf.Oblique) else (2, 3, 3)
    X = space.sample(shape, generator=generator, dtype=f64, device="cpu")
    assert X.shape == shape and X.dtype == f64 and X.device.type == "cpu"
    Y = space.sample(shape, generator=torch.Generator().manual_seed(1))
    assert Y.dtype == torch.get_default_dtype()
    assert torch.equal(Y, space.sample(shape, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("space, shape, dtype", [
    (gf.Hermitian(), (3, 4, 4), torch.complex128), (gf.Rn(), (5,), torch.complex128), (gf.Sym(), (2, 3, 3), torch.float64),
])
def test_flat_spaces_geodesics_are_straight_lines(space, shape, dtype, generator):
    """The linear spaces' closed forms (complex ones too, which the real harness cases do not reach):
    ``logmap`` inverts ``expmap``, ``dist`` is the norm of the difference, ``expmap`` projects ``V``."""
    X = space.sample(shape, generator=generator, dtype=dtype)
    Y = space.sample(shape, generator=generator, dtype=dtype)
    torch.testing.assert_close(space.expmap(X, space.logmap(X, Y)), Y, atol=1e-13, rtol=0)
    norm_dims = (-2, -1) if space.point_ndim == 2 else ()
    want = (Y - X).abs() if not norm_dims else torch.linalg.vector_norm(Y - X, dim=norm_dims)
    torch.testing.assert_close(space.dist(X, Y), want, atol=1e-13, rtol=0)
    G = torch.randn(shape, generator=generator, dtype=dtype)
    torch.testing.assert_close(space.expmap(X, G), space.retract(X, G), atol=0, rtol=0)


@pytest.mark.parametrize("space", [gf.Sphere(), gf.Sphere(radius=3.0), gf.SphereEmbedded()], ids=repr)
def test_long_float32_vectors_are_on_the_sphere_to_rounding(space):
    """A float32 vector of 2²⁰ entries (Note [Norms of long float32 vectors]): ``torch.linalg.vector_norm``
    accumulated its squares with a relative error ~1e-5 at this length, so ``sample``, ``project``,
    ``retract`` and the chart at a base gave points ~1e-5 off the sphere, where the chart without a
    base (a float64 sum) gave 1e-7. Measured in float64, each is now within 1e-6."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    r = space.radius
    X = space.sample((n,), generator=g)
    G = torch.randn(n, generator=g)
    Z, base = space.from_manifold(X)
    points = {"sample": X, "project": space.project(G), "retract": space.retract(X, space.tangent(X, G)),
              "to_manifold at a base": space.to_manifold(Z + 1e-3 * G, base)}
    for name, P in points.items():
        err = abs(torch.linalg.vector_norm(P.double()).item() / r - 1.0)
        assert err <= 1e-6, (name, err)
