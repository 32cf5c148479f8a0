"""The eager one-node fast paths against the differentiable op chains they stand in for: the
sphere's exponential chart (geofunc/_fastpath.py; Sphere, Oblique) and the tall frame chart at a
constant base (Note [One-node tall chart] in geofunc/_linalg.py; Stiefel, Grassmannian, the rank family).

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


# torch 2.6's autograd.functional (vectorize=True) calls its own deprecated torch._vmap_internals.vmap
@pytest.mark.filterwarnings("ignore:Please use `torch.vmap` instead of `torch._vmap_internals.vmap`:FutureWarning")
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


# --------------------------------------------------------------------------- tall frame chart
# Note [One-node tall chart] (geofunc/_linalg.py): the frame chart of Stiefel, Grassmannian and the
# rank/PSD family at a constant base is one autograd node in plain eager mode; the reference is the
# op chain (geofunc._linalg._ONE_NODE off), which every other mode runs.
from geofunc import _linalg  # noqa: E402

FRAME_TOL = {F64: 1e-11, F32: 2e-5}
FRAME_SPACES = {
    "Stiefel": gf.Stiefel(),
    "Grassmannian": gf.Grassmannian(),
    "LowRank(3)": gf.LowRank(rank=3),
    "LowRank(32)": gf.LowRank(rank=32),  # k ≥ 32: the frame exponential's blocks
    "FixedRank(2)": gf.FixedRank(rank=2),
    "PSSDLowRank(3)": gf.PSSDLowRank(rank=3),
}
FRAME_SHAPES = {"tall": (40, 6), "wide": (6, 40), "batched": (2, 30, 5)}


def _graph_nodes(t):
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _frame_close(a, b, dtype, what):
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max()) / scale
    assert err <= FRAME_TOL[dtype], f"{what}: max relative error {err:.2e} > {FRAME_TOL[dtype]:.0e}"


def _frame_case(space, shape, scale, dtype, generator):
    if getattr(space, "rank", 0) >= 32:
        shape = shape[:-2] + ((80, 72) if shape[-2] >= shape[-1] else (72, 80))  # both frames ≥ 2k rows: the node
    if isinstance(space, gf.PSSDLowRank):
        shape = shape[:-1] + (shape[-2],)
    Z = torch.randn(shape, generator=generator, dtype=F64) * scale / math.sqrt(max(shape[-2:]))
    _, base = space.from_manifold(space.sample(shape, generator=generator, dtype=F64))
    G = torch.randn(shape, generator=generator, dtype=F64)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) else t  # noqa: E731
    base = tuple(cast(b) for b in base) if isinstance(base, tuple) else cast(base)
    return Z.to(dtype), base, G.to(dtype)


def _frame_derivatives(space, Z, base, G):
    """Value, gradient, a Hessian-vector product (create_graph) and torch.func.grad's gradient."""
    z = Z.clone().requires_grad_()
    X = space.to_manifold(z, base)
    g = torch.autograd.grad((X * G).sum(), z, create_graph=True)[0]
    h = torch.autograd.grad((g * G).sum(), z)[0]
    fg = torch.func.grad(lambda z: (space.to_manifold(z, base) * G).sum())(Z)
    return X, g, h, fg, _graph_nodes(X)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape", list(FRAME_SHAPES.values()), ids=list(FRAME_SHAPES))
@pytest.mark.parametrize("name", list(FRAME_SPACES))
def test_tall_chart_node_matches_the_op_chain(name, shape, dtype, generator, monkeypatch):
    space = FRAME_SPACES[name]
    for scale in (0.0, 0.3, 3.0, 40.0):  # 40: squarings
        for with_base in (True, False):
            Z, base, G = _frame_case(space, shape, scale, dtype, generator)
            base = base if with_base else None
            fast = _frame_derivatives(space, Z, base, G)
            # the rank family's whole chart is one node around the tall chart's where both frames are at
            # least twice the rank tall (Note [One-node rank chart]); elsewhere the tall chart's node
            k, r = min(Z.shape[-2:]), getattr(space, "rank", None)
            rank_node = isinstance(space, (gf.LowRank, gf.FixedRank)) and k > r and k >= 2 * r
            node = "_RankChartBackward" if rank_node else "_TallChartBackward"
            assert node in fast[-1], (name, fast[-1])
            monkeypatch.setattr(_linalg, "_ONE_NODE", False)
            slow = _frame_derivatives(space, Z, base, G)
            monkeypatch.setattr(_linalg, "_ONE_NODE", True)
            assert "_TallChartBackward" not in slow[-1] and "_RankChartBackward" not in slow[-1]
            ctx = f"{name} {shape} scale {scale} base {with_base} {dtype}"
            for a, b, what in zip(fast[:4], slow[:4], ("value", "gradient", "Hessian-vector product", "torch.func.grad")):
                _frame_close(a, b, dtype, f"{what} ({ctx})")
            with torch.no_grad():
                _frame_close(space.to_manifold(Z, base), slow[0], dtype, f"value under no_grad ({ctx})")


