"""Thresholds and guards that a small change would break unnoticed elsewhere in the suite (found by mutation
testing): Product batch pairing read by trailing dims, nested
Product bases under vmap, nesterov/β refusals, complex hyperparameters, PSD affine dist's gradient at μ = −1."""

from __future__ import annotations

import optree
import pytest
import torch
from torch.func import vmap

import geofunc as gf

F64, F32 = torch.float64, torch.float32


def _close(a, b, tol=1e-12) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def test_a_product_of_three_factor_batches_that_pair_up_only_by_trailing_dims_is_taken() -> None:
    """Note [Batches of different ranks]: the leading reading is the broadcast of all factors' batches, not
    of each with the first: (1, 1, 1), (2, 3) and (2, 2, 3) do not broadcast by leading dims ((2, 3, 1) with
    (2, 2, 3)), though each does with the first, so only torch's trailing reading is meant: batch (2, 2, 3)."""
    S = gf.Sphere()
    g = torch.Generator().manual_seed(0)
    X = tuple(S.sample(b + (2,), generator=g, dtype=torch.float64) for b in ((1, 1, 1), (2, 3), (2, 2, 3)))
    flags = gf.Product(S, S, S).contains(X)
    assert flags.shape == (2, 2, 3) and bool(flags.all())


def test_bases_of_a_nested_product_with_a_base_vmap(generator):
    """Note [Bases of products without None]: a nested Product that has a base (SO) next to a factor without
    one (Rn) holds () for that factor too, so vmap over (raw, bases) works, and the () is read back as None
    by the nested factor; a base tuple with more entries than factors is refused, not cut short."""
    K = 3
    c = {"n": gf.Product(gf.Rn(), gf.Product(gf.SO(), gf.Rn()))}
    tree = {"n": (torch.zeros(K, 2, dtype=F64), (torch.zeros(K, 3, 3, dtype=F64), torch.zeros(K, 1, dtype=F64)))}
    points = gf.sample(c, tree, generator=generator)
    raw, bases = gf.from_manifold(c, points)
    assert all(isinstance(x, torch.Tensor) for x in optree.tree_leaves(bases, none_is_leaf=True))
    _close(gf.to_manifold(c, raw, bases), points)
    _close(vmap(lambda r, b: gf.to_manifold(c, r, b))(raw, bases), points)
    raw_v, bases_v = vmap(lambda p: gf.from_manifold(c, p))(points)
    _close(bases_v, bases)
    P = {"p": gf.Product(gf.SO(), gf.Rn())}
    pts = gf.sample(P, {"p": (torch.zeros(3, 3, dtype=F64), torch.zeros(2, dtype=F64))}, generator=generator)
    r, b = gf.from_manifold(P, pts)
    with pytest.raises(gf.ManifoldError, match=r"tuple of 2 entries.*got a tuple of 3 entries"):
        gf.to_manifold(P, r, {"p": b["p"] + (torch.eye(3, dtype=F64),)})
    # a space whose own base is a tuple (GLp: (Q, R)) keeps it as it is, alone and as a factor
    G = {"w": gf.GLp(), "p": gf.Product(gf.GLp(), gf.Rn())}
    pts = gf.sample(G, {"w": torch.zeros(3, 3, dtype=F64), "p": (torch.zeros(3, 3, dtype=F64), torch.zeros(2, dtype=F64))},
                    generator=generator)
    r, b = gf.from_manifold(G, pts)
    _close(gf.to_manifold(G, r, b), pts)
    _close(gf.to_manifold(G, *gf.rebase(G, r, b)), pts)


def test_negative_dampening_with_nesterov_and_negative_tensor_betas_are_refused():
    """torch.optim.SGD refuses nesterov with any dampening != 0 (a negative one too), and torch.optim.Adam a
    negative β given as a tensor; so do trace (Note [Nesterov needs momentum]) and radam (Note [Range checks
    read what is known])."""
    b = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        torch.optim.SGD(b, lr=0.1, momentum=0.9, dampening=-0.5, nesterov=True)
    for dampening in (-0.5, torch.tensor(-0.5)):
        with pytest.raises(gf.ManifoldError, match=r"^trace: expected `nesterov=True` with `decay` > 0 and `dampening` = 0"):
            gf.optim.trace(0.9, dampening, nesterov=True)
    for i, betas in enumerate(((torch.tensor(-0.1), 0.999), (0.9, torch.tensor(-0.1, requires_grad=True)))):
        with pytest.raises(ValueError, match="Invalid beta"):
            torch.optim.Adam(b, betas=betas)
        with pytest.raises(gf.ManifoldError, match=rf"^radam: expected `betas` with 0 <= β{'₁₂'[i]} < 1 .*tensor holding -0.1"):
            gf.optim.radam({"w": gf.Sphere()}, lr=0.1, betas=betas)


def test_complex_numbers_are_refused_as_unchecked_factors():
    """Note [Numbers of any type]: a complex number is no real number; as a dampening, a scale or a weight
    decay (values not otherwise range-checked) it is refused at construction, not taken into the update."""
    for build in (lambda: gf.optim.trace(0.9, 1j), lambda: gf.optim.scale(1j), lambda: gf.optim.add_decayed_weights(0.1j)):
        with pytest.raises(gf.ManifoldError, match=r"expected `\w+` a real number or a real 0-dim tensor, got"):
            build()


def test_psd_affine_dist_gradient_to_a_much_smaller_point_is_finite():
    """PSD.dist (affine) to a point much smaller than X: 1 + μ rounds to 0 (μ = −1 exactly), and the
    unused log1p branch's argument is replaced, so its 0·inf does not make the gradient NaN. X = I,
    Y = diag(y): d = ‖log y‖, ∂d/∂y_i = log y_i / (d·y_i)."""
    M = gf.PSD(metric="affine")
    y = torch.tensor([1e-20, 0.5, 2.0], dtype=F64)
    Y = torch.diag(y).requires_grad_()
    d = M.dist(torch.eye(3, dtype=F64), Y)
    (g,) = torch.autograd.grad(d, Y)
    expected = torch.log(y).norm()
    torch.testing.assert_close(d.detach(), expected, atol=0, rtol=1e-12)
    torch.testing.assert_close(g.diagonal(), torch.log(y) / (expected * y), atol=0, rtol=1e-8)
