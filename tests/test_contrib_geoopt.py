"""``geofunc.contrib.geoopt``: the constraints of a model built with geoopt's ``ManifoldParameter`` s,
so that geoopt code moves to ``gf.optim.TorchOptimizer`` without writing them by hand: the mapping of
each manifold, a module with five kinds of manifold parameters stepping as geoopt's
``RiemannianAdam``/``RiemannianSGD`` do, and what has no geofunc space."""

from __future__ import annotations

import pytest
import torch
from reference import member
from torch import nn

import geofunc as gf

geoopt = pytest.importorskip("geoopt")
G = pytest.importorskip("geofunc.contrib.geoopt")

pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings(r"ignore:.*is not fully implemented:UserWarning")]

F64 = torch.float64


def test_each_manifold_maps_to_its_space():
    """The table of :func:`space_of`, hyperparameters included (geoopt's own curvature values)."""
    ball = geoopt.PoincareBall(c=0.5)
    cases = [
        (geoopt.EuclideanStiefel(), gf.Stiefel()),
        (geoopt.Stiefel(), gf.Stiefel(triv="cayley", metric="canonical")),
        (geoopt.CanonicalStiefel(), gf.Stiefel(triv="cayley", metric="canonical")),
        (geoopt.Sphere(), gf.Sphere()),
        (geoopt.SphereExact(), gf.Sphere()),
        (ball, gf.PoincareBall(c=float(ball.c))),
        (geoopt.PoincareBallExact(c=2.0), gf.PoincareBall(c=float(geoopt.PoincareBallExact(c=2.0).c))),
        (geoopt.Stereographic(k=-2.0), gf.PoincareBall(c=2.0)),
        (geoopt.Lorentz(k=1.5), gf.Lorentz(k=1.5)),
        (geoopt.SymmetricPositiveDefinite(), gf.PSD(metric="affine")),
        (geoopt.BirkhoffPolytope(), gf.Birkhoff()),
        (geoopt.Euclidean(), None),
    ]
    for manifold, space in cases:
        assert G.space_of(manifold) == space, manifold
    assert abs(float(ball.c) - 0.5) < 1e-7


class Model(nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        P = geoopt.ManifoldParameter

        def sample(space, shape):
            return space.sample(shape, generator=generator, dtype=F64)

        self.W = P(sample(gf.Stiefel(), (6, 3)), manifold=geoopt.EuclideanStiefel())
        self.s = P(sample(gf.Sphere(), (2, 4)), manifold=geoopt.Sphere())
        self.spd = P(sample(gf.PSD(), (3, 3)), manifold=geoopt.SymmetricPositiveDefinite())
        self.h = P(0.3 * sample(gf.Sphere(), (2, 3)), manifold=geoopt.PoincareBallExact(c=1.0))
        self.free = P(torch.randn(3, generator=generator, dtype=F64), manifold=geoopt.Euclidean())
        self.b = nn.Parameter(torch.randn(3, generator=generator, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x @ self.W + self.b + self.free) @ self.spd
        return y.sum(-1, keepdim=True) * self.s.sum(0) + (self.h ** 2).sum()


def _twins(generator) -> tuple[Model, Model]:
    ours, theirs = Model(generator), Model(generator)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            q.copy_(p)
    return ours, theirs


def _train_side_by_side(ours, opt, theirs, ref, generator) -> None:
    """10 steps of each model with its optimizer on the same data; the parameters equal to 1e-10."""
    x = torch.randn(16, 6, generator=generator, dtype=F64)
    y = torch.randn(16, 4, generator=generator, dtype=F64)
    for model, o in ((ours, opt), (theirs, ref)):
        for _ in range(10):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-10, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["radam", "rsgd"])
def test_a_geoopt_model_steps_as_geoopt_with_the_derived_constraints(name, generator):
    """``constraints(model.named_parameters())`` names the four non-Euclidean parameters; the
    ``TorchOptimizer`` built from it on the geoopt parameters themselves takes the same steps as
    geoopt's optimizer on a copy (float64, 10 steps, to rounding), and the points stay on their
    spaces."""
    ours, theirs = _twins(generator)
    c = G.constraints(ours.named_parameters())
    assert c == {"W": gf.Stiefel(), "s": gf.Sphere(), "spd": gf.PSD(metric="affine"), "h": gf.PoincareBall(c=1.0)}
    # (no momentum for rsgd: geoopt's first momentum buffer is the raw gradient, torch's and ours the
    # Riemannian one: README, From geoopt)
    kwargs = {"radam": dict(lr=0.01, weight_decay=0.01), "rsgd": dict(lr=0.02, weight_decay=0.01)}[name]
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), c, getattr(gf.optim, name), **kwargs)
    ref = {"radam": geoopt.optim.RiemannianAdam, "rsgd": geoopt.optim.RiemannianSGD}[name](theirs.parameters(), **kwargs)
    _train_side_by_side(ours, opt, theirs, ref, generator)
    for k, space in c.items():
        assert member(space, getattr(ours, k).detach()), k


