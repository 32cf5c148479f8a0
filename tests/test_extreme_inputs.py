"""Extreme raw inputs: finite raw tensors of every scale give points, non-finite ones give NaN.

The library rule (README, Conventions): a NaN/±inf raw entry gives NaN in its point (never a
plausible point), a finite raw tensor in a supported dtype gives a point on the manifold (never
all-zero, inf or NaN). Found by a fuzz pass and pinned here:

* Birkhoff turned a −inf entry of ``Z`` (or of ``V`` in ``retract``) into a finite point that
  ``contains`` accepted (exp(−inf) = 0 is a valid zero entry to the balancing). A finite −1e30
  giving an exact 0 entry is allowed (an interior point's entry may underflow to 0).
* SphereEmbedded's ``‖Z‖`` overflowed (1e20 in float32 became the zero vector) or underflowed
  (1e-25 became inf); Sphere's and Oblique's chart squared ``‖v‖`` (NaN from 1e20 in float32, 1e155
  in float64).

Checked in eager mode (the sphere's one-node fast path and its no-grad value path), under
``vmap``/``grad``/``jvp`` (the op chain) and ``torch.compile``; gradients at a normal scale against
finite differences; the scaled op chain's derivatives equal the unscaled formula's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import grad, hessian, jvp, vmap

import geofunc as gf
from reference import member
from geofunc.spaces import _sphere
from geofunc.testing import no_vmap_fallback

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
B = gf.Birkhoff()
SPHERES = [gf.Sphere(), gf.Sphere(radius=2.5), gf.SphereEmbedded(), gf.SphereEmbedded(radius=0.5), gf.Oblique()]
#: scales 1e-30..1e30 (float32 and bfloat16), 1e-300..1e300 (float64)
SCALES = {
    F32: [10.0**e for e in range(-30, 31, 5)],
    BF16: [10.0**e for e in range(-30, 31, 10)],
    F64: [10.0**e for e in range(-300, 301, 25)],
}


def _raw(space, scale, dtype, g, batch=4):
    shape = (batch, 5, 3) if isinstance(space, gf.Oblique) else (batch, 6)
    Z = torch.randn(shape, generator=g, dtype=F64)
    Z[0] = Z[0].abs()  # one point with all entries of one sign, and one with a single entry
    Z[1] = 0.0
    Z[1, ..., 2] = 1.0
    return (scale * Z).to(dtype)


def _on_manifold(space, X, what):
    assert bool(torch.isfinite(X).all()), f"{what}: non-finite output"
    assert bool((X != 0).any(-1).all()), f"{what}: an all-zero vector"
    assert bool(space.contains(X).all()), f"{what}: off the manifold, {space.check(X)}"
    if _reference_applies(space, X):
        assert member(space, X), f"{what}: off the manifold by the independent predicate"


def _reference_applies(space, X) -> bool:
    """Whether tests/reference.py's predicate can judge ``X``: its dtypes, and radii whose square
    neither overflows nor underflows (it squares norms, as the spaces no longer do)."""
    return X.dtype in (torch.float32, torch.float64) and 1e-6 <= getattr(space, "radius", 1.0) <= 1e6


# --------------------------------------------------------------------------- the sphere family
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("space", SPHERES, ids=repr)
def test_spheres_give_a_point_at_every_finite_scale(space, dtype, generator):
    with_base = not isinstance(space, gf.SphereEmbedded)
    for scale in SCALES[dtype]:
        Z = _raw(space, scale, dtype, generator)
        bases = [None]
        if with_base:
            bases.append(space.sample(Z.shape[1:], generator=generator, dtype=dtype))
        for base in bases:
            what = f"{space} at scale {scale:g}, {dtype}, base {'given' if base is not None else 'None'}"
            with torch.no_grad():  # the value path
                _on_manifold(space, space.to_manifold(Z, base), what + " (no grad)")
            Zg = Z.clone().requires_grad_()
            X = space.to_manifold(Zg, base)  # the one-node fast path (float32/float64)
            _on_manifold(space, X.detach(), what)
            (g,) = torch.autograd.grad((X * torch.linspace(-1, 1, X.shape[-1], dtype=dtype)).sum(), Zg)
            assert bool(torch.isfinite(g).all()), f"{what}: non-finite gradient"
            with no_vmap_fallback():  # the op chain
                Xv = vmap(lambda z: space.to_manifold(z, base))(Z)
            _on_manifold(space, Xv, what + " (vmap)")
            gv = vmap(grad(lambda z: (space.to_manifold(z, base) * torch.linspace(-1, 1, Z.shape[-1], dtype=dtype)).sum()))(Z)
            assert bool(torch.isfinite(gv).all()), f"{what}: non-finite gradient under vmap(grad)"
            # project and retract (already scaled) stay on the manifold too
            _on_manifold(space, space.project(Z), what + " (project)")


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_sphere_embedded_is_scale_invariant_to_the_last_bit(dtype, generator):
    # Division by the largest entry (a power of ten times the same mantissas is not exact, but the
    # result is the same unit vector to rounding) and the gradient scales as 1/c: ∇f(cZ) = ∇f(Z)/c.
    M = gf.SphereEmbedded(radius=2.0)
    Z = torch.randn(3, 7, generator=generator, dtype=F64)
    C = torch.randn(3, 7, generator=generator, dtype=F64)
    ref = M.to_manifold(Z)
    (g_ref,) = torch.autograd.grad((M.to_manifold(Z.requires_grad_()) * C).sum(), Z)
    Z = Z.detach()
    lo, hi = (-30, 30) if dtype == F32 else (-300, 300)
    tol = 1e-5 if dtype == F32 else 1e-13
    for e in range(lo, hi + 1, 10):
        c = 10.0**e
        Zc = (c * Z).to(dtype).requires_grad_()
        X = M.to_manifold(Zc)
        torch.testing.assert_close(X.double(), ref, atol=tol, rtol=tol)
        (g,) = torch.autograd.grad((X * C.to(dtype)).sum(), Zc)
        torch.testing.assert_close(g.double() * c, g_ref, atol=tol * 10, rtol=tol * 10)


def test_sphere_embedded_at_zero_stays_singular():
    # Documented: the projection chart is singular at Z = 0 (NaN there, as GeoTorch's).
    X = gf.SphereEmbedded().to_manifold(torch.tensor([[0.0, 0.0, 0.0], [1e-30, 0.0, 0.0]]))
    assert bool(X[0].isnan().all())
    torch.testing.assert_close(X[1], torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
@pytest.mark.parametrize("space", SPHERES, ids=repr)
def test_spheres_non_finite_raw_gives_nan(space, dtype, generator):
    for bad in (math.nan, math.inf, -math.inf):
        Z = _raw(space, 1.0, dtype, generator, batch=3)
        Z[1, ..., 0] = bad
        cols = isinstance(space, gf.Oblique)  # a bad entry poisons its column only
        for how, f in (
            ("no grad", lambda z: space.to_manifold(z)),
            ("grad", lambda z: space.to_manifold(z.clone().requires_grad_())),
            ("vmap", vmap(space.to_manifold)),
        ):
            with torch.no_grad() if how == "no grad" else torch.enable_grad():
                X = f(Z).detach()
            what = f"{space}, {bad} entry, {dtype}, {how}"
            bad_part = X[1, ..., 0] if cols else X[1]
            assert bool(bad_part.isnan().all()), what
            assert bool(torch.isfinite(X[[0, 2]]).all()), what
            assert not bool(space.contains(X)[1]), what
        V = torch.zeros_like(Z)
        V[1, ..., 0] = bad
        R = space.retract(space.sample(Z.shape[1:], generator=generator, dtype=dtype), V)
        assert bool((R[1, ..., 0] if cols else R[1]).isnan().all()) and bool(torch.isfinite(R[[0, 2]]).all())


def _chart_unscaled(Z, U):
    """The chart as it was written before the rescaling (exact where ‖v‖² does not overflow)."""
    V = Z - _sphere._dot(Z, U) * U
    cos, sinc = _sphere._cos_sinc_sqrt(_sphere._dot(V, V))
    return cos * U + sinc * V


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.2, 3.0, 40.0])  # ≥ 3: max|v_i| > 1, the scale m > 1
def test_scaled_chart_has_the_exact_derivatives(scale, generator):
    U = torch.randn(5, generator=generator, dtype=F64)
    U = U / U.norm()
    z = scale * torch.randn(5, generator=generator, dtype=F64)
    w = torch.randn(5, generator=generator, dtype=F64)
    f = lambda z: (_sphere._exp_chart_smooth(z, U, 1.0) * w).sum()  # noqa: E731
    f0 = lambda z: (_chart_unscaled(z, U) * w).sum()  # noqa: E731
    torch.testing.assert_close(grad(f)(z), grad(f0)(z), atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(hessian(f)(z), hessian(f0)(z), atol=1e-12, rtol=1e-11)
    # finite differences, of the op chain (torch.func), the fast node and SphereEmbedded
    Zb = (scale * torch.randn(2, 5, generator=generator, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _sphere._exp_chart_smooth(z, U, 1.5), (Zb,), check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda z: _sphere._exp_chart(z, U, 1.5), (Zb,), check_forward_ad=True)
    if scale > 0:
        Ze = (Zb.detach() + 0.1).requires_grad_()
        assert torch.autograd.gradcheck(gf.SphereEmbedded(radius=2.0).to_manifold, (Ze,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(gf.SphereEmbedded(radius=2.0).to_manifold, (Ze,))
        Zo = (scale * torch.randn(4, 3, generator=generator, dtype=F64)).requires_grad_()
        assert torch.autograd.gradcheck(gf.Oblique().to_manifold, (Zo,), check_forward_ad=True)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_sphere_derivatives_at_huge_scales_are_tangent_and_bounded(dtype, generator):
    # At ‖v‖ = 1e20 (1e200) the point's value is the rounding's (cos of a number with an ulp of 1e13),
    # but the chart's differential must still be the one of a map onto the sphere: tangent at x and
    # of norm ≤ 1 (its singular values are 1 radially and |sinc ‖v‖| across), in both the fast
    # node (backward and jvp) and the op chain (torch.func).
    S = gf.Sphere()
    for scale in ((1e20, 1e30) if dtype == F32 else (1e20, 1e200, 1e300)):
        Z = (scale * torch.randn(4, 6, generator=generator, dtype=F64)).to(dtype)
        dZ = torch.randn(4, 6, generator=generator, dtype=dtype)
        with fwad.dual_level():
            X, dX = fwad.unpack_dual(S.to_manifold(fwad.make_dual(Z, dZ)))
        X2, dX2 = jvp(S.to_manifold, (Z,), (dZ,))
        for x, dx, how in ((X, dX, "fast jvp"), (X2, dX2, "torch.func.jvp")):
            assert bool(torch.isfinite(dx).all()), how
            nrm = dx.norm(dim=-1)
            assert bool((nrm <= 1.001 * dZ.norm(dim=-1)).all()), (how, scale)
            assert float(((x * dx).sum(-1).abs() / nrm.clamp(min=1e-30)).max()) < 1e-3, (how, scale)
        Zg = Z.clone().requires_grad_()
        (g,) = torch.autograd.grad(S.to_manifold(Zg), Zg, dZ)
        assert bool(torch.isfinite(g).all()) and bool((g.norm(dim=-1) <= 1.001 * dZ.norm(dim=-1)).all())


@pytest.mark.parametrize("space", SPHERES, ids=repr)
def test_spheres_vmap_equals_the_loop(space, generator):
    # At a normal scale the op chain (vmap) and the fast path (loop) agree to rounding; at extreme
    # scales SphereEmbedded (scale-invariant) still does, the exponential chart is on the sphere
    # either way (cos of a huge ‖v‖ is the rounding's, test_spheres_give_a_point_at_every_finite_scale).
    for dtype, scales in ((F64, (1.0, 5.0, 1e-300, 1e300)), (F32, (1.0, 5.0, 1e-30, 1e30))):
        for scale in scales:
            if scale not in (1.0, 5.0) and not isinstance(space, gf.SphereEmbedded):
                continue
            Z = _raw(space, scale, dtype, generator)
            C = torch.randn(Z.shape, generator=generator, dtype=dtype)
            with no_vmap_fallback():
                got = vmap(space.to_manifold)(Z)
                gg = vmap(grad(lambda z, c: (space.to_manifold(z) * c).sum()))(Z, C)
            loop = torch.stack([space.to_manifold(z) for z in Z])
            gl = torch.stack([torch.autograd.grad((space.to_manifold(z) * c).sum(), z)[0]
                              for z, c in zip(Z.clone().requires_grad_(), C)])
            tol = 1e-12 if dtype == F64 else 1e-5
            torch.testing.assert_close(got, loop, atol=tol, rtol=tol)
            torch.testing.assert_close(gg * scale, gl * scale, atol=tol * 10, rtol=tol * 10)


def test_spheres_under_compile_at_extreme_scales():
    S, E = gf.Sphere(), gf.SphereEmbedded()
    Z = torch.tensor([[1e30, 2e30, -1e30], [1e-30, 0.0, 3e-30], [1.0, math.nan, 0.0]])
    torch._dynamo.reset()
    try:
        for M in (S, E):
            X = torch.compile(M.to_manifold, fullgraph=True, backend="aot_eager")(Z)
            _on_manifold(M, X[:2], f"{M} compiled")
            assert bool(X[2].isnan().all())
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_spheres_of_extreme_radius(dtype, generator):
    # ‖x‖ of a valid point overflowed float32 at r = 1e20 (contains was False on sample's points,
    # and a base of that radius became the zero vector), as did r² in tangent.
    radii = (1e-30, 1e-20, 1e20, 1e30) if dtype == F32 else (1e-300, 1e300)
    for r in radii:
        for M in (gf.Sphere(radius=r), gf.SphereEmbedded(radius=r)):
            X = M.sample((4, 5), generator=generator, dtype=dtype)
            Z = torch.randn(4, 5, generator=generator, dtype=dtype)
            on = (torch.linalg.vector_norm(X.double() / r, dim=-1) - 1).abs().amax() < 1e-6  # in the test, not contains
            assert bool(M.contains(X).all()) and bool(on), (M, dtype)
            Y = M.to_manifold(Z, X) if isinstance(M, gf.Sphere) else M.to_manifold(Z)
            _on_manifold(M, Y, f"{M} to_manifold")
            T = M.tangent(X, Z)
            assert float(((T * X).sum(-1).abs() / (r * T.norm(dim=-1))).max()) < 1e-5, (M, dtype)
            _on_manifold(M, M.retract(X, T), f"{M} retract")
            if isinstance(M, gf.Sphere):
                _, base = M.rebase(Z, X)
                _on_manifold(M, base, f"{M} rebase")


# --------------------------------------------------------------------------- Birkhoff
def _bad_batch(bad, generator, dtype=F64):
    Z = torch.randn(3, 4, 4, generator=generator, dtype=dtype)
    Zbad = Z.clone()
    Zbad[1, 2, 1] = bad
    return Z, Zbad


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan], ids=str)
def test_birkhoff_metric_at_a_non_finite_point_is_nan_per_matrix(bad, generator):
    """Note [NaN policy]: the Fisher metric Σ UV/X took an inf entry of X to a zero term, a finite inner product
    at a point that is not one (found by probing every entry of every map's arguments)."""
    X = B.sample((3, 4, 4), generator=generator, dtype=F64)
    U, V = (B.tangent(X, torch.randn(3, 4, 4, generator=generator, dtype=F64)) for _ in range(2))
    ref = B.inner(X, U, V)
    Xbad = X.clone()
    Xbad[1, 2, 1] = bad
    got = B.inner(Xbad, U, V)
    assert bool(got[1].isnan()) and torch.equal(got[[0, 2]], ref[[0, 2]])


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan], ids=str)
def test_birkhoff_non_finite_raw_gives_nan_per_matrix(bad, generator):
    Z, Zbad = _bad_batch(bad, generator)
    ref = B.to_manifold(Z)
    C = torch.randn(3, 4, 4, generator=generator, dtype=F64)
    keep = [0, 2]

    def check(X, how):
        assert bool(X[1].isnan().all()), how
        torch.testing.assert_close(X[keep], ref[keep], atol=1e-14, rtol=0, msg=how)
        assert B.contains(X).tolist() == [True, False, True], how

    check(B.to_manifold(Zbad), "eager")
    with torch.no_grad():
        check(B.to_manifold(Zbad), "no grad")
    with no_vmap_fallback():
        check(vmap(B.to_manifold)(Zbad), "vmap")
    # gradients and tangents of the finite neighbours are unchanged
    Zg = Zbad.clone().requires_grad_()
    X = B.to_manifold(Zg)
    check(X.detach(), "autograd")
    (g,) = torch.autograd.grad((X[keep] * C[keep]).sum(), Zg)
    Zr = Z.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((B.to_manifold(Zr)[keep] * C[keep]).sum(), Zr)
    torch.testing.assert_close(g[keep], g_ref[keep], atol=1e-12, rtol=1e-10)
    gf_ = grad(lambda z: (B.to_manifold(z)[keep] * C[keep]).sum())(Zbad)
    torch.testing.assert_close(gf_[keep], g_ref[keep], atol=1e-12, rtol=1e-10)
    X, dX = jvp(B.to_manifold, (Zbad,), (C,))
    check(X, "jvp")
    torch.testing.assert_close(dX[keep], jvp(B.to_manifold, (Z,), (C,))[1][keep], atol=1e-12, rtol=1e-10)
    # retract: a non-finite V (or X) entry gives NaN; project: a non-finite Y entry too
    Xp = B.sample((3, 4, 4), generator=generator, dtype=F64)
    V = B.tangent(Xp, C) * 0.1
    Vbad = V.clone()
    Vbad[1, 2, 1] = bad
    R, Rref = B.retract(Xp, Vbad), B.retract(Xp, V)
    assert bool(R[1].isnan().all()) and B.contains(R).tolist() == [True, False, True]
    torch.testing.assert_close(R[keep], Rref[keep], atol=1e-14, rtol=0)
    Xbad = Xp.clone()
    Xbad[1, 0, 0] = bad
    assert B.contains(B.retract(Xbad, V)).tolist() == [True, False, True]
    assert B.contains(B.project(Zbad)).tolist() == [True, False, True]
    # a non-finite base
    base = B.sample((3, 4, 4), generator=generator, dtype=F64)
    base[1, 3, 3] = bad
    assert B.contains(B.to_manifold(Z, base)).tolist() == [True, False, True]


