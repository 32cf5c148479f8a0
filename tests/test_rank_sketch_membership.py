"""The sketched membership and right inverse of the rank family (Note [Sketched membership of low-rank
points] in geofunc/spaces/_factorized.py): ``contains``, ``check`` and ``from_manifold`` of LowRank,
FixedRank, PSSDLowRank and PSSDFixedRank decide membership from bounds of a sketch (O(nkr)) and read
the frames from the certified sketch, instead of svdvals/SVD (eigvalsh/eigh) of the dense matrix.
Pinned here: the sketch is taken where it should be; its values and frames equal the dense path's
(float64 to 1e-10; frames up to the sign of each pair, which the dense SVD chooses arbitrarily); where
it decides membership it decides as the dense measures, at the tolerance's boundary included (a member
only below it, a non-member only above it); and everything it cannot decide or certify (a tail left
in the residual, a rank below r, a tie, NaN/inf, a value at the floor, vmap, autograd, small sizes)
takes the dense path unchanged, errors and their messages included. No timing is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

import geofunc as gf
import geofunc.spaces._factorized as fz
from geofunc.spaces._base import AbstractSpace, default_atol

F64 = torch.float64
F32 = torch.float32
TOL = {F64: 1e-10, F32: 2e-5}

SPACES = [gf.LowRank(rank=4), gf.FixedRank(rank=3), gf.PSSDLowRank(rank=4), gf.PSSDFixedRank(rank=2),
          gf.LowRank(rank=16), gf.PSSDFixedRank(rank=16)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _eig(space):
    return isinstance(space, (gf.PSSDLowRank, gf.PSSDFixedRank))


def _shapes(space):
    if _eig(space):
        return [(96, 96), (3, 96, 96)]
    return [(96, 96), (128, 96), (96, 128), (3, 96, 96)]


CASES = [(space, shape) for space in SPACES for shape in _shapes(space)]


class _Counted:
    """Counts, while installed, the membership sketches that proved every matrix a member (``accepted``) or
    decided a batch with a non-member (``rejected``), and the frame sketches that certified (``frames``)."""

    def __init__(self, monkeypatch):
        self.accepted = self.rejected = self.frames = 0

        def member(f):
            def g(*args):
                out = f(*args)
                if out[0] is not None:
                    self.accepted += bool(out[0].all())
                    self.rejected += not bool(out[0].all())
                return out
            return g

        def frames(f):
            def g(*args):
                out = f(*args)
                self.frames += out is not None
                return out
            return g

        monkeypatch.setattr(fz, "_sketch_member_svd", member(fz._sketch_member_svd))
        monkeypatch.setattr(fz, "_sketch_member_eigh", member(fz._sketch_member_eigh))
        monkeypatch.setattr(fz, "_sketch_svd", frames(fz._sketch_svd))
        monkeypatch.setattr(fz, "_sketch_eigh", frames(fz._sketch_eigh))
        monkeypatch.setattr(fz, "_sketch_svd_of", frames(fz._sketch_svd_of))  # from the check's sketch
        monkeypatch.setattr(fz, "_sketch_eigh_of", frames(fz._sketch_eigh_of))


def _dense(fn):
    """``fn()`` with the new sketches off: the dense path (contains, check, from_manifold before them)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fz.SVDSpace, "_sketchable", lambda *a, **k: False)
        mp.setattr(fz.EigSpace, "_sketchable", lambda *a, **k: False)
        return fn()


def _raised(fn):
    try:
        fn()
    except gf.ManifoldError as e:
        return str(e)
    return None


