"""``gf.optim.TorchOptimizer``: the functional optimizers behind ``torch.optim.Optimizer`` for
``nn.Module`` code whose parameters hold points (Note [A functional optimizer behind torch.optim]):
geoopt's ``ManifoldParameter`` + ``RiemannianAdam`` step for step, ``torch.optim.Adam`` with a
scheduler on free parameters, parameters without gradients skipped as torch.optim skips them,
parameter groups and schedulers of any hyperparameter, checkpoints, errors."""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import optree
import pytest
import torch
from reference import member
from torch import nn

import geofunc as gf

F64 = torch.float64
# geoopt compiles some of its functions with torch.jit.script on first use, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class Net(nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.W = nn.Parameter(gf.Stiefel().sample((6, 3), generator=generator, dtype=F64))
        self.s = nn.Parameter(gf.Sphere().sample((2, 4), generator=generator, dtype=F64))
        self.b = nn.Parameter(torch.randn(3, generator=generator, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.W + self.b).sum(-1, keepdim=True) * self.s.sum(0)


C = {"W": gf.Stiefel(), "s": gf.Sphere()}


def _data(generator):
    return torch.randn(32, 6, generator=generator, dtype=F64), torch.randn(32, 4, generator=generator, dtype=F64)


def _train(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("name", ["radam", "rsgd"])
def test_a_module_steps_as_with_geoopts_manifold_parameters(name, generator):
    """The same module with geoopt's ``ManifoldParameter`` s and ``RiemannianAdam``/``RiemannianSGD``:
    the same points after 20 steps of ``loss.backward(); opt.step()`` (float64, to rounding)."""
    geoopt = pytest.importorskip("geoopt")
    x, y = _data(generator)
    ours = Net(generator)
    theirs = Net(generator)
    theirs.load_state_dict(ours.state_dict())
    theirs.W = geoopt.ManifoldParameter(theirs.W.data, manifold=geoopt.EuclideanStiefel())
    theirs.s = geoopt.ManifoldParameter(theirs.s.data, manifold=geoopt.Sphere())
    kwargs = dict(lr=0.02, weight_decay=0.01)
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), C, getattr(gf.optim, name), **kwargs)
    ref = {"radam": geoopt.optim.RiemannianAdam, "rsgd": geoopt.optim.RiemannianSGD}[name](theirs.parameters(), **kwargs)
    _train(ours, opt, x, y, 20)
    _train(theirs, ref, x, y, 20)
    for k in ("W", "s", "b"):
        torch.testing.assert_close(getattr(ours, k).detach(), getattr(theirs, k).detach(), atol=1e-12, rtol=0)
    assert member(gf.Stiefel(), ours.W.detach()) and member(gf.Sphere(), ours.s.detach())


def test_free_parameters_step_as_torch_adam_with_a_scheduler(generator):
    """No constraints: ``torch.optim.Adam`` with the same ``StepLR`` scheduler, step for step (the
    learning rate is read from ``param_groups[0]["lr"]`` at every step); the loss of the closure is returned."""
    x, y = _data(generator)
    ours, theirs = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05, betas=(0.8, 0.99))
    ref = torch.optim.Adam(theirs.parameters(), lr=0.05, betas=(0.8, 0.99))
    s1, s2 = (torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, ref))
    _train(ours, opt, x, y, 10, s1)
    _train(theirs, ref, x, y, 10, s2)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.05 * 0.5**3
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0)

    def closure():
        opt.zero_grad()
        loss = ((ours(x) - y) ** 2).mean()
        loss.backward()
        return loss

    before = ours.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and not torch.equal(ours.weight.detach(), before)


