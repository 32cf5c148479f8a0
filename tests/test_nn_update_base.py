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
