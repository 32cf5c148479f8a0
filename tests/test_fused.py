"""Under ``torch.func.grad`` a chart is one autograd node (Note [One node under torch.func.grad]).

Every space of the registry: the node is taken where the space asks for it (``_one_node``; the
maps of a few ops, ``Rn``, ``Sym``, ``Skew``, ``Hermitian``, ``SphereEmbedded``, run as their ops),
and the value, the gradient (with respect to the
raw tensor and to the base), the double backward inside the transform and the paths that must not
take the node (nested transforms, an outer autograd graph, vjp) equal plain autograd on the same
maths, in float64 to rounding.
"""

from __future__ import annotations

import optree
import pytest
import torch
from cases import CASES
from torch.func import grad, grad_and_value, vjp

import geofunc as gf
from geofunc import _fused

F64 = torch.float64
TOL = 1e-9


def test_the_private_functorch_api_is_there():
    """If a PyTorch upgrade moves the names the node needs, every map silently takes the slower op
    chain; this fails instead (README, "Deviations")."""
    assert _fused.AVAILABLE


def _inner(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Re⟨G, X⟩ (a real number for complex points too)."""
    return (G.conj() * X).real.sum() if X.is_complex() else (G * X).sum()


def _setup(case, generator):
    shape = case.smoke_shape or case.shapes[0]
    M = case.space  # the complex cases are adapters on real (re, im) tensors (tests/cases_complex.py)
    X0 = M.sample(shape, generator=generator, dtype=F64)
    _, base = M.from_manifold(X0)
    Z = 0.3 * torch.randn(shape, generator=generator, dtype=F64)
    G = torch.randn(shape, generator=generator, dtype=F64)
    return M, Z, base, G


def _close(a, b, tol=TOL):
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    assert torch.allclose(a, b, atol=tol * scale, rtol=tol), float((a - b).abs().max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_one_node_gradient_equals_autograd(case, generator):
    M, Z, base, G = _setup(case, generator)
    nodes = []

    def f(Z):
        X = M.to_manifold(Z, base)
        nodes.append(type(X.grad_fn).__name__)
        return _inner(G, X)

    g, v = grad_and_value(f)(Z)
    fused = nodes == ["_FusedBackward"]
    assert fused == type(M)._one_node, nodes
    Zg = Z.clone().requires_grad_()
    expected = torch.autograd.grad(_inner(G, M.to_manifold(Zg, base)), Zg)[0]
    _close(v, _inner(G, M.to_manifold(Z, base)))
    _close(g, expected)


@pytest.mark.parametrize("case", [c for c in CASES if c.has_logabsdet], ids=lambda c: c.id)
def test_one_node_logabsdet(case, generator):
    M, Z, base, _ = _setup(case, generator)
    shape = Z.shape
    if shape[-1] != shape[-2]:
        n = shape[-1]
        Z = Z[..., :n, :n]
        _, base = M.from_manifold(M.sample(Z.shape, generator=generator, dtype=Z.dtype))
    Zg = Z.clone().requires_grad_()
    expected = torch.autograd.grad(M.logabsdet(Zg, base).sum(), Zg)[0]
    _close(grad(lambda Z: M.logabsdet(Z, base).sum())(Z), expected)


def _has_base_tensors(case) -> bool:
    _, base = case.space.from_manifold(case.space.sample(case.smoke_shape or case.shapes[0], dtype=F64))
    return bool(optree.tree_leaves(base, none_is_leaf=False))


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth and _has_base_tensors(c)], ids=lambda c: c.id)
def test_one_node_gradient_with_respect_to_the_base(case, generator):
    M, Z, base, G = _setup(case, generator)
    gZ, gB = grad(lambda Z, base: _inner(G, M.to_manifold(Z, base)), argnums=(0, 1))(Z, base)
    leaves, spec = optree.tree_flatten(base)
    Zg = Z.clone().requires_grad_()
    Bg = [b.clone().requires_grad_() for b in leaves]
    expected = torch.autograd.grad(_inner(G, M.to_manifold(Zg, optree.tree_unflatten(spec, Bg))), [Zg, *Bg])
    _close(gZ, expected[0])
    for a, b in zip(optree.tree_leaves(gB), expected[1:]):
        _close(a, b)


@pytest.mark.parametrize("case", [c for c in CASES if c.smooth], ids=lambda c: c.id)
def test_double_backward_inside_grad_equals_autograd(case, generator):
    """A user's ``torch.autograd.grad(create_graph=True)`` inside ``grad`` differentiates the node again."""
    M, Z, base, G = _setup(case, generator)

    def h(Z):
        g = torch.autograd.grad(_inner(G, M.to_manifold(Z, base)), Z, create_graph=True)[0]
        return (g.abs() ** 2).sum() + 0.0 * Z.abs().sum()  # stays in Z's graph for a linear chart

    Zg = Z.clone().requires_grad_()
    expected = torch.autograd.grad(h(Zg), Zg)[0]
    _close(grad(h)(Z), expected, 1e-7)


def test_paths_that_must_not_take_the_node(generator):
    M = gf.Stiefel()
    Z = 0.3 * torch.randn(6, 3, generator=generator, dtype=F64)
    G = torch.randn(6, 3, generator=generator, dtype=F64)
    _, base = M.from_manifold(M.sample((6, 3), generator=generator, dtype=F64))
    names = []

    def f(Z):
        X = M.to_manifold(Z, base)
        names.append(type(X.grad_fn).__name__)
        return (G * X).sum()

    Zg = Z.clone().requires_grad_()
    expected = torch.autograd.grad(f(Zg), Zg, create_graph=True)[0]
    hess_expected = torch.autograd.grad(expected.pow(2).sum(), Zg)[0]
    names.clear()
    _close(grad(lambda Z: grad(f)(Z).pow(2).sum())(Z), hess_expected, 1e-7)  # nested grad
    _close(torch.func.vmap(grad(f))(Z.expand(2, 6, 3)), expected.detach().expand(2, 6, 3))  # vmap of grad
    out, fn = vjp(f, Z)  # vjp: its backward may run after the level exited
    _close(fn(torch.ones((), dtype=F64))[0], expected.detach())
    assert "_FusedBackward" not in names
    # an outer autograd graph (the plain tensor below the transform requires grad): differentiable through grad
    W = Z.clone().requires_grad_()
    g = grad(f)(W)
    _close(torch.autograd.grad(g.pow(2).sum(), W)[0], hess_expected, 1e-7)
    assert "_FusedBackward" not in names


def test_errors_and_constants_under_grad(generator):
    M = gf.Stiefel()
    with pytest.raises(gf.ManifoldError):
        grad(lambda Z: M.to_manifold(Z, torch.eye(5, 2, dtype=F64)).sum())(torch.zeros(6, 3, dtype=F64))
    # a map that returns its input: the node's value must not alias it
    Z = torch.randn(4, 3, generator=generator, dtype=F64)
    identity = _fused.one_node(lambda Z: Z)
    g = grad(lambda Z: (identity(Z) * 2.0).sum())(Z)
    _close(g, torch.full_like(Z, 2.0))
    g = grad(lambda Z: (gf.Rn().to_manifold(Z) * 2.0).sum())(Z)  # Rn: no node, the identity itself
    _close(g, torch.full_like(Z, 2.0))
    # grad inside torch.no_grad() still differentiates (functorch's rule), through the node too
    with torch.no_grad():
        g = grad(lambda Z: gf.Stiefel().to_manifold(Z).sin().sum())(Z)
    Zg = Z.clone().requires_grad_()
    _close(g, torch.autograd.grad(gf.Stiefel().to_manifold(Zg).sin().sum(), Zg)[0])
    # the README's pytree call: one node for the whole pytree, gradients as with autograd
    c = {"a": gf.Stiefel(), "b": gf.LowRank(rank=2)}
    params = gf.sample(c, {"a": torch.empty(6, 3, dtype=F64), "b": torch.empty(5, 4, dtype=F64)}, generator=generator)
    raw, bases = gf.from_manifold(c, params)
    raw = {k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=F64) for k, v in raw.items()}

    nodes = []

    def loss(raw):
        p = gf.to_manifold(c, raw, bases)
        nodes.extend(v.grad_fn for v in p.values())
        return sum((v.sin()).sum() for v in p.values())

    rg = {k: v.clone().requires_grad_() for k, v in raw.items()}
    expected = torch.autograd.grad(loss(rg), list(rg.values()))
    nodes.clear()
    got = grad(loss)(raw)
    assert len({id(n) for n in nodes}) == 1 and type(nodes[0]).__name__ == "_FusedBackward"
    for k, e in zip(rg, expected):
        _close(got[k], e)


