"""bfloat16 and float16: never a silently wrong point (Note [Low precision] in spaces/_base.py).

Every map of every space computes in float32 when given a low-precision tensor and rounds the
result back, so a bf16/fp16 point is the rounding of a float32 point. Membership is asserted with
the conformance cases' own predicates (written with ``torch.linalg``, independent of the spaces'
``contains``), on the float32 copy of the low-precision point, at the per-dtype tolerance
``default_atol(dtype, size)`` that ``contains`` documents (bf16: 5e-2, fp16: 1e-2 at size 64).

Regression: constraining a module, then ``.to(torch.bfloat16)``, gave ``orthogonal`` (tall) and
``grassmannian`` an all-zero weight and no error (``torch.linalg.matrix_exp`` in bf16).
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from cases_complex import COMPLEX_CASES
from reference import member

import geofunc as gf
import geofunc.nn as gnn
from geofunc.spaces._base import default_atol

LOW = (torch.bfloat16, torch.float16)
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _tol(dtype: torch.dtype, X: torch.Tensor) -> float:
    return default_atol(dtype, max(X.shape[-2:]) if X.ndim >= 2 else X.shape[-1])


def _cases():
    # The complex cases are left out: torch has no complex bfloat16, and complex32 (complex float16)
    # is not supported by the complex spaces (Note [Complex]; they refuse it with a ManifoldError).
    for case in CASES:
        if case in COMPLEX_CASES:
            continue
        for dtype in LOW:
            yield pytest.param(case, dtype, id=f"{case.id}-{_NAMES[dtype]}")


@pytest.mark.parametrize(("case", "dtype"), list(_cases()))
def test_space_maps_in_low_precision(case, dtype, generator) -> None:
    M = case.space
    shape = case.shapes[min(3, len(case.shapes) - 1)]
    X = M.sample(shape, generator=generator, dtype=dtype)
    assert X.dtype == dtype
    assert bool(case.member(X.float(), _tol(dtype, X)).all()), "sample is off the space"
    assert bool(M.contains(X).all())

    Z = (0.5 * torch.randn(shape, generator=generator)).to(dtype).requires_grad_()
    Y = M.to_manifold(Z)
    assert Y.dtype == dtype
    assert torch.isfinite(Y).all() and Y.abs().amax() > 0, "to_manifold gave a non-finite or all-zero point"
    assert bool(case.member(Y.detach().float(), _tol(dtype, Y)).all()), "to_manifold is off the space"
    (Y.float() * torch.randn(shape, generator=generator)).sum().backward()
    assert Z.grad is not None and Z.grad.dtype == dtype and torch.isfinite(Z.grad).all()

    raw, base = M.from_manifold(X)
    X2 = M.to_manifold(raw, base)
    assert X2.dtype == dtype
    # round trip: within the rounding of the low-precision point
    torch.testing.assert_close(X2.float(), X.float(), atol=4 * _tol(dtype, X), rtol=0)

    G = torch.randn(shape, generator=generator).to(dtype)
    V = M.tangent(X, G)
    assert V.dtype == dtype and torch.isfinite(V).all()
    X3 = M.retract(X, 0.01 * V)
    assert X3.dtype == dtype
    assert bool(case.member(X3.float(), _tol(dtype, X3)).all()), "retract is off the space"
    P = M.project(torch.randn(shape, generator=generator).to(dtype))
    assert bool(case.member(P.float(), _tol(dtype, P)).all()), "project is off the space"


@pytest.mark.parametrize(("case", "dtype"), list(_cases()))
def test_space_checks_in_low_precision(case, dtype, generator) -> None:
    """The rest of the conformance checks in bf16/fp16: ``rebase`` keeps the point, ``logabsdet``
    is ``log|det|`` of the low-precision point within its rounding, and ``contains`` rejects
    points off the space by more than twice the tolerance (the independent predicate decides)."""
    M = case.space
    shape = case.shapes[min(3, len(case.shapes) - 1)]
    X = M.sample(shape, generator=generator, dtype=dtype)
    Z = (0.5 * torch.randn(shape, generator=generator)).to(dtype)
    raw, base = M.from_manifold(X)
    Z2, base2 = M.rebase(raw, base)
    assert Z2.dtype == dtype
    torch.testing.assert_close(M.to_manifold(Z2, base2).float(), X.float(), atol=4 * _tol(dtype, X), rtol=0)
    if case.has_logabsdet:
        # log|det Y| of the low-precision point Y, within its rounding: a relative change u of each
        # entry moves log|det| by at most n·u·κ(Y) to first order (κ: the condition number)
        got, Y = M.logabsdet(Z), M.to_manifold(Z).float()
        assert got.dtype == dtype
        u, n = torch.finfo(dtype).eps, Y.shape[-1]
        bound = 2 * n * u * torch.linalg.cond(Y) + 2 * u * torch.linalg.slogdet(Y)[1].abs()
        assert bool(((got.float() - torch.linalg.slogdet(Y)[1]).abs() <= bound).all())
    Y = None if case.off_manifold is None else case.off_manifold(X.float())
    if Y is not None:
        # the points the independent predicate puts off the space by more than twice the
        # tolerance (some cases perturb by less than a bf16 rounding: nothing to check there)
        off = ~case.member(Y, 2 * _tol(dtype, X))
        assert not bool(M.contains(Y.to(dtype))[off].any()), "contains accepts a point off the space"


# name, constraint call, weight shape, independent predicate on the float32 weight
def _orthonormal(W, atol):
    Wt = W if W.shape[-2] >= W.shape[-1] else W.mT
    return (Wt.mT @ Wt - torch.eye(Wt.shape[-1])).abs().amax() <= atol


def _sym_psd(W, atol, strict):
    ev = torch.linalg.eigvalsh(0.5 * (W + W.mT))
    return ((W - W.mT).abs().amax() <= atol) and (ev.min() > 0 if strict else ev.min() >= -atol)


def _rank_le(W, r, atol):
    s = torch.linalg.svdvals(W)
    return s.shape[-1] <= r or bool((s[..., r:] <= atol * s[..., :1].clamp(min=1)).all())


_CONSTRAINTS = [
    ("orthogonal-tall", lambda m: gnn.orthogonal(m, "weight"), (12, 5), _orthonormal),
    ("orthogonal-square", lambda m: gnn.orthogonal(m, "weight"), (6, 6), _orthonormal),
    ("orthogonal-wide", lambda m: gnn.orthogonal(m, "weight"), (3, 8), _orthonormal),
    ("grassmannian", lambda m: gnn.grassmannian(m, "weight"), (9, 3), _orthonormal),
    ("almost_orthogonal", lambda m: gnn.almost_orthogonal(m, "weight", lam=0.3), (7, 4),
     lambda W, a: bool(((torch.linalg.svdvals(W) - 1).abs() <= 0.3 + a).all())),
    ("invertible", lambda m: gnn.invertible(m, "weight"), (5, 5), lambda W, a: torch.linalg.slogdet(W)[0] > 0),
    ("sln", lambda m: gnn.sln(m, "weight"), (5, 5),
     lambda W, a: torch.linalg.slogdet(W)[0] > 0 and abs(float(torch.linalg.slogdet(W)[1])) <= a * float(
         torch.linalg.matrix_norm(W) * torch.linalg.matrix_norm(torch.linalg.inv(W)))),
    ("alpha_stable", lambda m: gnn.alpha_stable(m, "weight", alpha=0.1), (5, 5),
     lambda W, a: float(torch.linalg.eigvals(W).real.max()) <= -0.1 + a * float(torch.linalg.matrix_norm(W).clamp(min=1))),
    ("low_rank", lambda m: gnn.low_rank(m, "weight", rank=2), (7, 5), lambda W, a: _rank_le(W, 2, a)),
    ("fixed_rank", lambda m: gnn.fixed_rank(m, "weight", rank=2), (7, 5),
     lambda W, a: _rank_le(W, 2, a) and torch.linalg.svdvals(W)[1] > a),
    ("positive_definite", lambda m: gnn.positive_definite(m, "weight"), (5, 5), lambda W, a: _sym_psd(W, a, True)),
    ("positive_semidefinite", lambda m: gnn.positive_semidefinite(m, "weight"), (5, 5),
     lambda W, a: _sym_psd(W, a, False)),
    ("positive_semidefinite_low_rank", lambda m: gnn.positive_semidefinite_low_rank(m, "weight", rank=2), (5, 5),
     lambda W, a: _sym_psd(W, a, False) and _rank_le(W, 2, a)),
    ("positive_semidefinite_fixed_rank", lambda m: gnn.positive_semidefinite_fixed_rank(m, "weight", rank=2), (5, 5),
     lambda W, a: _sym_psd(W, a, False) and _rank_le(W, 2, a)),
    ("sphere", lambda m: gnn.sphere(m, "weight"), (4, 6),
     lambda W, a: ((torch.linalg.vector_norm(W, dim=-1) - 1).abs() <= a).all()),
    ("skew", lambda m: gnn.skew(m, "weight"), (5, 5), lambda W, a: (W + W.mT).abs().amax() <= a),
    ("symmetric", lambda m: gnn.symmetric(m, "weight"), (5, 5), lambda W, a: (W - W.mT).abs().amax() <= a),
]


def _nn_params():
    for name, fn, shape, pred in _CONSTRAINTS:
        for dtype in LOW:
            for order in ("constrain-then-cast", "cast-then-constrain"):
                yield pytest.param(fn, shape, pred, dtype, order, id=f"{name}-{_NAMES[dtype]}-{order}")


@pytest.mark.parametrize(("constrain", "shape", "pred", "dtype", "order"), list(_nn_params()))
def test_nn_constraints_train_in_low_precision(constrain, shape, pred, dtype, order) -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(shape[1], shape[0], bias=False)
    if order == "constrain-then-cast":
        constrain(m)
        m = m.to(dtype)
    else:
        m = m.to(dtype)
        constrain(m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    x = torch.randn(8, shape[1]).to(dtype)
    for _ in range(3):
        W = m.weight
        assert W.dtype == dtype
        Wf = W.detach().float()
        assert torch.isfinite(Wf).all() and Wf.abs().amax() > 0, "non-finite or all-zero weight"
        assert bool(pred(Wf, _tol(dtype, Wf))), "weight off its space"
        opt.zero_grad()
        m(x).float().pow(2).mean().backward()
        for p in m.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), "non-finite gradient"
        opt.step()
    Wf = m.weight.detach().float()
    assert bool(pred(Wf, _tol(dtype, Wf))), "weight off its space after training"


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_autocast_keeps_points_on_the_space(dtype) -> None:
    """Under ``torch.autocast`` the chart's products would run in low precision: they do not."""
    torch.manual_seed(0)
    M = gf.Stiefel()
    Z = 0.5 * torch.randn(64, 16)
    base = M.sample((64, 16))
    with torch.autocast("cpu", dtype=dtype):
        X = M.to_manifold(Z, base)
    assert X.dtype == torch.float32
    assert (X.mT @ X - torch.eye(16)).abs().amax() < 1e-5