class Branches(nn.Module):
    """Two heads of which a step uses one or both (a mixture of experts' routing, a conditional
    branch): the unused head's parameters have ``.grad`` None at that step."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 5).double()
        self.a = nn.Linear(5, 4).double()
        self.b = nn.Linear(5, 4).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=F64))

    def forward(self, x: torch.Tensor, use: str) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return sum(getattr(self, k)(h) for k in use)


#: which heads each step uses: b starts late (its first gradient at step 4), a skips steps
USES = ["a", "a", "a", "ab", "b", "ab", "b", "a", "ab", "ab"]


def _train_branches(model, opt, x, y):
    for use in USES:
        opt.zero_grad(set_to_none=True)
        ((model(x, use) - y) ** 2).mean().backward()
        opt.step()


def _same_runs(ours, opt, theirs, ref, x, y):
    """Train both models on the ``USES`` schedule and assert the same parameters to rounding."""
    _train_branches(ours, opt, x, y)
    _train_branches(theirs, ref, x, y)
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


def test_grad_scaler_and_clip_grad_norm_act_on_the_whole_model(generator):
    """``torch.amp.GradScaler`` (unscale_, step, update) and ``torch.nn.utils.clip_grad_norm_`` before
    ``step``, with heads skipped irregularly and an inf gradient at one step: the same run as
    ``torch.optim.Adam`` (the step with the inf skipped for every parameter, the norm the whole
    model's), where a factory's ``clip_by_global_norm`` and ``apply_if_finite`` act per group and,
    after a step where only some parameters had a gradient, per part (TorchOptimizer's docstring)."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.05)
    for model, o in ((ours, opt), (theirs, ref)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i, use in enumerate(USES):
            o.zero_grad(set_to_none=True)
            scaler.scale(((model(x, use) - y) ** 2).mean()).backward()
            if i == 5:
                model.trunk.bias.grad[0] = float("inf")
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(o)
            scaler.update()
        assert scaler.get_scale() == 2.0**9
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


def _net_groups(model, **extra):
    """``Net``'s parameters in three groups (the Stiefel frame, the sphere rows, the free bias), each
    with its own ``extra`` hyperparameters."""
    return [{"params": [(k, getattr(model, k))], **extra.get(k, {})} for k in ("W", "s", "b")]


def _adam_clipped(constraints, lr, max_norm=0.05):
    """Adam after ``clip_by_global_norm`` of the Riemannian gradient (the functional route: the norm
    over every parameter the factory is given)."""
    c = constraints
    return gf.optim.retract_and_transport(c, gf.optim.chain(
        gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, max_norm), gf.optim.scale_by_adam(c),
        gf.optim.scale_by_schedule(lambda t: -lr(t))))


def test_clip_by_global_norm_over_groups_equals_one_group(generator):
    """``TorchOptimizer(clip_by_global_norm=max_norm)`` clips by the norm of every group's gradient
    (Note [A whole-model step]): three groups step as one group whose factory clips (the Riemannian
    norm on the Stiefel and sphere parameters), float64, 10 steps, to rounding; the factory's own clip
    over the three groups is each group's norm (another run), and ``.grad`` is left as it was."""
    x, y = _data(generator)
    models = [Net(generator) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    whole, one, per_group = models
    opts = [gf.optim.TorchOptimizer(_net_groups(whole), C, gf.optim.radam, lr=0.02, clip_by_global_norm=0.05),
            gf.optim.TorchOptimizer(one.named_parameters(), C, _adam_clipped, lr=0.02),
            gf.optim.TorchOptimizer(_net_groups(per_group), C, _adam_clipped, lr=0.02)]
    for _ in range(10):
        for m, o in zip(models, opts):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            g = {k: p.grad.clone() for k, p in m.named_parameters()}
            o.step()
            assert all(torch.equal(p.grad, g[k]) for k, p in m.named_parameters())
    with torch.no_grad():  # the clip acts at every step (the last one's norm, over the three groups, > 2·max_norm)
        sq = [float(sp.inner(p, r, r).sum()) for sp, p in ((gf.Stiefel(), whole.W), (gf.Sphere(), whole.s))
              for r in [sp.egrad_to_rgrad(p, p.grad)]]
        assert (sum(sq) + float((whole.b.grad**2).sum())) ** 0.5 > 0.1
    for k in ("W", "s", "b"):
        torch.testing.assert_close(getattr(whole, k).detach(), getattr(one, k).detach(), atol=1e-12, rtol=0, msg=k)
        assert (getattr(per_group, k) - getattr(one, k)).abs().max() > 1e-4, k  # each group's own norm
    assert member(gf.Stiefel(), whole.W.detach(), 1e-10) and member(gf.Sphere(), whole.s.detach(), 1e-10)


def _step_with(model, opt, x, y, poison=None):
    """One step of ``Net`` with the gradient of ``poison`` (a parameter's name) set to NaN in one entry."""
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if poison is not None:
        getattr(model, poison).grad[(0,) * getattr(model, poison).ndim] = float("nan")
    opt.step()


def _tensors_equal(a, b):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    return len(la) == len(lb) and all(type(u) is type(v) and (torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v)
                                      for u, v in zip(la, lb))


@pytest.mark.parametrize("poison", ["W", "b"])
def test_apply_if_finite_skips_every_groups_step(poison, generator):
    """``TorchOptimizer(apply_if_finite=n)`` with three groups: a NaN in one group's gradient (the Stiefel
    frame's, the free bias's) skips the step of every group (points, states, step counts: the
    ``state_dict`` as before it), counted as the functional ``apply_if_finite`` counts; the run goes on
    as one without that step (bit for bit). ``apply_if_finite`` inside the factory skips only the
    group with the NaN (the per-group route: the other groups stepped)."""
    x, y = _data(generator)
    ours, ref, per_group = Net(generator), Net(generator), Net(generator)
    ref.load_state_dict(ours.state_dict())
    per_group.load_state_dict(ours.state_dict())
    lrs = {"W": {"lr": 0.03}, "b": {"lr": 0.05}}
    opt = gf.optim.TorchOptimizer(_net_groups(ours, **lrs), C, gf.optim.radam, lr=0.02, apply_if_finite=3)
    ref_opt = gf.optim.TorchOptimizer(_net_groups(ref, **lrs), C, gf.optim.radam, lr=0.02)
    for step in range(6):
        if step in (2, 4):
            before = {k: p.detach().clone() for k, p in ours.named_parameters()}
            sd = opt.state_dict()
            _step_with(ours, opt, x, y, poison)
            assert all(torch.equal(p.detach(), before[k]) for k, p in ours.named_parameters())
            after = opt.state_dict()
            assert _tensors_equal(after["state"], sd["state"])
            assert (opt.notfinite_count, opt.last_finite) == (1, False)
            assert all(g["notfinite_count"] == 1 and g["total_notfinite"] == step // 2 for g in after["param_groups"])
            continue
        _step_with(ours, opt, x, y)
        _step_with(ref, ref_opt, x, y)
        assert (opt.notfinite_count, opt.last_finite) == (0, True)
        for k in ("W", "s", "b"):
            assert torch.equal(getattr(ours, k).detach(), getattr(ref, k).detach()), (step, k)
    assert opt.total_notfinite == 2
    assert int(opt.state_dict()["state"][0]["3.count"]) == 4  # four applied steps (radam's Adam count)
    factory = lambda c, lr: gf.optim.apply_if_finite(gf.optim.radam(c, lr=lr), max_consecutive_errors=3)  # noqa: E731
    per = gf.optim.TorchOptimizer(_net_groups(per_group), C, factory, lr=0.02)
    before = {k: p.detach().clone() for k, p in per_group.named_parameters()}
    _step_with(per_group, per, x, y, poison)
    moved = {k for k, p in per_group.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert moved == {"W", "s", "b"} - {poison}


def test_apply_if_finite_skips_a_step_whose_new_points_are_not_finite(generator):
    """Finite gradients, but one group's new point is not finite (the free bias's rate set to inf by a
    scheduler): the step is skipped for every group, as for a NaN gradient (the rule judges the new
    points too, as the functional ``apply_if_finite``); the next step is applied."""
    x, y = _data(generator)
    net = Net(generator)
    opt = gf.optim.TorchOptimizer(_net_groups(net), C, gf.optim.radam, lr=0.02, apply_if_finite=3)
    _step_with(net, opt, x, y)
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    sd = opt.state_dict()
    opt.param_groups[2]["lr"] = float("inf")  # the group of the free bias
    _step_with(net, opt, x, y)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(torch.equal(p.detach(), before[k]) for k, p in net.named_parameters())
    assert _tensors_equal(opt.state_dict()["state"], sd["state"])
    assert (opt.notfinite_count, opt.last_finite, opt.total_notfinite) == (1, False, 1)
    opt.param_groups[2]["lr"] = 0.02
    _step_with(net, opt, x, y)
    assert (opt.notfinite_count, opt.last_finite) == (0, True)
    assert all(not torch.equal(p.detach(), before[k]) for k, p in net.named_parameters())


def test_apply_if_finite_applies_after_too_many_skips_and_resumes_from_a_checkpoint(generator):
    """After more than ``max_consecutive_errors`` skips in a row the step is applied (a NaN point,
    visibly); the counters are entries of every group, saved in the ``state_dict`` (``torch.save`` /
    ``torch.load(weights_only=True)``, and ``torch.distributed.checkpoint``'s flattened
    ``get_state_dict``, which rebuilds the groups from the live ones' keys) and loaded, so a run resumed
    between two skips applies the same step as the run that never stopped; a checkpoint without
    counters starts them at 0."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    b.load_state_dict(a.state_dict())
    make = lambda m: gf.optim.TorchOptimizer(_net_groups(m), C, gf.optim.radam, lr=0.02,  # noqa: E731
                                             apply_if_finite=2, clip_by_global_norm=1.0)
    opt_a = make(a)
    for poison in (None, None, "s"):
        _step_with(a, opt_a, x, y, poison)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = make(b)
    opt_b.load_state_dict(saved["opt"])
    assert (opt_b.notfinite_count, opt_b.last_finite, opt_b.total_notfinite) == (1, False, 1)
    assert all((g["notfinite_count"], g["last_finite"], g["total_notfinite"]) == (1, False, 1) for g in opt_b.param_groups)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    d = Net(generator)
    opt_d = make(d)
    set_state_dict(d, opt_d, model_state_dict=saved["model"], optim_state_dict=get_state_dict(b, opt_b, options=options)[1],
                   options=options)
    assert (opt_d.notfinite_count, opt_d.last_finite, opt_d.total_notfinite) == (1, False, 1)
    for m, o in ((a, opt_a), (b, opt_b), (d, opt_d)):
        _step_with(m, o, x, y, "b")  # the second in a row: skipped
        assert torch.isfinite(m.b).all() and o.notfinite_count == 2
        _step_with(m, o, x, y, "b")  # the third: applied
        assert torch.isnan(m.b).any() and (o.notfinite_count, o.total_notfinite) == (3, 3)
    for k in ("W", "s", "b"):
        for m in (b, d):
            torch.testing.assert_close(getattr(a, k).detach(), getattr(m, k).detach(), atol=0, rtol=0, equal_nan=True, msg=k)
    c = Net(generator)
    fresh = make(c)
    plain = gf.optim.TorchOptimizer(_net_groups(c), C, gf.optim.radam, lr=0.02)
    for g in fresh.param_groups:
        g["notfinite_count"] = 5
    fresh.load_state_dict(plain.state_dict())
    assert (fresh.notfinite_count, fresh.last_finite, fresh.total_notfinite) == (0, True, 0)
    plain.load_state_dict(saved["opt"])  # counters of an optimizer without apply_if_finite: not read
    assert all("notfinite_count" not in g for g in plain.param_groups)


def test_whole_model_options_are_checked(generator):
    net = Net(generator)
    # tensors too: the step runs eagerly, so they are read once (a negative max_norm reversed every
    # gradient, several values failed at the first step)
    for bad in (0.0, -1.0, float("nan"), "1", True, torch.tensor(-1.0), torch.tensor(float("nan")),
                torch.tensor([1.0, 2.0]), torch.tensor(True), torch.tensor(1.0 + 0j)):
        with pytest.raises(gf.ManifoldError, match=r"^TorchOptimizer: expected `clip_by_global_norm` a number > 0"):
            gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02, clip_by_global_norm=bad)
    for bad in (-1, 1.5, True, "3", np.int64(-2), torch.tensor(3)):
        with pytest.raises(gf.ManifoldError, match=r"^TorchOptimizer: expected `apply_if_finite` an int >= 0"):
            gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02, apply_if_finite=bad)
    # what is valid: a one-value tensor for the norm, a NumPy integer for the count (as gf.nn sizes)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02,
                                  clip_by_global_norm=torch.tensor([0.5]), apply_if_finite=np.int64(3))
    assert opt._max_errors == 3 and type(opt._max_errors) is int
    assert gf.optim.apply_if_finite(gf.optim.rsgd(C, lr=0.05), max_consecutive_errors=np.int64(2)) is not None


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_a_one_value_tensor_max_norm_of_any_shape_clips_as_its_number(shape):
    """A one-value tensor max_norm of shape (1,) or (1, 1, 1) was accepted and then broadcast into every
    gradient: a 0-d parameter's step failed with a ManifoldError naming that parameter's shape (and a
    (1, 1, 1) one every parameter's). Its value is read as the number's: the same step."""
    def run(max_norm):
        model = torch.nn.Module()
        model.s = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
        model.w = torch.nn.Parameter(torch.ones(4, 3, dtype=F64))
        opt = gf.optim.TorchOptimizer(model.named_parameters(), {}, gf.optim.rsgd, lr=0.1, clip_by_global_norm=max_norm)
        (model.s * 3 + model.w.sum() * 2).backward()
        opt.step()
        return model.s.detach(), model.w.detach()

    s, w = run(torch.full(shape, 0.5, dtype=F64))
    s0, w0 = run(0.5)
    assert s.shape == () and w.shape == (4, 3)
    torch.testing.assert_close(s, s0, rtol=0, atol=0)
    torch.testing.assert_close(w, w0, rtol=0, atol=0)


def _adamw_groups(named, mask):
    """``torch.optim.AdamW`` with weight decay on the masked parameters only (torch's way: two groups)."""
    return torch.optim.AdamW([{"params": [p for k, p in named if mask[k]]},
                              {"params": [p for k, p in named if not mask[k]], "weight_decay": 0.0}],
                             lr=0.05, weight_decay=0.2)


@pytest.mark.parametrize("name", ["radam", "rsgd", "radamw"])
def test_parameters_without_a_gradient_are_skipped_as_torch_does(name, generator):
    """A parameter whose ``.grad`` is None is skipped as ``torch.optim`` skips it: not moved, its state
    untouched, its own step count (Adam's bias corrections for a head that started late; SGD's
    momentum buffer set to the first gradient, with dampening): step for step equal to
    ``torch.optim.Adam``/``SGD``/``AdamW`` over 10 steps where the heads are used irregularly."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours = Branches(generator)
    theirs = Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    kwargs, ref_cls = {
        "radam": (dict(lr=0.05, betas=(0.8, 0.99)), torch.optim.Adam),
        "rsgd": (dict(lr=0.05, momentum=0.9, dampening=0.2), torch.optim.SGD),
        "radamw": (dict(lr=0.05, weight_decay=0.1), torch.optim.AdamW),
    }[name]
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, getattr(gf.optim, name), **kwargs)
    ref = ref_cls(theirs.parameters(), **kwargs)
    before = {k: v.detach().clone() for k, v in ours.named_parameters()}
    opt.zero_grad(set_to_none=True)
    ((ours(x, "a") - y) ** 2).mean().backward()
    opt.step()
    assert torch.equal(ours.b.weight.detach(), before["b.weight"])  # b unused: not moved
    ours.load_state_dict({k: v for k, v in before.items()})
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, getattr(gf.optim, name), **kwargs)
    _same_runs(ours, opt, theirs, ref, x, y)
    assert len({int(e["cohort"]) for e in opt.state_dict()["state"].values()}) > 1  # the heads' histories differ


def test_a_manifold_parameter_without_a_gradient_is_skipped_as_geoopt_does(generator):
    """geoopt's ``RiemannianAdam`` skips a ``ManifoldParameter`` without a gradient too: a head whose
    rows are on the sphere, used on some steps only, step for step."""
    geoopt = pytest.importorskip("geoopt")
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours = Branches(generator)
    theirs = Branches(generator)
    with torch.no_grad():
        ours.b.weight.copy_(gf.Sphere().sample((4, 5), generator=generator, dtype=F64))
    theirs.load_state_dict(ours.state_dict())
    theirs.b.weight = geoopt.ManifoldParameter(theirs.b.weight.data, manifold=geoopt.Sphere())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {"b.weight": gf.Sphere()}, gf.optim.radam, lr=0.05)
    _same_runs(ours, opt, theirs, geoopt.optim.RiemannianAdam(theirs.parameters(), lr=0.05), x, y)
    assert member(gf.Sphere(), ours.b.weight.detach())


def _adam_per_name(constraints, lr):
    """One Adam per parameter through ``multi_transform``, its labels the parameters' names (the
    transforms built from the constraints the factory is given)."""
    c = constraints
    adam = {n: gf.optim.chain(gf.optim.scale_by_adam(c, 0.8, 0.99), gf.optim.scale_by_schedule(lambda t: -lr(t)))
            for n in c}
    return gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c),
                                                            gf.optim.multi_transform(adam, {n: n for n in c})))


BRANCH_NAMES = ["trunk.weight", "trunk.bias", "a.weight", "a.bias", "b.weight", "b.bias"]


def _adam_per_name_fixed(constraints, lr):
    """The same with a transform for every name of ``Branches`` whatever the constraints, and the labels
    a callable of the parameters."""
    c = constraints
    adam = {n: gf.optim.chain(gf.optim.scale_by_adam(c, 0.8, 0.99), gf.optim.scale_by_schedule(lambda t: -lr(t)))
            for n in BRANCH_NAMES}
    return gf.optim.retract_and_transport(c, gf.optim.chain(gf.optim.to_tangent(c),
                                                            gf.optim.multi_transform(adam, lambda p: {k: k for k in p})))


@pytest.mark.parametrize("probe", ["points", "meta"])
@pytest.mark.parametrize("factory", [_adam_per_name, _adam_per_name_fixed], ids=["from-constraints", "fixed"])
def test_labels_named_as_the_parameters_with_skipped_parameters(factory, probe, generator, monkeypatch):
    """A ``multi_transform`` whose labels are the parameters' names has a dict by label keyed as one by
    parameter: a step where a head had no gradient cut it as one (Note [Which entries of a state are a
    parameter's]) and the next update failed (optree's "dictionary key mismatch"). Now it steps as ``torch.optim.Adam`` (each parameter its own Adam: skipped as torch skips it) with the
    heads used irregularly after a first step of all, and a checkpoint taken after the cohorts split
    resumes bit for bit in a fresh optimizer; with the probe on the points (small parameters) and on
    the meta device (large ones: Note [Probing on meta or on the points])."""
    if probe == "meta":
        monkeypatch.setattr(gf.optim._module, "_PROBE_ON_POINTS", 0)
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    uses = ["ab", *USES]

    def train(model, opt, uses):
        for use in uses:
            opt.zero_grad(set_to_none=True)
            ((model(x, use) - y) ** 2).mean().backward()
            opt.step()

    ours, theirs, resumed = Branches(generator), Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    resumed.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, factory, lr=0.05)
    train(ours, opt, uses)
    train(theirs, torch.optim.Adam(theirs.parameters(), lr=0.05, betas=(0.8, 0.99)), uses)
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)
    opt = gf.optim.TorchOptimizer(resumed.named_parameters(), {}, factory, lr=0.05)
    train(resumed, opt, uses[:6])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt = gf.optim.TorchOptimizer(resumed.named_parameters(), {}, factory, lr=0.05)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    train(resumed, opt, uses[6:])
    for (k, p), q in zip(resumed.named_parameters(), ours.parameters()):
        assert torch.equal(p.detach(), q.detach()), k


def _flat_momentum(constraints, lr):
    """A free-parameter momentum kept as one flat buffer of all the parameters (no per-parameter part)."""

    def init(params):
        return torch.zeros(sum(p.numel() for p in params.values()), dtype=F64)

    def update(grads, state, params):
        buf = 0.9 * state + torch.cat([g.reshape(-1) for g in grads.values()])
        sizes = [p.numel() for p in params.values()]
        steps = dict(zip(params, buf.split(sizes)))
        return {k: p - lr(0) * steps[k].view_as(p) for k, p in params.items()}, buf

    return gf.optim.Optimizer(init, update)


def test_a_state_that_does_not_split_by_parameter_is_named(generator):
    """A step where some parameters have no gradient gives the others their part of the state, on the
    structure of their optimizer's init: a state with a leaf shaped by all the parameters has none, and
    the step says so (a ManifoldError naming the parameters), the parameters not moved."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    net = Branches(generator)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), {}, _flat_momentum, lr=0.05)
    ((net(x, "ab") - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ((net(x, "a") - y) ** 2).mean().backward()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pytest.raises(gf.ManifoldError, match=r"to split by parameter.*'b.weight'.*shape \(25,\)"):
        opt.step()
    assert all(torch.equal(v.detach(), before[k]) for k, v in net.named_parameters())

def test_constraints_given_in_a_group_at_construction(generator):
    """A group given at construction with its ``"constraints"`` (as ``add_param_group`` takes them) kept
    them as a hyperparameter no factory takes: the Stiefel weight was stepped as a free parameter and
    left its space (|WᵀW − I| 1.5 after three steps), silently (Note [Constraints in a group]). They
    join the constructor's: the run equals the one with them there; a name constrained in both is refused."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    b.load_state_dict(a.state_dict())
    opt_a = gf.optim.TorchOptimizer([{"params": [("W", a.W), ("s", a.s)], "lr": 0.05}, {"params": [("b", a.b)]}], C,
                                    gf.optim.radam, lr=0.02)
    opt_b = gf.optim.TorchOptimizer([{"params": [("W", b.W)], "constraints": {"W": gf.Stiefel()}, "lr": 0.05},
                                     {"params": [("s", b.s)], "constraints": {"s": gf.Sphere()}, "lr": 0.05},
                                     {"params": [("b", b.b)]}], {}, gf.optim.radam, lr=0.02)
    _train(a, opt_a, x, y, 3)
    _train(b, opt_b, x, y, 3)
    for k in ("W", "s", "b"):
        torch.testing.assert_close(getattr(b, k).detach(), getattr(a, k).detach(), atol=1e-13, rtol=0, msg=k)
    assert member(gf.Stiefel(), b.W.detach(), 1e-12) and member(gf.Sphere(), b.s.detach(), 1e-12)
    assert all("constraints" not in g for g in opt_b.state_dict()["param_groups"])
    with pytest.raises(gf.ManifoldError, match=r"constraint once .* got 'W' in both"):
        gf.optim.TorchOptimizer([{"params": [("W", b.W)], "constraints": {"W": gf.Stiefel()}}], {"W": gf.Stiefel()},
                                gf.optim.radam, lr=0.02)


def test_parameter_groups_and_schedulers_as_torch(generator):
    """Parameter groups with their own ``lr``, ``weight_decay`` and ``betas``, ``OneCycleLR`` cycling
    the learning rate and Adam's β₁ (``cycle_momentum``) in every group, and a group added mid-run
    (``add_param_group``, progressive unfreezing): step for step equal to ``torch.optim.Adam``."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours = Branches(generator)
    theirs = Branches(generator)
    theirs.load_state_dict(ours.state_dict())

    def groups(model, named):
        params = (lambda m: m.named_parameters(prefix=p)) if named else (lambda m: m.parameters())
        p = "trunk"
        g1 = {"params": params(model.trunk), "lr": 0.02, "weight_decay": 0.1}
        p = "a"
        g2 = {"params": params(model.a), "betas": (0.85, 0.95)}
        return [g1, g2]

    opt = gf.optim.TorchOptimizer(groups(ours, True), {}, gf.optim.radam, lr=0.05, betas=(0.9, 0.999))
    ref = torch.optim.Adam(groups(theirs, False), lr=0.05, betas=(0.9, 0.999))
    s1, s2 = (torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.1], total_steps=20) for o in (opt, ref))
    for i in range(16):
        if i == 6:  # unfreeze the second head
            opt.add_param_group({"params": ours.b.named_parameters(prefix="b"), "lr": 0.01, "betas": (0.9, 0.99)})
            ref.add_param_group({"params": theirs.b.parameters(), "lr": 0.01, "betas": (0.9, 0.99)})
        for model, o, sch in ((ours, opt, s1), (theirs, ref, s2)):
            o.zero_grad(set_to_none=True)
            ((model(x, "ab" if i >= 6 else "a") - y) ** 2).mean().backward()
            o.step()
            if i < 6:
                sch.step()
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"] != (0.9, 0.999)
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


TORCH = {"radam": (torch.optim.Adam, dict(lr=0.01)), "radamw": (torch.optim.AdamW, dict(lr=0.01)),
         "rsgd": (torch.optim.SGD, dict(lr=0.01))}


@pytest.mark.parametrize("name", list(TORCH))
def test_groups_hold_every_hyperparameter_as_torch(name, generator):
    """The groups and ``defaults`` hold the factory's hyperparameters with their defaults (torch's, where
    torch has them), so ``OneCycleLR`` with its default ``cycle_momentum`` (it raised "optimizer must
    support momentum or beta1") cycles β₁ or momentum; a hyperparameter set in a group mid-run
    (``weight_decay``, ``betas``, ``momentum``: none given at construction) is read; an extra key
    (``"name"``) stays in its group and is not passed. Step for step equal to ``torch.optim`` (float64)."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    cls, kwargs = TORCH[name]
    opt = gf.optim.TorchOptimizer([{"params": ours.named_parameters(), "name": "all"}], {}, getattr(gf.optim, name), **kwargs)
    ref = cls([{"params": theirs.parameters(), "name": "all"}], **kwargs)
    shared = {k: v for k, v in ref.defaults.items() if k in opt.defaults}
    assert len(shared) >= 4 and {k: opt.defaults[k] for k in shared} == shared
    assert opt.param_groups[0]["name"] == "all" and set(shared) <= set(opt.param_groups[0])
    s1, s2 = (torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12) for o in (opt, ref))
    for i in range(12):
        if i == 5:
            for o in (opt, ref):
                o.param_groups[0]["weight_decay"] = 0.3
                if name == "rsgd":
                    o.param_groups[0]["dampening"] = 0.2
                else:
                    o.param_groups[0]["betas"] = (0.5, 0.9)
        for model, o, sch in ((ours, opt, s1), (theirs, ref, s2)):
            o.zero_grad()
            ((model(x, "ab") - y) ** 2).mean().backward()
            o.step()
            sch.step()
    key = "momentum" if name == "rsgd" else "betas"
    assert opt.param_groups[0][key] == ref.param_groups[0][key]
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


def _momentum_cycled_as_torch_sgd(generator, kwargs: dict, **schedule) -> list:
    """rsgd through TorchOptimizer beside ``torch.optim.SGD`` (``kwargs``), both under ``OneCycleLR`` with
    ``base_momentum=0`` (``schedule``: more of its arguments), heads skipped at some steps (``USES``):
    asserts step-for-step equality (float64, 1e-12) and returns the momentum of each step."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.rsgd, **kwargs)
    ref = torch.optim.SGD(theirs.parameters(), **kwargs)
    s1, s2 = (torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=len(USES), base_momentum=0.0,
                                                  max_momentum=0.9, pct_start=0.3, **schedule) for o in (opt, ref))
    momenta = []
    for use in USES:
        for model, o, sch in ((ours, opt, s1), (theirs, ref, s2)):
            o.zero_grad(set_to_none=True)
            ((model(x, use) - y) ** 2).mean().backward()
            o.step()
            sch.step()
        momenta.append(opt.param_groups[0]["momentum"])
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)
    return momenta


def test_momentum_cycled_through_zero_as_torch_sgd(generator):
    """``OneCycleLR(base_momentum=0)`` takes rsgd's momentum to 0 and back (and by hand from 0 to 0.9):
    it crashed (the state of ``rsgd(momentum=0)`` had no momentum transform); now ``torch.optim.SGD``
    step for step, the buffer kept as it was at a step with momentum 0 (Note [Momentum that may be
    zero]), with dampening and parameters skipped at some steps; on a module with constrained
    parameters the points stay on their spaces."""
    momenta = _momentum_cycled_as_torch_sgd(generator, dict(lr=0.01, momentum=0.9, dampening=0.1), anneal_strategy="linear")
    assert 0.0 in momenta and momenta[-1] > 0
    net = Net(generator)
    x, y = _data(generator)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.rsgd, lr=0.02)
    for mu in (0.0, 0.9, 0.0, 0.5):
        opt.param_groups[0]["momentum"] = mu
        _train(net, opt, x, y, 2)
    assert member(gf.Stiefel(), net.W.detach()) and member(gf.Sphere(), net.s.detach())
    assert int(opt.state_dict()["state"][0]["2.count"]) == 4  # the steps with momentum


def test_a_zero_momentum_tensor_with_dampening_as_torch_sgd(generator):
    """``TorchOptimizer(..., rsgd, momentum=torch.tensor(0.), dampening=0.5)``: torch.optim.SGD steps by the
    gradient (it compares the tensor with 0); the group's rsgd took the buffer's rule and stepped by half
    the gradient from the second step on, silently (Note [A momentum tensor that may be zero])."""
    import copy

    theirs = torch.nn.Linear(3, 2).double()
    ours = copy.deepcopy(theirs)
    zero = torch.tensor(0.0, dtype=torch.float64)
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=zero, dampening=0.5)
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.rsgd, lr=0.1, momentum=zero, dampening=0.5)
    for _ in range(4):
        x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        for m, o in ((theirs, sgd), (ours, opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


def test_nesterov_momentum_cycled_through_zero_as_torch_sgd(generator):
    """Nesterov SGD whose momentum ``OneCycleLR(base_momentum=0)`` takes to 0: ``torch.optim.SGD`` steps
    plain SGD there (it checks nesterov only when built); the rebuilt rsgd raised its "nesterov=True
    with momentum > 0" ManifoldError at that step, mid-run (Note [Nesterov at momentum 0]). Now step
    for step equal to torch, with heads skipped at some steps; built with momentum 0 it is refused as
    torch refuses it."""
    momenta = _momentum_cycled_as_torch_sgd(generator, dict(lr=0.01, momentum=0.9, nesterov=True))
    assert 0.0 in momenta[:-1]
    with pytest.raises(gf.ManifoldError, match="nesterov=True"):
        gf.optim.TorchOptimizer(Branches(generator).named_parameters(), {}, gf.optim.rsgd, lr=0.01, momentum=0.0, nesterov=True)


def _step_through_momenta(ours, opt, theirs, ref, x, y, momenta):
    """Step ``opt`` (on ``ours``) and torch's ``ref`` (on ``theirs``) with each momentum set mid-run; the
    parameters end equal."""
    for mu in momenta:
        for model, o in ((ours, opt), (theirs, ref)):
            o.param_groups[0]["momentum"] = mu
            o.zero_grad(set_to_none=True)
            ((model(x, USES[0]) - y) ** 2).mean().backward()
            o.step()
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0, msg=k)


def test_nesterov_momentum_set_to_a_zero_tensor_mid_run_steps_as_torch_sgd(generator):
    """A group's momentum set to torch.tensor(0.) between steps with nesterov: torch.optim.SGD checks nesterov
    only when built and steps plain SGD; rsgd, which reads such a tensor (Note [Values known at construction]),
    is built without nesterov there as at a number 0 (Note [Nesterov at momentum 0]), not refused mid-run."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.rsgd, lr=0.01, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    _step_through_momenta(ours, opt, theirs, ref, x, y, (0.9, torch.tensor(0.0), torch.tensor(0.0), 0.5))
    with pytest.raises(gf.ManifoldError, match="nesterov=True"):
        gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.rsgd, lr=0.01, momentum=torch.tensor(0.0), nesterov=True)


def test_a_factory_of_its_own_with_nesterov_steps_as_torch_sgd_through_momentum_zero(generator):
    """trace refuses nesterov without momentum, as rsgd does (Note [Nesterov needs momentum]); a factory of
    one's own built on trace(momentum, nesterov=nesterov) and given a momentum of 0 mid-run (a scheduler, a
    line group["momentum"] = 0) is built without nesterov there as rsgd is (Note [Nesterov at momentum 0]):
    torch.optim.SGD's steps, not the trace's ManifoldError mid-run; built with momentum 0 it is refused."""

    def sgd(constraints, lr, momentum=0.0, nesterov=False):
        return gf.optim.retract_and_transport(constraints, gf.optim.chain(
            gf.optim.to_tangent(constraints), gf.optim.trace(momentum, nesterov=nesterov),
            gf.optim.scale_by_schedule(lambda n: -lr(n)) if callable(lr) else gf.optim.scale(-lr)))

    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, sgd, lr=0.01, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    _step_through_momenta(ours, opt, theirs, ref, x, y, (0.9, 0.0, torch.tensor(0.0), 0.5))
    with pytest.raises(gf.ManifoldError, match=r"^trace: expected `nesterov=True` with `decay` > 0"):
        gf.optim.TorchOptimizer(ours.named_parameters(), {}, sgd, lr=0.01, momentum=0.0, nesterov=True)


def test_hyperparameters_are_checked_at_construction(generator):
    """As ``torch.optim`` checks its own: a negative learning rate, β = 1 (a NaN point, or every step 0),
    ``nesterov`` without momentum, in the defaults or a group or an added group (which is then not
    added), and a hyperparameter the factory does not take, are ``ManifoldError`` s naming the factory;
    one set in a group later is refused at the next step."""
    net = Net(generator)
    for kwargs, match in [(dict(lr=-0.1), "radam: expected `lr` >= 0"),
                          (dict(lr=0.1, betas=(1.0, 0.999)), "radam: expected `betas` with 0 <= β₁ < 1"),
                          (dict(lr=0.1, weight_decy=0.1), r"expected hyperparameters of radam \(amsgrad, betas.*got 'weight_decy'")]:
        with pytest.raises(gf.ManifoldError, match=match):
            gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, **kwargs)
    with pytest.raises(gf.ManifoldError, match="rsgd: expected `nesterov=True` with `momentum` > 0"):
        gf.optim.TorchOptimizer([{"params": net.named_parameters(), "nesterov": True}], C, gf.optim.rsgd, lr=0.1)
    opt = gf.optim.TorchOptimizer([("b", net.b)], {}, gf.optim.radam, lr=0.1)
    with pytest.raises(gf.ManifoldError, match="radam: expected `betas` with 0 <= β₂ < 1"):
        opt.add_param_group({"params": [("W", net.W)], "constraints": {"W": gf.Stiefel()}, "betas": (0.9, 1.0)})
    assert len(opt.param_groups) == 1 and opt._names == ["b"]
    opt.add_param_group({"params": [("W", net.W)], "constraints": {"W": gf.Stiefel()}})
    x, y = _data(generator)
    _train(net, opt, x, y, 1)
    opt.param_groups[1]["betas"] = (1.0, 0.999)
    with pytest.raises(gf.ManifoldError, match="radam: expected `betas`"):
        _train(net, opt, x, y, 1)


def _cohorts_format(opt):
    """The optimizer's ``state_dict`` in the format before torch.optim's (what it saved then): the
    cohorts' functional states, NamedTuples."""
    index, groups = 0, []
    for g, names in zip(opt.param_groups, opt._group_names):
        groups.append({k: v for k, v in g.items() if k != "params"} | {"params": list(range(index, index + len(names)))})
        index += len(names)
    return {"param_groups": groups, "names": list(opt._names),
            "cohorts": [{"group": c.group, "names": list(c.names), "state": c.state} for c in opt._cohorts]}


def test_a_checkpoint_of_another_optimizer_is_refused(generator):
    """``load_state_dict`` compares each state with what the optimizer's init gives: another factory's
    checkpoint is a ``ManifoldError`` naming both states' entries (both NamedTuples in the earlier
    format; it failed at the next step with an AttributeError) and leaves the optimizer as it was; a
    checkpoint of the same factory with another momentum loads (the state fits every momentum), and
    one of ``rsgd(momentum=0)`` from before it always held a ``TraceState`` loads and resumes bit for bit."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    b.load_state_dict(a.state_dict())
    sgd = gf.optim.TorchOptimizer(a.named_parameters(), C, gf.optim.rsgd, lr=0.02, momentum=0.9)
    _train(a, sgd, x, y, 2)
    adam = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.radam, lr=0.02)
    _train(b, adam, x, y, 2)
    saved = adam.state_dict()
    with pytest.raises(gf.ManifoldError, match=r"expected the state of radam's init for the parameters \['W', 's', 'b'\] "
                                                r"\(group 0\), got the entries \['2.count', '2.trace', '3.count'\] where "
                                                r"its init gives \['2.count', '2.mu', '2.nu', '3.count'\]"):
        adam.load_state_dict(sgd.state_dict())
    with pytest.raises(gf.ManifoldError, match=r"got the entries \['2.count', '2.mu', '2.nu', '3.count'\] where its init "
                                                r"gives \['2.count', '2.trace', '3.count'\]"):
        sgd.load_state_dict(saved)
    with pytest.raises(gf.ManifoldError, match=r"\(group 0\), got a TraceState where its init gives a ScaleByAdamState"):
        adam.load_state_dict(_cohorts_format(sgd))
    with pytest.raises(gf.ManifoldError, match="got a ScaleByAdamState where its init gives a TraceState"):
        sgd.load_state_dict(_cohorts_format(adam))
    assert adam.param_groups[0]["betas"] == (0.9, 0.999) and "momentum" not in adam.param_groups[0]
    _train(b, adam, x, y, 1)  # steps on with its own state
    plain = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.rsgd, lr=0.02)
    plain.load_state_dict(sgd.state_dict())
    assert plain.param_groups[0]["momentum"] == 0.9
    # rsgd(momentum=0)'s checkpoint of three states (no TraceState)
    c, d = Net(generator), Net(generator)
    d.load_state_dict(c.state_dict())
    one = gf.optim.TorchOptimizer(c.named_parameters(), C, gf.optim.rsgd, lr=0.02)
    _train(c, one, x, y, 2)
    old = _cohorts_format(one)
    (state,) = [co["state"] for co in old["cohorts"]]
    old["cohorts"][0]["state"] = (state[0], state[1], state[3])
    d.load_state_dict(c.state_dict())
    two = gf.optim.TorchOptimizer(d.named_parameters(), C, gf.optim.rsgd, lr=0.02)
    two.load_state_dict(old)
    _train(c, one, x, y, 3)
    _train(d, two, x, y, 3)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(c, k).detach(), getattr(d, k).detach()), k


def test_a_parameter_frozen_at_construction(generator):
    """A frozen parameter is left out, and constraints naming it are ignored (those of every
    parameter of a model); unfreezing it later does not train it (documented), ``add_param_group``
    does."""
    net = Net(generator)
    net.W.requires_grad_(False)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02)
    assert opt._names == ["s", "b"]
    x, y = _data(generator)
    W0 = net.W.detach().clone()
    net.W.requires_grad_(True)
    _train(net, opt, x, y, 2)
    assert net.W.grad is not None and torch.equal(net.W.detach(), W0)
    opt.add_param_group({"params": [("W", net.W)], "constraints": {"W": gf.Stiefel()}})
    _train(net, opt, x, y, 2)
    assert not torch.equal(net.W.detach(), W0) and member(gf.Stiefel(), net.W.detach())
    with pytest.raises(gf.ManifoldError, match="got constraints for 'V'"):
        gf.optim.TorchOptimizer(net.named_parameters(), C | {"V": gf.Stiefel()}, gf.optim.radam, lr=0.02)


def test_a_mask_with_skipped_parameters_as_torch_groups(generator):
    """``radamw``'s ``mask`` (decay on weights, not biases) with heads skipped irregularly (each cohort
    gets its part of the mask) equals ``torch.optim.AdamW`` with a no-decay group for the biases."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    mask = {k: k.endswith("weight") for k, _ in ours.named_parameters()}
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radamw, lr=0.05, weight_decay=0.2, mask=mask)
    named = list(theirs.named_parameters())
    _same_runs(ours, opt, theirs, _adamw_groups(named, mask), x, y)
    # the same mask for the whole model given to two groups (trunk; heads): each takes its names
    again = Branches(generator)
    again.load_state_dict(theirs.state_dict())
    groups = [{"params": again.trunk.named_parameters(prefix="trunk")},
              {"params": [*again.a.named_parameters(prefix="a"), *again.b.named_parameters(prefix="b")]}]
    opt = gf.optim.TorchOptimizer(groups, {}, gf.optim.radamw, lr=0.05, weight_decay=0.2, mask=mask)
    _same_runs(again, opt, theirs, _adamw_groups(named, mask), x, y)