def test_birkhoff_minus_inf_under_compile(generator):
    Z, Zbad = _bad_batch(-math.inf, generator)
    torch._dynamo.reset()
    try:
        Zg = Zbad.clone().requires_grad_()
        X = torch.compile(B.to_manifold, fullgraph=True, backend="aot_eager")(Zg)
        assert bool(X[1].isnan().all())
        torch.testing.assert_close(X[[0, 2]].detach(), B.to_manifold(Z)[[0, 2]], atol=1e-12, rtol=0)
        (g,) = torch.autograd.grad((X[[0, 2]] ** 2).sum(), Zg)
        assert bool(torch.isfinite(g[[0, 2]]).all())
        V = torch.zeros_like(Zbad)
        V[1, 0, 0] = -math.inf
        R = torch.compile(B.retract, fullgraph=True, backend="aot_eager")(B.to_manifold(Z), V)
        assert B.contains(R).tolist() == [True, False, True]
    finally:
        torch._dynamo.reset()


def test_birkhoff_huge_negative_raw_entry_is_an_allowed_zero():
    # Not a bug: exp(−1e30) = 0 is an entry of the closed polytope, and an interior point's
    # entry may underflow to 0 (the docstring's membership allows it).
    Z = torch.zeros(3, 3)
    Z[0, 0] = -1e30
    X = B.to_manifold(Z)
    assert float(X[0, 0]) == 0.0 and bool(B.contains(X))
    torch.testing.assert_close(X, torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_birkhoff_gives_a_point_or_nan_at_every_finite_scale(dtype, generator):
    """Up to raw scale 1 a point; beyond, each matrix is a point or NaN (in eager mode, where the
    balancing did not reach the limit within 256 rounds, a matrix of raw entries spread over ~1e4 and
    more: Note [Eager Newton rounds past the fixed count]; before, some doubly stochastic matrix up to 1
    off the limit), never a finite non-member."""
    for scale in SCALES[dtype]:
        Z = (scale * torch.randn(3, 5, 5, generator=generator, dtype=F64)).to(dtype)
        X = B.sample((3, 5, 5), generator=generator, dtype=dtype)
        for what, P in (("to_manifold", B.to_manifold(Z)), ("retract", B.retract(X, B.tangent(X, Z))),
                        ("project", B.project(Z))):
            nan = P.isnan().all(-1).all(-1)
            assert bool((nan | torch.isfinite(P).all(-1).all(-1)).all()), (what, scale, dtype)
            assert scale > 1.0 or not bool(nan.any()), (what, scale, dtype)
            P = P[~nan]
            assert bool(B.contains(P).all()) and (not _reference_applies(B, P) or member(B, P)), (what, scale, dtype)


def test_sl_retract_gives_nan_not_a_non_member_where_the_point_is_unrepresentable():
    """``SL.retract(X, V) = X expm(X⁻¹V)`` has cond ~e^{2‖X⁻¹V‖}: past ~1/u the computed matrix is no
    point of SL (det −1e5 at a generator norm ~54 in float64, reached by rsgd with momentum
    diverging). There it is NaN, per matrix; below, a member; never a finite matrix off SL by more
    than √ of the default tolerance (the loose bound retract judges by, so that an X off SL by a
    finite-difference step is still extended smoothly)."""
    from geofunc.spaces._base import default_atol

    M = gf.SL()
    g = torch.Generator().manual_seed(1)
    F64 = torch.float64
    X = M.sample((60, 4, 4), generator=g, dtype=F64)
    A = torch.randn(60, 4, 4, generator=g, dtype=F64)
    A = A - torch.eye(4, dtype=F64) * A.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    norms = torch.linspace(1.0, 60.0, 60, dtype=F64)
    A = A / torch.linalg.matrix_norm(A, 2)[:, None, None] * norms[:, None, None]
    R = M.retract(X, X @ A)
    finite = torch.isfinite(R).flatten(-2).all(-1)
    # membership read off the determinant directly (independent of SL's own test): det > 0 and
    # |log det| within the loose bound relative to the conditioning, as retract judges
    sign, lad = torch.linalg.slogdet(R[finite])
    cond = torch.linalg.cond(R[finite], "fro")
    assert (sign == 1).all() and (lad.abs() / cond <= default_atol(F64, 4) ** 0.5).all()  # never a finite non-member
    sign, lad = torch.linalg.slogdet(R[:10])
    assert (sign == 1).all() and (lad.abs() < 1e-9).all()  # small steps: det 1
    assert finite[:10].all() and not finite.all()  # small steps are points; some far ones are NaN
    torch.testing.assert_close(torch.vmap(M.retract)(X, X @ A), R, equal_nan=True)


# --------------------------------------------------------------------------- Cayley and CholeskyQR2
def _nan_or_member(M, X, what):
    """Per point: all NaN, or finite and on the space by the independent predicate of tests/reference.py
    (and by ``contains``): never a finite point off it."""
    nan = torch.isnan(X).flatten(-2).all(-1)
    fin = torch.isfinite(X).flatten(-2).all(-1)
    assert bool((nan | fin).all()), f"{what}: a point partly NaN"
    if bool(fin.any()):
        assert member(M, X[fin]), f"{what}: a finite point off the space, {M._measure(X)}"
        assert bool(M.contains(X)[fin].all()), f"{what}: contains refuses a finite point"
    return nan


CAYLEY = [gf.SO(triv="cayley"), gf.Stiefel(triv="cayley"), gf.Grassmannian(triv="cayley")]


@pytest.mark.parametrize("M", CAYLEY, ids=repr)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_cayley_gives_nan_not_noise_past_its_conditioning(M, dtype, generator):
    """``(I − A/2)⁻¹`` loses the identity once u‖A‖ > 1 (a singular skew matrix for odd n): SO(3) at raw
    scale 1e15 in float32 gave entries ~1e20 that ``contains`` rejected. Now NaN per matrix past
    u‖A‖₁/2 > 1/64 (Note [Cayley too far to be a point]); the batch's other matrices keep their points,
    and nothing is NaN at the scales training meets."""
    shape = (3, 3) if isinstance(M, gf.SO) else (6, 2)
    huge = {F32: [1e6, 1e15, 1e30], F64: [1e15, 1e30]}[dtype]
    for scale in huge:
        torch._dynamo.reset()
        Z = torch.randn(3, *shape, generator=generator, dtype=F64).to(dtype)
        Z[0] = Z[0] * scale
        for what, X in (("to_manifold", M.to_manifold(Z)), ("vmap", vmap(M.to_manifold)(Z)),
                        ("compile", torch.compile(M.to_manifold, fullgraph=True, backend="aot_eager")(Z))):
            nan = _nan_or_member(M, X, f"{M} {what} at {scale:g}")
            assert nan.tolist() == [True, False, False], (what, scale)
        Zg = Z.clone().requires_grad_()
        (g,) = torch.autograd.grad(M.to_manifold(Zg).sum(), Zg)
        assert bool(torch.isnan(g[0]).any()) and bool(torch.isfinite(g[1:]).all())  # (SO reads the lower triangle)
    for scale in (1.0, 30.0, 1e3):  # no false alarm
        Z = scale * torch.randn(4, *shape, generator=generator, dtype=F64).to(dtype)
        X = M.to_manifold(Z)
        assert not bool(torch.isnan(X).any()), scale
        assert member(M, X) and bool(M.contains(X).all()), scale


def test_cayley_retraction_gives_nan_not_noise():
    M = gf.SO(triv="cayley")
    X = M.sample((2, 3, 3), generator=torch.Generator().manual_seed(0))
    V = M.tangent(X, torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1)))
    V[0] *= 1e15
    assert _nan_or_member(M, M.retract(X, V), "retract").tolist() == [True, False]


