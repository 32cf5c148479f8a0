"""geofunc.nn across dtype changes: a base is re-made valid in its new dtype (Note [Bases across
dtypes] in ``geofunc/nn/_adapter.py``).

Regression: ``m = nn.Linear(8, 8); gf.nn.orthogonal(m); m.double()`` left the weight orthonormal
to float32 accuracy only (4.6e-7 against float64's tolerance 1e-9) for good: the base buffer kept
float32's rounding, ``update_base`` kept it, and assigning the weight back then raised. After a
bf16 -> float32 round trip the error was 2e-3 against 1e-4.

For every GeoTorch constraint function and class and for ``gf.nn.constrain`` with every geofunc
space that carries a base: build in float32, then ``.double()`` (and, separately, a bf16 ->
float32 round trip); the weight is on its space at the new dtype's tolerance (the space's
``contains`` and the independent predicate of ``tests/reference.py``), ``m.weight = m.weight``
succeeds and stays on the space, a ``state_dict`` loads into a fresh module of that dtype equal,
and ``update_base`` keeps the point on the space.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from reference import member
from torch import nn

import geofunc as gf
import geofunc.nn as gnn
from geofunc.nn._adapter import refine_base
from geofunc.spaces._base import default_atol
from helpers import collect_all_garbage

MOVES = {
    "double": lambda m: m.double(),
    "to-float64": lambda m: m.to(torch.float64),
    "bf16-float32": lambda m: m.to(torch.bfloat16).float(),
    "fp16-float32": lambda m: m.half().float(),
}

# name, constraint (module -> module), Linear (in, out)
GEOTORCH = [
    ("orthogonal-square", lambda m: gnn.orthogonal(m, "weight"), (8, 8)),
    ("orthogonal-tall", lambda m: gnn.orthogonal(m, "weight"), (5, 12)),
    ("orthogonal-wide-cayley", lambda m: gnn.orthogonal(m, "weight", triv="cayley"), (9, 4)),
    ("grassmannian", lambda m: gnn.grassmannian(m, "weight"), (3, 9)),
    ("sphere", lambda m: gnn.sphere(m, "weight", radius=2.0), (6, 4)),
    ("sphere-embedded", lambda m: gnn.sphere(m, "weight", embedded=True), (6, 4)),
    ("skew", lambda m: gnn.skew(m, "weight"), (5, 5)),
    ("symmetric", lambda m: gnn.symmetric(m, "weight"), (5, 5)),
    ("almost_orthogonal", lambda m: gnn.almost_orthogonal(m, "weight", lam=0.3), (4, 7)),
    ("low_rank", lambda m: gnn.low_rank(m, "weight", rank=2), (5, 7)),
    ("fixed_rank", lambda m: gnn.fixed_rank(m, "weight", rank=2), (7, 5)),
    ("invertible", lambda m: gnn.invertible(m, "weight"), (6, 6)),
    ("sln", lambda m: gnn.sln(m, "weight"), (5, 5)),
    ("positive_definite", lambda m: gnn.positive_definite(m, "weight"), (6, 6)),
    ("positive_semidefinite", lambda m: gnn.positive_semidefinite(m, "weight"), (5, 5)),
    ("positive_semidefinite_low_rank", lambda m: gnn.positive_semidefinite_low_rank(m, "weight", rank=2), (5, 5)),
    ("positive_semidefinite_fixed_rank", lambda m: gnn.positive_semidefinite_fixed_rank(m, "weight", rank=2), (5, 5)),
    ("alpha_stable", lambda m: gnn.alpha_stable(m, "weight", alpha=0.1), (5, 5)),
    # GeoTorch's classes registered directly (SO: the class of square orthogonal matrices)
    ("SO-class", lambda m: _register(m, gnn.SO((7, 7))), (7, 7)),
    ("SO-class-upper", lambda m: _register(m, gnn.SO((7, 7), lower=False)), (7, 7)),
    ("Hurwitz-class", lambda m: _register(m, gnn.Hurwitz((4, 4), alpha=0.5)), (4, 4)),
]

# gf.nn.constrain with every geofunc space that has a base (a real one; complex: below)
SPACES = [
    ("SO", gf.SO(), (6, 6)),
    ("SO-cayley", gf.SO(triv="cayley"), (2, 5, 5)),
    ("Stiefel", gf.Stiefel(), (10, 4)),
    ("Stiefel-wide", gf.Stiefel(), (3, 8)),
    ("Grassmannian", gf.Grassmannian(), (2, 9, 3)),
    ("Sphere", gf.Sphere(radius=2.5), (3, 7)),
    ("Oblique", gf.Oblique(), (6, 4)),
    ("Lorentz", gf.Lorentz(k=2.0), (3, 5)),
    ("PoincareBall", gf.PoincareBall(c=0.5), (3, 4)),
    ("Birkhoff", gf.Birkhoff(), (5, 5)),
    ("LowRank", gf.LowRank(rank=2), (7, 5)),
    ("FixedRank", gf.FixedRank(rank=2), (4, 6)),
    ("GLp", gf.GLp(), (2, 5, 5)),
    ("SL", gf.SL(), (5, 5)),
    ("AlmostOrthogonal", gf.AlmostOrthogonal(lam=0.5), (6, 4)),
    ("PSD", gf.PSD(), (6, 6)),
    ("PSSD", gf.PSSD(), (5, 5)),
    ("PSSDLowRank", gf.PSSDLowRank(rank=2), (5, 5)),
    ("PSSDFixedRank", gf.PSSDFixedRank(rank=2), (5, 5)),
    ("Hurwitz", gf.Hurwitz(alpha=0.2), (5, 5)),
]


class Holder(nn.Module):
    def __init__(self, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype))


def _register(m: nn.Module, M: nn.Module) -> nn.Module:
    """Register GeoTorch's class ``M`` directly, started at its own ``sample()``."""
    with torch.no_grad():
        m.weight.copy_(M.sample())
    torch.nn.utils.parametrize.register_parametrization(m, "weight", M)
    return m