def test_pytree_of_cheap_maps_takes_no_node(generator):
    """A tree whose spaces all run as their ops (``_one_node`` False) is not one node: its maps are
    cheaper as a few ops under ``grad``; one fusing space makes the whole tree one node again."""
    cheap = {"s": gf.Sym(), "r": gf.Rn(), "e": gf.SphereEmbedded()}
    shapes = {"s": (4, 4), "r": (3,), "e": (5,), "f": (6, 3)}
    raw = {k: torch.randn(v, generator=generator, dtype=F64) for k, v in shapes.items()}
    for c, fused in ((cheap, False), ({**cheap, "f": gf.Stiefel()}, True)):
        nodes = []

        def loss(raw):
            p = gf.to_manifold(c, raw)
            nodes.extend(type(p[k].grad_fn).__name__ for k in c)
            return sum(p[k].sin().sum() for k in p)

        got = grad(loss)(raw)
        assert (set(nodes) == {"_FusedBackward"}) == fused and ("_FusedBackward" in nodes) == fused, nodes
        rg = {k: v.clone().requires_grad_() for k, v in raw.items()}
        for k, e in zip(rg, torch.autograd.grad(loss(rg), list(rg.values()))):
            _close(got[k], e)
    # other containers of constraints: a tuple of spaces, nested in a list
    pair = (torch.randn(4, 4, generator=generator, dtype=F64), torch.randn(6, 3, generator=generator, dtype=F64))
    for c, fused in (([(gf.Sym(), gf.Rn())], False), ([(gf.Sym(), gf.Stiefel())], True)):
        nodes = []

        def loss2(pair):
            p = gf.to_manifold(c, [pair])[0]
            nodes.extend(type(t.grad_fn).__name__ for t in p)
            return sum(t.sin().sum() for t in p)

        grad(loss2)(pair)
        assert ("_FusedBackward" in nodes) == fused, nodes


