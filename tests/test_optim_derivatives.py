"""Derivatives *through* the Riemannian optimizers: ``torch.func.grad`` of a loss after a few
``update`` steps with respect to the learning rate (a learned or meta-learned step size) and to the
starting point (MAML with a Riemannian inner loop), against central differences in float64, on
every family's geometry; per-task meta-gradients under ``vmap`` equal a loop over tasks; a zero
gradient (a frozen or unused entry) gives finite meta-gradients (Adam's ``√v`` at ``v = 0``).
Nothing in ``update`` may cut the graph (a ``detach``, a Python float, an in-place write on a
saved tensor): it would return a zero or wrong meta-gradient without an error."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch.func import grad, vmap

import geofunc as gf

F64 = torch.float64

SPACES = {
    "Stiefel": (gf.Stiefel(), (6, 3)),
    "Stiefel-canonical-cayley": (gf.Stiefel(triv="cayley", metric="canonical"), (6, 3)),
    "SO": (gf.SO(), (4, 4)),
    "Grassmannian": (gf.Grassmannian(), (6, 2)),
    "Sphere": (gf.Sphere(), (5,)),
    "Oblique": (gf.Oblique(), (4, 3)),
    "PSD": (gf.PSD(), (3, 3)),
    "PSD-affine": (gf.PSD(metric="affine"), (3, 3)),
    "LowRank": (gf.LowRank(rank=2), (5, 4)),
    "SL": (gf.SL(), (3, 3)),
    "PoincareBall": (gf.PoincareBall(), (3,)),
    "Lorentz": (gf.Lorentz(), (4,)),
    "Hurwitz": (gf.Hurwitz(), (3, 3)),
    "Birkhoff": (gf.Birkhoff(), (3, 3)),
}
OPTIMIZERS = {
    "rsgd-momentum": lambda c, lr: gf.optim.rsgd(c, lr=lr, momentum=0.9),
    "radam": lambda c, lr: gf.optim.radam(c, lr=lr),
}


def _unrolled(M, make, target, steps=3):
    """The loss after ``steps`` updates from ``X0`` with step size ``lr``, as a function of both."""
    def inner_loss(X):
        return ((X - target) ** 2).sum() + 0.1 * (X ** 3).sum()

    def outer(lr, X0):
        opt = make({"w": M}, lr)
        params = {"w": X0}
        state = opt.init(params)
        for _ in range(steps):
            g = grad(lambda p: inner_loss(p["w"]))(params)
            params, state = opt.update(g, state, params)
        return inner_loss(params["w"])

    return outer


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(SPACES))
def test_meta_gradients_through_updates_match_finite_differences(name, opt, generator):
    """``d/d lr`` and the derivative along a tangent ``D`` at ``X0`` (the curve ``retract(X0, tD)``)
    of the loss after three steps equal central differences (h = 1e-6) to 1e-6 relative."""
    M, shape = SPACES[name]
    X0 = M.sample(shape, generator=generator, dtype=F64)
    target = torch.randn(shape, generator=generator, dtype=F64)
    outer = _unrolled(M, OPTIMIZERS[opt], target)
    lr, h = torch.tensor(0.05, dtype=F64), 1e-6
    g_lr, g_X = grad(outer, argnums=(0, 1))(lr, X0)
    fd_lr = (outer(lr + h, X0) - outer(lr - h, X0)) / (2 * h)
    D = M.tangent(X0, torch.randn(shape, generator=generator, dtype=F64))
    fd_X = (outer(lr, M.retract(X0, h * D)) - outer(lr, M.retract(X0, -h * D))) / (2 * h)
    for got, want in ((g_lr, fd_lr), ((g_X * D).sum(), fd_X)):
        assert torch.isfinite(got) and float(want.abs()) > 1e-3
        torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs()), rtol=1e-6)


@pytest.mark.parametrize("name", ["Stiefel", "Sphere", "PSD-affine"])
def test_per_task_meta_gradients_under_vmap_equal_a_loop(name, generator):
    """MAML with a Riemannian inner loop: ``vmap`` over 4 tasks (targets) of the meta-gradient with
    respect to the shared starting point equals the loop over tasks, to 1e-12."""
    M, shape = SPACES[name]
    X0 = M.sample(shape, generator=generator, dtype=F64)
    targets = torch.randn((4, *shape), generator=generator, dtype=F64)
    lr = torch.tensor(0.05, dtype=F64)

    def task_grad(target):
        return grad(_unrolled(M, OPTIMIZERS["radam"], target), argnums=1)(lr, X0)

    batched = vmap(task_grad)(targets)
    looped = torch.stack([task_grad(t) for t in targets])
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=1e-12)


def _clipped_radam(c, lr):
    return gf.optim.retract_and_transport(c, gf.optim.chain(
        gf.optim.to_tangent(c), gf.optim.clip_by_global_norm(c, 1.0), gf.optim.scale_by_adam(c), gf.optim.scale(-lr)))


@pytest.mark.parametrize("opt", [*OPTIMIZERS, "radam-clip"])
def test_meta_gradients_stay_finite_at_zero_gradients(opt):
    """An entry whose gradient is exactly zero (a frozen bias, a sphere at a critical point of its
    loss) leaves the meta-gradient finite (Adam's ``√v`` and the global norm's ``√Σ‖g‖²`` have an
    infinite derivative at 0; Note [Square roots of statistics]), and the zero-gradient entries
    contribute exactly their direct term; a NaN gradient still gives a NaN step."""
    c = {"w": gf.Sphere(), "b": None}
    X0 = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), "b": torch.zeros(3, dtype=F64)}

    def inner_loss(p):
        return p["w"][0] + 0.0 * p["b"].sum()  # w = e₁ minimizes nothing here: its gradient is tangent-zero

    def outer(lr):
        o = _clipped_radam(c, lr) if opt == "radam-clip" else OPTIMIZERS[opt](c, lr)
        p, s = dict(X0), o.init(X0)
        for _ in range(2):
            p, s = o.update(grad(inner_loss)(p), s, p)
        return inner_loss(p) + p["b"].sum()

    g = grad(outer)(torch.tensor(0.1, dtype=F64))
    assert torch.isfinite(g) and float(g) == 0.0
    o = _clipped_radam(c, 0.1) if opt == "radam-clip" else OPTIMIZERS[opt](c, 0.1)
    bad = {"w": torch.full((4,), float("nan"), dtype=F64), "b": torch.zeros(3, dtype=F64)}
    p, _ = o.update(bad, o.init(X0), X0)
    assert torch.isnan(p["w"]).all()


def test_the_guides_example_runs():
    """The optimizers guide's "Differentiating through steps" block runs as printed and gives finite
    meta-gradients of the right shapes."""
    text = (pathlib.Path(__file__).parent.parent / "docs" / "guide" / "optim.md").read_text()
    section = text[text.index("**Differentiating through steps.**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "optim.md", "exec"), ns)
    assert ns["d_lr"].shape == () and torch.isfinite(ns["d_lr"])
    assert ns["d_X0"].shape == (6, 3) and bool(torch.isfinite(ns["d_X0"]).all())