def _aligned(A, B):
    """``A`` with each column's sign flipped to match ``B``'s (the frames of separated values)."""
    return A * torch.sign((A * B).sum(-2, keepdim=True))


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("space, shape", CASES, ids=repr)
def test_sketch_equals_the_dense_path(space, shape, dtype, monkeypatch):
    X = space.sample(shape, dtype=dtype, generator=_gen(1))
    counted = _Counted(monkeypatch)
    c = space.contains(X)
    space.check(X)
    Z, base = space.from_manifold(X)
    assert counted.accepted == 3 and counted.frames == 1  # contains, check, from_manifold's check; its frames
    c0 = _dense(lambda: space.contains(X))
    Z0, base0 = _dense(lambda: space.from_manifold(X))
    assert torch.equal(c, c0) and bool(c.all())
    tol = TOL[dtype]
    torch.testing.assert_close(Z, Z0, atol=tol, rtol=0)  # the value coordinates: f⁻¹ of the top r values
    frames, frames0 = (base, base0) if _eig(space) else (base[0], base0[0])
    sign = torch.sign((frames * frames0).sum(-2, keepdim=True))
    torch.testing.assert_close(frames * sign, frames0, atol=tol, rtol=0)
    if not _eig(space):  # the pair (uᵢ, vᵢ) flips together
        torch.testing.assert_close(base[1] * sign, base0[1], atol=tol, rtol=0)
    torch.testing.assert_close(space.to_manifold(Z, base), X, atol=tol, rtol=0)  # a right inverse
    assert space._invalid_base(base) is None
    assert Z.is_contiguous() and all(B.is_contiguous() for B in (base if isinstance(base, tuple) else (base,)))
    # rebase keeps its own path (no decomposition): unchanged
    Zm = Z + 1e-3 * torch.randn(Z.shape, dtype=dtype, generator=_gen(2))
    torch.testing.assert_close(space.to_manifold(*space.rebase(Zm, base)), space.to_manifold(Zm, base), atol=tol, rtol=0)


def _members_with_violation(space, dtype, kind, v, seed):
    """A matrix of ``space`` (96×96) plus a violation of size ``v`` of the kind ``kind``."""
    g = _gen(seed)
    n, r = 96, space.rank
    W = torch.linalg.qr(torch.randn(n, 2 * (r + 1), dtype=dtype, generator=g)).Q
    U, V = W[:, : r + 1], (W[:, : r + 1] if _eig(space) else W[:, r + 1:])
    vals = torch.linspace(1.5, 0.5, r, dtype=dtype)
    if kind == "floor":
        eps = torch.finfo(dtype).eps
        c = max(0.999 * space._value_map.floor(dtype) - eps * math.sqrt(n) * 1.5, eps * math.sqrt(n) * 1.5)
        vals[-1] = c * (1.0 - v)
    X = (U[:, :r] * vals) @ V[:, :r].mT
    if kind == "tail":
        X = X + v * U[:, r:] @ V[:, r:].mT
    elif kind == "negative":
        X = X - v * U[:, r:] @ U[:, r:].mT
    elif kind == "asymmetric":
        X[3, 7] += v
    return X


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("space, kind", [(gf.LowRank(rank=4), "tail"), (gf.FixedRank(rank=4), "tail"),
                                         (gf.FixedRank(rank=4), "floor"), (gf.PSSDLowRank(rank=4), "tail"),
                                         (gf.PSSDFixedRank(rank=4), "negative"), (gf.PSSDLowRank(rank=4), "asymmetric"),
                                         (gf.PSSDFixedRank(rank=4), "floor")],
                         ids=repr)
def test_never_accepts_what_the_dense_check_rejects(space, kind, dtype, monkeypatch):
    """Violations of tol·(1 + γ) (times 1.5 = σ₁ where relative to max(1, σ₁)), γ from −0.5 to 0.5 and
    at ±1e-6, and 100× the tolerance: where the sketch decides, it decides as the dense measures; it accepts
    only below the tolerance, and rejects only above it; half the tolerance below it, it accepts (the bounds
    are not vacuous) but at the floor, whose margin tol·floor is below the rounding of any computed value
    (the dense measures decide), and a rank measure 100× the tolerance it rejects."""
    tol = default_atol(dtype, 96)
    scale = 1.0 if kind == "floor" else 1.5
    for i, gam in enumerate((-0.5, -0.1, -1e-6, 1e-6, 0.1, 0.5, 99.0)):
        X = _members_with_violation(space, dtype, kind, tol * (1 + gam) * scale, i)
        counted = _Counted(monkeypatch)
        c = bool(space.contains(X))
        dense = bool(_dense(lambda: AbstractSpace.contains(space, X)))
        assert c == dense, (gam, kind)  # decided alike, or by the dense measures
        assert not counted.accepted or gam < 0
        assert not counted.rejected or gam > 0
        if gam == -0.5 and kind != "floor":
            assert counted.accepted == 1
        if gam == 99.0 and kind in ("tail", "negative"):
            assert counted.rejected == 1
        msg = _raised(lambda: space.check(X))
        assert msg == _raised(lambda: _dense(lambda: space.check(X)))