def _on(space: gf.AbstractSpace, W: torch.Tensor) -> bool:
    """The space's ``contains`` and an independent predicate: tests/reference.py's for real points, a
    direct one for the complex points of test_complex_bases_follow_to_complex128 (which the
    reference does not cover)."""
    if not bool(space.contains(W).all()):
        return False
    if not W.is_complex():
        return member(space, W)
    tol = 1e-9 if W.dtype == torch.complex128 else 1e-4
    if isinstance(space, (gf.Unitary, gf.Stiefel)):
        Wt = W if W.shape[-2] >= W.shape[-1] else W.mH
        return bool(((Wt.mH @ Wt - torch.eye(Wt.shape[-1], dtype=W.dtype)).abs() < tol).all())
    if isinstance(space, gf.PSD):
        return bool(((W - W.mH).abs() < tol).all()) and bool((torch.linalg.eigvalsh(W) > 0).all())
    if isinstance(space, gf.Sphere):
        return bool(((torch.linalg.vector_norm(W, dim=-1) - space.radius).abs() < tol).all())
    if isinstance(space, gf.Oblique):
        return bool(((torch.linalg.vector_norm(W, dim=-2) - 1).abs() < tol).all())
    raise AssertionError(f"no independent predicate for complex {space!r}")


def _check_after(make, move) -> None:
    torch.manual_seed(0)
    m = make()
    space = gnn.parametrization_of(m).space
    move(m)
    W = m.weight.detach().clone()
    dtype = W.dtype
    assert dtype in (torch.float32, torch.float64, torch.complex128)
    assert _on(space, W), {k: float(v.max()) for k, v in space._measure(W).items()}
    # assigning the weight back works and stays on the space
    m.weight = W
    assert _on(space, m.weight.detach())
    # a state_dict loads into a fresh module of the same dtype, equal
    torch.manual_seed(1)
    fresh = make()
    fresh.to(dtype)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.weight, m.weight)
    # update_base keeps the point (to the dtype's accuracy) on the space
    gnn.update_base(m, "weight")
    torch.testing.assert_close(m.weight.detach(), W, atol=10 * default_atol(dtype, max(W.shape[-2:])), rtol=0)
    assert _on(space, m.weight.detach())


@pytest.mark.parametrize("move", list(MOVES), ids=str)
@pytest.mark.parametrize("case", GEOTORCH, ids=lambda c: c[0])
def test_geotorch_constraints_survive_dtype_moves(case, move) -> None:
    _, fn, (i, o) = case
    _check_after(lambda: fn(nn.Linear(i, o)), MOVES[move])


@pytest.mark.parametrize("move", list(MOVES), ids=str)
@pytest.mark.parametrize("case", SPACES, ids=lambda c: c[0])
def test_constrain_every_space_survives_dtype_moves(case, move) -> None:
    _, space, shape = case
    _check_after(lambda: gnn.constrain(Holder(shape), "weight", space), MOVES[move])