def _adam_or_sgd(constraints, lr, labels=None):
    """A factory taking multi_transform's labels as a hyperparameter: Adam for "adam", SGD with
    momentum for "sgd"."""
    return gf.optim.retract_and_transport(constraints, gf.optim.chain(
        gf.optim.to_tangent(constraints),
        gf.optim.multi_transform({"adam": gf.optim.scale_by_adam(constraints), "sgd": gf.optim.trace(0.9)}, labels),
        gf.optim.scale_by_schedule(lambda t: -lr(t))))


def test_labels_for_the_whole_model_as_a_hyperparameter(generator):
    """A factory's ``labels`` given for the whole model (a dict by name, as radam's ``mask``) failed in
    multi_transform at the first step of a group holding some of the parameters, and at the first
    step where a head had no gradient (a structure mismatch mid-run): only ``mask`` was cut to the
    parameters a cohort holds (Note [Hyperparameters by parameter name]). Now torch's two optimizers
    (Adam on the weights, SGD with momentum on the biases) step for step, heads skipped irregularly,
    in one group and in two."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    labels = {k: "adam" if k.endswith("weight") else "sgd" for k, _ in ours.named_parameters()}

    class Both:  # torch's way: one optimizer per rule
        def __init__(self, named):
            self.opts = [torch.optim.Adam([p for k, p in named if labels[k] == "adam"], lr=0.05),
                         torch.optim.SGD([p for k, p in named if labels[k] == "sgd"], lr=0.05, momentum=0.9)]

        def zero_grad(self, set_to_none=True):
            for o in self.opts:
                o.zero_grad(set_to_none=set_to_none)

        def step(self):
            for o in self.opts:
                o.step()

    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, _adam_or_sgd, lr=0.05, labels=labels)
    _same_runs(ours, opt, theirs, Both(list(theirs.named_parameters())), x, y)
    again, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(again.state_dict())
    groups = [{"params": again.trunk.named_parameters(prefix="trunk")},
              {"params": [*again.a.named_parameters(prefix="a"), *again.b.named_parameters(prefix="b")]}]
    opt = gf.optim.TorchOptimizer(groups, {}, _adam_or_sgd, lr=0.05, labels=labels)
    _same_runs(again, opt, theirs, Both(list(theirs.named_parameters())), x, y)


def test_a_mask_changed_in_place_is_read_at_the_next_step(generator):
    """``mask["b"] = False`` on the dict given as ``mask`` (or ``group["betas"]`` a list changed in
    place) takes effect at the next step as a reassigned one does (Note [Hyperparameters changed in
    place]): it was ignored (the group's optimizer compared the dict with itself) while state_dict
    saved the new value."""
    x, y = _data(generator)
    start = Net(generator).state_dict()
    ends = []
    for how in ("in place", "reassigned"):
        net = Net(generator)
        net.load_state_dict(start)
        mask, betas = {"W": True, "s": True, "b": True}, [0.9, 0.999]
        opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radamw, lr=0.05, weight_decay=0.5,
                                      mask=mask, betas=betas)
        _train(net, opt, x, y, 2)
        if how == "in place":
            mask["b"], betas[0] = False, 0.5
        else:
            opt.param_groups[0]["mask"], opt.param_groups[0]["betas"] = {"W": True, "s": True, "b": False}, [0.5, 0.999]
        _train(net, opt, x, y, 3)
        ends.append({k: getattr(net, k).detach().clone() for k in ("W", "s", "b")})
    for k in ("W", "s", "b"):
        assert torch.equal(ends[0][k], ends[1][k]), k


def test_a_group_with_constraints_added_later(generator):
    """``add_param_group`` takes the new parameters' constraints (``"constraints": {name: space}``),
    checks that they hold points, and steps them on their space with the group's hyperparameters."""
    net = Net(generator)
    x, y = _data(generator)
    head = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(gf.SO().sample((3, 3), generator=generator, dtype=F64))
    opt = gf.optim.TorchOptimizer([("b", net.b)], {}, gf.optim.radam, lr=0.02)
    with pytest.raises(gf.ManifoldError, match="expected parameter 'head' to be a point of"):
        opt.add_param_group({"params": [("head", nn.Parameter(2 * head.weight.detach()))],
                             "constraints": {"head": gf.SO()}})
    with pytest.raises(gf.ManifoldError, match="distinct parameter names"):
        opt.add_param_group({"params": [("b", head.weight)]})
    opt.add_param_group({"params": [("head", head.weight)], "constraints": {"head": gf.SO()}, "lr": 0.05})
    for _ in range(5):
        opt.zero_grad()
        ((net(x)[:, :3] @ head.weight - y[:, :3]) ** 2).mean().backward()
        opt.step()
    assert member(gf.SO(), head.weight.detach()) and net.W.grad is not None


def _interrupted_run(generator, make_opt, steps):
    """Module ``a`` trained ``2·steps`` with ``make_opt(a)``; ``b`` resumed after ``steps`` from ``a``'s
    checkpoint (``torch.save`` of both state_dicts, ``torch.load`` with ``weights_only=True``, a fresh
    ``make_opt(b)``) and trained the other ``steps``. Returns ``(a, b, checkpoint, opt_b)``."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    b.load_state_dict(a.state_dict())
    opt_a = make_opt(a)
    _train(a, opt_a, x, y, steps)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(a, opt_a, x, y, steps)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = make_opt(b)
    opt_b.load_state_dict(saved["opt"])
    _train(b, opt_b, x, y, steps)
    return a, b, saved, opt_b


def test_a_checkpoint_resumes_bit_for_bit(generator):
    """``torch.save`` of the module's and the optimizer's ``state_dict`` mid-run, ``torch.load`` with
    ``weights_only=True`` into fresh objects, the same steps: the same points as the run never stopped."""
    a, b, _, _ = _interrupted_run(generator, lambda m: gf.optim.TorchOptimizer(m.named_parameters(), C, gf.optim.radam, lr=0.02), 5)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(a, k).detach(), getattr(b, k).detach()), k


def _no_decay_on_biases(p):
    return {k: not k.endswith("b") for k in p}


@pytest.mark.parametrize("mask", [lambda p: {k: not k.endswith("b") for k in p}, _no_decay_on_biases],
                         ids=["lambda", "function"])
def test_a_checkpoint_with_a_callable_mask_saves_and_resumes(generator, mask):
    """radamw's documented callable ``mask`` sat in the saved param_groups: ``torch.save`` of the
    checkpoint raised PicklingError for a lambda, and a module-level function did not load with
    ``weights_only=True``. It is left out, as ``LambdaLR`` leaves its functions out (Note [Callable
    hyperparameters]), and the optimizer built to resume, with its own mask, resumes bit for bit."""
    a, b, saved, opt_b = _interrupted_run(generator, lambda m: gf.optim.TorchOptimizer(
        m.named_parameters(), C, gf.optim.radamw, lr=0.02, weight_decay=0.3, mask=mask), 4)
    assert all("mask" not in g for g in saved["opt"]["param_groups"])
    assert all(g["mask"] is mask for g in opt_b.param_groups)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(a, k).detach(), getattr(b, k).detach()), k


def test_state_dict_hooks_run_as_torch_optims(generator):
    """The hooks of ``register_state_dict_pre_hook`` / ``_post_hook`` and
    ``register_load_state_dict_pre_hook`` / ``_post_hook`` run (Note [Hooks of state_dict and
    load_state_dict]): a pre-hook that renames a checkpoint's parameters (torch's way to load one saved
    under other names, here a compiled model's ``_orig_mod.``) loads it, and the run resumes bit for bit."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    prefixed = [(f"_orig_mod.{n}", p) for n, p in a.named_parameters()]
    opt_a = gf.optim.TorchOptimizer(prefixed, {f"_orig_mod.{n}": s for n, s in C.items()}, gf.optim.radam, lr=0.02)
    calls = []
    opt_a.register_state_dict_pre_hook(lambda opt: calls.append("state_dict pre"))
    opt_a.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": "post"})
    _train(a, opt_a, x, y, 3)
    saved = opt_a.state_dict()
    assert calls == ["state_dict pre"] and saved["note"] == "post"
    b.load_state_dict(a.state_dict())
    _train(a, opt_a, x, y, 3)

    def strip(opt, sd):
        groups = [{**g, "param_names": [n.removeprefix("_orig_mod.") for n in g["param_names"]]} for g in sd["param_groups"]]
        return {**sd, "param_groups": groups}

    opt_b = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.radam, lr=0.02)
    with pytest.raises(gf.ManifoldError, match="expected a state for the parameters"):
        opt_b.load_state_dict(saved)  # its names are others
    opt_b.register_load_state_dict_pre_hook(strip)
    opt_b.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    opt_b.load_state_dict(saved)
    assert calls[-1] == "load post"
    _train(b, opt_b, x, y, 3)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(a, k).detach(), getattr(b, k).detach()), k


