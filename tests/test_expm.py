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
from geofunc._expm import _STATIC_S, _STATIC_THETA, _expm_static, _products, _real, _theta, _UNIT_ROUNDOFF, choose_degree, expm, expm_frechet
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


def test_transforms_agree_with_matrix_exp(generator):
    A = _rand((4, 5, 5), 2.0, generator)
    W = _rand((5, 5), 1.0, generator)
    f, fr = _loss(expm, W), _loss(ref_expm, W)
    a = A[0]
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
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
        close(vmap(hessian(f))(A[:2]), vmap(hessian(fr))(A[:2]))


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
    """The names of the autograd nodes reachable from ``fn``."""
    seen, todo = {}, [fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = type(fn).__name__
            todo.extend(f for f, _ in fn.next_functions)
    return set(seen.values())


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


@pytest.mark.parametrize(
    "name", ["grad", "vmap", "vmap(grad)", "grad(vmap)", "jacrev", "jvp", "hessian", "jacfwd(jacfwd)", "grad(grad)"]
)
def test_compiled_exponential_under_transforms(name, generator):
    """Every torch.func transform inside torch.compile (fullgraph) agrees with matrix_exp: first derivatives run
    the kernels, their derivatives and forward mode the static schedule's ops (exact to every order)."""
    A = _rand((3, 4, 4), 2.0, generator)
    W = _rand((4, 4), 1.0, generator)
    torch._dynamo.reset()
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


# ----------------------------------------------------------------------------- the Cayley map


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
