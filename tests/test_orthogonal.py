"""Space-specific tests of the orthogonal family (SO, Stiefel, Grassmannian).

The generic properties (membership, round trips, tangent projection, retraction, transforms)
are in the conformance suite; here: Haar statistics, determinants, the Riemannian gradient
descent identities, the cost of the tall chart, bad input.
"""

import pytest
import torch
from reference import member
from torch.func import grad

import geofunc as gf
from geofunc._linalg import cayley, expm

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("n", [1, 2, 5, 64, 512])
def test_so_samples_have_det_plus_one(n):
    # GeoTorch reads the sign from det(), which underflows to ±0 for 512×512 float32.
    X = gf.SO().sample((4, n, n), generator=_gen(n), dtype=torch.float32)
    sign, logabs = torch.linalg.slogdet(X.double())
    assert (sign == 1).all()
    assert logabs.abs().max() < 1e-3
    assert member(gf.SO(), X)


def test_so_sample_is_haar_by_moments():
    # Haar on SO(n), n >= 3: E[tr X] = 0, E[tr(X)^2] = 1, E[X_ij^2] = 1/n.
    n, N = 4, 20000
    X = gf.SO().sample((N, n, n), generator=_gen(1), dtype=F64)
    tr = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert abs(tr.mean()) < 0.03
    assert abs((tr**2).mean() - 1.0) < 0.05
    assert torch.allclose((X**2).mean(0), torch.full((n, n), 1.0 / n, dtype=F64), atol=0.01)


@pytest.mark.parametrize("space", [gf.Stiefel(), gf.Grassmannian()], ids=repr)
@pytest.mark.parametrize("shape", [(7, 3), (3, 7)])
def test_frame_samples_are_uniform_by_moments(space, shape):
    # For a uniform frame X (n×k, tall form), E[X Xᵀ] = (k/n) I and E[X] = 0.
    N = 20000
    X = space.sample((N,) + shape, generator=_gen(2), dtype=F64)
    Xt = X if shape[0] >= shape[1] else X.mT
    n, k = Xt.shape[-2:]
    P = (Xt @ Xt.mT).mean(0)
    assert torch.allclose(P, torch.eye(n, dtype=F64) * k / n, atol=0.02)
    assert Xt.mean(0).abs().max() < 0.03


def test_sample_reproducible_and_respects_dtype():
    for M, shape in [(gf.SO(), (3, 5, 5)), (gf.Stiefel(), (2, 6, 3)), (gf.Grassmannian(), (3, 6))]:
        a = M.sample(shape, generator=_gen(7), dtype=F64)
        b = M.sample(shape, generator=_gen(7), dtype=F64)
        assert a.dtype == F64 and a.shape == shape
        assert torch.equal(a, b)


# -------------------------------------------------------------- determinants
def test_so_from_manifold_rejects_det_minus_one():
    X = gf.SO().sample((4, 4), generator=_gen(3), dtype=F64)
    X = X * torch.tensor([-1.0, 1, 1, 1], dtype=F64)
    with pytest.raises(gf.ManifoldError, match=r"SO.*det"):
        gf.SO().from_manifold(X)
    assert not gf.SO().contains(X)
    # ... while it is a perfectly good square Stiefel point (O(n)).
    Z, base = gf.Stiefel().from_manifold(X)
    assert torch.allclose(gf.Stiefel().to_manifold(Z, base), X)


def test_so_logabsdet_is_zero_and_differentiable():
    Z = torch.randn(3, 5, 5, dtype=F64)
    assert torch.equal(gf.SO().logabsdet(Z), torch.zeros(3, dtype=F64))
    g = grad(lambda z: gf.SO().logabsdet(z).sum())(Z)
    assert torch.equal(g, torch.zeros_like(Z))
    with pytest.raises(gf.ManifoldError, match="square"):
        gf.SO().logabsdet(torch.randn(3, 4))


# ------------------------------------------- Riemannian gradient descent identity
def _rgd_step(space, Y, C, eta):
    """One SGD step of size eta on raw at zero (loss <C, X>), then rebase."""
    Z0, base = space.from_manifold(Y)
    g = grad(lambda z: (space.to_manifold(z, base) * C).sum())(Z0)
    Z2, base2 = space.rebase(Z0 - eta * g, base)
    assert torch.equal(Z2, torch.zeros_like(Z2))
    return space.to_manifold(Z2, base2)