@pytest.mark.parametrize("name, kwargs", [("radam", dict(lr=0.02)), ("rsgd", dict(lr=0.02, momentum=0.9))])
def test_a_checkpoint_loads_in_its_parameters_dtype_as_torch_optim(name, kwargs, generator):
    """A float64 run's checkpoint loaded into the float32 model: as ``torch.optim`` does, every loaded
    tensor takes its parameter's dtype (Note [Loading a state where its parameters are]); the
    constrained parameters used to be refused at the first step (a float64 vector at a float32 point)
    and the free ones stepped in float64. The run goes on as one whose checkpoint was cast by hand."""
    factory = getattr(gf.optim, name)
    x, y = _data(generator)
    a = Net(generator)
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), C, factory, **kwargs)
    _train(a, opt_a, x, y, 3)
    saved = opt_a.state_dict()
    cast = {**saved, "state": {i: {k: v.float() if v.is_floating_point() else v for k, v in e.items()}
                               for i, e in saved["state"].items()}}
    runs = []
    for sd in (saved, cast):
        b = Net(generator).float()
        b.load_state_dict(a.state_dict())
        opt_b = gf.optim.TorchOptimizer(b.named_parameters(), C, factory, **kwargs)
        opt_b.load_state_dict(sd)
        assert all(v.dtype in (torch.float32, torch.int64) for e in opt_b.state.values() for v in e.values())
        _train(b, opt_b, x.float(), y.float(), 3)
        runs.append(b)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(runs[0], k).detach(), getattr(runs[1], k).detach()), k
    assert member(C["W"], runs[0].W.detach()) and member(C["s"], runs[0].s.detach())