@pytest.mark.parametrize("M", [gf.Stiefel(), gf.Grassmannian()], ids=repr)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_qr_retraction_gives_nan_where_the_step_has_no_qr_factor(M, dtype, generator):
    """``qf(X + V)`` by CholeskyQR2: a step of rank < k at a scale that hides ``X`` has no QR factor.
    Cholesky stopped early and the "frame" was finite and 1 to 1e29 off (a zero column); now NaN per
    matrix (Note [Numerically rank-deficient QR]), and full-rank steps, however large, keep their
    frames: also past √(largest float), where the Gram matrix of the step overflowed and a
    well-conditioned step was NaN (Note [Scale of CholeskyQR])."""
    for shape in ((5, 3), (3, 5)):
        X = M.sample((4, *shape), generator=generator, dtype=dtype)
        Z = torch.randn(4, *shape, generator=generator, dtype=F64)
        V = Z[..., :1].expand_as(Z).clone() if shape[0] < shape[1] else Z[..., :1, :].expand_as(Z).mT.mT.clone()
        V = (torch.where(torch.arange(4)[:, None, None] < 2, 1e15 * V, Z)).to(dtype)  # two rank-1 giants, two normal
        R = M.retract(X, V)
        nan = _nan_or_member(M, R, f"{M} retract {shape}")
        assert nan.tolist() == [True, True, False, False], (shape, nan)
        assert bool(_nan_or_member(M, vmap(M.retract)(X, V), "vmap").eq(nan).all())
        # large full-rank steps: frames, equal to the Q factor of a Householder QR
        for scale in (1e3, 1e20 if dtype == F32 else 1e160):
            V = scale * Z.to(dtype)
            R = M.retract(X, V)
            assert not bool(torch.isnan(R).any()), scale
            Yt = (X + V).double()
            Yt = Yt if shape[0] >= shape[1] else Yt.mT
            Q, Rq = torch.linalg.qr(Yt)
            Q = Q * torch.sign(Rq.diagonal(dim1=-2, dim2=-1))[..., None, :]
            Q = Q if shape[0] >= shape[1] else Q.mT
            tol = 1e-5 if dtype == F32 else 1e-12
            assert torch.allclose(R.double(), Q, atol=tol), (scale, (R.double() - Q).abs().max())


