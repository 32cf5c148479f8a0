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


def _tree(f, *xs):
    return tuple(_tree(f, *ys) for ys in zip(*xs)) if isinstance(xs[0], tuple) else f(*xs)


# (space, point shape(s), dtype): the spaces the README's mark_dynamic claim names besides the first twelve.
_MARKED = [(gf.Product(gf.SO(), gf.Sphere()), ((3, 3), (4,)), torch.float64), (gf.Birkhoff(), (4, 4), torch.float64),
           (gf.Hurwitz(), (4, 4), torch.float64), (gf.SL(), (4, 4), torch.float64),
           (gf.FixedRank(rank=3), (3, 3), torch.float64), (gf.PSSDFixedRank(rank=2), (5, 5), torch.float64),
           (gf.Unitary(), (3, 3), torch.complex128), (gf.Stiefel(), (5, 3), torch.complex128)]


@pytest.mark.parametrize(("space", "shape", "dtype"), _MARKED, ids=[f"{M!r}-{d}" for M, _, d in _MARKED])
def test_a_marked_dynamic_batch_compiles_once(space, shape, dtype):
    """README (Known limitations): with the batch dimension marked dynamic, to_manifold and retract
    compile one graph for batch sizes 2, 3, 5, 8 and the point size, with eager mode's values."""
    g = torch.Generator().manual_seed(0)
    n = (shape[0] if isinstance(space, gf.Product) else shape)[-1]

    def points(b):
        return space.sample(tuple((b,) + s for s in shape) if isinstance(space, gf.Product) else (b,) + shape,
                            generator=g, dtype=dtype)

    def mark(*trees):
        for t in _tensors(trees):
            torch._dynamo.mark_dynamic(t, 0)

    def to_args(b):
        Z, base = space.from_manifold(points(b))
        return _tree(lambda z: z + 0.3 * torch.randn(z.shape, generator=g, dtype=z.dtype), Z), base

    def retract_args(b):
        X = points(b)
        return X, _tree(lambda v: 0.2 * v, space.tangent(X, _tree(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype), X)))

    tol = 1e-10
    for fn, make in ((space.to_manifold, to_args), (space.retract, retract_args)):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        for b in (2, 3, 5, 8, n):
            args = make(b)
            mark(*args)
            for got, want in zip(_tensors(compiled(*args)), _tensors(fn(*args))):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert counter.frame_count == 1, (fn.__name__, counter.frame_count)
    torch._dynamo.reset()
