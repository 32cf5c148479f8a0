"""``average_``'s weights are those of an average: non-negative, summing to 1 (Note [Averaging
constrained modules])."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import geofunc as gf
import geofunc.nn as gnn


def _model(var):
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    gnn.orthogonal(m[0])
    m[1].running_var.fill_(var)
    return m


@pytest.mark.parametrize("weights", [[2.0, -1.0], [-1.0, 2.0], np.array([1.5, -0.5]), torch.tensor([-1e-3, 1.001]),
                                     [0.5, 0.75, -0.25]], ids=repr)
def test_negative_weights_are_refused(weights):
    torch.manual_seed(0)
    a, b, c = _model(1.0), _model(3.0), _model(2.0)
    modules = [a, b, c][: len(weights)]
    t = copy.deepcopy(a)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    with pytest.raises(gf.ManifoldError, match=r"^average_: expected non-negative weights .*got weight \d = -"):
        gnn.average_(t, modules, weights)
    for k, v in t.state_dict().items():  # left as it was
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_convex_weights_still_average():
    torch.manual_seed(0)
    a, b = _model(1.0), _model(3.0)
    for weights, var in (([0.25, 0.75], 2.5), ([1.0, 0.0], 1.0), ([-0.0, 1.0], 3.0), (None, 2.0)):
        t = gnn.average_(copy.deepcopy(a), [a, b], weights)
        torch.testing.assert_close(t[1].running_var, torch.full((3,), var), atol=1e-6, rtol=1e-6)
        assert bool((t[1].running_var >= 0).all())