@pytest.mark.parametrize("triv", ["expm", "cayley"])
@pytest.mark.parametrize(
    "space_cls,shape", [(gf.SO, (5, 5)), (gf.Stiefel, (5, 5)), (gf.Stiefel, (7, 3)), (gf.Grassmannian, (7, 3))]
)
def test_rgd_identity(space_cls, shape, triv):
    space = space_cls(triv=triv)
    g = _gen(4)
    Y = space.sample(shape, generator=g, dtype=F64)
    G = torch.randn(shape, generator=g, dtype=F64)  # Euclidean gradient of the linear loss
    if space_cls is gf.Grassmannian:
        G = G - Y @ (Y.mT @ G)  # only the horizontal part moves a subspace
    eta = 0.1
    W = G @ Y.mT - Y @ G.mT
    phi = expm if triv == "expm" else cayley
    expected = phi(-eta * W) @ Y
    assert torch.allclose(_rgd_step(space, Y, G, eta), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------- the tall chart
def test_tall_stiefel_chart_has_no_square_intermediate():
    """to_manifold of a 1024×8 frame must not form any 1024×1024 matrix (cost O(n k²))."""
    n, k = 1024, 8
    space = gf.Stiefel()
    Y = space.sample((n, k), generator=_gen(5))
    Z = torch.randn(n, k, generator=_gen(6), requires_grad=True)
    big = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() >= n * n:
                big.append((getattr(func, "__name__", str(func)), tuple(out.shape)))
            return out

    with Spy():
        X = space.to_manifold(Z, Y)
        X.sum().backward()
    assert big == []
    assert member(space, X.detach())


def _frame_error(X):
    X = X.double()
    return (X.mT @ X - torch.eye(X.shape[-1], dtype=F64)).abs().max().item()


@pytest.mark.parametrize("shape", [(5, 3), (7, 4), (9, 5), (3, 2), (33, 32), (6, 3), (12, 8)], ids=str)
@pytest.mark.parametrize("space", [gf.Stiefel(), gf.Grassmannian()], ids=repr)
def test_narrow_frames_stay_orthonormal_at_large_raw_scales(space, shape):
    """Note [Reduced tall chart]: frames with n < 2k (C = (I − YYᵀ)Z of rank < k) took the 2k×2k matrix,
    which was 1e-2 off at raw scale 1e6 and finite garbage (‖XᵀX − I‖ ~ 1e18) at 1e8 in float64."""
    g = _gen(11)
    Z = torch.randn(shape, generator=g, dtype=F64)
    Y = gf.Stiefel().sample(shape, generator=g, dtype=F64)
    for base in (None, Y):
        for scale, tol in ((1.0, 1e-14), (1e4, 1e-10), (1e6, 1e-8), (1e8, 1e-6)):
            assert _frame_error(space.to_manifold(scale * Z, base)) < tol, (scale, base is None)
        # float32 at raw scale 1e2 (5×3: was 5e-5, 2e-2 at 1e3); the README's "Extreme raw scales" bound
        assert _frame_error(space.to_manifold((1e2 * Z).float(), None if base is None else Y.float())) < 3e-4


@pytest.mark.parametrize("rank,shape", [(3, (5, 8)), (4, (6, 6)), (2, (3, 40)), (3, (4, 4))], ids=str)
def test_rank_family_narrow_frames_stay_orthonormal(rank, shape):
    """The rank family's U and V frames (n×r, k×r) with a side under 2r rows: the n×n generator,
    stacked with the other frame while both are short (Note [Reduced tall chart])."""
    from geofunc import _linalg

    g = _gen(12)
    space = gf.LowRank(rank=rank)
    _, base = space.from_manifold(space.sample(shape, generator=g, dtype=F64))
    Z = torch.randn(shape, generator=g, dtype=F64)
    for scale in (1.0, 1e4, 1e8):
        U, _, V, _ = space._factors(scale * Z, base)
        assert max(_frame_error(U), _frame_error(V)) < 1e-6, scale
    # the stacked frames are the frames charted one by one (the same maps)
    Zt = Z if shape[0] >= shape[1] else Z.mT
    Ub, Vb = base  # tall form, as from_manifold returns it
    pairs = [(torch.tril(Zt[:, :rank], -1), Ub), (torch.triu(Zt[:rank, :], 1).mT, Vb)]
    together = _linalg.frame_charts(pairs, "expm", packed=True)
    apart = [_linalg.frame_charts([p], "expm", packed=True)[0] for p in pairs]
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # derivatives of the stacked narrow-frame route, against finite differences
    z = (0.5 * Z).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: space.to_manifold(z, base), (z,))


