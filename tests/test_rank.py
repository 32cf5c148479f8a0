"""Space-specific tests of the rank family (LowRank, FixedRank, GLp, AlmostOrthogonal, PSD, PSSD,
PSSDLowRank, PSSDFixedRank) and of Product.

The generic properties (membership, round trips, tangent projection, retraction, transforms) are
in the conformance suite (tests/cases_rank.py); here: bad input, the det > 0 component, GL(n), value
maps given as callables or pairs, rectangular AlmostOrthogonal and λ ∈ {0, 1}, the cost of the
LowRank chart by op shapes, extreme raw values, rebase without decompositions, finite gradients
of the spectral maps at repeated singular values.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import member
from torch.func import grad, jacfwd, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import geofunc as gf
from geofunc._linalg import frame_chart, polar
from geofunc.spaces._values import floor_eps, softplus_eps, softplus_eps_inverse

F64 = torch.float64
F32 = torch.float32


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=F64, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


SQUARE_SPACES = [gf.GLp(), gf.PSD(), gf.PSSD(), gf.PSSDLowRank(rank=1), gf.PSSDFixedRank(rank=1)]
ALL_SPACES = [
    gf.LowRank(rank=2),
    gf.FixedRank(rank=2),
    gf.AlmostOrthogonal(lam=0.5),
    *SQUARE_SPACES,
]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cls", [gf.LowRank, gf.FixedRank, gf.PSSDLowRank, gf.PSSDFixedRank])
@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2", None])
def test_bad_rank_at_construction(cls, rank):
    with pytest.raises(gf.ManifoldError, match=rf"{cls.__name__}\(.*expected `rank` to be an integer ≥ 1, got"):
        cls(rank=rank)


@pytest.mark.parametrize(
    "space, shape",
    [(gf.LowRank(rank=4), (5, 3)), (gf.FixedRank(rank=4), (3, 5)), (gf.FixedRank(rank=2), (2, 1, 7)),
     (gf.PSSDLowRank(rank=4), (3, 3)), (gf.PSSDFixedRank(rank=3), (2, 2))],
    ids=repr,
)
def test_rank_too_large_at_first_call(space, shape):
    Z = torch.zeros(shape)
    for fn in (space.to_manifold, space.project, space.contains, lambda z: space.sample(z.shape)):
        with pytest.raises(gf.ManifoldError, match=r"rank = \d.*got shape"):
            fn(Z)


@pytest.mark.parametrize("lam", [-0.1, 1.5, 2, -1, math.nan, True, "0.5", None])
def test_bad_lam(lam):
    with pytest.raises(gf.ManifoldError, match=r"AlmostOrthogonal\(.*expected `lam` to be a number in \[0, 1\]"):
        gf.AlmostOrthogonal(lam=lam)


@pytest.mark.parametrize(
    "make",
    [lambda f: gf.FixedRank(rank=1, f=f), lambda f: gf.GLp(f=f), lambda f: gf.PSD(f=f),
     lambda f: gf.PSSDFixedRank(rank=1, f=f), lambda f: gf.AlmostOrthogonal(lam=0.5, f=f)],
)
@pytest.mark.parametrize("f", ["wrong", 3.0, (torch.exp,), (torch.exp, 2.0), None])
def test_bad_f(make, f):
    with pytest.raises(gf.ManifoldError, match=r"expected `f` to be one of .*, got"):
        make(f)


def test_bad_triv():
    for make in (lambda: gf.LowRank(rank=1, triv="wrong"), lambda: gf.GLp(triv=3), lambda: gf.PSD(triv="qr")):
        with pytest.raises(gf.ManifoldError, match="`triv`"):
            make()
    gf.GLp(triv=lambda: 3)  # a callable is accepted lazily, as GeoTorch does


@pytest.mark.parametrize("space", SQUARE_SPACES, ids=repr)
@pytest.mark.parametrize("shape", [(3, 4), (2, 5, 3)])
def test_square_spaces_reject_rectangles(space, shape):
    for fn in (space.to_manifold, space.project, space.contains, space.from_manifold):
        with pytest.raises(gf.ManifoldError, match=rf"{type(space).__name__}\(.*expected `\w+` to be square matrices.*got shape"):
            fn(torch.zeros(shape))


@pytest.mark.parametrize("space", ALL_SPACES, ids=repr)
def test_vectors_and_integers_are_rejected(space):
    with pytest.raises(gf.ManifoldError, match=r"expected `Z` to be (square )?matrices"):
        space.to_manifold(torch.zeros(4))
    with pytest.raises(gf.ManifoldError, match="floating dtype"):
        space.to_manifold(torch.zeros(4, 4, dtype=torch.int64))


def test_bad_bases():
    Z = torch.zeros(5, 3)
    with pytest.raises(gf.ManifoldError, match=r"LowRank\(.*`base` to be None or a pair \(U, V\)"):
        gf.LowRank(rank=2).to_manifold(Z, torch.zeros(5, 2))
    with pytest.raises(gf.ManifoldError, match=r"shapes \(\.\.\., 5, 2\) and \(\.\.\., 3, 2\)"):
        gf.LowRank(rank=2).to_manifold(Z, (torch.zeros(5, 2), torch.zeros(2, 2)))
    with pytest.raises(gf.ManifoldError, match=r"PSD\(.*`base` to be None or a frame Q of shape \(\.\.\., 3, 3\)"):
        gf.PSD().to_manifold(torch.zeros(3, 3), (torch.eye(3), torch.eye(3)))


# ------------------------------------------------------------------ det > 0 (GLp) and GL(n) (square FixedRank)
def test_negative_determinant_is_rejected_by_glp():
    space = gf.GLp()
    X = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=F64))
    assert not space.contains(X)
    with pytest.raises(gf.ManifoldError, match=r"det\(X\) ≤ 0"):
        space.from_manifold(X)
    P = space.project(X)  # canonical point: the negative direction flipped to +ε
    assert member(space, P) and torch.linalg.det(P) > 0
    assert torch.allclose(P[1:, 1:], X[1:, 1:])


@pytest.mark.parametrize("space", [gf.GLp(), gf.GLp(triv="cayley")], ids=repr)
def test_glp_bases_keep_det_positive(space):
    g = _gen(3)
    for _ in range(5):
        A = torch.randn(6, 4, 4, generator=g, dtype=F64)
        sign = torch.ones(6, 4, 1, dtype=F64)
        sign[:, 0, 0] = torch.linalg.det(A).sign()
        A = A * sign  # first row flipped where det < 0
        Z, (U, V) = space.from_manifold(A)
        assert (torch.linalg.det(U) * torch.linalg.det(V) > 0).all()
        assert torch.allclose(space.to_manifold(Z, (U, V)), A, atol=1e-10)
        # Any raw step keeps det > 0: the determinant sign lives in the bases.
        X = space.to_manifold(Z + 3 * torch.randn(Z.shape, generator=g, dtype=F64), (U, V))
        assert (torch.linalg.det(X) > 0).all()
    S = space.sample((50, 4, 4), generator=g, dtype=F32)
    assert (torch.linalg.slogdet(S.double())[0] > 0).all()


def test_square_fixed_rank_is_all_of_gl_n():
    """n = k = rank: a det −2 matrix is a point (DESIGN §6.1); its sign lives in the bases."""
    M = gf.FixedRank(rank=3)
    X = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 2.0]], dtype=F64) @ torch.diag(
        torch.tensor([1.0, -1.0, 1.0], dtype=F64))
    assert torch.allclose(torch.linalg.det(X), torch.tensor(-4.0, dtype=F64)) and member(M, X)
    X = X / 2 ** (1 / 3)  # det −2
    assert member(M, X) and torch.allclose(torch.linalg.det(X), torch.tensor(-2.0, dtype=F64))
    Z, (U, V) = M.from_manifold(X)
    assert torch.linalg.det(U) * torch.linalg.det(V) < 0
    torch.testing.assert_close(M.to_manifold(Z, (U, V)), X, atol=1e-10, rtol=0)
    torch.testing.assert_close(M.logabsdet(Z, (U, V)), torch.log(torch.tensor(2.0, dtype=F64)), atol=1e-12, rtol=0)
    Z2, base2 = M.rebase(Z + 0.3 * _randn(3, 3, seed=1), (U, V))
    assert torch.linalg.det(M.to_manifold(Z2, base2)) < 0
    torch.testing.assert_close(M.to_manifold(Z2, base2), M.to_manifold(Z + 0.3 * _randn(3, 3, seed=1), (U, V)),
                               atol=1e-10, rtol=0)
    # project no longer flips a sign: an invertible matrix with σ_min above the clamp level is fixed.
    torch.testing.assert_close(M.project(X), X, atol=1e-12, rtol=0)
    # Every raw step from the det < 0 bases keeps det < 0.
    g = _gen(4)
    steps = 3 * torch.randn((20, 3, 3), generator=g, dtype=F64)
    assert (torch.linalg.det(M.to_manifold(Z + steps, (U, V))) < 0).all()


def test_square_fixed_rank_samples_both_signs():
    """Haar frames on O(n): det X > 0 with probability ½. With N = 400 the count of det > 0 is
    Binomial(400, ½) (mean 200, sd 10); the band [140, 260] is ±6 sd: false alarm < 2e-9."""
    S = gf.FixedRank(rank=3).sample((400, 3, 3), generator=_gen(5))
    positive = int((torch.linalg.slogdet(S)[0] > 0).sum())
    assert 140 <= positive <= 260


def test_rsgd_on_square_fixed_rank_stays_in_the_det_negative_component():
    """The retraction clamps singular values and keeps the sign (the det > 0 flip of GLp's
    ``project`` would move the first step into the other component)."""
    M = gf.FixedRank(rank=3)
    target = torch.tensor([[-2.0, 0.5, 0.0], [0.3, 1.0, 0.2], [0.0, 0.4, 0.5]], dtype=F64)  # det −0.915
    X = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=F64))  # det −1; det < 0 on the segment to target
    opt = gf.optim.rsgd({"w": M}, lr=0.1)
    params = {"w": X}
    state = opt.init(params)
    for _ in range(100):
        grads = {"w": params["w"] - target}  # ∇ ½‖X − target‖²
        params, state = opt.update(grads, state, params)
        assert torch.linalg.det(params["w"]) < 0
    torch.testing.assert_close(params["w"], target, atol=1e-3, rtol=0)


# ------------------------------------------------------------------ f: names, callables, pairs
def test_softplus_floor_and_inverse_are_stable():
    for dtype in (F32, F64):
        eps = floor_eps(dtype)
        t = torch.linspace(-50, 50, 201, dtype=dtype)
        y = softplus_eps(t)
        assert torch.isfinite(y).all() and (y >= eps).all()
        mid = t.abs() <= 15  # below −15 softplus is under the floor's rounding
        assert torch.allclose(softplus_eps_inverse(y)[mid], t[mid], atol=1e-3 if dtype == F32 else 1e-9)
        for v in (1e-4, 1.0, 100.0, 1e6):
            x = torch.tensor(v + eps, dtype=dtype)
            inv = softplus_eps_inverse(x)
            assert torch.isfinite(inv) and torch.allclose(softplus_eps(inv), x, rtol=1e-5)
        # at and below the floor: finite, very negative coordinates
        assert torch.isfinite(softplus_eps_inverse(torch.tensor([eps, 0.0, -1.0], dtype=dtype))).all()


@pytest.mark.parametrize(
    "space, shape",
    [(gf.FixedRank(rank=2, f=torch.exp), (5, 3)), (gf.GLp(f=torch.exp), (3, 3)), (gf.PSD(f=torch.exp), (3, 3)),
     (gf.PSSDFixedRank(rank=2, f=torch.exp), (4, 4)), (gf.AlmostOrthogonal(lam=0.5, f=torch.sin), (3, 5))],
    ids=repr,
)
def test_single_callable_f_works_but_has_no_inverse(space, shape):
    # GeoTorch rejects a single callable for the PSD family; here it parametrizes, and only
    # from_manifold (which needs the inverse) raises.
    Z = _randn(*shape)
    X = space.to_manifold(Z)
    assert member(space, X)
    Z2, b2 = space.rebase(Z, None)  # rebase needs no inverse
    assert torch.allclose(space.to_manifold(Z2, b2), X, atol=1e-10)
    with pytest.raises(gf.ManifoldError, match="no inverse was given"):
        space.from_manifold(X)


@pytest.mark.parametrize(
    "space, shape",
    [(gf.FixedRank(rank=2, f=[torch.exp, torch.log]), (5, 3)), (gf.GLp(f=(torch.exp, torch.log)), (3, 3)),
     (gf.PSD(f=(torch.exp, torch.log)), (3, 3)), (gf.PSSDFixedRank(rank=2, f=(torch.exp, torch.log)), (4, 4)),
     (gf.AlmostOrthogonal(lam=0.5, f=(lambda t: torch.tanh(t), lambda y: torch.atanh(y))), (3, 5))],
    ids=repr,
)
def test_pair_f_round_trips(space, shape):
    hash(space)  # a list pair is stored as a tuple
    X = space.sample(shape, generator=_gen(1), dtype=F64)
    Z, base = space.from_manifold(X)
    assert torch.allclose(space.to_manifold(Z, base), X, atol=1e-10)


def test_exp_pair_gives_exp_values():
    Z = torch.diag(torch.tensor([0.5, -1.0, 2.0], dtype=F64))
    X = gf.PSD(f=(torch.exp, torch.log)).to_manifold(Z)
    assert torch.allclose(X, torch.diag(torch.exp(torch.diag(Z))), atol=1e-12)


def test_fixed_rank_checks_every_kept_singular_value():
    # GeoTorch's snapshot tested only the largest: diag(3, 2, 0) passed for rank 3.
    M = gf.FixedRank(rank=3)
    X = torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=F64))
    assert not M.contains(X)
    with pytest.raises(gf.ManifoldError, match="σ_rank"):
        M.from_manifold(X)
    assert gf.LowRank(rank=3).contains(X)
    assert not gf.LowRank(rank=1).contains(X)
    assert gf.LowRank(rank=2).contains(X)
    assert not gf.PSSDLowRank(rank=1).contains(X)
    assert not gf.PSSDFixedRank(rank=3).contains(X)
    assert gf.PSSDFixedRank(rank=2).contains(X) and gf.PSSD().contains(X) and not gf.PSD().contains(X)


def test_membership_tolerance_scales_with_the_norm():
    X = torch.diag(torch.tensor([1e6, 1e5, 1e-6], dtype=F64))
    assert gf.LowRank(rank=2).contains(X)  # 1e-6 is rounding noise next to 1e6
    assert not gf.LowRank(rank=2).contains(X / 1e6 + torch.diag(torch.tensor([0.0, 0.0, 1e-3], dtype=F64)))


# ------------------------------------------------------------------ AlmostOrthogonal
@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (2, 1, 7)])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("f", ["sin", "tanh", "sigmoid"])
def test_almost_orthogonal_rectangular(shape, lam, f):
    M = gf.AlmostOrthogonal(lam=lam, f=f)
    for X in (M.to_manifold(_randn(*shape, seed=2) * 3), M.sample(shape, generator=_gen(2), dtype=F64)):
        assert X.shape == shape
        s = torch.linalg.svdvals(X)
        assert ((s >= 1 - lam - 1e-12) & (s <= 1 + lam + 1e-12)).all()
        Z, base = M.from_manifold(X)
        assert torch.allclose(M.to_manifold(Z, base), X, atol=1e-9)
    if lam == 0:
        Xt = X if shape[-2] >= shape[-1] else X.mT
        assert torch.allclose(Xt.mT @ Xt, torch.eye(Xt.shape[-1], dtype=F64).expand_as(Xt.mT @ Xt), atol=1e-12)


def test_almost_orthogonal_scaled_sigmoid_is_accurate_near_zero():
    M = gf.AlmostOrthogonal(lam=1.0, f="sigmoid")
    Z = torch.diag(torch.tensor([1e-8, -1e-8], dtype=F64))
    s = torch.linalg.svdvals(M.to_manifold(Z))
    assert torch.allclose(s, torch.tensor([1 + 5e-9, 1 - 5e-9], dtype=F64), rtol=0, atol=1e-15)
    assert gf.AlmostOrthogonal(lam=1.0, f="scaled_sigmoid").to_manifold(Z).equal(M.to_manifold(Z))


def test_almost_orthogonal_lam_one_reaches_zero_and_two():
    M = gf.AlmostOrthogonal(lam=1.0)
    Z = torch.diag(torch.tensor([math.pi / 2, -math.pi / 2], dtype=F64))
    assert torch.allclose(torch.linalg.svdvals(M.to_manifold(Z)), torch.tensor([2.0, 0.0], dtype=F64), atol=1e-12)
    X = torch.diag(torch.tensor([2.0, 0.0], dtype=F64))
    Z2, base = M.from_manifold(X)  # the endpoints invert to finite coordinates
    assert torch.isfinite(Z2).all() and torch.allclose(M.to_manifold(Z2, base), X, atol=1e-12)
    P = M.project(torch.diag(torch.tensor([5.0, -3.0], dtype=F64)))
    assert torch.allclose(torch.linalg.svdvals(P), torch.tensor([2.0, 2.0], dtype=F64))


# ------------------------------------------------------------------ cost of the charts
class _OpShapes(TorchDispatchMode):
    """Records (op name, output numel, input shapes) of every aten op that is not a view."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            numel = max((o.numel() for o in outs if isinstance(o, torch.Tensor)), default=0)
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((func.__name__, numel, shapes))
        return out


