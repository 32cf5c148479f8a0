"""geofunc.nn: what an assignment, a registration or a dtype change does to the point.

Regressions (a fuzz pass against GeoTorch 0.4.0, the behavioural reference where installed):

1. Assigning to a ``"softplus"`` weight (``invertible``, ``positive_definite``, ``fixed_rank``,
   ``positive_semidefinite_fixed_rank`` and their classes) a point whose smallest kept value lies
   between GeoTorch's ``eps`` and geofunc's floor √eps (``diag(1e-4, 1, 2)`` in float32) passed
   GeoTorch's ``in_manifold`` and was then silently lifted to the floor (``diag(3.45e-4, 1, 2)``).
   It is refused now, as ``gf.GLp().from_manifold`` refuses it (Note [Softplus floor on
   assignment] in ``geofunc/nn/_manifolds.py``); bf16/fp16 keep the documented rounding allowance.
2. ``invertible(Linear(4, 4)).to(torch.bfloat16)`` moved every singular value by √eps of bf16
   (0.088) and ``.double()`` by −3.4e-4: the raw values were cast, not re-expressed (Note [Raw
   tensors across dtypes] in ``geofunc/nn/_adapter.py``). Also through ``load_state_dict``.
3. ``Symmetric()``, ``Skew``, ``SphereEmbedded`` refused registration on a float64 tensor (a private
   float32 buffer was compared); classes with a base refused too (GeoTorch fails there).
4. ``orthogonal`` twice raised (GeoTorch appends the second).
5. ``SL.sample(factorized=True)`` returned factors; an unknown tensor name raised ``ValueError``
   only; ``Skew``'s message for a batch claimed "not skew-symmetric".
6. A bug hunt: a float64 point for a float32 ``skew``/``symmetric``/``sphere(embedded=True)`` weight
   raised torch's ValueError, not ManifoldError; a deep copy of a class registered directly moved by
   the floors' difference on ``.double()``, silently; ``average_`` of float64 ``invertible`` modules
   whose mean has det < 0 (or ``fixed_rank`` ones that lose rank) raised: the projection sat below
   GeoTorch's bound of ``in_manifold``, and the message measured nothing.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
import re

import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn

import geofunc as gf
import geofunc.nn as gnn
from reference import member

F32_FLOOR = math.sqrt(torch.finfo(torch.float32).eps)  # 3.45e-4
LOW = (torch.bfloat16, torch.float16)


def _floor(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps)


def _values(W: torch.Tensor, eig: bool) -> torch.Tensor:
    """Singular values (or eigenvalues), descending, in float64."""
    W = W.detach().double()
    return torch.linalg.eigvalsh(0.5 * (W + W.mT)).flip(-1) if eig else torch.linalg.svdvals(W)


# ----------------------------------------------------------------------------- 1. the softplus floor
# (id, constraint function, GeoTorch's same call, eigen family?)
SOFTPLUS = [
    ("invertible", lambda L, m: L.invertible(m), False),
    ("positive_definite", lambda L, m: L.positive_definite(m), True),
    ("fixed_rank", lambda L, m: L.fixed_rank(m, "weight", 3), False),
    ("positive_semidefinite_fixed_rank", lambda L, m: L.positive_semidefinite_fixed_rank(m, "weight", 3), True),
]
SOFTPLUS_CLASSES = [
    ("GLp", lambda L: L.GLp((3, 3))),
    ("PSD", lambda L: L.PSD((3, 3))),
    ("FixedRank", lambda L: L.FixedRank((3, 3), 3)),
    ("PSSDFixedRank", lambda L: L.PSSDFixedRank((3, 3), 3)),
]


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("case", SOFTPLUS, ids=lambda c: c[0])
def test_a_point_below_the_float32_floor_is_refused_not_lifted(case) -> None:
    _, constrain, _ = case
    X = torch.diag(torch.tensor([1e-4, 1.0, 2.0]))
    torch.manual_seed(0)
    m = constrain(gnn, nn.Linear(3, 3))
    assert m.parametrizations.weight[0].in_manifold(X)  # GeoTorch's test accepts it ...
    before = _state(m)
    with pytest.raises(gnn.InManifoldError, match=r"0\.0001.*below 0\.000345, the floor of geofunc's \"softplus\""):
        m.weight = X  # ... the chart cannot represent it: refused, not moved to diag(3.45e-4, 1, 2)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # the pure API refuses the same point
    space = gnn.parametrization_of(m).space
    with pytest.raises(gf.ManifoldError):
        space.from_manifold(X)
    # float64 (floor 1.5e-8) represents it: stored as GeoTorch stores it
    m = constrain(gnn, nn.Linear(3, 3)).double()
    m.weight = X.double()
    torch.testing.assert_close(m.weight.detach(), X.double(), atol=1e-12, rtol=0)


def test_geotorch_stores_the_point_geofunc_refuses() -> None:
    """The reference: GeoTorch's in_manifold is True and it keeps 1e-4 (its floor is 1e-6)."""
    geotorch = pytest.importorskip("geotorch")
    X = torch.diag(torch.tensor([1e-4, 1.0, 2.0]))
    for _, constrain, _ in SOFTPLUS:
        torch.manual_seed(0)
        mg, mf = constrain(geotorch, nn.Linear(3, 3)), constrain(gnn, nn.Linear(3, 3))
        assert mg.parametrizations.weight[0].in_manifold(X) and mf.parametrizations.weight[0].in_manifold(X)
        mg.weight = X
        torch.testing.assert_close(mg.weight.detach(), X, atol=1e-6, rtol=0)
        with pytest.raises(gnn.InManifoldError):
            mf.weight = X


@pytest.mark.parametrize("case", SOFTPLUS_CLASSES, ids=lambda c: c[0])
def test_the_classes_refuse_it_too_also_without_the_membership_check(case) -> None:
    _, make = case
    X = torch.diag(torch.tensor([2.0, 1e-4, 1.0]))
    M = make(gnn)
    for check in (True, False):  # representability is not GeoTorch's membership test
        with pytest.raises(gnn.InManifoldError, match=r"floor"):
            M.right_inverse(X, check_in_manifold=check)
    # a batch names the first offending matrix
    Xb = torch.stack([torch.eye(3), X])
    Mb = type(M)((2, 3, 3), *(() if type(M) in (gnn.GLp, gnn.PSD) else (3,)))
    with pytest.raises(gnn.InManifoldError, match=r"first at batch index \(1,\)"):
        Mb.right_inverse(Xb)