def test_callable_triv_is_used():
    calls = []

    def my_expm(A):
        calls.append(A.shape)
        return torch.linalg.matrix_exp(A)

    Z = torch.randn(6, 2, dtype=F64)
    X = gf.Stiefel(triv=my_expm).to_manifold(Z)
    assert calls == [(6, 6)]
    assert torch.allclose(X, gf.Stiefel().to_manifold(Z))
    # GeoTorch accepts any callable lazily; so do we (it fails at the first call).
    gf.Stiefel(triv=lambda: 3)


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [gf.SO, gf.Stiefel, gf.Grassmannian])
def test_bad_triv_raises_at_construction(cls):
    with pytest.raises(gf.ManifoldError, match=r"triv.*'nope'"):
        cls(triv="nope")
    with pytest.raises(gf.ManifoldError):
        cls(triv=3)


@pytest.mark.parametrize("cls", [gf.SO, gf.Stiefel, gf.Grassmannian])
def test_vector_input_raises(cls):
    with pytest.raises(gf.ManifoldError, match=r"expected `Z` to be .*matrices.*shape \(7,\)"):
        cls().to_manifold(torch.randn(7))


def test_so_non_square_raises_with_shape():
    with pytest.raises(gf.ManifoldError, match=r"SO\(triv='expm'\): expected `Z` to be square.*\(3, 5\)"):
        gf.SO().to_manifold(torch.randn(3, 5))
    with pytest.raises(gf.ManifoldError, match="square"):
        gf.SO().sample((7, 3, 2))


def test_integer_input_raises():
    with pytest.raises(gf.ManifoldError, match="floating"):
        gf.Stiefel().to_manifold(torch.ones(4, 2, dtype=torch.int64))


