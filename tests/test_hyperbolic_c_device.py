"""A tensor curvature ``c`` on another device than the points (Note in ``_check_c``)."""

from __future__ import annotations

import pytest
import torch

import geofunc as gf
from geofunc import hyperbolic as hyp


def _calls(dev):
    x = torch.tensor([[0.3, 0.1], [0.0, 0.2]], device=dev)
    y = torch.tensor([[-0.2, 0.5], [0.1, 0.1]], device=dev)
    return {
        "conformal_factor": lambda c: hyp.conformal_factor(x, c=c),
        "mobius_add": lambda c: hyp.mobius_add(x, y, c=c),
        "mobius_scalar_mul": lambda c: hyp.mobius_scalar_mul(2.0, x, c=c),
        "mobius_matvec": lambda c: hyp.mobius_matvec(torch.eye(2, device=dev), x, c=c),
        "gyration": lambda c: hyp.gyration(x, y, x, c=c),
        "dist": lambda c: hyp.dist(x, y, c=c),
        "expmap": lambda c: hyp.expmap(x, y, c=c),
        "expmap0": lambda c: hyp.expmap0(y, c=c),
        "logmap": lambda c: hyp.logmap(x, y, c=c),
        "logmap0": lambda c: hyp.logmap0(y, c=c),
        "parallel_transport": lambda c: hyp.parallel_transport(x, y, x, c=c),
        "project": lambda c: hyp.project(x, c=c),
        "dist2plane": lambda c: hyp.dist2plane(x, y, x, c=c),
        "weighted_midpoint": lambda c: hyp.weighted_midpoint(x, c=c),
        "poincare_to_lorentz": lambda c: hyp.poincare_to_lorentz(x, c=c),
        "lorentz_to_poincare": lambda c: hyp.lorentz_to_poincare(torch.tensor([[1.5, 0.3, 1.0]], device=dev), c=c),
    }


FNS = list(_calls("cpu"))
OTHER = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("cdev", OTHER)
def test_c_on_another_device_is_refused(fn, cdev):
    with pytest.raises(gf.ManifoldError, match=rf"hyperbolic\.{fn}: expected a curvature `c` on the device of `\w` \(cpu\).*got .* on {cdev}"):
        _calls("cpu")[fn](torch.tensor(1.0, device=cdev))


@pytest.mark.parametrize("fn", FNS)
def test_c_on_the_points_device_or_cpu(fn):
    c = torch.tensor(0.7, dtype=torch.float32)
    ref = _calls("cpu")[fn](0.7)
    torch.testing.assert_close(_calls("cpu")[fn](c), ref, rtol=1e-6, atol=1e-6)
    dev = "cuda" if torch.cuda.is_available() else "meta"  # torch takes a CPU 0-d tensor as a scalar
    out = _calls(dev)[fn](c)
    assert out.device.type == dev and out.shape == ref.shape
    assert _calls(dev)[fn](c.to(dev)).device.type == dev
