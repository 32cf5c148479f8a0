"""Note [Group logarithms on the cut locus] (geofunc/spaces/_orthogonal.py): where XᴴY has an eigenvalue
−1 the group logmap is one of the minimal logs (expmap(X, logmap(X, Y)) = Y, ‖logmap‖ = dist); it was a
finite vector 0.1–1.5 off. Near the cut, eigenvalues of U(n) at different distances from −1 are told apart."""

import math

import pytest
import torch
from torch.func import grad

import geofunc as gf

F64, C128 = torch.float64, torch.complex128


def so_rotation(Q, angles):
    n = Q.shape[-1]
    B = torch.eye(n, dtype=F64)
    for j, a in enumerate(angles):  # cos/sin exactly: a block at π is exactly [[-1, 0], [0, -1]]
        c, s = (-1.0, 0.0) if a == math.pi else (math.cos(a), math.sin(a))
        B[2 * j:2 * j + 2, 2 * j:2 * j + 2] = torch.tensor([[c, -s], [s, c]], dtype=F64)
    return Q @ B @ Q.mT


def u_rotation(Q, angles):
    a = torch.tensor(angles, dtype=F64)
    return Q @ torch.diag(torch.polar(torch.ones_like(a), a)) @ Q.mH


def check_round_trip(space, X, Y, atol):
    L = space.logmap(X, Y)
    assert bool(torch.isfinite(L).all())
    torch.testing.assert_close(space.expmap(X, L), Y, atol=atol, rtol=0)
    d = space.dist(X, Y)
    torch.testing.assert_close(space.inner(X, L, L).sqrt(), d, atol=atol, rtol=0)
    torch.testing.assert_close(space.sqdist(X, Y), d * d, atol=10 * atol, rtol=0)
    return L


@pytest.mark.parametrize("n, angles", [(2, [math.pi]), (3, [math.pi]), (4, [math.pi, 0.3]), (4, [math.pi, math.pi]),
                                       (5, [math.pi, 1.0])])
def test_so_logmap_at_angle_pi(n, angles):
    g = torch.Generator().manual_seed(n)
    S = gf.SO()
    for how in ("exact", "expm"):
        X, Q = S.sample((n, n), generator=g, dtype=F64), S.sample((n, n), generator=g, dtype=F64)
        if how == "exact":
            R = so_rotation(Q, angles)
        else:
            A = torch.zeros(n, n, dtype=F64)
            for j, a in enumerate(angles):
                A[2 * j + 1, 2 * j], A[2 * j, 2 * j + 1] = a, -a
            R = Q @ torch.linalg.matrix_exp(A) @ Q.mT
        check_round_trip(S, X, X @ R, 1e-13)


@pytest.mark.parametrize("n, angles", [(2, [math.pi, 0.0]), (3, [math.pi, 0.3, -1.0]), (3, [math.pi, math.pi, 0.5]),
                                       (4, [math.pi, -math.pi, 0.3, -2.0])])
def test_unitary_logmap_at_eigenvalue_minus_one(n, angles):
    g = torch.Generator().manual_seed(n)
    U = gf.Unitary()
    X, Q = U.sample((n, n), generator=g, dtype=C128), U.sample((n, n), generator=g, dtype=C128)
    check_round_trip(U, X, X @ u_rotation(Q, angles), 1e-13)
    check_round_trip(U, torch.eye(n, dtype=C128), -torch.eye(n, dtype=C128), 1e-13)


@pytest.mark.parametrize("d1, d2, sign", [(0.0, 1e-8, 1), (1e-8, 3e-8, 1), (1e-8, 3e-8, -1), (1e-6, 3e-6, -1),
                                          (1e-7, 1e-7, -1)])
def test_unitary_logmap_two_eigenvalues_near_minus_one(d1, d2, sign):
    """Two eigenvalues within 1e-6 of −1 at different distances (or a conjugate pair) share an eigenspace of
    S = sym(XᴴY) to rounding: the log was up to 1.1 off; the principal log is fixed to ~u/δ by the entries."""
    g = torch.Generator().manual_seed(3)
    U = gf.Unitary()
    X, Q = U.sample((4, 4), generator=g, dtype=C128), U.sample((4, 4), generator=g, dtype=C128)
    angles = [math.pi - d1, sign * (math.pi - d2), 0.3, -2.0]
    L = check_round_trip(U, X, X @ u_rotation(Q, angles), 1e-13)
    if d1 > 0:  # the principal log is unique: X Q diag(iθ) Qᴴ
        A = X @ Q @ torch.diag(1j * torch.tensor(angles, dtype=F64).to(C128)) @ Q.mH
        assert float((L - A).abs().max()) <= 1e-14 / d1


@pytest.mark.parametrize("space, dtype", [(gf.SO(), F64), (gf.Unitary(), C128)], ids=["SO", "U"])
@pytest.mark.parametrize("delta", [0.0, 1e-9])
def test_group_sqdist_gradient_at_and_near_the_cut(space, dtype, delta):
    """Finite at the cut (one of the minimal logs); equal to finite differences away from it."""
    g = torch.Generator().manual_seed(4)
    n = 3
    X, Q = space.sample((n, n), generator=g, dtype=dtype), space.sample((n, n), generator=g, dtype=dtype)
    R = so_rotation(Q, [math.pi - delta]) if dtype == F64 else u_rotation(Q, [math.pi - delta, 0.3, -1.0])
    G = grad(lambda y: space.sqdist(X, y))(X @ R)
    assert bool(torch.isfinite(G).all())
    # away from the cut: the gradient against central differences along a tangent
    for ang in (2.5, 3.1):
        R = so_rotation(Q, [ang]) if dtype == F64 else u_rotation(Q, [ang, 0.3, -1.0])
        Y = X @ R
        W = space.tangent(Y, torch.randn(n, n, generator=g, dtype=dtype))
        G = grad(lambda y: space.sqdist(X, y))(Y)
        h = 1e-6
        fd = (space.sqdist(X, space.expmap(Y, h * W)) - space.sqdist(X, space.expmap(Y, -h * W))) / (2 * h)
        ad = (G.conj() * W).real.sum()
        assert abs(float(fd - ad)) < 1e-6 * max(1.0, abs(float(fd))), (ang, float(fd), float(ad))