_DECOMPOSITIONS = ("svd", "eigh", "eig.", "geqrf", "linalg_qr", "lstsq", "cholesky", "solve", "lu_factor", "slogdet")


def _decompositions_above(ops, r):
    """Decompositions with an input larger than r×r: the packed chart at a base may only do the
    r×r ones (the polar factor of the base's top block and a solve with ``I + P_Y``), per matrix:
    the U and V frames' r×r problems may be one batch (Note [Stacked frames]). A Cholesky solve's
    right-hand side may be r×(n − r) (O(n r²) work, Note [One-node tall chart]): only its factor counts."""

    def matrices(op):
        return op[2][1:] if op[0].startswith("cholesky_solve") else op[2]

    return [op for op in ops if any(d in op[0] for d in _DECOMPOSITIONS) and any(math.prod(sh[-2:]) > r * r for sh in matrices(op))]


@pytest.mark.parametrize("space", [gf.LowRank(rank=4), gf.FixedRank(rank=4), gf.PSSDLowRank(rank=4)], ids=repr)
def test_low_rank_chart_has_no_square_intermediate(space):
    """to_manifold of a 2048×2048 rank-4 point: one n×n op (the final product), no decomposition
    beyond r×r ones (none at the canonical base), every other op O((n + k) r) sized (the Stiefel
    chart's exponentials are 2r×2r)."""
    n, r = 2048, 4
    Z = torch.randn(n, n, generator=_gen(5))
    base = space.from_manifold(space.sample((n, n), generator=_gen(6)))[1]
    for b in (None, base):
        spy = _OpShapes()
        with spy:
            X = space.to_manifold(Z, b)
        big = [op for op in spy.ops if op[1] > 4 * n * r]
        names = [op[0] for op in big]
        # the n×n product (and, for the eigen type, its exact symmetrization: 2 elementwise ops)
        assert names and names[0].startswith(("mm", "bmm")), big
        assert all(nm.startswith(("mm", "bmm", "add", "mul", "transpose", "clone")) for nm in names), big
        assert len(big) <= 4, big
        assert not _decompositions_above(spy.ops, r if b is not None else 0)
        assert X.shape == (n, n)


