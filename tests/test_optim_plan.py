"""One plan of the constraints per optimizer step (Note [One plan per step] in geofunc/_pytree.py): the maps of
a step share it, nothing is kept after the step, and the step's results are those of planning each map."""

from __future__ import annotations

import contextlib

import optree
import pytest
import torch

import geofunc as gf
from geofunc import _pytree

F64 = torch.float64


def _tree():
    g = torch.Generator().manual_seed(0)
    c = {"st": gf.Stiefel(), "sp": gf.Sphere(), "gr": gf.Grassmannian(), "enc": {"w": gf.SO()}}
    p = {"st": gf.Stiefel().sample((6, 2), generator=g, dtype=F64), "sp": gf.Sphere().sample((5,), generator=g, dtype=F64),
         "gr": gf.Grassmannian().sample((5, 2), generator=g, dtype=F64), "b": torch.randn(3, generator=g, dtype=F64),
         "enc": {"w": gf.SO().sample((3, 3), generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)}}
    return c, p


_real_one_plan = getattr(_pytree, "one_plan", None)


def _grads(p, seed):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), p)


@pytest.mark.parametrize("make", [lambda c: gf.optim.radam(c, lr=0.05),
                                  lambda c: gf.optim.radamw(c, lr=0.05, weight_decay=0.1),
                                  lambda c: gf.optim.rsgd(c, lr=0.05, momentum=0.9)], ids=["radam", "radamw", "rsgd"])
def test_one_plan_per_step(make):
    """An optimizer step plans the constraints against ``params`` once, not once per map, and steps as planning
    each map did (bit for bit)."""
    c, p = _tree()
    calls, old = [], _pytree._plan

    def spy(cons, tree, path):
        if path == ():
            calls.append(tree)
        return old(cons, tree, path)

    opt = make(c)
    s1 = s0 = opt.init(p)
    p1 = p0 = p
    _pytree._plan = spy
    try:
        for i in range(3):
            calls.clear()
            p1, s1 = opt.update(_grads(p, i), s1, p1)
            assert len(calls) == 1
    finally:
        _pytree._plan = old
    _pytree.one_plan = contextlib.nullcontext  # each map plans again
    try:
        for i in range(3):
            p0, s0 = opt.update(_grads(p, i), s0, p0)
    finally:
        _pytree.one_plan = _real_one_plan
    for x, y in zip(optree.tree_leaves((p1, s1)), optree.tree_leaves((p0, s0))):
        assert torch.equal(x, y)
    assert _pytree._PLANS.get() is None


def test_constraints_changed_between_steps_take_effect():
    """Nothing is kept across steps: the constraints object changed between two steps is read again."""
    c, p = _tree()
    mutable = dict(c)
    opt = gf.optim.rsgd(mutable, lr=0.05)
    state = opt.init(p)
    grads = optree.tree_map(torch.ones_like, p)
    p1, state = opt.update(grads, state, p)
    del mutable["st"]
    p2, _ = opt.update(grads, state, p1)
    assert torch.equal(p2["st"], p1["st"] - 0.05 * grads["st"])  # now unconstrained: X + V


def test_plans_are_not_kept_after_an_error():
    c, p = _tree()
    opt = gf.optim.radam(c, lr=0.05)
    state = opt.init(p)
    grads = optree.tree_map(torch.ones_like, p)
    grads["st"] = torch.ones(2, 2, dtype=F64)
    with pytest.raises(gf.ManifoldError, match="st"):
        opt.update(grads, state, p)
    assert _pytree._PLANS.get() is None


def test_another_tree_or_constraints_is_planned_again():
    """Within a step's block, a map over another tree object (of other keys) or with other constraints plans
    that one: the kept plan is answered only for the very same two objects."""
    c, p = _tree()
    v = optree.tree_map(torch.zeros_like, p)
    with _pytree.one_plan():
        gf.retract(c, p, v)
        q = {k: x for k, x in p.items() if k != "sp"}
        out = gf.retract({k: s for k, s in c.items() if k != "sp"}, q, {k: v[k] for k in q})
        assert "sp" not in out
        out = gf.retract({"sp": gf.Sphere()}, p, v)  # other constraints, the same tree
        assert torch.equal(out["st"], p["st"] + v["st"])  # unconstrained there


def test_a_kept_plan_with_none_entries_and_subtrees():
    """A kept plan is read against its tree up to the plan's leaves (None entries, a tuple under one
    constraint entry): the step equals planning each map again, bit for bit."""
    g = torch.Generator().manual_seed(0)
    c = {"st": gf.Stiefel(), "prod": (gf.Sphere(), None)}
    p = {"st": gf.Stiefel().sample((6, 2), generator=g, dtype=F64),
         "prod": (gf.Sphere().sample((5,), generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)), "n": None}
    grads = optree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), p)
    opt = gf.optim.radam(c, lr=0.05)
    p1, s1 = opt.update(grads, opt.init(p), p)
    _pytree.one_plan = contextlib.nullcontext  # each map plans again
    try:
        p0, s0 = opt.update(grads, opt.init(p), p)
    finally:
        _pytree.one_plan = _real_one_plan
    assert p1["n"] is None
    for x, y in zip(optree.tree_leaves((p1, s1)), optree.tree_leaves((p0, s0))):
        assert torch.equal(x, y)
