"""``gf.optim.TorchOptimizer``: the functional optimizers behind ``torch.optim.Optimizer`` for
``nn.Module`` code whose parameters hold points (Note [A functional optimizer behind torch.optim]):
geoopt's ``ManifoldParameter`` + ``RiemannianAdam`` step for step, ``torch.optim.Adam`` with a
scheduler on free parameters, unused parameters, checkpoints, errors."""

from __future__ import annotations

import io

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


def test_a_parameter_without_a_gradient_gets_a_zero_one(generator):
    """A parameter the loss does not use (``.grad`` None) is stepped with a zero gradient (one shared
    state: its moments decay, momentum moves it), as the functional optimizer with a zero gradient does."""
    net = Net(generator)
    x = torch.randn(5, 6, generator=generator, dtype=F64)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.rsgd, lr=0.1, momentum=0.9)
    fopt = gf.optim.rsgd(C | {"b": None}, lr=0.1, momentum=0.9)
    state = fopt.init(params)
    for _ in range(3):
        opt.zero_grad()
        (x @ net.W).pow(2).sum().backward()  # s and b unused: their .grad stays None
        grads = {"W": net.W.grad.clone(), "s": torch.zeros_like(params["s"]), "b": torch.zeros_like(params["b"])}
        opt.step()
        params, state = fopt.update(grads, state, params)
    for k, v in net.named_parameters():
        torch.testing.assert_close(v.detach(), params[k], atol=1e-14, rtol=0)


def test_a_checkpoint_resumes_bit_for_bit(generator):
    """``torch.save`` of the module's and the optimizer's ``state_dict`` mid-run, ``torch.load`` with
    ``weights_only=True`` into fresh objects, the same steps: the same points as the run never stopped."""
    x, y = _data(generator)
    a = Net(generator)
    b = Net(generator)
    b.load_state_dict(a.state_dict())
    opt_a = gf.optim.TorchOptimizer(a.named_parameters(), C, gf.optim.radam, lr=0.02)
    _train(a, opt_a, x, y, 5)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(a, opt_a, x, y, 5)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b = gf.optim.TorchOptimizer(b.named_parameters(), C, gf.optim.radam, lr=0.02)
    opt_b.load_state_dict(saved["opt"])
    _train(b, opt_b, x, y, 5)
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
    with pytest.raises(gf.ManifoldError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    emb = nn.Embedding(5, 3, sparse=True)
    opt = gf.optim.TorchOptimizer(emb.named_parameters(), {}, gf.optim.rsgd, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(gf.ManifoldError, match="dense gradient for 'weight'"):
        opt.step()
    other = gf.optim.TorchOptimizer(nn.Linear(2, 2).named_parameters(), {}, gf.optim.rsgd, lr=0.1)
    with pytest.raises(gf.ManifoldError, match="expected a state for the parameters"):
        other.load_state_dict(gf.optim.TorchOptimizer(net.named_parameters(), C, gf.optim.rsgd, lr=0.1).state_dict())


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
    assert int(opt_b.state_dict()["functional_state"][2].count) == 4