@pytest.mark.parametrize("M", [gf.Stiefel(), gf.Grassmannian(), gf.Stiefel(triv="cayley")], ids=repr)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_reduced_tall_chart_gives_nan_not_noise_where_the_raw_part_is_rank_deficient(M, dtype, generator):
    """A tall frame (n ≥ 2k: the 2k×2k chart) whose raw tensor's part outside the base has rank < k
    (one rank-1 SGD step from a rebase, scaled up) was finite noise: float32 0.6 to 88 off at raw norm
    1e4 and ~1e17 at 1e5; float64 7 to 450 at 1e7. Now per frame NaN past max|XᵀX − I| = 1/64 (Note
    [Reduced chart too far to be a point]) on every path: the eager one node with and without a graph,
    the op chain under vmap and torch.compile; the gradient is NaN where the value is; small raw
    tensors keep their frames."""
    far = 2.0**-6  # expm's bound (Note [Too far to be a point])
    norms = {F32: (1e1, 1e2, 1e3, 1e4, 1e5), F64: (1e2, 1e5, 1e7, 1e8)}[dtype]
    for n, k in ((6, 2), (40, 8), (96, 32)):
        torch._dynamo.reset()  # one compiled function per shape, without hitting the recompile limit
        Y = M.sample((len(norms), n, k), generator=generator, dtype=F64)
        a = torch.randn(len(norms), n, 1, generator=generator, dtype=F64)
        b = torch.randn(len(norms), 1, k, generator=generator, dtype=F64)
        Z = a @ b
        Z = (Z / Z.norm(dim=(-2, -1), keepdim=True) * torch.tensor(norms, dtype=F64)[:, None, None]).to(dtype)
        Y = Y.to(dtype)
        Zg = Z.clone().requires_grad_()
        X = M.to_manifold(Zg, Y)
        (g,) = torch.autograd.grad(X.sum(), Zg)
        paths = {"eager": X.detach(), "no grad": M.to_manifold(Z, Y), "vmap": vmap(M.to_manifold)(Z, Y),
                 "compile": torch.compile(M.to_manifold, fullgraph=True, backend="aot_eager")(Z, Y)}
        for what, P in paths.items():
            nan = torch.isnan(P).flatten(-2).all(-1)
            fin = torch.isfinite(P).flatten(-2).all(-1)
            assert bool((nan | fin).all()), what
            err = (P.mT @ P - torch.eye(k, dtype=dtype)).abs().amax((-2, -1))
            assert bool((err[fin] <= far).all()), (what, n, k, err)
            assert not bool(nan[0]), (what, "a small raw tensor lost its frame")
        if dtype == F32:  # at 1e5 every draw was noise (float64 at 1e8: some draws stay within 1/64)
            assert bool(torch.isnan(paths["eager"][-1]).all()), "the largest raw tensor still gave a frame"
        gnan = torch.isnan(g).flatten(-2).any(-1)
        assert gnan.tolist() == torch.isnan(paths["eager"]).flatten(-2).all(-1).tolist()