@pytest.mark.parametrize("space", SPACES[:4], ids=repr)
def test_full_rank_and_non_finite_take_the_dense_path(space, monkeypatch):
    g = _gen(3)
    Y = torch.randn(2, 96, 96, dtype=F64, generator=g)
    Y = Y + Y.mT
    counted = _Counted(monkeypatch)
    c = space.contains(Y)
    assert counted.rejected == 1  # contains: the sketch proves the rank measure above the tolerance
    assert torch.equal(c, _dense(lambda: space.contains(Y))) and not bool(c.any())
    msg = _raised(lambda: space.check(Y))  # check: the dense measures, whose values the message names
    assert msg is not None and msg == _raised(lambda: _dense(lambda: space.check(Y)))
    assert _raised(lambda: space.from_manifold(Y)) == _raised(lambda: _dense(lambda: space.from_manifold(Y)))
    X = space.sample((2, 96, 96), dtype=F64, generator=g)
    X[1, 5, 5] = math.nan
    counted = _Counted(monkeypatch)
    assert space.contains(X).tolist() == [True, False]  # the batch takes the dense path
    assert _raised(lambda: space.check(X)) == _raised(lambda: _dense(lambda: space.check(X)))
    X[1, 5, 5] = math.inf
    assert space.contains(X).tolist() == [True, False]
    assert counted.accepted == counted.rejected == 0


def test_a_tail_left_in_the_residual_takes_the_dense_path(monkeypatch):
    """A tail of 60 values of 0.5·tol: a member by the dense measure (σ_(r+1) below the tolerance), whose
    sketch leaves the tail in R (‖R‖_F ≈ 0.5·tol·√52): not accepted, the dense measures accept."""
    g = _gen(4)
    n, r, m = 128, 4, 60
    tol = default_atol(F64, n)
    W = torch.linalg.qr(torch.randn(n, 2 * (r + m), dtype=F64, generator=g)).Q
    U, V = W[:, : r + m], W[:, r + m:]
    vals = torch.cat([torch.linspace(1.5, 0.5, r, dtype=F64), torch.full((m,), 0.5 * tol * 1.5, dtype=F64)])
    X = (U * vals) @ V.mT
    counted = _Counted(monkeypatch)
    assert bool(gf.LowRank(rank=r).contains(X))
    gf.LowRank(rank=r).check(X)
    Z, base = gf.LowRank(rank=r).from_manifold(X)  # the frames: not certified (the residual above the rank tolerance)
    assert counted.accepted == 0 and counted.frames == 0
    Z0, base0 = _dense(lambda: gf.LowRank(rank=r).from_manifold(X))
    assert torch.equal(Z, Z0) and torch.equal(base[0], base0[0]) and torch.equal(base[1], base0[1])


@pytest.mark.parametrize("space", [gf.LowRank(rank=4), gf.PSSDLowRank(rank=4)], ids=repr)
def test_rank_below_r_accepted_frames_dense(space, monkeypatch):
    """A point of rank 2 < 4 is a member (the sketch proves it), but its frames past the rank are not
    determined: from_manifold's frames are the dense path's, bit for bit."""
    g = _gen(5)
    U = torch.linalg.qr(torch.randn(96, 2, dtype=F64, generator=g)).Q
    X = U @ torch.diag(torch.tensor([2.0, 1.0], dtype=F64)) @ U.mT
    counted = _Counted(monkeypatch)
    Z, base = space.from_manifold(X)
    assert counted.accepted == 1 and counted.frames == 0
    Z0, base0 = _dense(lambda: space.from_manifold(X))
    assert torch.equal(Z, Z0)
    for B, B0 in zip(base if isinstance(base, tuple) else (base,), base0 if isinstance(base0, tuple) else (base0,)):
        assert torch.equal(B, B0)