def so_planes(n, deltas, others, g):
    """A Haar-conjugated rotation with planes at ±(π − δ) (cos/sin from δ) and at the angles ``others``."""
    B = torch.eye(n, dtype=F64)
    cs = [(-math.cos(d), math.sin(d) if j % 2 == 0 else -math.sin(d)) for j, d in enumerate(deltas)]
    for j, (c, s) in enumerate(cs + [(math.cos(a), math.sin(a)) for a in others]):
        B[2 * j:2 * j + 2, 2 * j:2 * j + 2] = torch.tensor([[c, -s], [s, c]], dtype=F64)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    return Q @ B @ Q.mT


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n", [4, 5, 6, 8])
def test_so_logmap_two_planes_near_pi_at_different_distances(dtype, n):
    """Note [Group logarithms on the cut locus]: two planes within 1e-4 of π at different distances share an
    eigenspace of S = sym(XᵀY) to ~ε/δ² and K φ(S) mixed them: round trips 1e-8 to 1e-3 off in float64, up
    to 1.5 in float32 (whose rounding puts every such plane within ~1e-7 of π). One at a time, batched, under vmap."""
    g = torch.Generator().manual_seed(n)
    S = gf.SO()
    others = {4: [], 5: [], 6: [0.7], 8: [0.7, -2.0]}[n]
    deltas = [0.0, 1e-12, 1e-8, 1e-6, 1e-5, 1e-4]
    pairs = [(d1, d2) for i, d1 in enumerate(deltas) for d2 in deltas[i + 1:]]
    X = S.sample((len(pairs), n, n), generator=g, dtype=F64)
    Y = X @ torch.stack([so_planes(n, p, others, g) for p in pairs])
    X, Y = X.to(dtype), Y.to(dtype)
    rt_tol, min_tol = (1e-13, 1e-13) if dtype == F64 else (1e-6, 4e-6)
    for L in (S.logmap(X, Y), torch.stack([S.logmap(x, y) for x, y in zip(X, Y)]), torch.func.vmap(S.logmap)(X, Y)):
        err = (S.expmap(X, L) - Y).abs().amax((-2, -1))
        assert float(err.max()) <= rt_tol, [(p, float(e)) for p, e in zip(pairs, err) if e > rt_tol]
        gap = (S.inner(X, L, L).sqrt() - S.dist(X, Y)).abs()
        assert float(gap.max()) <= min_tol, [(p, float(e)) for p, e in zip(pairs, gap) if e > min_tol]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("n", [8, 16])
def test_so_logmap_near_an_antipodal_point(dtype, n):
    """Y = −X E for a small rotation E: every plane of XᵀY near π, at different distances (round trips were
    up to 1e-3 off in float64 at ‖E‖ ~ 1e-6 and 0.5 in float32); one plane near π beside a generic one
    (K φ(S) lost ~ε/δ there: 1.4e-8 at δ = 2e-8)."""
    g = torch.Generator().manual_seed(n)
    S = gf.SO()
    I = torch.eye(n, dtype=F64)
    X = S.sample((3, n, n), generator=g, dtype=F64)
    size = torch.tensor([0.0, 1e-9, 1e-6], dtype=F64)[:, None, None]
    E = S.expmap(I, S.tangent(I, size * torch.randn(3, n, n, generator=g, dtype=F64)))
    Y = torch.cat((-X @ E, X[:2] @ torch.stack([so_planes(n, [d], [1.0], g) for d in (2e-8, 1e-6)])))
    X = torch.cat((X, X[:2]))
    X, Y = X.to(dtype), Y.to(dtype)
    tol = 1e-12 if dtype == F64 else 1e-6
    err = (S.expmap(X, S.logmap(X, Y)) - Y).abs().amax((-2, -1))
    assert float(err.max()) <= tol, err


def _plane_rotation(Q, angle):
    B = torch.eye(Q.shape[-1], dtype=F64)
    B[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=F64)
    return Q @ B @ Q.mT


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("delta", [1e-6, 3e-6, 1e-4])
def test_so_logmap_derivative_just_outside_the_cut_cluster(n, delta):
    """SO's cut cluster was ‖K q‖ ≤ √u, and a cluster as wide as Unitary's u^⅓ with the frame of S's
    eigenvectors detached left logmap's derivative 87% off at angle π − δ, δ of 1e-6 to 3e-6 in float64 (K φ(S)'s
    was ~1e-4 off there). The cluster is u^⅓ wide now, its frame turning with its eigenspace (Note [The cut
    cluster's eigenspace derivative]): exact. Reference: the Fréchet derivative of scipy's logm by the block identity
    logm([[R, E], [0, R]]) = [[log R, L(R, E)], [0, log R]]."""
    import numpy as np
    import scipy.linalg

    g = torch.Generator().manual_seed(n)
    S = gf.SO()
    X, Q = S.sample((n, n), generator=g, dtype=F64), S.sample((n, n), generator=g, dtype=F64)
    Y = X @ _plane_rotation(Q, math.pi - delta)
    W = S.tangent(Y, torch.randn(n, n, generator=g, dtype=F64))
    _, jv = torch.func.jvp(lambda y: S.logmap(X, y), (Y,), (W,))
    R, E = (X.mT @ Y).numpy(), (X.mT @ W).numpy()
    D = scipy.linalg.logm(np.block([[R, E], [np.zeros_like(R), R]]))[:n, n:]
    ref = X @ torch.from_numpy(np.ascontiguousarray(np.real(D)))
    err = float((jv - ref).abs().max() / ref.abs().max())
    assert err < 1e-2, err


@pytest.mark.parametrize("delta", [0.0, 1e-9])
def test_logmap_derivative_of_the_angles_at_and_near_the_cut(delta):
    """In the cut cluster the signed sine σ is read from K, not K.detach(): it carries the angles' derivative.
    Along Y·Ω with Ω = Q diag(i a) Qᴴ (U) or Q J Qᵀ (SO), which moves the angles and not the eigenvectors,
    logmap's derivative is exactly X Ω; with σ from the detached K the Unitary one was 0.4 off."""
    g = torch.Generator().manual_seed(3)
    U = gf.Unitary()
    X, Q = U.sample((3, 3), generator=g, dtype=C128), U.sample((3, 3), generator=g, dtype=C128)
    th = torch.tensor([math.pi - delta, 0.3, -1.0], dtype=F64)
    a = torch.tensor([0.7, -0.2, 0.4], dtype=F64)
    Y = X @ Q @ torch.diag(torch.polar(torch.ones_like(th), th)) @ Q.mH
    Om = Q @ torch.diag(1j * a.to(C128)) @ Q.mH
    _, jv = torch.func.jvp(lambda y: U.logmap(X, y), (Y,), (Y @ Om,))
    torch.testing.assert_close(jv, X @ Om, atol=1e-12, rtol=0)
    S = gf.SO()
    X, Q = S.sample((3, 3), generator=g, dtype=F64), S.sample((3, 3), generator=g, dtype=F64)
    J = torch.zeros(3, 3, dtype=F64)
    J[1, 0], J[0, 1] = 1.0, -1.0
    Y = X @ _plane_rotation(Q, math.pi - delta)
    Om = Q @ J @ Q.mT
    _, jv = torch.func.jvp(lambda y: S.logmap(X, y), (Y,), (Y @ Om,))
    torch.testing.assert_close(jv, X @ Om, atol=1e-12, rtol=0)


