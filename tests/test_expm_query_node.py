"""Note [One node below a vmap over a grad level]: under grad(vmap(...)) (MAML's query loss) a batched generator's
exponential is one node at the grad level whose forward and backward are _Expm's (the same evaluation and
adjoint): gradients bit for bit those of the Function's path, for s = 0 and s > 0, a batch dim not in front, a
shared generator (not the node), float32 and the MAML step; a backward that builds a graph at the grad level
(second derivatives) equals the Function's adjoint node."""
import pytest
import torch
from torch.func import grad, vmap

import geofunc._expm as E

N = 10


def _problem(scale, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(N, N, dtype=dtype, generator=g) * scale / N**0.5
    Ds = torch.randn(3, N, N, dtype=dtype, generator=g) * scale / N**0.5
    G = torch.randn(3, N, N, dtype=dtype, generator=g)
    return A0, Ds, G


def _outer(Ds, G, bdim=0):
    # the generator batched over tasks (A + D_t), its batch dim at ``bdim`` of the physical tensor
    Db = Ds if bdim == 0 else Ds.movedim(0, bdim)

    def outer(A):
        return vmap(lambda d, g: (E.expm(A + d) * g * E.expm(A + d).mT).sum(), in_dims=(bdim, 0))(Db, G).sum()

    return outer


def _spy(monkeypatch):
    calls = []
    fwd = E._QueryNode.forward
    monkeypatch.setattr(E._QueryNode, "forward", staticmethod(lambda *a: calls.append(1) or fwd(*a)))
    return calls


@pytest.mark.parametrize("bdim", [0, 1])
@pytest.mark.parametrize("scale", [0.3, 4.0, 60.0])
def test_gradient_equals_the_function_path(scale, bdim, monkeypatch):
    A0, Ds, G = _problem(scale)
    outer = _outer(Ds, G, bdim)
    calls = _spy(monkeypatch)
    on = grad(outer)(A0)
    assert len(calls) == 2  # the node is taken (both exponentials)
    monkeypatch.setattr(E, "_QUERY_NODE", False)
    off = grad(outer)(A0)
    assert torch.equal(on, off)
    V = torch.randn(A0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = 1e-6
    fd = (outer(A0 + h * V) - outer(A0 - h * V)) / (2 * h)
    torch.testing.assert_close((on * V).sum(), fd, rtol=1e-6, atol=0.0)


def test_float32_gradient_equals_the_function_path(monkeypatch):
    A0, Ds, G = _problem(1.0, torch.float32)
    outer = _outer(Ds, G)
    calls = _spy(monkeypatch)
    on = grad(outer)(A0)
    assert calls
    monkeypatch.setattr(E, "_QUERY_NODE", False)
    assert torch.equal(on, grad(outer)(A0))


def test_shared_generator_and_no_grad_take_the_function(monkeypatch):
    # an unbatched generator under vmap, and grad mode off inside the vmapped function: not the node
    A0, Ds, G = _problem(1.0)
    calls = _spy(monkeypatch)
    shared = grad(lambda A: vmap(lambda g: (E.expm(A) * g).sum())(G).sum())(A0)
    with torch.no_grad():
        ref = torch.stack([E.expm(A0)]).expand(3, N, N)
    assert not calls and shared.shape == A0.shape

    def nograd(A):
        def f(d, g):
            with torch.no_grad():
                X = E.expm(A + d)
            return (X * g).sum() + (A * g).sum()
        return vmap(f)(Ds, G).sum()

    torch.testing.assert_close(grad(nograd)(A0), G.sum(0), rtol=0, atol=0)
    assert not calls and ref.shape == (3, N, N)


@pytest.mark.parametrize("scale", [0.3, 4.0])
def test_backward_that_builds_a_graph_at_the_grad_level(scale, monkeypatch):
    # a user's autograd.grad(create_graph=True) inside the outer function: the node's backward is not grad's own,
    # so it takes _Expm's (the adjoint node, exact to every order); the second derivative equals the Function's
    A0, Ds, G = _problem(scale)
    outer = _outer(Ds, G)
    V = torch.randn(A0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(A):
        (gA,) = torch.autograd.grad(outer(A), A, create_graph=True)
        return (gA * V).sum()

    calls = _spy(monkeypatch)
    on = grad(f)(A0)
    assert calls
    monkeypatch.setattr(E, "_QUERY_NODE", False)
    off = grad(f)(A0)
    torch.testing.assert_close(on, off, rtol=1e-12, atol=1e-12)
    h = 1e-5
    fd = (f((A0 + h * V).requires_grad_()) - f((A0 - h * V).requires_grad_())) / (2 * h)
    torch.testing.assert_close((on * V).sum(), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maml_step_equals_the_function_path(dtype, monkeypatch):
    from benchmarks.functional import maml, meta_loss, sinusoid_tasks

    g = torch.Generator().manual_seed(0)
    tasks = sinusoid_tasks(4, 10, g, dtype)
    task_loss, raw, bases = maml(16, dtype=dtype, generator=g)
    raw = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in raw.items()}
    calls = _spy(monkeypatch)
    on = grad(meta_loss(task_loss))(raw, bases, *tasks)
    assert len(calls) == 1  # the query loss's exponential
    monkeypatch.setattr(E, "_QUERY_NODE", False)
    off = grad(meta_loss(task_loss))(raw, bases, *tasks)
    for k in on:
        assert torch.equal(on[k], off[k]), k
