"""Ensembles under vmap, MAML (grad of grad through vmap), K-sampling, and dynamic trivialization."""

from __future__ import annotations

import copy

import optree
import pytest
import torch
from helpers import COMPILE_PYTREES, needs_torch
from reference import member
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

import geofunc as gf

F64 = torch.float64


def _tree_close(a, b, tol: float) -> None:
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).to(F64)


# Several spaces in one model: a Stiefel frame (6x4), SO(6), unit rows, and free biases.
CONSTRAINTS = {"0.weight": gf.Stiefel(), "2.weight": gf.SO(), "4.weight": gf.Sphere()}


def _ensemble(K: int, generator: torch.Generator):
    torch.manual_seed(0)
    models = [_net() for _ in range(K)]
    stacked, _ = stack_module_state(models)
    stacked = {k: v.detach() for k, v in stacked.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")
    # K independent points in one call: the leading dim of stacked tensors is a batch.
    return skeleton, gf.sample(CONSTRAINTS, stacked, generator=generator)


def _loss(skeleton):
    def loss(raw, bases, x, y):
        p = gf.to_manifold(CONSTRAINTS, raw, bases)
        return torch.nn.functional.mse_loss(functional_call(skeleton, p, (x,)), y)

    return loss


def _index(tree, i):
    return optree.tree_map(lambda t: t[i], tree)


def test_ensemble_of_8_under_vmap_equals_loop(generator):
    K = 8
    skeleton, points = _ensemble(K, generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, points)
    x = torch.randn(10, 4, generator=generator, dtype=F64)
    y = torch.randn(10, 3, generator=generator, dtype=F64)
    loss = _loss(skeleton)
    grads, values = vmap(grad_and_value(loss), in_dims=(0, 0, None, None))(raw, bases, x, y)
    assert values.shape == (K,)
    for i in range(K):
        gi, vi = grad_and_value(loss)(_index(raw, i), _index(bases, i), x, y)
        torch.testing.assert_close(values[i], vi, atol=1e-12, rtol=1e-12)
        _tree_close(_index(grads, i), gi, 1e-10)


def test_k_samples_inside_vmap_equal_one_batched_draw():
    skeleton, _ = _ensemble(1, torch.Generator())
    K = 5
    stacked = {k: torch.zeros((K, *v.shape), dtype=F64) for k, v in skeleton.named_parameters()}
    outside = gf.sample(CONSTRAINTS, stacked, generator=torch.Generator().manual_seed(7))
    inside = vmap(
        lambda p: gf.sample(CONSTRAINTS, p, generator=torch.Generator().manual_seed(7)), randomness="different"
    )(stacked)
    _tree_close(inside, outside, 0.0)
    assert not torch.allclose(outside["2.weight"][0], outside["2.weight"][1])
    same = vmap(lambda p: gf.sample(CONSTRAINTS, p, generator=torch.Generator().manual_seed(7)), randomness="same")(
        stacked
    )
    torch.testing.assert_close(same["2.weight"][0], same["2.weight"][1], atol=0, rtol=0)


# ------------------------------------------------------------------ MAML
def _tasks(T: int, generator: torch.Generator):
    def d(*shape):
        return torch.randn(T, *shape, generator=generator, dtype=F64)

    return d(8, 4), d(8, 3), d(8, 4), d(8, 3)


ALPHA, INNER = 0.1, 2


def _maml_raw(skeleton, bases, inner_steps=INNER):
    """Outer loss of MAML: plain gradient steps on every raw tensor, then the query loss."""
    loss = _loss(skeleton)

    def task_loss(raw, xs, ys, xq, yq):
        for _ in range(inner_steps):
            g = grad(loss)(raw, bases, xs, ys)
            raw = {k: raw[k] - ALPHA * g[k] for k in raw}
        return loss(raw, bases, xq, yq)

    return task_loss


def _maml_rsgd(skeleton, bases):
    """Outer loss of MAML with INNER Riemannian SGD steps on the points (through retractions)."""
    opt = gf.optim.rsgd(CONSTRAINTS, lr=ALPHA, momentum=0.5)

    def point_loss(p, x, y):
        return torch.nn.functional.mse_loss(functional_call(skeleton, p, (x,)), y)

    def task_loss(raw, xs, ys, xq, yq):
        p = gf.to_manifold(CONSTRAINTS, raw, bases)
        state = opt.init(p)
        for _ in range(INNER):
            p, state = opt.update(grad(point_loss)(p, xs, ys), state, p)
        return point_loss(p, xq, yq)

    return task_loss


@pytest.mark.parametrize("inner", [_maml_raw, _maml_rsgd], ids=["raw-sgd", "rsgd-points"])
def test_maml_vmap_over_tasks_equals_loop(inner, generator):
    skeleton, points = _ensemble(1, generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, _index(points, 0))
    tasks = _tasks(3, generator)
    task_loss = inner(skeleton, bases)

    def outer(raw):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(raw, *tasks).mean()

    g = grad(outer)(raw)
    ref = optree.tree_map(lambda *gs: sum(gs) / 3, *[grad(task_loss)(raw, *_index(tasks, t)) for t in range(3)])
    _tree_close(g, ref, 1e-10)
    assert all(bool(torch.isfinite(v).all()) for v in g.values())


@needs_torch(COMPILE_PYTREES, "Dynamo tracing optree")
def test_maml_outer_step_compiles_fullgraph(generator):
    skeleton, points = _ensemble(1, generator)
    raw, bases = gf.from_manifold(CONSTRAINTS, _index(points, 0))
    tasks = _tasks(2, generator)
    task_loss = _maml_raw(skeleton, bases, inner_steps=1)  # one inner step: compile time

    def outer_step(raw, bases, tasks):
        def outer(raw):
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(raw, *tasks).mean()

        g, value = grad_and_value(outer)(raw)
        raw = {k: raw[k] - 0.01 * g[k] for k in raw}
        return gf.rebase(CONSTRAINTS, raw, bases), value  # meta-step in dynamic trivialization

    (r_e, b_e), v_e = outer_step(raw, bases, tasks)
    (r_c, b_c), v_c = torch.compile(outer_step, fullgraph=True, backend="aot_eager")(raw, bases, tasks)
    torch.testing.assert_close(v_c, v_e, atol=1e-12, rtol=1e-12)
    _tree_close(r_c, r_e, 1e-10)
    _tree_close(b_c, b_e, 1e-10)


# ------------------------------------------------------------------ dynamic trivialization
def _rgd_case(space_cls, triv, shape, generator):
    c = {"Y": space_cls(triv=triv)}
    Y = space_cls().sample(shape, generator=generator, dtype=F64)
    C = torch.randn(shape, generator=generator, dtype=F64)
    D = torch.randn(shape[-1], shape[-1], generator=generator, dtype=F64)

    def f(X):  # any smooth function of the point
        return (C * X).sum() + torch.sin(X @ D).sum()

    return c, Y, f


@pytest.mark.parametrize("triv", ["expm", "cayley"])
@pytest.mark.parametrize("space_cls,shape", [(gf.SO, (5, 5)), (gf.Stiefel, (6, 3)), (gf.Stiefel, (3, 6))])
def test_sgd_on_raw_then_rebase_is_riemannian_gd(space_cls, shape, triv, generator):
    c, Y, f = _rgd_case(space_cls, triv, shape, generator)
    eta = 0.3
    raw, bases = gf.from_manifold(c, {"Y": Y})
    assert bool((raw["Y"] == 0).all())
    g_raw = grad(lambda r: f(gf.to_manifold(c, r, bases)["Y"]))(raw)
    raw, bases = gf.rebase(c, {"Y": raw["Y"] - eta * g_raw["Y"]}, bases)
    assert bool((raw["Y"] == 0).all())
    Yt = Y.mT if shape[0] < shape[1] else Y  # the tall frame (wide ones are transposed)
    G = grad(f)(Y)
    G = G.mT if shape[0] < shape[1] else G
    W = G @ Yt.mT - Yt @ G.mT
    n = Yt.shape[0]
    I = torch.eye(n, dtype=F64)
    if triv == "expm":
        expected = torch.linalg.matrix_exp(-eta * W) @ Yt
    else:
        expected = torch.linalg.solve(I + eta * W / 2, (I - eta * W / 2) @ Yt)
    expected = expected.mT if shape[0] < shape[1] else expected
    torch.testing.assert_close(bases["Y"], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf.to_manifold(c, raw, bases)["Y"], expected, atol=1e-10, rtol=0)


def test_trivialization_with_a_torch_optimizer_and_rebase_stays_on_space(generator):
    # Route 1: any torch optimizer on raw tensors, rebase every few steps.
    c, Y, f = _rgd_case(gf.Stiefel, "expm", (6, 3), generator)
    raw, bases = gf.from_manifold(c, {"Y": Y})
    Z = raw["Y"].clone().requires_grad_(True)
    opt = torch.optim.Adam([Z], lr=0.05)
    first = f(Y)
    for step in range(30):
        opt.zero_grad()
        f(gf.to_manifold(c, {"Y": Z}, bases)["Y"]).backward()
        opt.step()
        if step % 5 == 4:
            with torch.no_grad():
                r, bases = gf.rebase(c, {"Y": Z}, bases)
                Z.copy_(r["Y"])
    X = gf.to_manifold(c, {"Y": Z.detach()}, bases)["Y"]
    assert member(gf.Stiefel(), X) and f(X) < first


@pytest.mark.parametrize("space", [gf.SO(), gf.Stiefel(), gf.Sphere()], ids=repr)
def test_grad_of_grad_at_the_chart_centre_matches_finite_differences(space, generator):
    # MAML differentiates through an inner gradient step taken at raw = 0 (right after
    # from_manifold/rebase): the second derivative of the chart at its centre must be exact.
    shape = (5,) if space.point_ndim == 1 else (5, 5)
    c = {"w": space}
    raw, bases = gf.from_manifold(c, {"w": space.sample(shape, generator=generator, dtype=F64)})
    C = torch.randn(shape, generator=generator, dtype=F64)

    def f(r):
        X = gf.to_manifold(c, r, bases)["w"]
        return torch.sin(X * C).sum() + (X.sum(-1) ** 2).sum()

    def outer(r):
        g = grad(f)(r)
        return f({"w": r["w"] - 0.3 * g["w"]})

    D = torch.randn(shape, generator=generator, dtype=F64)
    eps = 1e-6
    fd = (outer({"w": raw["w"] + eps * D}) - outer({"w": raw["w"] - eps * D})) / (2 * eps)
    torch.testing.assert_close((grad(outer)(raw)["w"] * D).sum(), fd, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("space,shape", [(gf.SO(), (6, 6)), (gf.Stiefel(), (6, 3)), (gf.Grassmannian(), (3, 6)),
                                         (gf.SL(), (4, 4)), (gf.PSD(), (5, 5)), (gf.LowRank(rank=2), (6, 4))], ids=repr)
def test_a_member_does_not_depend_on_a_large_generator_beside_it(space, shape, dtype, generator):
    """The exponential chose its squarings for the batch's largest generator, and every squaring past a
    matrix's own need doubles its rounding: member 0 at raw scale 1 beside a member at 1e4 came out
    ~2400 ulps from itself alone (float32 SO(6) 6.6e-4 off orthogonality: off the space), and vmap over
    the members differed from a loop by as much. Each matrix now takes its own squarings (Note
    [Squarings per matrix]): value and gradient as alone to a few ulps, under vmap too."""
    X = space.sample((2, *shape), generator=generator, dtype=dtype)
    _, bases = space.from_manifold(X)
    Z = torch.randn(X.shape, generator=generator, dtype=dtype)
    Z[1] *= 1e4
    C = torch.randn(X.shape, generator=generator, dtype=dtype)

    def f(z, b, c):
        return (space.to_manifold(z, b) * c).sum()

    Z.requires_grad_()
    Y = space.to_manifold(Z, bases)
    G = torch.autograd.grad((Y * C).sum(), Z)[0]
    one = optree.tree_map(lambda t: t[0], bases)
    z0 = Z[0].detach().requires_grad_()
    y0 = space.to_manifold(z0, one)
    g0 = torch.autograd.grad((y0 * C[0]).sum(), z0)[0]
    Y, y0 = Y.detach(), y0.detach()
    eps = torch.finfo(dtype).eps
    assert member(space, Y[0])
    torch.testing.assert_close(Y[0], y0, rtol=0, atol=16 * eps * float(y0.abs().max()))
    torch.testing.assert_close(G[0], g0, rtol=0, atol=64 * eps * float(g0.abs().max()))
    gv = vmap(grad(f))(Z.detach(), bases, C)
    torch.testing.assert_close(gv[0], g0, rtol=0, atol=64 * eps * float(g0.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("in_dim", [0, 1])
def test_a_member_does_not_depend_on_a_large_generator_beside_it_at_second_order(in_dim, dtype, generator):
    """vmap over members of a second-order transform (a Hessian-vector product, MAML's grad of grad)
    runs the exponential as an op chain on the logical matrix (Note [Op chain under torch.func]) with
    the batch's squarings; the chain skipped none per matrix (it saw one 2-D matrix), so member 0
    beside a member at 1e4 came out ~1e-3 off orthogonality in float32 (off the space) and its
    Hessian-vector product ~4e-4 relative off itself alone."""
    space, n = gf.SO(), 6
    Z = torch.randn(2, n, n, generator=generator, dtype=dtype)
    Z[1] *= 1e4
    V = torch.randn(2, n, n, generator=generator, dtype=dtype)
    C = torch.randn(2, n, n, generator=generator, dtype=dtype)

    def hvp(z, v, c):
        def inner(z):
            X = space.to_manifold(z)
            return (X * c).sum(), X

        def outer(z):
            g, X = grad(inner, has_aux=True)(z)
            return (g * v).sum(), X

        return grad(outer, has_aux=True)(z)

    moved = [t.movedim(0, in_dim) for t in (Z, V, C)]
    hv, X = vmap(hvp, in_dims=in_dim)(*moved)
    h0, x0 = hvp(Z[0], V[0], C[0])
    eps = torch.finfo(dtype).eps
    assert member(space, X[0])
    torch.testing.assert_close(X[0], x0, rtol=0, atol=16 * eps)
    torch.testing.assert_close(hv[0], h0, rtol=0, atol=64 * eps * float(h0.abs().max()))
