"""Self-test of the public conformance harness ``geofunc.testing``.

Three parts, so the harness cannot silently rot into checks that cannot fail:

* a space written here, outside the library, from the public protocol only, passes
  ``check_space`` (a user can check their own space);
* deliberately broken variants of ``gf.Sphere`` (each replacing ONE method, patched in for
  the test only) are each caught by the property meant to catch them, with a message naming
  the defect; the unbroken ``gf.Sphere`` passes the same check on the same case (the
  control), so the failure is the defect's and not the case's;
* the wrong geometries of issue 12 (a tangent projection onto part of the tangent space, the
  Stiefel tangent for the Grassmannian, a QR "projection", a reflecting PSSD projection, a
  loosened default tolerance, a sampler confined to an orthant), each patched into the
  library, are caught by the conformance property of ``tests/cases.py`` that the suite runs
  on those spaces (and that property passes without the mutant).

Mutants replace a method on the class (``unittest.mock.patch.object``) for the duration of
one check: concrete spaces are final, so a mutant is never a subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import reference as ref
import torch
from cases import CASES
from conftest import SEED

import geofunc as gf
import geofunc.spaces._base as space_base
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
        dim=ref.dim_sphere,
        perturb=ref.perturb_norm,
        moments=ref.moments_sphere(1.0),
    )


def test_user_space_passes_check_space() -> None:
    check_space(_user_case((f64,)))


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if not p.float64_only], ids=lambda p: p.name)
def test_user_space_passes_float32_properties(prop) -> None:
    case = _user_case((torch.float32,))
    assert prop.dtypes(case) == (torch.float32,)
    prop.fn(case, torch.float32)


# --------------------------------------------------------------- broken variants of Sphere
_SPHERE_TO_MANIFOLD = gf.Sphere.to_manifold
_SPHERE_SAMPLE = gf.Sphere.sample


def _tangent_identity(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``G`` unchanged: linear, idempotent, self-adjoint, but not tangent."""
    return G