def _real_cases():
    return [pytest.param(c, id=c.id) for c in CASES if c not in COMPLEX_CASES]


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("case", _real_cases())
def test_sample_under_autocast_is_the_sample_without(case, dtype) -> None:
    """``sample`` computes with autocast off, as every map does: under ``torch.autocast`` a float32
    ``sample`` came back in bf16/fp16 (AlmostOrthogonal, PSD, PSSD*, Hurwitz, Product: their
    products ran in low precision), ``SL``'s raised from a bf16 ``slogdet``, and a
    ``sample(dtype=bf16)`` was a bf16 computation, not the rounding of a float32 point."""
    shape = case.shapes[min(2, len(case.shapes) - 1)]
    for want in (None, torch.float32, dtype):
        ref = case.space.sample(shape, generator=torch.Generator().manual_seed(0), dtype=want)
        with torch.autocast("cpu", dtype=dtype):
            got = case.space.sample(shape, generator=torch.Generator().manual_seed(0), dtype=want)
        for r, g in zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(got)):
            assert g.dtype == r.dtype == (want or torch.float32)
            torch.testing.assert_close(g, r, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("case", _real_cases())
def test_sample_under_a_low_precision_default_dtype_is_the_sample_of_that_dtype(case, dtype) -> None:
    """``sample(shape)`` under ``torch.set_default_dtype(bf16/fp16)`` is ``sample(shape, dtype=bf16/fp16)``:
    the rounding of a float32 point. It computed in the default dtype instead, so every sampler through
    QR or LU (SO, Stiefel, the rank family, Birkhoff, ...) raised torch's "geqrf_cpu not implemented
    for 'BFloat16'", and with it every ``geofunc.nn`` one-liner whose class draws a base."""
    shape = case.shapes[min(2, len(case.shapes) - 1)]
    want = case.space.sample(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        got = case.space.sample(shape, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(prev)
    for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got), strict=True):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize(("constrain", "shape", "pred"), [pytest.param(*c[1:], id=c[0]) for c in _CONSTRAINTS])
def test_nn_constraints_register_under_a_low_precision_default_dtype(constrain, shape, pred, dtype) -> None:
    """A model built under ``torch.set_default_dtype(bf16/fp16)`` takes every one-liner (a class's base
    was drawn by a bf16 QR: NotImplementedError)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        m = torch.nn.Linear(shape[1], shape[0], bias=False)
        constrain(m)
        W = m.weight.detach()
    finally:
        torch.set_default_dtype(prev)
    assert W.dtype == dtype
    Wf = W.float()
    assert bool(pred(Wf, _tol(dtype, Wf))), "weight off its space"


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("space", [gf.Unitary(), gf.Hermitian()], ids=repr)
def test_complex_sample_under_a_low_precision_default_dtype_is_refused_by_name(space, dtype) -> None:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with pytest.raises(gf.ManifoldError, match="no complex dtype of bfloat16 or float16"):
            space.sample((3, 3))
    finally:
        torch.set_default_dtype(prev)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_autocast_training_keeps_float32_weights_on_their_spaces(dtype) -> None:
    """A constrained model trained under ``torch.autocast``: the layers' products run in ``dtype``,
    the charts in float32 (Note [Low precision]), so the float32 weights stay on their spaces at
    float32's tolerance and the loss goes down."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    gnn.orthogonal(model[0])
    gnn.positive_definite(model[2])
    gnn.low_rank(model[4], "weight", 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.dtype == dtype  # autocast did run the layers in low precision
        loss = (out.float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    W0, W2, W4 = (model[i].weight.detach() for i in (0, 2, 4))
    assert W0.dtype == torch.float32
    assert _orthonormal(W0, _tol(torch.float32, W0))
    assert _sym_psd(W2, _tol(torch.float32, W2), True)
    assert _rank_le(W4, 2, _tol(torch.float32, W4))


# ----------------------------------------------------------------------------- the PSD family's floor
# Regression: a bf16 PSD point is the rounding of a float32 point whose smallest eigenvalue is at
# least the floor √ε_bf16 ≈ 0.088 of "softplus"; membership lowered that floor by the rounding
# allowance ε√n·σ₁ (~0.25 at n = 128) and then required the eigenvalue above the allowance itself,
# so gf.PSD().to_manifold(randn(64, 64).bfloat16()) was refused by its own contains/from_manifold
# (2 of 5 seeds at 64×64, all at 128). The rank certainty is now judged with the ε of the float32
# computation (the stored bf16 matrix is exactly what its eigenvalues are computed from).


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_psd_outputs_pass_their_own_membership_at_every_size(dtype) -> None:
    M = gf.PSD()
    for n in range(2, 257):
        g = torch.Generator().manual_seed(n)
        Z = torch.randn(2, n, n, generator=g)
        Z[1].diagonal().sub_(30.0 * (torch.arange(n) % 2))  # half the eigenvalues at the floor
        X = M.to_manifold(Z.to(dtype))
        assert bool(M.contains(X).all()), f"n = {n}"
        M.from_manifold(X)  # raises off the space
        if n % 32 == 0:
            for Y in (M.sample((n, n), generator=g, dtype=dtype), M.project(torch.randn(n, n, generator=g).to(dtype))):
                assert bool(M.contains(Y)), f"n = {n}"
                M.from_manifold(Y)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("space", [gf.PSD(), gf.PSSDFixedRank(rank=3), gf.FixedRank(rank=3), gf.GLp(), gf.SL()], ids=repr)
def test_open_rank_spaces_accept_their_outputs_at_large_sizes(space, dtype) -> None:
    for n in (48, 96, 160, 256):
        g = torch.Generator().manual_seed(n)
        Z = 2.0 * torch.randn(n, n, generator=g)
        Z.diagonal()[::2] = -30.0  # values at the floor, next to large ones
        for X in (space.to_manifold(Z.to(dtype)), space.sample((n, n), generator=g, dtype=dtype)):
            assert bool(space.contains(X)), f"n = {n}"
            space.from_manifold(X)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_psd_rejects_clearly_indefinite_low_precision_matrices(dtype) -> None:
    for n in (2, 8, 64, 256):
        g = torch.Generator().manual_seed(n)
        Q = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
        for neg in (-0.5, -0.05, -0.01):
            lam = torch.linspace(0.2, 2.0, n)
            lam[0] = neg * 2.0  # an eigenvalue of −0.5σ₁ (and smaller ones)
            X = ((Q * lam) @ Q.mT).to(dtype)
            assert not bool(gf.PSD().contains(X)), (n, neg)
            with pytest.raises(gf.ManifoldError):
                gf.PSD().from_manifold(X)
            m = torch.nn.Linear(n, n, bias=False).to(dtype)
            gnn.positive_definite(m, "weight")
            with pytest.raises(gnn.InManifoldError):
                m.weight = X


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("n", [16, 64, 128, 256])
def test_positive_definite_module_accepts_its_own_weight(n, dtype) -> None:
    """The module path: the weight (also with eigenvalues at the floor) is on the space, GeoTorch's
    ``in_manifold`` accepts it (its lower bound is not widened above the floor), and assigning it
    back works."""
    torch.manual_seed(n)
    m = torch.nn.Linear(n, n, bias=False).to(dtype)
    gnn.positive_definite(m, "weight")
    M = m.parametrizations.weight[0]
    for floor in (False, True):
        if floor:
            with torch.no_grad():
                m.parametrizations.weight.original.diagonal()[::2] = -30.0
        W = m.weight.detach()
        assert bool(gf.PSD().contains(W)) and M.in_manifold(W)
        m.weight = W
        assert bool(gf.PSD().contains(m.weight.detach()))


def _concurrently(other, main, steps: int = 60) -> list:
    """``main()`` ``steps`` times while another thread runs ``other()`` in a loop; ``main``'s results."""
    import threading

    stop = threading.Event()
    errors: list = []

    def loop() -> None:
        try:
            while not stop.is_set():
                other()
        except Exception as e:  # pragma: no cover (reported below)
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        out = [main() for _ in range(steps)]
    finally:
        stop.set()
        t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    return out


@pytest.mark.parametrize(
    ("space", "shape"),
    [(gf.GLp(), (16, 6, 6)), (gf.SL(), (16, 5, 5)), (gf.PSD(), (16, 6, 6)), (gf.FixedRank(rank=2), (16, 7, 5))],
    ids=["GLp", "SL", "PSD", "FixedRank"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "fp16"])
def test_the_rounding_dtype_is_per_thread(space, shape, dtype) -> None:
    # Raw values whose chart values sit near the floor, so that a floor of another dtype moves the point
    # (bf16's 0.088 against float32's 3.5e-4 and fp16's 0.031).
    gen = torch.Generator().manual_seed(0)
    Z = (torch.randn(shape, generator=gen, dtype=torch.float32) - 6.0).to(dtype)
    Zb = Z.to(torch.bfloat16)
    X_ref = space.to_manifold(Z)
    Y = torch.randn(shape, generator=gen).to(dtype)
    P_ref = space.project(Y)
    assert not torch.equal(X_ref.float(), space.to_manifold(Zb).float()), "the floors must differ here"

    def other() -> None:  # another thread, inside bf16 calls (as nn.DataParallel's replicas run forward)
        space.to_manifold(Zb)
        space.project(Y.to(torch.bfloat16))

    outs = _concurrently(other, lambda: (space.to_manifold(Z), space.project(Y)))
    for X, P in outs:
        assert torch.equal(X, X_ref), f"to_manifold moved by {(X.float() - X_ref.float()).abs().max():.3g}"
        assert torch.equal(P, P_ref), f"project moved by {(P.float() - P_ref.float()).abs().max():.3g}"


@pytest.mark.parametrize("space", [gf.Stiefel(), gf.Stiefel(metric="canonical"), gf.Grassmannian()], ids=repr)
@pytest.mark.parametrize("shape", [(6, 3), (3, 6)], ids=str)
def test_float16_tall_charts_refine_their_rounded_bases(space, shape) -> None:
    """An fp16 call computes from the fp16-rounded base, which the tall chart's φ(W) B amplified 3–5×:
    at raw entries of ~100, about 1% of fp16 points came back finite and off their space (Note [Bases
    stored in low precision]). 640 points at that scale: every finite one is on its space (the independent
    predicate of tests/reference.py)."""
    g = torch.Generator().manual_seed(5)
    off = 0
    for _ in range(10):
        X = space.sample((64, *shape), generator=g)
        _, base = space.from_manifold(X)
        Y = space.to_manifold((100.0 * torch.randn((64, *shape), generator=g)).half(), base.half())
        finite = torch.isfinite(Y).flatten(-2).all(-1)
        # the independent predicate, at fp16's documented tolerance, on the finite points
        off += sum(not member(space, y.float(), _tol(torch.float16, y)) for y in Y[finite])
    assert off == 0, off


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_a_product_keeps_each_factor_in_its_own_dtype(dtype) -> None:
    """Regression (Note [A product of several dtypes]): a Product whose first factor was bf16/fp16
    rounded every other factor's float32 result to that dtype (to_manifold, tangent, retract,
    project, egrad_to_rgrad, transport, expmap), while the same factors in the other order kept
    their dtypes: each factor's map now applies the policy to its own part."""
    P = gf.Product(gf.Sphere(), gf.Stiefel())
    g = torch.Generator().manual_seed(0)
    X = (P.factors[0].sample((5,), generator=g, dtype=dtype), P.factors[1].sample((6, 3), generator=g))
    Z = ((0.5 * torch.randn(5, generator=g)).to(dtype), 0.5 * torch.randn(6, 3, generator=g))
    G = (torch.randn(5, generator=g).to(dtype), torch.randn(6, 3, generator=g))
    V = P.tangent(X, G)
    results = {
        "to_manifold": P.to_manifold(Z),
        "to_manifold(from_manifold)": P.to_manifold(*P.from_manifold(X)),
        "tangent": V,
        "retract": P.retract(X, V),
        "project": P.project(G),
        "egrad_to_rgrad": P.egrad_to_rgrad(X, G),
        "transport": P.transport(X, X, V),
        "expmap": P.expmap(X, V),
    }
    for name, (a, b) in results.items():
        assert (a.dtype, b.dtype) == (dtype, torch.float32), name
    for name in ("to_manifold", "retract", "project"):
        a, b = results[name]
        assert member(P.factors[0], a.float(), _tol(dtype, a)), name
        assert member(P.factors[1], b, _tol(torch.float32, b)), name
    # the float32 factor is the float32 map's value, not its rounding
    torch.testing.assert_close(results["retract"][1], P.factors[1].retract(X[1], V[1]), atol=0, rtol=0)
    Q = gf.Product(gf.SO(), gf.GLp())
    W = ((0.5 * torch.randn(4, 4, generator=g)).to(dtype), torch.randn(3, 3, generator=g))
    got = Q.logabsdet(W)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, Q.factors[0].logabsdet(W[0]).float() + Q.factors[1].logabsdet(W[1]))
    # a factor that is itself a Product keeps its float32 factors too
    N = gf.Product(gf.Sphere(), gf.Product(gf.Stiefel(), gf.SO()))
    Y = N.to_manifold((Z[0], (Z[1], torch.randn(3, 3, generator=g))))
    assert (Y[0].dtype, Y[1][0].dtype, Y[1][1].dtype) == (dtype, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("space", [gf.PSD(), gf.SO(), gf.SL(), gf.Stiefel(), gf.LowRank(rank=2)], ids=repr)
def test_torch_func_grad_inside_autocast_differentiates_the_charts_as_they_ran(space, dtype) -> None:
    """Regression (Note [The private backward under autocast] in geofunc/_fused.py): ``grad(loss)(Z)``
    called inside an autocast region ran the chart's backward with autocast on, though its forward
    ran with autocast off: a bf16 gradient of the chart (~1% off), and in fp16 NaN for the eigh/expm
    charts (PSD, SO, SL) from raw entries of scale 5. It now equals the recommended pattern, autocast
    inside the differentiated function (its backward outside the region), for a single space and
    for the pytree ``gf.to_manifold``."""
    from torch.func import grad

    g = torch.Generator().manual_seed(0)
    shape = (6, 4) if space in (gf.Stiefel(), gf.LowRank(rank=2)) else (5, 5)
    Z = 5 * torch.randn(shape, generator=g)
    W, C = torch.randn(shape[-1], 3, generator=g), torch.randn(shape[0], 3, generator=g)
    bias = torch.randn(3, generator=g)

    def loss(z):
        return ((space.to_manifold(z) @ W).float() * C).sum()

    def tree_loss(raw):
        p = gf.to_manifold({"w": space}, raw)
        return (((p["w"] @ W).float() + p["b"]) * C).sum()

    for f, arg in ((loss, Z), (tree_loss, {"w": Z, "b": bias})):
        def inside(a, f=f):
            with torch.autocast("cpu", dtype=dtype):
                return f(a)

        want = grad(inside)(arg)
        with torch.autocast("cpu", dtype=dtype):
            got = grad(f)(arg)
        for w, v in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), "non-finite gradient"
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("mode", ["bf16", "fp16", "autocast"])
@pytest.mark.parametrize("case", _real_cases())
def test_tensors_given_by_keyword_take_the_policy(case, mode) -> None:
    """Regression (Note [Tensors given by keyword] in spaces/_base.py): the policy found its lead
    among the positional arguments only, so ``M.to_manifold(Z=z)`` of a bf16 ``z`` computed in bf16
    (NaN points for SO, Stiefel, PSD, GLp), and under autocast a float32 ``z`` given so came back
    bf16 (Stiefel raised a KeyError, Birkhoff's egrad_to_rgrad a dtype error from linalg.solve).
    Every map called by keyword equals the positional call."""
    import inspect

    M = case.space
    shape = case.shapes[min(3, len(case.shapes) - 1)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "autocast": torch.float32}[mode]
    g = torch.Generator().manual_seed(0)
    leaves = torch.utils._pytree.tree_map
    X = M.sample(shape, generator=g, dtype=dtype)
    Z = leaves(lambda x: (0.5 * torch.randn(x.shape, generator=g)).to(dtype), X)
    G = leaves(lambda x: torch.randn(x.shape, generator=g).to(dtype), X)
    V = M.tangent(X, G)
    calls = {"to_manifold": (Z,), "tangent": (X, G), "retract": (X, V), "project": (G,), "egrad_to_rgrad": (X, G),
             "transport": (X, X, V), "inner": (X, V, V), "rebase": M.from_manifold(X)}
    if case.has_logabsdet:
        calls["logabsdet"] = (Z,)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        for name, args in calls.items():
            fn = getattr(M, name)
            names = list(inspect.signature(fn).parameters)[: len(args)]
            want, got = fn(*args), fn(**dict(zip(names, args)))
            for w, v in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
                if isinstance(w, torch.Tensor):
                    assert v.dtype == w.dtype, name
                    torch.testing.assert_close(v, w, atol=0, rtol=0, equal_nan=False, msg=name)
            if name == "to_manifold":
                assert all(bool(torch.isfinite(v).all()) and v.dtype == dtype for v in torch.utils._pytree.tree_leaves(got))


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
def test_hyperbolic_functions_given_tensors_by_keyword_compute_in_float32(dtype) -> None:
    """``geofunc.hyperbolic.dist(x=x, y=y)`` of low-precision points near the rim computed in that
    dtype (fp16: inf, and logmap NaN) where the positional call, computed in float32, is finite."""
    import geofunc.hyperbolic as H

    x, y = torch.tensor([[0.999, 0.0]]).to(dtype), torch.tensor([[-0.999, 0.0]]).to(dtype)
    for fn in (H.dist, H.logmap):
        want, got = fn(x, y), fn(x=x, y=y)
        assert torch.isfinite(got).all() and got.dtype == dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=_NAMES.get)
@pytest.mark.parametrize("space", [gf.PSD(), gf.SO(), gf.SL(), gf.LowRank(rank=2), gf.PSSDLowRank(rank=2)], ids=repr)
def test_backward_inside_autocast_is_finite(space, dtype) -> None:
    """Regression (Note [Backward formulas under autocast] in geofunc/_fastpath.py): ``loss.backward()``
    called inside a float16 autocast region ran the matrix exponential's adjoint and the rank charts'
    backward in float16, though their forward ran in float32: NaN gradients for PSD, SL, LowRank and
    PSSDLowRank from raw entries of scale 5. The gradient is now finite and within the low-precision
    rounding (torch's own backward formulas between them) of the one taken after the region."""
    g = torch.Generator().manual_seed(0)
    shape = (6, 4) if isinstance(space, gf.LowRank) else (5, 5)
    Z = 5 * torch.randn(shape, generator=g)
    W, C = torch.randn(shape[1], 3, generator=g), torch.randn(shape[0], 3, generator=g)
    grads = []
    for inside in (True, False):
        z = Z.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = ((space.to_manifold(z) @ W).float() * C).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append(z.grad)
    got, want = grads
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), "non-finite gradient"
    torch.testing.assert_close(got, want, atol=(5e-2 if dtype == torch.bfloat16 else 1e-2) * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize(("space", "shape"), [(gf.Stiefel(), (5, 3)), (gf.Sphere(), (4,)), (gf.SO(), (3, 3))], ids=repr)
def test_arguments_of_another_dtype_are_cast_as_autocast_casts_them(space, shape) -> None:
    """Regression (Note [Arguments of another dtype] in spaces/_base.py). Under autocast a map is an
    op of autocast's float32 list: a bf16 vector beside a float32 point is computed in float32, the
    value of the same call given its float32 copy, in float32. Outside autocast a float32 point
    refuses it, and two things were wrong: beside a float64 point under autocast the refusal named
    the vector's float32 copy ('dtype torch.float32'), not the bf16 tensor given; and outside
    autocast a bf16 point took an fp16 vector silently, where it takes its own dtype or float32."""
    g = torch.Generator().manual_seed(0)
    X = space.sample(shape, generator=g)
    V = space.tangent(X, torch.randn(shape, generator=g))
    Y = space.retract(X, 0.3 * V)
    Vb = V.bfloat16()
    calls = {
        "retract": lambda v: space.retract(X, v),
        "tangent": lambda v: space.tangent(X, v),
        "egrad_to_rgrad": lambda v: space.egrad_to_rgrad(X, v),
        "transport": lambda v: space.transport(X, Y, v),
        "inner": lambda v: space.inner(X, v, v),
    }
    for name, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(Vb)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, call(Vb.float()), rtol=1e-6, atol=1e-6, msg=name)
        with pytest.raises(gf.ManifoldError, match=r"of the dtype of `X` \(torch\.float32\).*torch\.bfloat16"):
            call(Vb)
    X64, V64 = X.double(), V.double()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(gf.ManifoldError, match=r"dtype torch\.bfloat16"):
        space.retract(X64, V64.bfloat16())
    with pytest.raises(gf.ManifoldError, match=r"torch\.float32 or torch\.bfloat16\), got .*torch\.float16"):
        space.retract(X.bfloat16(), V.half())
    assert space.retract(X.bfloat16(), V).dtype == torch.bfloat16  # a float32 step: taken, rounded back


