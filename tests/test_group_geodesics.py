"""The closed-form geodesics of the orthogonal family (``SO``, ``Unitary``: Note [The group's
geodesics] in ``geofunc/spaces/_orthogonal.py``; ``Grassmannian`` and ``Stiefel``: their Notes)
beyond the conformance harness (which runs them on the real cases): rotation angles against scipy,
complex frames, Edelman's formulas, the geodesic equation. Membership by ``tests/reference.py``."""

from __future__ import annotations

import math

import pytest
import torch
from reference import member

import geofunc as gf

F64 = torch.float64


def test_so3_distance_is_root_two_times_the_rotation_angle(generator):
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    S = gf.SO()
    X = S.sample((20, 3, 3), generator=generator, dtype=F64)
    Y = S.sample((20, 3, 3), generator=generator, dtype=F64)
    angle = torch.from_numpy(Rotation.from_matrix((X.mT @ Y).numpy()).magnitude())
    torch.testing.assert_close(S.dist(X, Y), math.sqrt(2.0) * angle, atol=1e-10, rtol=0)


@pytest.mark.parametrize("space, dtype", [(gf.SO(), F64), (gf.Unitary(), torch.complex128)])
def test_expmap_walks_at_unit_speed_and_dist_measures_it(space, dtype, generator):
    """``dist(X, expmap(X, tV)) = t`` for ``V`` of unit length up to the injectivity radius (π for
    a rotation angle), ``expmap`` is the chart at base ``X`` of the skew generator, on the group."""
    X = space.sample((4, 5, 5), generator=generator, dtype=dtype)
    G = torch.randn(X.shape, generator=generator, dtype=dtype)
    V = space.tangent(X, G)
    V = V / space.inner(X, V, V).sqrt()[..., None, None]
    for t in (1e-6, 1e-2, 0.5, 2.0):
        Y = space.expmap(X, t * V)
        assert member(space, Y, 1e-10)
        torch.testing.assert_close(space.dist(X, Y), torch.full((4,), t, dtype=F64), atol=1e-9, rtol=0)
        torch.testing.assert_close(space.dist(Y, X), torch.full((4,), t, dtype=F64), atol=1e-9, rtol=0)
    A = X.mH @ V
    torch.testing.assert_close(space.expmap(X, V), X @ torch.linalg.matrix_exp(A), atol=1e-12, rtol=0)


def test_the_cayley_group_keeps_the_exponential_geodesics(generator):
    """``triv`` chooses the chart and the retraction; ``expmap`` is the group's exponential either way."""
    X = gf.SO().sample((3, 3), generator=generator, dtype=F64)
    V = gf.SO().tangent(X, torch.randn(3, 3, generator=generator, dtype=F64))
    torch.testing.assert_close(gf.SO(triv="cayley").expmap(X, V), gf.SO().expmap(X, V), atol=1e-13, rtol=0)
    assert not torch.allclose(gf.SO(triv="cayley").retract(X, V), gf.SO().expmap(X, V), atol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((7, 3), F64), ((2, 3, 8), F64), ((6, 2), torch.complex128)])
def test_grassmannian_geodesics(shape, dtype, generator):
    """``expmap`` is Edelman's geodesic (the subspace of ``X W cos Σ Wᴴ + U sin Σ Wᴴ``, ``V = UΣWᴴ``),
    ``dist`` measures it at unit speed up to π/2 per principal angle, wide frames (rows) too, for
    every ``triv``; tiny angles are accurate (``arccos`` would give 0)."""
    G = gf.Grassmannian()
    X = G.sample(shape, generator=generator, dtype=dtype)
    V = G.tangent(X, torch.randn(X.shape, generator=generator, dtype=dtype))
    V = V / G.inner(X, V, V).sqrt()[..., None, None]
    for t in (1e-9, 1e-3, 0.3, 1.0):
        Y = G.expmap(X, t * V)
        assert member(G, Y, 1e-10)
        d = G.dist(X, Y)
        torch.testing.assert_close(d, torch.full_like(d, t), atol=1e-12 if t < 1e-2 else 1e-9, rtol=1e-7)
    Xt, Vt = (X, V) if shape[-2] >= shape[-1] else (X.mT, V.mT)
    U, S, Wh = torch.linalg.svd(Vt, full_matrices=False)
    E = (Xt @ Wh.mH) * torch.cos(S)[..., None, :] @ Wh + (U * torch.sin(S)[..., None, :]) @ Wh
    Y = G.expmap(X, V)
    Yt = Y if shape[-2] >= shape[-1] else Y.mT
    torch.testing.assert_close(Yt @ Yt.mH, E @ E.mH, atol=1e-12, rtol=0)  # the same subspace
    torch.testing.assert_close(gf.Grassmannian(triv="cayley").expmap(X, V), Y, atol=1e-12, rtol=0)