@pytest.mark.parametrize("case", SOFTPLUS, ids=lambda c: c[0])
def test_float32_values_at_the_floor_within_rounding_are_taken(case) -> None:
    """The allowance of the pure space: a value 5e-4 relative below the floor (the rounding of a
    computed singular value, ε√n·σ₁ ≈ 4e-7 here) is taken, moved by no more than that."""
    _, constrain, _ = case
    v = F32_FLOOR * (1 - 5e-4)
    X = torch.diag(torch.tensor([v, 1.0, 2.0]))
    m = constrain(gnn, nn.Linear(3, 3))
    m.weight = X
    torch.testing.assert_close(m.weight.detach(), X, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", SOFTPLUS, ids=lambda c: c[0])
def test_low_precision_keeps_its_documented_allowance(case, dtype) -> None:
    """bf16/fp16: a value below the floor within the point's rounding (ε√n·σ₁ of the dtype) is lifted
    to the floor, as documented; one further below is refused; the verdicts are the pure space's."""
    _, constrain, _ = case
    fl = _floor(dtype)
    delta = torch.finfo(dtype).eps * math.sqrt(3) * 2.0  # σ₁ = 2
    m = constrain(gnn, nn.Linear(3, 3).to(dtype))
    space = gnn.parametrization_of(m).space
    inside = torch.diag(torch.tensor([fl - 0.5 * delta, 1.0, 2.0])).to(dtype)
    m.weight = inside
    space.from_manifold(inside)
    W = m.weight.detach().double()
    assert float((W - inside.double()).abs().max()) <= delta
    outside = torch.diag(torch.tensor([max(fl - 3 * delta, 0.25 * fl), 1.0, 2.0])).to(dtype)
    with pytest.raises(gnn.InManifoldError, match="floor"):
        m.weight = outside
    with pytest.raises(gf.ManifoldError):
        space.from_manifold(outside)


def test_low_precision_at_large_size_lifts_within_the_rounding() -> None:
    """n = 64, bf16: the rounding (ε√n·σ₁ ≈ 0.125) exceeds the floor (0.088): a value 0.02 is lifted
    to the floor, a change within the point's rounding (README, Known limitations)."""
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(64, 64))[0]
    lam = torch.linspace(0.02, 2.0, 64)
    X = ((Q * lam) @ Q.mT).to(torch.bfloat16)
    m = gnn.positive_definite(nn.Linear(64, 64).to(torch.bfloat16))
    m.weight = X
    lam2 = torch.linalg.eigvalsh(m.weight.detach().float())
    assert float(lam2[0]) >= 0.9 * _floor(torch.bfloat16)
    assert float((m.weight.detach().float() - X.float()).abs().max()) <= torch.finfo(torch.bfloat16).eps * 8 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SOFTPLUS, ids=lambda c: c[0])
def test_samples_and_starts_are_representable(case, dtype) -> None:
    """Initialisation and ``sample`` go through the same right inverse: still valid points."""
    _, constrain, eig = case
    torch.manual_seed(0)
    m = constrain(gnn, nn.Linear(3, 3).to(dtype))
    M = m.parametrizations.weight[0]
    m.weight = m.weight.detach()
    for X in (M.sample(), M.sample(eps=1e-7)):  # eps below the floor: clamped at twice the floor
        assert X.dtype == dtype
        m.weight = X
        assert float(_values(m.weight, eig)[2]) >= _floor(dtype) * (0.99 if dtype in LOW else 1.0)


def test_sl_has_no_floor_to_refuse() -> None:
    """SL normalizes the values of its GLp: a point with a tiny singular value is representable."""
    X = torch.diag(torch.tensor([1e-4, 100.0, 100.0]))
    m = gnn.sln(nn.Linear(3, 3))
    m.weight = X
    torch.testing.assert_close(m.weight.detach(), X, atol=1e-3, rtol=1e-5)


# ----------------------------------------------------------------------------- 2. dtype changes
# (id, constraint, eigen family?, rank, floor applies (SL: its GLp values are >= 0.25))
DTYPE_CASES = [
    ("invertible", lambda m: gnn.invertible(m), False, 5, True),
    ("positive_definite", lambda m: gnn.positive_definite(m), True, 5, True),
    ("fixed_rank", lambda m: gnn.fixed_rank(m, "weight", 2), False, 2, True),
    ("positive_semidefinite_fixed_rank", lambda m: gnn.positive_semidefinite_fixed_rank(m, "weight", 2), True, 2, True),
    ("sln", lambda m: gnn.sln(m), False, 5, False),
    ("constrain-GLp", lambda m: gnn.constrain(m, "weight", gf.GLp()), False, 5, True),
    ("constrain-PSD", lambda m: gnn.constrain(m, "weight", gf.PSD()), True, 5, True),
    ("constrain-FixedRank", lambda m: gnn.constrain(m, "weight", gf.FixedRank(rank=3)), False, 3, True),
    ("GLp-class", lambda m: _register(m, gnn.GLp((5, 5))), False, 5, True),
    ("PSSDFixedRank-class", lambda m: _register(m, gnn.PSSDFixedRank((5, 5), 2)), True, 2, True),
]


def _register(m: nn.Module, M: nn.Module) -> nn.Module:
    """A GeoTorch class registered directly with torch's register_parametrization."""
    with torch.no_grad():
        m.weight.copy_(M.sample())
    P.register_parametrization(m, "weight", M)
    return m


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c[0])
def test_a_cast_to_low_precision_keeps_the_values(case, dtype) -> None:
    """Each value changes by the dtype's rounding (≤ 2ε·σ₁; measured ≤ 0.9ε·σ₁), or is lifted to the
    floor where it was below it; before, every value moved by √ε (0.088 bf16, 0.031 fp16)."""
    _, constrain, eig, r, floored = case
    for seed in range(4):
        torch.manual_seed(seed)
        m = constrain(nn.Linear(5, 5))
        v = _values(m.weight, eig)[:r]
        expected = v.clamp(min=_floor(dtype)) if floored else v
        m.to(dtype)
        assert m.weight.dtype == dtype
        v2 = _values(m.weight.float(), eig)[:r]
        torch.testing.assert_close(v2, expected, atol=2 * torch.finfo(dtype).eps * float(v[0]), rtol=0)


@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: c[0])
def test_double_and_back_keep_the_point(case) -> None:
    """``.double()`` moves the point by float32's rounding (before: by the floor, 3.4e-4)."""
    _, constrain, _, _, _ = case
    torch.manual_seed(0)
    m = constrain(nn.Linear(5, 5))
    W = m.weight.detach().double()
    m.double()
    torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
    m.float()
    torch.testing.assert_close(m.weight.detach().double(), W, atol=2e-6, rtol=0)
    m.to(torch.bfloat16).float()  # the round trip adds bf16's rounding once, not the floor twice
    torch.testing.assert_close(m.weight.detach().double(), W, atol=0.05, rtol=0)


