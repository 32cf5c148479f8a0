"""Self-test of the public conformance harness ``geofunc.testing``.

Two halves, so the harness cannot silently rot into checks that cannot fail:

* a space written here, outside the library, from the public protocol only, passes
  ``check_space`` (a user can check their own space);
* deliberately broken variants of ``gf.Sphere`` (each overriding ONE method) are each
  caught by the property meant to catch them, with a message naming the defect; the
  unbroken ``gf.Sphere`` passes the same check on the same case (the control), so the
  failure is the defect's and not the case's.

Every case is one small float64 shape: the file runs in a few seconds on one core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import geofunc as gf
from geofunc.spaces._base import AbstractSpace
from geofunc.testing import (
    PROPERTIES,
    SpaceCase,
    check_bad_input,
    check_contains,
    check_from_manifold,
    check_gradcheck,
    check_jacobians,
    check_nan,
    check_rebase,
    check_retract,
    check_sample,
    check_space,
    check_tangent,
)

Tensor = torch.Tensor
f64 = torch.float64


# ------------------------------------------------------------------ a user-defined space
def _dot(A: Tensor, B: Tensor) -> Tensor:
    return (A * B).sum(-1, keepdim=True)


def _unit(Y: Tensor) -> Tensor:
    return Y / torch.linalg.vector_norm(Y, dim=-1, keepdim=True)


@dataclasses.dataclass(frozen=True)
class ProjectiveChartSphere(AbstractSpace):
    """Unit vectors (last dim) in the *projective* chart ``X = (u + v) / ‖u + v‖``,
    ``v = Z − ⟨Z, u⟩ u``, ``u`` the base (``e_1`` for None). ``‖u + v‖ ≥ 1``, so the chart is
    smooth everywhere; a different chart from ``gf.Sphere``'s exponential one."""

    point_ndim = 1

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_vector(X, what)

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        if base is None:
            U = (torch.arange(Z.shape[-1], device=Z.device) == 0).to(Z.dtype)
        else:
            self._check_shape(base, "base")
            self._require_same_shape(Z, base, "Z", "base")
            U = _unit(base)
        return _unit(U + Z - _dot(Z, U) * U)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return torch.zeros_like(X), X

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        self._check_shape(X, "X")
        self._check_shape(G, "G")
        self._require_same_shape(X, G, "X", "G")
        return G - _dot(G, X) * X

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        self._check_shape(X, "X")
        self._check_shape(V, "V")
        self._require_same_shape(X, V, "X", "V")
        return _unit(X + V)

    def project(self, Y: Tensor) -> Tensor:
        self._check_shape(Y, "Y")
        return _unit(Y)

    def sample(self, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
        shape = self._sample_shape(shape)
        self._check_shape(torch.empty(shape, dtype=dtype, device="meta"), "shape")
        if device is None and generator is not None:
            device = generator.device
        return _unit(torch.randn(shape, generator=generator, dtype=dtype, device=device))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        return {"|‖x‖ − 1|": (torch.linalg.vector_norm(X, dim=-1) - 1).abs()}


def _on_unit_sphere(X: Tensor, atol: float) -> Tensor:
    return (torch.linalg.vector_norm(X, dim=-1) - 1.0).abs() <= atol


def _user_case(dtypes: tuple[torch.dtype, ...]) -> SpaceCase:
    return SpaceCase(
        "ProjectiveChartSphere",
        ProjectiveChartSphere(),
        shapes=((4,), (2, 3)),
        member=_on_unit_sphere,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        dtypes=dtypes,
    )


def test_user_space_passes_check_space() -> None:
    check_space(_user_case((f64,)))


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if not p.float64_only], ids=lambda p: p.name)
def test_user_space_passes_float32_properties(prop) -> None:
    case = _user_case((torch.float32,))
    assert prop.dtypes(case) == (torch.float32,)
    prop.fn(case, torch.float32)


# --------------------------------------------------------------- broken variants of Sphere
@dataclasses.dataclass(frozen=True)
class TangentIdentity(gf.Sphere):
    """``tangent`` returns ``G`` unchanged: linear, idempotent, self-adjoint, but not tangent."""

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        return G


@dataclasses.dataclass(frozen=True)
class TangentOblique(gf.Sphere):
    """An oblique projection onto the tangent space, ``G − ⟨X, G⟩ w / ⟨X, w⟩`` with ``w`` not
    parallel to ``X``: its image is tangent and it is idempotent and linear, but not self-adjoint."""

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        W = X + 0.5 * torch.roll(X, 1, dims=-1)
        return G - _dot(X, G) / _dot(X, W) * W


@dataclasses.dataclass(frozen=True)
class RetractAdd(gf.Sphere):
    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        return X + V


