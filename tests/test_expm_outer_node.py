"""Note [One node at the outer grad level]: under grad(vmap(grad)) (MAML) the chain's evaluation and adjoint are
one node each at the outer grad level, with a hand-written reverse; meta-gradients equal the op chain's, finite
differences and a loop over tasks, for batched and shared generators, s = 0 and s > 0, a loss linear in the
value (whose evaluation node gets no cotangent) and a backward at the outer level that builds a graph."""
import pytest
import torch
from torch.func import grad, vmap

import geofunc._expm as E

N = 10


def _problem(scale, shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(*(() if shared else (3,)), N, N, dtype=torch.float64, generator=g) * scale / N**0.5
    G = torch.randn(3, N, N, dtype=torch.float64, generator=g)
    D = torch.randn(3, N, N, dtype=torch.float64, generator=g)
    return A0, G, D


def _outer(G, D, shared, linear):
    def inner(a, g):
        if linear:  # the inner loss linear in expm(x): its cotangent g does not depend on the value
            h = grad(lambda x: (E.expm(x) * g).sum())(a)
        else:
            h = grad(lambda x: (E.expm(x) * g * E.expm(x)).sum())(a)
        a2 = a - 0.05 * h  # a second inner step at the moved generator (batched from here on)
        return grad(lambda x: (E.expm(x) ** 2 * g).sum())(a2) + a2

    def outer(A):
        return (vmap(inner, in_dims=(None if shared else 0, 0))(A, G) * D).sum()

    return inner, outer


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("scale", [0.3, 4.0])
def test_meta_gradient_matches_chain_fd_and_loop(scale, shared, linear, monkeypatch):
    A0, G, D = _problem(scale, shared)
    inner, outer = _outer(G, D, shared, linear)
    calls = []
    fwd = E._OuterEval.forward
    monkeypatch.setattr(E._OuterEval, "forward", staticmethod(lambda *a: calls.append(1) or fwd(*a)))
    on = grad(outer)(A0)
    assert len(calls) == (2 if linear else 3)  # the node is taken (every inner exponential under grad(vmap(grad)))
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = grad(outer)(A0)
    torch.testing.assert_close(on, off, rtol=1e-12, atol=1e-12)
    V = torch.randn(A0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = 1e-6
    fd = (outer(A0 + h * V) - outer(A0 - h * V)) / (2 * h)
    torch.testing.assert_close((on * V).sum(), fd, rtol=1e-6, atol=0.0)
    loop = sum(grad(lambda A: (inner(A if shared else A[t], G[t]) * D[t]).sum())(A0) for t in range(3))
    torch.testing.assert_close(on, loop, rtol=1e-9, atol=1e-10)


def test_backward_that_builds_a_graph_at_the_outer_level(monkeypatch):
    # a user's autograd.grad(create_graph=True) inside the outer function: the nodes' fallback (the chain at the
    # outer level) gives a third derivative equal to the op chain's
    A0, G, D = _problem(1.0, False)
    _, outer = _outer(G, D, False, False)
    V = torch.randn(A0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def f(A):
        (gA,) = torch.autograd.grad(outer(A), A, create_graph=True)
        return (gA * V).sum()

    on = grad(f)(A0)
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = grad(f)(A0)
    torch.testing.assert_close(on, off, rtol=1e-10, atol=1e-10)


def test_float32_maml_step_matches_chain(monkeypatch):
    from benchmarks.functional import maml, meta_loss, sinusoid_tasks

    g = torch.Generator().manual_seed(0)
    tasks = sinusoid_tasks(4, 10, g, torch.float32)
    task_loss, raw, bases = maml(8, constrained=True, dtype=torch.float32, generator=g)
    f = grad(meta_loss(task_loss))
    on = f(raw, bases, *tasks)
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = f(raw, bases, *tasks)
    for k in raw:
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-6)


def _states() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is E._ChainState)


@pytest.mark.parametrize("use", ["detached", "aux"])
def test_no_leak_when_the_inner_backward_never_reaches_the_value(use, monkeypatch):
    # the inner grad never differentiates expm's value (detached, or returned as has_aux): the chain node's
    # backward never runs, and the evaluation node's state must still be freed with the graphs (it was kept alive
    # by a cycle through the autograd graph: ~1.3 MB per meta-step at 48x48, 4 tasks)
    _, G, _ = _problem(1.0, False)
    A0 = torch.randn(3, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    A0 = A0 - A0.mT
    calls = []
    fwd = E._OuterEval.forward
    monkeypatch.setattr(E._OuterEval, "forward", staticmethod(lambda *a: calls.append(1) or fwd(*a)))

    def inner(a, g):
        if use == "detached":
            h = grad(lambda x: (x * x * g).sum() + 0 * E.expm(x).detach().sum())(a)
            return (h * g).sum()
        h, aux = grad(lambda x: ((x * x * g).sum(), E.expm(x)), has_aux=True)(a)
        return (h * g).sum() + (aux * g).sum()

    f = grad(lambda A: vmap(inner)(A, G).sum())
    f(A0)
    before = _states()
    for _ in range(5):
        f(A0)
    assert calls  # the node is taken
    assert _states() == before


@pytest.mark.parametrize("shared", [False, True])
def test_reverses_do_not_call_torch_broadcast_shapes(shared, monkeypatch):
    # the reverses' in-place accumulation asks whether a term broadcasts into the accumulator ~150 times per MAML
    # meta-step; torch.broadcast_shapes' Python cost ~25 µs a call there (~7% of the step). _into answers the same
    # for shapes that broadcast, and the meta-gradient is unchanged.
    A0, G, D = _problem(4.0, shared)
    _, outer = _outer(G, D, shared, False)
    ref = grad(outer)(A0)
    calls = []
    bs = torch.broadcast_shapes
    monkeypatch.setattr(torch, "broadcast_shapes", lambda *s: calls.append(s) or bs(*s))
    on = grad(outer)(A0)
    assert calls == []
    torch.testing.assert_close(on, ref, rtol=0.0, atol=0.0)
    for a, b in [((3, N, N), (3, N, N)), ((3, N, N), (N, N)), ((N, N), (3, N, N)), ((3, 1, N), (3, N, N)),
                 ((3, N, N), (1, N, N)), ((3, N, N), (1, 1)), ((0, N, N), (1, N, N)), ((1, N, N), (0, N, N)),
                 ((N,), ())]:
        assert E._into(torch.empty(a), torch.empty(b)) == (torch.Size(a) == torch.broadcast_shapes(a, b)), (a, b)


def test_a_generator_that_requires_grad_outside_the_transforms(monkeypatch):
    # the generator is a leaf that plain autograd differentiates too (a penalty on the meta-gradient, a step of an
    # outer optimizer over grad(...)): the node computes on plain tensors and records nothing there, so it must
    # leave such a generator to the op chain (the derivative of the meta-gradient was 120 off, silently)
    A0, G, D = _problem(1.0, False)
    A0 = A0.requires_grad_()
    _, outer = _outer(G, D, False, False)

    def penalty():
        mg = grad(lambda A: outer(A) + (A**3).sum())(A0)  # a path outside the exponential too
        return torch.autograd.grad((mg**2).sum(), A0)[0]

    on = penalty()
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = penalty()
    torch.testing.assert_close(on, off, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use", ["linear", "value"])
def test_a_generator_too_far_gives_nan_meta_gradients(use, monkeypatch):
    # Note [Too far to be a point]: a task whose generator is past the bound (float32, raw ~1e6) gets NaN, its
    # neighbours their finite meta-gradients, as the op chain; through the adjoint (a loss linear in the value)
    # and through the value itself (returned by the inner function as has_aux)
    g = torch.Generator().manual_seed(4)
    A0 = torch.randn(3, N, N, generator=g)
    A0[2] *= 1e6
    A0 = A0 - A0.mT
    G, D = torch.randn(3, N, N, generator=g), torch.randn(3, N, N, generator=g)
    calls = []
    fwd = E._OuterEval.forward
    monkeypatch.setattr(E._OuterEval, "forward", staticmethod(lambda *a: calls.append(1) or fwd(*a)))

    def inner(a, t):
        h, X = grad(lambda x: ((E.expm(x) * t).sum(), E.expm(x)), has_aux=True)(a)
        return h if use == "linear" else X

    f = grad(lambda A: (vmap(inner)(A, G) * D).sum())
    on = f(A0)
    assert calls  # the node is taken
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = f(A0)
    assert off[2].isnan().all() and not off[:2].isnan().any()
    assert on[2].isnan().all()
    torch.testing.assert_close(on[:2], off[:2], rtol=1e-5, atol=1e-5)


def test_outer_evaluation_runs_in_place(monkeypatch):
    # the evaluation node computes on plain tensors with nothing recorded: its Paterson-Stockmeyer blocks and Horner
    # steps accumulate into their own fresh buffers (in place), and the meta-gradient is the op chain's
    A0, G, D = _problem(4.0, False)
    _, outer = _outer(G, D, False, False)
    flags = []
    ev = E._evaluate
    monkeypatch.setattr(E, "_evaluate", lambda *a, **k: flags.append(k.get("inplace", False)) or ev(*a, **k))
    fwd = E._OuterEval.forward
    seen = []

    def spy(*a):
        n = len(flags)
        out = fwd(*a)
        seen.extend(flags[n:])
        return out

    monkeypatch.setattr(E._OuterEval, "forward", staticmethod(spy))
    on = grad(outer)(A0)
    assert seen and all(seen)
    monkeypatch.setattr(E, "_OUTER_NODE", False)
    off = grad(outer)(A0)
    torch.testing.assert_close(on, off, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.3, 4.0, 60.0])
@pytest.mark.parametrize("shared", [False, True])
def test_reverses_leave_their_operands_alone(scale, shared):
    # the reverses update only buffers of their own (in place: accumulators, scaled sums; a unit dB/dA is not
    # applied): the cotangents handed in (W, dX, the intermediates'), the evaluation's intermediates and the
    # adjoint's saved tensors come back bitwise unchanged, and no result shares storage with an operand
    g = torch.Generator().manual_seed(7)
    A = torch.randn(*(() if shared else (3,)), N, N, dtype=torch.float64, generator=g) * scale / N**0.5
    A = A - A.mT
    with torch.no_grad():
        X, cache, d, s = E._chain_eval(A, inplace=True)
    Gs = torch.randn(3, N, N, dtype=torch.float64, generator=g)
    W = torch.randn(3, N, N, dtype=torch.float64, generator=g)
    dX = torch.randn(X.shape, dtype=torch.float64, generator=g)
    inter = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in E._inter(cache)]
    flat = lambda: [t for t in [Gs, W, dX, *inter, *E._inter(cache), *cache["P"][1:]] if t is not None]
    before = [t.clone() for t in flat()]
    gA, saved = E._adj_saving(cache, Gs, d, s)
    kept = [t.clone() for t in [*saved[0], *saved[1], *saved[2:]]]
    dg, bP1, binter = E._adj_reverse(cache, saved, W, d, s)
    bB = E._fwd_reverse(cache, dX, inter, d, s)
    for t, t0 in zip(flat(), before):
        assert torch.equal(t, t0)
    for t, t0 in zip([*saved[0], *saved[1], *saved[2:]], kept):
        assert torch.equal(t, t0)
    ptrs = {t.data_ptr() for t in flat()}
    assert all(o.data_ptr() not in ptrs for o in [gA, dg, bP1, bB, *binter])