def test_grassmannian_dist_of_one_point_spaces_and_its_gradient_at_a_coincidence(generator):
    G = gf.Grassmannian()
    X = G.sample((4, 4), generator=generator, dtype=F64)  # Gr(4, 4): one point
    Q = gf.SO().sample((4, 4), generator=generator, dtype=F64)
    assert float(G.dist(X, X @ Q)) < 1e-7
    Xe = torch.zeros(5, 0, dtype=F64)  # Gr(5, 0): the empty frame
    assert G.dist(Xe, Xe).shape == () and float(G.dist(Xe, Xe)) == 0.0
    Xr = G.sample((6, 2), generator=generator, dtype=F64).requires_grad_()
    G.dist(Xr, Xr.detach()).backward()  # repeated principal angles (all 0): still a finite gradient
    assert torch.isfinite(Xr.grad).all()


@pytest.mark.parametrize("shape, dtype", [((7, 3), F64), ((2, 2, 6), F64), ((5, 2), torch.complex128), ((4, 4), F64)])
def test_stiefel_expmap_is_a_geodesic_of_the_embedded_metric(shape, dtype, generator):
    """``t ↦ expmap(X, tV)`` has constant speed ``‖V‖`` and its acceleration is normal to the manifold
    (``tangent(Y, Ÿ) = 0``, central differences), which a mere retraction (the QR one) fails; on
    square frames it is the orthogonal group's ``X expm(XᴴV)``."""
    S = gf.Stiefel()
    X = S.sample(shape, generator=generator, dtype=dtype)
    V = S.tangent(X, torch.randn(X.shape, generator=generator, dtype=dtype))
    speed = S.inner(X, V, V).sqrt()
    h = 1e-4
    for t in (0.0, 0.4, 1.3):
        Y = S.expmap(X, t * V)
        assert member(S, Y, 1e-10)
        Yp, Ym = S.expmap(X, (t + h) * V), S.expmap(X, (t - h) * V)
        vel, acc = (Yp - Ym) / (2 * h), (Yp - 2 * Y + Ym) / h**2
        torch.testing.assert_close(S.inner(Y, vel, vel).sqrt(), speed, atol=1e-7, rtol=1e-7)
        tang = S.tangent(Y, acc)
        scale = torch.linalg.vector_norm(acc.flatten(-2), dim=-1).clamp(min=1.0)
        assert bool((torch.linalg.vector_norm(tang.flatten(-2), dim=-1) <= 1e-5 * scale).all()), t
        R = S.retract(X, t * V)
        if t > 1 and shape[-2] != shape[-1]:  # the QR retraction is not a geodesic
            Rp, Rm = S.retract(X, (t + h) * V), S.retract(X, (t - h) * V)
            racc = S.tangent(R, (Rp - 2 * R + Rm) / h**2)
            assert bool((torch.linalg.vector_norm(racc.flatten(-2), dim=-1) > 1e-3).any())
    if shape[-2] == shape[-1]:
        torch.testing.assert_close(S.expmap(X, V), gf.SO().expmap(X, V), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- logarithms
def _unit(space, X, generator):
    V = space.tangent(X, torch.randn(X.shape, generator=generator, dtype=X.dtype))
    return V / space.inner(X, V, V).sqrt()[..., None, None]


@pytest.mark.parametrize("space, shape, dtype, ts", [
    (gf.SO(), (3, 5, 5), F64, (0.0, 1e-9, 1e-3, 0.5, 2.0, 3.0)),
    (gf.SO(triv="cayley"), (2, 4, 4), F64, (1e-3, 2.0)),
    (gf.Unitary(), (3, 4, 4), torch.complex128, (0.0, 1e-9, 0.5, 2.0, 3.0)),
    (gf.Grassmannian(), (3, 7, 3), F64, (0.0, 1e-9, 1e-3, 0.5, 1.0, 1.5)),
    (gf.Grassmannian(), (2, 2, 6), F64, (1e-3, 1.0)),
    (gf.Grassmannian(), (2, 5, 2), torch.complex128, (1e-9, 0.5, 1.5)),
])
def test_logmap_inverts_expmap_up_to_the_cut_locus(space, shape, dtype, ts, generator):
    """``logmap(X, expmap(X, tV)) = tV`` for ``V`` of unit length, ``t`` up to near the injectivity
    radius (π for SO/Unitary: here the largest rotation angle is at most t; π/2 for the Grassmannian's
    largest principal angle), tangent at ``X``, and ``‖logmap‖ = dist``."""
    X = space.sample(shape, generator=generator, dtype=dtype)
    V = _unit(space, X, generator)
    for t in ts:
        L = space.logmap(X, space.expmap(X, t * V))
        assert L.shape == X.shape and L.dtype == X.dtype
        torch.testing.assert_close(L, t * V, atol=1e-12 * max(1.0, t / (math.pi - t) if isinstance(space, (gf.SO, gf.Unitary)) else 1.0),
                                   rtol=1e-9)
        torch.testing.assert_close(space.tangent(X, L), L, atol=1e-12, rtol=0)
    Y = space.sample(shape, generator=generator, dtype=dtype)
    if not isinstance(space, gf.Grassmannian):  # random rotations: angles below π
        L = space.logmap(X, Y)
        torch.testing.assert_close(space.inner(X, L, L).sqrt(), space.dist(X, Y), atol=1e-10, rtol=0)
        torch.testing.assert_close(space.expmap(X, L), Y, atol=1e-10, rtol=0)


def test_so3_logmap_is_scipys_rotation_vector(generator):
    """``log(XᵀY)`` is the hat matrix of the rotation vector of ``XᵀY`` (scipy), angles up to 3.1."""
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    X = gf.SO().sample((30, 3, 3), generator=generator, dtype=F64)
    rv = torch.randn(30, 3, generator=generator, dtype=F64)
    rv = rv / rv.norm(dim=-1, keepdim=True) * torch.linspace(0.0, 3.1, 30, dtype=F64)[:, None]
    Y = X @ torch.from_numpy(Rotation.from_rotvec(rv.numpy()).as_matrix())
    w = torch.from_numpy(Rotation.from_matrix((X.mT @ Y).numpy()).as_rotvec())
    Z = torch.zeros(30, dtype=F64)
    hat = torch.stack([torch.stack([Z, -w[:, 2], w[:, 1]], -1), torch.stack([w[:, 2], Z, -w[:, 0]], -1),
                       torch.stack([-w[:, 1], w[:, 0], Z], -1)], -2)
    torch.testing.assert_close(X.mT @ gf.SO().logmap(X, Y), hat, atol=1e-11, rtol=0)


def test_grassmannian_logmap_depends_only_on_the_subspaces(generator):
    """Another frame ``YQ`` of the same subspace (``Q`` orthogonal, unitary for complex frames) has the
    same logarithm; Gr(n, n) and the empty frame give 0."""
    G = gf.Grassmannian()
    for dtype, group in ((F64, gf.SO()), (torch.complex128, gf.Unitary())):
        X, Y = (G.sample((6, 3), generator=generator, dtype=dtype) for _ in range(2))
        Q = group.sample((3, 3), generator=generator, dtype=dtype)
        torch.testing.assert_close(G.logmap(X, Y @ Q), G.logmap(X, Y), atol=1e-12, rtol=0)
        torch.testing.assert_close(G.logmap(X @ Q, Y), G.logmap(X, Y) @ Q, atol=1e-12, rtol=0)  # the horizontal lift at XQ
    X = G.sample((4, 4), generator=generator, dtype=F64)
    assert float(G.logmap(X, X @ gf.SO().sample((4, 4), generator=generator, dtype=F64)).abs().max()) < 1e-12
    assert G.logmap(torch.zeros(5, 0, dtype=F64), torch.zeros(5, 0, dtype=F64)).shape == (5, 0)


def _isoclinic(space, X, generator, angle=0.7):
    """A point at two equal nonzero angles from ``X`` (a repeated eigenvalue pair of XᵀY, or two equal
    principal angles): where the logarithm's second derivative needs the spectral map's own second
    derivative, not only its divided differences."""
    if isinstance(space, gf.Grassmannian):
        n, k = X.shape
        P = torch.linalg.qr(torch.cat([X, torch.randn(n, n - k, generator=generator, dtype=F64)], -1)).Q[:, k:k + 2]
        P = P - X @ (X.mT @ P)
        P = torch.linalg.qr(P).Q
        V = P @ torch.eye(2, k, dtype=F64)
        return space.expmap(X, angle * V)
    A = torch.zeros(4, 4, dtype=F64)
    A[0, 1], A[2, 3] = angle, angle
    Q = gf.SO().sample((4, 4), generator=generator, dtype=F64)
    return X @ Q @ torch.linalg.matrix_exp(A - A.mT) @ Q.mT


@pytest.mark.parametrize("space, shape", [(gf.SO(), (4, 4)), (gf.Grassmannian(), (6, 3))])
@pytest.mark.parametrize("where", ["generic", "coincident", "repeated"])
def test_logmap_derivatives_are_exact_where_eigenvalues_repeat(space, shape, where, generator):
    """First and second derivatives of ``logmap`` in both arguments, at a generic pair, at ``Y = X``
    (every eigenvalue or principal angle repeats) and at two equal nonzero angles: gradcheck (float64);
    second directional derivatives from plain autograd (double backward) and from ``torch.func``
    (forward over forward) against central second differences of the values (step 1e-4: truncation and
    rounding both ~1e-8; ``gradgradcheck``'s differences of gradients are noise at a repeated eigenvalue,
    where the eigenvectors at the perturbed points are ill-conditioned, so it runs at the generic pair
    only). A spectral map whose second derivative is dropped is off by O(1) here. The Riemannian gradient
    of ``½ dist²(·, Y)`` is ``−logmap(·, Y)``."""
    X = space.sample(shape, generator=generator, dtype=F64)
    Y = {"generic": space.expmap(X, 0.8 * _unit(space, X, generator)), "coincident": X.clone(),
         "repeated": _isoclinic(space, X, generator)}[where]
    W = torch.randn(shape, generator=generator, dtype=F64)

    def f(X, Y):
        return (W * space.logmap(X, Y)).sum()

    Xr, Yr = X.clone().requires_grad_(), Y.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda X, Y: space.logmap(X, Y), (Xr, Yr))
    if where == "generic":
        assert torch.autograd.gradgradcheck(f, (Xr, Yr))
    h = 1e-4
    for _ in range(3):
        D = (torch.randn(shape, generator=generator, dtype=F64), torch.randn(shape, generator=generator, dtype=F64))
        fd = (f(X + h * D[0], Y + h * D[1]) - 2 * f(X, Y) + f(X - h * D[0], Y - h * D[1])) / h**2
        ff = torch.func.jvp(lambda X, Y: torch.func.jvp(f, (X, Y), D)[1], (X, Y), D)[1]
        g = torch.autograd.grad(f(Xr, Yr), (Xr, Yr), create_graph=True)
        g2 = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, D)), (Xr, Yr))
        ab = sum((gi * di).sum() for gi, di in zip(g2, D))
        tol = 1e-5 * max(1.0, float(fd.abs()))
        assert abs(float(ff - fd)) < tol and abs(float(ab - fd)) < tol, (float(fd), float(ff), float(ab))
    half_sq = 0.5 * space.inner(Xr, space.logmap(Xr, Y), space.logmap(Xr, Y))
    (G,) = torch.autograd.grad(half_sq, Xr)
    torch.testing.assert_close(space.egrad_to_rgrad(X, G), -space.logmap(X, Y), atol=1e-10, rtol=0)