def test_a_checkpoint_with_skipped_parameters_resumes_bit_for_bit(generator):
    """The same with cohorts split by skipped parameters (their states and step counts saved apart),
    and a checkpoint of the first format (one ``functional_state``) loads into the one cohort."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    a, b = Branches(generator), Branches(generator)
    b.load_state_dict(a.state_dict())
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), {}, gf.optim.radam, lr=0.05)
    _train_branches(a, opt_a, x, y)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict(), "cohorts": _cohorts_format(opt_a)}, buf)
    _train_branches(a, opt_a, x, y)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    for fmt in ("opt", "cohorts"):  # torch.optim's format, and the one before it (NamedTuple states)
        b.load_state_dict(saved["model"])
        opt_b = gf.optim.TorchOptimizer(b.named_parameters(), {}, gf.optim.radam, lr=0.05)
        opt_b.load_state_dict(saved[fmt])
        _train_branches(b, opt_b, x, y)
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p.detach(), q.detach()), (fmt, k)
    # the first format: one state of the factory built with the number lr (a constant rate's
    # EmptyState where the group's schedule has a ScaleByScheduleState); it steps as a fresh optimizer
    net, twin = Net(generator), Net(generator)
    twin.load_state_dict(net.state_dict())
    x, y = _data(generator)
    old = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02)
    _train(net, old, x, y, 2)
    state = gf.optim.radam(C | {"b": None}, lr=0.02).init({k: v.detach() for k, v in twin.named_parameters()})
    net.load_state_dict(twin.state_dict())
    old.load_state_dict({"param_groups": [{"lr": 0.02, "params": [0, 1, 2]}], "names": ["W", "s", "b"],
                         "functional_state": state})
    _train(net, old, x, y, 3)
    _train(twin, gf.optim.TorchOptimizer(twin.named_parameters(), C, gf.optim.radam, lr=0.02), x, y, 3)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(net, k).detach(), getattr(twin, k).detach()), k


def _no_custom_objects(tree, where="state_dict"):
    """Only dicts, lists and plain tuples hold anything (no NamedTuple or other object, which
    ``torch.distributed.checkpoint`` pickles whole), tensors only in dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _no_custom_objects(v, f"{where}[{k!r}]")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _no_custom_objects(v, f"{where}[{i}]")
    elif isinstance(tree, tuple):
        assert type(tree) is tuple and not any(isinstance(v, torch.Tensor) for v in tree), where
        for v in tree:
            _no_custom_objects(v, where)
    else:
        assert tree is None or isinstance(tree, (torch.Tensor, bool, int, float, str)), (where, type(tree))


def test_the_state_dict_is_torch_optims_format(generator):
    """``state_dict`` is ``torch.optim``'s: ``{"state": {index: entries}, "param_groups": [{...,
    "params": [indices], "param_names": [names]}]}``, nothing but dicts, lists, tensors and plain
    values (Note [TorchOptimizer's state_dict]); a parameter's entries are its leaves of the functional
    state, and its cohort's count: against ``torch.optim.Adam`` on heads used irregularly, "2.mu" is
    its ``exp_avg``, "2.nu" its ``exp_avg_sq`` and "2.count" its own ``step``; a parameter never stepped
    has none. ``opt.state`` is the same entries keyed by the parameters (empty before a step)."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours, theirs = Branches(generator), Branches(generator)
    theirs.load_state_dict(ours.state_dict())
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05, amsgrad=True)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.05, amsgrad=True)
    assert not opt.state and opt.state_dict()["state"] == {}
    names = [k for k, _ in ours.named_parameters()]
    for i, use in enumerate(USES):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad(set_to_none=True)
            ((model(x, use) - y) ** 2).mean().backward()
            o.step()
        sd = opt.state_dict()
        assert set(sd) == {"state", "param_groups"}
        _no_custom_objects(sd)
        (group,) = sd["param_groups"]
        assert group["params"] == list(range(6)) and group["param_names"] == names and group["betas"] == (0.9, 0.999)
        stepped = [j for j, n in enumerate(names) if not n.startswith("b.") or i >= 3]
        assert sorted(sd["state"]) == stepped
        for j, p in enumerate(theirs.parameters()):
            if j not in stepped:
                continue
            e, t = sd["state"][j], ref.state[p]
            assert set(e) == {"2.count", "2.mu", "2.nu", "2.nu_max", "3.count", "cohort"}
            assert int(e["2.count"]) == int(t["step"])
            for key, theirs_key in (("2.mu", "exp_avg"), ("2.nu", "exp_avg_sq"), ("2.nu_max", "max_exp_avg_sq")):
                torch.testing.assert_close(e[key], t[theirs_key], atol=1e-12, rtol=0, msg=f"{names[j]} {key}")
        view, params = opt.state, dict(ours.named_parameters())
        assert {id(p) for p in view} == {id(params[names[j]]) for j in stepped}
        for j in stepped:
            assert view[params[names[j]]].keys() == sd["state"][j].keys()
    cohort = {n: int(sd["state"][j]["cohort"]) for j, n in enumerate(names)}
    assert cohort["trunk.weight"] == cohort["trunk.bias"] != cohort["a.weight"] == cohort["a.bias"] != cohort["b.weight"]
    assert cohort["b.weight"] == cohort["b.bias"] != cohort["trunk.weight"]


@pytest.mark.parametrize("flatten", [False, True])
def test_torchs_distributed_state_dict_api_resumes_bit_for_bit(flatten, generator):
    """``torch.distributed.checkpoint.state_dict``'s ``get_state_dict(model, opt)`` (it raised
    ``KeyError: 'state'``: the state_dict had none) gives the entries keyed by the parameters' names,
    ``set_state_dict`` loads them into a fresh model and optimizer (which it first steps with zero
    gradients and lr 0, as it does a torch.optim one), also with ``flatten_optimizer_state_dict``;
    the cohorts split by skipped heads are kept, and the run resumes bit for bit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    a, b = Branches(generator), Branches(generator)
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), {}, gf.optim.radam, lr=0.05)
    for use in USES[:5]:
        opt_a.zero_grad(set_to_none=True)
        ((a(x, use) - y) ** 2).mean().backward()
        opt_a.step()
    model_sd, optim_sd = get_state_dict(a, opt_a, options=options)
    if not flatten:
        assert set(optim_sd["state"]) == {k for k, _ in a.named_parameters()}
    buf = io.BytesIO()
    torch.save({"model": model_sd, "optim": optim_sd}, buf)
    rest = USES[5:]
    for use in rest:
        opt_a.zero_grad(set_to_none=True)
        ((a(x, use) - y) ** 2).mean().backward()
        opt_a.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt_b = gf.optim.TorchOptimizer(b.named_parameters(), {}, gf.optim.radam, lr=0.05)
    set_state_dict(b, opt_b, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=options)
    assert len(opt_b._cohorts) == 3
    for use in rest:
        opt_b.zero_grad(set_to_none=True)
        ((b(x, use) - y) ** 2).mean().backward()
        opt_b.step()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), k


