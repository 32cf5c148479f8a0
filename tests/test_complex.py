"""Complex tensors (DESIGN.md §6.3, Note [Complex] in ``geofunc/spaces/_base.py``).

A space that does not declare ``accepts_complex`` refuses complex input in every map with a
``ManifoldError`` naming the space and the dtype; torch's gradient convention for a real loss
of a complex tensor makes the embedded defaults (``egrad_to_rgrad``, ``transport``, ``inner``)
right for the spaces that accept them.
"""

from __future__ import annotations

import re

import optree
import pytest
import torch
from cases import CASES
from reference import member

import geofunc as gf
from geofunc import ManifoldError

# ------------------------------------------------------------------------------------------------
# Refusal: every real space of the conformance list, every map.

# every case but the test adapter of Product (points that are columns of one tensor): Product
# delegates its checks to its factors (test_product_of_real_spaces_refuses_complex)
_REAL_CASES = [c for c in CASES if not c.space.accepts_complex and type(c.space).__module__.startswith("geofunc")]
_MAPS = ("to_manifold", "from_manifold", "rebase", "tangent", "egrad_to_rgrad", "retract", "project",
         "contains", "check", "inner", "sample")


def _calls(space, X, C):
    """``{map: call}`` with one complex argument ``C`` (the other arguments real points ``X``)."""
    return {
        "to_manifold": lambda: space.to_manifold(C),
        "from_manifold": lambda: space.from_manifold(C),
        "rebase": lambda: space.rebase(C, None),
        "tangent": lambda: space.tangent(X, C),
        "egrad_to_rgrad": lambda: space.egrad_to_rgrad(X, C),
        "retract": lambda: space.retract(C, C),
        "project": lambda: space.project(C),
        "contains": lambda: space.contains(C),
        "check": lambda: space.check(C),
        "inner": lambda: space.inner(X, C, C),
        "sample": lambda: space.sample(tuple(X.shape), dtype=torch.complex128),
    }


@pytest.mark.parametrize("case", _REAL_CASES, ids=[c.id for c in _REAL_CASES])
def test_real_spaces_refuse_complex_tensors(case, generator: torch.Generator) -> None:
    space = case.space
    X = space.sample(case.smoke, generator=generator, dtype=torch.float64)
    C = torch.complex(X, torch.ones_like(X))
    name = type(space).__name__
    for what, call in _calls(space, X, C).items():
        with pytest.raises(ManifoldError, match="complex128") as info:
            call()
        msg = str(info.value)
        assert msg.startswith(repr(space)), (what, msg)
        assert "real floating dtype" in msg and name in msg, (what, msg)


def test_the_named_real_spaces_are_in_the_refusal_list() -> None:
    """The issue names SO, Sym, Skew, GLp and SL; each must be among the refusing cases."""
    refusing = {type(c.space) for c in _REAL_CASES}
    for cls in (gf.SO, gf.Sym, gf.Skew, gf.GLp, gf.SL):
        assert cls in refusing and not cls.accepts_complex, cls


