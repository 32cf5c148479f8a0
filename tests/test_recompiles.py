"""Compiled training loops that must not compile again: the layouts (strides) of what a step is
fed, which Dynamo guards. A raw tensor or base from ``from_manifold`` and one from ``rebase`` must
have the layout an elementwise optimizer step keeps, or the step compiles a second graph after the
first ``gf.rebase`` (Note [Raw tensors and bases in row-major layout] in geofunc/spaces/_base.py).
CompileCounter only (no inductor): graphs are counted, not run by a compiler."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from reference import member
from torch._dynamo.testing import CompileCounter
from torch.func import grad

import geofunc as gf

Tensor = torch.Tensor

# The complex spaces themselves (the conformance cases wrap them in real (re, im) views).
_COMPLEX = [(gf.Stiefel(), (6, 3)), (gf.Stiefel(), (3, 6)), (gf.Grassmannian(), (5, 2)), (gf.Unitary(), (3, 3)),
            (gf.PSD(), (4, 4)), (gf.PSSD(), (3, 3)), (gf.Oblique(), (1, 5)), (gf.Sphere(), (5, 1))]


def _layout_params():
    for case in CASES:
        for shape in case.shapes:
            yield pytest.param(case.space, shape, torch.float32, id=f"{case.id}-{shape}")
    for space, shape in _COMPLEX:
        yield pytest.param(space, shape, torch.complex64, id=f"{space!r}-complex-{shape}")


def _tensors(tree) -> list[Tensor]:
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    return [tree] if isinstance(tree, Tensor) else []


def _off_row_major(tree) -> list[tuple]:
    """(shape, strides) of every tensor of ``tree`` whose strides are not those ``torch.empty`` gives its shape."""
    return [(tuple(t.shape), t.stride()) for t in _tensors(tree) if t.stride() != torch.empty(t.shape).stride()]


@pytest.mark.parametrize(("space", "shape", "dtype"), list(_layout_params()))
def test_from_manifold_and_rebase_return_row_major_tensors(space, shape, dtype):
    """The raw tensors and bases of from_manifold (of a sample: QR's column-major frames, the SVD's and
    eigh's column-major factors) and of rebase (a wide frame's the transpose of a tall one's) were of
    other layouts than an elementwise step keeps; size-1 dims count (Dynamo guards their strides)."""
    g = torch.Generator().manual_seed(0)
    X = space.sample(shape, generator=g, dtype=dtype)
    Z, base = space.from_manifold(X)
    assert _off_row_major((Z, base)) == []
    moved = tuple(z + 0.1 * torch.randn(z.shape, generator=g, dtype=z.dtype) for z in _tensors(Z))
    Z2, base2 = space.rebase(moved[0] if isinstance(Z, Tensor) else type(Z)(moved), base)
    assert _off_row_major((Z2, base2)) == []


@pytest.mark.parametrize(("space", "shape"), [(gf.Stiefel(), (3, 6)), (gf.PSD(), (4, 4)), (gf.LowRank(rank=1), (6, 3)),
                                              (gf.Oblique(), (1, 5))], ids=["Stiefel-wide", "PSD", "LowRank-1", "Oblique-row"])
def test_a_compiled_raw_step_compiles_once_across_rebases(space, shape):
    """sample → from_manifold → two compiled SGD steps on the raw tensor → gf.rebase → two steps →
    gf.rebase → two steps: one graph. Before, the step compiled again after the first rebase (the
    base's or the raw tensor's layout changed), and for a (1, 5) Oblique raw tensor of stride (1, 1)
    at its second step (the step's output has stride (5, 1))."""
    g = torch.Generator().manual_seed(0)
    constraints = {"w": space}
    X = space.sample(shape, generator=g)
    G = torch.randn(shape, generator=g)
    raw, bases = gf.from_manifold(constraints, {"w": X})

    def loss(raw, bases):
        return (gf.to_manifold(constraints, raw, bases)["w"] * G).sum()

    def step(raw, bases):
        return {"w": raw["w"] - 1e-2 * grad(loss)(raw, bases)["w"]}

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(3):
        raw = compiled(compiled(raw, bases), bases)
        raw, bases = gf.rebase(constraints, raw, bases)
    assert counter.frame_count == 1
    assert member(space, gf.to_manifold(constraints, raw, bases)["w"], 1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("space", [gf.Rn(), gf.Sphere()], ids=repr)
def test_row_major_outputs_keep_a_tensor_that_is_already_row_major(space):
    """A tensor that is already row-major comes back as it is, size-1 dims included: a (1, 5) leaf
    Parameter through an identity chart (Rn's from_manifold and rebase) stayed a leaf before the
    row-major wrapper, which made every tensor with a size-1 dim a view (torch.optim then refused the
    raw tensor: 'can't optimize a non-leaf Tensor')."""
    p = torch.nn.Parameter(space.sample((1, 5), generator=torch.Generator().manual_seed(0)))
    if isinstance(space, gf.Rn):
        Z, _ = space.from_manifold(p)
        assert Z is p
        Z2, _ = space.rebase(p, None)
        assert Z2 is p
        raw, _ = gf.from_manifold({"w": space}, {"w": p})
        torch.optim.SGD(raw.values(), lr=0.1)  # a leaf
    else:
        _, base = space.from_manifold(p.detach())
        Z = torch.zeros(1, 5)
        Z2, base2 = space.rebase(Z, base)
        assert base2.stride() == (5, 1) and Z2.stride() == (5, 1)
    odd = torch.zeros(5, 1).mT  # (1, 5) of stride (1, 1): still made row-major
    assert gf.Rn().rebase(odd, None)[0].stride() == (5, 1)
