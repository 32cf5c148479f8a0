"""Valid but numerically hard points: the point-side maps at ill-conditioned points.

Found by the conditioning probe and pinned here:

* ``SL.from_manifold`` divided the rounding of ``det X`` (~ε·cond(X)) out of every singular value
  alike, so the whole point was rescaled by ``(det X)^{−1/n}``: float32 points of the chart from raw
  entries of scale 5 came back up to 5e-3 off (GLp's round trip of the same points: 1e-6), past the
  float32 tolerance for 12–19% of them (Note [The determinant of a rounded SL point]).
* ``softplus_inverse`` inverted ``log1p(exp(t))`` also past 20, where ``F.softplus`` is the identity:
  ``f(f⁻¹(y))`` was off by ``e^{−y}`` (1.9e-9 at y = 20.1), so float64 round trips of GLp/PSD/FixedRank
  points with a value just above 20 (and of every SL point whose lifted values pass 20) were 1e-10 off.
"""

from __future__ import annotations

import pytest
import torch
from reference import member

import geofunc as gf
from geofunc.spaces._values import softplus_eps, softplus_eps_inverse

F32, F64 = torch.float32, torch.float64
#: round-trip tolerance relative to max(1, max|X|): a few ulps times n of the dtype (GLp's round trip
#: of the same points measures 1e-6 / 1e-14)
ROUND_TRIP = {F32: 2e-5, F64: 1e-13}