def test_product_of_real_spaces_refuses_complex() -> None:
    M = gf.Product(gf.SO(), gf.Sphere())
    X = M.sample(((3, 3), (4,)), dtype=torch.float64)
    with pytest.raises(ManifoldError, match="factor 0: .*complex64"):
        M.project((X[0].to(torch.complex64), X[1]))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_and_integers_are_refused_with_the_dtype_named() -> None:
    with pytest.raises(ManifoldError, match="complex128.*int64"):
        gf.Rn().to_manifold(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ManifoldError, match="complex64 or complex128.*complex32"):
        gf.Rn().to_manifold(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(ManifoldError, match="real floating dtype.*complex32"):
        gf.SO().to_manifold(torch.zeros(2, 2, dtype=torch.complex32))


def test_complex_only_spaces_refuse_a_low_precision_sample_dtype() -> None:
    """``Unitary``/``Hermitian`` (and a product with one) ``sample(dtype=bfloat16/float16)`` drew in
    float32 and returned complex64, silently another dtype (torch has no complex bf16/fp16): now a
    ``ManifoldError`` naming the dtype; float32 still gives complex64, and real spaces still sample in
    bf16."""
    for M, shape in ((gf.Unitary(), (3, 3)), (gf.Hermitian(), (3, 3)), (gf.Product(gf.SO(), gf.Unitary()), ((3, 3), (3, 3)))):
        for dtype in (torch.bfloat16, torch.float16):
            with pytest.raises(ManifoldError, match=f"expected `dtype`.*got {dtype}") as info:
                M.sample(shape, dtype=dtype)
            assert repr(M) in str(info.value)
    assert gf.Unitary().sample((3, 3), dtype=torch.float32).dtype == torch.complex64
    assert [x.dtype for x in gf.Product(gf.SO(), gf.Sphere()).sample(((3, 3), (4,)), dtype=torch.bfloat16)] == [torch.bfloat16] * 2


# ------------------------------------------------------------------------------------------------
# Torch's gradient convention and the embedded defaults, on Rn (which takes complex tensors).


def test_torch_gradient_of_a_real_loss_is_the_real_gradient(generator: torch.Generator) -> None:
    """For ``L(Z)`` real, autograd returns ``∂L/∂X + i ∂L/∂Y`` (``Z = X + iY``), checked against
    central differences in complex128: the gradient for the metric ``Re tr(AᴴB)``."""
    A = torch.randn(3, 3, dtype=torch.complex128, generator=generator)
    Z = torch.randn(3, 3, dtype=torch.complex128, generator=generator)

    def loss(Z):
        W = A @ Z
        return (W.conj() * W).real.sum() + (Z @ Z).real.sum() * (Z.imag ** 3).sum()

    G = torch.func.grad(loss)(Z)
    h = 1e-6
    fd = torch.zeros_like(Z)
    for idx in range(9):
        for unit in (1.0, 1.0j):
            E = torch.zeros(9, dtype=torch.complex128)
            E[idx] = unit
            E = E.reshape(3, 3)
            d = (loss(Z + h * E) - loss(Z - h * E)) / (2 * h)
            fd.view(-1)[idx] += d * unit
    torch.testing.assert_close(G, fd, atol=1e-7, rtol=1e-7)
    # the Riemannian gradient of Rn is that gradient, and inner is Re tr(GᴴV): dL(Z)[V] for any V
    M = gf.Rn()
    V = torch.randn(3, 3, dtype=torch.complex128, generator=generator)
    dL = torch.func.jvp(loss, (Z,), (V,))[1]
    torch.testing.assert_close(M.inner(Z, M.egrad_to_rgrad(Z, G), V).sum(), dL, atol=1e-9, rtol=1e-9)
    assert M.inner(Z, V, V).dtype == torch.float64
    torch.testing.assert_close(M.inner(Z, V, V), V.abs() ** 2, atol=0, rtol=1e-15)


def test_rn_takes_complex_tensors() -> None:
    M = gf.Rn()
    Z = torch.tensor([1 + 2j, complex("nan")], dtype=torch.complex64)
    assert M.to_manifold(Z) is Z
    assert M.contains(Z).tolist() == [True, False]
    assert M.sample((2, 3), dtype=torch.complex64).dtype == torch.complex64
    with pytest.raises(ManifoldError, match="non-finite"):
        M.check(Z)


def test_low_precision_policy_keeps_complex_dtypes() -> None:
    """Under autocast the maps run with autocast off and return complex tensors unchanged in dtype."""
    M = gf.Rn()
    Z = torch.randn(2, 2, dtype=torch.complex64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M.retract(Z, Z).dtype == torch.complex64
        assert M.inner(Z, Z, Z).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# The complex spaces against independent computations (numpy / scipy), in complex128.

C128 = torch.complex128


def _crandn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=C128)


def _np(X):
    return X.detach().numpy()


def test_unitary_chart_is_scipy_expm_of_the_skew_hermitian_generator(generator) -> None:
    import numpy as np
    import scipy.linalg

    Z = _crandn(4, 4, generator=generator)
    L = np.tril(_np(Z), -1)
    A = L - L.conj().T + 1j * np.diag(_np(Z).imag.diagonal())
    base = gf.Unitary().sample((4, 4), generator=generator, dtype=C128)
    expected = _np(base) @ scipy.linalg.expm(A)
    torch.testing.assert_close(gf.Unitary().to_manifold(Z, base), torch.from_numpy(expected), atol=1e-12, rtol=0)
    cay = np.linalg.solve(np.eye(4) - A / 2, np.eye(4) + A / 2)
    torch.testing.assert_close(gf.Unitary(triv="cayley").to_manifold(Z), torch.from_numpy(cay), atol=1e-12, rtol=0)


@pytest.mark.parametrize("space, shape", [(gf.Unitary(), (5, 5)), (gf.Stiefel(), (6, 3)), (gf.Stiefel(), (3, 6)),
                                          (gf.Grassmannian(), (6, 3))], ids=["Unitary", "Stiefel", "Stiefel-wide",
                                                                              "Grassmannian"])
def test_project_is_scipy_polar_factor(space, shape, generator) -> None:
    import scipy.linalg

    Y = _crandn(*shape, generator=generator)
    tall = shape[0] >= shape[1]
    Up, _ = scipy.linalg.polar(_np(Y) if tall else _np(Y).conj().T)
    expected = torch.from_numpy(Up if tall else Up.conj().T)
    torch.testing.assert_close(space.project(Y), expected, atol=1e-12, rtol=0)


def test_stiefel_retraction_is_the_q_factor_with_positive_diagonal(generator) -> None:
    import numpy as np

    M = gf.Stiefel()
    X = M.sample((6, 3), generator=generator, dtype=C128)
    V = M.tangent(X, _crandn(6, 3, generator=generator))
    Q, R = np.linalg.qr(_np(X + V))
    phase = np.diag(R) / np.abs(np.diag(R))
    torch.testing.assert_close(M.retract(X, V), torch.from_numpy(Q * phase), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "space, shape",
    [(gf.Unitary(), (3, 3)), (gf.Unitary(triv="cayley"), (3, 3)), (gf.Hermitian(), (3, 3)), (gf.Stiefel(), (4, 2)),
     (gf.Stiefel(), (2, 4)), (gf.Grassmannian(), (4, 2)), (gf.Sphere(), (2, 3)), (gf.Oblique(), (3, 2))],
    ids=["Unitary", "Unitary-cayley", "Hermitian", "Stiefel", "Stiefel-wide", "Grassmannian", "Sphere", "Oblique"],
)
def test_gradcheck_in_complex128(space, shape, generator) -> None:
    """``torch.autograd.gradcheck`` on complex inputs checks the conjugate-Wirtinger convention of
    every map against finite differences, first and second order (``gradgradcheck``)."""
    X = space.sample(shape, generator=generator, dtype=C128)
    Z = 0.5 * _crandn(*shape, generator=generator)
    G = _crandn(*shape, generator=generator)
    Z0, base = space.from_manifold(X)
    fns = {
        "to_manifold": (lambda z: space.to_manifold(z, base), (Z.requires_grad_(),)),
        "tangent": (lambda x, g: space.tangent(x, g), (X.clone().requires_grad_(), G.clone().requires_grad_())),
        "retract": (lambda v: space.retract(X, v), (0.3 * space.tangent(X, G).requires_grad_(),)),
    }
    for name, (fn, args) in fns.items():
        assert torch.autograd.gradcheck(fn, args), name
        assert torch.autograd.gradgradcheck(fn, args), name


def test_pssd_project_is_numpy_eigenvalue_clipping(generator) -> None:
    """The nearest Hermitian PSD matrix: the Hermitian part's negative eigenvalues set to 0."""
    import numpy as np

    Y = _crandn(2, 5, 5, generator=generator)
    H = 0.5 * (_np(Y) + np.conj(np.swapaxes(_np(Y), -1, -2)))
    w, Q = np.linalg.eigh(H)
    expected = (Q * np.clip(w, 0, None)[..., None, :]) @ np.conj(np.swapaxes(Q, -1, -2))
    torch.testing.assert_close(gf.PSSD().project(Y), torch.from_numpy(expected), atol=1e-12, rtol=0)


@pytest.mark.parametrize("space", [gf.PSD(), gf.PSD(f=(torch.exp, torch.log)), gf.PSSD()], ids=repr)
def test_hermitian_psd_logabsdet_and_round_trip(space, generator) -> None:
    Z = _crandn(2, 4, 4, generator=generator)
    X = space.to_manifold(Z)
    torch.testing.assert_close(space.logabsdet(Z), torch.linalg.slogdet(X)[1], atol=1e-12, rtol=0)
    Z0, base = space.from_manifold(X)
    assert Z0.dtype == C128
    torch.testing.assert_close(space.to_manifold(Z0, base), X, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda z: space.to_manifold(z, base), (Z0.clone().requires_grad_(),))


def test_unitary_logabsdet_is_slogdet(generator) -> None:
    M = gf.Unitary()
    Z = 3.0 * _crandn(2, 4, 4, generator=generator)
    base = M.sample((2, 4, 4), generator=generator, dtype=C128)
    lad = M.logabsdet(Z, base)
    assert lad.dtype == torch.float64 and lad.shape == (2,)
    torch.testing.assert_close(lad, torch.linalg.slogdet(M.to_manifold(Z, base))[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("space, shape", [(gf.Unitary(), (4, 4)), (gf.Stiefel(), (5, 2)), (gf.Grassmannian(), (5, 2)),
                                          (gf.Sphere(), (4,)), (gf.Oblique(), (3, 2))],
                         ids=["Unitary", "Stiefel", "Grassmannian", "Sphere", "Oblique"])
def test_riemannian_gradient_gives_the_directional_derivative(space, shape, generator) -> None:
    """``inner(X, egrad_to_rgrad(X, ∇L), V) = d/dt L(retract(X, tV))`` at 0 for tangent ``V``,
    with ``∇L`` torch's gradient of a real loss of a complex point."""
    A = _crandn(*shape, generator=generator)

    def loss(X):
        return (A.conj() * X).real.sum() ** 2 + (X.abs() ** 4).sum()

    X = space.sample(shape, generator=generator, dtype=C128)
    V = space.tangent(X, _crandn(*shape, generator=generator))
    rgrad = space.egrad_to_rgrad(X, torch.func.grad(loss)(X))
    d = torch.func.jvp(lambda t: loss(space.retract(X, t * V)), (torch.zeros((), dtype=torch.float64),),
                       (torch.ones((), dtype=torch.float64),))[1]
    torch.testing.assert_close(space.inner(X, rgrad, V), d, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(space.tangent(X, rgrad), rgrad, atol=1e-12, rtol=0)
    # transport lands in the tangent space of the new point
    Y = space.retract(X, 0.1 * V)
    W = space.transport(X, Y, V)
    torch.testing.assert_close(space.tangent(Y, W), W, atol=1e-12, rtol=0)


def test_unitary_and_hermitian_refuse_real_tensors() -> None:
    for M in (gf.Unitary(), gf.Hermitian()):
        with pytest.raises(ManifoldError, match="complex dtype.*float64"):
            M.to_manifold(torch.zeros(2, 2, dtype=torch.float64))
        assert M.sample((2, 2)).dtype == torch.complex64
        assert M.sample((2, 2), dtype=torch.float64).dtype == C128


def test_real_frames_are_unchanged_by_the_complex_code_path(generator) -> None:
    """The real maps of the frame spaces are those of the real formulas (no conjugation slipped in):
    a complex point with zero imaginary part maps as the real point does."""
    for M, shape in ((gf.Stiefel(), (5, 2)), (gf.Stiefel(), (2, 5)), (gf.Grassmannian(), (5, 2)), (gf.Sphere(), (4,)),
                     (gf.Oblique(), (3, 2))):
        Z = torch.randn(*shape, generator=generator, dtype=torch.float64)
        G = torch.randn(*shape, generator=generator, dtype=torch.float64)
        X = M.to_manifold(Z)
        torch.testing.assert_close(M.to_manifold(Z.to(C128)), X.to(C128), atol=1e-13, rtol=0)
        torch.testing.assert_close(M.tangent(X.to(C128), G.to(C128)), M.tangent(X, G).to(C128), atol=1e-13, rtol=0)
        torch.testing.assert_close(M.project(G.to(C128)), M.project(G).to(C128), atol=1e-13, rtol=0)


# ------------------------------------------------------------------------------------------------
# Optimizers: the unitary Procrustes problem min ‖UA − B‖ has the closed-form minimiser W Vᴴ for
# B Aᴴ = W Σ Vᴴ (max Re tr(Uᴴ B Aᴴ)), on U(n) and on the complex Stiefel manifold.


@pytest.mark.parametrize("opt_name", ["rsgd-momentum", "radam"])
@pytest.mark.parametrize("space, n, k", [(gf.Unitary(), 5, 5), (gf.Stiefel(), 6, 3)], ids=["Unitary", "Stiefel"])
def test_unitary_procrustes_reaches_the_svd_solution(space, n, k, opt_name, generator) -> None:
    A = _crandn(k, 8, generator=generator)
    B = _crandn(n, 8, generator=generator)
    W, S, Vh = torch.linalg.svd(B @ A.mH, full_matrices=False)
    best = (A.abs() ** 2).sum() + (B.abs() ** 2).sum() - 2 * S.sum()
    c = {"U": space}
    opt = {"rsgd-momentum": gf.optim.rsgd(c, lr=0.01, momentum=0.9), "radam": gf.optim.radam(c, lr=0.1, betas=(0.9, 0.99))}[opt_name]
    p = gf.sample(c, {"U": torch.empty(n, k, dtype=C128)}, generator=generator)
    state = opt.init(p)

    def f(p):
        return (p["U"] @ A - B).abs().pow(2).sum()

    for _ in range(1000):
        p, state = opt.update(torch.func.grad(f)(p), state, p)
    torch.testing.assert_close(f(p), best, atol=1e-8, rtol=0)
    torch.testing.assert_close(p["U"], W @ Vh, atol=1e-5, rtol=0)
    torch.testing.assert_close(p["U"].mH @ p["U"], torch.eye(k, dtype=C128), atol=1e-10, rtol=0)  # UᴴU = I


def test_radam_on_complex_rn_entries_uses_the_modulus(generator) -> None:
    """Under ``Rn`` Adam's second moment of a complex entry is ``|g|²`` (one point, its Riemannian
    norm), so an update is equivariant under a phase: the step for ``i·g`` is ``i`` times the step
    for ``g``, and a complex least-squares problem converges (``g·g`` would be complex, its root
    rotate the step)."""
    g = torch.randn(4, 3, dtype=torch.float64, generator=generator).to(C128)
    p = {"w": _crandn(4, 3, generator=generator)}
    opt = gf.optim.radam({"w": gf.Rn()}, lr=0.1)
    step = {ph: opt.update({"w": ph * g}, opt.init(p), p)[0]["w"] - p["w"] for ph in (1, 1j)}
    torch.testing.assert_close(step[1j], 1j * step[1], atol=1e-15, rtol=0)
    A, b = _crandn(6, 4, generator=generator), _crandn(6, generator=generator)
    x = {"x": torch.zeros(4, dtype=C128)}
    opt = gf.optim.radam({"x": gf.Rn()}, lr=0.05)
    state = opt.init(x)
    for _ in range(2000):
        x, state = opt.update(torch.func.grad(lambda q: (A @ q["x"] - b).abs().pow(2).sum())(x), state, x)
    torch.testing.assert_close(x["x"], torch.linalg.lstsq(A, b[:, None]).solution[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["radam", "radamw", "clip"])
@pytest.mark.parametrize("dtype", [C128, torch.complex64], ids=str)
def test_radam_on_unconstrained_complex_entries_equals_torch_adam(dtype, which, generator) -> None:
    """An unconstrained complex entry steps as ``torch.optim.Adam`` steps a complex parameter (its real
    and imaginary parts apart, ``view_as_real``), step for step, as README promises for free entries;
    so do ``radamw`` (``torch.optim.AdamW``) and a global-norm clip (``clip_grad_norm_``: ``|g|²``)."""
    A = _crandn(6, 4, generator=generator).to(dtype)
    b = _crandn(6, generator=generator).to(dtype)
    x = {"x": _crandn(4, generator=generator).to(dtype)}
    ref = x["x"].clone().requires_grad_(True)
    torch_cls = torch.optim.AdamW if which == "radamw" else torch.optim.Adam
    torch_opt = torch_cls([ref], lr=0.05, betas=(0.8, 0.99), weight_decay=0.01)
    if which == "clip":  # Adam's coupled decay, then the clip: clip_grad_norm_ sees the gradient alone
        opt = gf.optim.retract_and_transport({"x": None}, gf.optim.chain(
            gf.optim.clip_by_global_norm({"x": None}, 2.0), gf.optim.add_decayed_weights(0.01),
            gf.optim.scale_by_adam({"x": None}, 0.8, 0.99), gf.optim.scale(-0.05)))
    else:
        opt = getattr(gf.optim, which)({"x": None}, lr=0.05, betas=(0.8, 0.99), weight_decay=0.01)
    state = opt.init(x)

    def f(q):
        return (A @ q - b).abs().pow(2).sum()

    tol = 1e-13 if dtype == C128 else 2e-6
    norms = []
    for _ in range(30):
        x, state = opt.update(torch.func.grad(lambda q: f(q["x"]))(x), state, x)
        torch_opt.zero_grad()
        f(ref).backward()
        if which == "clip":
            norms.append(float(torch.nn.utils.clip_grad_norm_([ref], 2.0)))
        torch_opt.step()
        torch.testing.assert_close(x["x"], ref.detach(), atol=tol, rtol=tol)
    if which == "clip":
        assert min(norms) < 2.0 < max(norms), norms


@pytest.mark.parametrize("which", ["radam", "radam-amsgrad", "clip"])
def test_a_lazily_conjugated_gradient_steps_as_its_resolved_copy(which, generator) -> None:
    """A gradient given as ``g.conj()`` (a conjugate view, e.g. of a Wirtinger derivative written by
    hand) steps exactly as ``g.conj().resolve_conj()``, on free, ``Rn`` and complex ``Stiefel``
    entries: Adam's elementwise statistic and the clip's norm of a free entry used ``view_as_real``,
    which refuses a conjugate view (a RuntimeError for a valid gradient)."""
    c = {"X": gf.Stiefel(), "r": gf.Rn()}
    p = {"X": gf.Stiefel().sample((4, 2), dtype=C128, generator=generator), "b": _crandn(3, generator=generator),
         "r": _crandn(3, generator=generator)}
    opt = {"radam": gf.optim.radam(c, lr=0.1), "radam-amsgrad": gf.optim.radam(c, lr=0.1, amsgrad=True),
           "clip": gf.optim.retract_and_transport(c, gf.optim.chain(
               gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 0.5), gf.optim.scale(-0.1)))}[which]
    g = {k: _crandn(*v.shape, generator=generator) for k, v in p.items()}
    lazy = {k: v.conj() for k, v in g.items()}
    assert all(v.is_conj() for v in lazy.values())
    got, _ = opt.update(lazy, opt.init(p), p)
    want, _ = opt.update({k: v.resolve_conj() for k, v in lazy.items()}, opt.init(p), p)
    for k in p:
        torch.testing.assert_close(got[k], want[k], atol=0.0, rtol=0.0)
    assert member(c["X"], got["X"], 1e-12)


# ------------------------------------------------------------------------------------------------
# The complex conformance cases catch complex-specific mistakes: each mutant below (a transpose
# where the conjugate transpose belongs, Haar sampling without the phase correction, u(n) without
# its imaginary diagonal) fails a property that passes without it (tests/test_testing.py does the
# same for the real spaces).


def _tangent_without_conj(self, X, G):
    B = X.mT @ G
    return X @ (0.5 * (B - B.mT))


def _qr_without_phases(shape, generator=None, dtype=None, device=None):
    return torch.linalg.qr(torch.randn(shape, generator=generator, dtype=dtype, device=device))[0]


def _skew_without_imaginary_diagonal(Z, lower=True):
    L = torch.tril(Z, -1)
    return L - L.mH


def _dot_without_conj(A, B):
    return (A * B).real.sum(-1, keepdim=True)


def _hermitian_part_without_conj(self, G):
    return 0.5 * (G + G.mT)


def _complex_mutants():
    from unittest import mock

    import geofunc.spaces._orthogonal as group  # the chart U(n) shares with SO(n)
    import geofunc.spaces._sphere as sphere
    import geofunc.spaces._unitary as unitary

    return [
        ("Unitary.tangent-transpose", lambda: mock.patch.object(gf.Unitary, "tangent", _tangent_without_conj),
         "Unitary", "tangent_space", "does not fix the image of the chart's differential"),
        ("Unitary.sample-no-phase-fix", lambda: mock.patch.object(unitary, "haar_stiefel", _qr_without_phases),
         "Unitary", "sample_distribution", "not the documented distribution|over 4000 draws"),
        ("Unitary-chart-no-imaginary-diagonal",
         lambda: mock.patch.object(group, "skew_lower", _skew_without_imaginary_diagonal),
         "Unitary", "tangent_space", "projected differential of the chart"),
        ("Sphere-inner-without-conj", lambda: mock.patch.object(sphere, "_dot", _dot_without_conj),
         "Sphere-complex", "tangent", "not idempotent"),
        ("Hermitian.project-transpose", lambda: mock.patch.object(gf.Hermitian, "_part", _hermitian_part_without_conj),
         "Hermitian", "project", "not on the space"),
    ]


@pytest.mark.parametrize("index", range(len(_complex_mutants())), ids=[m[0] for m in _complex_mutants()])
def test_complex_mutant_is_caught(index) -> None:
    from cases_complex import COMPLEX_CASES

    from geofunc.testing import PROPERTIES

    _, patch, case_id, prop_name, match = _complex_mutants()[index]
    case = next(c for c in COMPLEX_CASES if c.id == case_id)
    prop = next(p for p in PROPERTIES if p.name == prop_name)
    with patch(), pytest.raises(AssertionError, match=match):
        prop.fn(case, torch.float64, generator=torch.Generator().manual_seed(0))
    prop.fn(case, torch.float64, generator=torch.Generator().manual_seed(0))  # the control passes


def test_jacobians_of_complex_maps_are_taken_on_the_real_parts(generator) -> None:
    """torch 2.13's ``jacrev``/``jacfwd`` (hence ``hessian``) refuse complex inputs ("Expected all
    inputs to be real"); ``grad``, ``jvp`` and ``vmap`` take them. A map of complex matrices that is
    not holomorphic has no complex Jacobian anyway: its Jacobian is that of the real map on
    ``(Re Z, Im Z)`` (what tests/cases_complex.py checks, for every transform), here equal to the
    directional derivatives from ``jvp`` on the complex map."""
    M = gf.Unitary()
    Z = _crandn(3, 3, generator=generator)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        with pytest.raises(RuntimeError, match="Expected all inputs to be real"):
            jac(M.to_manifold)(Z)

    def real_map(Zr):
        return torch.view_as_real(M.to_manifold(torch.view_as_complex(Zr)).resolve_conj())

    J = torch.func.jacrev(real_map)(torch.view_as_real(Z))  # (3, 3, 2, 3, 3, 2)
    D = _crandn(3, 3, generator=generator)
    _, dX = torch.func.jvp(M.to_manifold, (Z,), (D,))
    torch.testing.assert_close(torch.einsum("abcijk,ijk->abc", J, torch.view_as_real(D)), torch.view_as_real(dX),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.func.jacfwd(real_map)(torch.view_as_real(Z)), J, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# Wide complex frames under vmap-based transforms. The wide chart reads Zᴴ (tall form); as the lazy
# view Z.mH its derivative was a lazy conjugate whose real/imaginary parts (torch.complex's reverse,
# .imag) are a negative view without a batching rule: vmap(grad), jacrev and hessian raised "Batching
# rule not implemented for aten::_neg_view" (tall frames and plain grad did not).

_WIDE = [(gf.Stiefel(), (3, 6)), (gf.Stiefel(), (2, 5)), (gf.Grassmannian(), (3, 6)), (gf.Grassmannian(), (2, 5)),
         (gf.Stiefel(triv="cayley"), (3, 6)), (gf.Stiefel(), (6, 3))]


def _re_im_stack(X):
    return torch.stack((X.real, X.imag), dim=-1)


def _complex_of(Xr):
    return torch.complex(Xr[..., 0], Xr[..., 1])


@pytest.mark.parametrize("space, shape", _WIDE, ids=[f"{type(s).__name__}-{s.triv}-{n}x{k}" for s, (n, k) in _WIDE])
def test_wide_complex_frames_compose_with_vmap_transforms(space, shape, generator) -> None:
    """vmap(grad), vmap(jacrev), jacrev, hessian and vmap(hessian) of complex128 frame charts on their real
    parts (per-sample bases; gradients with respect to Z and to the base; the tangent projection) agree
    with a Python loop, with the other mode, and with central finite differences, with vmap's per-sample
    fallback disabled."""
    from torch.func import grad, hessian, jacfwd, jacrev, vmap

    from geofunc.testing import no_vmap_fallback

    B, h = 3, 1e-6
    _, bases = space.from_manifold(space.sample((B, *shape), generator=generator, dtype=C128))
    Br = _re_im_stack(bases)
    Zr = 0.3 * torch.randn(B, *shape, 2, generator=generator, dtype=torch.float64)
    W = _crandn(*shape, generator=generator)
    V = torch.randn(*shape, generator=generator, dtype=torch.float64)

    def f(zr, br):  # a real loss reading the real part, the modulus and the imaginary part of the point
        X = space.to_manifold(_complex_of(zr), _complex_of(br))
        return (W.conj() * X).sum().real + (X.abs() ** 2 * V).sum() + (X.imag * V).sum()

    def chart(zr, br):
        return _re_im_stack(space.to_manifold(_complex_of(zr), _complex_of(br)))

    def tangent(xr, gr):
        return _re_im_stack(space.tangent(_complex_of(xr), _complex_of(gr)))

    def loop(fn, *args):
        return torch.stack([fn(*(a[i] for a in args)) for i in range(B)])

    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)  # noqa: E731
    with no_vmap_fallback():
        g = vmap(grad(f))(Zr, Br)
        close(g, loop(grad(f), Zr, Br))
        close(vmap(grad(f, argnums=1))(Zr, Br), loop(grad(f, argnums=1), Zr, Br))
        J = vmap(jacrev(chart))(Zr, Br)
        close(J, loop(jacfwd(chart), Zr, Br))
        H = vmap(hessian(f))(Zr, Br)
        close(H, loop(jacrev(jacrev(f)), Zr, Br))
        close(vmap(jacrev(tangent))(Zr, Zr.flip(0)), loop(jacfwd(tangent), Zr, Zr.flip(0)))
    D = torch.randn(Zr.shape[1:], generator=generator, dtype=torch.float64)
    z, b = Zr[0], Br[0]
    fd = (f(z + h * D, b) - f(z - h * D, b)) / (2 * h)
    torch.testing.assert_close((g[0] * D).sum(), fd, rtol=1e-7, atol=1e-8)
    fd_g = (grad(f)(z + h * D, b) - grad(f)(z - h * D, b)) / (2 * h)
    torch.testing.assert_close(torch.einsum("abcijk,ijk->abc", H[0], D), fd_g, rtol=1e-6, atol=1e-7)
    fd_x = (chart(z + h * D, b) - chart(z - h * D, b)) / (2 * h)
    torch.testing.assert_close(torch.einsum("abcijk,ijk->abc", J[0], D), fd_x, rtol=1e-7, atol=1e-8)


def test_real_wide_frames_keep_the_transpose_view() -> None:
    """The wide chart's tall form of a real tensor is the view ``mT`` (no copy, no conjugation: the real
    path is the one it was); a complex one is ``conj(X)ᵀ`` as a plain tensor (no lazy conjugate bit)."""
    from geofunc.spaces._orthogonal import tall

    X = torch.randn(3, 5, dtype=torch.float64)
    Xt, tr = tall(X)
    assert tr and Xt.data_ptr() == X.data_ptr() and Xt.stride() == X.mT.stride()
    T = torch.randn(5, 3, dtype=torch.float64)
    assert tall(T) == (T, False)
    Xc = torch.randn(3, 5, dtype=C128)
    Xct, tr = tall(Xc)
    assert tr and not Xct.is_conj() and not Xct.is_neg()
    torch.testing.assert_close(Xct, Xc.mH.resolve_conj(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "space",
    [gf.Stiefel(), gf.Unitary(), gf.PSD(), gf.PSSD(), gf.Product(gf.Unitary(), gf.Stiefel())],
    ids=["Stiefel", "Unitary", "PSD", "PSSD", "Product"],
)
def test_complex_logabsdet_is_real_and_differentiable(space, generator) -> None:
    """log|det X| of a complex square point is a real number (the square complex Stiefel returned a
    complex zero, so ``.backward()`` on it failed, and so did a Product holding it); its value is
    ``slogdet``'s."""
    shape = ((4, 4), (4, 4)) if isinstance(space, gf.Product) else (4, 4)
    X = gf.sample({"x": space}, {"x": tuple(torch.empty(s, dtype=C128) for s in shape)
                                 if isinstance(space, gf.Product) else torch.empty(shape, dtype=C128)},
                  generator=generator)["x"]
    Z, base = space.from_manifold(X)
    Z = optree.tree_map(lambda z: z.clone().requires_grad_(True), Z)
    out = space.logabsdet(Z, base)
    assert out.dtype == torch.float64
    ref = sum(torch.linalg.slogdet(x)[1] for x in (X if isinstance(X, tuple) else (X,)))
    torch.testing.assert_close(out.detach(), ref, atol=1e-10, rtol=0)
    out.backward()


@pytest.mark.parametrize(
    "space, shape, measure",
    [(gf.Hermitian(), (3, 3), "max|X − Xᴴ|"), (gf.PSD(), (3, 3), "max|X − Xᴴ|"),
     (gf.Stiefel(), (4, 2), "max|XᴴX − I|"), (gf.Grassmannian(), (4, 2), "max|XᴴX − I|")],
    ids=["Hermitian", "PSD", "Stiefel", "Grassmannian"],
)
def test_complex_membership_errors_name_the_conjugate_transpose(space, shape, measure, generator) -> None:
    """A complex point's membership error names the measure it computed (ᴴ, not ᵀ)."""
    with pytest.raises(ManifoldError, match=re.escape(measure)):
        space.check(_crandn(*shape, generator=generator))


@pytest.mark.parametrize(
    "space, shape",
    [(gf.Sphere(), (3,)), (gf.Oblique(), (3, 2)), (gf.Stiefel(), (4, 2)), (gf.Stiefel(metric="canonical"), (4, 2)),
     (gf.Unitary(), (3, 3)), (gf.Hermitian(), (3, 3)), (gf.PSD(), (3, 3))],
    ids=["Sphere", "Oblique", "Stiefel", "Stiefel-canonical", "Unitary", "Hermitian", "PSD"],
)
def test_inner_of_complex_tensors_built_from_real_parameters_under_vmap_transforms(space, shape, generator) -> None:
    """``inner`` of tangent vectors (and at points) built from real parameters by ``torch.complex(re, im)``
    under ``jacrev``, ``hessian`` and ``vmap(grad)``: the conjugate in ``Re tr(UᴴV)`` was a lazy view, whose
    cotangent met ``torch.complex``'s backward as an ``aten::_neg_view``, which has no batching rule
    (RuntimeError; Note [Real products under vmap]). Values against the real formula ``Σ re² + im²``."""
    X = space.sample(shape, generator=generator, dtype=C128)
    V = space.tangent(X, _crandn(*shape, generator=generator))
    Vr = torch.view_as_real(V).clone()

    def c(r):
        return torch.complex(r[..., 0], r[..., 1])

    cases = {"inner(X, v, v)": (lambda r: space.inner(X, c(r), c(r)), Vr),
             "inner(x, V, V)": (lambda r: space.inner(c(r), V, V), torch.view_as_real(X).clone())}
    for name, (f, at) in cases.items():
        J = torch.func.jacrev(f)(at)
        H = torch.func.hessian(f)(at)
        G = torch.func.vmap(torch.func.grad(f))(at.unsqueeze(0).repeat(2, *([1] * at.ndim)))
        torch.testing.assert_close(J, torch.func.jacfwd(f)(at), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G[1], J, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(H).all(), name
        if name == "inner(X, v, v)" and not (isinstance(space, gf.Stiefel) and space.metric == "canonical"):
            # the embedded metric: Σ (re² + im²), gradient 2 Vr, Hessian 2 I
            torch.testing.assert_close(J, 2 * at, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(H.reshape(at.numel(), -1), 2 * torch.eye(at.numel(), dtype=at.dtype),
                                       rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Note [The imaginary diagonal under torch.compile(grad)] in geofunc/_linalg.py: with the imaginary
# diagonal read by diag_embed(diagonal(Z).imag) (PSSD: diagonal(Z).real), torch 2.13's inductor returned
# gradients 0.5-1.5 off eager under torch.compile(torch.func.grad(...)), silently (Unitary, square and
# tall complex Stiefel, the latter under vmap, PSSD). Inductor itself (aot_eager was right).


@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
@pytest.mark.parametrize("case", ["unitary-grad", "stiefel-vmap-grad", "pssd-grad"])
def test_compiled_grad_of_complex_charts_equals_eager(case) -> None:
    from torch.func import grad, vmap

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    C = torch.complex128
    if case == "unitary-grad":
        c = torch.randn(4, 4, generator=g, dtype=C)
        f = grad(lambda z: (c.conj() * gf.Unitary().to_manifold(z)).real.sum())
        z = 0.5 * torch.randn(4, 4, generator=g, dtype=C)
    elif case == "pssd-grad":
        c = torch.randn(4, 4, generator=g, dtype=C)
        base = gf.PSSD().from_manifold(gf.PSSD().sample((4, 4), generator=g, dtype=C))[1]
        f = grad(lambda z: (c.conj() * gf.PSSD().to_manifold(z, base)).real.sum())
        z = 0.5 * torch.randn(4, 4, generator=g, dtype=C)
    else:
        c = torch.randn(5, 3, generator=g, dtype=C)
        base = gf.Stiefel().sample((5, 3), generator=g, dtype=C)
        f = vmap(grad(lambda z: (c.conj() * gf.Stiefel().to_manifold(z, base)).real.sum()))
        z = torch.randn(3, 5, 3, generator=g, dtype=C)
    expected = f(z)
    got = torch.compile(f, fullgraph=True)(z)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_unitary_of_a_lazily_conjugated_raw_tensor_under_vmap() -> None:
    """A raw tensor that is a lazy conjugate (``W.mH``, ``W.conj()``): the imaginary diagonal read its ``.imag``,
    a negative view with no batching rule, and ``vmap`` raised torch's "Batching rule not implemented for
    aten::_neg_view" (eager mode took it). Values and gradients are those of the resolved tensor."""
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 4, 4, generator=g, dtype=torch.complex128)
    c = torch.randn(4, 4, generator=g, dtype=torch.complex128)
    Z, Zr = W.mH, W.mH.resolve_conj()
    assert Z.is_conj()
    M = gf.Unitary()
    torch.testing.assert_close(vmap(M.to_manifold)(Z), M.to_manifold(Zr), atol=1e-12, rtol=0)
    f = grad(lambda z: (c.conj() * M.to_manifold(z)).real.sum())
    torch.testing.assert_close(vmap(f)(Z), vmap(f)(Zr), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.complex128, 1e-12), (torch.complex64, 1e-5)])
def test_complex_tall_chart_full_and_reduced_forms_agree(dtype, atol) -> None:
    """A user callable ``triv`` gets the full generator W = B − Bᴴ, whose ½·i·Im diag(YᴴZ) on each side sums
    to Ω's imaginary diagonal; ``triv="expm"`` on a 6×2 frame builds Ω in the reduced 2k×2k form. Dropping the
    ½, or the diagonal, moved the full form's point 0.14 from the reduced one's, silently."""
    g = torch.Generator().manual_seed(0)
    base = gf.Stiefel().sample((6, 2), generator=g, dtype=dtype)
    Z = 0.3 * torch.randn(6, 2, generator=g, dtype=dtype)
    reduced = gf.Stiefel(triv="expm").to_manifold(Z, base)
    full = gf.Stiefel(triv=torch.linalg.matrix_exp).to_manifold(Z, base)
    torch.testing.assert_close(full, reduced, atol=atol, rtol=0)


@pytest.mark.parametrize("lower", [True, False])
def test_hermitian_chart_of_a_complex_raw_tensor_is_hermitian(lower) -> None:
    """Hermitian's chart reads ``diagonal(Z.real)``: a raw tensor's imaginary diagonal is no coordinate (read
    as ``diagonal(Z)`` it was kept, and the point was not Hermitian)."""
    Z = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=C128)
    H = gf.Hermitian(lower=lower)
    X = H.to_manifold(Z)
    torch.testing.assert_close(X, X.mH, atol=0.0, rtol=0.0)
    torch.testing.assert_close(X.diagonal(dim1=-2, dim2=-1), Z.real.diagonal(dim1=-2, dim2=-1).to(C128), atol=0.0, rtol=0.0)
    assert bool(H.contains(X).all())