@pytest.mark.parametrize("delta", [5e-6, 1e-6, 1e-8])
def test_unitary_logmap_derivative_rotates_the_cut_cluster(delta):
    # Note [The cut cluster's eigenspace derivative]: one eigenvalue e^{i(π − δ)} within τ of the cut, the
    # others far from it: the log is smooth there, and along Y(t) = e^{tB} Y e^{−tB} (X = I) its derivative
    # is [B, log Y]. With the cluster's frame detached the derivative held the angle's only (100% off).
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=C128))[0]
    angles = [math.pi - delta, 0.5, -1.0]
    Y = u_rotation(Q, angles)
    X = torch.eye(3, dtype=C128)
    B = torch.randn(3, 3, dtype=C128)
    B = B - B.mH
    L = Q @ torch.diag(1j * torch.tensor(angles, dtype=F64).to(C128)) @ Q.mH
    U = gf.Unitary()
    f = lambda t: U.logmap(X, torch.linalg.matrix_exp(t * B) @ Y @ torch.linalg.matrix_exp(-t * B))
    _, jv = torch.func.jvp(f, (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    torch.testing.assert_close(jv, B @ L - L @ B, atol=1e-9, rtol=0)
    # reverse mode alike: <W, dlog> = <grad_t>
    t = torch.zeros((), dtype=F64, requires_grad=True)
    W = torch.randn(3, 3, dtype=C128)
    (g,) = torch.autograd.grad((f(t) * W.conj()).real.sum(), t)
    torch.testing.assert_close(g, ((B @ L - L @ B) * W.conj()).real.sum(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("delta", [1e-8, 1e-10])
def test_so_logmap_derivative_rotates_the_cut_plane(delta):
    # SO(3): one plane at π − δ (within √u of the cut, the plane's frame detached), the axis far from it
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    th = math.pi - delta
    R0 = torch.tensor([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    Y, X = Q @ R0 @ Q.mT, torch.eye(3, dtype=F64)
    L0 = torch.zeros(3, 3, dtype=F64)
    L0[0, 1], L0[1, 0] = -th, th
    L = Q @ L0 @ Q.mT
    B = torch.randn(3, 3, dtype=F64)
    B = B - B.mT
    f = lambda t: gf.SO().logmap(X, torch.linalg.matrix_exp(t * B) @ Y @ torch.linalg.matrix_exp(-t * B))
    _, jv = torch.func.jvp(f, (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    torch.testing.assert_close(jv, B @ L - L @ B, atol=1e-9, rtol=0)


@pytest.mark.parametrize("delta", [5e-6, 1e-8])
def test_unitary_logmap_second_derivative_near_the_cut(delta):
    # the mixed second derivative along two conjugations is [B1, [B2, log Y]]: the cluster's frame turns to second
    # order (it was 75% off at δ = 5e-6, where the log before the cut-locus change was right to 2e-5)
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=C128))[0]
    B1, B2, W = (torch.randn(3, 3, dtype=C128) for _ in range(3))
    B1, B2 = B1 - B1.mH, B2 - B2.mH
    angles = [math.pi - delta, 0.5, -1.0]
    Y, X = u_rotation(Q, angles), torch.eye(3, dtype=C128)
    L = Q @ torch.diag(1j * torch.tensor(angles, dtype=F64).to(C128)) @ Q.mH
    E = torch.linalg.matrix_exp

    def f(t1, t2):
        Yt = E(t1 * B1) @ E(t2 * B2) @ Y @ E(-t2 * B2) @ E(-t1 * B1)
        return (gf.Unitary().logmap(X, Yt) * W.conj()).real.sum()

    z = torch.zeros((), dtype=F64)
    h = grad(lambda t2: grad(f, argnums=0)(z, t2))(z)
    C = B2 @ L - L @ B2
    torch.testing.assert_close(h, ((B1 @ C - C @ B1) * W.conj()).real.sum(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("delta", [1e-10, 0.0])
def test_so_logmap_second_derivative_at_the_cut(delta):
    # SO(5): a plane at π − δ (at π itself the minimal log is unique up to that plane's orientation, fixed along
    # conjugations), a plane at 0.7, an axis; the mixed second derivative along two conjugations is [B1, [B2, L]]
    torch.manual_seed(0)
    n = 5
    Q = torch.linalg.qr(torch.randn(n, n, dtype=F64))[0]
    R0, L0 = torch.eye(n, dtype=F64), torch.zeros(n, n, dtype=F64)
    for (a, b), t in [((0, 1), math.pi - delta), ((2, 3), 0.7)]:
        c, s = (-1.0, 0.0) if t == math.pi else (math.cos(t), math.sin(t))
        R0[a, a] = R0[b, b] = c
        R0[a, b], R0[b, a], L0[a, b], L0[b, a] = -s, s, -t, t
    Y, X, L = Q @ R0 @ Q.mT, torch.eye(n, dtype=F64), Q @ L0 @ Q.mT
    B1, B2, W = (torch.randn(n, n, dtype=F64) for _ in range(3))
    B1, B2 = B1 - B1.mT, B2 - B2.mT
    E = torch.linalg.matrix_exp

    def f(t1, t2):
        return (gf.SO().logmap(X, E(t1 * B1) @ E(t2 * B2) @ Y @ E(-t2 * B2) @ E(-t1 * B1)) * W).sum()

    z = torch.zeros((), dtype=F64)
    if delta == 0.0:  # the chosen orientation of the plane at π: the value's, read back
        L = gf.SO().logmap(X, Y)
    h = grad(lambda t2: grad(f, argnums=0)(z, t2))(z)
    C = B2 @ L - L @ B2
    torch.testing.assert_close(h, ((B1 @ C - C @ B1) * W).sum(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("d1, d2, side", [(1e-8, 3e-8, -1), (1e-7, 1e-6, 1), (1e-6, 4e-6, -1), (2e-6, 2e-6, 1), (2e-6, 2e-6, -1),
                                            (0.0, 1e-8, -1), (0.0, 3e-6, -1), (0.0, 1e-8, 1)])
def test_unitary_logmap_derivative_with_two_eigenvalues_in_the_cut_cluster(d1, d2, side):
    """Note [Eigenvalues in the cut cluster]: two eigenvalues e^{i(π − δ1)}, e^{±i(π − δ2)} within τ of −1: the
    eigenvectors' turning against each other was not taken (O(1) off, 50–90%). At a diagonal U (its eigenvectors
    exact) the derivative along U A is Γ ∘ (U A), Γⱼₖ = (iθⱼ − iθₖ)/(e^{iθⱼ} − e^{iθₖ}) from the exact angle
    differences: jvp and vjp, complex128."""
    g = torch.Generator().manual_seed(7)
    parts = [(1, -d1), (side, -side * d2), (0, 0.5)]  # θ = p π + r
    ev = torch.tensor([complex((-1) ** abs(p) * math.cos(r), (-1) ** abs(p) * math.sin(r)) for p, r in parts], dtype=C128)
    gam = torch.zeros(3, 3, dtype=C128)
    for j, (pj, rj) in enumerate(parts):
        for k, (pk, rk) in enumerate(parts):
            diff = (pj - pk) * math.pi + (rj - rk)
            half = math.sin(0.5 * (rj - rk)) * (1 if pj == pk else -1) if (pj - pk) % 2 == 0 else math.sin(0.5 * diff)
            mean = 0.5 * ((pj + pk) * math.pi + rj + rk)
            gam[j, k] = (1.0 if diff == 0 else diff / (2 * half)) * complex(math.cos(mean), -math.sin(mean))
    Y, X = torch.diag(ev), torch.eye(3, dtype=C128)
    A = torch.randn(3, 3, generator=g, dtype=C128)
    A = A - A.mH
    ref = gam * (Y @ A)
    U = gf.Unitary()
    _, jv = torch.func.jvp(lambda y: U.logmap(X, y), (Y,), (Y @ A,))
    tol = 1e-7 * float(ref.abs().max())
    torch.testing.assert_close(jv, ref, atol=tol, rtol=0)
    G = torch.randn(3, 3, generator=g, dtype=C128)
    Yr = Y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad((U.logmap(X, Yr) * G.conj()).real.sum(), Yr)
    torch.testing.assert_close((gy.conj() * (Y @ A)).real.sum(), (ref * G.conj()).real.sum(), atol=tol * 10, rtol=0)


@pytest.mark.parametrize("space", ["Unitary", "SO"])
def test_logmap_second_derivative_near_the_cut_plain_autograd(space):
    # the same under plain autograd (create_graph=True), where the frame's second-order part is a lazy node
    # (Note [Lazy second-order terms]): a backward that builds no graph leaves it out, one that does reads it
    torch.manual_seed(0)
    if space == "Unitary":
        Q = torch.linalg.qr(torch.randn(3, 3, dtype=C128))[0]
        angles = [math.pi - 5e-6, 0.5, -1.0]
        Y, X = u_rotation(Q, angles), torch.eye(3, dtype=C128)
        L = Q @ torch.diag(1j * torch.tensor(angles, dtype=F64).to(C128)) @ Q.mH
    else:
        Q = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
        Y, X = so_rotation(Q, [math.pi - 1e-8]), torch.eye(3, dtype=F64)
        L0 = torch.zeros(3, 3, dtype=F64)
        L0[0, 1], L0[1, 0] = -(math.pi - 1e-8), math.pi - 1e-8
        L = Q @ L0 @ Q.mT
    B1, B2, W = (torch.randn(3, 3, dtype=Y.dtype) for _ in range(3))
    B1, B2 = B1 - B1.mH, B2 - B2.mH
    E = torch.linalg.matrix_exp
    t1, t2 = (torch.zeros((), dtype=F64, requires_grad=True) for _ in range(2))
    Yt = E(t1 * B1) @ E(t2 * B2) @ Y @ E(-t2 * B2) @ E(-t1 * B1)
    (g1,) = torch.autograd.grad((getattr(gf, space)().logmap(X, Yt) * W.conj()).real.sum(), t1, create_graph=True)
    (h,) = torch.autograd.grad(g1, t2)
    C = B2 @ L - L @ B2
    torch.testing.assert_close(g1.detach(), ((B1 @ L - L @ B1) * W.conj()).real.sum(), atol=1e-9, rtol=0)
    torch.testing.assert_close(h, ((B1 @ C - C @ B1) * W.conj()).real.sum(), atol=1e-8, rtol=0)


def test_so_logmap_hessian_after_one_under_a_transform():
    # Note [Constants cached outside transforms]: the pairs' constants first made inside grad(grad(...)) were
    # cached as that level's wrappers; the next nested grad of an SO logmap of that size raised an INTERNAL ASSERT
    from geofunc.spaces import _orthogonal

    for name in ("_pair_constants", "_pair_constants_cached"):  # a fresh cache (before the fix: the first)
        getattr(getattr(_orthogonal, name, None), "cache_clear", lambda: None)()
    torch.manual_seed(0)
    n = 5
    X, Y = torch.eye(n, dtype=F64), gf.SO().sample((n, n), dtype=F64)
    B = torch.randn(n, n, dtype=F64)
    B = B - B.mT
    E = torch.linalg.matrix_exp
    f = lambda t: gf.SO().logmap(X, E(t * B) @ Y @ E(-t * B)).sum()
    z = torch.zeros((), dtype=F64)
    first = grad(grad(f))(z)
    torch.testing.assert_close(grad(grad(f))(z), first, atol=0, rtol=0)
    t = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(t), t)
    torch.testing.assert_close(g, grad(f)(z), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("delta", [3e-6, 3e-7, 1e-7, 3e-8])
def test_so_logmap_derivative_between_sqrt_u_and_cube_root_u(n, delta):
    # one plane at π − δ with √u < δ < u^⅓ (float64): the cut pair's form with its turning frame, where K φ(S)
    # (φ's divided differences read from c = cos θ, which has lost δ) was ~u/δ² off (20% at δ = 3e-8)
    torch.manual_seed(n)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=F64))[0]
    angles = [math.pi - delta] + ([0.7] if n == 5 else [])
    Y, X = so_rotation(Q, angles), torch.eye(n, dtype=F64)
    L0 = torch.zeros(n, n, dtype=F64)
    for j, a in enumerate(angles):
        L0[2 * j, 2 * j + 1], L0[2 * j + 1, 2 * j] = -a, a
    L = Q @ L0 @ Q.mT
    B = torch.randn(n, n, dtype=F64)
    B = B - B.mT
    E = torch.linalg.matrix_exp
    f = lambda t: gf.SO().logmap(X, E(t * B) @ Y @ E(-t * B))
    _, jv = torch.func.jvp(f, (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    torch.testing.assert_close(jv, B @ L - L @ B, atol=1e-9, rtol=0)


def _so_near_pi(n, deltas, others, Q):
    """(R, L): R = Q B Qᵀ with planes at ±(π − δ) (cos/sin from δ) and at ``others``, L its log (exact angles)."""
    B = torch.eye(n, dtype=F64)
    L0 = torch.zeros(n, n, dtype=F64)
    angles = [(math.pi - d) * (1 if j % 2 == 0 else -1) for j, d in enumerate(deltas)] + list(others)
    for j, a in enumerate(angles):
        d = deltas[j] if j < len(deltas) else None
        c, s = (-math.cos(d), math.copysign(math.sin(d), a)) if d is not None else (math.cos(a), math.sin(a))
        B[2 * j:2 * j + 2, 2 * j:2 * j + 2] = torch.tensor([[c, -s], [s, c]], dtype=F64)
        L0[2 * j + 1, 2 * j], L0[2 * j, 2 * j + 1] = a, -a
    return Q @ B @ Q.mT, Q @ L0 @ Q.mT


@pytest.mark.parametrize("n, deltas, others", [(4, [1e-8, 3e-8], []), (4, [1e-7, 2e-6], []), (5, [1e-6, 1e-6], []),
                                               (6, [2e-5, 6e-5], [0.7]), (6, [1e-8, 3e-5], [0.7]),
                                               (7, [1e-7, 2e-7, 5e-7], [])])
def test_so_logmap_derivative_with_several_planes_near_pi(n, deltas, others):
    """Note [Several planes in the cut cluster]: planes near π at different distances (or one) share an eigenspace
    of S to ~u/δ², and logmap's derivative turned them with S's eigenvectors (within the cut cluster: O(1) off;
    just outside it, by S's √u tie tolerance: 2–25× off). Along Y(t) = X e^{tB} R e^{−tB} the derivative is
    X [B, log R] exactly (jvp, vjp, jacrev; float64); along Y(t) = R e^{tΩ}, Ω commuting with R, it is Ω (at a
    point whose planes are exact: elsewhere the rounding of R turns its planes by ~u/δ, and the log's
    derivative across them is ~π/δ)."""
    g = torch.Generator().manual_seed(n)
    S = gf.SO()
    R, L = _so_near_pi(n, deltas, others, torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0])
    X = S.sample((n, n), generator=g, dtype=F64)
    B = torch.randn(n, n, generator=g, dtype=F64)
    B = B - B.mT
    Y, W, ref = X @ R, X @ (B @ R - R @ B), X @ (B @ L - L @ B)
    _, jv = torch.func.jvp(lambda y: S.logmap(X, y), (Y,), (W,))
    torch.testing.assert_close(jv, ref, atol=1e-4, rtol=0)
    G = torch.randn(n, n, generator=g, dtype=F64)
    Yr = Y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad((S.logmap(X, Yr) * G).sum(), Yr)
    torch.testing.assert_close((gy * W).sum(), (ref * G).sum(), atol=1e-4, rtol=0)
    J = torch.func.jacrev(lambda y: S.logmap(X, y))(Y)
    torch.testing.assert_close((J * W).sum((-2, -1)), ref, atol=1e-4, rtol=0)
    if max(deltas) < 6e-6:  # all in the cut cluster, read in _so_log_value's frame (outside it S's: ~u/δ² apart)
        # sqdist = ⟨log, log⟩: along Y e^{tA} its derivative is 2⟨log R, A⟩ (O(1); it was 0.5–100% off, a sign flipped)
        A = torch.randn(n, n, generator=g, dtype=F64)
        A = A - A.mT
        (gs,) = torch.autograd.grad(S.sqdist(X, Yr), Yr)
        c = S.inner(X, X @ L, X @ L) / (L * L).sum()
        torch.testing.assert_close((gs * (Y @ A)).sum(), 2 * c * (L * A).sum(), atol=1e-6, rtol=0)
    # the angles too, at a permuted block-diagonal R
    P = torch.eye(n, dtype=F64)[torch.randperm(n, generator=g)]
    R, L = _so_near_pi(n, deltas, others, P)
    Om = torch.zeros(n, n, dtype=F64)
    for j in range(n // 2):
        Om[2 * j + 1, 2 * j] = (j + 1) / 3
    Om = P @ (Om - Om.mT) @ P.mT
    I = torch.eye(n, dtype=F64)
    _, jv = torch.func.jvp(lambda y: S.logmap(I, y), (R,), (B @ R - R @ B + R @ Om,))
    torch.testing.assert_close(jv, B @ L - L @ B + Om, atol=1e-5, rtol=0)


def test_cut_cluster_terms_skipped_under_grad_and_jvp_where_no_point_needs_them(monkeypatch):
    """Note [Values read under grad and jvp]: the several-planes (SO) and cluster-eigenvector (Unitary) terms are
    zero in value; eager mode skips them where no point has two planes (eigenvalues) in the cut cluster, and so do
    torch.func's grad and jvp (they read values), where they cost 1.2-1.6x at generic points. vmap still takes
    them (no values to read), and a point with two planes in the cluster still does under grad and jvp."""
    import geofunc.spaces._orthogonal as O

    calls = {"so": 0, "u": 0}
    so_fn, u_fn = O._cut_planes, O._cut_eigvecs_turning

    def so_counting(*a):
        calls["so"] += 1
        return so_fn(*a)

    def u_counting(*a):
        calls["u"] += 1
        return u_fn(*a)

    monkeypatch.setattr(O, "_cut_planes", so_counting)
    monkeypatch.setattr(O, "_cut_eigvecs_turning", u_counting)
    g = torch.Generator().manual_seed(3)
    S, U = gf.SO(), gf.Unitary()
    X, Y = S.sample((2, 5, 5), generator=g, dtype=F64), S.sample((2, 5, 5), generator=g, dtype=F64)
    Xu, Yu = U.sample((4, 4), generator=g, dtype=C128), U.sample((4, 4), generator=g, dtype=C128)
    torch.func.grad(lambda y: S.sqdist(X, y).sum())(Y)
    torch.func.jvp(lambda y: S.logmap(X, y), (Y,), (Y,))
    torch.func.grad(lambda y: U.sqdist(Xu, y))(Yu)
    torch.func.jvp(lambda y: U.logmap(Xu, y), (Yu,), (Yu,))
    assert calls == {"so": 0, "u": 0}
    torch.func.vmap(torch.func.grad(lambda x, y: S.sqdist(x, y)))(X, Y)
    assert calls["so"] >= 1
    # two planes in the cut cluster: taken under grad and jvp, as in eager mode
    calls["so"] = 0
    R, _ = _so_near_pi(4, [1e-7, 2e-6], [], torch.eye(4, dtype=F64))
    torch.func.jvp(lambda y: S.logmap(torch.eye(4, dtype=F64), y), (R,), (R,))
    assert calls["so"] == 1


@pytest.mark.parametrize("n, deltas, others", [(6, [1e-8, 1e-8], [0.7]), (6, [1e-10, 1e-10], [0.7]), (7, [1e-9] * 3, []),
                                               (8, [1e-12, 1e-12 * (1 + 1e-7)], [0.7, 2.5]), (8, [3e-9, 3e-9, 3e-2], [0.4]),
                                               (9, [1e-8, 1e-7, 1e-2], [1.0]), (9, [3e-9, 3e-8, 5e-2], [1.0])])
def test_so_logmap_value_with_planes_at_one_distance_near_pi(n, deltas, others):
    """Note [Planes at one distance near the cut]: planes at (nearly) one distance δ ≲ 1.5e-8 from π beside others
    were read on arbitrary pairs of their common eigenspace: logmap's value 0.2–3 off (its round trip ~u, as expmap
    is insensitive there), and its derivative 17% off; planes at different δ beside one nearer 0.1 that holds −T²'s
    trace were mixed (value 2e-6 to 7e-4 off, round trip 7e-7 to 3e-4). The value against the exact log, to ~u/δ
    (float64); the round trip; the derivative along a conjugation, X [B, log R]."""
    S = gf.SO()
    u = torch.finfo(F64).eps / 2
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        R, L = _so_near_pi(n, deltas, others, torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0])
        X = S.sample((n, n), generator=g, dtype=F64)
        Lg = S.logmap(X, X @ R)
        torch.testing.assert_close(Lg, X @ L, atol=16 * u / min(deltas), rtol=0)
        torch.testing.assert_close(S.expmap(X, Lg), X @ R, atol=1e-13, rtol=0)
        if min(deltas) >= 1e-9:
            B = torch.randn(n, n, generator=g, dtype=F64)
            B = B - B.mT
            _, jv = torch.func.jvp(lambda y: S.logmap(X, y), (X @ R,), (X @ (B @ R - R @ B),))
            torch.testing.assert_close(jv, X @ (B @ L - L @ B), atol=1e-4, rtol=0)


def test_logmap_derivative_with_two_eigenvalues_exactly_at_minus_one_is_finite():
    """Note [Eigenvalues in the cut cluster] / Note [Several planes in the cut cluster]: at −1 itself (two
    eigenvalues of a Unitary point, two planes of an SO point, at exactly −1 up to the rounding of Q's
    conjugation) the log has no derivative and the pairs there take no turning; the one-sided derivatives are
    O(‖A‖), not the ~2π/u of a divided difference of rounding (the (θⱼ − θₖ)/(σⱼ − σₖ) of two σ at ±u)."""
    g = torch.Generator().manual_seed(0)
    U, S = gf.Unitary(), gf.SO()
    for _ in range(3):
        Q = U.sample((3, 3), generator=g, dtype=C128)
        Y = Q @ torch.diag(torch.tensor([-1.0, -1.0, complex(math.cos(0.5), math.sin(0.5))], dtype=C128)) @ Q.mH
        A = torch.randn(3, 3, generator=g, dtype=C128)
        A = A - A.mH
        _, jv = torch.func.jvp(lambda y: U.logmap(torch.eye(3, dtype=C128), y), (Y,), (Y @ A,))
        assert bool(torch.isfinite(jv).all()) and float(jv.abs().max()) < 10 * float(A.abs().max()) * math.pi
        Qs = S.sample((5, 5), generator=g, dtype=F64)
        R = Qs @ torch.diag(torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0], dtype=F64)) @ Qs.mT
        B = torch.randn(5, 5, generator=g, dtype=F64)
        B = B - B.mT
        _, js = torch.func.jvp(lambda y: S.logmap(torch.eye(5, dtype=F64), y), (R,), (R @ B,))
        assert bool(torch.isfinite(js).all()) and float(js.abs().max()) < 10 * float(B.abs().max()) * math.pi


@pytest.mark.parametrize("n, deltas, others", [(3, [1e-5, 3e-5], [0.5]), (4, [1e-5, -3e-5], [0.3, -2.0]),
                                               (4, [3e-5, 1e-4], [0.3, -2.0]), (5, [1e-8, 1e-5], [0.3, -2.0, 1.0]),
                                               (6, [1e-4, 3e-4, -2e-2], [0.3, -2.0, 2.5])])
def test_unitary_logmap_value_with_eigenvalues_near_minus_one_outside_the_cluster(n, deltas, others):
    """Note [Unitary eigenvalues near the cut]: eigenvalues of XᴴY near −1 (δ = π − |θ| of 1e-5 to 1e-4, on one
    side or both, beside one in the cut cluster or not) were read by K φ(S) in S's frame, which has lost δ:
    logmap and its round trip 1.5e-7 to 3.6e-6 off (complex128), where the entries fix the log to ~u/δ. The value
    against the exact log X W diag(iθ) Wᴴ of Y = X W diag(e^{iθ}) Wᴴ, and the round trip."""
    U = gf.Unitary()
    u = torch.finfo(F64).eps / 2
    angles = [math.copysign(math.pi - abs(d), d) for d in deltas] + others
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        X, W = U.sample((n, n), generator=g, dtype=C128), U.sample((n, n), generator=g, dtype=C128)
        Y = X @ u_rotation(W, angles)
        L = X @ W @ torch.diag(1j * torch.tensor(angles, dtype=F64).to(C128)) @ W.mH
        Lg = U.logmap(X, Y)
        torch.testing.assert_close(Lg, L, atol=16 * u / min(abs(d) for d in deltas), rtol=0)
        torch.testing.assert_close(U.expmap(X, Lg), Y, atol=1e-13, rtol=0)


def _normal_dlog(V, th, dR):
    """The exact derivative of the principal log at R = V diag(e^{iθ}) Vᴴ (|θ| < π) along dR: V (Γ ∘ Vᴴ dR V) Vᴴ,
    Γⱼₖ = (θⱼ − θₖ)/(2 sin((θⱼ − θₖ)/2)) e^{−i(θⱼ + θₖ)/2} (Daleckii–Krein, no cancellation)."""
    t = torch.as_tensor(th, dtype=F64)
    d = t[:, None] - t[None, :]
    half = torch.sin(0.5 * d)
    ratio = torch.where(d == 0, torch.ones_like(d), d / (2 * torch.where(d == 0, torch.ones_like(half), half)))
    gam = ratio.to(C128) * torch.polar(torch.ones_like(d), -0.5 * (t[:, None] + t[None, :]))
    return V @ (gam * (V.mH @ dR.to(C128) @ V)) @ V.mH


def _near_minus_one(space, deltas, others, g):
    """(R, V, θ, L) with R = V e^{iθ} Vᴴ exactly: Unitary eigenvalues e^{±i(π − |δ|)} (sign of δ), SO planes at
    ±(π − δ) (cos/sin from δ), then ``others``; L = log R."""
    if space == "Unitary":
        V = torch.linalg.qr(torch.randn(len(deltas) + len(others), len(deltas) + len(others), generator=g, dtype=C128))[0]
        th = [math.copysign(math.pi - abs(d), d) for d in deltas] + list(others)
        R = V @ torch.diag(torch.polar(torch.ones(len(th), dtype=F64), torch.tensor(th, dtype=F64))) @ V.mH
    else:
        n = 2 * (len(deltas) + len(others)) + 1
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        R, _ = _so_near_pi(n, deltas, others, Q)
        P = torch.eye(n, dtype=C128)
        th = [0.0] * n
        for j, a in enumerate([(math.pi - d) * (1 if j % 2 == 0 else -1) for j, d in enumerate(deltas)] + list(others)):
            P[2 * j:2 * j + 2, 2 * j:2 * j + 2] = torch.tensor([[1, 1], [-1j, 1j]], dtype=C128) * 2 ** -0.5
            th[2 * j], th[2 * j + 1] = a, -a
        V = Q.to(C128) @ P
    L = V @ torch.diag(1j * torch.tensor(th, dtype=F64).to(C128)) @ V.mH
    return R, V, th, (L if space == "Unitary" else L.real)


def _logmap_derivatives(space, deltas, others, seed):
    """Relative errors of logmap's jvp and vjp along Y A (A skew) against the exact derivative, and of the mixed
    second derivative of ⟨W, log⟩ along Ad(e^{t₁B₁} e^{t₂B₂}) (R e^{t₁Ω₁ + t₂Ω₂}) (Ω commuting with R) against
    [B₁, [B₂, L] + Ω₂] + [B₂, Ω₁]."""
    g = torch.Generator().manual_seed(seed)
    sp = getattr(gf, space)()
    R, V, th, L = _near_minus_one(space, deltas, others, g)
    n, dt = R.shape[-1], R.dtype
    X = sp.sample((n, n), generator=g, dtype=dt)
    A = torch.randn(n, n, generator=g, dtype=dt)
    A = A - A.mH
    Y, dY = X @ R, X @ R @ A
    ref = _normal_dlog(V, th, R @ A)
    ref = X @ (ref if space == "Unitary" else ref.real)
    _, jv = torch.func.jvp(lambda y: sp.logmap(X, y), (Y,), (dY,))
    err_jvp = float((jv - ref).abs().max() / ref.abs().max())
    G = torch.randn(n, n, generator=g, dtype=dt)
    Yr = Y.clone().requires_grad_(True)
    (gy,) = torch.autograd.grad((sp.logmap(X, Yr) * G.conj()).real.sum(), Yr)
    b = (ref * G.conj()).real.sum()
    err_vjp = float(((gy.conj() * dY).real.sum() - b).abs() / (ref.abs().max() * G.abs().sum()))
    B1, B2, Wt = (torch.randn(n, n, generator=g, dtype=dt) for _ in range(3))
    B1, B2 = B1 - B1.mH, B2 - B2.mH
    a1, a2 = (0.1 * torch.randn(n, generator=g, dtype=F64) for _ in range(2))
    if space == "Unitary":
        O1, O2 = (V @ torch.diag(1j * a.to(C128)) @ V.mH for a in (a1, a2))
    else:  # one rate per plane: V's columns come in conjugate pairs
        O1, O2 = ((V @ torch.diag(1j * a.repeat_interleave(2)[:n] * torch.tensor([1.0, -1.0] * n, dtype=F64)[:n]).to(C128)
                   @ V.mH).real for a in (a1, a2))
    E = torch.linalg.matrix_exp
    I = torch.eye(n, dtype=dt)

    def f(t1, t2):
        C = E(t1 * B1) @ E(t2 * B2)
        return (sp.logmap(I, C @ R @ E(t1 * O1 + t2 * O2) @ C.mH) * Wt.conj()).real.sum()

    z = torch.zeros((), dtype=F64)
    h = grad(lambda t2: grad(f, argnums=0)(z, t2))(z)
    M2 = B2 @ L - L @ B2 + O2
    r2 = ((B1 @ M2 - M2 @ B1 + B2 @ O1 - O1 @ B2) * Wt.conj()).real.sum()
    return err_jvp, err_vjp, abs(float(h - r2)) / abs(float(r2))


@pytest.mark.parametrize("space", ["Unitary", "SO"])
@pytest.mark.parametrize("delta", [8e-6, 3e-5, 1e-4, 5e-4])
def test_logmap_derivatives_with_a_lone_eigenvalue_near_minus_one(space, delta):
    """Note [Where the cut cluster ends]: one eigenvalue (plane) at π − δ just outside the cut cluster (τ = u^⅓ ≈ 6e-6)
    took K φ(S), whose derivative differences two terms ~π/δ with ~u/δ rounding: jvp and vjp ~5u/δ² off (1.5e-5
    at δ = 8e-6, complex128 and float64), second derivatives ~u/δ³ (2.4e-2 at 1e-5). Against the exact
    Daleckii–Krein derivative of the log; the eigenvalue is the cluster now (exact at any δ)."""
    others = [0.4, -1.3, 2.0] if space == "Unitary" else [0.7]
    tol = 1e-12 + 8 * (torch.finfo(F64).eps / 2) / delta  # the reference's rounding (R's, ~u) turns the plane: ~u/δ
    for seed in range(3):
        e1, e2, e3 = _logmap_derivatives(space, [delta], others, seed)
        assert e1 < tol and e2 < tol, (seed, e1, e2)
        assert e3 < 1e-9, (seed, e3)


@pytest.mark.parametrize("space", ["Unitary", "SO"])
@pytest.mark.parametrize("deltas", [(0.5, 1.5), (0.9, 1.1), (0.99, 1.01), (0.999, -1.001), (0.5, 3.0)])
def test_logmap_derivative_with_eigenvalues_on_both_sides_of_the_cut_tolerance(space, deltas):
    """Note [Where the cut cluster ends]: two eigenvalues (planes) near −1, one within τ = u^⅓ (in the cut cluster), one
    just outside: the cluster's turning against the rest and K φ(S)'s divided differences across the boundary (each
    ~1/Δc, Δc ≈ δΔδ the gap of S's eigenvalues) were differenced: jvp 6e-2 to 1e4 off (float64). The cluster
    ends in a gap of S's spectrum now. Also: a lone eigenvalue within 1e-3 of −1 with another just beyond it
    (2e-7 apart in c) is not taken alone (such a boundary is O(1) off)."""
    tau = torch.finfo(F64).eps ** (1 / 3)
    ds = [math.copysign(math.asin(tau * abs(x)), x) for x in deltas]
    if space == "SO":
        ds = [abs(d) for d in ds]
    others = [0.4, 2.0] if space == "Unitary" else [0.7]
    for seed in range(2):
        e1, e2, _ = _logmap_derivatives(space, ds, others, seed)
        assert e1 < 1e-6 and e2 < 1e-6, (seed, e1, e2)
    e1, e2, _ = _logmap_derivatives(space, [9e-4, 1.1e-3], others, 0)  # (K φ(S) for both, as before: ~1e-6)
    assert e1 < 1e-5 and e2 < 1e-5, (e1, e2)


@pytest.mark.parametrize("n, deltas", [(8, [1e-3, 1e-3, 3e-8, 0.0]), (6, [1e-2, 1e-5, 0.0]), (8, [1e-2, 1e-2, 1e-6, 0.0]),
                                       (9, [1e-3, 1e-3, 1e-7, 0.0])])
def test_so_logmap_with_a_plane_at_pi_beside_planes_at_one_distance(n, deltas):
    """Note [Planes at −1 beside resolved ones]: a plane exactly at π (σ at rounding) among the close pairs made the
    whole point's invariant planes count as unresolved, and the others' pairs were kept as −T² mixed them: round
    trips 4e-11 to 1.2e-7 off, the log on the planes at δ > 0 as much (float64; ~u after). The round trip (eager and
    under vmap) and, off the plane at π (whose log is ±π on it, either sign), the value against the exact log."""
    S = gf.SO()
    u = torch.finfo(F64).eps / 2
    j = 2 * deltas.index(0.0)
    rest = [i for i in range(n) if i not in (j, j + 1)]
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        R, L = _so_near_pi(n, deltas, [], Q)
        X = S.sample((n, n), generator=g, dtype=F64)
        for Lg in (S.logmap(X, X @ R), torch.func.vmap(S.logmap)(X[None], (X @ R)[None])[0]):
            torch.testing.assert_close(S.expmap(X, Lg), X @ R, atol=1e-13, rtol=0)
            D = Q.mT @ (X.mT @ Lg - L) @ Q  # in the planes' coordinates: only the π plane's 2×2 block is free
            D[j:j + 2, j:j + 2] = 0.0
            assert float(D.abs().max()) <= 16 * u / min(d for d in deltas if d > 0)


@pytest.mark.parametrize("n, deltas, others", [(8, [1e-9, 4e-9, 1e-2], [0.7]), (9, [1e-10, 1e-9, 3e-2], [1.0])])
def test_so_logmap_value_under_vmap_with_close_planes_at_different_small_distances(n, deltas, others):
    """Note [Planes at one distance near the cut] under vmap (no values to read: the invariant planes are read
    on every column, the columns outside the close group moved to eigenvalue 2 of i T's scaled eigh): two planes
    below the guard (δ ≲ 1.5e-8) a few times apart, beside one that holds −T²'s trace, take the j-th positive
    eigenvalue of i T each, which only the moved columns' eigenvalue above every σ/scale keeps in order. The
    value against the exact log to ~u/δ (float64), as eager mode's."""
    S = gf.SO()
    u = torch.finfo(F64).eps / 2
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        R, L = _so_near_pi(n, deltas, others, torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0])
        X = S.sample((2, n, n), generator=g, dtype=F64)
        Lv = torch.func.vmap(S.logmap)(X, X @ R)
        torch.testing.assert_close(Lv, X @ L, atol=16 * u / min(deltas), rtol=0)
        torch.testing.assert_close(Lv, S.logmap(X, X @ R), atol=16 * u / min(deltas), rtol=0)


def test_group_logmap_under_fake_tensor_mode_reads_no_values():
    """Note [Values read under grad and jvp]: the cut-cluster branches test values only in eager mode and under
    grad/jvp levels on real tensors; under FakeTensorMode (eager or with a grad level: shape propagation, export
    tooling) there are no values, and reading one raised DataDependentOutputException. SO's and Unitary's logmap
    and its gradient give their shapes and dtypes there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    for space, dtype, n in ((gf.SO(), F64, 5), (gf.Unitary(), C128, 4)):
        X, Y = space.sample((n, n), generator=g, dtype=dtype), space.sample((n, n), generator=g, dtype=dtype)
        with FakeTensorMode() as mode:
            Xf, Yf = mode.from_tensor(X), mode.from_tensor(Y)
            L = space.logmap(Xf, Yf)
            G = torch.func.grad(lambda y: torch.view_as_real(space.logmap(Xf, y).to(C128)).square().sum())(Yf)
        assert L.shape == G.shape == (n, n) and L.dtype == G.dtype == dtype


@pytest.mark.parametrize("deltas, others", [([1e-5, -3e-5], [0.3, -2.0]), ([3e-2, 5e-2], [0.3, -2.0])])
def test_unitary_logmap_value_near_minus_one_under_vmap_autograd_and_a_mixed_batch(deltas, others):
    """Note [Unitary eigenvalues near the cut]: the value read by −iK on the near block (sin θ ≤ 0.1) is the log
    wherever something differentiates (autograd: L + (value − L.detach())), under vmap (every column read, the
    others moved to eigenvalue 2 with θ 0 and their φ kept) and in a batch whose points have near blocks of
    different sizes (one with none): each against the exact log to ~u/δ (complex128), as eager no-grad mode."""
    U = gf.Unitary()
    u = torch.finfo(F64).eps / 2
    n = 4
    g = torch.Generator().manual_seed(0)
    angles = [math.copysign(math.pi - abs(d), d) for d in deltas] + others
    X, W = U.sample((3, n, n), generator=g, dtype=C128), U.sample((3, n, n), generator=g, dtype=C128)
    th = torch.tensor([angles, angles[:1] + [1.0] + angles[2:], [0.5, 1.0] + angles[2:]], dtype=F64)  # 2, 1, 0 near
    Y = X @ W @ torch.diag_embed(torch.polar(torch.ones_like(th), th)) @ W.mH
    L = X @ W @ torch.diag_embed(1j * th.to(C128)) @ W.mH
    atol = 16 * u / min(abs(d) for d in deltas)
    torch.testing.assert_close(U.logmap(X, Y), L, atol=atol, rtol=0)
    torch.testing.assert_close(torch.func.vmap(U.logmap)(X, Y), L, atol=atol, rtol=0)
    torch.testing.assert_close(U.logmap(X, Y.clone().requires_grad_(True)).detach(), L, atol=atol, rtol=0)