@pytest.mark.parametrize("semantics", ["default", "overwrite", "swap"])
def test_dtype_changes_keep_parameter_identity_as_torch_does(semantics) -> None:
    """The raw tensor is ``parametrizations.weight.original``: after ``.double()`` it is the same
    Parameter object (default and swap semantics, as torch keeps it) and the optimizer still holds
    it; under swap semantics this raised before (a weak reference on the raw tensor)."""
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(semantics == "overwrite")
    torch.__future__.set_swap_module_params_on_conversion(semantics == "swap")
    try:
        torch.manual_seed(0)
        m = gnn.invertible(nn.Linear(4, 4))
        p = m.parametrizations.weight.original
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
        W = m.weight.detach().double()
        m.double()
        q = m.parametrizations.weight.original
        assert (q is p) == (semantics != "overwrite")
        assert any(x is q for x in opt.param_groups[0]["params"]) == (semantics != "overwrite")
        torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
        M = m.parametrizations.weight[0]
        M.update_base()  # the class method still finds the raw tensor
        torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("semantics", ["default", "swap"])
@pytest.mark.parametrize("cls", [gnn.GLp, gnn.Stiefel, gnn.Sphere], ids=lambda c: c.__name__)
def test_dtype_changes_of_a_class_registered_directly(cls, semantics) -> None:
    """GeoTorch's way: ``register_parametrization(layer, "weight", geotorch.GLp((4, 4)))``. Its forward (which
    registration already runs) leaves a weak reference on the raw Parameter, and no constrained-module _apply
    lifts it: under swap semantics ``.double()`` raised "_apply(): Couldn't swap ParametrizationList.original"
    (Note [Swapped raw tensors of a class registered directly]). It converts now, keeping the point."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(semantics == "swap")
    try:
        torch.manual_seed(0)
        m, M = nn.Linear(4, 4), cls((4, 4))
        with torch.no_grad():
            m.weight.copy_(M.sample())
        P.register_parametrization(m, "weight", M)
        m(torch.randn(3, 4))
        W = m.weight.detach().double()
        m.double()
        assert m.weight.dtype == torch.float64 and M.in_manifold(m.weight)
        torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
        m(torch.randn(3, 4, dtype=torch.float64))
        M.update_base()  # forward recorded the raw tensor again
        torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
        m.float()
        torch.testing.assert_close(m.weight.detach().double(), W, atol=2e-6, rtol=0)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@pytest.mark.parametrize("case", DTYPE_CASES[:8], ids=lambda c: c[0])
def test_load_state_dict_across_dtypes_keeps_the_point(case) -> None:
    """A float32 state_dict into a float64 module, a bf16 one into a float32 module: the raw values are
    re-expressed, not cast (before: moved by the floor); the checkpoint itself is left as it was."""
    _, constrain, eig, r, _ = case
    torch.manual_seed(0)
    src = constrain(nn.Linear(5, 5))
    W = src.weight.detach().double()
    sd = src.state_dict()
    saved = {k: v.clone() for k, v in sd.items()}
    torch.manual_seed(1)
    dst = constrain(nn.Linear(5, 5)).double()
    dst.load_state_dict(sd)
    assert all(torch.equal(saved[k], v) for k, v in sd.items())
    torch.testing.assert_close(dst.weight.detach(), W, atol=2e-6, rtol=0)
    gnn.update_base(dst, "weight")  # still works, keeps the point
    torch.testing.assert_close(dst.weight.detach(), W, atol=2e-6, rtol=0)
    # bf16 -> float32: the values of the bf16 point, to its rounding (before: each moved by −0.088)
    src.to(torch.bfloat16)
    v = _values(src.weight.float(), eig)[:r]
    torch.manual_seed(2)
    dst = constrain(nn.Linear(5, 5))
    dst.load_state_dict(src.state_dict())
    assert dst.weight.dtype == torch.float32
    v2 = _values(dst.weight, eig)[:r]
    torch.testing.assert_close(v2, v, atol=2 * torch.finfo(torch.bfloat16).eps * float(v[0]), rtol=0)


@pytest.mark.parametrize("cls", [gnn.GLp, gnn.PSD, gnn.SL, lambda size: gnn.FixedRank(size, 3),
                                 lambda size: gnn.PSSDFixedRank(size, 2)], ids=["GLp", "PSD", "SL", "FixedRank", "PSSDFixedRank"])
def test_load_state_dict_across_dtypes_of_a_class_registered_directly(cls) -> None:
    """A class registered directly with register_parametrization: a float32 state_dict loaded into the
    float64 layer (and back) moved every value by the floors' difference (3.4e-4), silently, where
    .double() of the same layer keeps the point (Note [A class registered directly loads across dtypes])."""
    def layer(dtype: torch.dtype, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m, M = nn.Linear(4, 4).to(dtype), cls((4, 4)).to(dtype)
        with torch.no_grad():
            m.weight.copy_(M.sample())
        P.register_parametrization(m, "weight", M)
        return m

    for old, new in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        src = layer(old, 0)
        W = src.weight.detach().double()
        sd = src.state_dict()
        saved = {k: v.clone() for k, v in sd.items()}
        dst = layer(new, 1)
        dst.load_state_dict(sd)
        assert all(torch.equal(saved[k], v) for k, v in sd.items())
        assert dst.weight.dtype == new
        torch.testing.assert_close(dst.weight.detach().double(), W, atol=2e-6, rtol=0)
        same = layer(old, 1)  # a checkpoint of the layer's own dtype loads bit for bit, as before
        same.load_state_dict(sd)
        assert torch.equal(same.weight, src.weight)


def test_load_of_bases_only_of_another_dtype_leaves_a_directly_registered_raw_tensor_alone() -> None:
    """strict=False with the raw tensor missing from a float32 checkpoint: the float64 layer's raw tensor
    holds its own values, which must not be re-expressed as if they were the checkpoint's (they moved by the
    floors' difference, 3.4e-4, silently)."""
    torch.manual_seed(0)
    m, M = nn.Linear(4, 4).double(), gnn.PSD((4, 4)).double()
    with torch.no_grad():
        m.weight.copy_(M.sample())
    P.register_parametrization(m, "weight", M)
    W = m.weight.detach().clone()
    sd = {k: v.float() for k, v in m.state_dict().items() if k.endswith(".base")}  # its own bases, in float32
    out = m.load_state_dict(sd, strict=False)
    assert out.missing_keys == ["bias", "parametrizations.weight.original"] or "parametrizations.weight.original" in out.missing_keys
    torch.testing.assert_close(m.weight.detach(), W, atol=1e-6, rtol=0)