def test_tie_at_the_rank_takes_the_dense_frames(monkeypatch):
    """σ_r = σ_(r+1) < tol: a member of LowRank(4) (of rank 5 by a tail under the tolerance), whose kept frame
    is not determined by the values: the dense SVD's choice, kept."""
    g = _gen(6)
    tol = default_atol(F64, 96)
    Q = torch.linalg.qr(torch.randn(96, 6, dtype=F64, generator=g)).Q
    P = torch.linalg.qr(torch.randn(96, 6, dtype=F64, generator=g)).Q
    X = Q @ torch.diag(torch.tensor([3.0, 2.5, 2.0, 0.1 * tol, 0.1 * tol, 0.0], dtype=F64)) @ P.mT
    counted = _Counted(monkeypatch)
    Z, base = gf.LowRank(rank=4).from_manifold(X)
    assert counted.frames == 0
    Z0, base0 = _dense(lambda: gf.LowRank(rank=4).from_manifold(X))
    assert torch.equal(Z, Z0) and torch.equal(base[0], base0[0])


@pytest.mark.parametrize("space", SPACES[:4], ids=repr)
def test_transforms_autograd_and_small_sizes_keep_the_dense_path(space, monkeypatch):
    X = space.sample((3, 96, 96), dtype=F64, generator=_gen(7))
    counted = _Counted(monkeypatch)
    assert bool(vmap(space.contains)(X).all())
    assert not bool(vmap(space.contains)(X + 0.1).any())
    Xg = X.clone().requires_grad_()
    Z, base = space.from_manifold(Xg)  # differentiated: through the dense SVD (eigh), as before
    Z0, base0 = _dense(lambda: space.from_manifold(Xg))
    assert torch.equal(Z, Z0) and Z.requires_grad
    # its check reads the detached values by the sketch (a boolean: nothing to differentiate)
    assert counted.accepted == 1 and counted.rejected == counted.frames == 0
    assert bool(space.contains(Xg).all()) and not bool(space.contains(Xg + 0.1).any())
    assert counted.accepted == 2 and counted.rejected == 1 and counted.frames == 0
    counted.accepted = counted.rejected = 0
    Xs = space.sample((48, 48), dtype=F64, generator=_gen(8))
    assert bool(space.contains(Xs))
    Zs, _ = space.from_manifold(Xs)
    assert torch.equal(Zs, _dense(lambda: space.from_manifold(Xs))[0])
    assert counted.accepted == counted.frames == 0
    with torch.no_grad():  # nothing differentiates: the sketch
        space.from_manifold(Xg)
    assert counted.accepted == 1 and counted.frames == 1


def test_atol_zero_meta_and_bad_atol(monkeypatch):
    space = gf.LowRank(rank=4)
    X = space.sample((96, 96), dtype=F64, generator=_gen(9))
    counted = _Counted(monkeypatch)
    assert bool(space.contains(X, atol=0.0)) == bool(_dense(lambda: space.contains(X, atol=0.0)))
    assert counted.accepted == 0  # a bound above 0 proves nothing (membership)
    assert _raised(lambda: space.check(X, atol=-1.0)) == _raised(lambda: _dense(lambda: space.check(X, atol=-1.0)))
    M = torch.empty(96, 96, dtype=F64, device="meta")
    assert _raised(lambda: space.check(M)) == _raised(lambda: _dense(lambda: space.check(M)))


