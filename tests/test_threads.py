"""geofunc under threads: a serving pool over one shared model, training in a thread beside it.

torch runs Python threads side by side (its kernels release the GIL), and geofunc keeps module-level
state: the raw-tensor registries of ``geofunc.nn`` (``_adapter.py``), the per-thread rounding stack of
low-precision calls (``_linalg._ROUNDING``), the cache that ``gf.nn.cached()`` shares with torch. The
interleavings that once failed are forced here with barriers (deterministic); one short pool run checks
that threads give the single-threaded results bit for bit. Every thread is joined with a timeout, and
an exception inside a thread is carried back and raised (not left to ``threading.excepthook``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from reference import member
from torch import nn
from torch.nn.utils import parametrize
import pytest

import geofunc as gf
import geofunc.nn as gnn
from geofunc.nn import _adapter

TIMEOUT = 60.0  # seconds for any join or barrier: a hang fails the test instead of the suite


def _run(*targets):
    """Run each callable in its own thread; re-raise the first exception one of them raised."""
    errors = []

    def wrap(f):
        def run():
            torch.set_num_threads(1)
            try:
                f()
            except BaseException as e:  # noqa: BLE001 (carried back to the test)
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(f), daemon=True) for f in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_two_threads_evaluating_a_directly_registered_class_on_other_parameters():
    """A GeoTorch class registered with ``register_parametrization`` notes, in forward, which Parameter it
    is evaluated on (Note [Raw tensors across dtypes]); evaluated on another Parameter (functional_call in
    each thread of a pool) it forgets the registered one. Two threads that both found it known both
    deleted it, and the second's forward raised KeyError (Note [Registries shared by threads]). The
    barrier holds both threads right after the lookup, the interleaving that failed."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    nn.init.orthogonal_(lin.weight)
    parametrize.register_parametrization(lin, "weight", gnn.SO((4, 4)))
    M = lin.parametrizations.weight[0]
    assert _adapter._RAW.get(M) is lin.parametrizations.weight.original  # registration confirmed it

    gate = threading.Barrier(2, timeout=TIMEOUT)

    class Gated(weakref.WeakKeyDictionary):
        def get(self, key, default=None):
            out = super().get(key, default)
            if key is M and threading.current_thread() is not threading.main_thread():
                gate.wait()
            return out

    registry = Gated()
    registry[M] = _adapter._RAW[M]
    old, _adapter._RAW = _adapter._RAW, registry
    try:
        Zs = [nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
        outs = [None, None]

        def evaluate(i):
            def f():
                with torch.no_grad():
                    outs[i] = M(Zs[i])
            return f

        _run(evaluate(0), evaluate(1))
    finally:
        _adapter._RAW = old
    for Z, X in zip(Zs, outs):
        torch.testing.assert_close(X, gf.SO().to_manifold(Z.detach(), M.base), atol=0, rtol=0)
    assert M in _adapter._LOST and M not in registry  # forgotten once, as by one thread


def _cached_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4))
    gnn.orthogonal(m[0], "weight")
    gnn.low_rank(m[2], "weight", rank=2)
    return m


def test_a_cached_value_with_grad_is_not_handed_to_another_thread():
    """torch's cache is one dict for the process: thread B, inside its own ``cached()`` block, read the
    weight thread A had computed with grad in its block, A's backward freed that graph, and B's backward
    raised "Trying to backward through the graph a second time" (Note [Cached values across threads]).
    Both threads' gradients now equal the uncached ones."""
    m = _cached_model()
    xs = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    want = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for x in xs]
    step = threading.Barrier(2, timeout=TIMEOUT)
    got = [None, None]

    def thread(i):
        def f():
            with gnn.cached():
                if i == 1:
                    step.wait()  # A has cached its weights
                y = m(xs[i])
                if i == 0:
                    step.wait()
                    step.wait()  # B has read the weights
                else:
                    step.wait()
                    step.wait()  # A's backward is done
                got[i] = torch.autograd.grad(y.square().sum(), list(m.parameters()))
                if i == 0:
                    step.wait()
        return f

    _run(thread(0), thread(1))
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_thread_outside_any_block_accumulates_gradients_while_another_is_inside():
    """``cached()`` switches torch's cache on for every thread: a training thread outside any block,
    accumulating the gradients of two batches before a step, reused its first weight (whose graph its
    first backward had freed) while a serving thread sat inside a block, and raised. The accumulated
    gradients now equal the sum of the two."""
    m = _cached_model()
    xs = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    params = list(m.parameters())
    want = [sum(gs) for gs in zip(*(torch.autograd.grad(m(x).square().sum(), params) for x in xs))]
    inside, done = threading.Event(), threading.Event()

    def serve():
        with gnn.cached(), torch.no_grad():
            m(xs[0])
            inside.set()
            assert done.wait(TIMEOUT)

    def train():
        assert inside.wait(TIMEOUT)
        try:
            for x in xs:
                m(x).square().sum().backward()
        finally:
            done.set()

    _run(serve, train)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-6)