@dataclasses.dataclass(frozen=True)
class NaiveSincChart(gf.Sphere):
    """The exponential chart with ``t = sqrt(‖v‖²)``: right values, NaN derivatives at ``Z = 0``
    (``d sqrt(s)/ds`` is inf at ``s = 0``, times a zero)."""

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        U = _unit(base) if base is not None else (torch.arange(Z.shape[-1]) == 0).to(Z.dtype)
        V = Z - _dot(Z, U) * U
        t = torch.sqrt(_dot(V, V))
        return self.radius * (torch.cos(t) * U + torch.sinc(t / math.pi) * V)


@dataclasses.dataclass(frozen=True)
class SampleGlobalRNG(gf.Sphere):
    def sample(self, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
        return self.project(torch.randn(self._sample_shape(shape), dtype=dtype, device=device))


@dataclasses.dataclass(frozen=True)
class NaNToNum(gf.Sphere):
    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        return super().to_manifold(torch.nan_to_num(Z), base)


@dataclasses.dataclass(frozen=True)
class RebaseForgets(gf.Sphere):
    """``rebase`` keeps the base and drops ``Z``: the point moves back to the chart centre."""

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        return torch.zeros_like(Z), base


@dataclasses.dataclass(frozen=True)
class FromManifoldNoBase(gf.Sphere):
    """``from_manifold(X) = (X, None)``: a raw tensor in the canonical chart, not a right inverse."""

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return X, None


@dataclasses.dataclass(frozen=True)
class ContainsAlways(gf.Sphere):
    def contains(self, X: Tensor, atol: float | None = None) -> Tensor:
        return torch.ones(X.shape[:-1], dtype=torch.bool)


@dataclasses.dataclass(frozen=True)
class IntegerTypeError(gf.Sphere):
    """An integer raw tensor raises TypeError instead of ManifoldError."""

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        if not Z.dtype.is_floating_point:
            raise TypeError(f"to_manifold needs a floating tensor, got {Z.dtype}")
        return super().to_manifold(Z, base)


def _sphere_case(space: gf.Sphere, **kw: Any) -> SpaceCase:
    return SpaceCase(
        type(space).__name__,
        space,
        shapes=((2, 4),),
        member=_on_unit_sphere,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        dtypes=(f64,),
        **kw,
    )


@contextlib.contextmanager
def _global_rng_kept():
    # SampleGlobalRNG draws from the global RNG: leave its state as it was for other tests.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _linearized(X: Tensor, V: Tensor) -> Tensor:
    return _dot(X, V)


# (id, broken space, check that must catch it, message match, extra case fields)
BROKEN: list[tuple[str, type, Callable[..., None], str, dict]] = [
    ("tangent-identity", TangentIdentity, check_tangent, r"tangent vectors are not tangent.*expected t\^2", {}),
    ("tangent-identity-linearized", TangentIdentity, check_tangent, "violate the linearized constraint",
     {"linearized": _linearized}),
    ("tangent-not-self-adjoint", TangentOblique, check_tangent, "tangent is not self-adjoint", {}),
    ("retract-off-manifold", RetractAdd, check_retract, r"retract\(X, 0\.1 V\) is not on the space", {}),
    ("naive-sinc-gradcheck", NaiveSincChart, check_gradcheck, "gradcheck of to_manifold at Z = 0 failed", {}),
    ("naive-sinc-jacobians", NaiveSincChart, check_jacobians, "jacfwd of to_manifold at Z = 0 is not finite", {}),
    ("sample-global-rng", SampleGlobalRNG, check_sample, "two samples from generators with the same seed differ", {}),
    ("nan-to-num", NaNToNum, check_nan, r"to_manifold\(NaN\) has points without NaN", {}),
    ("rebase-moves-point", RebaseForgets, check_rebase,
     r"to_manifold\(\*rebase\(Z, base\)\) != to_manifold\(Z, base\)", {}),
    ("from-manifold-not-right-inverse", FromManifoldNoBase, check_from_manifold,
     r"to_manifold\(\*from_manifold\(X\)\) != X", {}),
    ("contains-always-true", ContainsAlways, check_contains, "contains is True on a NaN tensor", {}),
    ("bad-input-type-error", IntegerTypeError, check_bad_input,
     r"to_manifold\(integer tensor.*\) raised TypeError instead of ManifoldError", {}),
]


@pytest.mark.parametrize(("cls", "check", "match", "kw"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_variant_is_caught(cls, check, match, kw) -> None:
    broken = _sphere_case(cls(), **kw)
    with _global_rng_kept(), pytest.raises(AssertionError, match=match) as info:
        check(broken, f64)
    assert cls.__name__ in str(info.value)  # the message names the case
    # The control: the same check on the same case with the unbroken Sphere passes.
    check(_sphere_case(gf.Sphere(), **kw), f64)


def test_broken_variants_are_frozen_spheres() -> None:
    for _, cls, *_ in BROKEN:
        space = cls()
        assert dataclasses.is_dataclass(space) and isinstance(space, gf.Sphere)
        with pytest.raises(dataclasses.FrozenInstanceError):
            space.radius = 2.0  # type: ignore[misc]
        assert space == cls() and hash(space) == hash(cls())
