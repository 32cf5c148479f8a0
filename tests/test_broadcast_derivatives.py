"""Gradients where a map's two inputs have batches that broadcast (an unbatched point with a batch
of vectors, a batch of points with one vector, a batch of one), for every conformance case:
plain autograd and ``torch.func.grad`` equal ``torch.func.vjp`` of the same map.

The maps are one autograd node in plain autograd and under one ``torch.func.grad`` level (Note
[Lazy second-order terms] in geofunc/_fastpath.py, Note [One node under torch.func.grad] in
geofunc/_fused.py); a node's backward writes the adjoint out and must reduce a broadcast input's
gradient itself (the rank family's tangent node raised on an unbatched point with batched vectors
before it did). ``torch.func.vjp`` takes the maps' torch ops. A space may refuse a pattern (a
``ManifoldError`` on the forward: e.g. ``Rn``, whose point is the whole tensor); at least one
pattern is checked for every case but ``Rn`` (every entry its own point: the shapes must match).
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES

from geofunc import ManifoldError

F64 = torch.float64
MAPS = ("tangent", "retract", "egrad_to_rgrad")


def _patterns(X: torch.Tensor, G: torch.Tensor):
    yield "X unbatched", X[0], G
    yield "V unbatched", X, G[0]
    yield "X batch of one", X[:1], G


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gradients_with_broadcast_batches_equal_the_vjp(case, generator):
    M = case.space
    X = M.sample((2,) + tuple(case.smoke), generator=generator, dtype=F64)
    checked = 0
    for name in MAPS:
        fn = getattr(M, name)
        for tag, a, b in _patterns(X, torch.randn(X.shape, generator=generator, dtype=F64)):
            if name == "retract":  # a small tangent step at (the broadcast) a
                try:
                    b = 0.1 * M.tangent(a.expand(torch.broadcast_shapes(a.shape, b.shape)), b)
                except ManifoldError:
                    continue
            try:
                out = fn(a, b)
            except ManifoldError:  # the space refuses this broadcast: an error, not a wrong answer
                continue
            C = torch.randn(out.shape, generator=generator, dtype=F64)
            ref = torch.func.vjp(fn, a, b)[1](C)
            aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
            plain = torch.autograd.grad((fn(aa, bb) * C).sum(), (aa, bb), allow_unused=True)
            func = torch.func.grad(lambda p, q: (fn(p, q) * C).sum(), argnums=(0, 1))(a, b)
            for mode, got in (("autograd", plain), ("torch.func.grad", func)):
                for what, g, r in zip(("point", "vector"), got, ref):
                    g = torch.zeros_like(r) if g is None else g
                    assert g.shape == r.shape, (name, tag, mode, what, g.shape, r.shape)
                    torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9,
                                               msg=lambda m: f"{case.id} {name} ({tag}), {mode}, gradient in the {what}: {m}")
            checked += 1
    # every pattern refused only where every entry is its own point (Rn: point_ndim 0, shapes must match)
    assert checked or M.point_ndim == 0, f"{case.id}: no broadcast pattern checked"