def test_a_subclass_of_the_parametrized_class_still_converts_and_loads() -> None:
    """FSDP2's ``fully_shard`` subclasses the module's (parametrized) class: the overrides that keep the
    points must call past themselves, not recurse."""
    torch.manual_seed(0)
    m = gnn.invertible(nn.Linear(4, 4))
    m.__class__ = type("Wrapped" + type(m).__name__, (type(m),), {})
    W = m.weight.detach().double()
    sd = m.state_dict()
    m.double()
    torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)
    m.load_state_dict(sd)
    torch.testing.assert_close(m.weight.detach(), W, atol=2e-6, rtol=0)


def test_a_float64_value_below_the_float32_floor_warns_when_cast() -> None:
    m = gnn.positive_definite(nn.Linear(3, 3).double())
    m.weight = torch.diag(torch.tensor([1e-5, 1.0, 2.0], dtype=torch.float64))
    with pytest.warns(UserWarning, match=r"below the floor 0\.000345.*lifted"):
        m.float()
    lam = torch.linalg.eigvalsh(m.weight.detach())
    assert abs(float(lam[0]) - F32_FLOOR) < 1e-6


def test_a_lifted_value_keeps_a_finite_trainable_coordinate() -> None:
    torch.manual_seed(0)
    m = gnn.invertible(nn.Linear(4, 4))
    m.weight = torch.diag(torch.tensor([0.01, 1.0, 1.5, 2.0]))
    m.to(torch.bfloat16)
    raw = m.parametrizations.weight.original
    assert bool(torch.isfinite(raw).all())
    assert float(torch.linalg.svdvals(m.weight.detach().float())[-1]) == pytest.approx(_floor(torch.bfloat16), rel=0.02)
    m.weight.float().diagonal().sum().backward()
    assert float(raw.grad.diagonal().abs().min()) > 0


def test_a_cast_of_the_parametrization_list_alone_is_not_silent() -> None:
    m = gnn.invertible(nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="not re-expressed"):
        m.parametrizations.weight.double()


def test_dtype_changes_leave_other_spaces_alone() -> None:
    """Spaces without a dtype-dependent floor: the raw tensor is cast as before (bit for bit)."""
    for fn in (lambda m: gnn.orthogonal(m), lambda m: gnn.low_rank(m, "weight", 2),
               lambda m: gnn.positive_definite(m, f=(torch.exp, torch.log)), lambda m: gnn.alpha_stable(m)):
        torch.manual_seed(0)
        m = fn(nn.Linear(4, 4))
        raw = m.parametrizations.weight.original.detach().clone()
        m.double()
        assert torch.equal(m.parametrizations.weight.original.detach(), raw.double())


# ----------------------------------------------------------------------------- 3. registration dtypes
@pytest.mark.parametrize("name", ["Symmetric", "Skew", "SphereEmbedded"])
def test_baseless_classes_register_on_float64_like_geotorch(name) -> None:
    geotorch = pytest.importorskip("geotorch")
    out = {}
    for lib in (geotorch, gnn):
        torch.manual_seed(0)
        m = nn.Linear(3, 3, dtype=torch.float64)
        with torch.no_grad():
            if name == "Skew":
                m.weight.copy_(m.weight - m.weight.T)
            if name == "SphereEmbedded":
                m.weight.copy_(m.weight / m.weight.norm(dim=-1, keepdim=True))
        M = {"Symmetric": lambda: lib.Symmetric(), "Skew": lambda: lib.Skew((3, 3)),
             "SphereEmbedded": lambda: lib.SphereEmbedded((3, 3))}[name]()
        P.register_parametrization(m, "weight", M)
        out[lib] = m.weight.detach()
    assert out[gnn].dtype == torch.float64
    torch.testing.assert_close(out[gnn], out[geotorch], atol=1e-12, rtol=0)


@pytest.mark.parametrize("make", [lambda: gnn.Stiefel((4, 3)), lambda: gnn.SO((3, 3)), lambda: gnn.GLp((3, 3)),
                                  lambda: gnn.Sphere((3, 3)), lambda: gnn.PSD((3, 3))],
                         ids=["Stiefel", "SO", "GLp", "Sphere", "PSD"])
def test_classes_with_a_base_register_on_float64(make) -> None:
    """GeoTorch fails here (a float32 base against a float64 weight); the base is re-made in float64."""
    torch.manual_seed(0)
    M = make()
    X = M.space.project(M.sample().double())  # a point of the space to float64's accuracy
    m = nn.Linear(M.shape[-1], M.shape[-2], bias=False, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(X)
    P.register_parametrization(m, "weight", M)
    assert all(b.dtype == torch.float64 for b in M._base_buffers())
    torch.testing.assert_close(m.weight.detach(), X, atol=1e-12, rtol=0)
    assert bool(M.space.contains(m.weight.detach()).all())  # at float64's tolerance (1e-9)
    assert M.sample().dtype == torch.float64
    before = _state(m)
    with pytest.raises(gnn.InManifoldError, match="expected dtype torch.float64"):
        m.weight = X.float()  # an assignment of another dtype is still refused, changing nothing
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------- 4. constraining twice
def test_orthogonal_twice_appends_as_geotorch() -> None:
    geotorch = pytest.importorskip("geotorch")
    for lib in (geotorch, gnn):
        for second, ok in ((lambda m: lib.orthogonal(m), True), (lambda m: lib.grassmannian(m), True),
                           (lambda m: lib.sphere(m), False)):
            torch.manual_seed(0)
            m = lib.orthogonal(nn.Linear(3, 5))
            if not ok:  # a sphere sample is not orthonormal: the first constraint refuses it
                with pytest.raises(Exception, match="Stiefel"):
                    second(m)
                continue
            second(m)
            assert len(m.parametrizations.weight) == 2
            W = m.weight.detach()
            torch.testing.assert_close(W.T @ W, torch.eye(3), atol=1e-5, rtol=0)
            if lib is gnn:
                opt = torch.optim.Adam(m.parameters(), lr=0.05)
                for _ in range(3):
                    opt.zero_grad()
                    m(torch.randn(4, 3)).pow(2).sum().backward()
                    opt.step()
                W = m.weight.detach()
                torch.testing.assert_close(W.T @ W, torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["orthogonal", "grassmannian", "positive_definite", "invertible", "sln", "sphere",
                                  "almost_orthogonal", "positive_semidefinite", "constrain"])
def test_a_constraint_on_top_of_weight_norm_is_a_point_as_geotorch(name: str) -> None:
    """On a weight already under torch's ``weight_norm``, the chain was asked to output the new
    constraint's raw tensor, zero for a space with a base: ``weight_norm`` maps zero to NaN
    (0 / ‖0‖), and the registration raised an ``InManifoldError`` measuring ``inf`` where GeoTorch
    registers. Now the point is assigned through the chain, as GeoTorch does: a finite point of the
    space with finite gradients for every raw tensor."""
    geotorch = pytest.importorskip("geotorch")
    for lib in (geotorch, gnn):
        if name == "constrain" and lib is geotorch:
            continue
        torch.manual_seed(0)
        m = nn.Linear(5, 5)
        torch.nn.utils.parametrizations.weight_norm(m, "weight")
        if name == "constrain":
            gnn.constrain(m, "weight", gf.Stiefel())
        else:
            getattr(lib, name)(m, "weight")
        assert len(m.parametrizations.weight) == 2
        W = m.weight
        assert torch.isfinite(W).all()
        if name in ("orthogonal", "grassmannian", "constrain"):
            assert member(gf.Stiefel(), W.detach(), atol=1e-5)
        elif name in ("positive_definite",):
            assert member(gf.PSD(), W.detach(), atol=1e-5)
        elif name == "sphere":
            assert member(gf.Sphere(), W.detach(), atol=1e-5)
        W.pow(2).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in (m.parametrizations.weight.original0,
                                                          m.parametrizations.weight.original1))