def test_a_model_with_a_frozen_manifold_parameter(generator):
    """``constraints(model.named_parameters())`` names a frozen ``ManifoldParameter`` too; the
    ``TorchOptimizer`` built from it with the same ``named_parameters`` ignores it (it refused the
    pair: "constraints for parameters that require grad") and steps the others as geoopt's
    ``RiemannianAdam`` does (float64, 10 steps), the frozen one unmoved."""
    ours, theirs = _twins(generator)
    for m in (ours, theirs):
        m.W.requires_grad_(False)
        m.spd.requires_grad_(False)
    c = G.constraints(ours.named_parameters())
    assert set(c) == {"W", "s", "spd", "h"}
    opt = gf.optim.TorchOptimizer(ours.named_parameters(), c, gf.optim.radam, lr=0.01)
    ref = geoopt.optim.RiemannianAdam(theirs.parameters(), lr=0.01)
    W0 = ours.W.detach().clone()
    _train_side_by_side(ours, opt, theirs, ref, generator)
    assert torch.equal(ours.W.detach(), W0) and member(gf.Sphere(), ours.s.detach())


def test_what_has_no_space_is_named():
    """A manifold without a geofunc space raises a ``ManifoldError`` naming the parameter and the
    manifold; a learnable curvature, the SPD manifold's other metrics and curvature ≥ 0 too."""
    for manifold, match in [(geoopt.Scaled(geoopt.Sphere(), 2.0), "Scaled"),
                            (geoopt.ProductManifold((geoopt.Sphere(), 2), (geoopt.Euclidean(), 1)), "ProductManifold"),
                            (geoopt.Stereographic(k=1.0), "Stereographic"),
                            (geoopt.SphereProjection(k=1.0), "SphereProjection"),
                            (geoopt.PoincareBall(learnable=True), "learnable c"),
                            (geoopt.Lorentz(learnable=True), "learnable k"),
                            (geoopt.SymmetricPositiveDefinite("LEM"), "affine-invariant")]:
        shape = (3, 3) if isinstance(manifold, geoopt.SymmetricPositiveDefinite) else (3,)
        p = geoopt.ManifoldParameter(torch.zeros(shape), manifold=manifold, requires_grad=True)
        with pytest.raises(gf.ManifoldError, match=rf"parameter 'w'.*{match}"):
            G.constraints([("w", p)])
    assert G.constraints([("plain", nn.Parameter(torch.zeros(2)))]) == {}


def test_what_constraints_reads_is_what_torch_optimizer_takes(generator):
    """``constraints`` reads a module, its ``named_parameters()`` and parameter groups (as
    ``TorchOptimizer`` takes them) alike; ``model.parameters()``, a bare tensor or a dict of names is a
    ``ManifoldError``. It unpacked every item into ``name, p``: ``parameters()`` of a model whose first
    parameter has two rows, and a group ``{"params": ..., "lr": ...}``, gave ``{}`` with no error (the
    optimizer then stepped every parameter freely, off its manifold); a module raised a bare TypeError."""
    model = Model(generator)
    expected = {"W": gf.Stiefel(), "s": gf.Sphere(), "spd": gf.PSD(metric="affine"), "h": gf.PoincareBall(c=1.0)}
    named = list(model.named_parameters())
    groups = [{"params": named[:2], "lr": 0.01}, {"params": named[2:], "lr": 0.02}]
    for arg in (model, model.named_parameters(), named, groups):
        assert G.constraints(arg) == expected
    opt = gf.optim.TorchOptimizer(groups, G.constraints(groups), gf.optim.rsgd, lr=0.01)
    x = torch.randn(4, 6, generator=generator, dtype=F64)
    model(x).sum().backward()
    opt.step()
    for k, space in expected.items():
        assert member(space, getattr(model, k).detach(), 1e-10), k

    class TwoRows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = geoopt.ManifoldParameter(gf.Sphere().sample((2, 3), generator=generator), manifold=geoopt.Sphere())

    two = TwoRows()
    assert G.constraints(two) == {"W": gf.Sphere()}
    for bad, match in [(two.parameters(), "shape \\(2, 3\\)"), (two.W, "shape \\(2, 3\\)"),
                       (dict(two.named_parameters()), "dict"), ([{"lr": 0.1}], "dict"), (None, "None")]:
        with pytest.raises(gf.ManifoldError, match=rf"constraints: expected .*named_parameters.*got .*{match}"):
            G.constraints(bad)