@pytest.mark.parametrize("buffer", ["saved only", "init's only"])
def test_a_momentum_buffer_on_one_side_loads(buffer, generator):
    """rsgd's momentum buffer is in the checkpoint and not in the init of the loaded momentum 0 (a
    momentum cycled to 0 keeps it), or in that init (momentum set to 0.9 after steps with 0) and not
    in the checkpoint: both load (Note [Momentum that may be zero]) and resume bit for bit."""
    x, y = _data(generator)
    a, b = Net(generator), Net(generator)
    b.load_state_dict(a.state_dict())
    first, then = (0.9, 0.0) if buffer == "saved only" else (0.0, 0.9)
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), C, gf.optim.rsgd, lr=0.02, momentum=first)
    _train(a, opt_a, x, y, 2)
    opt_a.param_groups[0]["momentum"] = then
    if buffer == "saved only":
        _train(a, opt_a, x, y, 1)
    sd = opt_a.state_dict()
    assert ("2.trace" in sd["state"][0]) is (buffer == "saved only")
    b.load_state_dict(a.state_dict())
    opt_b = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.rsgd, lr=0.02, momentum=first)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["momentum"] == then
    for mu in (then, 0.5):
        for o in (opt_a, opt_b):
            o.param_groups[0]["momentum"] = mu
        _train(a, opt_a, x, y, 2)
        _train(b, opt_b, x, y, 2)
    for k in ("W", "s", "b"):
        assert torch.equal(getattr(a, k).detach(), getattr(b, k).detach()), k


