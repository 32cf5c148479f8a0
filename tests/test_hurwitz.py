"""Hurwitz: derivatives of ``from_manifold`` (the Lyapunov certificate) in every mode.

``to_manifold(*from_manifold(X)) = X`` on the space (an open set), so its derivative along any
direction ``V`` is ``V``: an oracle that needs no other implementation. ``from_manifold`` inverted
the certificate ``P`` with ``torch.cholesky_inverse``, whose forward-mode derivative is wrong on
torch 2.13 (``jvp`` of the round trip 2–8% off ``V``; reverse mode was exact)."""

from __future__ import annotations

import pytest
import torch

import geofunc as gf

F64 = torch.float64


@pytest.mark.parametrize("space", [gf.Hurwitz(), gf.Hurwitz(alpha=0.5, triv="cayley")], ids=["expm", "alpha-cayley"])
def test_from_manifold_round_trip_derivative_is_the_identity(space):
    g = torch.Generator().manual_seed(0)
    X = space.sample((2, 4, 4), generator=g, dtype=F64)
    V = torch.randn(2, 4, 4, generator=g, dtype=F64)
    C = torch.randn(2, 4, 4, generator=g, dtype=F64)

    def round_trip(x):
        return space.to_manifold(*space.from_manifold(x))

    _, jv = torch.func.jvp(round_trip, (X,), (V,))
    torch.testing.assert_close(jv, V, atol=1e-8, rtol=0)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(round_trip(torch.autograd.forward_ad.make_dual(X, V))).tangent
    torch.testing.assert_close(tangent, V, atol=1e-8, rtol=0)
    gr = torch.func.grad(lambda x: (round_trip(x) * C).sum())(X)
    torch.testing.assert_close(gr, C, atol=1e-8, rtol=0)
    # the raw coordinates themselves against central differences
    h = 1e-6
    fd = (space.from_manifold(X + h * V)[0] - space.from_manifold(X - h * V)[0]) / (2 * h)
    torch.testing.assert_close(torch.func.jvp(lambda x: space.from_manifold(x)[0], (X,), (V,))[1], fd, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,n,scale", [(torch.float64, 4, 10.0), (torch.float32, 16, 5.0)], ids=["float64", "float32"])
def test_from_manifold_refuses_what_it_cannot_invert_accurately(dtype, n, scale):
    """Points of the space's own chart from large raw entries: the Lyapunov certificate passed its checks
    while the right inverse came back up to 4.9 (float64) / 0.68 (float32) off. Now from_manifold either
    round-trips within 1/64 (relative to max(1, max|X|)) or raises a ManifoldError that says so (Note
    [Hurwitz right inverse off by its conditioning]); small raw entries round-trip to rounding. (float32 was at
    raw scale 3, where a refined certificate now round-trips all 24 within 1/64 (Note [Hurwitz certificate refined
    where its checks fail]); at scale 5, 10 of 24 are still refused.)"""
    M = gf.Hurwitz()
    g = torch.Generator().manual_seed(0)
    refused = 0
    for i in range(24):
        X = M.to_manifold((scale * torch.randn(n, n, generator=g, dtype=torch.float64)).to(dtype))
        try:
            Z, base = M.from_manifold(X)
        except gf.ManifoldError as e:
            assert "Hurwitz" in str(e) and ("round trip" in str(e) or "certificate" in str(e) or "boundary" in str(e))
            refused += 1
            continue
        rel = (M.to_manifold(Z, base) - X).abs().max() / X.abs().max().clamp(min=1.0)
        assert rel <= 2.0**-6, rel
    assert 0 < refused < 24
    small = M.to_manifold((0.5 * torch.randn(8, 16, 16, generator=g, dtype=torch.float64)).to(dtype))
    Z, base = M.from_manifold(small)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert ((M.to_manifold(Z, base) - small).abs().amax((-2, -1)) / small.abs().amax((-2, -1)).clamp(min=1.0)).max() <= tol


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_second_derivatives_at_a_multiple_of_the_identity(alpha):
    """At the chart's centre ``to_manifold(0) = −log(2)/2 · I`` (and any multiple of I) plain autograd's
    double backward through ``project``/``retract`` was NaN: the margin's ``‖Y − tr(Y)/n I‖_F`` is 0
    there, and the norm's second derivative at 0 survived the clamp (0·NaN). Now both second derivatives
    equal torch.func's and ``gradgradcheck`` passes (float64)."""
    M = gf.Hurwitz(alpha=alpha)
    X = M.to_manifold(torch.zeros(4, 4, dtype=torch.float64))
    V = M.tangent(X, torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(t):
        return (M.retract(X, t * V) * W).sum() + (M.retract(X, t * V) ** 2).sum()

    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(t), t, create_graph=True)
    (h,) = torch.autograd.grad(g, t)
    exact = torch.func.grad(torch.func.grad(f))(torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(h, exact, atol=1e-9, rtol=1e-9)
    assert torch.autograd.gradgradcheck(M.project, (X.clone().requires_grad_(),))


def test_compiled_project_does_not_recompile_per_batch_size():
    """A compiled step over a batch of Hurwitz matrices whose batch size changes (default
    ``dynamic=None``: automatic dynamic shapes) compiles one static and one dynamic graph, as every
    other space does. ``project`` (and ``retract``, through it) read the top eigenvalue with
    ``torch.take_along_dim``, which guarded the batch size to its value: one graph per size (4 sizes,
    4 graphs; 8 sizes hit the recompile limit and ran eagerly). Note [Gather, not take_along_dim]."""
    from torch._dynamo.utils import counters

    space = gf.Hurwitz(alpha=0.5)
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    counters.clear()

    def step(X, V):
        Y = space.retract(X, V)
        return Y, torch.func.grad(lambda y: space.project(y).sum())(X + V)

    compiled = torch.compile(step, backend="eager")
    for B in [3, 4, 5, 6]:
        X = space.sample((B, 3, 3), generator=g, dtype=F64)
        V = torch.randn(B, 3, 3, generator=g, dtype=F64)
        for a, e in zip(compiled(X, V), step(X, V)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_project_and_retract_are_stable_after_rounding(dtype, alpha):
    """A bf16/fp16 ``project``/``retract`` is computed in float32 and rounded; the shift must leave room for
    that rounding (Note [Hurwitz margin of the stored dtype]): with float32's margin 9–12% of bf16
    projections of well-conditioned 5×5 matrices were unstable (max Re λ up to +0.09 above −alpha), and
    ``contains`` accepted them. Judged by the eigenvalues of the stored point in float64."""
    M = gf.Hurwitz(alpha=alpha)
    g = torch.Generator().manual_seed(0)
    Y = (3.0 * torch.randn(500, 5, 5, generator=g)).to(dtype)
    P = M.project(Y)
    assert P.dtype == dtype
    assert bool((torch.linalg.eigvals(P.double()).real.amax(-1) <= -alpha).all())
    X = M.sample((200, 5, 5), generator=g, dtype=dtype)
    p, opt = {"W": X}, gf.optim.rsgd({"W": M}, 0.05, momentum=0.9)
    state = opt.init(p)
    T = 2.0 * torch.randn(200, 5, 5, generator=g) + torch.eye(5)  # targets mostly unstable: the constraint is active
    for _ in range(20):
        p, state = opt.update({"W": (p["W"].float() - T).to(dtype)}, state, p)
        assert p["W"].dtype == dtype
        assert bool((torch.linalg.eigvals(p["W"].double()).real.amax(-1) <= -alpha).all())


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_chart_points_are_stable_after_rounding(dtype, alpha):
    """A bf16/fp16 ``to_manifold`` is computed in float32 and rounded; W's values keep a floor of the stored dtype
    so that the rounded point stays stable (Note [Hurwitz floor of the stored dtype]). With no floor 6% of bf16
    points of raw scale 1 with one raw diagonal entry at −6 were unstable, 24% at scale 3 (fp16: 12%), all accepted
    by ``contains``. Judged by the eigenvalues of the stored point in float64."""
    M = gf.Hurwitz(alpha=alpha)
    g = torch.Generator().manual_seed(0)
    for low, scale in ((-6.0, 1.0), (-6.0, 3.0), (-10.0, 3.0), (0.0, 3.0)):
        Z = scale * torch.randn(400, 5, 5, generator=g) + torch.diag(torch.tensor([0.0, 0.0, 0.0, 0.0, low]))
        X = M.to_manifold(Z.to(dtype))
        assert X.dtype == dtype
        assert bool((torch.linalg.eigvals(X.double()).real.amax(-1) <= -alpha).all()), (low, scale)


def test_low_precision_floor_leaves_float32_and_float64_unchanged():
    """float32/float64 charts keep no floor: the same values as softplus alone, bit for bit, and the same gradient;
    a bf16 point is the float32 chart of the raw tensor with W's values lifted by √ε of bf16."""
    import torch.nn.functional as F
    M = gf.Hurwitz(alpha=0.5)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, F64):
        Z = torch.randn(6, 4, 4, generator=g, dtype=dtype, requires_grad=True)
        X = M.to_manifold(Z)
        W = gf.PSD(f=(F.softplus, gf.spaces._values.softplus_inverse)).to_manifold(Z)
        S = torch.triu(Z, 1) - torch.triu(Z, 1).mT
        eye = torch.eye(4, dtype=dtype)
        Y = W @ S - 0.5 * W - 0.5 * eye
        assert torch.equal(X, Y)
        C = torch.randn(4, 4, generator=g, dtype=dtype)
        assert torch.equal(*(torch.autograd.grad((T * C).sum(), Z)[0] for T in (X, Y)))
    Z = torch.randn(6, 4, 4, generator=g)
    Zb = Z.bfloat16()
    W = gf.PSD(f=(F.softplus, gf.spaces._values.softplus_inverse)).to_manifold(Zb.float()) + 2.0 ** -3.5 * torch.eye(4)
    S = torch.triu(Zb.float(), 1) - torch.triu(Zb.float(), 1).mT
    torch.testing.assert_close(M.to_manifold(Zb).float(), (W @ S - 0.5 * W - 0.5 * torch.eye(4)).bfloat16().float(), rtol=0, atol=2 ** -6)


def test_low_precision_module_cast_reexpresses_the_floor():
    """A bf16 module's raw diagonal means W's values softplus + √ε(bf16): ``.float()`` re-expresses it, so the
    weight moves by bf16's rounding only (without it every value of W dropped by 0.088)."""
    lin = torch.nn.Linear(5, 5, bias=False)
    gf.nn.constrain(lin, "weight", gf.Hurwitz())
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(torch.randn(5, 5, generator=torch.Generator().manual_seed(2)))
    lin.bfloat16()
    Wb = lin.weight.detach().float()
    lin.float()
    torch.testing.assert_close(lin.weight.detach(), Wb, rtol=2 ** -7, atol=2 ** -7 * float(Wb.abs().max()))
    lin.bfloat16()
    torch.testing.assert_close(lin.weight.detach().float(), Wb, rtol=2 ** -6, atol=2 ** -6 * float(Wb.abs().max()))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_project_lands_inside_the_chart_of_its_dtype(dtype, alpha):
    """A bf16/fp16 ``project`` returns a point that ``from_manifold`` of the same dtype accepts (Note [Hurwitz project
    inside the chart of the stored dtype]): its certificate ``W = P⁻¹`` keeps the floor of the bf16/fp16 chart. With
    the abscissa margin alone 7–92% of projections (bf16; fp16 18–46%) of the near-boundary matrices below were
    refused by ``from_manifold`` (and so by a ``gf.nn`` assignment), W's least eigenvalue down to 0.002 of the floor.
    The round trip project → from_manifold → to_manifold comes back within the raw tensor's rounding."""
    from geofunc.spaces._hurwitz import _w_floor, lyapunov
    M = gf.Hurwitz(alpha=alpha)
    g = torch.Generator().manual_seed(0)
    for n, scale in ((3, 0.2), (5, 0.3), (5, 1.0), (5, 3.0), (16, 1.0)):
        Y = (scale * torch.randn(64, n, n, generator=g)).to(dtype)
        X = M.project(Y)
        assert X.dtype == dtype
        eye = torch.eye(n, dtype=F64)
        assert bool((torch.linalg.eigvals(X.double()).real.amax(-1) <= -alpha).all()), (n, scale)
        P, _ = lyapunov(X.double() + alpha * eye)  # the certificate of the stored point, in float64
        assert bool((1.0 / torch.linalg.eigvalsh(P)[..., -1] >= _w_floor(dtype)).all()), (n, scale)
        Z, base = M.from_manifold(X)  # the whole batch: raises on any refused point
        X2 = M.to_manifold(Z, base)
        rel = (X2.double() - X.double()).abs().amax((-2, -1)) / X.double().abs().amax((-2, -1)).clamp(min=1.0)
        # (from_manifold's own check holds 1/64 before its raw tensor is rounded to bf16/fp16; that rounding moves the
        # point by up to 0.05 (bf16) / 0.03 (fp16) at raw scale 3 through the chart's conditioning)
        assert float(rel.max()) <= 2.0**-4, (n, scale)
    lin = torch.nn.Linear(5, 5, bias=False)
    gf.nn.constrain(lin, "weight", M)
    lin.to(dtype)
    X = M.project((0.3 * torch.randn(5, 5, generator=g)).to(dtype))
    lin.weight = X  # the constrained module's assignment: the right inverse
    torch.testing.assert_close(lin.weight.detach().double(), X.double(), rtol=0, atol=2.0**-5)


def test_project_in_float32_and_float64_keeps_the_abscissa_margin_alone():
    """float32/float64 ``project`` is unchanged, bit for bit: ``Y − max(0, a + α + c)·I`` with no certificate shift."""
    from geofunc.spaces._hurwitz import _abscissa
    g = torch.Generator().manual_seed(3)
    for alpha in (0.0, 0.5):
        M = gf.Hurwitz(alpha=alpha)
        for dtype in (torch.float32, F64):
            Y = (0.3 * torch.randn(32, 5, 5, generator=g, dtype=F64)).to(dtype)
            eye = torch.eye(5, dtype=dtype)
            trace = Y.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
            D = Y - trace * eye
            c = torch.sqrt((D * D).sum(dim=(-2, -1), keepdim=True).clamp(min=1.0)) * torch.finfo(dtype).eps ** 0.5
            t = (_abscissa(Y)[..., None, None] + alpha + c).clamp(min=0.0)
            assert torch.equal(M.project(Y), Y - t * eye)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_exact_membership_refuses_unstable_and_accepts_the_maps_outputs(dtype):
    """The default bf16/fp16 tolerance is relative (5e-2 / 1e-2 of max(1, ‖X‖_F), as every space's), so it accepts a
    bf16 ``diag(0.04, −1)``; ``contains(X, atol=0)`` is the exact test: it refuses every matrix with ``Re λ ≥ −α``
    and accepts the stored outputs of the maps (Note [Hurwitz margin of the stored dtype], Note [Hurwitz floor of
    the stored dtype], Note [Hurwitz project inside the chart of the stored dtype])."""
    g = torch.Generator().manual_seed(5)
    for alpha in (0.0, 0.5):
        M = gf.Hurwitz(alpha=alpha)
        Z = (3.0 * torch.randn(300, 4, 4, generator=g)).to(dtype)
        for X in (M.to_manifold(Z), M.project(Z), M.retract(M.to_manifold(Z), 0.1 * Z), M.sample((300, 4, 4), generator=g, dtype=dtype)):
            assert bool((torch.linalg.eigvals(X.double()).real.amax(-1) <= -alpha).all())
            assert bool(M.contains(X, atol=0).all())
        U = (torch.randn(300, 4, 4, generator=g) - alpha * torch.eye(4)).to(dtype)
        unstable = torch.linalg.eigvals(U.double()).real.amax(-1) >= -alpha
        assert bool(unstable.any()) and not bool((M.contains(U, atol=0) & unstable).any())
    assert bool(gf.Hurwitz().contains(torch.diag(torch.tensor([0.04, -1.0])).bfloat16()))  # within the tolerance


def test_float32_float64_module_cast_keeps_the_raw_diagonal():
    """Note [Hurwitz floor of the stored dtype]: W has no floor in float32 and float64 (``_coords_floor`` 0), so a
    module cast between them re-expresses nothing: the raw tensor is cast as is and the weight moves by float32's
    rounding only (with the "softplus" spaces' floors, √ε of each dtype, every value of W would move by 3.4e-4,
    a small one many times over)."""
    lin = torch.nn.Linear(5, 5, bias=False)
    gf.nn.constrain(lin, "weight", gf.Hurwitz())
    Z = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    Z.diagonal().copy_(torch.tensor([-9.0, -3.0, 0.0, 1.0, 2.0]))  # W's values from 1.2e-4 to 2.1
    with torch.no_grad():
        lin.parametrizations.weight.original.copy_(Z)
    W32 = lin.weight.detach().double()
    lin.double()
    assert torch.equal(lin.parametrizations.weight.original.detach(), Z.double())
    torch.testing.assert_close(lin.weight.detach(), W32, rtol=1e-5, atol=1e-6 * float(W32.abs().max()))
    lin.float()
    assert torch.equal(lin.parametrizations.weight.original.detach(), Z)


def test_low_precision_from_manifold_lifts_or_names_the_floor():
    """Note [Hurwitz floor of the stored dtype]: from_manifold of a bf16 point whose certificate W = P⁻¹ has an
    eigenvalue just below the floor √ε(bf16) = 0.088 lifts it to the floor (a finite raw coordinate, the round
    trip to the bf16 rounding); one far below it, which the lift would move by more than the round trip check
    takes, is refused naming the floor and W's least eigenvalue."""
    M = gf.Hurwitz()
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    A = torch.randn(4, 4, generator=g)
    for w0, scale, lifted in ((0.08, 0.3, True), (0.01, 1.0, False)):
        W = Q @ torch.diag(torch.tensor([w0, 0.5, 1.0, 1.5])) @ Q.mT
        X = (W @ (scale * (A - A.mT)) - 0.5 * W).bfloat16()
        assert bool(M.contains(X))
        if lifted:
            Z, base = M.from_manifold(X)
            assert bool(torch.isfinite(Z).all())
            torch.testing.assert_close(M.to_manifold(Z, base).float(), X.float(), rtol=0,
                                       atol=2 ** -6 * float(X.float().abs().max()))
        else:
            # (the point named in the dtype passed: it read "dtype torch.float32", the float32 copy computed on)
            with pytest.raises(gf.ManifoldError, match=r"floor of W in torch.bfloat16.*got a tensor of shape \(4, 4\) and dtype torch.bfloat16 with least eigenvalue of W 0\.0"):
                M.from_manifold(X)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_project_is_stable_with_a_large_diagonal(dtype):
    """Note [Hurwitz margin of the stored dtype]: the rounding of the stored point scales with its diagonal,
    |X_ii| ≤ spread + m + c with m = a(Y) − tr(Y)/n + alpha, which is large where alpha and the mean of the
    diagonal are (alpha = 50, Y = −50 I + a matrix of scale 1: entries near −100, rounded by up to 0.25 in
    bf16). The margin covers that term too: every projection stable at −alpha once rounded (float64 eigenvalues)."""
    M = gf.Hurwitz(alpha=50.0)
    g = torch.Generator().manual_seed(0)
    Y = (torch.randn(500, 5, 5, generator=g) - 50.0 * torch.eye(5)).to(dtype)
    P = M.project(Y)
    assert P.dtype == dtype
    assert bool((torch.linalg.eigvals(P.double()).real.amax(-1) <= -50.0).all())


def _refused(M, X):
    """How many matrices of the batch ``X`` eager ``from_manifold`` refuses (one by one)."""
    refused = 0
    for x in X:
        try:
            M.from_manifold(x)
        except gf.ManifoldError:
            refused += 1
    return refused


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_from_manifold_accepts_what_project_retract_and_rsgd_return(dtype):
    """Note [Hurwitz certificate refined where its checks fail]: the sign iteration's certificate of an ill-conditioned
    P has a Lyapunov residual that the chart's reconstruction carries as it is, so from_manifold's round trip check
    refused points of project (float32: 12/200 of 5×5 at scale 0.3, 14/100 of 8×8 at scale 10, 7/50 of 16×16),
    retract (13/200 at scale 3) and rsgd iterates (14/300 at 5×5, 57/300 at 16×16); float64 1–10% — every one of
    them accepted by contains, and the raw tensor of a float64 certificate round-tripped them in float32. With the
    certificate refined where a check fails: none refused in float64, at most 1% in float32 (certificates of
    condition beyond the dtype's; 4 of 1360 in a sample twice this one's). This sample: 45 of 680 refused in float32
    and 10 in float64 before, none after. The accepted points round-trip within 1/64 as before, in a batch too (refined matrix by matrix)."""
    allowed = 0.0 if dtype == F64 else 0.01
    g = torch.Generator().manual_seed(0)
    total = refused = 0
    for alpha in (0.0, 0.5):
        M = gf.Hurwitz(alpha=alpha)
        for n, scale, N in ((5, 0.3, 50), (5, 3.0, 50), (8, 10.0, 25), (16, 1.0, 15)):
            Y = (scale * torch.randn(N, n, n, generator=g, dtype=F64)).to(dtype)
            X = M.project(Y)
            Xr = M.retract(M.sample((N, n, n), generator=g, dtype=dtype), Y)
            assert bool(M.contains(X).all()) and bool(M.contains(Xr).all())
            refused += _refused(M, X) + _refused(M, Xr)
            total += 2 * N
    M = gf.Hurwitz(alpha=0.5)
    for n in (5, 16):
        N = 15
        p, opt = {"W": M.sample((N, n, n), generator=g, dtype=dtype)}, gf.optim.rsgd({"W": M}, 0.05, momentum=0.9)
        state = opt.init(p)
        T = 2.0 * torch.randn(N, n, n, generator=g, dtype=dtype) + torch.eye(n, dtype=dtype)  # the constraint active
        for k in range(40):
            p, state = opt.update({"W": p["W"] - T}, state, p)
            if k % 10 == 9:
                assert bool(M.contains(p["W"]).all())
                refused += _refused(M, p["W"])
                total += N
    assert refused <= allowed * total, (refused, total)
    # a batch of the accepted ones (some refined, some not): the round trip within the check's bound
    X = M.project((3.0 * torch.randn(100, 5, 5, generator=g, dtype=F64)).to(dtype))
    keep = torch.tensor([_refused(M, x[None]) == 0 for x in X])
    Z, base = M.from_manifold(X[keep])
    rel = (M.to_manifold(Z, base) - X[keep]).abs().amax((-2, -1)) / X[keep].abs().amax((-2, -1)).clamp(min=1.0)
    assert float(rel.max()) <= 2.0**-6


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_project_of_a_matrix_is_the_same_alone_in_a_batch_and_under_vmap(dtype, alpha):
    """Note [Hurwitz project inside the chart of the stored dtype]: the certificate shift's Newton steps, aimed 5% past
    the floor, also moved matrices already there wherever another matrix of the batch was not (eager; under vmap and
    compiled the steps all run): a matrix's projection depended on its batch, by up to an ulp of the stored dtype
    (1–10 of 128 matrices, 3×3 to 5×5, differed alone, in the batch and under vmap). A matrix whose certificate meets
    the target takes no step now, so the three agree bit for bit (and the point is what the matrix alone gave)."""
    M = gf.Hurwitz(alpha=alpha)
    g = torch.Generator().manual_seed(0)
    for n, scale in ((3, 0.3), (5, 1.0), (5, 3.0)):
        Y = (scale * torch.randn(128, n, n, generator=g)).to(dtype)
        alone = torch.stack([M.project(y) for y in Y])
        assert torch.equal(M.project(Y), alone), (n, scale)
        assert torch.equal(torch.func.vmap(M.project)(Y), alone), (n, scale)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_from_manifold_under_transforms_refines_as_eager_mode(dtype):
    """Note [Hurwitz certificate refined under transforms]: under vmap, jvp and torch.compile nothing is read, and
    from_manifold returned the unrefined certificate's raw tensor: projections of 6×6 Gaussian matrices whose eager
    round trip is within 1/64 came back 0.03-0.07 (float64) and 0.1-1.5 (float32) off, silently, in 1-3 of 16. Now the
    transformed calls refine as eager mode does: the same raw tensors, the round trip within the check's bound."""
    M = gf.Hurwitz()
    g = torch.Generator().manual_seed(3)
    torch.randn(16, 6, 6, generator=g, dtype=dtype)  # (the probe's first draw: its Z)
    X = M.project(torch.randn(16, 6, 6, generator=g, dtype=dtype))
    Ze, be = M.from_manifold(X)  # eager: checked (and refined where a check fails)
    tol = {torch.float32: 1e-4, F64: 1e-10}[dtype]

    def off(Z, base):
        return ((M.to_manifold(Z, base) - X).abs().amax((-2, -1)) / X.abs().amax((-2, -1)).clamp(min=1.0)).max()

    assert off(Ze, be) <= 2.0**-6
    Zv, bv = torch.func.vmap(M.from_manifold)(X)
    (Zj, bj), _ = torch.func.jvp(M.from_manifold, (X,), (torch.ones_like(X),))
    torch._dynamo.reset()
    Zc, bc = torch.compile(M.from_manifold, fullgraph=True, backend="aot_eager")(X)
    torch._dynamo.reset()
    for Z, base in ((Zv, bv), (Zj, bj), (Zc, bc)):
        assert off(Z, base) <= 2.0**-6
        torch.testing.assert_close(Z, Ze, atol=tol, rtol=tol)
