"""The eager one-node fast path (geofunc/_fastpath.py) of the sphere's exponential chart
(Sphere, Oblique) against the differentiable op chain it stands in for.

In plain eager mode the fast path runs (its node is checked by name, so a refactor cannot
silently fall back); the reference is the op chain, which is also what runs under
torch.func transforms. Compared: values, first derivatives in every input, second
derivatives (create_graph=True), forward-mode (torch.autograd.forward_ad), broadcasting
batches, non-finite input; plus gradcheck/gradgradcheck against finite differences.
No timing here (see benchmarks/).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import hessian, vmap

import geofunc as gf
from geofunc.spaces import _sphere

F32, F64 = torch.float32, torch.float64
# Gradient comparisons are absolute errors relative to the gradient's scale: the fast
# backward has an absolute error ~ε‖G‖ (Note [the sphere chart's fast path]).
TOL = {F64: 1e-12, F32: 2e-5}


def _close(a, b, dtype, what):
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max()) / scale
    assert err <= TOL[dtype], f"{what}: max relative error {err:.2e} > {TOL[dtype]:.0e}"


def _node(t):
    return type(t.grad_fn).__name__ if t.grad_fn is not None else None


# --------------------------------------------------------------------------- sphere chart
def _unit(B):
    return B / torch.linalg.vector_norm(B, dim=-1, keepdim=True)


def _chart_pair(r):
    fast = lambda Z, B: _sphere._exp_chart(Z, _unit(B), r)  # noqa: E731
    smooth = lambda Z, B: _sphere._exp_chart_smooth(Z, _unit(B), r)  # noqa: E731
    return fast, smooth


SHAPES = [((6,), (6,)), ((4, 6), (6,)), ((6,), (4, 6)), ((2, 3, 6), (3, 6)), ((3, 1, 6), (5, 6))]
SCALES = [0.0, 1e-12, 1e-5, 0.3, 2.0, 30.0]


def test_sphere_takes_the_fast_path_in_eager_mode_only():
    S = gf.Sphere()
    Z = torch.randn(5, requires_grad=True)
    assert _node(S.to_manifold(Z, S.sample((5,)))) == "_ExpChartBackward"
    assert _node(gf.Oblique().to_manifold(torch.randn(4, 3, requires_grad=True))) != "_ExpChartBackward"  # a transpose on top
    with torch.no_grad():
        assert S.to_manifold(Z).grad_fn is None
    # Under torch.func the op chain runs (its rules compose to every order).
    seen = []
    vmap(lambda z: seen.append(_sphere._exp_chart(z, _sphere._e1(z), 1.0)) or seen[-1])(torch.randn(2, 5))
    assert seen and _node(seen[0]) != "_ExpChartBackward"


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("r", [1.0, 2.5])
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_sphere_fast_chart_matches_the_op_chain(shapes, r, dtype, generator):
    fast, smooth = _chart_pair(r)
    zshape, bshape = shapes
    for scale in SCALES:
        Z = (scale * torch.randn(zshape, generator=generator, dtype=F64)).to(dtype).requires_grad_()
        B = torch.randn(bshape, generator=generator, dtype=F64).to(dtype).requires_grad_()
        X, Xs = fast(Z, B), smooth(Z, B)
        assert _node(X) == "_ExpChartBackward"
        ctx = f"scale {scale}, shapes {shapes}, r {r}, {dtype}"
        _close(X, Xs, dtype, f"value ({ctx})")
        G = torch.randn(X.shape, generator=generator, dtype=F64).to(dtype)
        for a, b, name in zip(torch.autograd.grad(X, [Z, B], G), torch.autograd.grad(Xs, [Z, B], G), "ZB"):
            _close(a, b, dtype, f"gradient in {name} ({ctx})")
        # Second derivatives: the backward of a create_graph pass, differentiated again.
        h = [torch.autograd.grad(torch.autograd.grad(f(Z, B), [Z], G, create_graph=True)[0].square().sum(), [Z, B])
             for f in (fast, smooth)]
        for a, b, name in zip(h[0], h[1], "ZB"):
            _close(a, b, dtype, f"second derivative in {name} ({ctx})")
        # Forward mode.
        dZ = torch.randn(zshape, generator=generator, dtype=F64).to(dtype)
        dB = torch.randn(bshape, generator=generator, dtype=F64).to(dtype)
        with fwad.dual_level():
            t_fast = fwad.unpack_dual(fast(fwad.make_dual(Z.detach(), dZ), fwad.make_dual(B.detach(), dB))).tangent
            t_z = fwad.unpack_dual(fast(fwad.make_dual(Z.detach(), dZ), B.detach())).tangent
        t_ref = torch.func.jvp(smooth, (Z.detach(), B.detach()), (dZ, dB))[1]
        t_ref_z = torch.func.jvp(lambda z: smooth(z, B.detach()), (Z.detach(),), (dZ,))[1]
        _close(t_fast, t_ref, dtype, f"jvp ({ctx})")
        _close(t_z, t_ref_z, dtype, f"jvp in Z only ({ctx})")


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 4.0])
def test_sphere_fast_chart_against_finite_differences(scale, generator):
    fast, _ = _chart_pair(1.7)
    Z = (scale * torch.randn(3, 5, generator=generator, dtype=F64)).requires_grad_()
    B = torch.randn(5, generator=generator, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(fast, (Z, B), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fast, (Z, B))


def test_sphere_fast_chart_hessian_at_the_centre_is_exact():
    # x(z) = cos‖v‖ u + sinc‖v‖ v: at z = 0, ∂²x/∂z² = −u ⊗ P (P = I − u uᵀ) on the tangent part.
    S = gf.Sphere()
    u = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    z = torch.zeros(3, dtype=F64, requires_grad=True)
    w = torch.tensor([0.3, -1.0, 2.0], dtype=F64)  # hessian of ⟨w, x(z)⟩
    g = torch.autograd.grad((S.to_manifold(z, u) * w).sum(), z, create_graph=True)[0]
    H = torch.stack([torch.autograd.grad(g[i], z, retain_graph=True)[0] for i in range(3)])
    P = torch.eye(3, dtype=F64) - torch.outer(u, u)
    torch.testing.assert_close(H, -(w @ u) * P @ P, rtol=0, atol=1e-14)
    torch.testing.assert_close(H, hessian(lambda z: (S.to_manifold(z, u) * w).sum())(z.detach()), rtol=0, atol=1e-14)


def test_sphere_fast_chart_non_finite_input_gives_nan():
    S = gf.Sphere()
    for bad in (math.nan, math.inf):
        Z = torch.randn(3, 4)
        Z[1, 2] = bad
        Z.requires_grad_()
        X = S.to_manifold(Z, S.sample((4,)))
        assert _node(X) == "_ExpChartBackward"
        assert X[1].isnan().all() and X[[0, 2]].isfinite().all()
        assert not bool(S.contains(X.detach())[1])


def test_oblique_fast_chart_matches_the_op_chain(generator):
    O = gf.Oblique()
    Z = torch.randn(2, 5, 3, generator=generator, dtype=F64, requires_grad=True)
    base = O.sample((5, 3), generator=generator, dtype=F64)
    G = torch.randn(2, 5, 3, generator=generator, dtype=F64)
    X = O.to_manifold(Z, base)
    Xs = _sphere._exp_chart_smooth(Z.mT, _unit(base.mT), 1.0).mT
    _close(X, Xs, F64, "value")
    _close(torch.autograd.grad(X, Z, G)[0], torch.autograd.grad(Xs, Z, G)[0], F64, "gradient")


def test_sphere_fast_chart_under_autograd_functional_vectorized(generator):
    # torch.autograd.functional with vectorize=True vmaps the fast node's backward.
    S = gf.Sphere(radius=2.0)
    u = S.sample((5,), generator=generator, dtype=F64)
    w = torch.arange(5, dtype=F64)
    for z in (torch.zeros(5, dtype=F64), 0.3 * torch.randn(5, generator=generator, dtype=F64)):
        f = lambda z: S.to_manifold(z, u)  # noqa: E731
        h = lambda z: (S.to_manifold(z, u) * w).sum()  # noqa: E731
        J = torch.autograd.functional.jacobian(f, z, vectorize=True)
        H = torch.autograd.functional.hessian(h, z, vectorize=True)
        torch.testing.assert_close(J, torch.func.jacrev(f)(z), rtol=0, atol=1e-14)
        torch.testing.assert_close(H, torch.func.hessian(h)(z), rtol=0, atol=1e-14)
        assert torch.autograd.gradcheck(f, (z.clone().requires_grad_(),), check_batched_grad=True)