def test_gradient_accumulation_inside_a_cached_block():
    """In one thread too: two backward passes through one unchanged cached weight (torch's cache alone
    raises at the second), the same gradients as without the block; an RNN-like reuse inside one
    forward still computes the map once."""
    m = _cached_model()
    xs = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for x in xs:
        m(x).square().sum().backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with gnn.cached():
        for x in xs:
            w = m[0].weight
            assert m[0].weight is w  # one forward: the cached value
            m(x).square().sum().backward()
    for p, w in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, w, atol=0, rtol=0)


def test_a_serving_pool_over_one_model_gives_the_single_threaded_results():
    """Four threads evaluate one shared model at once, in float32, under bf16 autocast (the rounding
    stack of a low-precision call is per thread) and with grad (``torch.autograd.grad``: the shared
    parameters' ``.grad`` untouched), some inside ``cached()``: every result bit for bit the
    single-threaded one, and the weights on their spaces."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4), nn.Linear(4, 4))
    gnn.orthogonal(m[0], "weight")
    gnn.positive_definite(m[2], "weight")
    gnn.fixed_rank(m[4], "weight", rank=2)
    gnn.invertible(m[5], "weight")
    params = list(m.parameters())
    xs = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def evaluate(k, mode):
        x = xs[k]
        if mode == 0:
            with torch.no_grad():
                return [m(x)]
        if mode == 1:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return [m(x)]
        return list(torch.autograd.grad(m(x).square().sum(), params))

    want = {(k, mode): evaluate(k, mode) for k in range(4) for mode in range(3)}

    def job(i):
        torch.set_num_threads(1)
        k, mode = i % 4, (i // 4) % 3
        with gnn.cached() if i % 2 else torch.no_grad() if mode != 2 else torch.enable_grad():
            got = evaluate(k, mode)
        return all(torch.equal(a, b) for a, b in zip(got, want[(k, mode)]))

    with ThreadPoolExecutor(4) as pool:
        same = list(pool.map(job, range(96), timeout=TIMEOUT))
    assert all(same)
    with torch.no_grad():
        assert member(gf.Stiefel(), m[0].weight, 1e-4) and member(gf.PSD(), m[2].weight, 1e-4)
        assert member(gf.FixedRank(rank=2), m[4].weight, 1e-4) and member(gf.GLp(), m[5].weight, 1e-4)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork")
@pytest.mark.parametrize("which", ["layout", "basis"])
def test_a_fork_while_another_thread_holds_a_cache_lock(which):
    """A fork copies a lock as it is: where another thread was inside the rank layout cache's or the
    base-factor cache's lock at the fork (a DataLoader's workers started beside a serving thread), the
    child's first chart of a new shape deadlocked on it (Note [Locks across fork]). The thread holds the
    lock across the fork here (the interleaving that failed); the child must finish within 10 s."""
    from geofunc import _linalg
    from geofunc.spaces import _factorized

    torch.set_num_threads(1)
    space = gf.LowRank(rank=3)
    lock = _factorized._LAYOUT_LOCK if which == "layout" else _linalg._BASIS_LOCK
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(TIMEOUT)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(TIMEOUT)
    pid = os.fork()
    if pid == 0:  # the child: a chart of a new shape builds a layout and caches its base's factors
        code = 1
        try:
            Z2, B2 = space.from_manifold(space.sample((11, 8), generator=torch.Generator().manual_seed(1)))
            space.to_manifold((Z2 + 0.01).requires_grad_(), B2).sum().backward()
            code = 0
        finally:
            os._exit(code)
    release.set()
    t.join(TIMEOUT)
    status = None
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child deadlocked on the {which} cache's lock")
    assert os.waitstatus_to_exitcode(status) == 0