@pytest.mark.parametrize("space, dtype", [(gf.SO(), torch.float32), (gf.Unitary(), torch.complex64),
                                          (gf.SO(), torch.float64), (gf.Unitary(), torch.complex128)],
                         ids=["SO-f32", "U-c64", "SO-f64", "U-c128"])
def test_logmap_of_rounded_points_near_the_cut_locus(space, dtype):
    """Note [Group logarithms of rounded points]: points on their group only to their rounding, at
    rotation angles up to ~π − 1e-3, where the log is well defined. θ/sin θ read from 1 − cos²θ lost
    η/(π − θ)² (η the points' distance from the group): float32/complex64 logmaps were up to 1.1 off
    (some NaN) on 4,000 Haar pairs of 4×4, and complex128 copies of complex64 points 0.03 off."""
    g = torch.Generator().manual_seed(5)
    X, Y = space.sample((4000, 4, 4), generator=g, dtype=dtype), space.sample((4000, 4, 4), generator=g, dtype=dtype)
    L = space.logmap(X, Y)
    low = dtype in (torch.float32, torch.complex64)
    # the angles reached (the closest to π among 4,000 pairs), so that the test is near the cut locus
    phases = torch.linalg.eigvals((X.mH @ Y).to(torch.complex128)).angle().abs().amax(-1)
    assert float(math.pi - phases.max()) < 1e-2
    err = (space.expmap(X, L) - Y).abs().amax((-2, -1))
    assert bool(torch.isfinite(err).all())
    assert float(err.max()) <= (2e-4 if low else 1e-7)
    # a complex128 copy of complex64 points (off the group by their rounding) takes the same log
    if dtype == torch.complex64:
        Lw = space.logmap(X.to(torch.complex128), Y.to(torch.complex128))
        assert float((Lw - L.to(torch.complex128)).abs().max()) <= 2e-4