def test_hyperbolic_functions_keep_the_dtype_of_their_point() -> None:
    """Regression (Note [Hyperbolic functions in low precision] in geofunc/hyperbolic.py): any bf16/fp16
    argument set the rounding dtype, so a float32 point beside a bf16 coefficient or matrix came back
    bf16 (mobius_scalar_mul(r, x), mobius_matvec(M, x)), and mobius_add(x, y) of a float32 x and a bf16 y
    gave a bf16 point where a float64 x refuses a float32 y; a float64 r gave a float64 result, and a
    complex or meta r raised torch's errors. The point x now sets the dtype; other arguments follow the
    spaces' rule (Note [Arguments of another dtype]); r is a real coefficient taken in x's dtype."""
    H = gf.hyperbolic
    x = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    r = torch.tensor([2.0, 3.0])
    ref = H.mobius_scalar_mul(r, x)
    for rr in (r.bfloat16(), r.double(), torch.tensor([2, 3])):
        got = H.mobius_scalar_mul(rr, x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert H.mobius_scalar_mul(r, x.bfloat16()).dtype == torch.bfloat16  # a float32 r beside a bf16 x, as before
    assert H.mobius_scalar_mul(r.double(), x.bfloat16()).dtype == torch.bfloat16
    for bad in (torch.tensor([2j, 3j]), torch.tensor([2.0, 3.0], device="meta")):
        with pytest.raises(gf.ManifoldError, match=r"mobius_scalar_mul: expected `r` to be a real tensor on the device"):
            H.mobius_scalar_mul(bad, x)
    with pytest.raises(gf.ManifoldError, match=r"mobius_add: expected `y` of the dtype and device of `x` \(torch\.float32;"):
        H.mobius_add(x, x.bfloat16())
    with pytest.raises(gf.ManifoldError, match=r"mobius_matvec: expected `M` of the dtype and device of `x` \(torch\.float32;"):
        H.mobius_matvec(torch.eye(2).bfloat16(), x)
    with pytest.raises(gf.ManifoldError, match=r"expected `y` of the dtype and device of `x` \(torch\.bfloat16, computed "
                                               r"in torch\.float32: .*got .*torch\.float16"):
        H.mobius_add(x.bfloat16(), x.half())
    assert H.mobius_add(x.bfloat16(), x).dtype == torch.bfloat16  # a float32 y beside a bf16 x, as the spaces take it
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the bf16 argument (its float32 list)
        got = H.mobius_add(x, x.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, H.mobius_add(x, x.bfloat16().float()), atol=0, rtol=0)


def test_hyperbolic_functions_compile_in_one_graph_under_autocast() -> None:
    """Regression: geofunc.hyperbolic's public functions turned autocast off with an ExitStack of
    torch.autocast contexts, which Dynamo cannot trace ('setattr() is not supported on type autocast'),
    so under torch.autocast torch.compile(fullgraph=True) of any of them raised (a hyperbolic layer in a
    bf16 mixed-precision model), while the spaces' maps compiled. The compiled functions give the eager
    values in the point's dtype (bf16 arguments beside a float32 point cast, as eagerly; a bf16 point
    computed in float32 and rounded back)."""
    H = gf.hyperbolic
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(5, 3, generator=g)
    y = 0.3 * torch.randn(5, 3, generator=g)
    M = torch.randn(4, 3, generator=g)
    r = torch.rand(5, generator=g)
    f32, bf16 = torch.float32, torch.bfloat16
    calls = [(H.mobius_add, (x, y), f32), (H.mobius_add, (x, y.bfloat16()), f32), (H.mobius_matvec, (M, x), f32),
             (H.mobius_scalar_mul, (r, x), f32), (H.dist, (x, y), f32), (H.expmap0, (y,), f32), (H.logmap, (x, y), f32),
             (H.mobius_add, (x.bfloat16(), y.bfloat16()), bf16)]
    torch._dynamo.reset()
    try:
        for fn, args, dtype in calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want = fn(*args)
                got = torch.compile(fn, fullgraph=True, backend="eager")(*args)
            assert got.dtype == want.dtype == dtype, fn.__name__  # the point's
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=fn.__name__)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", LOW, ids=[_NAMES[d] for d in LOW])
def test_sl_retract_gives_nan_not_a_rounded_matrix_off_sl(dtype) -> None:
    """``SL.retract`` promises NaN, never a finite matrix off SL, where the exact point is beyond what the
    dtype represents. Its guard judged the float32 result of a bf16/fp16 call, which is on SL, while its
    rounding was not: tangent steps of scale 2 on 5×5 points gave 17% (bf16) / 5% (fp16) finite matrices
    with det ≤ 0 (Note [SL's guard judges the stored point]). Judged in float64 on the stored point."""
    M = gf.SL()
    g = torch.Generator().manual_seed(0)
    X = M.sample((500, 5, 5), generator=g, dtype=dtype)
    V = M.tangent(X, (2.0 * torch.randn(500, 5, 5, generator=g)).to(dtype))
    R = M.retract(X, V)
    assert R.dtype == dtype
    finite = torch.isfinite(R).all(-1).all(-1)
    assert bool(finite.float().mean() > 0.5)  # most steps are representable: NaN only where they are not
    sign = torch.linalg.slogdet(R[finite].double())[0]
    assert bool((sign > 0).all()), "a finite retraction with det ≤ 0"
    assert bool(M.contains(R[finite]).all())