def _rel(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (A - B).abs().amax((-2, -1)) / B.abs().amax((-2, -1)).clamp(min=1.0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("n", [4, 8])
def test_sl_round_trip_of_ill_conditioned_points(dtype, n):
    """Points of SL's own chart from raw entries of scale 5 (cond up to ~1e6 in float32, 1e8 in
    float64): ``to_manifold(from_manifold(X))`` is X to the dtype's rounding, as GLp's is."""
    M = gf.SL()
    Z0 = 5.0 * torch.randn(200, n, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    X = M.to_manifold(Z0).to(dtype)
    X = X[M.contains(X)]  # the float32 guard refuses a few (cond_F·min(n, 4)·ε ≥ 1)
    assert X.shape[0] > 150
    Z, base = M.from_manifold(X)
    X2 = M.to_manifold(Z, base)
    assert member(M, X2)
    assert _rel(X2, X).max() <= ROUND_TRIP[dtype]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_sl_from_manifold_moves_a_point_off_sl_along_the_normal(dtype):
    """A matrix off SL within the tolerance (its det changed along the normal ``X⁻ᵀ``, the direction
    in which det is most sensitive) comes back on SL, at the distance of that step, not rescaled."""
    M = gf.SL()
    g = torch.Generator().manual_seed(1)
    U, _, Vh = torch.linalg.svd(torch.randn(6, 6, generator=g, dtype=F64))
    U = U * torch.linalg.det(U) * torch.linalg.det(Vh)  # det U det V = 1 (n even: the sign of U's scale)
    s = torch.logspace(0, -4, 6, dtype=F64)
    s = s / s.log().mean().exp()
    X = U @ torch.diag(s) @ Vh
    N = torch.linalg.inv(X).mT
    step = 1e-6 if dtype == F32 else 1e-11  # relative: below the tolerance, above the rounding
    Y = (X + step * N / N.norm() * X.norm()).to(dtype)
    assert member(M, Y)
    Z, base = M.from_manifold(Y)
    Y2 = M.to_manifold(Z, base)
    assert member(M, Y2)
    assert (Y2.double() - Y.double()).norm() <= 3 * step * X.norm() + 30 * torch.finfo(dtype).eps * X.norm()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_softplus_inverse_inverts_torch_softplus_past_its_threshold(dtype):
    """``F.softplus`` is the identity past 20; its inverse there is too, so ``f(f⁻¹(y)) = y``."""
    y = torch.tensor([19.5, 20.0, 20.0 + 1e-6, 20.1, 21.0, 25.0, 40.0, 1e3], dtype=dtype)
    torch.testing.assert_close(softplus_eps(softplus_eps_inverse(y)), y, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_glp_round_trip_with_a_value_just_above_twenty():
    """A float64 GLp (and PSD) point with a value of 20.1 comes back to rounding (it was 1e-10 off)."""
    g = torch.Generator().manual_seed(2)
    Q, P = (torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0] for _ in range(2))
    Q, P = Q * torch.linalg.det(Q), P * torch.linalg.det(P)  # n even: det +1
    D = torch.diag(torch.tensor([20.1, 3.0, 1.0, 0.5], dtype=F64))
    for M, X in ((gf.GLp(), Q @ D @ P.mT), (gf.PSD(), Q @ D @ Q.mT)):
        Z, base = M.from_manifold(X)
        assert _rel(M.to_manifold(Z, base), X) <= 1e-14


def _singular(n: int, kind: str, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A matrix that is exactly singular before its rounding to ``dtype`` (or a product of rank < n in ``dtype``)."""
    if kind == "product":
        k = max(1, n // 2)
        return torch.randn(n, n - k, generator=g, dtype=dtype) @ torch.randn(n - k, n, generator=g, dtype=dtype)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    P = Q if kind == "symmetric" else torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    s = torch.logspace(0, -3, n, dtype=F64) if kind == "spread" else torch.rand(n, generator=g, dtype=F64) + 0.5
    s[-1] = 0.0
    return ((Q * s) @ P.mT * 10.0 ** (5 * torch.randn((), generator=g).item())).to(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("n", [2, 3, 4, 8, 64])
def test_sl_refuses_every_rounding_of_a_singular_matrix(dtype, n):
    """Note [The singular guard of SL]: an exactly singular matrix rounded to the dtype (det rounded to
    anything, even 1) is refused, whatever its scale: the rounding E has ‖E‖₂ ≤ ε‖X‖_F, so cond_F ≥ 1/ε,
    and the guard refuses from cond_F ≥ 1/(min(n, 4)·ε)."""
    g = torch.Generator().manual_seed(n)
    M = gf.SL()
    for kind in ("symmetric", "spread", "general", "product"):
        X = torch.stack([_singular(n, kind, g, dtype) for _ in range(40 if n < 64 else 8)])
        X = X / torch.linalg.det(X.double()).abs().clamp(min=1e-300).pow(1.0 / n).to(dtype)[:, None, None]  # |det| 1 where it rounds nonzero
        assert not bool(M.contains(X).any()), kind


def test_sl_admits_float32_points_whose_determinant_the_dtype_holds():
    """Float32 chart points of SL(64) from raw entries of scale 3 (cond₂ ~ 1e5): det X = 1 to 1e-4 read
    in float64 off the stored entries (the reference predicate), and the round trip to rounding; the
    former bound cond_F·n·ε refused 9 of 100 of them."""
    M = gf.SL()
    Z = 3.0 * torch.randn(100, 64, 64, generator=torch.Generator().manual_seed(3), dtype=F64)
    X = M.to_manifold(Z).to(F32)
    assert member(M, X.double(), 1e-4)
    assert bool(M.contains(X).all())
    Z2, base = M.from_manifold(X)
    assert _rel(M.to_manifold(Z2, base), X).max() <= ROUND_TRIP[F32]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("space", [gf.GLp(), gf.FixedRank(rank=3), gf.FixedRank(rank=2), gf.PSD(), gf.PSSDFixedRank(rank=3)], ids=repr)
def test_members_are_fixed_points_of_project_and_retract(space, dtype):
    """Note [Members are fixed points of project]: a member with cond > 1/√ε (float32 σ = 1e4, 1, 0.5)
    was moved by project (the small values lifted to √ε·σ₁: 3.8e-4 relative), so retract(X, 0) ≠ X and
    a step of 1e-3 moved X by 1.3: now both keep X to its rounding (ε√n·σ₁ per value)."""
    g = torch.Generator().manual_seed(4)
    cond = 1e4 if dtype == F32 else 1e10
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))[0]
    P = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    values = torch.tensor([cond, 1.0, 0.5, 0.0, 0.0], dtype=F64)
    r = 3 if not isinstance(space, gf.FixedRank) else space.rank
    values[r:] = 0.0
    if isinstance(space, gf.PSD):  # full rank: 3×3
        Q3 = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))[0]
        X = (Q3 * values[:3]) @ Q3.mT
    elif isinstance(space, gf.PSSDFixedRank):
        X = (Q * values) @ Q.mT
    else:
        n = 3 if isinstance(space, gf.GLp) else 5
        Qn = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        Pk = P[:3, :3] if n == 3 else P
        Qn = Qn * torch.linalg.det(Qn) if n == 3 else Qn
        Pk = Pk * torch.linalg.det(Pk) if n == 3 else Pk
        X = (Qn[:, :min(n, Pk.shape[0])] * values[:min(n, Pk.shape[0])]) @ Pk.mT[:min(n, Pk.shape[0])]
    X = X.to(dtype)
    assert member(space, X)
    slack = 8 * torch.finfo(dtype).eps * 5**0.5 * cond  # a few roundings of a computed singular value
    for Y in (space.project(X), space.retract(X, torch.zeros_like(X))):
        assert float((Y.double() - X.double()).abs().max()) <= slack
    V = space.tangent(X, 1e-3 * torch.randn(X.shape, generator=g, dtype=F64).to(dtype))
    R = space.retract(X, V)
    assert member(space, R)
    assert float((R.double() - X.double() - V.double()).abs().max()) <= slack + 10 * float(V.double().norm()) ** 2


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("space", [gf.SL(), gf.SL(f=(torch.exp, torch.log)), gf.GLp(f=(torch.exp, torch.log)),
                                   gf.FixedRank(rank=2, f=(torch.exp, torch.log))], ids=repr)
def test_project_of_a_singular_matrix_is_a_member(space, dtype):
    """``project`` lifts the zero values of a singular ``Y`` (here scaled by 1e3, a map without a floor)
    far enough for membership: GLp's four times a computed value's rounding, SL's √ε·σ₁ (its singular
    guard reads cond_F, up to √n times cond₂: GLp's lift alone gave SL non-members at n ≥ 4)."""
    g = torch.Generator().manual_seed(6)
    for n in (2, 4, 8, 64):
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
        d = torch.ones(n, dtype=F64)
        d[-2:] = 0.0
        Y = ((Q * d) @ Q.mT * 1e3).to(dtype)
        if isinstance(space, gf.FixedRank):
            Y = Y[:, :2] if n > 2 else Y
        P = space.project(Y)
        assert bool(space.contains(P)) and member(space, P), n
