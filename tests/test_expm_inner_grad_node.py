"""Note [The op chain below the inner grad level] (geofunc/_expm.py): under grad(vmap(grad(...))) (MAML's
inner steps) the exponential is one node at the inner grad level, evaluated on the physical batch below the
vmap level; values and derivatives of every order are those of the op chain."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

import geofunc as gf
import geofunc._expm as E
from geofunc._expm import expm
from geofunc.testing import no_vmap_fallback

ref_expm = torch.linalg.matrix_exp


def _rand(shape, scale, generator, dtype=torch.float64):
    return torch.randn(shape, generator=generator, dtype=dtype) * scale / math.sqrt(shape[-1])


def _loss(f, W):
    """A loss of the exponential of the skew part (bounded: the inner steps stay finite at any scale)."""
    return lambda a: (f(a - a.mT) * W).sum() + ((f(a - a.mT) @ W) ** 2).sum()


def _maml(f, W, in_dims):
    """The outer grad of vmapped inner steps (two inner gradient steps on A, then the loss)."""
    inner = _loss(f, W)

    def task(A):
        for _ in range(2):
            A = A - 0.1 * grad(inner)(A)
        return inner(A)

    return grad(lambda X: vmap(task, in_dims=in_dims)(X).sum())


def test_inner_grad_level_sees_one_node(generator):
    """Inside the inner grad, the exponential's output is the node's (fails where the op chain runs
    at that level: its last op's node, an addmm's)."""
    A = _rand((3, 6, 6), 1.0, generator)
    names = []

    def inner(a):
        X = expm(a)
        names.append(type(X.grad_fn).__name__)
        return (X * X).sum()

    grad(lambda A: vmap(grad(inner))(A).sum())(A)
    assert names == ["_ChainNodeBackward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("in_dims", [0, 1])
def test_maml_equals_the_op_chain_and_matrix_exp(in_dims, dtype, generator, monkeypatch):
    """The meta-gradient equals the op chain's (the node off) to rounding and matrix_exp's; one
    generator of norm ~40 (squarings, some matrices skipping them) among small ones, and the first
    inner step at an unbatched generator (X = 0 + the batch's data)."""
    A = _rand((4, 6, 6), 0.3, generator, dtype)
    A[2] = _rand((6, 6), 40.0, generator, dtype)
    W = _rand((6, 6), 1.0, generator, dtype)
    X = A if in_dims == 0 else A.transpose(0, 1).contiguous()
    with no_vmap_fallback():
        got = _maml(expm, W, in_dims)(X)
        monkeypatch.setattr(E, "_CHAIN_NODE", False)
        chain = _maml(expm, W, in_dims)(X)
        ref = _maml(ref_expm, W, in_dims)(X) if dtype == torch.float64 else chain
    tol = {torch.float32: 2e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(got, chain, rtol=tol, atol=tol * float(chain.abs().max()))
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_unbatched_generator_and_batched_data(generator):
    """MAML's first inner step: the generator the same for every task, the data batched."""
    Z = _rand((5, 5), 1.0, generator)
    ws = _rand((3, 5, 5), 1.0, generator)

    def meta(f):
        def task(Z, w):
            inner = lambda Z: (f(Z - Z.mT) * w).sum() + (f(Z - Z.mT) * w).pow(2).sum()
            return inner(Z - 0.1 * grad(inner)(Z))
        return grad(lambda Z: vmap(task, in_dims=(None, 0))(Z, ws).sum())(Z)

    torch.testing.assert_close(meta(expm), meta(ref_expm), rtol=1e-10, atol=1e-10)


def test_meta_gradient_matches_finite_differences(generator):
    """float64: the meta-gradient of a two-step MAML through SO charts against central differences."""
    A = _rand((2, 5, 5), 1.0, generator)
    W = _rand((5, 5), 1.0, generator)
    so = gf.SO()
    f = lambda Z: so.to_manifold(Z)
    g = _maml(f, W, 0)(A)
    D = _rand((2, 5, 5), 1.0, generator)

    def value(A):
        inner = _loss(f, W)

        def task(A):
            for _ in range(2):
                A = A - 0.1 * grad(inner)(A)
            return inner(A)
        return sum(float(task(a)) for a in A)

    h = 1e-5
    fd = (value(A + h * D) - value(A - h * D)) / (2 * h)
    assert abs(float((g * D).sum()) - fd) <= 1e-7 * max(1.0, abs(fd))


def test_other_backward_at_the_inner_level_is_exact(generator):
    """A backward at the inner level that is not grad's own (a user's autograd.grad with create_graph,
    differentiated again at that level) takes the op chain: the inner level's second derivative,
    under the outer grad, equals matrix_exp's."""
    A = _rand((3, 5, 5), 1.0, generator)
    W = _rand((5, 5), 1.0, generator)

    def meta(f):
        def inner(a):
            a2 = a * 1.0
            g = torch.autograd.grad(_loss(f, W)(a2), a2, create_graph=True)[0]
            return (g * W).sum()

        return grad(lambda A: vmap(grad(inner))(A).pow(2).sum())(A)

    torch.testing.assert_close(meta(expm), meta(ref_expm), rtol=1e-9, atol=1e-9)


def test_other_backward_without_create_graph_is_a_constant(generator):
    """A user's torch.autograd.grad without create_graph inside the inner function gives a constant (no
    history), as for every torch op: the node's other backward built a graph anyway (create_graph read
    inside its own enable_grad), so the inner gradient differentiated it (the meta-gradient 1.5x its size
    off, silently)."""
    A = _rand((3, 5, 5), 1.0, generator)
    W = _rand((5, 5), 1.0, generator)

    def meta(f):
        def inner(a):
            B = a - a.mT
            loss = (f(B) * W).sum()
            gB = torch.autograd.grad(loss, B, retain_graph=True)[0]
            assert not gB.requires_grad
            return loss + (gB * B).sum()

        def task(a):
            a = a - 0.1 * grad(inner)(a)
            return (f(a - a.mT) * W).sum()

        return grad(lambda A: vmap(task)(A).sum())(A)

    torch.testing.assert_close(meta(expm), meta(ref_expm), rtol=1e-10, atol=1e-10)


def test_jacrev_level_takes_the_op_chain(generator):
    """A vjp level (jacrev) under vmap under grad is not grad's: no node there (its backward runs after
    the level has exited); the derivatives equal matrix_exp's."""
    from torch.func import jacrev

    A = _rand((3, 5, 5), 1.0, generator)
    W = _rand((5, 5), 1.0, generator)
    names = []

    def inner(f):
        def g(a):
            X = f(a - a.mT)
            names.append(type(X.grad_fn).__name__)
            return X @ W
        return g

    def meta(f):
        return grad(lambda A: vmap(jacrev(inner(f)))(A).pow(2).sum())(A)

    torch.testing.assert_close(meta(expm), meta(ref_expm), rtol=1e-9, atol=1e-9)
    assert "_ChainNodeBackward" not in names


def test_no_grad_inside_the_inner_function_is_a_constant(generator):
    """An exponential computed under torch.no_grad() inside the inner function is a constant at every
    level (the op chain records it nowhere): the meta-gradient equals matrix_exp's (the node recorded its
    forward at the outer level anyway: 0.43 off)."""
    A = _rand((3, 5, 5), 1.0, generator)
    W = _rand((5, 5), 1.0, generator)

    def meta(f):
        def inner(a):
            B = a - a.mT
            with torch.no_grad():
                P = f(B)
            return ((P @ a) * W).sum() + (a**2 * P).sum()

        def task(a):
            return inner(a - 0.1 * grad(inner)(a))

        return grad(lambda A: vmap(task)(A).sum())(A)

    torch.testing.assert_close(meta(expm), meta(ref_expm), rtol=1e-10, atol=1e-10)


def test_inner_grad_entered_under_no_grad_is_first_order(generator):
    """vmap(grad(inner)) called under torch.no_grad() inside the outer function (first-order MAML): the
    inner level's results are constants for the outer level (functorch sends that level's ops down with
    grad mode off), so the outer gradient has no term through them (the node recorded its forward and
    adjoint at the outer level: 1.5× the gradient's size off)."""
    A = _rand((3, 5, 5), 1.0, generator)
    A = A - A.mT
    W = _rand((5, 5), 1.0, generator)

    def meta(f):
        def inner(a):
            X = f(a)
            return (X * W).sum(), X

        def outer(A):
            with torch.no_grad():
                step, X = vmap(grad(inner, has_aux=True))(A)
            return (X * A).sum() + (step * A).sum()

        return grad(outer)(A)

    got = meta(expm)
    torch.testing.assert_close(got, meta(ref_expm), rtol=1e-10, atol=1e-10)