@pytest.mark.parametrize("space", [gf.Unitary(), gf.Stiefel(), gf.PSD(), gf.Sphere(), gf.Oblique()], ids=repr)
def test_complex_bases_follow_to_complex128(space) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Complex modules")
        m = gnn.constrain(Holder((5, 5), torch.complex64), "weight", space)
        m.to(torch.complex128)
        W = m.weight.detach()
    assert W.dtype == torch.complex128
    assert _on(space, W)


def test_the_readme_regression() -> None:
    torch.manual_seed(0)
    m = nn.Linear(8, 8)
    gnn.orthogonal(m, "weight")
    base32 = m.parametrizations.weight[0].base.clone()
    m.double()
    W = m.weight.detach()
    assert _on(gf.Stiefel(), W)
    assert (W.mT @ W - torch.eye(8, dtype=torch.float64)).abs().amax() < 1e-13
    # the point moved by float32's rounding only
    assert (m.parametrizations.weight[0].base - base32.double()).abs().amax() < 1e-6
    m.weight = W


def test_signs_of_determinants_are_kept() -> None:
    """SO: det +1; GeoTorch's SO class keeps a det −1 point in its component; GLp: det > 0."""
    torch.manual_seed(0)
    m = _register(nn.Linear(5, 5), gnn.SO((5, 5)))
    Q = gf.SO().sample((5, 5))
    Q = Q * torch.tensor([-1.0, 1, 1, 1, 1])  # det −1: accepted by GeoTorch's SO class
    m.weight = Q
    m.to(torch.bfloat16).double()
    W = m.weight.detach()
    assert torch.linalg.det(W) < 0 and _on(gf.Stiefel(), W)
    for space, shape in ((gf.SO(), (3, 4, 4)), (gf.GLp(), (3, 4, 4))):
        m = gnn.constrain(Holder(shape), "weight", space).to(torch.bfloat16).double()
        W = m.weight.detach()
        assert bool((torch.linalg.det(W) > 0).all()) and _on(space, W)


def test_a_valid_base_is_left_bit_for_bit() -> None:
    torch.manual_seed(0)
    for space, shape in ((gf.Stiefel(), (6, 3)), (gf.PSD(), (4, 4)), (gf.Sphere(), (3, 5)), (gf.GLp(), (4, 4))):
        X = space.sample(shape, dtype=torch.float64)
        _, base = space.from_manifold(X)
        out = refine_base(space, base)
        for a, b in zip(torch.utils._pytree.tree_leaves(base), torch.utils._pytree.tree_leaves(out)):
            assert a is b


def test_update_base_repairs_a_base_loaded_from_a_float32_checkpoint() -> None:
    """``load_state_dict`` of a float32 checkpoint into a float64 module copies float32 rounding
    into the base; ``update_base`` re-makes it valid in float64."""
    torch.manual_seed(0)
    a = gnn.orthogonal(nn.Linear(6, 9))
    b = gnn.orthogonal(nn.Linear(6, 9)).double()
    b.load_state_dict(a.state_dict())
    gnn.update_base(b, "weight")
    assert _on(gf.Stiefel(), b.weight.detach())
    M = gnn.parametrization_of(b)
    M.update_base(b.parametrizations.weight.original)  # the class method alike
    assert _on(gf.Stiefel(), b.weight.detach())


def test_device_moves_and_meta_leave_the_base_alone() -> None:
    torch.manual_seed(0)
    m = gnn.orthogonal(nn.Linear(4, 6))
    base = m.parametrizations.weight[0].base
    before = base.clone()
    m.to("cpu")
    assert torch.equal(m.parametrizations.weight[0].base, before)
    with torch.device("meta"):
        meta = gnn.orthogonal(nn.Linear(4, 6))
    meta.double()  # nothing to read: no refinement, no error
    assert meta.parametrizations.weight[0].base.dtype == torch.float64


