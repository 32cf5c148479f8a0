"""The sketched frames of the rank family's maps (Note [Sketched frames of low-rank points] in
geofunc/spaces/_factorized.py): ``tangent``, ``project``/``retract`` and ``transport`` of LowRank,
FixedRank, PSSDLowRank and PSSDFixedRank read a low-rank point's frames from a certified sketch
(O(nkr)) instead of a dense thin SVD or ``eigh``. Pinned here: the sketch is taken where it
should be, its results equal the dense path's (float64 to 1e-10, points and Adam moments over
optimizer steps), the points stay on the space, and every case the sketch cannot certify (a
point off the stratum, a rank below r, a tie at the r-th value, a full-rank Y) takes the dense
path unchanged, bit for bit. No timing is asserted.
"""

from __future__ import annotations

import optree
import pytest
import torch
from torch.func import vmap

import geofunc as gf
import geofunc.spaces._factorized as fz

F64 = torch.float64
F32 = torch.float32
TOL = {F64: 1e-10, F32: 2e-5}

SPACES = [gf.LowRank(rank=4), gf.FixedRank(rank=3), gf.PSSDLowRank(rank=4), gf.PSSDFixedRank(rank=2)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _shapes(space):
    if isinstance(space, (gf.PSSDLowRank, gf.PSSDFixedRank)):
        return [(64, 64), (3, 64, 64)]
    return [(64, 64), (96, 64), (64, 96), (3, 64, 64)]


class _Counted:
    """Counts the sketches that certified (returned frames) while installed; ``dense=True`` disables them."""

    def __init__(self, monkeypatch, dense=False):
        self.taken = 0
        svd, eigh = fz._sketch_svd, fz._sketch_eigh

        def wrap(f):
            def g(*args):
                if dense:
                    return None
                out = f(*args)
                self.taken += out is not None
                return out
            return g

        monkeypatch.setattr(fz, "_sketch_svd", wrap(svd))
        monkeypatch.setattr(fz, "_sketch_eigh", wrap(eigh))


def _dense(fn):
    """``fn()`` with the sketches disabled: the dense path (the maps before the sketch)."""
    with pytest.MonkeyPatch.context() as mp:
        _Counted(mp, dense=True)
        return fn()


CASES = [(space, shape) for space in SPACES for shape in _shapes(space)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("space, shape", CASES, ids=repr)
def test_maps_equal_the_dense_path(space, shape, dtype, monkeypatch):
    g = _gen(1)
    X = space.sample(shape, dtype=dtype, generator=g)
    G = torch.randn(shape, dtype=dtype, generator=g)
    counted = _Counted(monkeypatch)
    T = space.tangent(X, G)
    Y = space.retract(X, -0.3 * T)
    W = space.transport(X, Y, T)
    assert counted.taken == 3  # one sketch per map
    T0 = _dense(lambda: space.tangent(X, G))
    Y0 = _dense(lambda: space.retract(X, -0.3 * T0))
    W0 = _dense(lambda: space.transport(X, Y0, T0))
    tol = TOL[dtype]
    torch.testing.assert_close(T, T0, atol=tol, rtol=0)
    torch.testing.assert_close(Y, Y0, atol=tol, rtol=0)
    torch.testing.assert_close(W, W0, atol=tol, rtol=0)
    assert bool(space.contains(Y).all())
    # the results are tangent: projecting again changes them by rounding only
    torch.testing.assert_close(space.tangent(Y, W), W, atol=tol, rtol=0)
    torch.testing.assert_close(space.tangent(X, T), T, atol=tol, rtol=0)


@pytest.mark.parametrize("opt_name", ["radam", "rsgd"])
@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_optimizer_steps_equal_the_dense_path(space, opt_name, monkeypatch):
    """Five steps of radam / rsgd with momentum: points and first moments within 1e-10 (float64)."""
    g = _gen(2)
    X = space.sample((96, 96), dtype=F64, generator=g)
    S = torch.randn(96, 96, dtype=F64, generator=g)
    S = S @ S.mT / 96  # ½‖X − S‖² with S PSD: the iterates stay of rank r, well separated

    def run():
        opt = gf.optim.radam(space, lr=0.05) if opt_name == "radam" else gf.optim.rsgd(space, lr=0.1, momentum=0.9)
        P, st = X, opt.init(X)
        for _ in range(5):
            P, st = opt.update(P - S, st, P)
        return P, st

    counted = _Counted(monkeypatch)
    P, st = run()
    assert counted.taken >= 15  # tangent, retract, transport at every step
    P0, st0 = _dense(run)
    torch.testing.assert_close(P, P0, atol=1e-10, rtol=0)
    moments = [(a, b) for a, b in zip(optree.tree_leaves(st), optree.tree_leaves(st0)) if a.shape == X.shape]
    assert moments  # radam's first moment, rsgd's momentum buffer
    for m, m0 in moments:
        torch.testing.assert_close(m, m0, atol=1e-10, rtol=0)
    assert bool(space.contains(P).all())


def _dense_equal(fn, monkeypatch):
    """``fn()`` takes the dense path (no sketch certifies) and gives its result bit for bit."""
    counted = _Counted(monkeypatch)
    out = fn()
    assert counted.taken == 0
    ref = _dense(fn)
    assert torch.equal(out, ref) or (out.isnan().all() and ref.isnan().all())


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_full_rank_input_takes_the_dense_path(space, monkeypatch):
    g = _gen(3)
    Y = torch.randn(64, 64, dtype=F64, generator=g)
    G = torch.randn(64, 64, dtype=F64, generator=g)
    _dense_equal(lambda: space.project(Y), monkeypatch)
    _dense_equal(lambda: space.tangent(Y + Y.mT, G), monkeypatch)  # a point off the stratum


@pytest.mark.parametrize("space", [gf.LowRank(rank=4), gf.PSSDLowRank(rank=4)], ids=repr)
def test_rank_below_r_takes_the_dense_path(space, monkeypatch):
    """A LowRank (PSSDLowRank) point of rank 2 < 4: its frames are not determined, the dense path decides."""
    g = _gen(4)
    U = torch.linalg.qr(torch.randn(64, 2, dtype=F64, generator=g)).Q
    X = U @ torch.diag(torch.tensor([2.0, 1.0], dtype=F64)) @ U.mT
    G = torch.randn(64, 64, dtype=F64, generator=g)
    _dense_equal(lambda: space.tangent(X, G), monkeypatch)
    _dense_equal(lambda: space.project(X + 1e-3 * G), monkeypatch)


def test_tie_at_the_rank_takes_the_dense_path(monkeypatch):
    """σ_r = σ_(r+1): which of the two is kept is the dense SVD's choice, kept."""
    g = _gen(5)
    Q = torch.linalg.qr(torch.randn(64, 6, dtype=F64, generator=g)).Q
    P = torch.linalg.qr(torch.randn(64, 6, dtype=F64, generator=g)).Q
    Y = Q @ torch.diag(torch.tensor([3.0, 2.5, 2.0, 1.0, 1.0, 0.5], dtype=F64)) @ P.mT
    _dense_equal(lambda: gf.LowRank(rank=4).project(Y), monkeypatch)


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_non_finite_points_give_nan(space):
    X = space.sample((2, 64, 64), dtype=F64, generator=_gen(6))
    X[0, 3, 5] = float("nan")
    G = torch.randn(64, 64, dtype=F64, generator=_gen(7))
    for out in (space.tangent(X, G), space.project(X), space.retract(X, 0.1 * space.tangent(X, G))):
        assert out[0].isnan().all()
        assert not out[1].isnan().any()


def test_no_draw_from_the_global_generator_and_empty_batches():
    X = gf.LowRank(rank=4).sample((96, 64), dtype=F64, generator=_gen(8))
    G = torch.randn(96, 64, dtype=F64, generator=_gen(9))
    state = torch.get_rng_state()
    a = gf.LowRank(rank=4).retract(X, gf.LowRank(rank=4).tangent(X, G))
    assert torch.equal(torch.get_rng_state(), state)
    b = gf.LowRank(rank=4).retract(X, gf.LowRank(rank=4).tangent(X, G))
    assert torch.equal(a, b)  # the sketch is fixed: the same result on every call
    for space in SPACES:
        E = torch.zeros(0, 64, 64, dtype=F64)
        assert space.tangent(E, E).shape == (0, 64, 64)
        assert space.project(E).shape == (0, 64, 64)


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_vmap_keeps_the_dense_path_and_agrees(space, monkeypatch):
    """Under vmap no value may be read: the dense path, equal to the eager (sketched) result."""
    X = space.sample((3, 64, 64), dtype=F64, generator=_gen(10))
    G = torch.randn(3, 64, 64, dtype=F64, generator=_gen(11))
    T = space.tangent(X, G)
    counted = _Counted(monkeypatch)
    Tv = vmap(space.tangent)(X, G)
    Yv = vmap(space.retract)(X, -0.3 * Tv)
    assert counted.taken == 0
    torch.testing.assert_close(Tv, T, atol=1e-10, rtol=0)
    torch.testing.assert_close(Yv, space.retract(X, -0.3 * T), atol=1e-10, rtol=0)


def test_derivatives_keep_the_exact_path(monkeypatch):
    """A differentiated map (autograd through project/tangent) is not sketched."""
    space = gf.LowRank(rank=4)
    X = space.sample((64, 64), dtype=F64, generator=_gen(12)).requires_grad_()
    G = torch.randn(64, 64, dtype=F64, generator=_gen(13))
    counted = _Counted(monkeypatch)
    (space.tangent(X, G).sum() + space.project(X + 0.1 * G).sum()).backward()
    assert counted.taken == 0 and X.grad is not None


@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_small_matrices_take_the_dense_path(space, monkeypatch):
    """Below a short side of 64 the sketch does not pay for its fixed costs: the dense path, bit for bit."""
    g = _gen(14)
    X = space.sample((48, 48), dtype=F64, generator=g)
    G = torch.randn(48, 48, dtype=F64, generator=g)
    _dense_equal(lambda: space.tangent(X, G), monkeypatch)
    _dense_equal(lambda: space.project(X + 1e-3 * space.tangent(X, G)), monkeypatch)


@pytest.mark.parametrize("space", [gf.LowRank(rank=4), gf.PSSDLowRank(rank=4)], ids=repr)
def test_a_default_device_other_than_the_points_is_not_read(space, monkeypatch):
    """The sketch's Gaussian is made on the CPU whatever the default device (set_default_device("cuda") or
    "meta", as deferred initialization sets): it took the default device, and a CPU point's map failed."""
    X = space.sample((80, 80), dtype=F64, generator=_gen(10))
    G = torch.randn(80, 80, dtype=F64, generator=_gen(11))
    monkeypatch.setattr(fz, "_SKETCHES", {})  # (a cached Gaussian would hide it)
    counted = _Counted(monkeypatch)
    with torch.device("meta"):
        V = space.tangent(X, G)
        Y = space.project(X + 0.01 * V)
    assert V.device.type == "cpu" and Y.device.type == "cpu" and counted.taken == 2
    ref_V = _dense(lambda: space.tangent(X, G))
    ref_Y = _dense(lambda: space.project(X + 0.01 * ref_V))
    torch.testing.assert_close(V, ref_V, rtol=0, atol=TOL[F64])
    torch.testing.assert_close(Y, ref_Y, rtol=0, atol=TOL[F64])


@pytest.mark.parametrize("eig", [False, True])
def test_a_tail_at_the_old_residual_bound_keeps_a_small_value_s_frame(eig):
    """A kept value σ_r = 3e-8·σ₁ and a real tail of 16 values whose sketch residual is ~12× the rank
    tolerance (under the former √k = 16 × it): the tangent equals the exact one (the construction's
    frames) to the dense path's rounding, not ~residual/σ_r (4e-7 when the sketch took it)."""
    g = _gen(7)
    n, r, m = 256, 4, 16
    W = torch.linalg.qr(torch.randn(n, 2 * (r + m), generator=g, dtype=F64))[0]
    U = W[:, : r + m]
    V = U if eig else W[:, r + m :]
    tol = fz.rank_tol(torch.tensor(1.0, dtype=F64), n, n).item()
    vals = torch.cat([torch.logspace(0, -7.5, r, dtype=F64), torch.full((m,), 3.0 * tol, dtype=F64)])
    X = (U * vals) @ V.mT
    G = torch.randn(n, n, generator=g, dtype=F64)
    Ur, Vr = U[:, :r], V[:, :r]
    if eig:
        space, G = gf.PSSDLowRank(rank=r), 0.5 * (G + G.mT)
        X = 0.5 * (X + X.mT)
    else:
        space = gf.LowRank(rank=r)
    UG = Ur.mT @ G
    exact = Ur @ UG + (G @ Vr - Ur @ (UG @ Vr)) @ Vr.mT
    T = space.tangent(X, G)
    assert ((T - exact).norm() / exact.norm()).item() < 2e-8  # dense: ~1e-9; the sketch took it: 4e-7


@pytest.mark.parametrize("scale", [3e-4, 1e4])
@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_the_point_s_scale_does_not_decide_the_sketch(space, scale, monkeypatch):
    """float32 points scaled by 3e-4 (σ_r below √ε, the old absolute gap tolerance) and by 1e4: the sketch
    is taken (its checks are relative to σ₁) and agrees with the dense path relative to the scale."""
    g = _gen(11)
    X = space.sample((96, 96), dtype=F32, generator=g) * scale
    G = torch.randn(96, 96, dtype=F32, generator=g) * scale

    def maps():
        T = space.tangent(X, G)
        return T, space.project(X + 0.1 * T)

    counted = _Counted(monkeypatch)
    T, Y = maps()
    assert counted.taken == 2
    T0, Y0 = _dense(maps)
    torch.testing.assert_close(T / scale, T0 / scale, atol=TOL[F32], rtol=0)
    torch.testing.assert_close(Y / scale, Y0 / scale, atol=TOL[F32], rtol=0)


# ------------------------------------------------ Note [Symmetric parts without strided elementwise ops]
EIG_SPACES = [gf.PSSDLowRank(rank=4), gf.PSSDFixedRank(rank=3)]
_ARITH = {"add", "sub", "mul", "div", "rsub"}


class _StridedArith(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts elementwise arithmetic ops reading a square matrix of side ≥ ``n`` transposed (the
    column-at-a-time walk that was most of a PSSD optimizer step)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.count = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.rstrip("_") in _ARITH:
            for a in optree.tree_leaves((args, kwargs or {})):
                if (isinstance(a, torch.Tensor) and a.ndim >= 2 and a.shape[-1] == a.shape[-2] >= self.n
                        and a.stride(-2) == 1 and a.stride(-1) != 1):
                    self.count += 1
        return func(*args, **(kwargs or {}))


def _old_eig_tangent(Q, G):
    """The tangent's former formula from the frame (kept as the reference)."""
    Gs = 0.5 * (G + G.mT)
    QG = Q.mT @ Gs
    A = 2.0 * Q @ QG - Q @ (QG @ Q) @ Q.mT
    return 0.5 * (A + A.mT)


@pytest.mark.parametrize("shape", [(96, 96), (2, 96, 96), (2, 512, 512)], ids=str)
@pytest.mark.parametrize("space", EIG_SPACES, ids=repr)
def test_eig_maps_read_no_matrix_transposed_and_keep_their_values(space, shape, monkeypatch):
    """tangent, retract (project) and transport of a low-rank PSD point: sketched, no elementwise op
    reads an n×n matrix transposed (the former symmetric parts did, eight per radam step; a batch of
    small matrices still may), the
    results exactly symmetric and equal to the former formulas from the same frames (tangent: to
    1e-10 in float64; project: bit for bit) and to the dense path."""
    g = _gen(21)
    n, r = shape[-1], space.rank
    X = space.sample(shape, dtype=F64, generator=g)
    G = torch.randn(shape, dtype=F64, generator=g)
    frames = []
    real = fz._sketch_eigh

    def spy(S, r_, q):
        out = real(S, r_, q)
        frames.append(out)
        return out

    monkeypatch.setattr(fz, "_sketch_eigh", spy)
    # the counting mode caches nothing: the maps' in-place updates stay (Note [In place under a dispatch mode])
    monkeypatch.setattr(fz, "dispatch_mode_active", lambda: False)
    mode = _StridedArith(n)
    with mode:
        T = space.tangent(X, G)
        Y = space.retract(X, -0.3 * T)
        W = space.transport(X, Y, T)
    if len(shape) == 2 or n >= fz._BLOCKED_T_MIN:  # (small batched matrices: the strided read is as fast)
        assert mode.count == 0
    assert len(frames) == 3 and all(f is not None for f in frames)
    for V in (T, Y, W):
        assert torch.equal(V, V.mT)
    torch.testing.assert_close(T, _old_eig_tangent(frames[0][1][..., -r:], G), atol=1e-10, rtol=0)
    torch.testing.assert_close(W, _old_eig_tangent(frames[2][1][..., -r:], T), atol=1e-10, rtol=0)
    lam, Q = frames[1]
    q = lam.shape[-1]
    gv = space._value_map.project(lam, torch.arange(q) >= q - r, None, n)[0][..., q - r:]
    A = (Q[..., q - r:] * gv.unsqueeze(-2)) @ Q[..., q - r:].mT
    assert torch.equal(Y, 0.5 * (A + A.mT))  # the former project's formula, bit for bit
    monkeypatch.setattr(fz, "_sketch_eigh", real)
    monkeypatch.undo()
    T0 = _dense(lambda: space.tangent(X, G))
    Y0 = _dense(lambda: space.retract(X, -0.3 * T0))
    W0 = _dense(lambda: space.transport(X, Y0, T0))
    for V, V0 in ((T, T0), (Y, Y0), (W, W0)):
        torch.testing.assert_close(V, V0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("space", EIG_SPACES, ids=repr)
def test_eig_tangent_broadcasts_and_differentiates_in_g_as_before(space):
    """The sketched tangent at a point nothing differentiates: G batched where X is not (and back),
    and G requiring grad: values and G's gradient equal the former formula's (float64, 1e-10)."""
    g = _gen(22)
    X = space.sample((96, 96), dtype=F64, generator=g)
    Xb = space.sample((2, 96, 96), dtype=F64, generator=g)
    G = torch.randn(3, 96, 96, dtype=F64, generator=g)
    r = space.rank
    Q = torch.linalg.eigh(X)[1][..., -r:]
    torch.testing.assert_close(space.tangent(X, G), _old_eig_tangent(Q, G), atol=1e-10, rtol=0)
    Qb = torch.linalg.eigh(Xb)[1][..., -r:]
    torch.testing.assert_close(space.tangent(Xb, G[0]), _old_eig_tangent(Qb, G[0]), atol=1e-10, rtol=0)
    Gr = G.clone().requires_grad_()
    C = torch.randn(3, 96, 96, dtype=F64, generator=g)
    T = space.tangent(X, Gr)
    (gG,) = torch.autograd.grad((T * C).sum(), Gr)
    (gG0,) = torch.autograd.grad((_old_eig_tangent(Q, Gr) * C).sum(), Gr)
    torch.testing.assert_close(T.detach(), _old_eig_tangent(Q, G), atol=1e-10, rtol=0)
    torch.testing.assert_close(gG, gG0, atol=1e-10, rtol=0)
    assert torch.equal(T.detach(), T.detach().mT)


@pytest.mark.parametrize("shape", [(0, 64, 64), (70, 70), (3, 70, 70), (2, 512, 512), (2, 1, 520, 520)], ids=str)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_symmetric_parts_are_bit_for_bit_the_strided_ones(shape, dtype):
    """The blocked-copy helpers give the entries of ``0.5 * (A + Aᵀ)`` and ``A + Aᵀ`` bit for bit, for a
    contiguous and a transposed (column-major) ``A``, and leave ``A`` unchanged."""
    A = torch.randn(shape, dtype=dtype, generator=_gen(23))
    for B in (A, A.mT):
        keep = B.clone()
        assert torch.equal(fz._sym_detached(B), 0.5 * (B + B.mT))
        assert torch.equal(fz._plus_transposed(B), B + B.mT)
        assert torch.equal(B, keep)


@pytest.mark.parametrize("shape, wide", [((64, 64), False), ((64, 160), True), ((3, 64, 64), False),
                                         ((2, 2, 64, 64), False), ((2, 2, 64, 160), True)], ids=str)
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_the_sketch_s_certificate_is_the_plain_residual_to_rounding(shape, wide, dtype, monkeypatch):
    """The certificate's residual ‖Y − Q B‖_F/σ₁ is one fused product written over its own temporary
    (Note [Sketched frames of low-rank points]): within rounding of the plain ``(Y − Q@B)/σ₁``, far below
    the rank tolerance, for 2-D, transposed (wide), 3-D and 4-D batches; the caller's point is unchanged,
    and the maps take the sketch there (the batches of more than one dimension included)."""
    space = gf.LowRank(rank=4)
    g = _gen(24)
    X = space.sample(shape, dtype=dtype, generator=g)
    Yt = X.mT if wide else X
    n, k = Yt.shape[-2:]
    keep = Yt.clone()
    Q = torch.linalg.qr(Yt @ fz._sketch_matrix(k, 12, dtype, Yt.device)).Q
    B = Q.mT @ Yt
    s1 = torch.linalg.svdvals(B)[..., 0]
    res = fz._member_residual(Yt, Q, B, s1)
    ref = torch.linalg.matrix_norm((Yt - Q @ B) / s1[..., None, None])
    tol = fz.rank_tol(torch.ones_like(res), n, k)
    assert bool((res <= 0.5 * tol).all()) and bool(((res - ref).abs() <= 0.05 * tol).all())
    assert torch.equal(Yt, keep)
    if Yt.ndim > 3:  # (the fallback past three dimensions: the values of beta·C + alpha·(A B), bit for bit)
        assert torch.equal(fz._add_product(Yt, Q, B, 1.0, -1.0), 1.0 * Yt + -1.0 * (Q @ B))
    counted = _Counted(monkeypatch)
    G = torch.randn(shape, dtype=dtype, generator=g)
    space.tangent(X, G)
    assert counted.taken == 1