@pytest.mark.parametrize("name", ["orthogonal", "grassmannian", "sphere", "low_rank", "constrain"])
@pytest.mark.parametrize("shape", [(5, 5), (4, 3, 3, 3)])
def test_a_constraint_on_top_of_spectral_norm_is_a_point_as_geotorch(name: str, shape: tuple) -> None:
    """On a weight under torch's ``spectral_norm`` (Linear, Conv2d), the first try assigns the new
    constraint's raw tensor, zero for Stiefel and Sphere; evaluating the chain there ran the power
    iteration on a zero weight, which left spectral_norm's ``_u``, ``_v`` zero, so GeoTorch's way (the
    point through the chain) then gave 0 / 0 too and the registration raised where GeoTorch registers."""
    geotorch = pytest.importorskip("geotorch")
    spaces = {"orthogonal": gf.Stiefel(), "grassmannian": gf.Stiefel(), "constrain": gf.Stiefel(),
              "sphere": gf.Sphere(), "low_rank": gf.LowRank(rank=2)}
    for lib in (geotorch, gnn):
        if name == "constrain" and lib is geotorch:
            continue
        torch.manual_seed(0)
        m = nn.Linear(5, 5) if len(shape) == 2 else nn.Conv2d(3, 4, 3)
        torch.nn.utils.parametrizations.spectral_norm(m, "weight")
        if name == "constrain":
            gnn.constrain(m, "weight", gf.Stiefel())
        elif name == "low_rank":
            getattr(lib, name)(m, "weight", 2)
        else:
            getattr(lib, name)(m, "weight")
        assert len(m.parametrizations.weight) == 2
        sn = m.parametrizations.weight[0]
        assert float(sn._u.norm()) == pytest.approx(1.0, abs=1e-5)
        W = m.weight
        assert torch.isfinite(W).all()
        assert member(spaces[name], W.detach(), atol=1e-5)
        x = torch.randn((2, 5) if len(shape) == 2 else (2, 3, 6, 6))
        m(x).pow(2).sum().backward()
        assert torch.isfinite(m.parametrizations.weight.original.grad).all()


def test_a_chain_that_outputs_nan_is_named() -> None:
    class Broken(nn.Module):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            return X * float("nan")

        def right_inverse(self, X: torch.Tensor) -> torch.Tensor:
            return X

    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", Broken(), unsafe=True)
    raw = m.parametrizations.weight.original.detach().clone()
    with pytest.raises(gf.ManifoldError, match=r"Linear\.weight to .*Stiefel.*the parametrizations already on it "
                                               r"\(Broken\) output non-finite values"):
        gnn.orthogonal(m, "weight")
    # and the module is left as it was
    assert len(m.parametrizations.weight) == 1
    torch.testing.assert_close(m.parametrizations.weight.original.detach(), raw, atol=0, rtol=0)