@pytest.mark.parametrize("space, dtype", [(gf.SO(), torch.float64), (gf.Unitary(), torch.complex128)],
                         ids=["SO-f64", "U-c128"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_logmap_within_1e_8_of_the_cut_locus(space, dtype, n):
    """Note [Group logarithms near the cut locus]: a rotation by π − δ in one plane (and a generic
    angle elsewhere) has a log fixed by the entries to ~u/δ; θ/sin θ read from cos θ lost δ as
    u/δ² (float64: 1e-3 off at δ = 1e-6, 0.2 at 1e-7, NaN or a log longer than π at 1e-8).
    Reference: the generator the point was made from. (A float32/complex64 point is itself only
    ε/δ from its log's neighbours, ε of its dtype: its rounding, not the map, bounds it there.)"""
    g = torch.Generator().manual_seed(7)
    wide = torch.complex128 if dtype.is_complex else F64
    for delta in (1e-4, 1e-6, 1e-7, 1e-8):
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=wide))[0]
        J = torch.zeros(n, n, dtype=wide)
        J[0, 1], J[1, 0] = -(math.pi - delta), math.pi - delta
        if n >= 4:
            J[2, 3], J[3, 2] = -1.0, 1.0
        if dtype.is_complex and n % 2:
            J[-1, -1] = 0.5j
        A = Q @ J @ Q.mH
        Y = torch.linalg.matrix_exp(A).to(dtype)
        X = torch.eye(n, dtype=dtype)
        L = space.logmap(X, Y).to(wide)
        tol = 1e-14 / delta
        assert float((L - A).abs().max()) <= tol, (delta, float((L - A).abs().max()))
        torch.testing.assert_close(space.inner(X, L.to(dtype), L.to(dtype)).sqrt().double(),
                                   space.dist(X, Y).double(), atol=max(tol, 1e-12), rtol=0)
    # at −I itself the log is not unique: one of the minimal ones (Note [Group logarithms on the cut locus])
    if n % 2 == 0 or dtype.is_complex:
        I = torch.eye(n, dtype=dtype)
        L = space.logmap(I, -I)
        torch.testing.assert_close(space.expmap(I, L), -I, atol=1e-13, rtol=0)
        torch.testing.assert_close(space.inner(I, L, L).sqrt(), space.dist(I, -I), atol=1e-13, rtol=0)


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
def test_grassmannian_logmap_within_1e_10_of_the_cut_locus(dtype):
    """Note [The Grassmannian's logarithm near the cut locus]: float64/complex128 frames with principal
    angles π/2 − δ (and generic ones). The logarithm, a spectral map of MᴴM with ‖M‖ = tan θ_max, was
    off by ε tan²θ_max: 3e-5 at δ = 1e-6, 3e-3 at 1e-7, 1e4 at 1e-8 and 1e78 at 1e-10, finite and
    silent. One angle near π/2 leaves the log well conditioned (its vectors are fixed to ~ε); two
    such angles fix it to ~ε/δ only, as one does in complex frames (the phase between the near-orthogonal
    vectors is read from their cosine δ). Reference: the generator the points were made from. At an angle
    of exactly π/2 the result is a minimizing geodesic's vector (it was inf/NaN)."""
    G = gf.Grassmannian()
    g = torch.Generator().manual_seed(11)
    n, k = 8, 3
    for gaps in ([1e-4], [1e-6], [1e-8], [1e-10], [1e-12], [1e-8, 3e-8], [1e-10, 1e-10]):
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))[0]
        R = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=dtype))[0]  # Y's frame: any
        gap = torch.tensor(gaps + [0.0] * (k - len(gaps)), dtype=F64)
        theta = torch.tensor([0.0] * len(gaps) + [0.3 + 0.4 * i for i in range(k - len(gaps))], dtype=F64)
        cos = torch.where(gap > 0, torch.sin(gap), torch.cos(theta)).to(dtype)  # cos(π/2 − δ) = sin δ, exactly
        sin = torch.where(gap > 0, torch.cos(gap), torch.sin(theta)).to(dtype)
        theta = torch.where(gap > 0, math.pi / 2 - gap, theta).to(dtype)
        X, Q2 = Q[:, :k], Q[:, k:2 * k]
        Y = (X * cos + Q2 * sin) @ R
        L = G.logmap(X, Y)
        tol = 1e-12 if len(gaps) == 1 and not dtype.is_complex else 1e-14 / gaps[0]
        assert float((L - Q2 * theta).abs().max()) <= tol, (gaps, float((L - Q2 * theta).abs().max()))
    # exactly at the cut locus: a vector of length π/2 whose geodesic reaches Y's subspace
    X = torch.eye(4, 2, dtype=dtype)
    Y = torch.zeros(4, 2, dtype=dtype)
    Y[2, 0], Y[1, 1] = 1, 1
    L = G.logmap(X, Y)
    assert bool(torch.isfinite(L).all())
    torch.testing.assert_close(torch.linalg.matrix_norm(L).double(), torch.tensor(math.pi / 2, dtype=F64), atol=1e-14, rtol=0)
    E = G.expmap(X, L)
    torch.testing.assert_close(E @ E.mH, Y @ Y.mH, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_grassmannian_logmap_of_rounded_points_near_the_cut_locus(dtype, generator):
    """float32/complex64 frames whose largest principal angle is π/2 − gap (gap 1e-3 to 1e-6, below the
    cut locus, so the logarithm is defined and conditioned like 1/gap): ``logmap`` is horizontal,
    its length is the distance (principal angles from the singular values, in float64) and its
    geodesic reaches ``Y``'s subspace, to ~ε/gap. The logarithm is a spectral map of ``MᴴM``,
    ``M = (Y − XC)C⁻¹`` of norm tan θ ≈ 1/gap, whose small eigenvalues are off by ε‖M‖²: computed
    in float32 it was 5e-3 off at gap 1e-3, ~1e14 at 1e-4 and NaN from 1e-5 on."""
    G = gf.Grassmannian()
    wide = torch.complex128 if dtype.is_complex else F64
    eps = torch.finfo(dtype).eps
    for gap in (1e-3, 1e-4, 1e-5, 1e-6):
        X = G.sample((16, 6, 2), generator=generator, dtype=wide)
        W = G.tangent(X, torch.randn(X.shape, generator=generator, dtype=wide))
        V = W / torch.linalg.matrix_norm(W, ord=2)[..., None, None] * (math.pi / 2 - gap)
        Xr, Yr = X.to(dtype), G.expmap(X, V).to(dtype)  # the rounded points
        L = G.logmap(Xr, Yr)
        assert L.dtype == dtype and bool(torch.isfinite(L).all())
        Xw, Yw, Lw = Xr.to(wide), Yr.to(wide), L.to(wide)
        tol = 20 * eps / gap
        assert float((Xw.mH @ Lw).abs().max()) < tol  # horizontal
        cos = torch.linalg.svdvals(Xw.mH @ Yw)
        sin = torch.linalg.svdvals(Yw - Xw @ (Xw.mH @ Yw)).flip(-1)
        theta = torch.atan2(sin, cos)
        torch.testing.assert_close(torch.linalg.matrix_norm(Lw), torch.linalg.vector_norm(theta, dim=-1), atol=tol, rtol=0)
        Qy = torch.linalg.qr(Yw)[0]
        E = G.expmap(Xw, Lw)
        assert float((E - Qy @ (Qy.mH @ E)).abs().max()) < tol  # spans Y's subspace
