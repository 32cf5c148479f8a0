"""``geofunc.nn.update_base`` on a tensor registered with ``gnn.constrain`` (the generic
``Parametrization``, not a GeoTorch class): the chart is re-centred at the current point, which stays
where it was. A ``Parametrization.rebase`` that kept the old base (with the raw tensor re-expressed for
the new one) moved the weight by 0.4–0.8 on every space, and no test registered with ``constrain``,
moved the raw tensor, and then re-centred. Membership by ``tests/reference.py``."""

from __future__ import annotations

import pytest
import torch
from reference import member
from torch import nn

import geofunc as gf
import geofunc.nn as gnn

SPACES = [gf.Stiefel(), gf.SO(), gf.Sphere(), gf.Oblique(), gf.Grassmannian(), gf.PSD(), gf.LowRank(rank=2), gf.GLp()]
ZEROED = (gf.Stiefel, gf.SO, gf.Sphere, gf.Oblique)  # their rebase returns a zero raw tensor (the base is the point)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("space", SPACES, ids=repr)
def test_update_base_of_a_constrained_tensor_keeps_the_point_and_recentres(space, dtype):
    torch.manual_seed(0)
    square = isinstance(space, (gf.SO, gf.PSD, gf.GLp))
    m = gnn.constrain(nn.Linear(4, 4 if square else 6, dtype=dtype), "weight", space)
    plist = m.parametrizations.weight
    with torch.no_grad():
        plist.original.add_(0.3 * torch.randn(plist.original.shape, dtype=dtype))
    W = m.weight.detach().clone()
    gnn.update_base(m, "weight")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(m.weight.detach(), W, atol=tol, rtol=0)
    assert member(space, m.weight.detach())
    if isinstance(space, ZEROED):
        assert torch.equal(plist.original, torch.zeros_like(plist.original))
    # the next raw step starts from the kept point: a small raw move moves the weight by O(step)
    with torch.no_grad():
        plist.original.add_(1e-3 * torch.randn(plist.original.shape, dtype=dtype))
    assert (m.weight.detach() - W).abs().max() < 1e-2



@pytest.mark.parametrize("constraint, route", [("orthogonal", "update_base"), ("orthogonal", "class"),
                                               ("sphere", "update_base"), ("positive_definite", "update_base"),
                                               ("low_rank", "class")])
def test_update_base_inside_a_fullgraph_compiled_function(constraint, route):
    """gf.nn.update_base (and a GeoTorch class's update_base) inside torch.compile(fullgraph=True)
    re-centres as in eager mode, with one graph over three calls. It raised torch's Unsupported (Dynamo
    cannot trace the functorch predicate that asks whether the new base's values may be read), and,
    that fixed, compiled a second graph at the second call (a guard on the registry of checked bases)
    (Note [update_base in compiled code])."""
    from torch._dynamo.testing import CompileCounter

    dtype = torch.float64
    n = 4 if constraint == "positive_definite" else 6
    args = (2,) if constraint == "low_rank" else ()
    torch.manual_seed(0)
    m = getattr(gnn, constraint)(nn.Linear(4, n, dtype=dtype), "weight", *args)
    ref = getattr(gnn, constraint)(nn.Linear(4, n, dtype=dtype), "weight", *args)
    ref.load_state_dict(m.state_dict())
    space = m.parametrizations.weight[0].space

    def recentre(mod):
        if route == "update_base":
            gnn.update_base(mod, "weight")
        else:
            mod.parametrizations.weight[0].update_base(mod.parametrizations.weight.original)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(recentre, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        step = 0.3 * torch.randn(m.parametrizations.weight.original.shape, generator=g, dtype=dtype)
        with torch.no_grad():
            m.parametrizations.weight.original.add_(step)
            ref.parametrizations.weight.original.add_(step)
        W = m.weight.detach().clone()
        compiled(m)
        recentre(ref)
        torch.testing.assert_close(m.weight.detach(), W, atol=1e-12, rtol=0)  # the point stays
        torch.testing.assert_close(m.state_dict(), ref.state_dict(), atol=1e-12, rtol=0)  # as eager re-centres
        assert member(space, m.weight.detach())
    assert counter.frame_count == 1
    torch._dynamo.reset()


class _ScaledColumns(gnn.ProductManifold):
    """A space built GeoTorch's way, from a ProductManifold of geofunc.nn classes: ``X = Q·diag(r)``,
    ``Q`` in SO(n), ``r`` on the sphere of radius 2 (the column norms)."""

    def __init__(self, n):
        super().__init__([gnn.SO((n, n)), gnn.Sphere((n,), radius=2.0)])

    def forward(self, X1, X2):
        Q, r = super().forward((X1, X2))
        return Q * r

    def right_inverse(self, X, check_in_manifold=True):
        r = X.norm(dim=-2)
        return super().right_inverse((X / r, r), check_in_manifold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_update_base_of_a_product_manifold_subclass_keeps_the_point_and_recentres(dtype):
    """GeoTorch's update_base assigns the current value, so it re-centres a user's ProductManifold
    subclass; geofunc's refused it ("parametrized by ['_ScaledColumns'] only"): Note [update_base of a
    product]."""
    torch.manual_seed(0)
    n = 3
    Q = torch.linalg.qr(torch.randn(n, n, dtype=dtype))[0]
    Q[:, 0] *= torch.sign(torch.linalg.det(Q))  # in SO(n)
    r = torch.tensor([1.0, 2.0, 2.0], dtype=dtype) * (2.0 / 3.0)  # norm 2
    m = nn.Linear(n, n, bias=False, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(Q * r)
    torch.nn.utils.parametrize.register_parametrization(m, "weight", _ScaledColumns(n).to(dtype))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, n, dtype=dtype)).pow(3).sum().backward()
        opt.step()
    plist = m.parametrizations.weight
    assert plist.original0.abs().max() > 0 and plist.original1.abs().max() > 0  # the raw tensors moved
    W = m.weight.detach().clone()
    assert gnn.update_base(m, "weight") is m
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(m.weight.detach(), W, atol=tol, rtol=0)
    # re-centred at the point: both factors' raw tensors are zero (SO and Sphere charts at their base)
    assert torch.equal(plist.original0, torch.zeros_like(plist.original0))
    assert torch.equal(plist.original1, torch.zeros_like(plist.original1))
    # the constraint still holds, measured independently
    Qn = W / W.norm(dim=-2)
    eye = torch.eye(n, dtype=dtype)
    assert (Qn.mT @ Qn - eye).abs().max() < 10 * tol and abs(float(W.norm(dim=-2).norm()) - 2.0) < 10 * tol


def test_update_base_still_refuses_a_tensor_geofunc_does_not_constrain():
    class Scale(nn.Module):
        def forward(self, X):
            return 2 * X

        def right_inverse(self, X):
            return X / 2

    m = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(m, "weight", Scale())
    with pytest.raises(gf.ManifoldError, match=r"parametrized by \['Scale'\] only"):
        gnn.update_base(m, "weight")