# ----------------------------------------------------------------------------- 5. small API differences
def test_sl_sample_ignores_factorized_as_geotorch() -> None:
    geotorch = pytest.importorskip("geotorch")
    for lib in (geotorch, gnn):
        torch.manual_seed(0)
        X = lib.SL((3, 3)).sample(factorized=True)
        assert isinstance(X, torch.Tensor) and X.shape == (3, 3)
    torch.manual_seed(0)
    a = gnn.SL((3, 3)).sample(factorized=True)
    torch.manual_seed(0)
    torch.testing.assert_close(a, gnn.SL((3, 3)).sample(), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:Lazy modules are a new feature:UserWarning")
@pytest.mark.parametrize("make", [lambda: nn.LazyLinear(4), lambda: nn.LazyConv2d(4, 3)], ids=["LazyLinear", "LazyConv2d"])
def test_a_lazy_modules_uninitialized_weight_is_refused_by_name(make) -> None:
    """Before its first forward a lazy module's weight has no shape: torch's RuntimeError ("Can't access
    the shape of an uninitialized parameter") escaped, where GeoTorch raises a ValueError; now a
    ManifoldError names the tensor and what to do, and the module is left as it was."""
    for call in (lambda m: gnn.orthogonal(m, "weight"), lambda m: gnn.low_rank(m, "weight", 2),
                 lambda m: gnn.constrain(m, "weight", gf.Stiefel())):
        m = make()
        with pytest.raises(gf.ManifoldError, match=r"Lazy\w+\.weight to (Stiefel|LowRank).*uninitialized parameter "
                                                   r"of a lazy module"):
            call(m)
        assert not P.is_parametrized(m)
        m(torch.randn(2, 3) if isinstance(m, nn.LazyLinear) else torch.randn(1, 2, 5, 5))  # then it works
        call(m)
        assert member(gf.LowRank(rank=2) if P.is_parametrized(m) and isinstance(m.parametrizations.weight[0], gnn.LowRank)
                      else gf.Stiefel(), m.weight.detach())


def test_an_unknown_tensor_name_is_geotorchs_attribute_error() -> None:
    geotorch = pytest.importorskip("geotorch")
    with pytest.raises(AttributeError):
        geotorch.orthogonal(nn.Linear(3, 3), "foo")
    for call in (lambda: gnn.orthogonal(nn.Linear(3, 3), "foo"), lambda: gnn.constrain(nn.Linear(3, 3), "foo", gf.SO())):
        with pytest.raises(AttributeError, match="does not have a parameter, a buffer, or a parametrized element"):
            call()
        with pytest.raises(ValueError):  # and still register_parametrization's ValueError
            call()


def test_skew_takes_any_square_batch_and_names_a_wrong_shape() -> None:
    geotorch = pytest.importorskip("geotorch")
    torch.manual_seed(0)
    X = torch.randn(2, 4, 4)
    X = X - X.mT
    torch.testing.assert_close(gnn.Skew((4, 4)).right_inverse(X), geotorch.Skew((4, 4)).right_inverse(X), atol=0, rtol=0)
    with pytest.raises(gnn.InManifoldError, match=r"expected square matrices \(\.\.\., n, n\), got shape \(4, 3\)"):
        gnn.Skew((4, 4)).right_inverse(torch.randn(4, 3))
    with pytest.raises(gnn.InManifoldError, match=r"not skew-symmetric to atol 0\.0001: max\|X \+ Xᵀ\| = "):
        gnn.Skew((4, 4)).right_inverse(torch.randn(2, 4, 4))


@pytest.mark.parametrize("make", [lambda: gnn.skew(nn.Linear(3, 3)), lambda: gnn.skew(nn.Linear(3, 3), lower=False),
                                  lambda: gnn.constrain(nn.Linear(3, 3), "weight", gf.Skew()),
                                  lambda: gnn.symmetric(nn.Linear(3, 3)),
                                  lambda: gnn.sphere(nn.Linear(3, 3), embedded=True)],
                         ids=["skew", "skew-upper", "constrain-Skew", "symmetric", "sphere-embedded"])
def test_an_assignment_of_another_shape_is_refused_through_the_module(make) -> None:
    """A skew point of another size (or a batch of them) assigned to a constrained weight: torch's
    parametrize re-shaped the raw Parameter in place and the layer broke at its next forward (Note
    [Assignments of another shape]). Refused now, naming both shapes, the module unchanged; a point of
    the weight's shape is still taken."""
    torch.manual_seed(0)
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    space = gnn.parametrization_of(m).space
    # GeoTorch's classes raise GeoTorch's InManifoldError, as for every other refused assignment
    exc = gnn.InManifoldError if isinstance(gnn.parametrization_of(m), (gnn.Skew, gnn.Symmetric, gnn.Sphere)) else gf.ManifoldError
    for shape in ((4, 4), (2, 3, 3)):
        X = torch.randn(shape)
        X = X - X.mT if isinstance(space, gf.Skew) else (X + X.mT if isinstance(space, gf.Sym)
                                                          else torch.nn.functional.normalize(X, dim=-1))
        with pytest.raises(exc, match=rf"expected a tensor of shape \(3, 3\), got shape {re.escape(str(shape))}"):
            m.weight = X
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m(torch.randn(2, 3))
    X = space.project(torch.randn(3, 3))
    m.weight = X
    torch.testing.assert_close(m.weight, X, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_almost_orthogonal_takes_the_projection_of_a_matrix_outside_its_band(dtype) -> None:
    """``space.project`` puts a matrix outside the band on its edge (σ = 1 ± lam), which computes to
    1 − lam − 6e-8 in float32: GeoTorch's exact test refused it, so ``m.weight = space.project(W)``
    (the recovery README and the base error suggest) raised. Accepted now up to the singular values'
    rounding; a matrix 1e-3 outside the band is still refused."""
    torch.manual_seed(0)
    m = gnn.almost_orthogonal(nn.Linear(4, 4).to(dtype), lam=0.3)
    space = gnn.parametrization_of(m).space
    for scale in (0.5, 2.0):
        X = space.project(scale * torch.eye(4, dtype=dtype) + 0.1 * torch.randn(4, 4, dtype=dtype))
        m.weight = X
        tol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(m.weight.detach(), X, atol=tol, rtol=0)
        S = torch.linalg.svdvals(m.weight.detach())
        assert bool(((S - 1).abs() <= 0.3 + tol).all())
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=dtype))[0]
    with pytest.raises(gf.ManifoldError):
        m.weight = (0.7 - 1e-3) * Q


# ----------------------------------------------------------------------------- 6. found by a bug hunt
# (id, registration on a float32 Linear(4, 4)): spaces without a base buffer to compare dtypes with
BASELESS = [
    ("skew", lambda m: gnn.skew(m)),
    ("symmetric", lambda m: gnn.symmetric(m)),
    ("sphere-embedded", lambda m: gnn.sphere(m, embedded=True)),
    ("constrain-Skew", lambda m: gnn.constrain(m, "weight", gf.Skew())),
    ("constrain-Rn", lambda m: gnn.constrain(m, "weight", gf.Rn())),
]


@pytest.mark.parametrize("case", BASELESS, ids=lambda c: c[0])
def test_an_assignment_of_another_dtype_is_refused_without_a_base(case) -> None:
    """A float64 (or int64) point for a float32 ``skew``/``symmetric``/``sphere(embedded=True)`` weight
    raised torch's ValueError (a RuntimeError from ``vector_norm`` for an integer SphereEmbedded point),
    not the documented ManifoldError: these spaces have no base buffer to compare dtypes with (Note
    [Assignments of another dtype] in ``geofunc/nn/_adapter.py``)."""
    _, register = case
    torch.manual_seed(0)
    m = register(nn.Linear(4, 4))
    X = m.weight.detach().clone()
    before = _state(m)
    for Y in (X.double(), X.round().long()):
        with pytest.raises(gf.ManifoldError, match=rf"expected dtype torch\.float32 on cpu, got dtype {Y.dtype} on cpu"):
            m.weight = Y
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m.weight = X  # the same point in its own dtype is taken
    torch.testing.assert_close(m.weight.detach(), X, atol=1e-6, rtol=0)
    m.double()  # and the reference follows the module's dtype
    m.weight = X.double()
    with pytest.raises(gf.ManifoldError, match=r"expected dtype torch\.float64"):
        m.weight = X


def test_a_complex_point_for_a_real_baseless_weight_keeps_its_message() -> None:
    m = gnn.skew(nn.Linear(3, 3))
    with pytest.raises(gnn.InManifoldError, match="is a real space"):
        m.weight = m.weight.detach().to(torch.complex64)