@pytest.mark.parametrize("space", [gf.LowRank(rank=2), gf.GLp(), gf.PSD(), gf.PSSDLowRank(rank=2)], ids=repr)
def test_rebase_uses_no_decomposition_and_keeps_values(space):
    shape = (5, 5)
    Z0, base = space.from_manifold(space.sample(shape, generator=_gen(7), dtype=F64))
    Z = Z0 + _randn(*shape, seed=8)
    spy = _OpShapes()
    with spy:
        Z2, base2 = space.rebase(Z, base)
    r = 2 if isinstance(space, (gf.LowRank, gf.PSSDLowRank)) else 5
    assert not _decompositions_above(spy.ops, r if r < 5 else 0)
    d = torch.diagonal(Z, dim1=-2, dim2=-1)[:r]
    assert torch.equal(torch.diagonal(Z2, dim1=-2, dim2=-1)[:r], d)
    assert torch.count_nonzero(Z2) <= r
    assert torch.allclose(space.to_manifold(Z2, base2), space.to_manifold(Z, base), atol=1e-12)


# ------------------------------------------------------------------ the packed frame chart at a base
def _unpack_coords(p, n, r):
    """The n×r packed frame coordinates (top r×r strictly lower, bottom free) of a vector of dim St(n, r)."""
    i, j = torch.tril_indices(r, r, -1)
    top = torch.zeros(r, r, dtype=p.dtype).index_put((i, j), p[: i.numel()])
    return torch.cat([top, p[i.numel():].reshape(n - r, r)])