@pytest.mark.parametrize("move", ["meta", "to_empty", "float64_valid"])
@pytest.mark.parametrize("layer", ["orthogonal", "low_rank", "SpaceLinear"])
def test_a_device_move_releases_the_old_bases(layer, move) -> None:
    """The checked-bases registry held the base buffers it had checked: after .to("meta") or to_empty (a CUDA ->
    CPU offload takes the same path) the old bases, as large as the weight for a frame, stayed alive until the
    next eager forward, or for good where none came (Note [Replaced bases are not kept]). They are released at
    the move, and the new buffers are checked at the next forward."""
    torch.manual_seed(0)
    if layer == "SpaceLinear":
        pytest.importorskip("zuko")
        from geofunc.contrib.zuko import SpaceLinear

        m = SpaceLinear(gf.SO(), 6)
        x = torch.randn(2, 6)
    else:
        m = nn.Linear(4, 6)
        gnn.orthogonal(m) if layer == "orthogonal" else gnn.low_rank(m, "weight", rank=2)
        x = torch.randn(2, 4)
    owner = m if layer == "SpaceLinear" else m.parametrizations.weight[0]
    m(x)  # an eager forward checks the bases and notes them
    if move == "float64_valid":  # a dtype change whose bases are still valid keeps their values (re-made or not)
        m.double()
        x = x.double()
    old = [weakref.ref(b) for b in owner._base_buffers()]
    if move == "meta":
        m.to("meta")
    elif move == "to_empty":
        m.to_empty(device="cpu")
    else:
        m.float()
    collect_all_garbage()
    assert all(r() is None for r in old)
    if move == "to_empty":
        with pytest.raises(gf.ManifoldError, match="to_empty"):  # the new (uninitialized) buffers are checked
            m(x)
    elif move == "float64_valid":
        m(x.float())


def test_a_space_of_ones_own_warns_on_a_dtype_change() -> None:
    """A base geofunc.nn does not know cannot be re-made: never silently, a warning says so."""
    import dataclasses
    from typing import final

    @final
    @dataclasses.dataclass(frozen=True)
    class Shifted(gf.AbstractSpace):
        def _check_shape(self, X, what="X"):
            self._require_matrix(X, what)

        def to_manifold(self, Z, base=None):
            return Z if base is None else Z + base

        def _from_manifold(self, X):
            return torch.zeros_like(X), X

        def tangent(self, X, G):
            return G

        def retract(self, X, V):
            return X + V

        def project(self, Y):
            return Y

        def _violations(self, X):
            return {"none": torch.zeros(X.shape[:-2])}

    m = gnn.constrain(Holder((3, 3)), "weight", Shifted())
    with pytest.warns(UserWarning, match="cannot re-make the base"):
        m.double()


def test_load_functional_casts_real_dtypes_and_refuses_complex_into_real() -> None:
    """As ``load_state_dict``: a float64 value lands in a float32 parameter as its float32 rounding
    (the README's sentence); a complex one for a real parameter is a ManifoldError, nothing written."""
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    gnn.orthogonal(m, "weight")
    _, raw, bases = gnn.functional(m)
    new = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in raw.items()}
    gnn.load_functional(m, new, bases)
    _, got, _ = gnn.functional(m)
    for k, v in got.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, new[k].float(), rtol=0, atol=0)
    before = {k: v.clone() for k, v in got.items()}
    with pytest.raises(gf.ManifoldError, match="expected a real tensor"):
        gnn.load_functional(m, {k: v.to(torch.complex64) for k, v in got.items()}, bases)
    for k, v in gnn.functional(m)[1].items():
        assert torch.equal(v, before[k])


def _chained(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(5, 5, dtype=dtype)
    gnn.symmetric(m)
    gnn.positive_definite(m)  # appended to the chain: its raw tensor is Symmetric's output
    return m


def test_a_softplus_space_appended_to_a_chain_warns_on_a_dtype_change() -> None:
    """positive_definite on a weight already constrained by symmetric reads its "softplus" values from
    Symmetric's output, which a dtype change cannot re-express: .double() moved every eigenvalue by the
    floors' difference (3.5e-4) with no warning, as did load_state_dict of another dtype (Note [Chained values
    across dtypes]). Both warn now, a deep copy too, and the remedy the warning names keeps the point."""
    import copy

    m = _chained()
    W = m.weight.detach().double().clone()
    with pytest.warns(UserWarning, match="not the first parametrization of its tensor's chain"):
        m.double()
    with pytest.warns(UserWarning, match="not the first parametrization of its tensor's chain"):
        copy.deepcopy(_chained()).double()
    src, dst = _chained(torch.float64), _chained()
    with pytest.warns(UserWarning, match="not the first parametrization of its tensor's chain"):
        dst.load_state_dict(src.state_dict())
    m.weight = W  # the remedy: assign the weight again after the cast
    torch.testing.assert_close(m.weight.detach(), W, atol=1e-12, rtol=0)
    # a space first in its chain keeps its values by itself, without a warning
    alone = nn.Linear(5, 5)
    gnn.positive_definite(alone)
    W = alone.weight.detach().double().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone.double()
    torch.testing.assert_close(alone.weight.detach(), W, atol=1e-5, rtol=0)
