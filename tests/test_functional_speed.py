"""The programs that benchmarks/functional.py times compute what they claim (no timing here).

The MAML step it times (MLP 1-40-40-1 with an ``SO`` hidden weight, 5 inner steps, ``vmap`` over
tasks, grad of grad) equals a Python loop over the tasks, and its contenders for the README's
step (``torch.func.grad`` and ``backward()``) differentiate the same loss to the same gradient.
"""

from __future__ import annotations

import os

import optree
import pytest
import torch
from reference import member
from torch.func import grad

import geofunc as gf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


@pytest.fixture
def fb(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import functional

    return functional


def test_maml_step_under_vmap_equals_a_loop_over_tasks(fb, generator):
    n_tasks = 4
    tasks = fb.sinusoid_tasks(n_tasks, 10, generator, F64)
    task_loss, raw, bases = fb.maml(40, dtype=F64, generator=generator)
    # move off the chart centre, as after a few meta-steps (the exponential then has degree > 1)
    raw = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=F64) for k, v in raw.items()}
    assert set(bases) == {"2.weight"}
    g = grad(fb.meta_loss(task_loss))(raw, bases, *tasks)
    per_task = [grad(task_loss)(raw, bases, *(t[i] for t in tasks)) for i in range(n_tasks)]
    ref = optree.tree_map(lambda *gs: sum(gs) / n_tasks, *per_task)
    assert optree.tree_structure(g) == optree.tree_structure(ref)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-10, atol=1e-12)
    assert all(bool(v.abs().sum() > 0) for v in g.values())  # every parameter is reached


def test_twenty_line_contenders_compute_the_same_gradient(fb):
    from benchmarks.run import Bench

    b = Bench(torch.device("cpu"), quick=True, dtype=F64)
    model, c, params, raw, bases, x, y = fb._twenty_lines(b)
    assert params["0.weight"].dtype == F64 and all(member(c[k], params[k]) for k in c)  # independent predicates

    def loss(raw, bases, x, y):
        p = gf.to_manifold(c, raw, bases)
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    raw = {k: v + 0.1 * torch.randn(v.shape, generator=b.gen, dtype=F64) for k, v in raw.items()}  # off the chart centre
    g = grad(loss)(raw, bases, x, y)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in raw.items()}
    loss(leaves, bases, x, y).backward()
    for k in raw:
        torch.testing.assert_close(g[k], leaves[k].grad, rtol=1e-10, atol=1e-12)


def test_train_step_restarts_from_its_operating_point(fb, generator):
    """Every timed sample of a training row restarts where ``settle`` left the step (TrainStep): after
    ``restore()`` the next steps retrace the same trajectory, raw tensors and Adam's state alike."""
    task_loss, raw, bases = fb.maml(8, inner_steps=2, dtype=F64, generator=generator)
    tasks = fb.sinusoid_tasks(3, 5, generator, F64)
    step = fb.grad_step(grad(fb.meta_loss(task_loss)), raw, bases, *tasks, lr=1e-2)
    step.settle(3)
    settled = [t.clone() for t in step.tensors]

    def trajectory():
        out = []
        for _ in range(2):
            step()
            out.append([t.clone() for t in step.tensors])
        return out

    first = trajectory()
    assert any(not torch.equal(a, b) for a, b in zip(first[-1], settled))  # the steps do move the point
    step.restore()
    for a, b in zip(step.tensors, settled):
        assert torch.equal(a, b)
    second = trajectory()
    for xs, ys in zip(first, second):
        for a, b in zip(xs, ys):
            assert torch.equal(a, b)


def test_rebase_contender_restarts_from_its_operating_point(fb):
    """The 'geofunc + rebase' step re-centres its charts (raw ~ 0 on Stiefel after each step) and
    ``restore`` puts back the raw tensors and the bases, so every timed sample starts at one point."""
    from benchmarks.run import Bench

    b = Bench(torch.device("cpu"), quick=True, dtype=F64)
    model, c, params, raw, bases, x, y = fb._twenty_lines(b)

    def loss(raw, bases, x, y):
        p = gf.to_manifold(c, raw, bases)
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    step = fb.grad_rebase_step(grad(loss), c, raw, bases, x, y, lr=1e-2)
    step.settle(3)
    point = {k: v.clone() for k, v in gf.to_manifold(c, dict(zip(raw, step.tensors)), step.bases).items()}
    assert float(step.tensors[0].abs().max()) < 1e-10  # Stiefel's raw tensor is 0 after a rebase
    for _ in range(2):
        step()
    moved = gf.to_manifold(c, dict(zip(raw, step.tensors)), step.bases)
    assert float((moved["0.weight"] - point["0.weight"]).abs().max()) > 1e-4  # the steps did move it
    step.restore()
    back = gf.to_manifold(c, dict(zip(raw, step.tensors)), step.bases)
    for k in c:
        torch.testing.assert_close(back[k], point[k], rtol=0, atol=1e-12)
        assert member(c[k], back[k])
