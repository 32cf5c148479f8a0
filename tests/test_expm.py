"""The fast differentiable matrix exponential (geofunc._expm): values, derivatives, transforms, accuracy.

Speed is not asserted here (benchmarks/ measures it); these tests pin down that the fast
path is never wrong: forward, backward, double backward, forward mode, every torch.func
transform (vmap without the per-sample fallback), and torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import geofunc as gf
from geofunc._expm import _FRAME_H, _STATIC_S, _STATIC_THETA, _expm_static, _frame_forward, _frame_matrix, frame_columns, frame_expm, _products, _real, _theta, _UNIT_ROUNDOFF, choose_degree, expm, expm_frechet
from geofunc._linalg import cayley, skew_lower
from geofunc.testing import no_vmap_fallback

ref_expm = torch.linalg.matrix_exp
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


def _tol(dtype):
    """The accuracy asked of a value, relative to its largest entry (complex: that of its real dtype)."""
    return 1e-5 if _real(dtype) == torch.float32 else 1e-11


def _hi(dtype):
    """The double-precision dtype of the same kind (the reference's)."""
    return torch.complex128 if dtype.is_complex else torch.float64


def _rand(shape, scale, generator, dtype=torch.float64):
    n = shape[-1]
    return torch.randn(shape, generator=generator, dtype=dtype) * scale / math.sqrt(max(n, 1))


# ----------------------------------------------------------------------------- degrees


def test_thresholds_increase_with_degree_and_precision():
    for dtype in (torch.float32, torch.float64):
        u = _UNIT_ROUNDOFF[dtype]
        th = [_theta(m, u) for m in (1, 2, 4, 8, 12, 16, 20, 24)]
        assert all(a < b for a, b in zip(th, th[1:]))
    # the float32 thresholds are larger (fewer squarings for the same norm)
    assert _theta(16, 2.0**-24) > 2 * _theta(16, 2.0**-53)
    assert [_products(m) for m in (1, 2, 4, 8, 12, 16, 20, 24)] == [0, 1, 2, 4, 5, 6, 7, 8]


def test_choice_uses_power_norms(generator):
    # A random skew generator with entries ~ N(0, 1/n): ‖A‖₁ ≈ 0.8 √n but its spectral radius is ~2;
    # the α₃ bound sees that, so at most 2 squarings are needed (‖A‖₁ alone would ask for ~4).
    A = skew_lower(_rand((256, 256), 1.0, generator, torch.float32))
    m, s, _ = choose_degree(A)
    assert s <= 2
    assert choose_degree(torch.zeros(4, 4))[:2] == (1, 0)
    # a strictly triangular (nilpotent) matrix of any norm: no squaring at all
    N = torch.triu(torch.full((3, 3), 1e3, dtype=torch.float64), 1)
    assert choose_degree(N)[1] == 0
    torch.testing.assert_close(expm(N), ref_expm(N), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_small_choice_is_the_two_step_choice(dtype, generator, monkeypatch):
    """Note [Small degree choice]: small matrices get their powers before the choice; the degree, the
    squarings and the powers are those of the two-step choice, across every branch (low degrees from
    ‖A‖₁, high ones from α₃, squarings, the rescaled fallback past 2¹⁶, a NaN/inf matrix in the batch)."""
    import geofunc._expm as E

    seen = set()
    for n in (1, 2, 8, 16):
        for scale in (0.0, 1e-7, 1e-3, 0.04, 0.3, 1.5, 8.0, 300.0, 1e6):
            A = _rand((3, n, n), scale, generator, dtype)
            for X in (A, A[0], A.mT):
                Y = X.clone()
                if X.ndim == 3:
                    Y[1, 0, 0] = float("nan")
                    Y[2, -1, 0] = float("inf")
                for Z in (X, Y):
                    small = E._small_choice(Z, E._UNIT_ROUNDOFF[_real(dtype)])
                    fast = choose_degree(Z)
                    monkeypatch.setattr(E, "_SPECULATE_N", 0)
                    slow = choose_degree(Z)
                    monkeypatch.setattr(E, "_SPECULATE_N", 16)
                    assert fast[:2] == slow[:2], (n, scale)
                    assert (fast[2] is None) == (slow[2] is None)
                    if fast[2] is not None:
                        assert fast[2][0] == slow[2][0]
                        for P, Q in zip(fast[2][1], slow[2][1]):
                            assert torch.equal(P.nan_to_num(0.0, 0.0, 0.0), Q.nan_to_num(0.0, 0.0, 0.0))
                    seen.add("fallback" if small is None else ("low" if fast[2] is None else f"s={fast[1] > 0}"))
    assert seen == {"low", "s=False", "s=True", "fallback"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_degrees_hold_their_bound(dtype, generator):
    """A low degree m (1, 2, 4, chosen from ‖A‖₁ alone) is taken up to its θ_m(u) and not past it: a
    looser threshold (θ_m 4× too large) kept float32 results within ``_tol`` (43u at ‖A‖₁ = 3.9 θ_4)
    while failing the unit roundoff the choice promises. Below θ_m, and past it on the higher degree,
    float32 values are float64's to 8u (random matrices reach 2u)."""
    u = _UNIT_ROUNDOFF[dtype]
    for m in (1, 2, 4):
        th = _theta(m, u)
        for f in (0.99, 1.01, 2.0, 3.9):
            for n in (2, 5, 16, 40):
                A = torch.randn(16, n, n, generator=generator, dtype=torch.float64)
                A = (A * (th * f / torch.linalg.matrix_norm(A, ord=1)[..., None, None])).to(dtype)
                degree = choose_degree(A)[0]
                assert (degree <= m) if f < 1 else (degree > m), (m, f, n, degree)
                if dtype == torch.float32:
                    R = ref_expm(A.double())
                    err = ((expm(A).double() - R).abs().amax((-2, -1)) / R.abs().amax((-2, -1))).max().item()
                    assert err <= 8 * u, (m, f, n, err / u)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-3, 0.3, 1.0, 4.0, 30.0, 1e3])
def test_matches_matrix_exp(scale, dtype, generator):
    for shape in ((1, 1), (3, 3), (2, 8, 8), (2, 1, 5, 5), (40, 40)):
        A = _rand(shape, scale, generator, dtype)
        if scale >= 30.0:  # keep the exponential in range: skew(-Hermitian) (orthogonal/unitary result)
            A = A - A.mH
        X = expm(A)
        R = ref_expm(A.to(_hi(dtype)))
        tol = _tol(dtype)
        err = ((X.to(_hi(dtype)) - R).abs().amax() / R.abs().amax().clamp(min=1)).item()
        assert err < tol * max(1.0, scale) ** 0.5, (shape, scale, err)


def test_nan_and_inf_propagate():
    A = torch.zeros(2, 4, 4)
    A[0, 1, 2] = float("nan")
    A[1, 0, 3] = float("inf")
    X = expm(A)
    assert torch.isnan(X[0]).any()
    assert not torch.isfinite(X[1]).all()


def test_empty_and_meta_inputs_fall_back():
    assert expm(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    assert expm(torch.zeros(2, 3, 3, device="meta")).shape == (2, 3, 3)


@pytest.mark.parametrize("n", [2, 8, 20])
def test_empty_batch_degree_choice_and_frame_exponential(n):
    """An empty batch has no norm to read (amax refuses an empty reduction): the degree choice reads
    0, and the frame exponential, which the tall chart calls without expm's fallback, maps it (the
    empty-batch crash of the rank family and of narrow frames)."""
    assert choose_degree(torch.zeros(0, n, n))[:2] == (1, 0)
    assert choose_degree(torch.zeros(0, 2, n, n, dtype=torch.complex128))[:2] == (1, 0)
    T = torch.zeros(0, n, n, requires_grad=True)
    R = torch.zeros(0, n, n, requires_grad=True)
    F = frame_expm(T, R, torch.ones(0, 1, 1))
    assert F.shape == (0, 2 * n, n)
    F.sum().backward()
    assert T.grad.shape == (0, n, n) and R.grad.shape == (0, n, n)


# Note [Low degrees and NaN]: a non-finite matrix reads as norm 0 in the degree choice, so beside small
# (or no) neighbours it gets degree 1 or 2, whose value and adjoint hardly read it.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-5, 1.0], ids=["zero", "degree1", "degree2", "high"])
def test_nan_matrix_has_nan_value_and_gradient_at_every_degree(scale, dtype, generator):
    n = 5
    A = _rand((3, n, n), scale, generator, dtype)
    A[0, 3, 1] = float("nan")
    A[2, 0, 4] = float("inf")
    G = _rand((3, n, n), 1.0, generator, dtype)
    f = lambda A: (expm(A) * G.conj()).sum().real  # noqa: E731
    Ag = A.clone().requires_grad_()
    X = expm(Ag)
    X.backward(G)
    gf_ = grad(f)(A)
    gv = vmap(grad(lambda a, g: (expm(a) * g.conj()).sum().real))(A, G)
    tangent = jvp(expm, (A,), (G,))[1]
    for what, out in (("value", X.detach()), ("autograd", Ag.grad), ("grad", gf_), ("vmap(grad)", gv), ("jvp", tangent)):
        assert torch.isnan(out[0]).all() and not torch.isfinite(out[2]).any(), what  # every entry, not only A's NaN
        assert torch.isfinite(out[1]).all(), what
    # the finite neighbour is computed as alone (the same degree: non-finite matrices read as 0)
    a = A[1:2].clone().requires_grad_()
    expm(a).backward(G[1:2])
    assert choose_degree(A)[:2] == choose_degree(A[1:2])[:2]
    torch.testing.assert_close(X[1:2].detach(), expm(A[1:2]), rtol=0, atol=0)
    torch.testing.assert_close(Ag.grad[1:2], a.grad, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1e-9, 1.0])
def test_frame_exponential_of_a_nan_matrix_has_nan_gradients(scale, generator):
    T, R, c = _frame_inputs(4, scale, generator, torch.float64, (2,))
    T[0, 1, 0] = float("nan")
    T, R = T.requires_grad_(), R.requires_grad_()
    F = frame_expm(T, R, c)
    F.backward(torch.ones_like(F))
    assert torch.isnan(F[0]).all() and torch.isnan(T.grad[0]).all() and torch.isnan(R.grad[0]).all()
    assert torch.isfinite(F[1]).all() and torch.isfinite(T.grad[1]).all() and torch.isfinite(R.grad[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linalg_expm_is_the_fast_one(dtype, generator):
    A = _rand((6, 6), 1.0, generator, dtype).requires_grad_()
    X = gf._linalg.expm(A)
    assert type(X.grad_fn).__name__.startswith("_ExpmBackward")


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_calls_agree_with_the_function(dtype, generator):
    """Note [Plain eager calls]: with nothing to record the values are evaluated directly, bit for bit
    the Function's; with a graph, a forward-mode level, or a functorch wrapper that outlived its
    transform, the Function runs (and records what each asks for)."""
    A = _rand((3, 6, 6), 3.0, generator, dtype)
    with_graph = expm(A.clone().requires_grad_())
    assert type(with_graph.grad_fn).__name__.startswith("_ExpmBackward")
    direct = expm(A)
    assert direct.grad_fn is None and torch.equal(direct, with_graph.detach())
    with torch.no_grad():
        assert torch.equal(expm(A.clone().requires_grad_()), direct)
    E = _rand((3, 6, 6), 1.0, generator, dtype)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(expm(torch.autograd.forward_ad.make_dual(A, E))).tangent
    torch.testing.assert_close(tangent, expm_frechet(A, E), rtol=0, atol=0)
    leaked = []
    grad(lambda a: (leaked.append(a), a.sum().real)[1])(A)
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    assert torch.equal(expm(leaked[0]), direct)


# ----------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.5, 3.0, 20.0])
def test_gradcheck_gradgradcheck(scale, dtype, generator):
    """Complex: gradcheck checks both Wirtinger derivatives (the adjoint's conjugate transposes)."""
    A = _rand((2, 5, 5), scale, generator, dtype).requires_grad_()
    assert torch.autograd.gradcheck(expm, (A,))
    assert torch.autograd.gradgradcheck(expm, (A,))
    assert torch.autograd.gradcheck(expm, (A,), check_forward_ad=True, check_backward_ad=False, check_batched_grad=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_forward_over_reverse_under_a_dual_level(dtype, generator):
    """gradgradcheck's forward-over-reverse check takes the tangent of a backward that builds a graph
    under a torch.autograd.forward_ad dual level: the adjoint node's jvp rule, a torch.func.jvp, raised
    'Nested forward mode AD is not supported' there (Note [Adjoint under a dual level])."""
    A = _rand((3, 3), 3.0, generator, dtype).requires_grad_()  # degree 8 and a squaring
    assert torch.autograd.gradgradcheck(expm, (A,), check_fwd_over_rev=True)


@pytest.mark.parametrize("create_graph", [True, False], ids=["create_graph", "no graph"])
@pytest.mark.parametrize("space,shape", [(gf.SO(), (4, 4)), (gf.Stiefel(), (5, 2)), (gf.LowRank(rank=2), (4, 3)),
                                         (gf.PSD(), (3, 3)), (gf.SL(), (3, 3)), (gf.GLp(), (3, 3)),
                                         (gf.Grassmannian(), (5, 2)), (gf.FixedRank(rank=2), (4, 3)),
                                         (gf.Sphere(), (5,)), (gf.Oblique(), (4, 3))], ids=lambda x: str(x))
def test_hessian_vector_product_forward_over_reverse(space, shape, create_graph, generator):
    """``H v`` as the tangent of ``grad(loss)`` under a dual level (forward over reverse, the cheap
    Hessian-vector product) equals central differences of the gradient (float64). Without
    ``create_graph`` too: the dual level still records the backward's tangents (torch's own ops give
    them), where the one-node backwards of the exponential and the sphere chart gave tangents
    without the map's second derivative, or none (Note [Adjoint under a dual level])."""
    import torch.autograd.forward_ad as fwAD

    Z = torch.randn(shape, generator=generator, dtype=torch.float64)
    v = torch.randn(shape, generator=generator, dtype=torch.float64)
    W = torch.randn(shape, generator=generator, dtype=torch.float64)

    def gradient(z):
        z = z.clone().requires_grad_()
        X = space.to_manifold(z)
        return torch.autograd.grad(((X * W).sum() + X.pow(3).sum()), z, create_graph=create_graph)[0]

    with fwAD.dual_level():
        hv = fwAD.unpack_dual(gradient(fwAD.make_dual(Z.clone(), v))).tangent
    h = 1e-5
    fd = (gradient(Z + h * v) - gradient(Z - h * v)) / (2 * h)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 2.0, 40.0], ids=["degree 4", "degree 8+", "squarings"])
def test_intermediates_go_through_saved_tensor_hooks(scale, generator):
    """The adjoint's intermediates (powers, Horner steps, squarings) are saved tensors: a
    saved_tensors_hooks pack hook sees them, so activation checkpointing (use_reentrant=False) frees
    them and recomputes them, and save_on_cpu moves them. On a context attribute they stayed alive
    beside a checkpointed forward (Note [Intermediates as saved tensors]). Gradients, retained-graph
    and double backward through hooks that copy every saved tensor are those without hooks."""
    from torch.utils.checkpoint import checkpoint

    A = _rand((2, 6, 6), scale, generator).requires_grad_()
    G = torch.randn(2, 6, 6, generator=generator, dtype=torch.float64)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        X = expm(A)
    assert len(packed) >= 3, packed  # A and the intermediates (one power at least, and the Horner steps)
    ref = torch.autograd.grad((ref_expm(A) * G).sum(), A, create_graph=True)[0]
    loss = (X * G).sum()
    g1 = torch.autograd.grad(loss, A, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, A, create_graph=True)[0]
    torch.testing.assert_close(g1, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g2, ref, rtol=1e-10, atol=1e-10)
    (h,) = torch.autograd.grad((g2 * G).sum(), A)
    torch.testing.assert_close(h, torch.autograd.grad((ref * G).sum(), A)[0], rtol=1e-8, atol=1e-8)
    before = len(packed)
    gc = torch.autograd.grad((checkpoint(expm, A, use_reentrant=False) * G).sum(), A)[0]
    torch.testing.assert_close(gc, ref.detach(), rtol=1e-10, atol=1e-10)
    assert len(packed) == before  # (checkpoint's own hooks replace the outer ones)


def _assert_same_under_hooks(derivatives, hooks):
    """``derivatives(ctx)`` inside ``save_on_cpu`` or copying hooks equals it without hooks (1e-10)."""
    import contextlib

    if hooks == "save_on_cpu":
        ctx = torch.autograd.graph.save_on_cpu()
    else:
        ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
    for got, want in zip(derivatives(ctx), derivatives(contextlib.nullcontext())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _three_orders(fn, X, G, V):
    """``g = ∇⟨sin fn(X), G⟩`` and ``h = ∇⟨g, V⟩`` (graphs kept), ``t = ∇‖h‖²``: first to third derivatives."""
    (g,) = torch.autograd.grad((fn(X).sin() * G).sum(), X, create_graph=True)
    (h,) = torch.autograd.grad((g * V).sum(), X, create_graph=True)
    (t,) = torch.autograd.grad((h * h).sum(), X)
    return g, h, t


@pytest.mark.parametrize("hooks", ["save_on_cpu", "copy"])
@pytest.mark.parametrize("scale", [2.0, 40.0], ids=["degree 8+", "squarings"])
def test_higher_derivatives_inside_saved_tensor_hooks(hooks, scale, generator):
    """Second and third derivatives taken by plain autograd while saved-tensor hooks are active (a
    Hessian-vector product inside save_on_cpu): the adjoint node's backward ran torch.func.vjp, which
    raised torch.func's "don't yet support saved tensor hooks" (Note [Adjoint derivatives under
    saved-tensor hooks]). The derivatives equal those without hooks."""
    A0 = _rand((2, 6, 6), scale, generator)
    G = torch.randn(2, 6, 6, generator=generator, dtype=torch.float64)
    V = torch.randn(2, 6, 6, generator=generator, dtype=torch.float64)

    def derivatives(ctx):
        A = A0.clone().requires_grad_()
        with ctx:
            g, h, t = _three_orders(expm, A, G, V)
        return g.detach(), h.detach(), t

    _assert_same_under_hooks(derivatives, hooks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_jvp_matches_finite_differences(dtype, generator):
    A = _rand((6, 6), 2.0, generator, dtype)
    E = _rand((6, 6), 1.0, generator, dtype)
    _, t = jvp(expm, (A,), (E,))
    h = 1e-6
    fd = (ref_expm(A + h * E) - ref_expm(A - h * E)) / (2 * h)
    torch.testing.assert_close(t, fd, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(expm_frechet(A, E), t, rtol=1e-12, atol=1e-12)


def _loss(f, W):
    """A real loss, not holomorphic for complex ``a`` (``.real`` is the identity on real tensors)."""
    return lambda a: ((f(a) * W).sum() + (f(a) ** 2).sum()).real


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule for aten..matrix_exp")
def test_transforms_agree_with_matrix_exp(generator):
    A = _rand((4, 5, 5), 2.0, generator)
    W = _rand((5, 5), 1.0, generator)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    a = A[0]
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    # outside no_vmap_fallback: torch 2.6 has no batching rule for matrix_exp's derivatives (only the reference needs one)
    Hs = vmap(hessian(fr))(A[:2])
    with no_vmap_fallback():
        close(vmap(expm)(A), ref_expm(A))
        close(vmap(expm, in_dims=1)(A.transpose(0, 1)), ref_expm(A))
        close(vmap(vmap(expm))(A.reshape(2, 2, 5, 5)), ref_expm(A).reshape(2, 2, 5, 5))
        close(grad(f)(a), grad(fr)(a))
        close(vmap(grad(f))(A), vmap(grad(fr))(A))
        close(jacfwd(expm)(a), jacrev(expm)(a))
        close(jacfwd(expm)(a), jacrev(ref_expm)(a))
        H = hessian(fr)(a)
        close(hessian(f)(a), H)
        close(jacrev(jacrev(f))(a), H)
        close(jacfwd(jacfwd(f))(a), H)  # nested forward mode (falls back to matrix_exp)
        close(jacrev(jacfwd(f))(a), H)
        close(vmap(hessian(f))(A[:2]), Hs)


@pytest.mark.parametrize("scale", [1e-9, 2.0])
def test_complex_transforms_agree_with_matrix_exp(scale, generator):
    """Complex generators under every transform that takes them; the second derivatives (the
    adjoint node's own rules, and the static schedule under nested forward mode) on real views,
    since jacrev/jacfwd refuse complex inputs."""
    C = torch.complex128
    A = _rand((4, 5, 5), scale, generator, C)
    E = _rand((5, 5), 1.0, generator, C)
    W = _rand((5, 5), 1.0, generator, C)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    a = A[0]
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    real = lambda g: lambda ar: g(torch.view_as_complex(ar))
    with no_vmap_fallback():
        close(vmap(expm)(A), ref_expm(A))
        close(vmap(expm, in_dims=1)(A.transpose(0, 1)), ref_expm(A))
        close(grad(f)(a), grad(fr)(a))
        close(vmap(grad(f))(A), vmap(grad(fr))(A))
        close(jvp(expm, (a,), (E,))[1], jvp(ref_expm, (a,), (E,))[1])
        close(vmap(lambda x: jvp(expm, (x,), (E,))[1])(A), vmap(lambda x: jvp(ref_expm, (x,), (E,))[1])(A))
        ar = torch.view_as_real(a)
        H = hessian(real(fr))(ar)
        close(hessian(real(f))(ar), H)
        close(jacrev(jacrev(real(f)))(ar), H)
        close(jacfwd(jacfwd(real(f)))(ar), H)


def test_complex_matches_scipy_with_squarings(generator):
    """complex128 values against scipy's Padé exponential, up to norms that need 10 squarings."""
    import scipy.linalg

    for scale in (0.5, 30.0, 1e3):
        A = _rand((12, 12), scale, generator, torch.complex128)
        A = A - A.mH if scale > 1.0 else A
        s = choose_degree(A)[1]
        assert s >= {0.5: 0, 30.0: 4, 1e3: 9}[scale]
        R = torch.from_numpy(scipy.linalg.expm(A.numpy()))
        err = ((expm(A) - R).abs().amax() / R.abs().amax().clamp(min=1)).item()
        assert err < 1e-11 * max(1.0, scale) ** 0.5, (scale, err)


def test_grad_inside_vmap_over_so(generator):
    Z = _rand((3, 6, 6), 1.0, generator)
    W = _rand((6, 6), 1.0, generator)
    f = lambda z: (gf.SO().to_manifold(z) * W).sum()
    fr = lambda z: (ref_expm(skew_lower(z)) * W).sum()
    with no_vmap_fallback():
        torch.testing.assert_close(vmap(grad(f))(Z), vmap(grad(fr))(Z), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("in_dims", [0, 1])
def test_vmap_under_grad_reads_every_batch_entry(in_dims, generator):
    """Under vmap with two derivative levels (MAML: grad of vmapped inner grads) small exponentials
    run as torch ops whose degree and squarings are read through the transforms' wrappers: the
    largest norm of the whole batch must set them. One matrix of norm ~40 (squarings needed)
    among small ones: every entry's gradient (vmap of grad: the Function) and grad of grad (the
    op chain) agree with matrix_exp's."""
    A = _rand((4, 6, 6), 0.05, generator)
    A[2] = _rand((6, 6), 40.0, generator)
    W = _rand((6, 6), 1.0, generator)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    X = A if in_dims == 0 else A.transpose(0, 1)

    def g_of(loss):  # each entry's gradient, from a grad level inside the vmap
        return vmap(grad(loss), in_dims=in_dims)(X)

    def gg_of(loss):  # outer grad of the vmapped inner grads (grad of grad, as in MAML)
        return grad(lambda X: (vmap(grad(loss), in_dims=in_dims)(X) * W).sum())(X)

    with no_vmap_fallback():
        for got, ref in ((g_of(f), g_of(fr)), (gg_of(f), gg_of(fr))):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


def _graph_nodes(fn) -> set[str]:
    """The names of the autograd nodes reachable from ``fn``. The walk keeps every node object it met:
    ``next_functions`` makes a node's Python object anew where none is alive, so an ``id`` it kept of
    a freed one can come back on another node, which the walk then skipped with all it leads to (the
    Unitary test below failed so on torch 2.11, and could have passed over a ``MatrixExp``)."""
    seen, todo = {}, [fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = fn
            todo.extend(f for f, _ in fn.next_functions)
    return {type(f).__name__ for f in seen.values()}


def test_graph_nodes_walks_the_whole_graph(generator):
    """The walk reaches the exponential's node under a product with a base, the output a temporary."""
    Z = _rand((3, 6, 6), 1.0, generator, torch.complex128)
    base = gf.Unitary().sample((3, 6, 6), generator=generator, dtype=torch.complex128)
    for _ in range(5):
        names = _graph_nodes(gf.Unitary().to_manifold(Z.clone().requires_grad_(), base).grad_fn)
        assert {"_ExpmBackward", "TrilBackward0", "AccumulateGrad"} <= names


def test_unitary_chart_is_the_fast_exponential(generator):
    """``Unitary``'s chart and retraction use the fast exponential (fails if complex falls back to matrix_exp)."""
    C = torch.complex128
    Z = _rand((3, 6, 6), 1.0, generator, C)
    W = _rand((6, 6), 1.0, generator, C)
    U = gf.Unitary()
    X = U.to_manifold(Z.clone().requires_grad_())
    assert type(X.grad_fn).__name__.startswith("_ExpmBackward")
    base = U.sample((3, 6, 6), generator=generator, dtype=C)
    V = U.tangent(base, W).requires_grad_()
    for Y in (U.to_manifold(Z.clone().requires_grad_(), base), U.retract(base, V)):
        names = _graph_nodes(Y.grad_fn)
        assert any(n.startswith("_ExpmBackward") for n in names) and not any("MatrixExp" in n for n in names)
    f = lambda z: (U.to_manifold(z) * W).sum().real
    fr = lambda z: (ref_expm(skew_lower(z)) * W).sum().real
    with no_vmap_fallback():
        torch.testing.assert_close(vmap(grad(f))(Z), vmap(grad(fr))(Z), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_compile_fullgraph(dtype, generator):
    A = _rand((5, 5), 1.0, generator, dtype)
    W = _rand((5, 5), 1.0, generator, dtype)
    f = _loss(expm, W)
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(A), f(A), rtol=1e-10, atol=1e-10)
    cg = torch.compile(grad(f), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cg(A), grad(f)(A), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- static schedule


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-3, 0.3, 1.0, 4.0, 30.0, 300.0])
def test_static_schedule_matches_matrix_exp(scale, dtype, generator):
    """The compile-time schedule (fixed degree, squarings chosen by torch.where) is as accurate as the eager one."""
    for shape in ((1, 1), (3, 3), (2, 8, 8), (2, 1, 5, 5), (40, 40)):
        A = _rand(shape, scale, generator, dtype)
        if scale >= 30.0:
            A = A - A.mH
        X = _expm_static(A)
        R = ref_expm(A.to(_hi(dtype)))
        tol = _tol(dtype)
        err = ((X.to(_hi(dtype)) - R).abs().amax() / R.abs().amax().clamp(min=1)).item()
        assert err < tol * max(1.0, scale) ** 0.5, (shape, scale, err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_schedule_beyond_its_bound_is_nan_per_matrix(dtype):
    limit = _STATIC_THETA[_real(dtype)] * 2.0**_STATIC_S
    A = torch.zeros(3, 2, 2, dtype=dtype)
    A[0, 0, 1], A[0, 1, 0] = 0.9 * limit, -0.9 * limit  # a rotation by 0.9·limit: in range
    A[1, 0, 1], A[1, 1, 0] = 1.1 * limit, -1.1 * limit  # beyond: NaN, not an inaccurate point
    A[2, 0, 0] = float("nan")
    X = _expm_static(A)
    assert torch.isnan(X[1]).all() and torch.isnan(X[2]).all()
    tol = _tol(dtype) * limit**0.5  # the rule of test_matches_matrix_exp
    torch.testing.assert_close(X[0].to(_hi(dtype)), ref_expm(A[0].to(_hi(dtype))), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_static_schedule_derivatives_are_nan_where_the_value_is(dtype, generator):
    """Beyond its bound or at a NaN input the static schedule's value is NaN, and so are its gradient
    and its tangent (a torch.where would have given them 0: finite numbers for a NaN input)."""
    limit = _STATIC_THETA[_real(dtype)] * 2.0**_STATIC_S
    A = _rand((3, 3, 3), 1.0, generator, dtype)
    A[1, 0, 1], A[1, 1, 0] = 1.1 * limit, -1.1 * limit
    A[2, 2, 1] = float("nan")
    G = _rand((3, 3, 3), 1.0, generator, dtype)
    g = grad(lambda a: (_expm_static(a) * G.conj()).sum().real)(A)
    t = jvp(_expm_static, (A,), (G,))[1]
    for out in (g, t):
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
        assert torch.isfinite(out[0]).all()
    g0 = grad(lambda a: (_expm_static(a) * G[:1].conj()).sum().real)(A[:1])
    torch.testing.assert_close(g[:1], g0, rtol=1e-12, atol=1e-12)


def test_static_schedule_under_transforms(generator):
    A = _rand((3, 5, 5), 6.0, generator)
    W = _rand((5, 5), 1.0, generator)
    f, fr = _loss(_expm_static, W), _loss(ref_expm, W)
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    with no_vmap_fallback():
        close(vmap(_expm_static)(A), ref_expm(A))
        close(vmap(grad(f))(A), vmap(grad(fr))(A))
        close(hessian(f)(A[0]), hessian(fr)(A[0]))
        close(jacfwd(jacfwd(f))(A[0]), hessian(fr)(A[0]))


# ----------------------------------------------------------------------------- compiled exponential


def _recording(targets):
    """A torch.compile backend that records the targets of AOTAutograd's forward and backward graphs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _assert_kernels(targets):
    assert "geofunc.expm_powers.default" in targets and "geofunc.expm_vjp.default" in targets, targets
    assert not any("matrix_exp" in t or "where" in t for t in targets)  # neither matrix_exp nor the static schedule


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_compiled_graph_has_the_fast_exponential(dtype, generator):
    """Inside torch.compile the exponential and its adjoint are the geofunc::expm / expm_vjp kernels, which
    choose the eager schedule from the values at run time (Note [Compiled exponential]): one graph, no
    matrix_exp, no static schedule; under torch.func.grad and with backward() outside the compiled forward."""
    A = _rand((2, 6, 6), 3.0, generator, dtype)
    W = _rand((6, 6), 1.0, generator, dtype)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    targets = []
    torch._dynamo.reset()
    g = torch.compile(grad(f), fullgraph=True, backend=_recording(targets))(A)
    torch.testing.assert_close(g, grad(fr)(A), rtol=1e-9, atol=1e-9)
    _assert_kernels(targets)
    targets.clear()
    torch._dynamo.reset()
    a = A.clone().requires_grad_()
    value = torch.compile(f, fullgraph=True, backend=_recording(targets))(a)
    value.backward()
    torch.testing.assert_close(value, fr(A), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.grad, grad(fr)(A), rtol=1e-9, atol=1e-9)
    _assert_kernels(targets)


# Nested forward mode inside torch.compile: the trace of the geofunc:: operators hits an internal
# assert in aten::_fw_primal during FakeTensor propagation when no forward-mode program has been
# compiled since the last torch._dynamo.reset() (torch 2.13 and 2.14; a compiled jvp of plain torch
# ops before it avoids it). A documented limitation (README, "Known limitations"); these tests warm
# up that way so that they do not depend on which test ran before.
_COMPILED_TRANSFORMS = ["grad", "vmap", "vmap(grad)", "grad(vmap)", "jacrev", "jvp", "hessian", "jacfwd(jacfwd)", "grad(grad)"]


def _warm_forward_mode(name: str) -> None:
    """Compile a forward-mode program of plain torch ops first (see _NESTED_FORWARD_IN_COMPILE), so
    that the nested forward-mode case does not depend on which test ran before it."""
    if name == "jacfwd(jacfwd)":
        x = torch.ones(2, dtype=torch.float64)
        torch.compile(lambda a: jvp(lambda y: y.sin().sum(), (a,), (a,))[1], fullgraph=True, backend="aot_eager")(x)


def _transformed(name, e, W):
    """``name``'s transform of the exponential ``e`` (or of a real loss of it) as a function of a batch ``a``."""
    f = _loss(e, W)
    return {
        "grad": grad(f),
        "vmap": vmap(e),
        "vmap(grad)": vmap(grad(f)),
        "grad(vmap)": grad(lambda a: vmap(f)(a).sum()),
        "jacrev": lambda a: jacrev(e)(a[0]),
        "jvp": lambda a: jvp(f, (a[0],), (a[1],))[1],
        "hessian": lambda a: hessian(f)(a[0]),
        "jacfwd(jacfwd)": lambda a: jacfwd(jacfwd(f))(a[0]),
        "grad(grad)": lambda a: grad(lambda b: (grad(f)(b) * W).sum().real)(a[0]),
    }[name]


@pytest.mark.parametrize("name", _COMPILED_TRANSFORMS)
def test_compiled_exponential_under_transforms(name, generator):
    """Every torch.func transform inside torch.compile (fullgraph) agrees with matrix_exp: first derivatives run
    the kernels, their derivatives and forward mode the static schedule's ops (exact to every order)."""
    A = _rand((3, 4, 4), 2.0, generator)
    W = _rand((4, 4), 1.0, generator)
    torch._dynamo.reset()
    _warm_forward_mode(name)
    out = torch.compile(_transformed(name, expm, W), fullgraph=True, backend="aot_eager")(A)
    torch.testing.assert_close(out, _transformed(name, ref_expm, W)(A), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vmap(grad)", "grad(grad)"])
def test_compiled_exponential_complex(name, generator):
    A = _rand((3, 4, 4), 2.0, generator, torch.complex128)
    W = _rand((4, 4), 1.0, generator, torch.complex128)
    torch._dynamo.reset()
    out = torch.compile(_transformed(name, expm, W), fullgraph=True, backend="aot_eager")(A)
    torch.testing.assert_close(out, _transformed(name, ref_expm, W)(A), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 2.0, 40.0])  # a small degree (no powers), degree ≥ 8, squarings
def test_compiled_kernels_pass_opcheck(dtype, scale, generator):
    """torch.library.opcheck (schema, fake kernels, autograd registration, AOT dispatch) on batched inputs;
    the kernels' values are the eager schedule's: the exponential, the powers its degree choice read (zeros
    for the small degrees chosen from ‖A‖₁), and the adjoint (from those powers, as from scratch)."""
    A = _rand((2, 5, 5), scale, generator, dtype).requires_grad_()
    G = _rand((2, 5, 5), 1.0, generator, dtype).requires_grad_()
    ops = torch.ops.geofunc
    with torch.no_grad():
        X, P = ops.expm_powers(A)
    torch.library.opcheck(ops.expm.default, (A,))
    torch.library.opcheck(ops.expm_powers.default, (A,))
    torch.library.opcheck(ops.expm_vjp.default, (A, P, G))
    tol = 1e-12 if _real(dtype) == torch.float64 else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(ops.expm(A), expm(A), rtol=0, atol=0)
        torch.testing.assert_close(X, expm(A), rtol=0, atol=0)
        m, s, pre = choose_degree(A)
        if pre is None:
            assert not P.any()
        else:
            assert torch.equal(P, torch.stack(pre[1][1:], dim=-3))
        vjp = torch.func.vjp(expm, A.detach())[1](G.detach())[0]
        torch.testing.assert_close(ops.expm_vjp(A, P, G), vjp, rtol=tol, atol=tol)


LAYOUTS = {
    "transposed": lambda t: t.mT.contiguous().mT,  # the values of t, its matrices stored by columns
    "batch-last": lambda t: t.movedim(0, -1).contiguous().movedim(-1, 0),  # the batch dimension innermost
    "expanded": lambda t: t[:1].expand_as(t),  # one matrix, stride 0 over the batch
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("scale", [1e-9, 1e-5, 2.0, 40.0], ids=["degree 1", "degree 2", "degree 8+", "squarings"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_kernels_return_what_their_fake_kernels_say(layout, scale, dtype, generator):
    """The operators' outputs have the shapes and strides of their fake kernels (contiguous) whatever the
    layout of their inputs: a compiled graph reads an extern kernel's output with the fake's strides
    (inductor asserts them), and I + A from a transposed A kept A's strides (opcheck's
    test_faketensor failed at degrees 1 and 2). Values equal those from contiguous inputs."""
    lay = LAYOUTS[layout]
    A0 = _rand((3, 5, 5), scale, generator, dtype)
    A0 = A0 - A0.mT.conj()
    G0 = _rand((3, 5, 5), 1.0, generator, dtype)
    ops = torch.ops.geofunc
    X0, P0 = ops.expm_powers(A0)
    A, G, P = lay(A0), lay(G0), lay(P0.movedim(-3, 0)).movedim(0, -3)
    for op, args in ((ops.expm.default, (A,)), (ops.expm_powers.default, (A,)), (ops.expm_vjp.default, (A0, P0, G)),
                     (ops.expm_vjp.default, (A, P, G))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    if layout != "expanded":  # (the expanded inputs are other values)
        torch.testing.assert_close(ops.expm(A), X0, rtol=0, atol=0)
        torch.testing.assert_close(ops.expm_vjp(A, P, G), ops.expm_vjp(A0, P0, G0), rtol=0, atol=0)
    assert ops.expm(A).is_contiguous() and ops.expm_vjp(A, P, G).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_frame_kernels_return_what_their_fake_kernels_say(layout, dtype, generator):
    """The frame operators' outputs are contiguous, as their fake kernels say, for inputs of any layout."""
    lay = LAYOUTS[layout]
    T, R, c = (t * 1e-6 for t in _frame_inputs(4, 1.0, generator, dtype, (3,)))  # the low degrees
    G = torch.randn(3, 8, 4, generator=generator, dtype=dtype)
    ops = torch.ops.geofunc
    _, P, H = ops.frame_cols_fwd(T, R, c)
    args = (lay(T), lay(R), c)
    for op, a in ((ops.frame_cols.default, args), (ops.frame_cols_fwd.default, args),
                  (ops.frame_cols_bwd.default, (*args, lay(P.movedim(-3, 0)).movedim(0, -3),
                                                lay(H.movedim(-3, 0)).movedim(0, -3), lay(G)))):
        torch.library.opcheck(op, a, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("n,scale", [(16, 5.0), (64, 1.0), (64, 5.0), (128, 1.0)])
def test_float32_gradient_accuracy(n, scale, dtype, generator):
    """float32 (complex64) gradients of the SO (U(n)) expm map within 1e-5 (relative) of double precision."""
    hi = _hi(dtype)
    Z = _rand((n, n), scale, generator, hi)
    W = torch.randn(n, n, generator=generator, dtype=hi)

    def g(Z, f):
        Z = Z.clone().requires_grad_()
        (f(skew_lower(Z)) * W.to(Z.dtype)).sum().real.backward()
        return Z.grad.to(hi)

    ref = g(Z, ref_expm)
    rel = ((g(Z.to(dtype), expm) - ref).norm() / ref.norm()).item()
    assert rel < 1e-5


@pytest.mark.parametrize("space,dtype", [(gf.SO(), torch.float32), (gf.Unitary(), torch.complex64)], ids=["SO", "Unitary"])
@pytest.mark.parametrize("n", [8, 64, 128])
@pytest.mark.parametrize("norm", [1.0, 10.0, 50.0, 200.0])
def test_float32_orthogonality_large_raw_norms(n, norm, space, dtype, generator):
    Z = torch.randn(n, n, generator=generator, dtype=dtype)
    Z = Z / Z.norm() * norm
    X = space.to_manifold(Z)
    err = (X.mH @ X - torch.eye(n)).abs().amax().item()
    assert err <= 2e-5
    torch.testing.assert_close(X.to(_hi(dtype)), ref_expm(skew_lower(Z.to(_hi(dtype)))), rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-4])
def test_second_derivatives_at_tiny_generators(scale, generator):
    """At Z ≈ 0 (just after ``rebase``) the value uses a degree-1/2/4 polynomial; the
    second derivatives must still be those of exp, not of the low-degree polynomial."""
    A = _rand((4, 4), scale, generator)
    W = _rand((4, 4), 1.0, generator)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    H = hessian(fr)(A)
    torch.testing.assert_close(hessian(f)(A), H, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(jacrev(jacrev(f))(A), H, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(jacrev(jacfwd(f))(A), H, rtol=1e-9, atol=1e-9)
    A = A.requires_grad_()
    g = torch.autograd.grad(f(A), A, create_graph=True)[0]
    gr = torch.autograd.grad(fr(A), A, create_graph=True)[0]
    E = _rand((4, 4), 1.0, generator)
    torch.testing.assert_close(torch.autograd.grad((g * E).sum(), A)[0], torch.autograd.grad((gr * E).sum(), A)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_non_finite_matrix_does_not_change_its_neighbours(dtype, generator):
    A = _rand((2, 6, 6), 8.0, generator, dtype)
    A[0, 2, 3] = float("nan")
    X = expm(A)
    assert torch.isnan(X[0]).any()
    torch.testing.assert_close(X[1], ref_expm(A[1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_generators_too_far_to_give_a_point_give_nan(dtype, generator):
    """Note [Too far to be a point]: a skew generator with u·α past 1/64 has no point to give (SO(6) at
    raw scale 1e8 in float32 was 6e3 off its group, finite): NaN in value, gradient and tangent, per
    matrix (its neighbours unchanged), on every path; just below, a finite point off by ~u·α."""
    import geofunc._expm as E

    u = E._UNIT_ROUNDOFF[_real(dtype)]
    S = skew_lower(_rand((3, 6, 6), 1.0, generator, _hi(dtype)))
    S = S / torch.linalg.matrix_norm(S, ord=2)[:, None, None]  # ‖S‖₂ = 1: α ≈ the scale
    far, near = 8 * E._FAR / u, E._FAR / (8 * u)
    A = (S * torch.tensor([far, near, 1.0], dtype=S.dtype)[:, None, None]).to(dtype)
    W = _rand((6, 6), 1.0, generator, dtype)

    def check(X, what):
        assert torch.isnan(X[0]).all(), what
        assert torch.isfinite(X[1:]).all(), what

    X = expm(A)
    check(X, "value")
    err = (X[1:].mH @ X[1:] - torch.eye(6, dtype=dtype)).abs().amax()
    assert err < 0.1, err  # the one below the bound: off by ~u·α ≤ 1/512, not noise
    # the neighbours stay points: the batch shares the far matrix's squarings (one degree choice per
    # batch), which costs them accuracy (float32 ~1e-4), as a large neighbour always did
    tol = 2e-3 if _real(dtype) == torch.float32 else 1e-7
    torch.testing.assert_close(X[2], ref_expm(A[2].to(_hi(dtype))).to(dtype), rtol=0, atol=tol)
    Ag = A.clone().requires_grad_()
    check(torch.autograd.grad((expm(Ag) * W).real.sum(), Ag)[0], "autograd")
    check(grad(lambda A: (expm(A) * W).real.sum())(A), "torch.func.grad")
    check(jvp(expm, (A,), (A / far,))[1], "jvp")
    check(vmap(grad(lambda a: (expm(a) * W).real.sum()))(A), "vmap(grad)")
    check(expm_frechet(A, A / far), "expm_frechet")
    if not dtype.is_complex:
        torch._dynamo.reset()
        check(torch.compile(expm, fullgraph=True, backend="aot_eager")(A), "compile")


# ----------------------------------------------------------------------------- the Cayley map


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cayley_of_non_finite_or_overflowing_input_is_nan_not_an_error(dtype, generator):
    """inv() raises on an exactly zero pivot, which a non-finite generator (or one whose LU overflows)
    can produce: cayley gives NaN there (Note [NaN policy]), its finite neighbours unchanged."""
    A = skew_lower(_rand((4, 6, 6), 1.0, generator, dtype))
    A[1] = A[1] * torch.finfo(dtype).max  # entries ±inf (and ±max)
    A[2, 4, 1], A[2, 1, 4] = float("inf"), -float("inf")
    A[3, 2, 0] = float("nan")
    A = A.requires_grad_()
    X = cayley(A)
    X.backward(torch.ones_like(X))
    for i in (1, 2, 3):
        assert torch.isnan(X[i]).any() and not torch.isfinite(A.grad[i]).all()
    torch.testing.assert_close(X[0], cayley(A[0].detach()), rtol=0, atol=0)
    assert torch.isfinite(A.grad[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_cayley_of_skew_hermitian_is_unitary(dtype, generator):
    """``cayley`` on complex skew-Hermitian generators: a unitary point, the solve's value,
    exact gradients (gradcheck in complex128), batched under vmap without fallback."""
    A = skew_lower(_rand((3, 7, 7), 4.0, generator, dtype))
    X = cayley(A)
    I = torch.eye(7, dtype=dtype)
    assert (X.mH @ X - I).abs().amax().item() <= (2e-6 if _real(dtype) == torch.float32 else 1e-14)
    Ah = A.to(_hi(dtype))
    R = torch.linalg.solve(I.to(Ah.dtype) - Ah / 2, I.to(Ah.dtype) + Ah / 2)
    torch.testing.assert_close(X.to(_hi(dtype)), R, rtol=0, atol=1e-6 if _real(dtype) == torch.float32 else 1e-14)
    if dtype == torch.complex128:
        A = A.requires_grad_()
        assert torch.autograd.gradcheck(cayley, (A,))
        assert torch.autograd.gradgradcheck(cayley, (A,))
        W = _rand((7, 7), 1.0, generator, dtype)
        f = lambda a: (cayley(a) * W).sum().real
        fr = lambda a: (torch.linalg.solve(I - a / 2, I + a / 2) * W).sum().real
        with no_vmap_fallback():
            torch.testing.assert_close(vmap(grad(f))(A.detach()), vmap(grad(fr))(A.detach()), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- the frame exponential
# frame_expm(T, R, c) = expm(M)[..., :k] for M = [[T, R], [c I, 0]], by blocks and on k columns
# (Note [Frame exponential]): the tall frame chart's exponential in plain eager mode.


def _frame_inputs(k, scale, generator, dtype, batch=()):
    """``(T, R, c)`` as the tall frame chart builds them from a raw ``Z`` of norm ~``scale``."""
    n = 3 * k
    Z = torch.randn(batch + (n, k), generator=generator, dtype=torch.float64) * scale / math.sqrt(n)
    Y = torch.linalg.qr(torch.randn(batch + (n, k), generator=generator, dtype=torch.float64))[0]
    S = Y.mT @ Z
    C = Z - Y @ S
    CtC = C.mT @ C
    c = torch.linalg.matrix_norm(CtC, ord=1).sqrt().clamp(min=1e-3)[..., None, None]
    return skew_lower(S).to(dtype), (-CtC / c).to(dtype), c.to(dtype)


def _frame_case(T, R, c):
    """(m, s, by blocks on k columns?) of frame_expm's evaluation."""
    cache = _frame_forward(T.detach(), R.detach(), c)[1]
    return cache["m"], cache["s"], cache["full"] is None


# scales reaching every branch: a low degree from ‖M‖₁ alone, degrees 8-20 without squaring (by
# blocks), squarings (the whole exponential from the block powers), and ‖M‖₁ > 2¹⁶ (expm's choice)
FRAME_SCALES = {1e-3: "low degree", 0.3: "blocks", 0.6: "blocks", 8.0: "squarings", 1e5: "huge"}  # huge: ‖M‖₁ ~ 3e5 > 2¹⁶, below Note [Too far to be a point]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", list(FRAME_SCALES), ids=list(FRAME_SCALES.values()))
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["2d", "3d", "4d"])
def test_frame_expm_is_expm_first_columns(scale, batch, dtype, generator):
    """Values and gradients (T, R) of frame_expm against ``expm(M)[..., :k]`` and ``matrix_exp`` in
    float64, each branch of the evaluation reached."""
    k = 6
    T, R, c = _frame_inputs(k, scale, generator, dtype, batch)
    kind = FRAME_SCALES[scale]
    if kind == "low degree":  # c ≥ 10⁻³ in the chart: ‖M‖₁ reaches float64's θ₄ only with a smaller c
        T, R, c = T * 1e-6, R * 1e-6, c * 1e-6
    m, s, blocks = _frame_case(T, R, c)
    assert blocks == (kind == "blocks") and (m >= 8) == (kind != "low degree") and (s > 0) == (kind in ("squarings", "huge"))
    T, R = T.requires_grad_(), R.requires_grad_()
    G = torch.randn(batch + (2 * k, k), generator=generator, dtype=dtype)
    F = frame_expm(T, R, c)
    gT, gR = torch.autograd.grad((F * G).sum(), [T, R])
    F2 = expm(_frame_matrix(T, R, c))[..., :k]
    gT2, gR2 = torch.autograd.grad((F2 * G).sum(), [T, R])
    Th, Rh = T.detach().double().requires_grad_(), R.detach().double().requires_grad_()
    Fr = ref_expm(_frame_matrix(Th, Rh, c.double()))[..., :k]
    gTr, gRr = torch.autograd.grad((Fr * G.double()).sum(), [Th, Rh])
    for new, old, ref in ((F, F2, Fr), (gT, gT2, gTr), (gR, gR2, gRr)):
        scale_ = max(1.0, ref.detach().abs().amax().item())
        tol = _tol(dtype) * scale_
        torch.testing.assert_close(new, old, rtol=0, atol=tol)
        if kind != "huge":  # exp of a non-normal M at ‖M‖₁ ~ 10⁶ is ill-conditioned: there the claim is expm's columns
            torch.testing.assert_close(new.double(), ref, rtol=0, atol=tol)
    # nothing to record: the values alone, the same
    torch.testing.assert_close(frame_expm(T.detach(), R.detach(), c), F.detach(), rtol=0, atol=0)


def test_frame_expm_counts_the_products_its_note_states():
    """Note [Frame exponential]'s count, in k³ FLOP units (one k×k product; a 2k×2k one is 8) at degree
    16 without squarings: the frame's forward 26 and adjoint 50, against 48 and 96 for ``expm(M)``
    and its adjoint (the note said 48 for the frame's adjoint). Counted, not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    from geofunc._expm import _frame_adjoint

    k = 32
    g = torch.Generator().manual_seed(0)
    T = 0.05 * torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    C = 0.05 * torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    T, R, c = T - T.mT, -(C.mT @ C), torch.ones(1, 1, dtype=torch.float64)
    M = _frame_matrix(T, R, c)
    assert choose_degree(M)[:2] == (16, 0)
    G = torch.randn(2 * k, k, generator=g, dtype=torch.float64)

    def units(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / (2 * k**3)

    _, cache = _frame_forward(T, R, c)
    Mr = M.clone().requires_grad_()
    E = expm(Mr)
    assert units(lambda: _frame_forward(T, R, c)) == 26
    assert units(lambda: _frame_adjoint(T, R, c, cache, G)) == 50
    assert units(lambda: expm(M)) == 48
    assert units(lambda: E.backward(torch.cat([G, torch.zeros_like(G)], -1))) == 96


@pytest.mark.parametrize("scale", [1e-3, 0.6, 1.2, 8.0])
def test_frame_expm_gradcheck_gradgradcheck(scale, generator):
    """Exact first derivatives of the block evaluation, and second ones (a backward that builds a
    graph goes through expm's adjoint node: exact to every order)."""
    T, R, c = _frame_inputs(4, scale, generator, torch.float64, (2,))
    f = lambda T, R: frame_expm(T, R, c)  # noqa: E731
    args = (T.requires_grad_(), R.requires_grad_())
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("scale", [1e-3, 0.6, 8.0])
def test_frame_expm_backward_with_a_graph_under_a_dual_level(scale, generator):
    """A backward that builds a graph under a dual level, the forward outside it (a dual cotangent: the
    tangent of a VJP in its cotangent): the frame node applied the adjoint node, whose jvp rule raised
    torch's "Nested forward mode AD is not supported" (Note [Adjoint under a dual level]). The tangent is
    the VJP of the cotangent's tangent, and the gradient's own derivatives are those without the level."""
    import contextlib

    import torch.autograd.forward_ad as fwAD

    T0, R0, c = _frame_inputs(4, scale, generator, torch.float64, (2,))
    G, dG = (torch.randn(2, 8, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    V = torch.randn(2, 4, 4, generator=generator, dtype=torch.float64)

    def run(dual):
        T, R = T0.clone().requires_grad_(), R0.clone().requires_grad_()
        F = frame_expm(T, R, c)
        with fwAD.dual_level() if dual else contextlib.nullcontext():  # without: the adjoint node's graph
            gT, gR = torch.autograd.grad(F, (T, R), fwAD.make_dual(G, dG) if dual else G, create_graph=True)
            tangents = [fwAD.unpack_dual(x).tangent for x in (gT, gR)]
            gT, gR = (fwAD.unpack_dual(x).primal for x in (gT, gR))
        return (gT, gR), tangents, torch.autograd.grad(((gT * V).sum() + (gR * V).sum()), (T, R))

    T, R = T0.clone().requires_grad_(), R0.clone().requires_grad_()
    want_t = torch.autograd.grad(frame_expm(T, R, c), (T, R), dG)
    (g, tangents, second), (g0, _, second0) = run(True), run(False)
    for got, want in [*zip(tangents, want_t), *zip(g, g0), *zip(second, second0)]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-4])
def test_frame_expm_second_derivatives_at_tiny_generators(scale, generator):
    """Near the chart's centre the value is a degree 1-4 polynomial; second derivatives are exp's."""
    T, R, c = _frame_inputs(4, scale, generator, torch.float64)
    W = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    E = torch.randn(4, 4, generator=generator, dtype=torch.float64)

    def second(f):
        T_ = T.clone().requires_grad_()
        g = torch.autograd.grad(((f(T_) * W).sum() + (f(T_) ** 2).sum()), T_, create_graph=True)[0]
        return torch.autograd.grad((g * E).sum(), T_)[0]

    torch.testing.assert_close(second(lambda T: frame_expm(T, R, c)),
                               second(lambda T: ref_expm(_frame_matrix(T, R, c))[..., :4]), rtol=1e-9, atol=1e-9)


def test_frame_expm_float32_accuracy_is_expm_s(generator):
    """float32 values and gradients as close to float64 as ``expm(M)[..., :k]``'s (same degree and
    squarings; the block evaluation only reorders the rounding), at norms where the chart runs
    without and with squarings (README program, 128×64 Stiefel: degree 16, no squaring)."""
    errs = {"new": [[], [], []], "old": [[], [], []]}
    for scale in (0.5, 0.7, 0.9, 1.1, 1.3, 2.0, 3.0):
        for _ in range(3):
            T, R, c = _frame_inputs(32, scale, generator, torch.float32)
            G = torch.randn(64, 32, generator=generator, dtype=torch.float64)
            Th, Rh = T.double().requires_grad_(), R.double().requires_grad_()
            Fr = expm(_frame_matrix(Th, Rh, c.double()))[..., :32]
            ref = (Fr.detach(), *torch.autograd.grad((Fr * G).sum(), [Th, Rh]))
            for name, f in (("new", frame_expm), ("old", lambda T, R, c: expm(_frame_matrix(T, R, c))[..., :32])):
                Tf, Rf = T.clone().requires_grad_(), R.clone().requires_grad_()
                F = f(Tf, Rf, c)
                out = (F.detach(), *torch.autograd.grad((F * G.float()).sum(), [Tf, Rf]))
                for i, (a, b) in enumerate(zip(out, ref)):
                    errs[name][i].append(((a.double() - b).norm() / b.norm()).item())
    for i in range(3):
        new, old = sum(errs["new"][i]), sum(errs["old"][i])
        assert max(errs["new"][i]) < 1e-5
        assert new <= 1.1 * old, (i, new, old)


def test_frame_expm_non_finite_matrix_does_not_change_its_neighbours(generator):
    T, R, c = _frame_inputs(4, 1.5, generator, torch.float64, (2,))
    T[0, 1, 0] = float("nan")
    F = frame_expm(T, R, c)
    assert torch.isnan(F[0]).any()
    torch.testing.assert_close(F[1], ref_expm(_frame_matrix(T[1], R[1], c[1]))[..., :4], rtol=1e-10, atol=1e-10)


def _chart_case(space, shape, generator):
    Z = torch.randn(shape, generator=generator, dtype=torch.float64) * 2.0 / math.sqrt(max(shape[-2:]))
    _, base = space.from_manifold(space.sample(shape, generator=generator, dtype=torch.float64))
    G = torch.randn(shape, generator=generator, dtype=torch.float64)
    return Z, base, G


FRAME_SPACES = {"Stiefel": gf.Stiefel(), "Grassmannian": gf.Grassmannian(), "LowRank(32)": gf.LowRank(rank=32)}


@pytest.mark.parametrize("name", list(FRAME_SPACES))
@pytest.mark.parametrize("shape", [(80, 32), (32, 80), (2, 70, 33)], ids=["tall", "wide", "batched"])
def test_frames_of_32_or_more_columns_take_the_frame_exponential(name, shape, generator, monkeypatch):
    """The frame charts of 32 or more columns call frame_expm in plain eager mode (also inside the one
    node under ``torch.func.grad``) and give the points, gradients and second derivatives of the
    ``expm(M)`` path, which every other mode (vmap, forward mode) still takes."""
    import geofunc._linalg as L

    space = FRAME_SPACES[name]
    if name.startswith("LowRank") and len(shape) == 3:
        shape = (2, 80, 72)  # both frames at least 2k rows tall: the 2k×2k route (Note [Reduced tall chart])
    Z, base, G = _chart_case(space, shape, generator)
    calls = []
    monkeypatch.setattr(gf._expm, "frame_expm", lambda *a: calls.append(1) or frame_expm(*a))

    def f(Z):
        return (space.to_manifold(Z, base) * G).sum()

    def derivatives():
        Zg = Z.clone().requires_grad_()
        g = torch.autograd.grad(f(Zg), Zg, create_graph=True)[0]
        h = torch.autograd.grad((g * G).sum(), Zg)[0]  # a Hessian-vector product
        return space.to_manifold(Z, base), g.detach(), h, grad(f)(Z)

    fast = derivatives()
    assert calls
    n_calls = len(calls)
    # vmap and forward mode take expm(M)
    if len(shape) == 3:
        torch.testing.assert_close(vmap(lambda Z, base: space.to_manifold(Z, base))(Z, base), fast[0], rtol=1e-12, atol=1e-12)
    _, tangent = jvp(lambda Z: space.to_manifold(Z, base), (Z,), (G,))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(space.to_manifold(fwAD.make_dual(Z, G), base)).tangent
    torch.testing.assert_close(dual_tangent, tangent, rtol=1e-11, atol=1e-11)
    assert len(calls) == n_calls
    monkeypatch.setattr(L, "_FRAME_K", 10**9)  # every frame through expm(M)
    slow = derivatives()
    assert len(calls) == n_calls
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(tangent, jvp(lambda Z: space.to_manifold(Z, base), (Z,), (G,))[1])


def _frame_fn(fn, R, c):
    """``T ↦ fn(T, R, c)`` with ``R`` and ``c`` broadcast to ``T``'s batch."""
    return lambda T: fn(T, R.expand_as(T), c.expand(T.shape[:-2] + (1, 1)))


def _frame_ref(T, R, c):
    return ref_expm(_frame_matrix(T, R, c))[..., : T.shape[-1]]


def test_compiled_frame_chart_has_the_frame_kernels(generator):
    """Under torch.compile a frame chart of ≥ 32 columns runs the geofunc::frame_cols operators (Note
    [Compiled frame exponential]), not the 2k×2k exponential: under torch.func.grad and with backward()
    outside the compiled forward, the eager gradients."""
    space = gf.Stiefel()
    Z, base, G = _chart_case(space, (80, 32), generator)

    def f(Z):
        return (space.to_manifold(Z, base) * G).sum()

    for how in ("grad", "backward"):
        targets = []
        torch._dynamo.reset()
        if how == "grad":
            g = torch.compile(grad(f), fullgraph=True, backend=_recording(targets))(Z)
        else:
            z = Z.clone().requires_grad_()
            torch.compile(f, fullgraph=True, backend=_recording(targets))(z).backward()
            g = z.grad
        torch.testing.assert_close(g, grad(f)(Z), rtol=1e-11, atol=1e-11)
        assert "geofunc.frame_cols_fwd.default" in targets and "geofunc.frame_cols_bwd.default" in targets, targets
        assert not any("expm_powers" in t and "frame" not in t for t in targets)
        assert not any("matrix_exp" in t or "where" in t for t in targets)


@pytest.mark.parametrize("name", _COMPILED_TRANSFORMS)
def test_compiled_frame_exponential_under_transforms(name, generator):
    """Every torch.func transform of frame_columns inside torch.compile (fullgraph) agrees with matrix_exp's
    columns: first derivatives run the frame kernels, their derivatives and forward mode the static schedule."""
    T, R, c = _frame_inputs(4, 1.0, generator, torch.float64, (3,))
    W = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    V = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    e, er = _frame_fn(frame_columns, R[0], c[0]), _frame_fn(_frame_ref, R[0], c[0])

    def transformed(e):
        if name == "grad(grad)":  # the inner gradient has T's shape, not the output's
            f = _loss(e, W)
            return lambda a: grad(lambda b: (grad(f)(b) * V).sum())(a[0])
        return _transformed(name, e, W)

    torch._dynamo.reset()
    _warm_forward_mode(name)
    out = torch.compile(transformed(e), fullgraph=True, backend="aot_eager")(T)
    torch.testing.assert_close(out, transformed(er)(T), rtol=1e-9, atol=1e-9)


def _traced(how, fn, *example):
    """``fn`` as a graph whose geofunc:: operators run their Autograd kernels eagerly when it is called:
    torch.compile's eager backend, or a make_fx graph."""
    if how == "compile":
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend="eager")
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn)(*example)


@pytest.mark.parametrize("hooks", ["save_on_cpu", "copy"])
@pytest.mark.parametrize("how", ["compile", "make_fx"])
@pytest.mark.parametrize("op", ["expm", "frame"])
def test_compiled_operators_higher_derivatives_inside_saved_tensor_hooks(op, how, hooks, generator):
    """The compiled operators' adjoints (geofunc::expm_vjp, frame_cols_bwd) run eagerly where the traced graph
    does; their own derivatives, and their value under a dual level (a dual cotangent), ran torch.func.vjp of
    the static schedule, which raised torch.func's "don't yet support saved tensor hooks" inside save_on_cpu
    or a user's hooks (Note [Adjoint derivatives under saved-tensor hooks]). Second and third derivatives
    and the cotangent's tangent equal those without hooks."""
    import torch.autograd.forward_ad as fwAD

    if op == "expm":
        X0 = _rand((2, 6, 6), 2.0, generator)
        fn = expm
    else:
        X0, R, c = _frame_inputs(4, 0.6, generator, torch.float64, (2,))
        fn = _frame_fn(frame_columns, R, c)
    f = _traced(how, fn, X0)
    targets = {str(n.target) for n in f.graph.nodes} if how == "make_fx" else set()
    assert how == "compile" or {"expm": "geofunc.expm.default", "frame": "geofunc.frame_cols.default"}[op] in targets
    Y = fn(X0)
    G, dG = torch.randn(Y.shape, generator=generator, dtype=torch.float64), torch.randn(Y.shape, generator=generator, dtype=torch.float64)
    V = torch.randn(X0.shape, generator=generator, dtype=torch.float64)

    def derivatives(ctx):
        X = X0.clone().requires_grad_()
        with ctx:
            g, h, t = _three_orders(f, X, G, V)
            y = f(X)
            with fwAD.dual_level():
                (d,) = torch.autograd.grad(y, X, fwAD.make_dual(G, dG))
                d = fwAD.unpack_dual(d).tangent
        return g.detach(), h.detach(), t, d

    _assert_same_under_hooks(derivatives, hooks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", list(FRAME_SCALES), ids=list(FRAME_SCALES.values()))
def test_compiled_frame_kernels_pass_opcheck(dtype, scale, generator):
    """torch.library.opcheck on the frame operators; their values are frame_expm's, the powers its degree
    choice read (zeros where none), and its adjoint (from those powers, as from scratch)."""
    T, R, c = _frame_inputs(4, scale, generator, dtype, (2,))
    if FRAME_SCALES[scale] == "low degree":
        T, R, c = T * 1e-6, R * 1e-6, c * 1e-6
    T, R = T.requires_grad_(), R.requires_grad_()
    G = torch.randn(2, 8, 4, generator=generator, dtype=dtype).requires_grad_()
    ops = torch.ops.geofunc
    with torch.no_grad():
        F, P, H = ops.frame_cols_fwd(T, R, c)
    torch.library.opcheck(ops.frame_cols.default, (T, R, c))
    torch.library.opcheck(ops.frame_cols_fwd.default, (T, R, c))
    if FRAME_SCALES[scale] != "huge":  # the adjoint's own derivatives (static schedule) are NaN past its bound, by design
        torch.library.opcheck(ops.frame_cols_bwd.default, (T, R, c, P, H, G))
    with torch.no_grad():
        torch.testing.assert_close(ops.frame_cols(T, R, c), frame_expm(T, R, c), rtol=0, atol=0)
        torch.testing.assert_close(F, frame_expm(T, R, c), rtol=0, atol=0)
        powers = _frame_forward(T, R, c)[1]["powers"]
        assert torch.equal(P, torch.stack(list(powers), dim=-3)) if powers is not None else not P.any()
        hs = _frame_forward(T, R, c)[1].get("hs") or []  # the Horner factors (Paterson–Stockmeyer on k columns)
        assert H.shape[-3] == _FRAME_H and torch.equal(H[..., : len(hs), :, :], torch.stack(hs, dim=-3) if hs else H[..., :0, :, :])
        assert not H[..., len(hs):, :, :].any()
    Tg, Rg = T.detach().requires_grad_(), R.detach().requires_grad_()
    ref = torch.autograd.grad((frame_expm(Tg, Rg, c) * G.detach()).sum(), [Tg, Rg])
    with torch.no_grad():
        for a, b in zip(ops.frame_cols_bwd(T, R, c, P, H, G), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scale", list(FRAME_SCALES), ids=list(FRAME_SCALES.values()))
def test_compiled_frame_adjoint_reuses_the_forward_horner_factors(scale, generator, monkeypatch):
    """geofunc::frame_cols_bwd re-evaluates nothing where the forward was Paterson–Stockmeyer on the k
    columns (Note [Compiled frame exponential]): it takes the products of the adjoint alone, and its
    gradients are the eager adjoint's bit for bit at every scale (expm's evaluations re-evaluated)."""
    T, R, c = _frame_inputs(32, scale, generator, torch.float64, (2,))
    if FRAME_SCALES[scale] == "low degree":
        T, R, c = T * 1e-6, R * 1e-6, c * 1e-6
    G = torch.randn(2, 64, 32, generator=generator, dtype=torch.float64)
    ops = torch.ops.geofunc
    _, P, H = ops.frame_cols_fwd(T, R, c)
    _, cache = gf._expm._frame_forward(T, R, c)
    counts = []
    for mm in ("_mm", "_mm_add"):
        monkeypatch.setattr(gf._expm, mm, (lambda f: lambda *a, **k: counts.append(1) or f(*a, **k))(getattr(gf._expm, mm)))
    ref = gf._expm._frame_adjoint(T, R, c, cache, G)
    n_adjoint = len(counts)
    got = ops.frame_cols_bwd(T, R, c, P, H, G)
    if cache["full"] is None:  # Paterson–Stockmeyer on the k columns: nothing re-evaluated
        assert len(counts) - n_adjoint == n_adjoint, (len(counts) - n_adjoint, n_adjoint)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frame_columns_leaves_leftover_wrappers_to_expm(generator):
    """A functorch wrapper that outlived its transform goes to expm (whose Function.apply unwraps it):
    the same columns as the plain tensors give."""
    T, R, c = _frame_inputs(4, 1.0, generator, torch.float64)
    leaked = []
    grad(lambda t: (leaked.append(t), t.sum())[1])(T)
    assert torch._C._functorch.is_functorch_wrapped_tensor(leaked[0])
    assert frame_columns(leaked[0], R, c) is None
    assert frame_columns(T, R, c) is not None
    torch.testing.assert_close(expm(_frame_matrix(leaked[0], R, c))[..., :4], frame_columns(T, R, c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_compiled_exponential_off_the_cpu_is_the_static_schedule(dtype, generator, monkeypatch):
    """Off the CPU (``_host_reads`` False: Note [Compiled exponential on accelerators]) the compiled
    graph holds no geofunc operator, whose value reads are device-to-host copies that CUDA graphs
    refuse, and its gradients are eager mode's: ``SO`` (the square exponential), ``Stiefel`` (the
    frame operator) and ``LowRank`` (both). On the CPU the operators stay (the control)."""
    import geofunc._expm as gexpm

    cases = [(gf.SO(), (5, 5)), (gf.Stiefel(), (80, 32)), (gf.LowRank(rank=3), (12, 9))]  # k ≥ _FRAME_K: frames
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    for off_cpu in (False, True):
        monkeypatch.setattr(gexpm, "_host_reads", (lambda A: False) if off_cpu else (lambda A: True))
        for M, shape in cases:
            Z = _rand(shape, 0.5, generator, dtype)
            W = _rand(shape, 1.0, generator, dtype)
            _, base = M.from_manifold(M.sample(shape, generator=generator, dtype=dtype))
            f = lambda z: (M.to_manifold(z, base) * W).sum()  # noqa: E731
            graphs = []

            def backend(gm, inputs):
                graphs.append(str(gm.graph))
                return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

            torch._dynamo.reset()
            got = torch.compile(grad(f), fullgraph=True, backend=backend)(Z)
            assert ("geofunc." in "".join(graphs)) == (not off_cpu), (M, off_cpu)
            ref = grad(f)(Z)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_squarings_per_matrix_read_in_python_equal_the_tensor_expression(dtype, monkeypatch):
    """A plain batch's per-matrix squarings are computed in Python from one read of the norms
    (Note [Squarings per matrix read in one transfer]); vmap and compile use the tensor expression.
    Both give the same skips and the same largest skip: spread scales, a zero matrix, NaN and inf."""
    import geofunc._expm as E

    g = torch.Generator().manual_seed(7)
    compared = 0
    for trial in range(60):
        b = int(torch.randint(2, 9, (), generator=g))
        n = int(torch.randint(2, 12, (), generator=g))
        scale = torch.exp(torch.randn(b, 1, 1, generator=g) * 3)
        A = torch.randn(b, n, n, generator=g, dtype=dtype) * scale.to(_real(dtype))
        if trial % 5 == 0:
            A[0] = 0
        if trial % 7 == 0:
            A[-1, 0, 0] = math.nan if trial % 2 else math.inf
        m, s, _ = choose_degree(A)
        if s == 0:
            continue
        B = A * 2.0**-s
        P = [None, B, B @ B, B @ B @ B, (B @ B) @ (B @ B)]
        read = E._skips(P, m, s)
        monkeypatch.setattr(E, "_SKIPS_IN_PYTHON", -1)
        tensor = E._skips(P, m, s)
        monkeypatch.undo()
        assert read[1] == tensor[1]
        assert (read[0] is None) == (tensor[0] is None)
        if read[0] is not None:
            assert read[0].dtype == tensor[0].dtype and torch.equal(read[0], tensor[0])
        compared += 1
    assert compared > 20


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e10), (torch.float32, 1e30), (torch.float64, 1e100)])
def test_a_huge_matrix_does_not_poison_its_batch(dtype, big):
    """Note [Skips past the exponent range]: beside one huge generator (NaN itself: too far to be a point)
    the other matrices of a batch skip more squarings than 2^(skip·j) can hold; they come out as alone,
    value and gradient (they were NaN)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    _batch_equals_alone(dtype, big, n=4, scale=0.1, seed=0, tol=tol, grad_tol=tol)


def _batch_equals_alone(dtype, big, n, scale, seed, tol, grad_tol):
    """expm of three n×n generators (``scale``·N(0, 1), the first with ``big`` at (0, 1)): the second and
    third, value and gradient, as each alone."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, n, n, generator=g, dtype=dtype) * scale
    A[0, 0, 1] = big
    A = (A - A.mT).requires_grad_()
    G = torch.randn(3, n, n, generator=g, dtype=dtype)
    out = expm(A)
    (grad,) = torch.autograd.grad((out * G).sum(), A)
    for i in (1, 2):
        Ai = A[i].detach().clone().requires_grad_()
        alone = expm(Ai)
        (grad_alone,) = torch.autograd.grad((alone * G[i]).sum(), Ai)
        torch.testing.assert_close(out[i].detach(), alone.detach(), rtol=0, atol=tol)
        torch.testing.assert_close(grad[i], grad_alone, rtol=0, atol=grad_tol)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e20), (torch.float32, 1e30), (torch.float64, 1e200), (torch.float64, 1e300)])
def test_neighbours_of_a_huge_matrix_keep_their_squarings(dtype, big):
    """Note [Skips past the exponent range]: beside a generator so huge that the others' powers of A/2^s
    underflow to 0, those others (norm ~10: they need squarings of their own) are not read as zero
    matrices that skip every squaring (they came out finite and 1e4-1e7 off orthogonality)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    _batch_equals_alone(dtype, big, n=6, scale=1.5, seed=1, tol=tol, grad_tol=10 * tol)


@pytest.mark.parametrize("dtype,big,mid", [(torch.float32, 1e30, 3e5), (torch.float32, 1e30, 1e7), (torch.float64, 1e300, 1e15)])
def test_a_too_far_neighbour_of_a_huge_matrix_is_nan_as_alone(dtype, big, mid):
    """Note [Skips past the exponent range] and Note [Too far to be a point]: a matrix too far to be a point
    (NaN alone) whose powers of A/2^s underflowed beside a huger one is NaN in the batch too, never a
    finite or inf wrong point; its small neighbour comes out as alone."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 6, 6, generator=g, dtype=dtype)
    A[0, 0, 1], A[1, 0, 1] = big, mid
    A = A - A.mT
    out = expm(A)
    assert expm(A[1]).isnan().all() and out[1].isnan().all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out[2], expm(A[2]), rtol=0, atol=tol)