def _tangent_oblique(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """An oblique projection onto the tangent space, ``G − ⟨X, G⟩ w / ⟨X, w⟩`` with ``w`` not
    parallel to ``X``: its image is tangent and it is idempotent and linear, but not self-adjoint."""
    W = X + 0.5 * torch.roll(X, 1, dims=-1)
    return G - _dot(X, G) / _dot(X, W) * W


def _retract_add(self: Any, X: Tensor, V: Tensor) -> Tensor:
    return X + V


def _naive_sinc_chart(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """The exponential chart with ``t = sqrt(‖v‖²)``: right values, NaN derivatives at ``Z = 0``
    (``d sqrt(s)/ds`` is inf at ``s = 0``, times a zero)."""
    U = _unit(base) if base is not None else (torch.arange(Z.shape[-1]) == 0).to(Z.dtype)
    V = Z - _dot(Z, U) * U
    t = torch.sqrt(_dot(V, V))
    return self.radius * (torch.cos(t) * U + torch.sinc(t / math.pi) * V)


def _sample_global_rng(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    return self.project(torch.randn(self._sample_shape(shape), dtype=dtype, device=device))


def _nan_to_num(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    return _SPHERE_TO_MANIFOLD(self, torch.nan_to_num(Z), base)


def _rebase_forgets(self: Any, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
    """Keeps the base and drops ``Z``: the point moves back to the chart centre."""
    return torch.zeros_like(Z), base


def _from_manifold_no_base(self: Any, X: Tensor) -> tuple[Tensor, Any]:
    """``(X, None)``: a raw tensor in the canonical chart, not a right inverse."""
    return X, None


def _contains_always(self: Any, X: Tensor, atol: float | None = None) -> Tensor:
    return torch.ones(X.shape[:-1], dtype=torch.bool)


def _integer_type_error(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """An integer raw tensor raises TypeError instead of ManifoldError."""
    if not Z.dtype.is_floating_point:
        raise TypeError(f"to_manifold needs a floating tensor, got {Z.dtype}")
    return _SPHERE_TO_MANIFOLD(self, Z, base)


def _sphere_case(name: str, **kw: Any) -> SpaceCase:
    return SpaceCase(
        name,
        gf.Sphere(),
        shapes=((2, 4),),
        member=_on_unit_sphere,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
        dtypes=(f64,),
        **kw,
    )


@contextlib.contextmanager
def _global_rng_kept():
    # The global-RNG mutant draws from the global RNG: leave its state as it was for other tests.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _linearized(X: Tensor, V: Tensor) -> Tensor:
    return _dot(X, V)


# (id, method of gf.Sphere, broken replacement, check that must catch it, message match, extra case fields)
BROKEN: list[tuple[str, str, Callable[..., Any], Callable[..., None], str, dict]] = [
    ("tangent-identity", "tangent", _tangent_identity, check_tangent, r"tangent vectors are not tangent.*expected t\^2", {}),
    ("tangent-identity-linearized", "tangent", _tangent_identity, check_tangent, "violate the linearized constraint",
     {"linearized": _linearized}),
    ("tangent-not-self-adjoint", "tangent", _tangent_oblique, check_tangent, "tangent is not self-adjoint", {}),
    ("retract-off-manifold", "retract", _retract_add, check_retract, r"retract\(X, 0\.1 V\) is not on the space", {}),
    ("naive-sinc-gradcheck", "to_manifold", _naive_sinc_chart, check_gradcheck, "gradcheck of to_manifold at Z = 0 failed", {}),
    ("naive-sinc-jacobians", "to_manifold", _naive_sinc_chart, check_jacobians, "jacfwd of to_manifold at Z = 0 is not finite", {}),
    ("sample-global-rng", "sample", _sample_global_rng, check_sample, "two samples from generators with the same seed differ", {}),
    ("nan-to-num", "to_manifold", _nan_to_num, check_nan, r"to_manifold\(NaN\) has points without NaN", {}),
    ("rebase-moves-point", "rebase", _rebase_forgets, check_rebase,
     r"to_manifold\(\*rebase\(Z, base\)\) != to_manifold\(Z, base\)", {}),
    ("from-manifold-not-right-inverse", "_from_manifold", _from_manifold_no_base, check_from_manifold,
     r"to_manifold\(\*from_manifold\(X\)\) != X", {}),
    ("contains-always-true", "contains", _contains_always, check_contains, "contains is True on a NaN tensor", {}),
    ("bad-input-type-error", "to_manifold", _integer_type_error, check_bad_input,
     r"to_manifold\(integer tensor.*\) raised TypeError instead of ManifoldError", {}),
]


@pytest.mark.parametrize(("method", "broken", "check", "match", "kw"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_variant_is_caught(method, broken, check, match, kw, request) -> None:
    name = request.node.callspec.id
    with _global_rng_kept(), mock.patch.object(gf.Sphere, method, broken), \
            pytest.raises(AssertionError, match=match) as info:
        check(_sphere_case(name, **kw), f64)
    assert name in str(info.value)  # the message names the case
    # The control: the same check on the same case with the unbroken Sphere passes.
    check(_sphere_case(name, **kw), f64)


# ---------------------------------------------------------- the wrong geometries of issue 12
def _zero_tangent(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``SO.tangent → 0·G``: linear, idempotent, self-adjoint, tangent, and useless."""
    return 0.0 * G


def _left_tangent(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """The rank family's tangent cut to ``U UᵀG`` (``U`` the top-``rank`` left singular vectors):
    a projection onto part of the fixed-rank tangent space ``P_U G + G P_V − P_U G P_V``."""
    tr = X.shape[-2] < X.shape[-1]
    Xt, Gt = (X.mT, G.mT) if tr else (X, G)
    U = torch.linalg.svd(Xt, full_matrices=False)[0][..., : self.rank]
    out = U @ (U.mT @ Gt)
    return out.mT if tr else out


def _stiefel_tangent(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``Grassmannian.tangent → Stiefel.tangent``: ``XᵀV + VᵀX = 0``, not the horizontal ``XᵀV = 0``."""
    return gf.Stiefel().tangent(X, G)


def _qr_project(self: Any, Y: Tensor) -> Tensor:
    """``Stiefel.project`` by QR (positive diagonal R): a frame, not the nearest one (the polar factor)."""
    tr = Y.shape[-2] < Y.shape[-1]
    Yt = Y.mT if tr else Y
    Q, R = torch.linalg.qr(Yt)
    d = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) >= 0, 1.0, -1.0).to(Y.dtype)
    Q = Q * d.unsqueeze(-2)
    return Q.mT if tr else Q


def _reflecting_project(self: Any, Y: Tensor) -> Tensor:
    """``PSSD``/``PSSDLowRank.project`` with the kept eigenvalues reflected (``|λ|``) instead of
    clipped at 0: PSD of the right rank, not the nearest."""
    n = Y.shape[-1]
    r = getattr(self, "rank", n)
    lam, Q = torch.linalg.eigh(0.5 * (Y + Y.mT))
    top = torch.arange(n) >= n - r
    g = torch.where(top, lam.abs(), torch.zeros_like(lam))
    return (Q * g.unsqueeze(-2)) @ Q.mT


def _positive_orthant_sample(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    """``Sphere.sample`` confined to the positive orthant: on the sphere, reproducible, not uniform."""
    return _SPHERE_SAMPLE(self, shape, generator=generator, dtype=dtype, device=device).abs()


def _patch(*targets: tuple[Any, str, Any]) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def ctx():
        with contextlib.ExitStack() as stack:
            for owner, name, value in targets:
                stack.enter_context(mock.patch.object(owner, name, value))
            yield

    return ctx


def _loose_tolerance():
    """The default membership tolerance loosened 10⁴× in float64 and 10× in float32."""
    return mock.patch.dict(space_base._ATOL, {f64: 1e-5, torch.float32: 1e-3})


# (id, the mutant as a context manager factory, [(case id, property, dtype)] that must catch it, message match)
MUTANTS: list[tuple[str, Callable[[], Any], list[tuple[str, str, torch.dtype]], str]] = [
    ("SO.tangent-zero", _patch((gf.SO, "tangent", _zero_tangent)),
     [("SO", "tangent_space", f64), ("SO-cayley", "tangent_space", f64)],
     "does not fix the image of the chart's differential"),
    ("rank-tangent-left-only", _patch((gf.LowRank, "tangent", _left_tangent), (gf.FixedRank, "tangent", _left_tangent)),
     [("LowRank-1", "tangent_space", f64), ("LowRank-2", "tangent_space", f64), ("FixedRank-1", "tangent_space", f64),
      ("FixedRank-2", "tangent_space", f64)],
     "does not fix the image of the chart's differential"),
    ("Grassmannian.tangent-is-Stiefel's", _patch((gf.Grassmannian, "tangent", _stiefel_tangent)),
     [("Grassmannian", "tangent_space", f64)], r"tangent projection at .* has rank \d+, expected dim M"),
    ("Grassmannian.tangent-is-Stiefel's-linearized", _patch((gf.Grassmannian, "tangent", _stiefel_tangent)),
     [("Grassmannian", "tangent", f64), ("Grassmannian", "tangent", torch.float32)],
     "violate the linearized constraint"),
    ("Stiefel.project-by-QR", _patch((gf.Stiefel, "project", _qr_project)),
     [("Stiefel", "project_nearest", f64), ("Stiefel-cayley", "project_nearest", f64)],
     "project is not the nearest point"),
    ("Stiefel.project-by-QR-first-order", _patch((gf.Stiefel, "project", _qr_project)),
     [("Stiefel", "project_normal", f64)], "is not normal to the tangent space"),
    ("PSSD.project-reflects", _patch((gf.PSSD, "project", _reflecting_project),
                                      (gf.PSSDLowRank, "project", _reflecting_project)),
     [("PSSD", "project_nearest", f64), ("PSSDLowRank-1", "project_nearest", f64),
      ("PSSDLowRank-2", "project_nearest", f64)],
     "project is not the nearest point"),
    ("default-tolerance-loosened", _loose_tolerance,
     [(case, "membership", dtype) for case in ("Sphere", "Oblique", "SO", "Stiefel", "LowRank-2", "PSSD", "Sym")
      for dtype in (f64, torch.float32)],
     "the tolerance is looser than documented"),
    ("Sphere.sample-positive-orthant", _patch((gf.Sphere, "sample", _positive_orthant_sample)),
     [("Sphere", "sample_distribution", f64), ("Sphere-r2.5", "sample_distribution", f64)],
     "not the documented distribution"),
]

_CASES = {case.id: case for case in CASES}
_PROPS = {p.name: p for p in PROPERTIES}


def _run(case_id: str, prop: str, dtype: torch.dtype) -> None:
    case = _CASES[case_id]
    assert dtype in _PROPS[prop].dtypes(case), f"{prop} does not run on {case_id} in {dtype}: the suite would not catch it"
    _PROPS[prop].fn(case, dtype, generator=torch.Generator().manual_seed(SEED))


@pytest.mark.parametrize(("mutant", "targets", "match"), [m[1:] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_issue_12_mutant_is_caught(mutant, targets, match) -> None:
    for case_id, prop, dtype in targets:
        with mutant(), pytest.raises(AssertionError, match=match):
            _run(case_id, prop, dtype)
        _run(case_id, prop, dtype)  # the control: the same test passes without the mutant


def test_mutants_leave_the_classes_as_they_were() -> None:
    """Patching is undone: no mutant leaks into the other tests."""
    before = {(cls, name): cls.__dict__.get(name) for cls in (gf.Sphere, gf.SO, gf.LowRank, gf.FixedRank,
                                                            gf.Grassmannian, gf.Stiefel, gf.PSSD, gf.PSSDLowRank)
              for name in ("tangent", "project", "sample", "to_manifold", "retract", "rebase", "contains")}
    atol = dict(space_base._ATOL)
    for _, mutant, _, _ in MUTANTS:
        with mutant():
            pass
    for _, method, broken, _, _, _ in BROKEN:
        with mock.patch.object(gf.Sphere, method, broken):
            pass
    assert {k: k[0].__dict__.get(k[1]) for k in before} == before
    assert dict(space_base._ATOL) == atol


def test_size_blind_tolerance_is_caught() -> None:
    """A default tolerance that forgets its documented √(size/64) growth fails the large-size
    membership test of tests/test_conformance.py (which passes without the mutant)."""
    import dataclasses

    from geofunc.testing import check_membership

    case = dataclasses.replace(_CASES["Sphere"], shapes=((3, 1024),))
    blind = mock.patch.object(space_base, "default_atol", lambda dtype, size=1: space_base._ATOL[dtype])
    for dtype in (f64, torch.float32):
        with blind, pytest.raises(AssertionError, match="contains refuses"):
            check_membership(case, dtype, generator=torch.Generator().manual_seed(SEED))
        check_membership(case, dtype, generator=torch.Generator().manual_seed(SEED))
