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
