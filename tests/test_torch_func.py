"""torch.func workflows beyond single maps: functionalize, against the same calls without it.

``torch.func.functionalize`` has no rule for a custom ``autograd.Function`` (torch 2.13), so the maps
through the matrix exponential and Sinkhorn raised "NYI: Functionalize rule for custom_function_call"
there (Note [Functions under functionalize] in geofunc/_fastpath.py). Every comparison is float64
against the same computation without functionalize.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functionalize, grad, jacrev, vmap
from torch.fx.experimental.proxy_tensor import make_fx

import geofunc as gf
from reference import member

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: the same ops, or the exponential's static schedule

# one space per path that took a custom Function: the exponential (dense, frame, rank, eigen,
# Hurwitz, complex) and Sinkhorn
FUNCTIONALIZE = [
    (gf.SO(), (4, 4), F64), (gf.Stiefel(), (5, 3), F64), (gf.PSD(), (4, 4), F64), (gf.LowRank(2), (5, 4), F64),
    (gf.GLp(), (3, 3), F64), (gf.SL(), (3, 3), F64), (gf.Hurwitz(alpha=0.1), (3, 3), F64), (gf.Birkhoff(), (4, 4), F64),
    (gf.Unitary(), (3, 3), torch.complex128),
]


@pytest.mark.parametrize("space,shape,dtype", FUNCTIONALIZE, ids=[type(s).__name__ for s, _, _ in FUNCTIONALIZE])
def test_maps_and_their_gradients_under_functionalize(space, shape, dtype, generator):
    X = space.sample((2, *shape), generator=generator, dtype=dtype)
    Z, base = space.from_manifold(X)
    Z = Z + 0.1 * torch.randn(Z.shape, generator=generator, dtype=dtype)
    A = torch.randn(Z.shape, generator=generator, dtype=dtype)
    V = space.tangent(X, 0.1 * A)

    def loss(z):
        return (space.to_manifold(z, base) * A.conj()).real.sum() ** 2

    point = functionalize(space.to_manifold)(Z, base)
    torch.testing.assert_close(point, space.to_manifold(Z, base), **TOL)
    assert member(space, point)
    torch.testing.assert_close(functionalize(space.retract)(X, V), space.retract(X, V), **TOL)
    torch.testing.assert_close(functionalize(space.project)(X + 0.1 * A), space.project(X + 0.1 * A), **TOL)
    ref = grad(loss)(Z)
    torch.testing.assert_close(grad(functionalize(loss))(Z), ref, **TOL)
    torch.testing.assert_close(functionalize(grad(loss))(Z), ref, **TOL)
    if not dtype.is_complex:  # jacrev takes real inputs only
        torch.testing.assert_close(vmap(jacrev(functionalize(loss)))(Z[:, None]), vmap(jacrev(loss))(Z[:, None]), **TOL)


def test_a_traced_functionalized_gradient(generator):
    """make_fx(functionalize(...)), the use functionalize is for (one space: tracing costs seconds)."""
    space = gf.SO()
    Z = 0.3 * torch.randn(4, 4, generator=generator, dtype=F64)
    A = torch.randn(4, 4, generator=generator, dtype=F64)

    def loss(z):
        return (space.to_manifold(z) * A).sum() ** 2

    traced = make_fx(functionalize(grad(loss), remove="mutations_and_views"))(Z)
    torch.testing.assert_close(traced(Z), grad(loss)(Z), **TOL)


def test_an_optimizer_step_under_functionalize(generator):
    c = {"w": gf.SO(), "p": gf.Birkhoff()}
    params = {"w": gf.SO().sample((2, 4, 4), generator=generator, dtype=F64),
              "p": gf.Birkhoff().sample((3, 3), generator=generator, dtype=F64)}
    grads = {k: torch.randn(v.shape, generator=generator, dtype=F64) for k, v in params.items()}
    opt = gf.optim.radam(c, 0.05)
    state = opt.init(params)
    got, _ = functionalize(opt.update)(grads, state, params)
    ref, _ = opt.update(grads, state, params)
    for k in params:
        torch.testing.assert_close(got[k], ref[k], **TOL)