def test_pytree_with_leaves_that_are_not_tensors(generator):
    """``gf.to_manifold`` passes None and numbers through; under ``grad`` the node keeps them."""
    c = {"a": gf.Stiefel()}
    _, bases = gf.from_manifold(c, {"a": gf.Stiefel().sample((5, 2), generator=generator, dtype=F64)})
    raw = {"a": 0.1 * torch.randn(5, 2, generator=generator, dtype=F64), "b": None, "n": 3}
    seen = []

    def loss(a):
        p = gf.to_manifold(c, {**raw, "a": a}, bases)
        seen.append((p["b"], p["n"], type(p["a"].grad_fn).__name__))
        return p["a"].sin().sum()

    g = grad(loss)(raw["a"])
    assert seen == [(None, 3, "_FusedBackward")]
    a = raw["a"].clone().requires_grad_()
    _close(g, torch.autograd.grad(loss(a), a)[0])


@pytest.mark.parametrize("space", [gf.Unitary(), gf.Stiefel(), gf.PSD()], ids=lambda M: type(M).__name__)
def test_one_node_on_complex_tensors(space, generator):
    """Complex raw tensors (not through the test adapter): the node's gradient is PyTorch's complex one."""
    shape = (5, 5) if type(space).__name__ != "Stiefel" else (6, 3)
    X0 = space.sample(shape, generator=generator, dtype=torch.complex128)
    _, base = space.from_manifold(X0)
    Z = 0.3 * torch.randn(shape, generator=generator, dtype=torch.complex128)
    G = torch.randn(shape, generator=generator, dtype=torch.complex128)
    nodes = []

    def f(Z):
        X = space.to_manifold(Z, base)
        nodes.append(type(X.grad_fn).__name__)
        return _inner(G, X)

    g = grad(f)(Z)
    assert nodes == ["_FusedBackward"] and g.is_complex()
    Zg = Z.clone().requires_grad_()
    _close(g, torch.autograd.grad(_inner(G, space.to_manifold(Zg, base)), Zg)[0])