_N, _R = 9, 3
_BASES = {
    "random": lambda: gf.Stiefel().sample((_N, _R), generator=_gen(20), dtype=F64),
    "singular_top": lambda: torch.eye(_N, dtype=F64)[:, -_R:],  # Y_top = 0: the ambient chart's differential has rank 18 of 21
}


@pytest.mark.parametrize("triv", ["expm", "cayley"])
@pytest.mark.parametrize("which", list(_BASES))
def test_packed_chart_differential_is_an_isometry_at_every_base(which, triv):
    """At P = 0 the packed coordinates map isometrically onto T_Y St(9, 3): the Jacobian (27×21)
    has Frobenius singular values exactly √2 (the 3 Ω coordinates: L_ij gives Y(e_i e_jᵀ − e_j e_iᵀ))
    and 1 (the 18 C coordinates), i.e. it is an isometry for the canonical metric ½‖Ω‖² + ‖C‖²
    (Ω counted once): Jᵀ (I − ½YYᵀ) J = I."""
    n, r = _N, _R
    Y = _BASES[which]()
    dim = n * r - r * (r + 1) // 2
    J = jacfwd(lambda p: frame_chart(_unpack_coords(p, n, r), Y, triv, packed=True))(torch.zeros(dim, dtype=F64))
    expected = torch.tensor([math.sqrt(2.0)] * (r * (r - 1) // 2) + [1.0] * ((n - r) * r), dtype=F64)
    assert torch.allclose(torch.linalg.svdvals(J.reshape(n * r, dim)), expected, atol=1e-12)
    Xi = J.permute(2, 0, 1)  # the dim tangent vectors, n×r each
    assert (Y.mT @ Xi + Xi.mT @ Y).abs().max() < 1e-12  # tangent to St(n, r) at Y
    GXi = Xi - 0.5 * Y @ (Y.mT @ Xi)
    gram = torch.einsum("anr,bnr->ab", Xi, GXi)
    assert torch.allclose(gram, torch.eye(dim, dtype=F64), atol=1e-12)
    # and through LowRank (k = r: U tall, V square): the U-coordinates of Z at base (Y, V), unit values
    M = gf.LowRank(rank=r, triv=triv)
    V = gf.SO().sample((r, r), generator=_gen(21), dtype=F64)
    Z0 = torch.cat([torch.eye(r, dtype=F64), torch.zeros(n - r, r, dtype=F64)])
    Ju = jacfwd(lambda p: M.to_manifold(Z0 + _unpack_coords(p, n, r), (Y, V)))(torch.zeros(dim, dtype=F64))
    assert torch.allclose(torch.linalg.svdvals(Ju.reshape(n * r, dim)), expected, atol=1e-12)


def test_packed_chart_at_the_canonical_base_is_geotorchs():
    n, r = 7, 3
    P = torch.tril(_randn(n, r, seed=22), -1)
    E = torch.eye(n, r, dtype=F64)
    for triv in ("expm", "cayley"):
        assert torch.allclose(frame_chart(P, E, triv, packed=True), frame_chart(P, None, triv), atol=1e-14)
        X = frame_chart(3 * P, gf.Stiefel().sample((4, n, r), generator=_gen(23), dtype=F64), triv, packed=True)
        assert member(gf.Stiefel(), X)
    M = gf.LowRank(rank=r)
    Z = _randn(n, 5, seed=24)
    assert torch.allclose(M.to_manifold(Z, (E, torch.eye(5, r, dtype=F64))), M.to_manifold(Z), atol=1e-14)
    bad = E.clone()
    bad[0, 0] = math.nan
    assert torch.isnan(frame_chart(P, bad, "expm", packed=True)).all()


def test_low_rank_sgd_plus_rebase_is_riemannian_gradient_descent():
    """One SGD step on raw at zero then rebase moves X = U diag(s) Vᵀ along minus the Riemannian
    gradient of the product metric (canonical on U and V, Euclidean on s): d/dη X = −(ξ_U S Vᵀ +
    U diag(g_s) Vᵀ + U S ξ_Vᵀ) with ξ_U = A_U − U A_Uᵀ U, A_U = G V S (same for V), and a linear loss
    ⟨G, X⟩ decreases at the rate ‖grad‖² = ‖∇_Z‖², at a generic base (the ambient chart does not)."""
    M = gf.LowRank(rank=2)
    X0 = M.sample((6, 4), generator=_gen(25), dtype=F64)
    G = _randn(6, 4, seed=26)
    Z0, (U, V) = M.from_manifold(X0)
    s = torch.diagonal(Z0)[:2]
    loss = lambda X: (G * X).sum()
    gZ = grad(lambda z: loss(M.to_manifold(z, (U, V))))(Z0)

    def step(eta):
        return M.to_manifold(*M.rebase(Z0 - eta * gZ, (U, V)))

    S = torch.diag(s)
    AU, AV, gs = G @ V @ S, G.mT @ U @ S, torch.diagonal(U.mT @ G @ V)
    xiU, xiV = AU - U @ AU.mT @ U, AV - V @ AV.mT @ V
    canon = lambda Y, xi: (xi * (xi - 0.5 * Y @ (Y.mT @ xi))).sum()
    rate = canon(U, xiU) + (gs**2).sum() + canon(V, xiV)
    _, dX = jvp(step, (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    assert torch.allclose(dX, -(xiU @ S @ V.mT + U @ torch.diag(gs) @ V.mT + U @ S @ xiV.mT), atol=1e-12)
    assert torch.allclose((gZ**2).sum(), rate, rtol=1e-12)
    eta = 1e-5
    assert torch.allclose((loss(step(eta)) - loss(X0)) / eta, -rate, rtol=1e-4)


@pytest.mark.parametrize("space, shape", [(gf.LowRank(rank=2), (5, 4)), (gf.PSSDFixedRank(rank=2), (5, 5))], ids=repr)
def test_first_derivatives_in_the_base_are_exact(space, shape):
    """gradcheck (float64, reverse and forward mode) of to_manifold w.r.t. the base entries, Z fixed."""
    Z = _randn(*shape, seed=27)
    _, base = space.from_manifold(space.sample(shape, generator=_gen(28), dtype=F64))
    base = base if isinstance(base, tuple) else (base,)
    fn = (lambda U, V: space.to_manifold(Z, (U, V))) if len(base) == 2 else (lambda Q: space.to_manifold(Z, Q))
    assert torch.autograd.gradcheck(fn, tuple(b.detach().requires_grad_() for b in base), check_forward_ad=True)
    A = _randn(3, 3, seed=29).requires_grad_()
    assert torch.autograd.gradcheck(polar, (A,), check_forward_ad=True)
    # finite (not exact: the polar factor jumps there) at a base whose top block is singular
    Y = torch.eye(5, dtype=F64)[:, -2:].requires_grad_()
    g = torch.autograd.grad(frame_chart(_randn(5, 2, seed=30), Y, "expm", packed=True).sum(), Y)[0]
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------ extreme raw values
# (space, shape, whether logabsdet is defined there: square of full rank)
@pytest.mark.parametrize(
    "space, shape, has_logabsdet",
    [(gf.LowRank(rank=2), (5, 3), False), (gf.FixedRank(rank=2), (3, 5), False), (gf.FixedRank(rank=3), (3, 3), True),
     (gf.GLp(), (4, 4), True), (gf.AlmostOrthogonal(lam=0.7), (4, 6), False),
     (gf.AlmostOrthogonal(lam=1.0, f="tanh"), (3, 3), True), (gf.PSD(), (4, 4), True), (gf.PSSD(), (4, 4), True),
     (gf.PSSDLowRank(rank=2), (4, 4), False), (gf.PSSDFixedRank(rank=2), (4, 4), False)],
    ids=repr,
)
def test_raw_values_up_to_50_give_finite_points(space, shape, has_logabsdet):
    g = _gen(9)
    for dtype in (F32, F64):
        sign = torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1
        for Z in (torch.full(shape, 50.0, dtype=dtype), torch.full(shape, -50.0, dtype=dtype), 50 * sign):
            X = space.to_manifold(Z)
            assert torch.isfinite(X).all()
            assert member(space, X), Z
            if not has_logabsdet:
                with pytest.raises(gf.ManifoldError, match="logabsdet"):
                    space.logabsdet(Z)
                continue
            la = space.logabsdet(Z)
            if bool(torch.isneginf(la)):
                # an exactly singular point (1 + tanh(−50) = 0 in both dtypes): X is singular to rounding
                s = torch.linalg.svdvals(X.double())
                assert s[-1] <= 10 * torch.finfo(dtype).eps * s[0]
                continue
            # slogdet of the rounded point; its smallest singular value (the softplus floor next to
            # σ₁ = 50) carries a relative rounding error ~ε·50/floor, 1e-2 in float32
            lb = torch.linalg.slogdet(X.double())[1]
            assert torch.isfinite(la) and abs(float(la) - float(lb)) <= (5e-2 if dtype == F32 else 1e-6), (float(la), float(lb))


@pytest.mark.parametrize("space", [gf.GLp(), gf.PSD(), gf.FixedRank(rank=2), gf.PSSDFixedRank(rank=2)], ids=repr)
def test_float32_points_at_raw_scale_50_pass_their_own_check(space):
    # A value at the softplus floor (3.5e-4 in float32) next to σ₁ ~ 100 is computed with an
    # error ~ε√n·σ₁ (a third of the floor): the membership test used to reject more than half
    # of these points, so from_manifold raised on to_manifold's own output.
    g = _gen(11)
    Z = 50.0 * torch.randn(64, 6, 6, generator=g)
    X = space.to_manifold(Z)
    assert space.contains(X).all(), space._violations(X)
    Z2, base = space.from_manifold(X)
    assert torch.allclose(space.to_manifold(Z2, base), X, rtol=1e-4, atol=1e-4 * X.abs().amax())
    # ...while a value clearly below the floor is still refused, in both dtypes.
    for dtype in (F32, F64):
        low = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.25 * floor_eps(dtype)], dtype=dtype))
        assert not space.contains(low)


# ------------------------------------------------------------------ spectral maps
@pytest.mark.parametrize(
    "space, X",
    [(gf.AlmostOrthogonal(lam=0.0), torch.eye(4, 3, dtype=F64)),       # all σ = 1
     (gf.AlmostOrthogonal(lam=0.2), torch.eye(3, dtype=F64)),
     (gf.PSSD(), torch.eye(3, dtype=F64)),                               # all λ = 1
     (gf.PSD(), torch.eye(3, dtype=F64)),
     (gf.LowRank(rank=1), torch.diag(torch.tensor([2.0, 0.0, 0.0], dtype=F64))),  # exact zeros
     (gf.PSSDLowRank(rank=1), torch.diag(torch.tensor([2.0, 0.0, 0.0], dtype=F64))),
     (gf.GLp(), torch.eye(3, dtype=F64))],
    ids=lambda v: repr(v) if isinstance(v, gf.AbstractSpace) else "",
)
def test_retract_and_tangent_differentiate_at_repeated_values(space, X):
    # torch.linalg.svd/eigh backward is NaN at repeated values; the spectral maps are not.
    V = space.tangent(X, _randn(*X.shape, seed=11))
    _, dX = jvp(lambda t: space.retract(X, t * V), (torch.zeros((), dtype=F64),), (torch.ones((), dtype=F64),))
    assert torch.allclose(dX, V, atol=1e-10)
    Gx = grad(lambda x: (space.retract(x, V) ** 2).sum())(X)
    Gt = grad(lambda x: (space.tangent(x, V) * V).sum())(X)
    assert torch.isfinite(Gx).all() and torch.isfinite(Gt).all()


def test_project_first_derivative_matches_finite_differences():
    g = _gen(12)
    for space, shape in [(gf.LowRank(rank=2), (6, 4)), (gf.AlmostOrthogonal(lam=0.3), (5, 3)),
                         (gf.PSSDLowRank(rank=2), (4, 4)), (gf.GLp(), (3, 3)), (gf.PSD(), (4, 4))]:
        Y = 2 * torch.randn(shape, generator=g, dtype=F64)
        if isinstance(space, (gf.PSD, gf.PSSDLowRank)):
            Y = Y - 1.0 * torch.eye(shape[0], dtype=F64)  # some eigenvalues clipped
        D = torch.randn(shape, generator=g, dtype=F64)
        _, jv = jvp(space.project, (Y,), (D,))
        h = 1e-6
        fd = (space.project(Y + h * D) - space.project(Y - h * D)) / (2 * h)
        assert torch.allclose(jv, fd, atol=1e-6), space


# ------------------------------------------------------------------ Product
def test_product_maps_factorwise():
    M = gf.Product(gf.GLp(), gf.Sphere(), gf.LowRank(rank=1))
    assert M == gf.Product([gf.GLp(), gf.Sphere(), gf.LowRank(rank=1)]) and hash(M) == hash(gf.Product(*M.factors))
    assert repr(M) == "Product(GLp(f='softplus', triv='expm'), Sphere(radius=1.0), LowRank(rank=1, triv='expm'))"
    shapes = ((2, 3, 3), (2, 4), (2, 5, 2))
    X = M.sample(shapes, generator=_gen(13), dtype=F64)
    assert [x.shape for x in X] == [torch.Size(s) for s in shapes] and member(M, X)
    Z, base = M.from_manifold(X)
    assert isinstance(Z, tuple) and isinstance(base, tuple) and len(base) == 3
    for a, b in zip(M.to_manifold(Z, base), X):
        assert torch.allclose(a, b, atol=1e-12)
    Zr = tuple(z + 0.1 * torch.randn(z.shape, generator=_gen(14), dtype=F64) for z in Z)
    for a, b in zip(M.to_manifold(*M.rebase(Zr, base)), M.to_manifold(Zr, base)):
        assert torch.allclose(a, b, atol=1e-12)
    # vmap over tuples of points and bases
    out = vmap(lambda z, b: M.to_manifold(z, b))(Zr, base)
    for a, b in zip(out, M.to_manifold(Zr, base)):
        assert torch.allclose(a, b, atol=1e-12)
    # logabsdet sums the factors' (where all have one)
    P = gf.Product(gf.GLp(), gf.PSD())
    Zs = (_randn(3, 3, seed=1), _randn(2, 2, seed=2))
    ref = sum(torch.linalg.slogdet(x)[1] for x in P.to_manifold(Zs))
    assert torch.allclose(P.logabsdet(Zs), ref, atol=1e-10)


def test_product_errors_name_product_and_factor():
    M = gf.Product(gf.SO(), gf.PSD())
    with pytest.raises(gf.ManifoldError, match=r"Product\(SO.*expected `Z` to be a tuple of 2 entries"):
        M.to_manifold(torch.zeros(3, 3))
    with pytest.raises(gf.ManifoldError, match=r"Product\(.*\): factor 1: PSD\(.*square"):
        M.to_manifold((torch.zeros(3, 3), torch.zeros(3, 2)))
    with pytest.raises(gf.ManifoldError, match=r"factor 1: PSD"):
        M.from_manifold((torch.eye(3), -torch.eye(3)))
    with pytest.raises(gf.ManifoldError, match="at least one factor"):
        gf.Product()
    with pytest.raises(gf.ManifoldError, match="factor 1 to be a geofunc space"):
        gf.Product(gf.SO(), 3)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_product_closed_forms_are_the_factors(dtype):
    """A product of spaces with a closed-form exponential, logarithm and distance has them too: the
    tuples of the factors' maps, and the distance √(Σ dᵢ²) (the product metric). Before, every
    ``Product`` raised "no closed form" for ``dist``, ``expmap``, ``logmap`` and ``sqdist``."""
    tol = {F64: 1e-10, F32: 1e-5}[dtype]
    M = gf.Product(gf.PoincareBall(c=0.5), gf.Sphere(radius=2.0), gf.Lorentz(k=2.0))
    shapes = ((4, 3), (4, 5), (4, 3))
    X = M.sample(shapes, generator=_gen(21), dtype=dtype)
    Y = M.sample(shapes, generator=_gen(22), dtype=dtype)
    d = tuple(F.dist(x, y) for F, x, y in zip(M.factors, X, Y))
    ref = torch.sqrt(sum(t.double() ** 2 for t in d))
    assert torch.allclose(M.dist(X, Y).double(), ref, atol=tol, rtol=tol)
    assert torch.allclose(M.sqdist(X, Y).double(), ref ** 2, atol=tol, rtol=tol)
    L = M.logmap(X, Y)
    assert member(M, M.expmap(X, L)), "expmap(X, logmap(X, Y)) off the product"
    for a, b in zip(M.expmap(X, L), Y):  # the exponential inverts the logarithm, factor by factor
        assert torch.allclose(a, b, atol=10 * tol, rtol=0)
    assert torch.allclose(M.inner(X, L, L).double(), ref ** 2, atol=10 * tol, rtol=10 * tol)
    # a one-point batch against the batch, as every space's maps broadcast
    first = tuple(x[:1] for x in X)
    assert M.dist(first, Y).shape == (4,)
    # a factor without the closed form is named
    with pytest.raises(gf.ManifoldError, match=r"factor 1: Stiefel.*dist has no closed form"):
        gf.Product(gf.Sphere(), gf.Stiefel()).dist((X[1], torch.eye(3, 2, dtype=dtype)), (Y[1], torch.eye(3, 2, dtype=dtype)))
    from geofunc.testing import implements
    assert implements(M, "dist") and implements(M, "expmap") and not implements(gf.Product(gf.Sphere(), gf.Stiefel()), "dist")


def test_compile_with_dynamic_shapes():
    """``torch.compile(..., dynamic=True)`` (also what automatic dynamic shapes recompile with after a
    shape changes): the stacked frames compared their batch shapes with ``list.count``, whose identity
    test Dynamo cannot trace on symbolic shapes (``Unsupported: builtin operator is_``)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    space = gf.LowRank(rank=2)  # (FixedRank and the PSSD rank family share the stacked frames)

    def f(z, w):
        return grad(lambda z: (space.to_manifold(z) * w).sum())(z), space.to_manifold(z)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 10, 12), (3, 14, 9)]:
        Z = 0.3 * torch.randn(shape, dtype=torch.float64, generator=gen)
        W = torch.randn(shape, dtype=torch.float64, generator=gen)
        for a, e in zip(compiled(Z, W), f(Z, W)):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("space", [gf.GLp(), gf.SL(), gf.AlmostOrthogonal(0.5)], ids=lambda s: type(s).__name__)
def test_compiled_training_step_does_not_recompile_per_matrix_size(space):
    """One compiled step (default ``dynamic=None``: automatic dynamic shapes) used for weights of
    several sizes (a per-layer helper) compiles one static and one dynamic graph, as SO, PSD and
    Stiefel do. The U and V charts were batched when ``len({A.shape[-1] for A in gens}) == 1``: the
    set hashed the symbolic sizes, which specializes them, so the dynamic graph was guarded to one
    size: one graph per size (4 sizes, 4 graphs; past the recompile limit, eager). Note [Sizes
    compared, not hashed]."""
    from torch._dynamo.utils import counters

    g = _gen()
    torch._dynamo.reset()
    counters.clear()

    def step(Z, base, T):
        G = grad(lambda z: ((space.to_manifold(z, base) - T) ** 2).sum())(Z)
        return space.rebase(Z - 0.1 * G, base)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for shape in [(n, n) for n in (3, 4, 5, 6)]:
        Z, base = space.from_manifold(space.sample(shape, generator=g, dtype=F64))
        T = torch.randn(shape, generator=g, dtype=F64)
        for a, e in zip(torch.utils._pytree.tree_leaves(compiled(Z, base, T)), torch.utils._pytree.tree_leaves(step(Z, base, T))):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [gf.LowRank, gf.FixedRank, gf.PSSDLowRank, gf.PSSDFixedRank], ids=lambda c: c.__name__)
def test_a_numpy_integer_rank_is_the_python_int(cls) -> None:
    """A rank read from an array (``numpy.int64``) builds the same space as the Python int: equal, of
    one hash, with an ``int`` field (it was refused as "not an integer"); floats, bools and tensors
    are still refused."""
    np = pytest.importorskip("numpy")
    space = cls(rank=np.int64(2))
    assert space == cls(rank=2) and hash(space) == hash(cls(rank=2)) and type(space.rank) is int
    X = space.to_manifold(torch.randn(4, 4, dtype=torch.float64))
    assert torch.linalg.matrix_rank(X) <= 2
    for bad in (True, 2.0, np.float64(2.0), torch.tensor(2), 0):
        with pytest.raises(gf.ManifoldError, match="`rank` to be an integer"):
            cls(rank=bad)


@pytest.mark.parametrize("space", [gf.LowRank(rank=2), gf.FixedRank(rank=2), gf.PSSDLowRank(rank=2)], ids=repr)
@pytest.mark.parametrize("shape", [(4, 4), (3, 5, 5)], ids=str)
def test_rank_charts_differentiate_under_a_meta_default_device(space, shape, monkeypatch) -> None:
    """The rank charts' one-node layout (index tensors) was built on the default device and moved to the
    input's: under ``torch.device("meta")`` (deferred initialization around CPU work) a CPU chart with a
    gradient raised "Cannot copy out of meta tensor". The result and the gradient are the CPU ones."""
    from geofunc.spaces import _factorized

    monkeypatch.setattr(_factorized, "_LAYOUTS", {})  # no layout cached by an earlier call
    g = torch.Generator().manual_seed(0)
    X = space.sample(shape, generator=g, dtype=torch.float64)
    Z0, base = space.from_manifold(X)
    Z = (Z0 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.device("meta"):
        Y = space.to_manifold(Z, base)
        (G,) = torch.autograd.grad((Y * W).sum(), Z)
    monkeypatch.setattr(_factorized, "_LAYOUTS", {})
    Y_ref = space.to_manifold(Z, base)
    (G_ref,) = torch.autograd.grad((Y_ref * W).sum(), Z)
    assert Y.device.type == G.device.type == "cpu"
    torch.testing.assert_close(Y, Y_ref, atol=0, rtol=0)
    torch.testing.assert_close(G, G_ref, atol=0, rtol=0)
