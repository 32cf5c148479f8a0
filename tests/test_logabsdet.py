"""``logabsdet(Z, base)`` of the factorized square spaces against ``torch.linalg.slogdet``.

``log|det X| = Σ log|σᵢ|`` is read off the value coordinates: exact, O(n) after the raw map,
differentiable, batched, under vmap. No timing here (see benchmarks/bench_logabsdet.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.func import grad, jacrev, vmap

import geofunc as gf
from geofunc.testing import implements

F64 = torch.float64

# Factories of n: a rank hyperparameter equal to n makes the space square of full rank.
SPACES = {
    "GLp": lambda n: gf.GLp(),
    "GLp-cayley": lambda n: gf.GLp(triv="cayley"),
    "GLp-exp": lambda n: gf.GLp(f=(torch.exp, torch.log)),
    "PSD": lambda n: gf.PSD(),
    "PSD-exp": lambda n: gf.PSD(f=(torch.exp, torch.log)),
    "PSSDFixedRank-n": lambda n: gf.PSSDFixedRank(rank=n),
    "FixedRank-n": lambda n: gf.FixedRank(rank=n),
    "AlmostOrthogonal": lambda n: gf.AlmostOrthogonal(lam=0.5),
    "AlmostOrthogonal-tanh": lambda n: gf.AlmostOrthogonal(lam=0.9, f="tanh"),
    "LowRank-n": lambda n: gf.LowRank(rank=n),
    "PSSD": lambda n: gf.PSSD(),
    "SO": lambda n: gf.SO(),
}
SIZES = (1, 2, 3, 4, 7)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", list(SPACES))
def test_logabsdet_equals_slogdet_values_and_gradients(name, n):
    space = SPACES[name](n)
    g = _gen(1)
    shape = (3, n, n)
    Z0, base = space.from_manifold(space.sample(shape, generator=g, dtype=F64))
    for Z, b in ((torch.randn(shape, generator=g, dtype=F64), None), (Z0 + torch.randn(shape, generator=g, dtype=F64), base)):
        Za = Z.clone().requires_grad_(True)
        Zb = Z.clone().requires_grad_(True)
        la = space.logabsdet(Za, b)
        lb = torch.linalg.slogdet(space.to_manifold(Zb, b))[1]
        assert la.shape == (3,)
        torch.testing.assert_close(la, lb, atol=1e-10 * n, rtol=0)
        (ga,) = torch.autograd.grad(la.sum(), Za)
        (gb,) = torch.autograd.grad(lb.sum(), Zb)
        torch.testing.assert_close(ga, gb, atol=1e-9 * n, rtol=0)


@pytest.mark.parametrize("space", [gf.GLp(), gf.PSD(), gf.AlmostOrthogonal(lam=0.5)], ids=repr)
def test_logabsdet_under_vmap_and_jacrev(space):
    g = _gen(2)
    Z0, base = space.from_manifold(space.sample((5, 3, 3), generator=g, dtype=F64))
    Z = Z0 + torch.randn(5, 3, 3, generator=g, dtype=F64)
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        v = vmap(space.logabsdet)(Z, base)
        gv = vmap(grad(space.logabsdet))(Z, base)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)
    assert torch.allclose(v, space.logabsdet(Z, base), atol=1e-12)
    ref = vmap(grad(lambda z, b: torch.linalg.slogdet(space.to_manifold(z, b))[1]))(Z, base)
    assert torch.allclose(gv, ref, atol=1e-9)
    J = jacrev(space.logabsdet)(Z[0], tuple(b[0] for b in base) if isinstance(base, tuple) else base[0])
    assert torch.allclose(J, gv[0], atol=1e-12)


def test_logabsdet_is_exact_where_slogdet_is_not():
    """σ = e^{±30}: the matrix is numerically singular in float64 (σ_min/σ_max = e^{-60} ≪ ε),
    so slogdet of the formed matrix is off by tens; the factorized value is exact."""
    M = gf.GLp(f=(torch.exp, torch.log))
    s = torch.tensor([30.0, 30.0, -30.0, -30.0], dtype=F64)
    Z = torch.diag(s) + torch.tril(torch.randn(4, 4, generator=_gen(3), dtype=F64), -1) + torch.triu(
        torch.randn(4, 4, generator=_gen(4), dtype=F64), 1)
    exact = s.sum()  # log Π e^{sᵢ}
    assert abs(float(M.logabsdet(Z) - exact)) < 1e-12
    assert abs(float(torch.linalg.slogdet(M.to_manifold(Z))[1] - exact)) > 1.0
    # float32 and moderate conditioning: the factorized value is still exact to rounding of Σ
    P = gf.PSD()
    Z32 = torch.diag(torch.tensor([12.0, 8.0, -12.0, -8.0])) + 0.3 * torch.randn(4, 4, generator=_gen(5))
    floor32 = gf.spaces._values.floor_eps(torch.float32)  # the float32 floor, summed in float64
    ref = torch.log(torch.nn.functional.softplus(torch.diagonal(Z32).double()) + floor32).sum()
    assert abs(float(P.logabsdet(Z32)) - float(ref)) < 1e-5
    assert abs(float(P.logabsdet(Z32)) - float(ref)) <= abs(float(torch.linalg.slogdet(P.to_manifold(Z32))[1]) - float(ref))


@pytest.mark.parametrize(
    "space, shape",
    [(gf.FixedRank(rank=2), (3, 3)), (gf.FixedRank(rank=2), (2, 3)), (gf.AlmostOrthogonal(lam=0.5), (3, 4)),
     (gf.LowRank(rank=2), (3, 3)), (gf.PSSDLowRank(rank=2), (3, 3)), (gf.PSSDFixedRank(rank=2), (3, 3))],
    ids=repr,
)
def test_logabsdet_raises_where_not_square_full_rank(space, shape):
    with pytest.raises(gf.ManifoldError, match=rf"{type(space).__name__}\(.*logabsdet"):
        space.logabsdet(torch.zeros(shape))


def test_logabsdet_nan_propagates_and_base_is_checked():
    Z = torch.zeros(3, 3, dtype=F64)
    Z[2, 0] = float("nan")  # a frame coordinate: the point is NaN, so is its logabsdet
    assert torch.isnan(gf.GLp().logabsdet(Z))
    with pytest.raises(gf.ManifoldError, match="base"):
        gf.GLp().logabsdet(torch.zeros(3, 3), torch.eye(3))


@pytest.mark.parametrize("space", [gf.SO(), gf.Stiefel(), gf.Unitary(), gf.SL()], ids=repr)
def test_volume_preserving_logabsdet_is_zero_with_nan_gradients_at_nan_input(space):
    """log|det| of the orthogonal groups is 0 in Z's graph: its gradient is 0, except at a point
    with a NaN/inf raw entry, where value and gradient are NaN (they were 0: a finite gradient for
    a NaN input), per point of the batch."""
    dtype = torch.complex128 if isinstance(space, gf.Unitary) else F64
    Z = torch.randn(3, 4, 4, generator=_gen(5), dtype=dtype)
    Z[1, 2, 0] = float("nan")
    Z[2, 0, 3] = 1e300  # finite and huge: still 0, no overflow

    def f(z):
        return space.logabsdet(z).sum()

    out = space.logabsdet(Z)
    assert out[1].isnan() and (out[[0, 2]] == 0).all()
    for g in (grad(f)(Z), vmap(grad(lambda z: space.logabsdet(z)))(Z)):
        assert g[1].isnan().all() and (g[[0, 2]] == 0).all()
    Zg = Z.clone().requires_grad_()
    g = torch.autograd.grad(space.logabsdet(Zg).sum(), Zg)[0]
    assert g[1].isnan().all() and (g[[0, 2]] == 0).all()


def _raw_and_base(space, g, batch=(4,)):
    Z0, base = space.from_manifold(space.sample(batch + (4, 4), generator=g, dtype=F64))
    return Z0 + 0.5 * torch.randn(Z0.shape, generator=g, dtype=F64), base


@pytest.mark.parametrize("where", ["Z off the diagonal", "Z on the diagonal", "U", "V"])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_logabsdet_is_nan_exactly_where_the_point_is(where, grad_mode):
    M = gf.GLp()
    Z, (U, V) = _raw_and_base(M, _gen(3))
    U, V = U.clone(), V.clone()
    if where.startswith("Z"):
        i, j = (0, 1) if "off" in where else (2, 2)
        Z[1, i, j] = float("nan")
    else:
        (U if where == "U" else V)[1, 3, 0] = float("inf")
    Z.requires_grad_(grad_mode)
    with torch.set_grad_enabled(grad_mode):
        out = M.logabsdet(Z, (U, V))
        X = M.to_manifold(Z, (U, V))
    assert out[1].isnan() and X[1].isnan().any()
    assert out[[0, 2, 3]].isfinite().all()
    if grad_mode:  # the flag adds nothing to the backward: the other points' gradients are clean
        g = torch.autograd.grad(out[[0, 2, 3]].sum(), Z)[0]
        assert g[[0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("space", [gf.GLp(), gf.PSD(), gf.FixedRank(rank=4), gf.GLp(f=(torch.exp, torch.log))], ids=repr)
def test_logabsdet_second_derivatives_and_forward_mode_against_finite_differences(space):
    Z, base = _raw_and_base(space, _gen(4), batch=(2,))
    f = lambda z: space.logabsdet(z, base)  # noqa: E731
    assert torch.autograd.gradcheck(f, (Z.requires_grad_(),), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (Z,))


def test_logabsdet_broadcasts_bases_like_to_manifold():
    M = gf.PSD()
    g = _gen(5)
    Z = torch.randn(4, 4, generator=g, dtype=F64, requires_grad=True)
    _, Q = M.from_manifold(M.sample((3, 4, 4), generator=g, dtype=F64))
    out = M.logabsdet(Z, Q)
    assert out.shape == (3,)
    ref = torch.linalg.slogdet(M.to_manifold(Z, Q))[1]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), Z)[0], torch.autograd.grad(ref.sum(), Z)[0], rtol=0, atol=1e-9)


def test_product_logabsdet_is_that_of_the_block_diagonal_matrix():
    """``Product.logabsdet`` is ``log|det|`` of the block-diagonal matrix of its factors' points: every
    factor counts (values and gradients), with and without bases."""
    space = gf.Product(gf.GLp(), gf.PSD(), gf.AlmostOrthogonal(lam=0.5), gf.SO())
    g = _gen(5)
    shapes = ((3, 3, 3), (3, 2, 2), (3, 4, 4), (3, 3, 3))
    Z0, base = space.from_manifold(space.sample(shapes, generator=g, dtype=F64))
    for Z, b in ((tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes), None),
                 (tuple(z + torch.randn(z.shape, generator=g, dtype=F64) for z in Z0), base)):
        Za = tuple(z.clone().requires_grad_(True) for z in Z)
        Zb = tuple(z.clone().requires_grad_(True) for z in Z)
        la = space.logabsdet(Za, b)
        lb = torch.linalg.slogdet(torch.vmap(torch.block_diag)(*space.to_manifold(Zb, b)))[1]
        assert la.shape == (3,)
        torch.testing.assert_close(la, lb, atol=1e-10 * 12, rtol=0)
        for ga, gb in zip(torch.autograd.grad(la.sum(), Za), torch.autograd.grad(lb.sum(), Zb)):
            torch.testing.assert_close(ga, gb, atol=1e-9 * 12, rtol=0)


@pytest.mark.parametrize(("space", "shape"), [(gf.Sym(), (3, 3)), (gf.Rn(), (3, 3)), (gf.Sphere(), (4,)),
                                              (gf.Grassmannian(), (3, 3)), (gf.Birkhoff(), (3, 3))], ids=repr)
def test_a_space_without_logabsdet_says_so_as_every_refusal_does(space, shape):
    """Regression: the default ``logabsdet`` raised 'logabsdet is only defined for square spaces with a
    factorized determinant.', which told ``Sym``/``Rn``/``Grassmannian`` of a square point to be square;
    it now states what was expected and what was got, as the rank family's refusals do."""
    assert not implements(space, "logabsdet")
    name = re.escape(repr(space))
    with pytest.raises(gf.ManifoldError, match=rf"^{name}: expected a space with a factorized determinant for "
                                               rf"logabsdet \(.*\), got {name}, which has none"):
        space.logabsdet(torch.zeros(shape))