def test_bad_base_raises():
    with pytest.raises(gf.ManifoldError, match="base"):
        gf.Stiefel().to_manifold(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(gf.ManifoldError, match="base"):
        gf.SO().to_manifold(torch.randn(2, 3, 3), torch.randn(4, 3, 3))


def test_check_names_the_violation_not_the_values():
    X = gf.Stiefel().sample((6, 3), generator=_gen(8), dtype=F64) * 1.01
    with pytest.raises(gf.ManifoldError) as info:
        gf.Stiefel().check(X)
    msg = str(info.value)
    assert "Stiefel" in msg and "max|XᵀX − I|" in msg and "(6, 3)" in msg
    assert "tensor(" not in msg


@pytest.mark.parametrize("space", [gf.SO(), gf.Stiefel(), gf.Grassmannian(), gf.Stiefel(triv="cayley")], ids=repr)
def test_nan_raw_input_gives_nan_not_a_point(space):
    Z = torch.randn(2, 5, 5 if isinstance(space, gf.SO) else 3, dtype=F64)
    Z[0, 1, 0] = float("nan")
    X = space.to_manifold(Z)
    assert torch.isnan(X[0]).any()
    assert not space.contains(X)[0] and space.contains(X)[1]
    with pytest.raises(gf.ManifoldError):
        space.check(X)


def test_spaces_are_hashable_values():
    assert gf.SO() == gf.SO(triv="expm") and hash(gf.SO()) == hash(gf.SO())
    assert gf.Stiefel() != gf.Stiefel(triv="cayley")
    assert len({gf.SO(), gf.SO(), gf.Grassmannian()}) == 2
    with pytest.raises(Exception):
        gf.SO().triv = "cayley"


# ------------------------------------------- NaN raw input: NaN gradients on every path
_NAN_SPACES = [gf.SO(), gf.SO(triv="cayley"), gf.Stiefel(), gf.Stiefel(triv="cayley"), gf.Grassmannian(),
               gf.Grassmannian(triv="cayley"), gf.Unitary(), gf.Unitary(triv="cayley"), gf.AlmostOrthogonal(lam=0.5),
               gf.AlmostOrthogonal(lam=0.5, triv="cayley")]


def _nan_batch(space, scale, where):
    """A batch of two square raw tensors: [0] with a NaN at ``where`` (an entry every chart reads), [1]
    finite at ``scale`` (1e-9: the exponential's degree 1, where its adjoint reads nothing of A)."""
    dtype = torch.complex128 if isinstance(space, gf.Unitary) else F64
    g = _gen(3)
    Z = (scale * torch.randn(2, 4, 4, generator=g, dtype=F64)).to(dtype)
    Z[0][where] = float(where[1] == 0 and "nan" or "inf")
    W = torch.randn(2, 4, 4, generator=g, dtype=F64).to(dtype)
    return Z, W


@pytest.mark.parametrize("where", [(1, 0), (3, 2)], ids=["nan", "inf"])
@pytest.mark.parametrize("scale", [1.0, 1e-9, 0.0], ids=["random", "tiny", "zero"])
@pytest.mark.parametrize("space", _NAN_SPACES, ids=repr)
def test_nan_raw_input_gives_nan_gradients_on_every_path(space, scale, where):
    """NaN/inf raw input: NaN value and NaN gradient (never finite wrong numbers) under plain autograd,
    torch.func.grad (the one-node path), vmap of grad and jvp; the finite neighbour's gradient is its
    gradient alone. (The exponential read a NaN matrix as norm 0: degree 1, adjoint G itself.)"""
    Z, W = _nan_batch(space, scale, where)
    loss = lambda z, w: (space.to_manifold(z) * w.conj()).sum().real  # noqa: E731
    z = Z.clone().requires_grad_()
    X = space.to_manifold(z)
    (X * W.conj()).sum().real.backward()
    grads = {"autograd": z.grad, "grad": grad(loss)(Z, W), "vmap(grad)": torch.vmap(grad(loss))(Z, W),
             "jvp": torch.func.jvp(space.to_manifold, (Z,), (W,))[1]}
    alone = grad(loss)(Z[1:], W[1:])
    assert torch.isnan(X[0]).any() and torch.isfinite(X[1]).all()
    for path, g in grads.items():
        assert not torch.isfinite(g[0][where]), path  # the non-finite entry's own derivative
        assert torch.isfinite(g[1]).all(), path
        if path != "jvp":
            torch.testing.assert_close(g[1:], alone, rtol=1e-12, atol=1e-12, msg=path)


@pytest.mark.parametrize("space", [gf.SO(), gf.Unitary()], ids=repr)
def test_nan_raw_input_gives_nan_gradients_under_compile(space):
    """The compiled exponential's adjoint (geofunc::expm_vjp's kernel) too."""
    Z, W = _nan_batch(space, 1e-9, (1, 0))
    f = torch.compile(lambda z, w: (space.to_manifold(z) * w.conj()).sum().real, fullgraph=True, backend="aot_eager")
    z = Z.clone().requires_grad_()
    f(z, W).backward()
    assert torch.isnan(z.grad[0][1, 0]) and torch.isfinite(z.grad[1]).all()
    torch.testing.assert_close(z.grad[1:], grad(lambda z: (space.to_manifold(z) * W[1:].conj()).sum().real)(Z[1:]))


@pytest.mark.parametrize("space", [gf.Stiefel(triv="cayley"), gf.Grassmannian(triv="cayley"), gf.SO(triv="cayley")], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cayley_chart_at_overflowing_raw_scales_is_nan_or_a_point_never_an_error(space, dtype):
    """Raw ~1e30 (float32; CᵀC overflows) used to raise torch.linalg's LinAlgError from inv()."""
    g = _gen(4)
    shape = (64, 5, 5) if isinstance(space, gf.SO) else (64, 5, 3)
    Z = torch.randn(shape, generator=g, dtype=dtype) * (1e30 if dtype == torch.float32 else 1e300)
    X = space.to_manifold(Z)
    if not isinstance(space, gf.SO):  # SO's inverse of a huge skew matrix has only a known limitation's accuracy
        assert (torch.isnan(X).flatten(-2).any(-1) | space.contains(X)).all()


# ------------------------------------------------------------------ the derivative of project (polar)
# Note [Polar derivative]: project of SO/Stiefel/Grassmannian/Unitary took torch.linalg.svd's backward,
# NaN or wrong where singular values repeat: at every point of the space (Stiefel 5×3 at Y = X: NaN;
# Grassmannian 46% off; Unitary 217% off), and ~ε/δ² at distance δ from it.
POLAR_CASES = {
    "SO": (gf.SO(), (4, 4), F64), "Stiefel": (gf.Stiefel(), (5, 3), F64), "Stiefel-wide": (gf.Stiefel(), (3, 5), F64),
    "Grassmannian": (gf.Grassmannian(), (6, 2), F64), "Unitary": (gf.Unitary(), (3, 3), torch.complex128),
    "Stiefel-complex": (gf.Stiefel(), (5, 3), torch.complex128), "Stiefel-complex-wide": (gf.Stiefel(), (2, 4), torch.complex128),
}


def _tangent_oracle(X, E):
    """D polar(X)[E] at a frame X (tall; ᴴ if complex): X skew(XᴴE) + (I − XXᴴ)E."""
    B = X.mH @ E
    return X @ (0.5 * (B - B.mH)) + E - X @ B


def _pair(A, B):
    return (A.conj() * B).real.sum()


@pytest.mark.parametrize("name", list(POLAR_CASES))
def test_project_derivative_at_and_near_points(name):
    M, shape, dtype = POLAR_CASES[name]
    g = _gen(3)
    X = M.sample(shape, generator=g, dtype=dtype)
    E = torch.randn(shape, generator=g, dtype=dtype)
    C = torch.randn(shape, generator=g, dtype=dtype)
    wide = shape[0] < shape[1]
    Xt, Et = (X.mH, E.mH) if wide else (X, E)
    exact = _tangent_oracle(Xt, Et)
    exact = exact.mH if wide else exact
    for c in (1.0, 2.0):  # at the point, and at a multiple of it: every singular value repeated
        _, jv = torch.func.jvp(M.project, (c * X,), (E,))
        torch.testing.assert_close(jv, exact / c, atol=1e-10, rtol=0)
        gr = grad(lambda y: _pair(C, M.project(y)))(c * X)
        torch.testing.assert_close(_pair(gr, E), _pair(C, exact) / c, atol=1e-10, rtol=0)
    # near the point (distance 1e-6 along a normal-ish direction) and far from it: central differences
    for Y in (X + 1e-6 * torch.randn(shape, generator=g, dtype=dtype), X + 0.5 * torch.randn(shape, generator=g, dtype=dtype)):
        h = 1e-6
        fd = (M.project(Y + h * E) - M.project(Y - h * E)) / (2 * h)
        _, jv = torch.func.jvp(M.project, (Y,), (E,))
        torch.testing.assert_close(jv, fd, atol=1e-7, rtol=0)


def test_project_derivative_in_float32_near_a_point():
    """float32, 1e-3 from a rotation: the derivative as accurate as float32 allows (the SVD backward's
    was 1e-3 off at 1e-4 from the point)."""
    g = _gen(4)
    X = gf.SO().sample((4, 4), generator=g, dtype=F64)
    E = torch.randn(4, 4, generator=g, dtype=F64)
    Y = X + 1e-3 * torch.randn(4, 4, generator=g, dtype=F64)
    ref = torch.func.jvp(gf.SO().project, (Y,), (E,))[1]
    out = torch.func.jvp(gf.SO().project, (Y.float(),), (E.float(),))[1]
    assert float((out.double() - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["Unitary", "Stiefel-complex", "Stiefel-complex-wide"])
def test_complex_project_under_vmap_grad_equals_a_loop(name):
    M, shape, dtype = POLAR_CASES[name]
    g = _gen(5)
    Y = torch.randn((3,) + shape, generator=g, dtype=dtype)
    C = torch.randn((3,) + shape, generator=g, dtype=dtype)

    def f(y, c):
        return _pair(c, M.project(y))

    out = torch.func.vmap(grad(f))(Y, C)
    ref = torch.stack([grad(f)(y, c) for y, c in zip(Y, C)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("space, dtype", [(gf.SO(), torch.float32), (gf.Unitary(), torch.complex64),
                                          (gf.Stiefel(), torch.float32), (gf.Stiefel(metric="canonical"), torch.float32),
                                          (gf.Stiefel(metric="canonical"), torch.complex64)],
                         ids=["SO", "Unitary", "Stiefel", "Stiefel-canonical", "Stiefel-canonical-complex"])
def test_a_compiled_step_from_a_sample_compiles_once(space, dtype):
    """A compiled training step started from ``sample`` compiles one graph over four steps: the sample
    has the layout of the step's outputs (strides are guarded). SO's and Unitary's samples were QR's
    column-major Q while their maps return row-major tensors: a second graph after the first step
    (Note [Square samples in row-major layout]). Tall Stiefel frames are column-major on both sides
    with the embedded metric; the canonical metric's retraction (the chart centred at X) returns
    row-major ones, and its samples were column-major: a second graph too."""
    from torch._dynamo.testing import CompileCounter

    shape = (5, 3) if isinstance(space, gf.Stiefel) else (4, 4)
    G = torch.randn(shape, generator=_gen(), dtype=dtype)
    opt = gf.optim.radam({"w": space}, lr=1e-2)

    def loss(p):
        return (p["w"] * G.conj()).real.sum()

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(lambda p, s: opt.update(grad(loss)(p), s, p), backend=counter, fullgraph=True)
    p = {"w": space.sample(shape, generator=_gen(1), dtype=dtype)}
    s = opt.init(p)
    for _ in range(4):
        p, s = step(p, s)
    assert counter.frame_count == 1
    assert member(space, p["w"], 1e-5)
    torch._dynamo.reset()