@pytest.mark.parametrize("horizontal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k", [3, 32])
@pytest.mark.parametrize("scale", [0.0, 1e-4, 1.0, 30.0])
def test_tall_chart_node_against_finite_differences(scale, k, packed, horizontal, generator):
    n, b = max(k + 3, 2 * k), (2,) if k < 32 else ()  # n ≥ 2k: the 2k×2k reduction (Note [Reduced tall chart])
    Y = gf.Stiefel().sample(b + (n, k), generator=generator, dtype=F64)
    Z = (scale * torch.randn(b + (n, k), generator=generator, dtype=F64) / math.sqrt(n)).requires_grad_()

    def chart(Z):
        X = _linalg.frame_chart(Z, Y, "expm", horizontal=horizontal, packed=packed)
        assert "_TallChartBackward" in _graph_nodes(X) or not torch.is_grad_enabled()
        return X

    fast = k >= 32  # ~1,100 inputs: random projections of the Jacobians (gradcheck's fast mode)
    assert torch.autograd.gradcheck(chart, (Z,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(chart, (Z,), fast_mode=fast)


@pytest.mark.parametrize("zshape,bshape", [((3, 20, 6), (20, 6)), ((20, 6), (3, 20, 6)), ((2, 1, 20, 6), (4, 20, 6))], ids=str)
def test_tall_chart_node_broadcasts_the_base(zshape, bshape, generator, monkeypatch):
    S = gf.Stiefel()
    Z = (0.5 * torch.randn(zshape, generator=generator, dtype=F64)).requires_grad_()
    base = S.sample(bshape, generator=generator, dtype=F64)
    X = S.to_manifold(Z, base)
    assert "_TallChartBackward" in _graph_nodes(X)
    G = torch.randn(X.shape, generator=generator, dtype=F64)
    g = torch.autograd.grad(X, Z, G)[0]
    monkeypatch.setattr(_linalg, "_ONE_NODE", False)
    Xs = S.to_manifold(Z, base)
    assert g.shape == Z.shape
    _frame_close(X, Xs, F64, "value")
    _frame_close(g, torch.autograd.grad(Xs, Z, G)[0], F64, "gradient")


def test_tall_chart_node_only_for_constant_bases_in_plain_eager_mode(generator):
    S = gf.Stiefel()
    Z = torch.randn(20, 6, generator=generator, dtype=F64, requires_grad=True)
    base = S.sample((20, 6), generator=generator, dtype=F64)
    assert "_TallChartBackward" in _graph_nodes(S.to_manifold(Z, base))
    # a base that requires grad: the op chain, and its gradient
    b = base.clone().requires_grad_()
    X = S.to_manifold(Z, b)
    assert "_TallChartBackward" not in _graph_nodes(X)
    assert torch.autograd.grad(X.sum(), b)[0].abs().sum() > 0
    # the base is saved for the backward: changing it in place in between is an error, as in the chain
    b = base.clone()
    X = S.to_manifold(Z, b)
    b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        X.sum().backward()
    # the Cayley map and user maps: the op chain
    assert "_TallChartBackward" not in _graph_nodes(gf.Stiefel(triv="cayley").to_manifold(Z, base))
    # forward mode: the chain's tangents
    dZ = torch.randn(20, 6, generator=generator, dtype=F64)
    with fwad.dual_level():
        t = fwad.unpack_dual(S.to_manifold(fwad.make_dual(Z.detach(), dZ), base)).tangent
    torch.testing.assert_close(t, torch.func.jvp(lambda z: S.to_manifold(z, base), (Z.detach(),), (dZ,))[1], rtol=1e-12, atol=1e-12)
    # vmap over models and torch.autograd.functional's vectorized backward
    Zb = torch.randn(3, 20, 6, generator=generator, dtype=F64)
    torch.testing.assert_close(vmap(lambda z: S.to_manifold(z, base))(Zb), S.to_manifold(Zb, base), rtol=1e-12, atol=1e-12)
    f = lambda z: gf.LowRank(rank=2).to_manifold(z, lr_base)  # noqa: E731
    lr_base = gf.LowRank(rank=2).from_manifold(gf.LowRank(rank=2).sample((7, 5), generator=generator, dtype=F64))[1]
    z = 0.4 * torch.randn(7, 5, generator=generator, dtype=F64)
    J = torch.autograd.functional.jacobian(f, z, vectorize=True)
    torch.testing.assert_close(J, torch.func.jacrev(f)(z), rtol=1e-11, atol=1e-11)
    h = lambda z: (f(z) * torch.arange(35, dtype=F64).reshape(7, 5)).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(h, z, vectorize=True)
    torch.testing.assert_close(H, torch.func.hessian(h)(z), rtol=1e-10, atol=1e-10)


def test_tall_chart_node_non_finite_input_gives_nan(generator):
    S = gf.Stiefel()
    base = S.sample((2, 20, 6), generator=generator)
    for bad in (math.nan, math.inf):
        Z = torch.randn(2, 20, 6, generator=generator)
        Z[1, 3, 2] = bad
        Z.requires_grad_()
        X = S.to_manifold(Z, base)
        assert "_TallChartBackward" in _graph_nodes(X)
        assert X[1].isnan().all() and X[0].isfinite().all()
        B = base.clone()
        B[0, 0, 0] = bad
        X = gf.LowRank(rank=3).to_manifold(torch.randn(20, 6, generator=generator, requires_grad=True), (B[0, :, :3], B[1, :6, :3]))
        assert X.isnan().all()


@pytest.mark.parametrize("name,shape", [("LowRank(3)", (10, 64)), ("LowRank(3)", (40, 30)), ("Stiefel", (48, 16)),
                                        ("Grassmannian", (40, 8)), ("LowRank(32)", (80, 40))])
def test_tall_chart_node_float32_accuracy_is_the_chains(name, shape, generator, monkeypatch):
    """float32 values and gradients of the node are as close to float64 as the chain's (summed over
    cases, within 10%): the node's reordered adjoint and its Cholesky solve cost no accuracy."""
    space = FRAME_SPACES[name]
    err = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for trial in range(24):
        Z, base, G = _frame_case(space, shape, 0.3 + trial / 8, F64, generator)
        monkeypatch.setattr(_linalg, "_ONE_NODE", False)
        z = Z.clone().requires_grad_()
        X64 = space.to_manifold(z, base)
        g64 = torch.autograd.grad((X64 * G).sum(), z)[0]
        b32 = tuple(b.float() for b in base) if isinstance(base, tuple) else base.float()
        for on in (True, False):
            monkeypatch.setattr(_linalg, "_ONE_NODE", on)
            z = Z.float().requires_grad_()
            X = space.to_manifold(z, b32)
            g = torch.autograd.grad((X * G.float()).sum(), z)[0]
            err[on][0] += float((X.detach().double() - X64.detach()).norm())
            err[on][1] += float((g.double() - g64).norm())
    assert err[True][0] <= 1.1 * err[False][0], err
    assert err[True][1] <= 1.1 * err[False][1], err


# --------------------------------------------------------------------------- base factor cache
# Note [Base factor cache] (geofunc/_linalg.py): the rank family's packed basis at a constant base is
# kept per pair of base tensors in plain eager mode and reused while they hold the same values.
def _lowrank_case(generator, dtype=F64, shape=(10, 64), rank=4):
    S = gf.LowRank(rank=rank)
    Z, base = S.from_manifold(S.sample(shape, generator=generator, dtype=dtype))
    return S, Z + 0.3 * torch.randn(shape, generator=generator, dtype=dtype), base


def _value_and_grad(S, Z, base, G):
    z = Z.clone().requires_grad_()
    X = S.to_manifold(z, base)
    return X.detach(), torch.autograd.grad((X * G).sum(), z)[0]


@pytest.mark.parametrize("dtype", [F64, F32])
def test_base_factor_cache_is_bit_for_bit_the_computation(dtype, generator, monkeypatch):
    S, Z, base = _lowrank_case(generator, dtype)
    G = torch.randn(Z.shape, generator=generator, dtype=dtype)
    monkeypatch.setattr(_linalg, "_BASIS_ENTRIES", {})
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", False)
    ref = _value_and_grad(S, Z, base, G)
    assert not _linalg._BASIS_ENTRIES
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", True)
    for _ in range(3):  # a miss, then hits
        got = _value_and_grad(S, Z, base, G)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        with torch.no_grad():
            assert torch.equal(S.to_manifold(Z, base), ref[0])
    assert len(_linalg._BASIS_ENTRIES) == 1


def test_base_factor_cache_sees_every_change_of_the_base(generator, monkeypatch):
    """A write through ``.data`` or a NumPy view does not bump the version counter: the cache
    compares values, so the next chart is the new base's."""
    S, Z, base = _lowrank_case(generator)
    monkeypatch.setattr(_linalg, "_BASIS_ENTRIES", {})
    G = torch.randn(Z.shape, generator=generator, dtype=F64)
    _value_and_grad(S, Z, base, G)
    _, _, other = _lowrank_case(generator)
    for write in (lambda: base[0].data.copy_(other[0]), lambda: base[1].numpy().__setitem__(slice(None), other[1].numpy()),
                  lambda: base[0].add_(1e-300)):  # a change below the chart's rounding: still a recomputation
        write()
        got = _value_and_grad(S, Z, base, G)
        monkeypatch.setattr(_linalg, "_BASIS_CACHE", False)
        ref = _value_and_grad(S, Z, tuple(b.clone() for b in base), G)
        monkeypatch.setattr(_linalg, "_BASIS_CACHE", True)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_base_factor_cache_under_transforms_and_bounded(generator, monkeypatch):
    """Under torch.func the chart's node runs on plain tensors (a custom Function's forward), so the
    cache serves it too; derivatives in the base (the bases then carry a level or require grad) do
    not use it. Every result is bit for bit the uncached one."""
    S, Z, base = _lowrank_case(generator)
    W = torch.randn(Z.shape, generator=generator, dtype=F64)
    f = lambda z, b: (S.to_manifold(z, b) * W).sum()  # noqa: E731

    def run():
        out = [torch.func.grad(f)(Z, base), *torch.func.jvp(lambda z: S.to_manifold(z, base), (Z,), (W,)),
               vmap(lambda z: S.to_manifold(z, base))(torch.stack([Z, 2 * Z])),
               *torch.func.grad(f, argnums=1)(Z, base), torch.func.jacrev(lambda b0: S.to_manifold(Z, (b0, base[1])))(base[0])]
        with fwad.dual_level():
            out.append(fwad.unpack_dual(S.to_manifold(fwad.make_dual(Z, W), base)).tangent)
        b = tuple(t.clone().requires_grad_() for t in base)
        S.to_manifold(Z, b).mul(W).sum().backward()
        return out + [t.grad for t in b]

    monkeypatch.setattr(_linalg, "_BASIS_ENTRIES", {})
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", False)
    ref = run()
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", True)
    for _ in range(2):
        got = run()
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert len(_linalg._BASIS_ENTRIES) >= 1
    # a freed base frees its entry; at most _BASIS_CACHE_SIZE entries
    monkeypatch.setattr(_linalg, "_BASIS_ENTRIES", {})
    bases = [tuple(t.clone() for t in base) for _ in range(_linalg._BASIS_CACHE_SIZE + 5)]
    for bb in bases:
        S.to_manifold(Z, bb)
    assert len(_linalg._BASIS_ENTRIES) == _linalg._BASIS_CACHE_SIZE
    del bb, bases
    assert not _linalg._BASIS_ENTRIES


# --------------------------------------------------------------------------- the rank chart's node
# Note [One-node rank chart] (geofunc/spaces/_factorized.py): U diag(f(s)) Vᵀ as one node around the
# stacked tall chart; test_tall_chart_node_matches_the_op_chain compares it with the chain (values,
# gradients, Hessian-vector products, torch.func.grad) for LowRank and FixedRank.
def _rank_case(space, shape, generator, scale=0.5):
    _, base = space.from_manifold(space.sample(shape, generator=generator, dtype=F64))
    Z = torch.randn(shape, generator=generator, dtype=F64) * scale
    return Z, base, torch.randn(shape, generator=generator, dtype=F64)


@pytest.mark.parametrize("space,shape", [(gf.LowRank(rank=4), (8, 24)), (gf.LowRank(rank=2), (3, 9, 4)),
                                         (gf.FixedRank(rank=3), (12, 7)), (gf.FixedRank(rank=2, f=(torch.exp, torch.log)), (8, 5))],
                         ids=["LowRank(4)-wide", "LowRank(2)-batched", "FixedRank(3)", "FixedRank(2)-exp"])
def test_rank_chart_node_is_taken_and_exact(space, shape, generator):
    Z, base, G = _rank_case(space, shape, generator)
    z = Z.clone().requires_grad_()
    X = space.to_manifold(z, base)
    assert "_RankChartBackward" in _graph_nodes(X)
    assert torch.autograd.gradcheck(lambda z: space.to_manifold(z, base), (z,))
    assert torch.autograd.gradgradcheck(lambda z: space.to_manifold(z, base), (z,))


def test_rank_chart_layouts_are_kept_to_their_byte_budget(monkeypatch):
    # Note [Layouts kept by size]: the index tensors of the rank chart's node, one set per batch size,
    # are kept to _LAYOUT_BYTES in all (the newest always), not only to _LAYOUT_SIZE entries
    from geofunc.spaces import _factorized

    monkeypatch.setattr(_factorized, "_LAYOUTS", {})
    monkeypatch.setattr(_factorized, "_LAYOUT_BYTES", 1 << 18, raising=False)
    space = gf.LowRank(rank=4)
    sizes = []
    for b in range(1, 17):
        z = torch.zeros(b, 32, 16, dtype=F64, requires_grad=True)
        space.to_manifold(z).sum().backward()
        sizes.append(sum(t.numel() * t.element_size() for v in _factorized._LAYOUTS.values() for t in v))
    assert len(_factorized._LAYOUTS) >= 1
    assert max(sizes) <= 1 << 18, sizes


def test_rank_chart_layouts_of_different_shapes_do_not_evict_each_other(monkeypatch):
    # Note [Layouts kept by size]: the budget is per shape; over all shapes, three weights whose layouts
    # together exceed it (each within it) evicted one another at every call and rebuilt each every step
    from geofunc.spaces import _factorized

    monkeypatch.setattr(_factorized, "_LAYOUTS", {})
    spaces = [(gf.LowRank(rank=4), (32, 16)), (gf.LowRank(rank=4), (40, 16)), (gf.LowRank(rank=4), (48, 16))]

    def step():
        for space, shape in spaces:
            space.to_manifold(torch.zeros(shape, dtype=F64, requires_grad=True)).sum().backward()

    step()
    sizes = [sum(t.numel() * t.element_size() for t in v) for v in _factorized._LAYOUTS.values()]
    assert len(sizes) == 3
    monkeypatch.setattr(_factorized, "_LAYOUTS", {})
    monkeypatch.setattr(_factorized, "_LAYOUT_BYTES", max(sizes) + min(sizes) // 2, raising=False)  # < their sum
    step()
    kept = {k: v[0] for k, v in _factorized._LAYOUTS.items()}
    step()
    assert len(kept) == 3 and all(_factorized._LAYOUTS.get(k, (None,))[0] is t for k, t in kept.items())


@pytest.mark.parametrize("case", ["base requires grad", "raw without grad", "cayley", "frames narrower than 2r",
                                  "no grad mode", "forward mode"])
def test_rank_chart_node_leaves_the_other_calls_to_the_chain(case, generator):
    space = gf.LowRank(rank=3, triv="cayley") if case == "cayley" else gf.LowRank(rank=3)
    shape = (20, 5) if case == "frames narrower than 2r" else (20, 6)
    Z, (U, V), G = _rank_case(space, shape, generator)
    z = Z.clone().requires_grad_(case != "raw without grad")
    if case == "base requires grad":
        U = U.clone().requires_grad_()
    if case == "forward mode":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            X = space.to_manifold(fwAD.make_dual(z, G), (U, V))
            assert fwAD.unpack_dual(X).tangent is not None
        return
    with torch.set_grad_enabled(case != "no grad mode"):
        X = space.to_manifold(z, (U, V))
    assert "_RankChartBackward" not in _graph_nodes(X)


@pytest.mark.parametrize("zshape,bshape", [((3, 20, 6), (20,)), ((20, 6), (3, 20,)), ((2, 1, 20, 6), (4, 20))], ids=str)
def test_rank_chart_node_broadcasts_the_bases(zshape, bshape, generator, monkeypatch):
    space = gf.LowRank(rank=3)
    _, (U, V) = space.from_manifold(space.sample(bshape + (6,), generator=generator, dtype=F64))
    Z = torch.randn(zshape, generator=generator, dtype=F64)
    G = torch.randn(torch.broadcast_shapes(zshape, bshape + (6,)), generator=generator, dtype=F64)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(_linalg, "_ONE_NODE", on)
        z = Z.clone().requires_grad_()
        X = space.to_manifold(z, (U, V))
        assert ("_RankChartBackward" in _graph_nodes(X)) == on
        out[on] = (X.detach(), torch.autograd.grad(X, z, G)[0])
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rank_chart_node_non_finite_raw_values(generator, monkeypatch):
    """A ±inf or NaN raw entry gives NaN in that point, as the chain does, its neighbours untouched."""
    space = gf.FixedRank(rank=2)
    Z, base, G = _rank_case(space, (3, 12, 5), generator)
    for bad in (math.inf, -math.inf, math.nan):
        for where in ((1, 0, 0), (1, 7, 1), (1, 0, 3)):  # the values, U's and V's coordinates
            Zb = Z.clone()
            Zb[where] = bad
            out = {}
            for on in (True, False):
                monkeypatch.setattr(_linalg, "_ONE_NODE", on)
                z = Zb.clone().requires_grad_()
                X = space.to_manifold(z, base)
                out[on] = (X.detach(), torch.autograd.grad(X, z, G)[0])
            for a, b in zip(out[True], out[False]):
                assert torch.equal(a.isnan(), b.isnan()), (bad, where)
                torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
            assert out[True][0][1].isnan().all() and out[True][0][0].isfinite().all()


def test_softplus_derivative_in_closed_form_is_autograds():
    """Positive("softplus").derivative (the rank chart node's f′) is autograd's derivative of softplus + ε,
    across F.softplus's threshold (20), in both dtypes; None for maps without a closed form here."""
    from geofunc.spaces._values import Positive

    for dtype in (torch.float32, F64):
        t = torch.tensor([-1e4, -50.0, -20.0, -1.0, 0.0, 1e-3, 1.0, 19.99, 20.0, 20.01, 50.0, 1e4], dtype=dtype)
        t_ = t.clone().requires_grad_()
        want = torch.autograd.grad(Positive("softplus")(t_).sum(), t_)[0]
        torch.testing.assert_close(Positive("softplus").derivative(t), want, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert Positive((torch.exp, torch.log)).derivative(t) is None


def test_floor_eps_memo_is_not_filled_while_compiling():
    """``floor_eps`` (the softplus floor of GLp, PSD, FixedRank, SL, ...) memoized √ε per dtype in a
    module dict filled on first use. Filled inside torch.compile, that dict is a global Dynamo guards on
    (``not ___dict_contains(torch.float64, _FLOOR_EPS)``): every function compiled before the fill
    recompiled once after it (a compiled rsgd step on PSD: 2 graphs in 5 steps). It is filled at import
    for every dtype a point can have, so a call never writes it. Checked in a fresh process (other
    tests have called floor_eps in this one)."""
    import subprocess
    import sys

    code = (
        "import math, torch\n"
        "from geofunc.spaces import _values as v\n"
        "before = dict(v._FLOOR_EPS)\n"
        "for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128):\n"
        "    assert v.floor_eps(d) == math.sqrt(torch.finfo(d).eps), d\n"
        "assert v._FLOOR_EPS == before, sorted(map(str, set(v._FLOOR_EPS) - set(before)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("space,name,arg", [
    (gf.LowRank(2), "tangent", 1), (gf.LowRank(2), "tangent", 0), (gf.FixedRank(1), "egrad_to_rgrad", 1),
    (gf.LowRank(2), "project", 0), (gf.PSSD(), "project", 0), (gf.Stiefel(), "project", 0),
], ids=lambda x: str(x))
def test_closed_form_node_refuses_an_input_modified_in_place(space, name, arg, generator):
    """A map's input modified in place between its forward and the backward: torch's version-counter
    error, as for any torch op. The closed form's vector-Jacobian product is a closure over detached
    aliases of the inputs, which autograd does not check: the rank family's tangent gave the gradient
    of the modified G silently (Note [Version checks of a closed form])."""
    shape = (5, 4) if not isinstance(space, gf.PSSD) else (4, 4)
    X = space.sample(shape, generator=generator, dtype=F64)
    G = torch.randn(shape, generator=generator, dtype=F64)
    args = {"tangent": (X, G), "egrad_to_rgrad": (X, G), "project": (X + 0.1 * G,)}[name]
    leaves = [a.clone().requires_grad_() for a in args]
    ins = [a * 1 for a in leaves]  # not leaves: an in-place change is allowed and counted
    out = getattr(space, name)(*ins)
    assert _node(out) == "_ClosedFormBackward"
    ins[arg].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.pow(2).sum().backward()


def test_sphere_chart_node_saves_its_intermediates_as_saved_tensors(generator):
    """The chart node's intermediates (v, ‖v‖, cos, sinc) go through saved_tensors_hooks, so activation
    checkpointing (use_reentrant=False) frees them and save_on_cpu moves them; on a context attribute
    they stayed alive beside a checkpointed forward. Gradients under copying hooks and under
    checkpointing are the plain ones."""
    from torch.utils.checkpoint import checkpoint

    M = gf.Sphere(radius=1.5)
    U = M.sample((4, 6), generator=generator, dtype=F64)
    Z = torch.randn(4, 6, generator=generator, dtype=F64, requires_grad=True)
    W = torch.randn(4, 6, generator=generator, dtype=F64)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        X = M.to_manifold(Z, U)
    assert _node(X) == "_ExpChartBackward"
    assert len(packed) >= 7, packed  # Z, U and the five intermediates
    ref = torch.autograd.grad((_sphere._exp_chart_smooth(Z, U / 1.5, 1.5) * W).sum(), Z)[0]  # (unit base vectors)
    _close(torch.autograd.grad((X * W).sum(), Z)[0], ref, F64, "through copying hooks")
    _close(torch.autograd.grad((checkpoint(M.to_manifold, Z, U, use_reentrant=False) * W).sum(), Z)[0], ref, F64,
           "checkpointed")


# ------------------------------------------------- node state under saved-tensor hooks
def _held_on_context(out):
    """The bytes of the tensors that the nodes behind ``out`` hold on context attributes (dicts, lists,
    tuples, closures and geofunc objects walked; each storage counted once): what activation
    checkpointing cannot free and save_on_cpu cannot move."""
    import types

    storages = {}

    def walk(x, depth):
        if depth > 8:
            return
        if isinstance(x, torch.Tensor):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)
        elif isinstance(x, types.FunctionType):
            for cell in x.__closure__ or ():
                walk(cell.cell_contents, depth + 1)
        elif type(x).__module__.startswith("geofunc"):
            for name in getattr(type(x), "__slots__", ()):
                walk(getattr(x, name, None), depth + 1)
            walk(getattr(x, "__dict__", {}), depth + 1)

    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        walk(getattr(node, "__dict__", {}), 0)
        todo.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


def _node_names(out):
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _hook_case(name, generator):
    """``(fn, differentiable inputs, the node's name)`` for each one-node path that keeps a state."""
    def chart(space, shape, scale):
        X = space.sample(shape, generator=generator, dtype=F64)
        Z, B = gf.from_manifold(space, X)
        Z = Z + scale * torch.randn(Z.shape, generator=generator, dtype=F64)
        return Z.requires_grad_(), B

    if name == "Stiefel chart, base requires grad":  # the chain, with the frame exponential's node
        Z, B = chart(gf.Stiefel(), (64, 32), 0.05)
        return (lambda z, y: gf.Stiefel().to_manifold(z, y)), (Z, B[""].clone().requires_grad_()), "_FrameExpmBackward"
    if name.startswith("Stiefel chart"):  # k < 32: expm(M) whole; k ≥ 32: the frame exponential by blocks
        shape, scale = {"Stiefel chart 40x8": ((40, 8), 0.3), "Stiefel chart 64x32": ((64, 32), 0.05),
                        "Stiefel chart 64x32 squarings": ((64, 32), 3.0)}[name]
        Z, B = chart(gf.Stiefel(), shape, scale)
        return (lambda z: gf.to_manifold(gf.Stiefel(), z, B)), (Z,), "_TallChartBackward"
    if name.startswith("rank chart"):
        space = gf.LowRank(2) if name == "rank chart" else gf.FixedRank(2, f=(torch.exp, torch.log))  # f′ by autograd
        Z, B = chart(space, (24, 8), 0.5)
        return (lambda z: gf.to_manifold(space, z, B)), (Z,), "_RankChartBackward"
    if name == "LowRank tangent":
        X = gf.LowRank(2).sample((24, 8), generator=generator, dtype=F64)
        G = torch.randn(24, 8, generator=generator, dtype=F64)
        return gf.LowRank(2).tangent, (X.requires_grad_(), G.requires_grad_()), "_ClosedFormBackward"
    space, shape = {"Stiefel project": (gf.Stiefel(), (40, 8)), "LowRank project": (gf.LowRank(2), (24, 8)),
                    "PSD project": (gf.PSD(), (8, 8)), "Hurwitz project": (gf.Hurwitz(), (6, 6))}[name]
    A = torch.randn(shape, generator=generator, dtype=F64, requires_grad=True)
    return space.project, (A,), ("_SecondOrderOnlyBackward" if name == "Hurwitz project" else "_ClosedFormBackward")


@pytest.mark.parametrize("name", [
    "Stiefel chart 40x8", "Stiefel chart 64x32", "Stiefel chart 64x32 squarings", "Stiefel chart, base requires grad",
    "rank chart", "rank chart, f by autograd", "LowRank tangent", "Stiefel project", "LowRank project", "PSD project",
    "Hurwitz project"])
def test_node_state_goes_through_saved_tensor_hooks(name, generator):
    """Under saved-tensor hooks a one-node map's state (the tall chart's generator and the exponential's
    powers and Horner steps, the rank chart's frames, a closed form's SVD or eigen factors, Hurwitz's
    eigenvectors) is saved with its inputs, so activation checkpointing (use_reentrant=False) frees it
    and save_on_cpu moves it. On context attributes it stayed alive beside a checkpointed forward (the
    Stiefel 64×32 chart here held 16× its raw tensor's bytes, 41× with squarings; Note [Node state as
    saved tensors]). Gradients under copying hooks (a retained graph's backward twice) and under
    checkpointing are the plain ones, bit for bit; a double backward under hooks, the plain one's."""
    from torch.utils.checkpoint import checkpoint

    fn, xs, node = _hook_case(name, generator)
    size = sum(x.numel() * x.element_size() for x in xs)
    out = fn(*xs)
    assert node in _node_names(out)
    W = torch.randn(out.shape, generator=generator, dtype=F64)
    ref = torch.autograd.grad((out * W).sum(), xs)

    out = checkpoint(fn, *xs, use_reentrant=False)
    held = _held_on_context(out)
    assert held <= 0.05 * size, f"checkpointed: {held / size:.2f}x the inputs' bytes held on the context"
    for a, b in zip(torch.autograd.grad((out * W).sum(), xs), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    packed = []

    def pack(t):  # as save_on_cpu, a copy
        packed.append(t.numel() * t.element_size())
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*xs)
    held = _held_on_context(out)
    assert held <= 0.05 * size, f"under hooks: {held / size:.2f}x the inputs' bytes held on the context"
    assert sum(packed) > size  # the state went through the hook, beside the inputs
    loss = (out * W).sum()
    for _ in range(2):
        for a, b in zip(torch.autograd.grad(loss, xs, retain_graph=True), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    g2 = torch.autograd.grad(loss, xs, create_graph=True)
    g2_ref = torch.autograd.grad((fn(*xs) * W).sum(), xs, create_graph=True)
    for a, b in zip(g2, g2_ref):
        _close(a, b, F64, "double backward")
    assert a.requires_grad


def test_base_factor_cache_filled_under_inference_mode(generator, monkeypatch):
    """An entry first made under torch.inference_mode() (an evaluation pass at the bases training then reads)
    held inference tensors: a later double backward at those bases raised "Inference tensors cannot be saved
    for backward" (Note [The base factor cache under inference mode]). Its values are the uncached ones."""
    S, Z, base = _lowrank_case(generator)
    W = torch.randn(Z.shape, generator=generator, dtype=F64)

    def second_order():
        z = Z.clone().requires_grad_()
        (g,) = torch.autograd.grad((S.to_manifold(z, base) * W).sum(), z, create_graph=True)
        return torch.autograd.grad((g * W).sum(), z)[0]

    monkeypatch.setattr(_linalg, "_BASIS_ENTRIES", {})
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", False)
    ref = second_order()
    monkeypatch.setattr(_linalg, "_BASIS_CACHE", True)
    with torch.inference_mode():
        X = S.to_manifold(Z, base)  # a miss: the entry is made here
    assert len(_linalg._BASIS_ENTRIES) == 1
    assert torch.equal(X, S.to_manifold(Z, base))  # (a hit outside, the same values)
    torch.testing.assert_close(second_order(), ref, rtol=0, atol=0)
    with torch.inference_mode():  # and a hit under inference mode
        assert torch.equal(S.to_manifold(Z, base), X)


@pytest.mark.parametrize("space, shape", [(gf.Stiefel(), (8, 3)), (gf.Grassmannian(), (8, 3)), (gf.LowRank(rank=2), (7, 5))],
                         ids=["Stiefel", "Grassmannian", "LowRank"])
def test_a_forward_tangent_of_the_base_only_takes_the_chain(space, shape, generator):
    """A forward-AD tangent on the base only (the raw tensor, which requires grad, has none): the one-node
    charts, which have no forward formula, are left to the op chain for every input that carries a tangent,
    bases included (Note [Dual levels and recomputation]); the tangent equals central differences."""
    X = space.sample(shape, dtype=torch.float64, generator=generator)
    Z, base = space.from_manifold(X)
    Z = (Z + 0.1 * torch.randn(Z.shape, dtype=torch.float64, generator=generator)).requires_grad_()
    bases = base if isinstance(base, tuple) else (base,)
    T = tuple(torch.randn(b.shape, dtype=torch.float64, generator=generator) for b in bases)
    pack = (lambda bs: tuple(bs)) if isinstance(base, tuple) else (lambda bs: bs[0])
    with fwad.dual_level():
        got = fwad.unpack_dual(space.to_manifold(Z, pack([fwad.make_dual(b, t) for b, t in zip(bases, T)]))).tangent
    h = 1e-6
    with torch.no_grad():
        fd = (space.to_manifold(Z, pack([b + h * t for b, t in zip(bases, T)]))
              - space.to_manifold(Z, pack([b - h * t for b, t in zip(bases, T)]))) / (2 * h)
    assert got is not None
    torch.testing.assert_close(got.detach(), fd, rtol=1e-6, atol=1e-6)