def _direct(M: nn.Module) -> nn.Module:
    """GeoTorch's class API: a class registered with torch's register_parametrization on its sample."""
    m = nn.Module()
    m.weight = nn.Parameter(M.sample())
    P.register_parametrization(m, "weight", M)
    return m


COPIED = [
    ("FixedRank", lambda: _direct(gnn.FixedRank((6, 4), 2))),
    ("GLp", lambda: _direct(gnn.GLp((4, 4)))),
    ("PSD", lambda: _direct(gnn.PSD((4, 4)))),
    ("PSSDFixedRank", lambda: _direct(gnn.PSSDFixedRank((5, 5), 2))),
    ("fixed_rank", lambda: gnn.fixed_rank(nn.Linear(4, 6), "weight", 2)),
    ("invertible", lambda: gnn.invertible(nn.Linear(4, 4))),
    ("positive_definite", lambda: gnn.positive_definite(nn.Linear(4, 4))),
]


@pytest.mark.parametrize("evaluated", [True, False], ids=["evaluated", "fresh"])
@pytest.mark.parametrize("case", COPIED, ids=lambda c: c[0])
def test_a_deep_copy_converts_across_dtypes_as_the_original(case, evaluated) -> None:
    """An EMA copy (``copy.deepcopy``) of a module whose class was registered directly, then
    ``.double()``: the copy's weight moved by the difference of the floors (2e-4 to 3.5e-4), silently;
    the original by float32's rounding. The copied adapter was in none of the registries of raw
    tensors (Note [Copies keep what is known of the raw tensor] in ``geofunc/nn/_adapter.py``). Warnings
    are errors here: the copy converts without one."""
    torch.manual_seed(0)
    m = case[1]()
    if evaluated:
        _ = m.weight
    W = m.weight.detach().double()
    a = copy.deepcopy(m)
    b = copy.deepcopy(m).double()  # converted before any evaluation of the copy
    if evaluated:
        _ = a.weight
    a.double()
    m.double()
    for x in (m, a, b):
        assert x.weight.dtype == torch.float64
        torch.testing.assert_close(x.weight.detach(), W, atol=2e-6, rtol=0)
    a.float()  # and back
    torch.testing.assert_close(a.weight.detach().double(), W, atol=2e-6, rtol=0)


@pytest.mark.parametrize("case", COPIED[:4], ids=lambda c: c[0])
def test_a_pickled_module_and_a_copied_class_convert_as_the_original(case) -> None:
    """pickle: a module that geofunc made picklable (a one-liner on another tensor) with a class registered
    directly beside it; and a deep copy of the class alone, registered on another module."""
    torch.manual_seed(0)
    m = case[1]()
    m.register_parameter("Q", nn.Parameter(torch.randn(3, 3)))
    gnn.orthogonal(m, "Q")  # the module's class is now geofunc's picklable one
    _ = m.weight
    W = m.weight.detach().double()
    r = pickle.loads(pickle.dumps(m))
    r.double()
    torch.testing.assert_close(r.weight.detach(), W, atol=2e-6, rtol=0)
    M2 = copy.deepcopy(m.parametrizations.weight[0])  # copies its recorded raw tensor, which nobody uses
    n = _direct(M2)
    V = n.weight.detach().double()
    n.double()
    torch.testing.assert_close(n.weight.detach(), V, atol=2e-6, rtol=0)
    M3 = copy.deepcopy(m.parametrizations.weight[0])  # a copy evaluated on another tensor than its own
    M3(nn.Parameter(m.parametrizations.weight.original.detach().clone()))
    with pytest.warns(UserWarning, match="does not know its raw tensor"):  # not silent
        M3.double()