def test_autocast_does_not_reach_the_sketch(monkeypatch):
    """Under CPU autocast (bf16 products) the bounds are computed in the point's dtype, as _measure's values."""
    space = gf.LowRank(rank=4)
    X = space.sample((96, 96), dtype=F32, generator=_gen(10))
    Y = X + 1e-2 * torch.randn(96, 96, generator=_gen(11))
    counted = _Counted(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bool(space.contains(X)) and not bool(space.contains(Y))
    assert counted.accepted == 1


# Note [One sketch for from_manifold]: from_manifold reads the frames from the sketch its check measured.
def _sketches_taken(monkeypatch):
    """The list of the sketches of a point taken while installed (one Gaussian test matrix each)."""
    taken = []
    real = fz._sketch_matrix

    def spy(k, q, dtype, device):
        taken.append((k, q))
        return real(k, q, dtype, device)

    monkeypatch.setattr(fz, "_sketch_matrix", spy)
    return taken


def _two_sketches(space, X):
    """from_manifold as it was: the check's sketch, then a second one for the frames."""
    return AbstractSpace.from_manifold(space, X)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("space, shape", CASES, ids=repr)
def test_from_manifold_sketches_once(space, shape, dtype, monkeypatch):
    """One sketch of the point (the check's), whose frames are those of the two-sketch path bit for bit
    and the dense path's to the dtype's tolerance."""
    X = space.sample(shape, dtype=dtype, generator=_gen(31))
    taken = _sketches_taken(monkeypatch)
    Z, base = space.from_manifold(X)
    assert len(taken) == 1  # (two before: the check's, then _sketch_svd's or _sketch_eigh's)
    Z2, base2 = _two_sketches(space, X)
    assert len(taken) == 3
    assert torch.equal(Z, Z2)
    for B, B2 in zip(base if isinstance(base, tuple) else (base,), base2 if isinstance(base2, tuple) else (base2,)):
        assert torch.equal(B, B2) and B.is_contiguous()
    Z0, base0 = _dense(lambda: space.from_manifold(X))
    tol = TOL[dtype]
    torch.testing.assert_close(Z, Z0, atol=tol, rtol=0)
    frames, frames0 = (base, base0) if _eig(space) else (base[0], base0[0])
    sign = torch.sign((frames * frames0).sum(-2, keepdim=True))
    torch.testing.assert_close(frames * sign, frames0, atol=tol, rtol=0)
    if not _eig(space):
        torch.testing.assert_close(base[1] * sign, base0[1], atol=tol, rtol=0)
    torch.testing.assert_close(space.to_manifold(Z, base), X, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("space, kind", [(gf.LowRank(rank=4), "tail"), (gf.FixedRank(rank=4), "floor"),
                                         (gf.PSSDLowRank(rank=4), "asymmetric"), (gf.PSSDFixedRank(rank=4), "negative")],
                         ids=repr)
def test_from_manifold_still_rejects_non_members(space, kind, dtype, monkeypatch):
    """The reused sketch is the check's, not a weaker one: a violation of 2× and 100× the tolerance (alone, and
    as the second matrix of a batch of members) raises from from_manifold the dense check's error, and a
    violation of half the tolerance passes with the frames of the two-sketch path."""
    tol = default_atol(dtype, 96)
    scale = 1.0 if kind == "floor" else 1.5
    for i, gam in enumerate((1.0, 99.0)):
        X = _members_with_violation(space, dtype, kind, tol * (1 + gam) * scale, 40 + i)
        batch = torch.stack([_members_with_violation(space, dtype, kind, 0.0, 50 + i), X])
        for P in (X, batch):
            msg = _raised(lambda: space.from_manifold(P))
            assert msg is not None and msg == _raised(lambda: _dense(lambda: space.check(P)))
            assert P is X or "batch index (1,)" in msg
            assert msg == _raised(lambda: _two_sketches(space, P))
    if kind != "floor":  # (half the floor's tolerance: the dense measures decide, as above)
        X = _members_with_violation(space, dtype, kind, tol * 0.5 * scale, 60)
        Z, base = space.from_manifold(X)
        Z2, base2 = _two_sketches(space, X)
        assert torch.equal(Z, Z2)


def test_from_manifold_without_the_check_or_the_sketch_is_unchanged(monkeypatch):
    """Where no check runs (meta, vmap) or the frames' gate refuses the sketch (a point that requires grad),
    and for a subclass with its own check (which from_manifold calls), from_manifold is as before."""
    space = gf.LowRank(rank=4)
    X = space.sample((3, 96, 96), dtype=F64, generator=_gen(70))
    Zm, basem = space.from_manifold(torch.empty(96, 96, dtype=F64, device="meta"))
    assert Zm.is_meta and basem[0].shape == (96, 4)
    Zv, basev = vmap(space.from_manifold)(X)
    Z0, base0 = _dense(lambda: space.from_manifold(X))
    assert torch.equal(Zv, Z0) and torch.equal(basev[0], base0[0])
    taken = _sketches_taken(monkeypatch)
    Xg = X.clone().requires_grad_()
    Zg, baseg = space.from_manifold(Xg)  # the check's sketch; the frames of the dense SVD, differentiable
    assert len(taken) == 1 and Zg.requires_grad
    assert torch.equal(Zg, Z0) and torch.equal(baseg[0], base0[0])
    calls = []

    class Logged(gf.LowRank):
        def check(self, X, atol=None):
            calls.append(X.shape)
            super().check(X, atol)

    Zl, basel = Logged(rank=4).from_manifold(X)
    assert calls == [X.shape] and len(taken) == 3  # its check, then the frames' own sketch
    Z2, base2 = _two_sketches(space, X)
    assert torch.equal(Zl, Z2) and torch.equal(basel[0], base2[0])
    with pytest.raises(gf.ManifoldError):
        Logged(rank=4).from_manifold(X + 0.1)


def _sketch_blind(k, q, g):
    """Orthonormal bases of the span of the (fixed) sketch matrix's q columns and of its complement: a right
    singular direction (an eigenvector) in the complement is one the sketch's range cannot see at all."""
    Om = fz._sketch_matrix(k, q, F64, torch.device("cpu"))
    W = torch.linalg.qr(torch.cat([Om, torch.randn(k, k - q, dtype=F64, generator=g)], 1)).Q
    return W[:, :q], W[:, q:]


def _blind_point(space, seen, blind, seed):
    """A 96×96 point of ``space``'s kind with values ``seen`` along directions of the sketch's span and ``blind``
    along directions orthogonal to it (only the residual terms of the bounds know those)."""
    g = _gen(seed)
    visible, hidden = _sketch_blind(96, space.rank + fz._SKETCH_OVERSAMPLE, g)
    V = torch.cat([visible[:, : len(seen)], hidden[:, : len(blind)]], 1)
    vals = torch.tensor(list(seen) + list(blind), dtype=F64)
    if _eig(space):
        X = (V * vals) @ V.mT
        return 0.5 * (X + X.mT)
    U = torch.linalg.qr(torch.randn(96, V.shape[1], dtype=F64, generator=g)).Q
    return (U * vals) @ V.mT


@pytest.mark.parametrize("space", [gf.LowRank(rank=4), gf.FixedRank(rank=4), gf.PSSDLowRank(rank=4),
                                   gf.PSSDFixedRank(rank=4)], ids=repr)
def test_directions_the_sketch_cannot_see(space):
    """Points with a direction orthogonal to every column of the sketch matrix (adversarial for its fixed seed):
    the sketch's own values miss it, so a bound that drops a residual term, or takes σ₁ (‖X‖₂) from the wrong
    side, decides wrongly. A largest value of 1000 hidden (a member: the rank measure is 5e-7/1000), a hidden
    (r+1)-th value of 1e-3 (not one), and at atol = 0.6 a hidden value of ±1 beside four of 1 (not one): the
    sketch, where it decides, decides as the dense measures."""
    r, q = space.rank, space.rank + fz._SKETCH_OVERSAMPLE
    cases = [([1.0] * (r - 1) + [5e-7] * (q - r + 1), [1000.0], None, True),
             ([1.0] * r + [1e-10] * (q - r), [1e-3], None, False),
             ([1.0] * r + [1e-3] * (q - r), [1.0], 0.6, False)]
    if _eig(space):
        cases.append(([1.0] * r + [1e-3] * (q - r), [-1.0], 0.6, False))
    for i, (seen, blind, atol, member) in enumerate(cases):
        X = _blind_point(space, seen, blind, i)
        assert bool(_dense(lambda: space.contains(X, atol))) == member  # (the construction)
        assert bool(space.contains(X, atol)) == member, (seen[-1], blind, atol)
        assert _raised(lambda: space.check(X, atol)) == _raised(lambda: _dense(lambda: space.check(X, atol)))


@pytest.mark.parametrize("space", [gf.PSSDLowRank(rank=4), gf.PSSDFixedRank(rank=4)], ids=repr)
def test_an_eigenvector_the_sketch_sees_in_part(space):
    """The (r+1)-th eigenvector e (value 1.02 or 1.05 times the tolerance: not a member) at an angle to the
    sketch's range: span(X) is the sketch matrix's span plus one hidden direction b, and e, f rotate a direction
    of that span towards b by α (f with a value μ below the tolerance). The sketch's compression sees e's value
    only in part, the rest is in the residual, which moves an eigenvalue by up to (2 + d)·‖R‖_F: a bound that
    adds only ‖R‖_F, or takes the larger of the compressed value and the residual term instead of their sum,
    accepts some of these. Where the sketch decides, it decides as the dense measures."""
    r, q = space.rank, space.rank + fz._SKETCH_OVERSAMPLE
    tau = default_atol(F64, 96) * 1.5  # the tolerance times ‖X‖₂
    g = _gen(12)
    visible, hidden = _sketch_blind(96, q, g)
    visible = visible @ torch.linalg.qr(torch.randn(q, q, dtype=F64, generator=g)).Q
    s, b = visible[:, r], hidden[:, 0]
    for lam, mu, alpha in [(1.02, 0.05, 1.4), (1.02, 0.3, 0.8), (1.02, -0.3, 0.5), (1.02, -0.3, 1.4),
                           (1.05, 0.05, 1.4), (1.05, -0.3, 1.4), (1.05, 0.3, 0.8)]:
        e = math.cos(alpha) * s + math.sin(alpha) * b
        f = -math.sin(alpha) * s + math.cos(alpha) * b
        E = torch.cat([visible[:, :r], e[:, None], f[:, None], visible[:, r + 1:]], 1)
        vals = torch.tensor([1.5, 1.2, 0.9, 0.6, lam * tau, mu * tau] + [1e-3 * tau] * (q - r - 1), dtype=F64)
        X = (E * vals) @ E.mT
        X = 0.5 * (X + X.mT)
        assert not bool(_dense(lambda: space.contains(X)))
        assert not bool(space.contains(X)), (lam, mu, alpha)


@pytest.mark.parametrize("base_cls, shape", [(gf.LowRank, (96, 64)), (gf.PSSDLowRank, (96, 96))], ids=str)
def test_from_manifold_of_a_subclass_with_its_own_inverse(base_cls, shape):
    """A subclass that overrides _from_manifold (AbstractSpace's hook, called with X alone) keeps working:
    from_manifold checks X and calls it as before (it raised TypeError: unexpected keyword 'sketch')."""
    calls = []

    class Own(base_cls):
        def _from_manifold(self, X):
            calls.append(X.shape)
            return super()._from_manifold(X)

    space = Own(rank=3)
    X = space.sample(shape, dtype=F64, generator=_gen(80))
    Z, base = space.from_manifold(X)
    assert calls == [X.shape]
    torch.testing.assert_close(space.to_manifold(Z, base), X, atol=1e-9, rtol=0)
    with pytest.raises(gf.ManifoldError):
        space.from_manifold(X + 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("space", SPACES[:4], ids=repr)
def test_low_precision_points_take_the_dense_path(space, dtype, monkeypatch):
    """A float16/bfloat16 point at a sketchable size is measured by the dense path (the sketch's QR has no
    half-precision kernel on the CPU): contains and check answer as with the sketch switched off."""
    torch.manual_seed(0)
    n, r = 96, 2
    G = torch.randn(n, r, dtype=F64)
    X = (G @ G.mT if isinstance(space, fz.EigSpace) else G @ torch.randn(r, n, dtype=F64)).to(dtype)
    Y = (X.double() + torch.randn(n, n, dtype=F64)).to(dtype)  # full rank: off the space
    got = [bool(space.contains(P).all()) for P in (X, Y)]
    with monkeypatch.context() as m:
        m.setattr(fz, "_sketch_size", lambda *a: False)
        want = [bool(space.contains(P).all()) for P in (X, Y)]
    assert got == want
    with pytest.raises(gf.ManifoldError):
        space.check(Y)


@pytest.mark.parametrize("vals", [(0.01, 0.008, 0.006, 0.9, 0.9, 0.0), (0.01, 0.008, 0.006, 0.9, 0.9, -0.5)],
                         ids=["tail-zero", "tail-negative"])
def test_tie_at_the_rank_takes_the_dense_eigh_frames(vals, monkeypatch):
    """λ_r = λ_(r+1) ≤ tol, the next eigenvalue farther below (0, or negative within the tolerance): a member of
    PSSDLowRank(4) whose kept frame is not determined by the values, even where the tie is wider than the
    sketch's √ε·λ₁ (a small point). The gap is read at λ_(r+1), floored at 0: the dense eigh's choice, kept."""
    g = _gen(9)
    tol = default_atol(F64, 96)
    lam = torch.tensor(vals, dtype=F64)
    lam[3:] *= tol
    Q = torch.linalg.qr(torch.randn(96, 6, dtype=F64, generator=g)).Q
    X = Q @ torch.diag(lam) @ Q.mT
    space = gf.PSSDLowRank(rank=4)
    counted = _Counted(monkeypatch)
    Z, base = space.from_manifold(X)
    assert counted.frames == 0
    Z0, base0 = _dense(lambda: space.from_manifold(X))
    assert torch.equal(Z, Z0) and torch.equal(base, base0)
