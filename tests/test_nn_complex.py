"""geofunc.nn's GeoTorch API on complex weights (Note [Complex weights] in ``geofunc/nn/_manifolds.py``).

Regression: ``gf.nn.orthogonal`` / ``grassmannian`` on a complex square weight raised a
ManifoldError from ``SO`` (the default sampler drew a real SO(n) point), and ``positive_definite``
/ ``positive_semidefinite`` raised InManifoldError (the Wishart sampler built ``WWᵀ``, not
Hermitian, and the membership tests compared with ``Xᵀ``); the real-only classes failed with
torch's "``right_inverse`` may not change the dtype".

Checked, with membership predicates written here with ``torch.linalg`` (``XᴴX = I``, Hermitian
with eigenvalues ≥ 0 or > 0, unit rows): every constraint function whose pure space takes complex
tensors starts on its space, trains and takes assignments; the square Haar sample is Haar on U(n)
(moments that a real or a det-one sample would fail); real-only classes refuse a complex weight
with a ManifoldError naming the tensor and the space, leaving the module unchanged; real weights
still take GeoTorch's SO sampler with the same random draws.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn

import geofunc as gf
import geofunc.nn as gnn

# torch warns on every complex module conversion (``M.to(complex dtype)`` in the constraint functions).

COMPLEX = [torch.complex64, torch.complex128]
TOL = {torch.complex64: 1e-5, torch.complex128: 1e-12}


def _unitary_frame_error(W: torch.Tensor) -> float:
    """``max |XᴴX − I|`` for the columns (rows if wide) of ``W``."""
    Wt = W if W.shape[-2] >= W.shape[-1] else W.mH
    eye = torch.eye(Wt.shape[-1], dtype=W.dtype)
    return float((Wt.mH @ Wt - eye).abs().max())


def _hermitian_psd_error(W: torch.Tensor, strict: bool) -> float:
    """``max |X − Xᴴ|`` and how far the least eigenvalue is below 0 (at or below 0 if ``strict``)."""
    lam = torch.linalg.eigvalsh(0.5 * (W + W.mH))
    below = float((-lam.min()).clamp(min=0))
    if strict and float(lam.min()) <= 0:
        below = max(below, 1.0)
    return max(float((W - W.mH).abs().max()), below)


def _sphere_error(W: torch.Tensor) -> float:
    return float((torch.linalg.vector_norm(W, dim=-1) - 1).abs().max())


# name, constraint, Linear (in, out), independent error measure of the weight
CASES = [
    ("orthogonal-square", gnn.orthogonal, (4, 4), _unitary_frame_error),
    ("orthogonal-tall", gnn.orthogonal, (3, 5), _unitary_frame_error),
    ("orthogonal-wide", gnn.orthogonal, (5, 3), _unitary_frame_error),
    ("orthogonal-square-cayley", lambda m: gnn.orthogonal(m, triv="cayley"), (4, 4), _unitary_frame_error),
    ("grassmannian-square", gnn.grassmannian, (3, 3), _unitary_frame_error),
    ("grassmannian-wide", gnn.grassmannian, (6, 2), _unitary_frame_error),
    ("positive_definite", gnn.positive_definite, (4, 4), lambda W: _hermitian_psd_error(W, strict=True)),
    ("positive_semidefinite", gnn.positive_semidefinite, (4, 4), lambda W: _hermitian_psd_error(W, strict=False)),
    ("sphere", gnn.sphere, (5, 3), _sphere_error),
]


@pytest.mark.parametrize("space, real", [(gf.Unitary(), "SO"), (gf.Hermitian(), "Sym")],
                         ids=lambda x: x if isinstance(x, str) else type(x).__name__)
def test_complex_only_spaces_on_a_real_weight_name_the_cause(space, real):
    """The message said "expected an initial point of ... dtype torch.float32, got ... complex64" (the sample's dtype),
    though no initial point was given."""
    m = nn.Linear(4, 4, bias=False)
    before = m.weight.detach().clone()
    with pytest.raises(gf.ManifoldError, match=rf"Linear\.weight .*complex dtype.*got dtype torch\.float32: "
                                               rf"{type(space).__name__} takes complex tensors only.*{real}"):
        gnn.constrain(m, "weight", space)
    assert not P.is_parametrized(m)
    assert torch.equal(m.weight, before)


def test_a_users_complex_only_space_is_not_given_a_real_counterpart():
    """The refusal named Sym as the real space of any complex-only space but Unitary (a user's own one too)."""

    class MyUnitary(gf.Unitary):
        pass

    with pytest.raises(gf.ManifoldError, match=r"MyUnitary takes complex tensors only \(make the module complex, "
                                               r"e\.g\. dtype=torch\.complex64\)\.$"):
        gnn.constrain(nn.Linear(4, 4, bias=False), "weight", MyUnitary())


@pytest.mark.parametrize("dtype", COMPLEX, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_complex_weights_start_train_and_assign_on_the_space(case, dtype):
    _, fn, (i, o), err = case
    torch.manual_seed(0)
    m = nn.Linear(i, o, bias=False, dtype=dtype)
    fn(m)
    W = m.weight.detach()
    assert W.dtype == dtype and m.parametrizations.weight.original.dtype == dtype
    assert err(W) < TOL[dtype], err(W)
    assert float(W.imag.abs().max()) > 0.1  # a complex point, not a real one cast
    M = m.parametrizations.weight[0]
    assert M.in_manifold(W)
    # a few optimizer steps, a re-centring and an assignment keep it on the space
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = torch.randn(8, i, dtype=dtype)
    target = torch.randn(8, o, dtype=dtype)
    for _ in range(3):
        loss = (m(x) - target).abs().pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gnn.update_base(m, "weight")
    assert err(m.weight.detach()) < 10 * TOL[dtype]
    V = m.weight.detach().clone()
    m.weight = V
    torch.testing.assert_close(m.weight.detach(), V, atol=10 * TOL[dtype], rtol=0)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a class itself
@pytest.mark.parametrize("dtype", COMPLEX, ids=str)
def test_complex_factorized_and_torus_samples(dtype):
    """``PSD.sample(factorized=True)``: real eigenvalues, a unitary ``Q``; ``Stiefel.sample("torus")``
    of a complex class: the real block rotation, unitary."""
    torch.manual_seed(0)
    L, Q = gnn.PSD((4, 4)).to(dtype).sample(factorized=True)
    assert not L.is_complex() and L.dtype == dtype.to_real() and Q.dtype == dtype
    assert bool((L > 0).all())
    assert _unitary_frame_error(Q) < TOL[dtype]
    M = gnn.Stiefel((5, 5)).to(dtype)
    T = M.sample("torus")
    assert T.dtype == dtype and _unitary_frame_error(T) < TOL[dtype] and M.in_manifold(T)
    m = nn.Linear(5, 5, bias=False, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(T)
    P.register_parametrization(m, "weight", M)
    torch.testing.assert_close(m.weight.detach(), T, atol=10 * TOL[dtype], rtol=0)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a class itself
@pytest.mark.parametrize("cls", [gnn.Stiefel, gnn.Grassmannian], ids=lambda c: c.__name__)
def test_complex_square_sample_is_haar_on_the_unitary_group(cls):
    """Haar on U(n): ``E|X_ij|² = 1/n``, ``E X_ij² = 0`` and ``E det X = 0`` (the determinant's phase is
    uniform). A real O(n)/SO(n) sample cast to complex has ``E X_ij² = 1/n``; a det-one one ``E det = 1``.
    z-tests on N = 4000 matrices (false alarm < 1e-6 per statistic at 5 standard deviations)."""
    torch.manual_seed(0)
    N, n = 4000, 3
    X = cls((N, n, n)).to(torch.complex128).sample()
    assert _unitary_frame_error(X) < 1e-12
    z = 5.0 / math.sqrt(N)
    abs2 = X.abs().pow(2)  # each entry: Beta(1, n-1), sd sqrt((n-1)/(n²(n+1)))
    sd = math.sqrt((n - 1) / (n * n * (n + 1)))
    assert float((abs2.mean(0) - 1.0 / n).abs().max()) < z * sd
    sq = X.pow(2).mean(0)  # E X² = 0, |X²| ≤ 1
    assert float(sq.abs().max()) < z * math.sqrt(2.0) * math.sqrt(1.0 / n)
    det = torch.linalg.det(X)  # |det| = 1, uniform phase
    torch.testing.assert_close(det.abs(), torch.ones(N, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(det.mean().abs()) < z


def test_real_square_sample_is_still_geotorchs_so():
    """Real weights: the same draws as ``gf.SO().sample`` from the same global seed (det +1, as GeoTorch)."""
    for dtype in (torch.float32, torch.float64):
        M = gnn.Stiefel((2, 4, 4)).to(dtype)
        torch.manual_seed(3)
        X = M.sample()
        torch.manual_seed(3)
        Y = gf.SO().sample((2, 4, 4), dtype=dtype)
        assert torch.equal(X, Y)
        torch.manual_seed(3)
        m = gnn.orthogonal(nn.Linear(4, 4, bias=False, dtype=dtype))
        assert bool((torch.linalg.det(m.weight.detach()) > 0).all())


# name, constraint, Linear (in, out), the real space's name in the message
REAL_ONLY = [
    ("symmetric", gnn.symmetric, (4, 4), "Sym"),
    ("skew", gnn.skew, (4, 4), "Skew"),
    ("sphere-embedded", lambda m: gnn.sphere(m, embedded=True), (5, 3), "SphereEmbedded"),
    ("almost_orthogonal-square", lambda m: gnn.almost_orthogonal(m, lam=0.5), (4, 4), "AlmostOrthogonal"),
    ("almost_orthogonal-tall", lambda m: gnn.almost_orthogonal(m, lam=0.5), (3, 5), "AlmostOrthogonal"),
    ("low_rank", lambda m: gnn.low_rank(m, "weight", 2), (4, 5), "LowRank"),
    ("fixed_rank", lambda m: gnn.fixed_rank(m, "weight", 2), (5, 4), "FixedRank"),
    ("invertible", gnn.invertible, (4, 4), "GLp"),
    ("sln", gnn.sln, (4, 4), "SL"),
    ("positive_semidefinite_low_rank", lambda m: gnn.positive_semidefinite_low_rank(m, "weight", 2), (4, 4), "PSSDLowRank"),
    ("positive_semidefinite_fixed_rank", lambda m: gnn.positive_semidefinite_fixed_rank(m, "weight", 2), (4, 4), "PSSDFixedRank"),
    ("alpha_stable", gnn.alpha_stable, (4, 4), "Hurwitz"),
]


@pytest.mark.parametrize("case", REAL_ONLY, ids=lambda c: c[0])
def test_real_only_constraints_refuse_complex_weights(case):
    _, fn, (i, o), name = case
    m = nn.Linear(i, o, bias=False, dtype=torch.complex64)
    before = m.weight.detach().clone()
    with pytest.raises(gf.ManifoldError, match=rf"Linear\.weight constrained to {name}\(.*{name} is a real space"):
        fn(m)
    assert not P.is_parametrized(m)
    assert torch.equal(m.weight, before)


@pytest.mark.parametrize("M", [gnn.LowRank((4, 4), 2), gnn.SO((4, 4)), gnn.GLp((4, 4)), gnn.Skew((4, 4)), gnn.Symmetric()],
                         ids=lambda M: type(M).__name__)
def test_real_only_classes_refuse_a_complex_assignment(M):
    """Registered directly, or assigned a complex point: an InManifoldError that names the real space."""
    name = type(M.space).__name__
    m = nn.Linear(4, 4, bias=False, dtype=torch.complex64)
    with pytest.raises(gnn.InManifoldError, match=rf"{name} is a real space"):
        P.register_parametrization(m, "weight", M)
    assert not P.is_parametrized(m)
    with pytest.raises(gnn.InManifoldError, match=rf"{name} is a real space"):
        M.right_inverse(torch.eye(4, dtype=torch.complex128))


# Note [Complex and real dtypes of a constrained module]: a complex constrained module cast to a real
# dtype got another real point, silently (0.76 from W, 0.34 from Re W, for a complex64 orthogonal 4x4);
# a real-only space cast to complex raised torch's NotImplementedError at the next read.
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a module itself
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_a_complex_constrained_module_refuses_a_real_dtype(case):
    _, fn, (i, o), _ = case
    torch.manual_seed(0)
    m = nn.Linear(i, o, dtype=torch.complex64)
    fn(m)
    W, Z = m.weight.detach().clone(), m.parametrizations.weight.original.detach().clone()
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .*keeps it complex"):
        m.to(torch.float32)
    assert m.parametrizations.weight.original.dtype == torch.complex64 and m.bias.dtype == torch.complex64
    assert torch.equal(m.parametrizations.weight.original.detach(), Z)
    assert torch.equal(m.weight.detach(), W)
    real = nn.Linear(i, o)
    fn(real)
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .*of a real dtype"):
        real.load_state_dict(m.state_dict())


@pytest.mark.parametrize("constrain", [lambda m: gnn.constrain(m, "weight", gf.SO()), gnn.invertible, gnn.skew],
                         ids=["SO", "GLp", "Skew"])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a module itself
def test_a_real_only_constrained_module_refuses_a_complex_dtype(constrain):
    m = nn.Linear(4, 4)
    constrain(m)
    W = m.weight.detach().clone()
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight constrained to .* is a real space"):
        m.to(torch.complex64)
    assert m.parametrizations.weight.original.dtype == torch.float32
    assert torch.equal(m.weight.detach(), W)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a module itself
def test_a_real_point_becomes_the_same_complex_point(case):
    _, fn, (i, o), err = case
    torch.manual_seed(0)
    m = nn.Linear(i, o, bias=False, dtype=torch.float64)
    fn(m)
    W = m.weight.detach().clone()
    m.to(torch.complex128)
    assert m.weight.dtype == torch.complex128
    torch.testing.assert_close(m.weight.detach(), W.to(torch.complex128), atol=1e-12, rtol=0)
    assert err(m.weight.detach()) < TOL[torch.complex128]


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a module itself
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
def test_a_refused_dtype_move_inside_a_parent_names_what_was_left_unconverted():
    """Inside a parent, torch converts the children before the constrained one: the message said "Nothing was
    converted" while the parent's first layer had already become float32."""
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64), nn.Linear(4, 4, dtype=torch.complex64))
    gnn.orthogonal(s[1], "weight")
    W = s[1].weight.detach().clone()
    with pytest.raises(gf.ManifoldError, match=r"Nothing of this module was converted \(modules a parent converted"):
        s.to(torch.float32)
    assert s[0].weight.dtype == torch.float32  # torch's, before the constrained child
    assert s[1].parametrizations.weight.original.dtype == torch.complex64 and torch.equal(s[1].weight.detach(), W)