def test_the_affine_invariant_psd_in_a_module(generator):
    """A precision matrix parameter under ``PSD(metric="affine")`` stays positive definite and fits."""
    target = gf.PSD().sample((3, 3), generator=generator, dtype=F64)
    m = nn.Module()
    m.P = nn.Parameter(torch.eye(3, dtype=F64))
    opt = gf.optim.TorchOptimizer(m.named_parameters(), {"P": gf.PSD(metric="affine")}, gf.optim.rsgd, lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        gf.PSD(metric="affine").dist(m.P, target).pow(2).backward()
        opt.step()
    torch.testing.assert_close(m.P.detach(), target, atol=1e-8, rtol=0)


def test_bad_use_is_named(generator):
    net = Net(generator)
    with pytest.raises(gf.ManifoldError, match=r"got constraints for 'weight'"):
        gf.optim.TorchOptimizer(net.named_parameters(), {"weight": gf.Stiefel()}, gf.optim.radam, lr=0.1)
    with torch.no_grad():
        net.W.mul_(2.0)
    with pytest.raises(gf.ManifoldError, match=r"expected parameter 'W' to be a point of Stiefel"):
        gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.1)
    with torch.no_grad():
        net.W.mul_(0.5)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.1)
    with pytest.raises(gf.ManifoldError, match=r"expected \(name, tensor\) pairs"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(gf.ManifoldError, match=r"expected \(name, tensor\) pairs, as module.named_parameters"):
        gf.optim.TorchOptimizer(net.parameters(), C, gf.optim.radam, lr=0.1)
    emb = nn.Embedding(5, 3, sparse=True)
    opt = gf.optim.TorchOptimizer(emb.named_parameters(), {}, gf.optim.rsgd, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(gf.ManifoldError, match="dense gradient for 'weight'"):
        opt.step()
    other = gf.optim.TorchOptimizer(nn.Linear(2, 2).named_parameters(), {}, gf.optim.rsgd, lr=0.1)
    with pytest.raises(gf.ManifoldError, match="expected a state for the parameters"):
        other.load_state_dict(gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.rsgd, lr=0.1).state_dict())


def test_a_factory_of_a_transform_or_no_factory_is_refused(generator):
    """A factory returning a ``TangentTransform`` (an optax-style chain, ``retract_and_transport``
    forgotten) stepped without an error and wrote the step's vectors into the parameters (every weight
    ±lr after one Adam step: Note [An optimizer, not a transform]); ``torch.optim.Adam``, a built
    optimizer or a name in place of the factory failed with torch's or Python's TypeError. Each is a
    ManifoldError at construction, naming what was expected."""
    net = Net(generator)

    def adam_transform(constraints, lr):
        return gf.optim.chain(gf.optim.to_tangent(constraints), gf.optim.scale_by_adam(constraints),
                              gf.optim.scale_by_schedule(lambda t: -lr(t)))

    with pytest.raises(gf.ManifoldError, match=r"factory adam_transform: expected an Optimizer .* got a TangentTransform"):
        gf.optim.TorchOptimizer(net.named_parameters(), C, adam_transform, lr=0.1)
    for wrong, got in ((torch.optim.Adam, "the torch.optim class Adam"), (gf.optim.radam(C, lr=0.1), "an Optimizer already"),
                       ("radam", "'radam'")):
        with pytest.raises(gf.ManifoldError, match=f"expected `optimizer` a factory of geofunc.optim .* got {got}"):
            gf.optim.TorchOptimizer(net.named_parameters(), C, wrong, lr=0.1)


def test_a_factory_that_takes_lr_as_a_number_is_refused_at_construction(generator):
    """A factory written for a number (``scale(-lr)``) was built with the group's rate at construction
    and passed, then failed at the first step with Python's "bad operand type for unary -: 'function'"
    (the steps give ``lr`` as a schedule reading the group): a ManifoldError at construction and in
    ``add_param_group`` now (Note [The learning rate a factory is given]); written with a schedule it steps."""
    net = Net(generator)
    x, y = _data(generator)

    def sgd_for_a_number(constraints, lr):
        return gf.optim.retract_and_transport(constraints, gf.optim.chain(gf.optim.to_tangent(constraints),
                                                                          gf.optim.scale(-lr)))

    def sgd(constraints, lr):
        return gf.optim.retract_and_transport(constraints, gf.optim.chain(
            gf.optim.to_tangent(constraints), gf.optim.scale_by_schedule(lambda t: -lr(t))))

    with pytest.raises(gf.ManifoldError, match=r"factory sgd_for_a_number to take `lr` as a schedule .* got TypeError"):
        gf.optim.TorchOptimizer(net.named_parameters(), C, sgd_for_a_number, lr=0.1)
    opt = gf.optim.TorchOptimizer([("W", net.W)], {"W": gf.Stiefel()}, sgd, lr=0.1)
    opt._factory = sgd_for_a_number  # the same check in add_param_group
    with pytest.raises(gf.ManifoldError, match=r"factory sgd_for_a_number to take `lr` as a schedule"):
        opt.add_param_group({"params": [("b", net.b)]})
    opt._factory = sgd
    opt.add_param_group({"params": [("s", net.s)], "constraints": {"s": gf.Sphere()}})
    before = net.W.detach().clone()
    _train(net, opt, x, y, 2)
    assert not torch.equal(before, net.W.detach()) and member(gf.Sphere(), net.s.detach(), 1e-12)



class TiedRows(nn.Module):
    """An encoder whose rows are on the sphere and a decoder that is the same tensor (tied weights)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 3, bias=False).double()
        self.dec = nn.Linear(3, 6, bias=False).double()
        with torch.no_grad():
            self.enc.weight.copy_(gf.Sphere().sample((3, 6), generator=generator, dtype=F64))
        self.dec.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.enc(x), self.enc.weight.T)


class _Remembered(NamedTuple):
    point: Any
    grad: Any


def _remember():
    """A pure transform that keeps the point and the gradient it was last given (as optax's lookahead
    keeps slow weights) and moves along ``v - (x - x_prev)``: the memory changes the steps."""

    def init(params):
        return _Remembered(params, optree.tree_map(torch.zeros_like, params))

    def update(vectors, state, params):
        out = optree.tree_map(lambda v, x, x0, g0: v - 0.5 * (x - x0) + 0.25 * g0, vectors, params, state.point, state.grad)
        return out, _Remembered(params, vectors)

    return gf.optim.TangentTransform(init, update, gf.optim.keep_state)


def test_a_state_that_keeps_the_points_and_gradients_it_was_given(generator):
    """A pure transform whose state keeps the point and gradient it was given: TorchOptimizer gave
    update the parameters' own storage and their .grad, then wrote the new points into them in place
    (and zero_grad(set_to_none=False) zeroes .grad in place), so the kept point was the new one and
    the kept gradient zero, silently (Note [A state that holds a parameter]). Now the same points as
    the functional optimizer run by hand, step for step."""
    x, y = _data(generator)
    a = Net(generator)
    start = {k: v.detach().clone() for k, v in a.named_parameters()}

    def factory(constraints, lr):
        return gf.optim.retract_and_transport(constraints, gf.optim.chain(
            gf.optim.to_tangent(constraints), _remember(), gf.optim.scale_by_schedule(lambda t: -lr(t))))

    opt = gf.optim.TorchOptimizer(a.named_parameters(), C, factory, lr=0.05)
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        ((a(x) - y) ** 2).mean().backward()
        opt.step()
    b = Net(generator)
    fn = factory(C, lambda t: 0.05)
    params = start
    state = fn.init(params)
    for _ in range(4):
        grads = torch.func.grad(lambda p: ((torch.func.functional_call(b, p, (x,)) - y) ** 2).mean())(params)
        params, state = fn.update(grads, state, params)
    for k in ("W", "s", "b"):
        torch.testing.assert_close(getattr(a, k).detach(), params[k], atol=1e-13, rtol=0, msg=k)


def test_a_tied_weight_is_one_parameter(generator):
    """A tied weight listed under both its names (``named_parameters(remove_duplicate=False)``) was two
    parameters of one tensor, the last write winning: with the sphere constraint under one name, the
    free step of the other overwrote it and the rows left the sphere (norms 0.6 after three steps),
    silently (Note [A tensor under two names]). It is refused, at construction and in
    ``add_param_group``; listed once (the default) it trains on the sphere."""
    net = TiedRows(generator)
    x = torch.randn(8, 6, generator=generator, dtype=F64)
    twice = list(net.named_parameters(remove_duplicate=False))
    with pytest.raises(gf.ManifoldError, match="one tensor as 'enc.weight' and 'dec.weight'"):
        gf.optim.TorchOptimizer(twice, {"enc.weight": gf.Sphere()}, gf.optim.radam, lr=0.1)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), {"enc.weight": gf.Sphere()}, gf.optim.radam, lr=0.1)
    with pytest.raises(gf.ManifoldError, match="one tensor as 'enc.weight' and 'dec.weight'"):
        opt.add_param_group({"params": [("dec.weight", net.dec.weight)]})
    for _ in range(3):
        opt.zero_grad()
        ((net(x) - 1) ** 2).sum().backward()
        opt.step()
    assert member(gf.Sphere(), net.enc.weight.detach(), 1e-12)

def test_a_compiled_step_is_the_eager_step(generator):
    """``torch.compile(opt.step)`` (and a compiled training step that calls it) steps as eager: Dynamo
    dropped the assignment of the new functional state on a ``torch.optim.Optimizer``, so the compiled
    step re-initialized Adam's state every time (1e-4 off after three steps); ``step`` now always runs
    eagerly (Note [A functional optimizer behind torch.optim])."""
    x, y = _data(generator)
    a = Net(generator)
    b = Net(generator)
    b.load_state_dict(a.state_dict())
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), C, gf.optim.radam, lr=0.02)
    opt_b = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.radam, lr=0.02)
    torch._dynamo.reset()
    step = torch.compile(opt_b.step, backend="eager")

    @torch.compile(backend="eager")
    def train_step():
        opt_b.zero_grad()
        ((b(x) - y) ** 2).mean().backward()
        opt_b.step()

    for i in range(4):
        opt_a.zero_grad()
        ((a(x) - y) ** 2).mean().backward()
        opt_a.step()
        if i < 2:
            opt_b.zero_grad()
            ((b(x) - y) ** 2).mean().backward()
            step()
        else:
            train_step()
    for k in ("W", "s", "b"):
        torch.testing.assert_close(getattr(b, k).detach(), getattr(a, k).detach(), atol=1e-13, rtol=0)
    assert int(opt_b.state_dict()["state"][0]["2.count"]) == 4


def test_a_deep_copy_or_pickle_steps_on_its_own(generator):
    """``copy.deepcopy`` and ``pickle`` of the optimizer keep its parameters' names, cohorts and
    states (torch.optim.Optimizer's ``__getstate__`` kept only its own three fields), and the copy
    reads its own groups' learning rate, not the original's."""
    import copy
    import pickle

    x, y = _data(generator)
    net = Net(generator)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02)
    _train(net, opt, x, y, 2)
    for clone in (copy.deepcopy({"net": net, "opt": opt}), pickle.loads(pickle.dumps({"net": net, "opt": opt}))):
        twin, opt2 = clone["net"], clone["opt"]
        assert [p is q for p, q in zip(opt2.param_groups[0]["params"], twin.parameters())] == [True] * 3
        opt2.param_groups[0]["lr"] = 0.0
        before = {k: v.detach().clone() for k, v in twin.named_parameters()}
        _train(twin, opt2, x, y, 1)
        for k, v in twin.named_parameters():
            # lr 0: its own group's rate, not the original's 0.02 (the retraction re-orthonormalizes: rounding)
            torch.testing.assert_close(v.detach(), before[k], atol=1e-13, rtol=0, msg=k)
    reference = Net(generator)
    reference.load_state_dict(net.state_dict())
    _train(net, opt, x, y, 1)
    assert not torch.equal(net.W.detach(), reference.W.detach())


@pytest.mark.parametrize("bad", ["stiefel", gf.Stiefel, 3, (gf.Stiefel(),)], ids=repr)
def test_a_constraint_that_is_not_a_space_is_refused_by_name(bad):
    """A constraint that is not a space (a string, the class itself, a number, a tuple) raised Python's
    "'str' object has no attribute 'contains'" (or contains()'s missing argument) from the membership
    check: a ManifoldError naming the parameter and what it got, at construction and in add_param_group."""
    model = nn.Linear(3, 4)
    with pytest.raises(gf.ManifoldError, match=r"TorchOptimizer: constraints for parameter 'weight': expected a space"):
        gf.optim.TorchOptimizer(model.named_parameters(), {"weight": bad}, gf.optim.radam, lr=1e-2)
    opt = gf.optim.TorchOptimizer(model.named_parameters(), {}, gf.optim.radam, lr=1e-2)
    other = nn.Linear(3, 3)
    with pytest.raises(gf.ManifoldError, match=r"constraints for parameter 'w': expected a space .*or None, got"):
        opt.add_param_group({"params": [("w", other.weight)], "constraints": {"w": bad}})


def test_a_tensor_learning_rate_is_checked_as_its_number():
    """torch.optim takes a tensor lr; the factories do not read a tensor (they may be traced), so a
    tensor(-0.1) stepped uphill silently (a float -0.1 is refused) and a (1,) one broadcast a 0-d
    parameter's step to (1,): the group's rate is checked as its number, kept as a 0-d view."""
    def model():
        m = torch.nn.Module()
        m.s = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
        m.w = torch.nn.Parameter(torch.ones(3, dtype=F64))
        return m

    for bad in (torch.tensor(-0.1), torch.tensor(float("nan")), torch.tensor([0.1, 0.2]), torch.tensor(True)):
        with pytest.raises(gf.ManifoldError, match=r"expected `lr`"):
            gf.optim.TorchOptimizer(model().named_parameters(), {}, gf.optim.rsgd, lr=bad)
    out = []
    for lr in (0.1, torch.tensor(0.1, dtype=F64), torch.tensor([0.1], dtype=F64)):
        m = model()
        opt = gf.optim.TorchOptimizer(m.named_parameters(), {}, gf.optim.rsgd, lr=lr)
        (m.s * 3 + m.w.sum() * 2).backward()
        opt.step()
        assert m.s.shape == ()
        out.append(torch.cat([m.s.detach().reshape(1), m.w.detach()]))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2], out[0], rtol=0, atol=0)


@pytest.mark.parametrize("factory,kwargs", [(gf.optim.radam, {}), (gf.optim.rsgd, {"momentum": 0.9}),
                                            (gf.optim.radam, {"apply_if_finite": 2, "clip_by_global_norm": 1.0})])
def test_tensors_of_a_dropped_optimizer_go_without_the_cyclic_collector(factory, kwargs):
    # Note [No cycle through the learning rate]: as torch.optim's, the optimizer, its parameters and
    # its states go with their last reference, and the states that state_dict() or .state read go
    # with the step that replaces them (closures over the optimizer, recursive local functions over
    # the states made reference cycles, which only the cyclic collector frees).
    import gc
    import weakref

    g = torch.Generator().manual_seed(0)
    x, y = _data(g)

    def step(net, opt):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()

    gc.collect()
    gc.disable()
    try:
        net = Net(g)
        opt = gf.optim.TorchOptimizer(net.named_parameters(), constraints=C, optimizer=factory, lr=1e-2, **kwargs)
        step(net, opt)
        opt.load_state_dict(opt.state_dict())
        step(net, opt)
        read = [weakref.ref(t) for s in opt.state.values() for k, t in s.items() if k != "cohort" and t.ndim > 0]
        assert read
        step(net, opt)
        assert [r() is None for r in read] == [True] * len(read)  # replaced by the step
        refs = [weakref.ref(opt), weakref.ref(net.W)]
        del net, opt
        assert [r() is None for r in refs] == [True, True]
    finally:
        gc.enable()


def test_one_value_tensor_hyperparameters_are_taken_and_checked_as_torch_optim_does():
    """torch.optim.Adam takes one-value tensor betas and checks their values: TorchOptimizer broadcast a (1,)
    β into a 0-dim parameter's step (an error naming the parameter) and took a tensor β₁ = 1 unchecked (every
    point NaN after the first step). One-value tensors are kept as 0-dim views and checked as numbers."""
    def run(**kw):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 5, dtype=F64)
        with torch.no_grad():
            m.weight.copy_(gf.Stiefel().sample((5, 3), generator=torch.Generator().manual_seed(1), dtype=F64))
        m.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.5, dtype=F64)))
        opt = gf.optim.TorchOptimizer(m.named_parameters(), {"weight": gf.Stiefel()}, gf.optim.radam, lr=0.1, **kw)
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
        for _ in range(2):
            opt.zero_grad()
            (m(x) * m.scale).pow(2).sum().backward()
            opt.step()
        return m

    ref = run(betas=(0.8, 0.99), eps=1e-6)
    got = run(betas=(torch.tensor([0.8], dtype=F64), torch.tensor([[0.99]], dtype=F64)), eps=torch.tensor([1e-6], dtype=F64))
    for (k, a), b in zip(got.named_parameters(), ref.parameters()):
        assert a.shape == b.shape, k
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0, msg=k)
    for bad in ({"betas": (torch.tensor(1.0), 0.999)}, {"betas": (0.9, torch.tensor([1.0]))}, {"eps": torch.tensor(-1.0)}):
        with pytest.raises(gf.ManifoldError):
            run(**bad)


def test_nesterov_at_a_numpy_zero_momentum_steps_as_plain_sgd():
    """Note [Nesterov at momentum 0] for a momentum a scheduler sets to NumPy's 0 (np.float32(0.0)): rsgd
    reads it as the 0 it is (torch.optim.SGD compares momentum != 0), so the group steps as plain SGD as for
    a Python 0, not with rsgd's refusal of nesterov without momentum."""
    import numpy as np

    out = []
    for zero in (0.0, np.float32(0.0)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(2, 3, dtype=F64)
        opt = gf.optim.TorchOptimizer(lin.named_parameters(), {}, gf.optim.rsgd, lr=0.1, momentum=0.9, nesterov=True)
        opt.param_groups[0]["momentum"] = zero
        for _ in range(2):
            opt.zero_grad()
            lin(torch.ones(1, 2, dtype=F64)).pow(2).sum().backward()
            opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in lin.parameters()]))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_a_copy_with_a_scheduler_steps_its_own_parameters(generator):
    """An lr_scheduler wraps the optimizer's ``step`` in an instance attribute that steps the original
    through a weak reference (Note [A copy's step is its own]): a deepcopy of (model, optimizer,
    scheduler) stepped the original's parameters (the copy's did not move), and pickle refused it."""
    import copy
    import pickle

    x, y = _data(generator)
    net = Net(generator)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    _train(net, opt, x, y, 1)
    sched.step()
    ref_net = copy.deepcopy(net)
    ref_opt = gf.optim.TorchOptimizer(ref_net.named_parameters(), C, gf.optim.radam, lr=0.02)
    ref_opt.load_state_dict(opt.state_dict())
    _train(ref_net, ref_opt, x, y, 1)  # an uninterrupted second step
    for clone in (copy.deepcopy((net, opt, sched)), pickle.loads(pickle.dumps((net, opt, sched)))):
        twin, opt2, sched2 = clone
        assert "step" not in vars(opt2)
        before = net.W.detach().clone()
        _train(twin, opt2, x, y, 1)
        sched2.step()
        assert torch.equal(net.W.detach(), before)  # the original is left alone
        for k in ("W", "s", "b"):
            assert torch.equal(getattr(twin, k).detach(), getattr(ref_net, k).detach()), k
        del twin, opt2, sched2, clone


def test_a_copy_leaves_the_instance_hooks_behind_as_torch_optim_does(generator):
    """torch.optim's copies and pickles leave the hooks registered on the instance out: a lambda hook
    made a TorchOptimizer unpicklable, and a copy's step ran the original's hooks (Note [A copy's step
    is its own])."""
    import copy
    import pickle

    net = Net(generator)
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.02)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    for twin, opt2 in (copy.deepcopy((net, opt)), pickle.loads(pickle.dumps((net, opt)))):
        x, y = _data(generator)
        _train(twin, opt2, x, y, 1)
        assert calls == []
    x, y = _data(generator)
    _train(net, opt, x, y, 1)
    assert calls == [opt]