@pytest.mark.parametrize("M", [gf.Stiefel(), gf.Grassmannian(), gf.Stiefel(triv="cayley"), gf.LowRank(rank=2)], ids=repr)
def test_reduced_chart_check_needs_no_values_on_meta_and_fake_tensors(M):
    """The op chain's check reads the chart's balancing constants to skip itself; meta tensors (deferred
    initialization) and fake tensors (tracing) have none to read, so there it runs as ops (a first
    version called ``.item()`` on them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for shape in ((6, 2), (40, 8)):
        Z = torch.randn(shape, device="meta", requires_grad=True)
        X = M.to_manifold(Z)
        assert X.shape == shape and X.device.type == "meta"
        X.sum().backward()
        with FakeTensorMode():
            assert M.to_manifold(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_sl_refuses_a_singular_matrix_by_name(dtype):
    """``|log det X| / (‖X‖_F ‖X⁻¹‖_F)`` tends to 0 as X becomes singular, so ``Q diag(2, 1, 0) Qᵀ``
    (det 1e-8 in float32, 1e-17 in float64) was accepted by ``contains`` and ``check``, and
    ``from_manifold`` then failed naming GLp. Now it is refused as singular in its dtype (or, where the
    rounded det comes out ≤ 0, as such), by SL."""
    Q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=dtype))[0]
    X = Q @ torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=dtype)) @ Q.mT
    M = gf.SL()
    assert not bool(M.contains(X))
    for call in (M.check, M.from_manifold):
        with pytest.raises(gf.ManifoldError, match=r"^SL\(.*(singular in its dtype|det\(X\) ≤ 0)"):  # (det's rounded sign)
            call(X)
    Y = M.sample((5, 3, 3), generator=torch.Generator().manual_seed(1), dtype=dtype)
    assert bool(M.contains(Y).all())


# --------------------------------------------------------------------------- the largest float64
EXPM_CHARTS = [gf.SO(), gf.GLp(), gf.PSD(), gf.SL(), gf.Hurwitz(), gf.LowRank(rank=2), gf.FixedRank(rank=3),
               gf.AlmostOrthogonal(lam=0.5), gf.PSSD()]


@pytest.mark.parametrize("M", EXPM_CHARTS, ids=repr)
def test_exponential_charts_at_the_largest_float64_give_nan_not_an_overflow_error(M):
    """A float64 generator with entries within a factor ~n of the largest float has an α that overflows
    a Python float: the degree choice raised ``OverflowError: cannot convert float infinity to integer``
    (neither NaN nor a ManifoldError) from every exponential chart. Such a point is far past Note [Too
    far to be a point]: NaN, as at 1e30."""
    Z = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    Z = Z / Z.abs().max() * torch.finfo(F64).max
    X = M.to_manifold(Z)
    assert bool(torch.isnan(X).all())
    X0 = M.sample((3, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    _, base = M.from_manifold(X0)
    assert bool(torch.isnan(M.to_manifold(Z, base)).all())


@pytest.mark.parametrize("M", [gf.SO(), gf.Unitary()], ids=repr)
def test_multiplying_retractions_at_the_largest_float64_give_nan_not_an_overflow_error(M):
    dtype = torch.complex128 if isinstance(M, gf.Unitary) else F64
    X = M.sample((3, 3), generator=torch.Generator().manual_seed(1), dtype=dtype)
    V = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)
    V = V / V.abs().max() * torch.finfo(F64).max
    assert bool(torch.isnan(M.retract(X, V)).all())
