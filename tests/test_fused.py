"""Under ``torch.func.grad`` a chart is one autograd node (Note [One node under torch.func.grad]).

Every space of the registry: the node is taken where the space asks for it (``_one_node``; the
maps of a few ops, ``Rn``, ``Sym``, ``Skew``, ``Hermitian``, ``SphereEmbedded``, run as their ops),
and the value, the gradient (with respect to the
raw tensor and to the base), the double backward inside the transform (also with a loss nonlinear in
the point, and to third order, against central differences too) and the paths that must not take the
node (nested transforms, an outer autograd graph, vjp) equal plain autograd on the same maths, in
float64 to rounding.
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


# --- Higher derivatives through the node with a loss that is NONLINEAR in the point -------------------
# A linear loss ⟨G, X⟩ (test_double_backward_inside_grad_equals_autograd) has a constant cotangent, so
# the loss-curvature term Jᵀ L″ J V of the double backward is zero there; these losses make it count.

_NONLINEAR_IDS = ["SO", "Stiefel", "Stiefel-cayley", "LowRank-2", "FixedRank-2", "Sphere", "GLp", "PSD", "Birkhoff",
                  "Unitary"]
_NONLINEAR_CASES = [c for c in CASES if c.id in _NONLINEAR_IDS]
FD_EPS, FD_TOL, AD_TOL = 1e-5, 1e-7, 1e-10


def _cubic(C: torch.Tensor):
    """A loss with a nonzero, point-dependent second derivative."""
    return lambda X: (X**3).sum() / 3 + (X * C).sum() ** 2


def _rel_close(a, b, tol):
    err = float((a - b).norm() / max(float(b.norm()), 1e-300))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _directional(f, Zs, Vs, create_graph):
    """⟨∇f(Zs), Vs⟩ from ``torch.autograd.grad`` (``create_graph``: differentiable again)."""
    gs = torch.autograd.grad(f(*Zs), Zs, create_graph=create_graph, allow_unused=True, materialize_grads=True)
    return sum((g * v).sum() for g, v in zip(gs, Vs))


def _hvp_under_grad(f, Zs, Vs):
    """∇²f·V, as a user writes it inside the transform: ``autograd.grad(create_graph=True)`` then ``grad``."""
    out = grad(lambda *Zs: _directional(f, Zs, Vs, True), argnums=tuple(range(len(Zs))))(*Zs)
    return list(out)


def _hvp_autograd(f, Zs, Vs):
    Zg = [Z.clone().requires_grad_() for Z in Zs]
    return list(torch.autograd.grad(_directional(f, Zg, Vs, True), Zg, allow_unused=True, materialize_grads=True))


def _grad_autograd(f, Zs):
    Zg = [Z.clone().requires_grad_() for Z in Zs]
    return torch.autograd.grad(f(*Zg), Zg, allow_unused=True, materialize_grads=True)


def _hvp_fd(f, Zs, Vs, eps=FD_EPS):
    """Central differences of the (plain autograd) gradient along V."""
    plus = _grad_autograd(f, [Z + eps * V for Z, V in zip(Zs, Vs)])
    minus = _grad_autograd(f, [Z - eps * V for Z, V in zip(Zs, Vs)])
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


def _check_hvp(f, Zs, Vs, nodes):
    inside = _hvp_under_grad(f, Zs, Vs)
    assert "_FusedBackward" in nodes, nodes  # the node (and so its adjoint) was taken
    nodes.clear()
    plain, fd = _hvp_autograd(f, Zs, Vs), _hvp_fd(f, Zs, Vs)
    assert "_FusedBackward" not in nodes, nodes
    assert sum(float(p.norm()) for p in plain) > 1e-3  # a real second derivative
    for a, p, d in zip(inside, plain, fd):
        _rel_close(p, d, FD_TOL)  # the reference itself
        _rel_close(a, p, AD_TOL)
        _rel_close(a, d, FD_TOL)


@pytest.mark.parametrize("case", _NONLINEAR_CASES, ids=lambda c: c.id)
def test_double_backward_inside_grad_nonlinear_loss(case, generator):
    """Hessian·V of a nonlinear loss of the point, with the user's ``autograd.grad(create_graph=True)``
    inside ``grad``: equals plain autograd and central differences of the gradient (the adjoint node
    once counted the loss-curvature term twice)."""
    M, Z, base, C = _setup(case, generator)
    V = torch.randn(Z.shape, generator=generator, dtype=F64)
    L, nodes = _cubic(C), []

    def f(Z):
        X = M.to_manifold(Z, base)
        nodes.append(type(X.grad_fn).__name__)
        return L(X)

    _check_hvp(f, [Z], [V], nodes)


def test_double_backward_inside_grad_nonlinear_loss_and_the_base(generator):
    """The same with respect to the raw tensor and the base together (both inputs of the node)."""
    M = gf.Stiefel()
    _, base = M.from_manifold(M.sample((5, 2), generator=generator, dtype=F64))
    Z, C, VZ, VB = (torch.randn(5, 2, generator=generator, dtype=F64) for _ in range(4))
    Z = 0.3 * Z
    L, nodes = _cubic(C), []

    def f(Z, base):
        X = M.to_manifold(Z, base)
        nodes.append(type(X.grad_fn).__name__)
        return L(X)

    _check_hvp(f, [Z, base], [VZ, VB], nodes)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("GLp", "GLp-exp-cayley", "PSD", "LowRank-full")],
                         ids=lambda c: c.id)
def test_double_backward_inside_grad_of_logabsdet_squared(case, generator):
    """``logabsdet`` is a node too: the Hessian of ld²/2 (nonlinear in ld) inside ``grad`` (spaces whose
    log|det| varies; SO's and SL's are 0)."""
    M, Z, base, _ = _setup(case, generator)
    V = torch.randn(Z.shape, generator=generator, dtype=F64)
    nodes = []

    def f(Z):
        ld = M.logabsdet(Z, base)
        nodes.append(type(ld.grad_fn).__name__)
        return (ld**2).sum() / 2

    _check_hvp(f, [Z], [V], nodes)


def test_double_backward_inside_grad_of_a_pytree_with_an_unconstrained_leaf(generator):
    """``gf.to_manifold`` of a pytree: one node, a constrained entry, an unconstrained pass-through entry
    (once given twice its second derivative) and an output the loss does not use."""
    c = {"a": gf.Stiefel(), "b": gf.LowRank(rank=2)}
    shapes = {"a": (5, 2), "b": (4, 3), "w": (3, 2)}
    _, bases = gf.from_manifold(c, gf.sample(c, {k: torch.empty(shapes[k], dtype=F64) for k in c}, generator=generator))
    Zs = [0.3 * torch.randn(shapes[k], generator=generator, dtype=F64) for k in ("a", "b", "w")]
    Vs = [torch.randn(Z.shape, generator=generator, dtype=F64) for Z in Zs]
    Cs = [torch.randn(Z.shape, generator=generator, dtype=F64) for Z in Zs]
    nodes = []

    def f(a, b, w, use_b=True):
        p = gf.to_manifold(c, {"a": a, "b": b, "w": w}, bases)
        nodes.extend(type(p[k].grad_fn).__name__ for k in ("a", "w"))
        keys = ("a", "b", "w") if use_b else ("a", "w")
        return sum(_cubic(C)(p[k]) for k, C in zip(("a", "b", "w"), Cs) if k in keys)

    _check_hvp(f, Zs, Vs, nodes)
    nodes.clear()
    _check_hvp(lambda a, b, w: f(a, b, w, use_b=False), Zs, Vs, nodes)
    # the pass-through leaf alone: its second derivative is exactly the loss's, 2·diag(w)·V + 2⟨C, V⟩C
    w, V, C = Zs[2], Vs[2], Cs[2]
    _close(_hvp_under_grad(f, Zs, [torch.zeros_like(Zs[0]), torch.zeros_like(Zs[1]), V])[2],
           2 * w * V + 2 * (C * V).sum() * C, 1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("Stiefel", "LowRank-2", "GLp")], ids=lambda c: c.id)
def test_third_derivative_inside_grad(case, generator):
    """Two nested ``autograd.grad(create_graph=True)`` inside ``grad``: D³f[V, W, ·] through the adjoint
    node's own backward, against plain autograd and central differences of the plain Hessian·V."""
    M, Z, base, C = _setup(case, generator)
    V, W = (torch.randn(Z.shape, generator=generator, dtype=F64) for _ in range(2))
    L, nodes = _cubic(C), []

    def f(Z):
        X = M.to_manifold(Z, base)
        nodes.append(type(X.grad_fn).__name__)
        return L(X)

    def h3(Z):
        hv = torch.autograd.grad(_directional(f, (Z,), (V,), True), Z, create_graph=True)[0]
        return (hv * W).sum()

    inside = grad(h3)(Z)
    assert "_FusedBackward" in nodes, nodes
    Zg = Z.clone().requires_grad_()
    plain = torch.autograd.grad(h3(Zg), Zg)[0]
    fd = [(p - m) / (2 * FD_EPS) for p, m in zip(_hvp_autograd(f, [Z + FD_EPS * W], [V]),
                                                    _hvp_autograd(f, [Z - FD_EPS * W], [V]))][0]
    _rel_close(plain, fd, FD_TOL)
    _rel_close(inside, plain, AD_TOL)
    _rel_close(inside, fd, FD_TOL)


def test_higher_derivatives_with_an_unused_input_and_output(generator):
    """A node with an argument its map ignores and an output the loss ignores: second and third derivatives
    inside ``grad`` (the unused input's are zero) equal plain autograd."""
    node = _fused.one_node(lambda a, b: {"p": a.sin() * a, "q": a.exp()})
    a, b, V = (torch.randn(4, generator=generator, dtype=F64) for _ in range(3))
    nodes = []

    def h(a, b):
        o = node(a, b)
        nodes.append(type(o["p"].grad_fn).__name__)
        ga, _ = torch.autograd.grad((o["p"] ** 3).sum(), (a, b), create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        hv = torch.autograd.grad((ga * V).sum(), a, create_graph=True)[0]
        return (hv**2).sum() + (ga * V).sum()

    got = grad(h, argnums=(0, 1))(a, b)
    assert nodes == ["_FusedBackward"], nodes
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    expected = torch.autograd.grad(h(ag, bg), (ag, bg), allow_unused=True, materialize_grads=True)
    _rel_close(got[0], expected[0], AD_TOL)
    assert torch.equal(got[1], torch.zeros_like(b))