def test_a_hyperparameter_refused_at_a_step_moves_no_group():
    """Note [Hyperparameters refused before any parameter moves]: a momentum set to -0.5 in the second group was
    refused by the factory at the step after group 0 had been stepped and written; the retry stepped group 0 a
    second time. Nothing moves at a refused step, and the retry is one step of every group."""
    a, b = nn.Parameter(torch.zeros(2, dtype=F64)), nn.Parameter(torch.zeros(2, dtype=F64))
    opt = gf.optim.TorchOptimizer([{"params": [("a", a)]}, {"params": [("b", b)]}], {}, gf.optim.rsgd, lr=0.1, momentum=0.9)
    opt.param_groups[1]["momentum"] = -0.5
    a.grad, b.grad = torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)
    with pytest.raises(gf.ManifoldError, match=r"^rsgd: expected `momentum` >= 0"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2, dtype=F64)) and torch.equal(b.detach(), torch.zeros(2, dtype=F64))
    assert opt.state_dict()["state"] == {}
    opt.param_groups[1]["momentum"] = 0.5
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), torch.full((2,), -0.1, dtype=F64), rtol=0, atol=0)


def test_a_bool_or_complex_clip_tensor_is_refused():
    """``clip_by_global_norm`` as a tensor must be real (not bool, not complex: ``real_dtype``) and > 0: a bool
    True was read as max_norm 1 and clipped every step, silently."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    for clip in (torch.tensor(True), torch.tensor(1.0 + 0j)):
        with pytest.raises(gf.ManifoldError, match="clip_by_global_norm"):
            gf.optim.TorchOptimizer([("p", p)], {}, gf.optim.rsgd, lr=0.1, clip_by_global_norm=clip)
    gf.optim.TorchOptimizer([("p", p)], {}, gf.optim.rsgd, lr=0.1, clip_by_global_norm=torch.tensor(1.0))


@pytest.mark.parametrize("factory, torch_cls, key", [(gf.optim.rsgd, torch.optim.SGD, "maximize"),
                                                     (gf.optim.radam, torch.optim.Adam, "maximize"),
                                                     (gf.optim.radam, torch.optim.Adam, "decoupled_weight_decay")])
def test_a_torch_flag_in_a_group_that_the_factory_does_not_take_is_refused(factory, torch_cls, key):
    """Note [torch.optim's flags in a group]: a group's "maximize": True was kept as an unknown key and the
    step descended where torch.optim ascends (and Adam's decoupled_weight_decay=True gave the L2 step), silently.
    Refused at construction, in add_param_group and at a step after it is set; False, None and torch's
    flags that change only how it computes (foreach, fused) are taken, as a group copied from torch.optim."""
    a = nn.Parameter(torch.zeros(3, dtype=F64))
    b = nn.Parameter(torch.zeros(3, dtype=F64))
    ref = torch_cls([{"params": [b], key: True}], lr=0.1, weight_decay=0.5)
    b.grad = torch.ones(3, dtype=F64)
    ref.step()
    assert not torch.equal(b.detach(), torch.full((3,), -0.1, dtype=F64))  # torch's step is not the plain descent
    with pytest.raises(gf.ManifoldError, match=rf"^TorchOptimizer: expected no `{key}` in parameter group 0 "):
        gf.optim.TorchOptimizer([{"params": [("a", a)], key: True}], {}, factory, lr=0.1)
    opt = gf.optim.TorchOptimizer([{"params": [("a", a)], key: False, "foreach": True, "fused": None}], {}, factory, lr=0.1)
    with pytest.raises(gf.ManifoldError, match=rf"^TorchOptimizer: expected no `{key}` in parameter group 1 "):
        opt.add_param_group({"params": [("c", nn.Parameter(torch.zeros(2, dtype=F64)))], key: True})
    assert len(opt.param_groups) == 1
    opt.param_groups[0][key] = True
    a.grad = torch.ones(3, dtype=F64)
    with pytest.raises(gf.ManifoldError, match=rf"^TorchOptimizer: expected no `{key}` in parameter group 0 "):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(3, dtype=F64))  # nothing moved
    opt.param_groups[0][key] = False
    opt.step()
    assert bool((a.detach() < 0).all())  # unset again: it steps, descending


def test_a_torch_optim_group_copied_with_its_flags_unset_is_taken():
    """Note [torch.optim's flags in a group]: torch.optim.Adam's param_groups hold maximize=False,
    decoupled_weight_decay=False, foreach=None, ...: such a group is taken, and steps as Adam."""
    _steps_as_torch_with_its_flags(torch.optim.Adam, {}, gf.optim.radam)


def _steps_as_torch_with_its_flags(torch_cls, kwargs: dict, factory) -> dict:
    """A TorchOptimizer group holding every flag of ``torch_cls``'s own group steps as ``torch_cls`` (three steps,
    float64, to 1e-15); returns those flags."""
    p = nn.Parameter(torch.ones(3, dtype=F64))
    ref = nn.Parameter(torch.ones(3, dtype=F64))
    torch_opt = torch_cls([ref], lr=0.1, **kwargs)
    flags = {k: v for k, v in torch_opt.param_groups[0].items() if k != "params"}
    opt = gf.optim.TorchOptimizer([{"params": [("p", p)], **flags}], {}, factory, lr=0.1)
    for _ in range(3):
        p.grad, ref.grad = torch.full((3,), 0.5, dtype=F64), torch.full((3,), 0.5, dtype=F64)
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-15)
    return flags


def test_torch_optim_adamw_groups_are_taken_by_radamw():
    """Note [torch.optim's flags in a group]: torch.optim.AdamW's param_groups hold decoupled_weight_decay=True,
    AdamW's step, which radamw computes; such a group was refused with the hint "use gf.optim.radamw" while the
    factory was radamw. Taken there (and stepping as AdamW), still refused by radam (its step is Adam's L2)."""
    flags = _steps_as_torch_with_its_flags(torch.optim.AdamW, {"weight_decay": 0.5}, gf.optim.radamw)
    assert flags["decoupled_weight_decay"] is True
    q = nn.Parameter(torch.ones(3, dtype=F64))
    with pytest.raises(gf.ManifoldError, match=r"^TorchOptimizer: expected no `decoupled_weight_decay` in parameter group 0 "):
        gf.optim.TorchOptimizer([{"params": [("q", q)], **flags}], {}, gf.optim.radam, lr=0.1)


def test_a_torch_flag_that_the_factory_takes_is_passed_to_it():
    """Note [torch.optim's flags in a group]: only a flag the factory does not take is refused; a factory
    with its own ``maximize`` is given the group's value, at construction and at a step."""
    seen = []

    def factory(constraints, lr, maximize=False):
        seen.append(maximize)
        return gf.optim.rsgd(constraints, lr)

    a = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = gf.optim.TorchOptimizer([{"params": [("a", a)], "maximize": True}], {}, factory, lr=0.1)
    a.grad = torch.ones(3, dtype=F64)
    opt.step()
    assert seen and all(v is True for v in seen), seen
    torch.testing.assert_close(a.detach(), torch.full((3,), -0.1, dtype=F64), rtol=0, atol=0)


def test_a_torch_flag_with_no_single_truth_value_is_refused():
    """Note [torch.optim's flags in a group]: only None and values that read as False are unset; a flag with
    no truth value (a tensor of several values) is not unset, so it is refused rather than ignored."""
    a = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(gf.ManifoldError, match=r"^TorchOptimizer: expected no `maximize` in parameter group 0 "):
        gf.optim.TorchOptimizer([{"params": [("a", a)], "maximize": torch.tensor([True, False])}], {}, gf.optim.rsgd,
                                lr=0.1)


def test_a_factory_with_var_keywords_is_given_a_groups_torch_flag():
    """Note [torch.optim's flags in a group]: a factory taking ``**kwargs`` is given the group's keys, so a
    torch.optim flag there is its to read, not refused."""
    seen = []

    def factory(constraints, lr, **kwargs):
        seen.append(kwargs.get("maximize"))
        return gf.optim.rsgd(constraints, lr)

    a = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = gf.optim.TorchOptimizer([{"params": [("a", a)], "maximize": True}], {}, factory, lr=0.1)
    a.grad = torch.ones(3, dtype=F64)
    opt.step()
    assert True in seen, seen


def test_betas_changed_in_place_alone_are_read_at_the_next_step_as_torch_adam(generator):
    """``betas[0] = 0.5`` on the list given as ``betas``, with no other hyperparameter changed, takes
    effect at the next step as ``group["betas"] = (0.5, 0.999)`` does in ``torch.optim.Adam`` (which
    reads the group at every step; it keeps a copy of the list it is given, so it is reassigned there):
    Note [Hyperparameters changed in place]. (The test above changes the mask too, whose change alone
    rebuilds the group's optimizer.)"""
    x, y = _data(generator)
    ours, theirs = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    theirs.load_state_dict(ours.state_dict())
    betas = [0.9, 0.999]
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05, betas=betas)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.05, betas=(0.9, 0.999))
    _train(ours, opt, x, y, 2)
    _train(theirs, ref, x, y, 2)
    betas[0] = 0.5
    ref.param_groups[0]["betas"] = (0.5, 0.999)
    _train(ours, opt, x, y, 3)
    _train(theirs, ref, x, y, 3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0)


def test_the_state_dicts_entries_are_distinct_tensors(generator):
    """Each parameter's entries hold tensors of their own (Note [TorchOptimizer's state_dict]: the
    cohort's shared count is copied into each, so that an in-place load writes each once): writing
    into one parameter's count entry changes no other parameter's entry and not the optimizer's steps."""
    x, y = _data(generator)
    start = Net(generator).state_dict()
    ends = []
    for write in (False, True):
        net = Net(generator)
        net.load_state_dict(start)
        opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.radam, lr=0.05)
        _train(net, opt, x, y, 2)
        sd = opt.state_dict()
        ptrs = [t.untyped_storage().data_ptr() for e in sd["state"].values() for t in e.values()
                if isinstance(t, torch.Tensor)]
        assert len(ptrs) == len(set(ptrs))
        counts = {k: v for k, v in sd["state"][0].items() if k.endswith("count")}
        assert counts
        if write:
            for v in counts.values():
                v.fill_(100)
            assert all(int(v) == 2 for k, v in sd["state"][1].items() if k in counts)
        _train(net, opt, x, y, 2)
        ends.append({k: getattr(net, k).detach().clone() for k in ("W", "s", "b")})
    for k in ("W", "s", "b"):
        assert torch.equal(ends[0][k], ends[1][k]), k


def test_a_checkpoint_of_parameters_of_other_shapes_is_refused(generator):
    """A checkpoint saved for parameters of the same names and other shapes (a (1, 6) weight's moments
    for a (4, 6) weight) is refused with a ManifoldError naming the shapes, as torch.optim refuses
    one whose sizes do not match (_mismatch's shape check: without it the load went through)."""
    x, y = _data(generator)
    small, large = nn.Linear(6, 1).double(), nn.Linear(6, 4).double()
    saved = gf.optim.TorchOptimizer(small.named_parameters(), {}, gf.optim.radam, lr=0.05)
    _train(small, saved, x, y[:, :1], 2)
    opt = gf.optim.TorchOptimizer(large.named_parameters(), {}, gf.optim.radam, lr=0.05)
    with pytest.raises(gf.ManifoldError, match=r"shape \(1, 6\) where its init gives shape \(4, 6\)"):
        opt.load_state_dict(saved.state_dict())
    assert opt.state_dict()["state"] == {}


def test_a_loaded_state_dict_is_saved_again_as_it_was(generator):
    """``load_state_dict(sd)`` then ``state_dict()`` gives ``sd`` back (as in torch.optim), the
    cohorts' numbers included, for a state of several cohorts (heads stepped at different steps)."""
    x, y = _data(generator)[0], torch.randn(32, 4, generator=generator, dtype=F64)
    ours = Branches(generator)
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05)
    _train_branches(ours, opt, x, y)
    saved = opt.state_dict()
    assert len({int(e["cohort"]) for e in saved["state"].values()}) > 1
    again = gf.optim.TorchOptimizer(ours.named_parameters(), {}, gf.optim.radam, lr=0.05)
    again.load_state_dict(saved)
    out = again.state_dict()
    assert out["param_groups"] == saved["param_groups"]
    assert out["state"].keys() == saved["state"].keys()
    for i, entries in saved["state"].items():
        assert out["state"][i].keys() == entries.keys(), i
        for k, v in entries.items():
            assert torch.equal(out["state"][i][k], v), (i, k)