def _glp_mean_with_negative_det(dtype: torch.dtype) -> tuple[list, list]:
    """Three ``invertible`` modules (det > 0) whose weighted mean has det < 0 (and singular values of order 1)."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    R = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    Q[:, 0] *= torch.linalg.det(Q).sign()
    R[:, 0] *= torch.linalg.det(R).sign()
    diags = [(1.0, 1.0, 1.0, 1.0), (-3.0, -0.1, 1.0, 1.0), (1.0, 2.0, 1.0, 1.5)]
    modules = []
    for d in diags:
        m = gnn.invertible(nn.Linear(4, 4, bias=False).to(dtype))
        m.weight = (Q @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ R.T).to(dtype)
        modules.append(m)
    return modules, [0.45, 0.45, 0.1]  # mean: Q diag(-0.8, 0.605, 1, 1.05) Rᵀ, det < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_average_of_invertible_modules_across_det_zero_assigns_a_point_the_class_accepts(dtype) -> None:
    """float64: ``GLp.project`` of a det < 0 mean puts its smallest singular value at the float64 floor
    1.5e-8, which the space contains and the class's ``in_manifold`` (GeoTorch's bound 1e-5) refused, so
    ``average_`` raised, without a measurement. It is lifted to twice the bound now (Note [Averages the
    class accepts] in ``geofunc/nn/_manifolds.py``); in float32 the projection (floor 3.45e-4) is
    assigned as it is."""
    modules, w = _glp_mean_with_negative_det(dtype)
    mean = sum(wi * m.weight.detach() for wi, m in zip(w, modules))
    assert float(torch.linalg.det(mean.double())) < 0
    M = modules[0].parametrizations.weight[0]
    P_ = M.space.project(mean)
    target = copy.deepcopy(modules[0])
    gnn.average_(target, modules, w)
    W = target.weight.detach()
    assert M.in_manifold(W) and float(torch.linalg.det(W.double())) > 0
    s, s_proj = torch.linalg.svdvals(W.double()), torch.linalg.svdvals(P_.double())
    if dtype == torch.float64:
        assert float(s_proj[-1]) < 1e-7  # the space's projection, which the class refuses
        assert not M.in_manifold(P_)
        assert abs(float(s[-1]) - 2e-5) < 1e-12
        torch.testing.assert_close(W, P_, atol=3e-5, rtol=0)
    else:
        torch.testing.assert_close(W, P_, atol=2e-6, rtol=0)
    torch.testing.assert_close(s[:-1], s_proj[:-1], atol=1e-6, rtol=0)


def test_average_of_fixed_rank_modules_that_lose_rank_in_float64() -> None:
    """Two rank-2 weights whose mean has rank 1: projected, σ₂ is the float64 floor; lifted to 2e-5."""
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))[0]
    modules = []
    for sign in (1.0, -1.0):  # u₁v₁ᵀ ± 0.5 u₂v₂ᵀ
        m = gnn.fixed_rank(nn.Linear(4, 6).double(), "weight", 2)
        m.weight = U @ torch.diag(torch.tensor([1.0, 0.5 * sign], dtype=torch.float64)) @ V.T
        modules.append(m)
    target = copy.deepcopy(modules[0])
    gnn.average_(target, modules)
    s = torch.linalg.svdvals(target.weight.detach())
    assert abs(float(s[0]) - 1.0) < 1e-12 and abs(float(s[1]) - 2e-5) < 1e-12 and float(s[2]) < 1e-12
    assert target.parametrizations.weight[0].in_manifold(target.weight.detach())


@pytest.mark.parametrize("case", [("invertible", False, r"singular value \(σ_3\) is 1e-07, not above 1e-05"),
                                  ("positive_definite", True, r"eigenvalue \(number 3 from the top\) is 1e-07, below 1e-06")],
                         ids=lambda c: c[0])
def test_a_refusal_by_geotorchs_bound_names_the_measured_value(case) -> None:
    """A float64 point that the space contains (above its floor 1.5e-8) but GeoTorch's ``in_manifold``
    refuses: the message said only "in_manifold is False"; it names the value and the bound now."""
    name, _, pattern = case
    m = getattr(gnn, name)(nn.Linear(3, 3).double())
    X = torch.diag(torch.tensor([1e-7, 1.0, 2.0], dtype=torch.float64))
    assert bool(gnn.parametrization_of(m).space.contains(X))
    with pytest.raises(gnn.InManifoldError, match=pattern + r", the bound of GeoTorch's in_manifold"):
        m.weight = X


# ----------------------------------------------------------------------------- 7. non-finite triangles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["symmetric", "skew"])
def test_an_assignment_of_infinities_to_a_triangle_is_refused(name, dtype) -> None:
    """``allclose(X, ±Xᵀ)`` holds for infinities: ``symmetric`` kept an all-inf weight and ``skew`` one
    with ±inf in mirrored places, silently (Note [Non-finite triangles]); both are refused now, the
    weight left as it was, and ``in_manifold`` says no, as ``gf.Sym``/``gf.Skew`` do."""
    inf = float("inf")
    m = getattr(gnn, name)(nn.Linear(3, 3).to(dtype))
    M = m.parametrizations.weight[0]
    before = m.weight.detach().clone()
    bad = [torch.full((3, 3), inf, dtype=dtype)] if name == "symmetric" else []
    bad.append(torch.tensor([[0.0, inf, 1.0], [-inf, 0.0, 2.0], [-1.0, -2.0, 0.0]], dtype=dtype))
    bad[-1] = bad[-1] if name == "skew" else bad[-1].abs()  # symmetric with an inf pair
    space = gf.Sym() if name == "symmetric" else gf.Skew()
    for X in bad:
        assert not bool(space.contains(X))
        assert not M.in_manifold(X)
        with pytest.raises(gnn.InManifoldError, match="non-finite"):
            m.weight = X
        assert torch.equal(m.weight.detach(), before)
        assert member(space, m.weight.detach(), 1e-6 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("name", ["skew", "symmetric", "embedded", "constrain_sym"])
def test_a_meta_point_for_a_weight_without_a_base_is_a_manifold_error(name) -> None:
    """Constraints without a base buffer (skew, symmetric, sphere(embedded=True), constrain(.., gf.Sym()))
    compare an assigned point's device with the raw tensor's, but skipped meta tensors: a meta point for
    a CPU weight (and a CPU point for a meta weight) reached torch's set_, which raised its
    "Attempted to set the storage ... on different device" RuntimeError; the classes with a base say
    so as a ManifoldError. Meta for meta still assigns (deferred initialization)."""
    make = {"skew": gnn.skew, "symmetric": gnn.symmetric, "embedded": lambda m: gnn.sphere(m, embedded=True),
            "constrain_sym": lambda m: gnn.constrain(m, "weight", gf.Sym())}[name]
    m = make(nn.Linear(3, 3))
    before = m.weight.detach().clone()
    with pytest.raises(gf.ManifoldError, match="on cpu, got dtype torch.float32 on meta"):
        m.weight = torch.empty(3, 3, device="meta")
    assert torch.equal(m.weight.detach(), before)
    with torch.device("meta"):
        deferred = make(nn.Linear(3, 3))
    with pytest.raises(gf.ManifoldError, match="on meta, got dtype torch.float32 on cpu"):
        deferred.weight = torch.zeros(3, 3)
    deferred.weight = torch.zeros(3, 3, device="meta")
    assert deferred.weight.is_meta


def test_average_refuses_weights_that_are_not_numbers_by_name():
    """average_ read its weights by float(): a string weight raised 'could not convert string to float'
    (and '0.5' was read as 0.5), a number alone "'float' object is not iterable"; a bool counted as 1.
    Each is a ManifoldError naming average_ and the weight; NumPy arrays and tensors are still taken."""
    a, b = gnn.orthogonal(nn.Linear(3, 5)), gnn.orthogonal(nn.Linear(3, 5))
    for weights, message in ((["a", "b"], r"weight 0 to be a real number, got 'a'"),
                             (["0.5", "0.5"], r"weight 0 to be a real number, got '0\.5'"),
                             ([True, False], r"weight 0 to be a real number, got True"),
                             (0.5, r"`weights` to be a sequence of numbers")):
        with pytest.raises(gf.ManifoldError, match=r"^average_: expected " + message):
            gnn.average_(a, [a, b], weights)
    for weights in (np.array([0.25, 0.75]), torch.tensor([0.25, 0.75])):
        gnn.average_(a, [a, b], weights)
        assert member(gf.Stiefel(), a.weight.detach(), 1e-5)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")  # the test casts a module itself
def test_a_complex_checkpoint_into_a_real_class_registered_directly_is_refused() -> None:
    """torch's ParametrizationList loads (and casts to real) the raw tensor before the class sees its
    entries; the class then refused nothing and the layer held another point, 0.35 off the real part of the
    saved weight. It raises, as the one-liners do (Note [Complex and real dtypes of a constrained module])."""
    def layer(dtype: torch.dtype, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m, M = nn.Linear(4, 4).to(dtype), gnn.Stiefel((4, 4)).to(dtype)
        with torch.no_grad():
            m.weight.copy_(M.sample())
        P.register_parametrization(m, "weight", M)
        return m

    src, dst = layer(torch.complex64, 0), layer(torch.float32, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Casting complex values to real")  # torch's, from the parent
        with pytest.raises(gf.ManifoldError, match="complex checkpoint has no real counterpart"):
            dst.load_state_dict(src.state_dict())
    same = layer(torch.complex64, 1)  # complex into complex loads bit for bit
    same.load_state_dict(src.state_dict())
    assert torch.equal(same.weight, src.weight)
