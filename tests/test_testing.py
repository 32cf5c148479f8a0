"""Self-test of the public conformance harness ``geofunc.testing``.

Four parts, so the harness cannot silently rot into checks that cannot fail:

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
  on those spaces (and that property passes without the mutant);
* the gaps a fuzz pass found (``GAPS``: a wrong metric, an input changed in place, a retraction
  wrong only for small steps, maps that do not vmap or compile, inf turned into a point, a dtype
  changed on the way), each a mutant that the harness before them passed in full (checked
  against that harness; here its checks of the broken map are run) and that one of the newer
  properties catches (and those of a second pass: a retraction off the space at large steps, a
  transport not linear, a verdict of ``contains``/``check`` for a whole batch, a map or sampler wrong
  in float32 only, repeated samples, a size-blind tolerance, a ``project`` that is not the nearest
  point behind a retraction through it, a membership measure blind to part of the constraint); and
  ``check_space``'s report of what did not run, and the context an unexpected exception gets.

Mutants replace a method on the class (``unittest.mock.patch.object``) for the duration of
one check: concrete spaces are final, so a mutant is never a subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import re
import warnings
from collections.abc import Callable
from typing import Any
from unittest import mock

import helpers
import pytest
import reference as ref
import torch
from cases import CASES
from conftest import SEED

import geofunc as gf
import geofunc.spaces._base as space_base
from geofunc import hyperbolic as hyp
from geofunc._linalg import poison
from geofunc.spaces._base import AbstractSpace
from geofunc.spaces._sphere import sphere_tangent
from geofunc.testing import (
    PROPERTIES,
    IncompleteCaseWarning,
    SpaceCase,
    check_bad_input,
    check_contains,
    check_from_manifold,
    check_gradcheck,
    check_jacobians,
    check_membership,
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


_CLOSED_FORMS = {"dist": "needs the space to implement dist", "expmap": "needs the space to implement expmap",
                 "expmap_geodesic": "needs the space to implement expmap and dist",
                 "logmap": "needs the space to implement logmap and expmap",
                 "logmap_dist": "needs the space to implement logmap and dist",
                 "sqdist": "needs the space to implement logmap and dist"}
_TRANSPORTS = {"transport_isometry": "needs case.transport = 'isometric' or 'parallel'",
               "transport_parallel": "needs case.transport = 'parallel' and the space to implement expmap and logmap"}


def test_user_space_passes_check_space() -> None:
    report = check_space(_user_case((f64,)))
    assert not report.incomplete  # (a warning would fail the test too)
    f32_only = "runs in torch.float32 only, which is not in case.dtypes"
    compile_maps = "needs compile_aot in case.skip (compile_aot traces the same maps, through Dynamo and then AOT autograd)"
    assert report.skipped == {"logabsdet": "needs case.has_logabsdet", "grad_float32": f32_only,
                              "float32_maps": f32_only, "sample_distribution_f32": f32_only, **_CLOSED_FORMS, **_TRANSPORTS,
                              "compile_maps": compile_maps}
    assert {name for name, _ in report.ran} == {p.name for p in PROPERTIES} - set(report.skipped)


@dataclasses.dataclass(frozen=True)
class GeodesicSphere(ProjectiveChartSphere):
    """:class:`ProjectiveChartSphere` with the closed forms of the unit sphere: ``dist`` (the angle,
    by ``atan2``: accurate for nearby points), ``expmap``, ``logmap`` and the parallel transport along
    the geodesic. Its retraction stays the normalization, which is not ``expmap``: a positively
    curved space whose ``retract`` is only a retraction."""

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        c = _dot(X, Y)
        return torch.atan2(torch.linalg.vector_norm(Y - c * X, dim=-1), c.squeeze(-1))

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        t = _norm(V)
        return _unit(torch.cos(t) * X + torch.sinc(t / math.pi) * V)

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        U = Y - _dot(X, Y) * X  # ‖U‖ = sin θ
        return U / torch.sinc(self.dist(X, Y).unsqueeze(-1) / math.pi)

    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """``V − ⟨Y, V⟩/(1 + ⟨X, Y⟩) (X + Y)`` (not at antipodes)."""
        return V - _dot(Y, V) / (1.0 + _dot(X, Y)) * (X + Y)


def test_user_space_with_closed_forms_passes_them() -> None:
    """A user's space that implements ``dist``, ``expmap``, ``logmap`` and the parallel transport (and
    says so, ``case.transport``) runs (and passes) the properties of the closed forms and of the
    transport; mutants of it with ``dist`` halved, or the transport by projection, fail."""
    case = dataclasses.replace(_user_case((f64,)), id="GeodesicSphere", space=GeodesicSphere(), transport="parallel")
    smooth = [p for p in _CLOSED_FORMS if p != "sqdist"]
    report = check_space(case, properties=("metric", "retract_small_steps", *smooth, *_TRANSPORTS))
    assert not report.skipped
    assert {name for name, _ in report.ran} == {"metric", "retract_small_steps", *smooth, *_TRANSPORTS}
    # its logarithm goes through norms (U / sinc(θ/π), θ = atan2(‖Y − cX‖, c)): first derivatives are
    # right, but double backward at Y = X is NaN, which the squared distance's property reports
    with pytest.raises(AssertionError, match="GeodesicSphere.*second derivative of sqdist"):
        check_space(case, properties=("sqdist",))
    with mock.patch.object(GeodesicSphere, "transport", lambda self, X, Y, V: self.tangent(Y, V)), \
            pytest.raises(AssertionError, match="GeodesicSphere.*transport is not an isometry"):
        check_space(case, properties=("transport_isometry",))
    with pytest.raises(ValueError, match="transport"):
        dataclasses.replace(case, transport="isometry")
    dist = GeodesicSphere.dist
    with mock.patch.object(GeodesicSphere, "dist", lambda self, X, Y: 0.5 * dist(self, X, Y)), \
            pytest.raises(AssertionError, match="GeodesicSphere.*dist does not agree with the metric"):
        check_space(case, properties=("dist",))


def test_a_dist_that_is_no_distance_along_a_curve_fails() -> None:
    """``dist = θ + θ³`` (θ the angle) is symmetric, positive, the metric's to first order and keeps the
    triangle inequality on random triples of the sphere; it breaks it on the (near) collinear triples
    ``X, retract(X, V/2), retract(X, V)``, which ``check_dist`` now also tries (it passed before)."""
    case = dataclasses.replace(_user_case((f64,)), id="GeodesicSphere", space=GeodesicSphere(), transport="parallel")
    dist = GeodesicSphere.dist
    check_space(case, properties=("dist",))
    with mock.patch.object(GeodesicSphere, "dist", lambda self, X, Y: dist(self, X, Y) + dist(self, X, Y) ** 3), \
            pytest.raises(AssertionError, match="GeodesicSphere.*triangle inequality along a retraction curve"):
        check_space(case, properties=("dist",))


def test_a_closed_form_that_raises_fails() -> None:
    """A space whose class overrides ``dist`` is checked, and a ``ManifoldError`` from its override
    fails the property with the context of an unexpected exception: it is not taken for "not
    implemented" (only ``AbstractSpace.dist`` is), so it does not pass silently."""
    case = dataclasses.replace(_CASES["Stiefel"], id="dist-raises", dtypes=(f64,))  # (the spheres have dist)
    assert check_space(case, properties=("dist",)).skipped == {"dist": "needs the space to implement dist"}

    def dist_raises(self: Any, X: Tensor, Y: Tensor) -> Tensor:
        raise gf.ManifoldError(f"{self!r}: dist has no closed form implemented for this space.")

    with mock.patch.object(gf.Stiefel, "dist", dist_raises, create=True), \
            pytest.raises(AssertionError, match=r"\[dist-raises = Stiefel\(triv='expm'\), shape \([0-9, ]*\), "
                          r"torch\.float64\] property 'dist' raised ManifoldError") as info:
        check_space(case, properties=("dist",))
    assert isinstance(info.value.__cause__, gf.ManifoldError)


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


def _sample_global_rng_too(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    """The generator's draw, plus a draw of the global RNG (a tie-break, a dropout mask) that changes nothing."""
    X = _SPHERE_SAMPLE(self, shape, generator=generator, dtype=dtype, device=device)
    return X + 0 * torch.rand(())


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


_SPHERE_CONTAINS = gf.Sphere.contains
_SPHERE_CHECK = gf.Sphere.check


def _contains_default_atol(self: Any, X: Tensor, atol: float | None = None) -> Tensor:
    """An explicit ``atol`` ignored: the default tolerance always (right for ``atol=None``)."""
    return _SPHERE_CONTAINS(self, X)


def _check_default_atol(self: Any, X: Tensor, atol: float | None = None) -> None:
    return _SPHERE_CHECK(self, X)


def _integer_type_error(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """An integer raw tensor raises TypeError instead of ManifoldError."""
    if not Z.dtype.is_floating_point:
        raise TypeError(f"to_manifold needs a floating tensor, got {Z.dtype}")
    return _SPHERE_TO_MANIFOLD(self, Z, base)


def _contiguous_read_chart(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """The chart of ``Z``'s storage read as if ``Z`` were contiguous: what a hand-written kernel that
    indexes memory by the shape alone computes (right for contiguous ``Z``)."""
    strides = [1] * Z.ndim
    for d in range(Z.ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * Z.shape[d + 1]
    return _SPHERE_TO_MANIFOLD(self, Z.as_strided(Z.shape, strides, Z.storage_offset()), base)


def _expanded_shortcut_chart(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """For a raw batch that is one vector expanded (stride 0), one chart call expanded over the batch:
    a shortcut that forgets that the bases differ (right for contiguous ``Z``)."""
    if Z.ndim > 1 and Z.shape[0] > 1 and Z.stride(0) == 0:
        return _SPHERE_TO_MANIFOLD(self, Z[:1], None if base is None else base[:1]).expand_as(Z)
    return _SPHERE_TO_MANIFOLD(self, Z, base)


def _nan_when_not_contiguous_chart(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """NaN for a raw tensor that is not contiguous (a fast path that reads it wrongly into NaN)."""
    X = _SPHERE_TO_MANIFOLD(self, Z, base)
    return X if Z.is_contiguous() else X * math.nan


def _sphere_case(name: str, **kw: Any) -> SpaceCase:
    kw.setdefault("dtypes", (f64,))
    return SpaceCase(
        name,
        gf.Sphere(),
        shapes=((2, 4),),
        member=_on_unit_sphere,
        rebase_zeroes=True,
        off_manifold=lambda X: 1.5 * X,
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
    ("sample-global-rng-too", "sample", _sample_global_rng_too, check_sample, "drew from the global RNG too", {}),
    ("nan-to-num", "to_manifold", _nan_to_num, check_nan, r"to_manifold\(NaN\) has points without NaN", {}),
    ("rebase-moves-point", "rebase", _rebase_forgets, check_rebase,
     r"to_manifold\(\*rebase\(Z, base\)\) != to_manifold\(Z, base\)", {}),
    ("from-manifold-not-right-inverse", "_from_manifold", _from_manifold_no_base, check_from_manifold,
     r"to_manifold\(\*from_manifold\(X\)\) != X", {}),
    ("contains-always-true", "contains", _contains_always, check_contains, "contains is True on a NaN tensor", {}),
    ("contains-ignores-atol", "contains", _contains_default_atol, check_membership,
     r"contains\(Y, atol=.*\) accepts .*the explicit atol is not the tolerance", {"perturb": ref.perturb_norm}),
    ("check-ignores-atol", "check", _check_default_atol, check_membership,
     r"check\(Y, atol=.*\) passes .*the explicit atol is not the tolerance", {"perturb": ref.perturb_norm}),
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
    ("SO.retract-carries-its-base-point", _patch((gf.SO, "retract", lambda self, X, V: X @ torch.linalg.matrix_exp(
        0.5 * (X.mT @ V - V.mT @ X)))),
     [("SO", "retract_refines", f64), ("SO-cayley", "retract_refines", f64)], "carries its base point's error"),
    ("one-result-for-the-batch", _patch((space_base.AbstractSpace, "_over_batch", lambda self, out, *args, point=True: out)),
     [("Sphere", "broadcast", f64), ("Sym", "broadcast", f64), ("Rn", "broadcast", f64), ("Stiefel-canonical", "broadcast", f64)],
     r"returned shape .*expected \(3,"),
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


# ------------------------------------------------------------ the gaps of the fuzz pass
# A fuzz pass of 84 broken spaces found 26 that the harness passed: a wrong metric, an input
# changed in place, a retraction wrong only for small steps, maps other than to_manifold that do
# not vmap or compile, inf input turned into a point, a dtype changed on the way. Each mutant
# below is one of those defects. Every one passes the whole harness as it was before the
# properties that catch it (every property of the earlier PROPERTIES, in every dtype of its case;
# checked once against that harness's code); here the earlier checks of the broken map are run
# with it (`passes`: `vmap` only where the earlier vmap check passes too, since `vmap` now also
# covers the metric and logabsdet), and the property named must catch it with the message matched.
_SPHERE_TANGENT = gf.Sphere.tangent
_SPHERE_RETRACT = gf.Sphere.retract
_SPHERE_PROJECT = gf.Sphere.project
_SPHERE_CHECK = gf.Sphere.check
_POINCARE_EGRAD = gf.PoincareBall.egrad_to_rgrad
_GLP_LOGABSDET = gf.GLp.logabsdet


def _norm(A: Tensor) -> Tensor:
    return torch.linalg.vector_norm(A, dim=-1, keepdim=True)


def _rgrad_unprojected(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``Sphere.egrad_to_rgrad → G``: ``⟨G, V⟩`` is right on tangent ``V``, but ``G`` is not tangent."""
    return G


def _rgrad_embedded(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``PoincareBall.egrad_to_rgrad → tangent(X, G)``: the embedded default, without ``1/λ²``."""
    return self.tangent(X, G)


def _inner_euclidean(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """The Euclidean product in place of the space's metric (``λ²⟨U, V⟩``, ``⟨U, V⟩_L``)."""
    return (U * V).sum(-1)


def _transport_unmoved(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``Lorentz.transport → V``: the vector stays in ``T_X``."""
    return V + 0.0 * Y


def _transport_doubled(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``2·tangent(Y, V)``: in ``T_Y``, but ``transport(X, X, V) = 2V``."""
    return 2.0 * self.tangent(Y, V)


def _inner_negative(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    return -(U * V).sum(-1)


def _rgrad_negative(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """With :func:`_inner_negative`: the gradient identity holds for ``−⟨U, V⟩``, which is no metric."""
    return -self.tangent(X, G)


def _inner_not_symmetric(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    return (U * V).sum(-1) + 0.5 * (U * torch.roll(V, 1, dims=-1)).sum(-1)


def _inner_not_bilinear(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Symmetric and positive, not bilinear."""
    return (U * V).sum(-1) + 0.1 * (_norm(U) * _norm(V)).squeeze(-1)


def _tangent_in_place(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """Projects ``G`` in place where neither autograd nor a ``torch.func`` transform would object (saves
    an allocation), as the library's eager-only checks decide (``can_check``)."""
    self._check_pair(X, G, "G")
    if G.requires_grad or not space_base.can_check(G):
        return _SPHERE_TANGENT(self, X, G)
    return G.sub_((G * X).sum(-1, keepdim=True) * X / self.radius**2)


def _check_sanitizes_in_place(self: Any, X: Tensor, atol: float | None = None) -> None:
    """Sanitizes ``X`` in place before measuring it: a point's values stay as they were, its version
    counter moves (and a NaN tensor of the caller's becomes zeros)."""
    torch.nan_to_num_(X)
    _SPHERE_CHECK(self, X, atol)


def _project_in_place(self: Any, Y: Tensor) -> Tensor:
    """Normalizes ``Y`` in place and returns it."""
    self._check_shape(Y, "Y")
    return Y.div_(_norm(Y) / self.radius)


def _retract_dead_zone(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """Skips steps with ``0 < ‖V‖ < 1e-2``: right at 0 (value and jvp) and at large steps."""
    n = _norm(V)
    return torch.where((n > 0) & (n < 1e-2), X, _SPHERE_RETRACT(self, X, V))


def _retract_first_order_off(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """``normalize(X + V + ‖V‖ W)``, ``W`` a fixed tangent direction: off by ``O(‖V‖)``, invisible to
    the jvp at ``V = 0`` (torch differentiates ``‖tV‖`` to 0 there)."""
    self._check_pair(X, V, "V")
    W = self.tangent(X, torch.roll(X, 1, dims=-1))
    return _SPHERE_RETRACT(self, X, V + _norm(V) * W)


def _logabsdet_nan_guard(self: Any, Z: Tensor, base: Any = None) -> Tensor:
    """``GLp.logabsdet`` with a Python branch on a value (a NaN guard): right in eager mode, no
    ``vmap`` (``bool`` of a batched tensor) and no ``torch.compile(fullgraph=True)``."""
    if bool(torch.isnan(Z).any()):
        return torch.full(Z.shape[:-2], math.nan, dtype=Z.dtype)
    return _GLP_LOGABSDET(self, Z, base)


def _retract_graph_break(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """A call Dynamo cannot trace (an explicit graph break stands for it): vmaps, does not compile."""
    torch._dynamo.graph_break()
    return _SPHERE_RETRACT(self, X, V)


def _project_clamps(self: Any, Y: Tensor) -> Tensor:
    """Clamps huge input against overflow: NaN stays NaN, ``inf`` becomes a plausible point."""
    self._check_shape(Y, "Y")
    return _SPHERE_PROJECT(self, Y.clamp(-1e10, 1e10))


def _retract_clamps(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """Clips huge steps: ``retract(X, inf)`` becomes a plausible point."""
    self._check_pair(X, V, "V")
    return _SPHERE_RETRACT(self, X, V.clamp(-1e10, 1e10))


def _rgrad_zeroes_nan(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``PoincareBall.egrad_to_rgrad`` with NaN entries of ``G`` zeroed: a NaN gradient becomes a finite one."""
    return _POINCARE_EGRAD(self, X, torch.where(torch.isnan(G), torch.zeros_like(G), G))


def _rgrad_float32(self: Any, X: Tensor, G: Tensor) -> Tensor:
    return self.tangent(X, G).float()


def _tangent_default_dtype_weights(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """Weights made without ``dtype=``: float64 output for float32 input when the default is float64."""
    return _SPHERE_TANGENT(self, X, G) * torch.ones(X.shape[-1])


# The gaps of a second fuzz pass (92 mutants, 13 passed the harness): each caught by a newer check.
_SPHERE_TRANSPORT = gf.Sphere.transport
_SPHERE_CONTAINS = gf.Sphere.contains
_PSD_PROJECT = gf.PSD.project


def _retract_unnormalized_large(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """``X + V`` (off the sphere) for steps with ``‖V‖ > 5``: right at every step a unit tangent
    vector takes."""
    self._check_pair(X, V, "V")
    return torch.where(_norm(V) > 5.0, X + V, _SPHERE_RETRACT(self, X, V))


def _transport_quadratic(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """A term quadratic in ``V``, tangent at ``Y`` and zero at ``Y = X``: not linear."""
    return _SPHERE_TRANSPORT(self, X, Y, V) + 0.1 * _dot(V, V) * self.tangent(Y, X - Y)


def _contains_whole_batch(self: Any, X: Tensor, atol: float | None = None) -> Tensor:
    """One verdict for the whole batch (``all`` of its points), broadcast to the batch shape."""
    c = _SPHERE_CONTAINS(self, X, atol)
    return c.all().expand(c.shape) if c.ndim else c


def _check_whole_batch(self: Any, X: Tensor, atol: float | None = None) -> None:
    """Raises only when every point of the batch is off."""
    if not bool(_SPHERE_CONTAINS(self, X, atol).any()):
        _SPHERE_CHECK(self, X, atol)


def _sym_violations_unclamped(self: Any, X: Tensor) -> dict[str, Tensor]:
    """A relative measure without ``max(1, ·)``: 0/0 = NaN at ``X = 0``, the chart centre."""
    return {"max|X − Xᵀ| / max|X|": (X - X.mT).abs().amax((-2, -1)) / X.abs().amax((-2, -1))}


def _tangent_rank_deficient_float32(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """In float32 only, the projection onto a codimension-1 subspace of the tangent space (idempotent,
    self-adjoint, tangent: only ``tangent_space``'s rank test, in float64, would see it)."""
    P = _SPHERE_TANGENT(self, X, G)
    if X.dtype != torch.float32:
        return P
    W = _SPHERE_TANGENT(self, X, torch.roll(X, 1, dims=-1) + 0.3)
    W = W / _norm(W).clamp(min=1e-30)
    return P - _dot(P, W) * W


def _sample_pairs_repeated(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    """Points ``2i`` and ``2i + 1`` of the first batch dim are equal: each point is uniform, the batch
    is not independent."""
    X = _SPHERE_SAMPLE(self, shape, generator=generator, dtype=dtype, device=device)
    if X.ndim >= 3 and X.shape[0] >= 2:
        X = X[torch.arange(X.shape[0]) // 2 * 2]
    return X


def _sample_box_float32(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    """In float32 only, a normalized uniform box: not uniform on the sphere."""
    if dtype != torch.float32:
        return _SPHERE_SAMPLE(self, shape, generator=generator, dtype=dtype, device=device)
    X = 2 * torch.rand(self._sample_shape(shape), generator=generator, dtype=dtype) - 1
    return self.radius * _unit(X)


def _atol_size_blind(self: Any, X: Tensor, atol: float | None) -> float:
    """The default tolerance of a point of one entry at every size (no √(size/64) growth)."""
    return space_base.default_atol(X.dtype, 1) if atol is None else float(atol)


def _psd_project_floored(self: Any, Y: Tensor) -> Tensor:
    """Eigenvalues floored at ``1e-3`` instead of 0: a PSD point, not the nearest one. PSD's
    ``retract`` goes through ``project``, so ``project_nearest``'s retractions cannot find closer points."""
    P = _PSD_PROJECT(self, Y)
    Yf = torch.nan_to_num(Y, nan=0.0, posinf=0.0, neginf=0.0)
    L, Q = torch.linalg.eigh(0.5 * (Yf + Yf.mT))
    return (Q * L.clamp(min=1e-3).unsqueeze(-2)) @ Q.mT + 0.0 * P


def _stiefel_violations_norms_only(self: Any, X: Tensor) -> dict[str, Tensor]:
    """Measures the column norms only, not their orthogonality."""
    Xt = X if X.shape[-2] >= X.shape[-1] else X.mT
    return {"max|diag(XᵀX) − 1|": (torch.diagonal(Xt.mT @ Xt, dim1=-2, dim2=-1) - 1).abs().amax(-1)}


def _oblique_violations_mean(self: Any, X: Tensor) -> dict[str, Tensor]:
    """The mean over the columns instead of the worst column."""
    return {"mean_j |‖X[:, j]‖ − 1|": (torch.linalg.vector_norm(X, dim=-2) - 1).abs().mean(-1)}


# The gaps of the closed-form maps: the harness before check_dist, check_expmap(_geodesic) and
# check_logmap(_dist) never called dist, expmap or logmap (test_earlier_harness_never_calls_the_closed_forms),
# and it pinned the metric only by the agreement of inner and egrad_to_rgrad.
_LORENTZ_EXPMAP = gf.Lorentz.expmap
_POINCARE_DIST = gf.PoincareBall.dist


def _inner_conformal_lambda(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """``PoincareBall.inner`` with the conformal factor ``λ`` in place of ``λ²`` (``λ = 2/(1 − c‖x‖²)``)."""
    g = hyp._gap(X, self.c) + poison(X, ndim=1)
    return (2.0 * (U * V).sum(-1, keepdim=True) / g).squeeze(-1)


def _rgrad_conformal_lambda(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``G/λ``: the Riemannian gradient for :func:`_inner_conformal_lambda`, so the two agree (on a metric
    that is not the ball's, nor its ``dist``'s)."""
    g = hyp._gap(X, self.c) + poison(X, ndim=1)
    return 0.5 * g * G


def _expmap_doubled(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """``Lorentz.expmap(X, 2V)``: on the hyperboloid, ``expmap(X, 0) = X``, twice the speed."""
    return _LORENTZ_EXPMAP(self, X, 2.0 * V)


def _logmap_chord(self: Any, X: Tensor, Y: Tensor) -> Tensor:
    """``tangent(X, Y − X)``: tangent, 0 at ``Y = X``, right to first order, not the inverse of ``expmap``."""
    return self.tangent(X, Y - X)


def _dist_doubled(self: Any, X: Tensor, Y: Tensor) -> Tensor:
    """``2·dist``: a distance (zero on the diagonal, symmetric, triangle inequality), not the metric's."""
    return 2.0 * _POINCARE_DIST(self, X, Y)


_POINCARE_TRANSPORT = gf.PoincareBall.transport


def _transport_projected(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``Lorentz.transport`` as the protocol's default, the projection ``tangent(Y, V)``: a vector
    transport (linear, into ``T_Y``, the identity at ``Y = X``), not an isometry."""
    return self.tangent(Y, V)


def _transport_rotating(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``PoincareBall.transport`` followed by a rotation of the first two coordinates by ``dist(X, Y)``:
    linear, isometric (the metric at ``Y`` is a multiple of the Euclidean one), the identity at
    ``Y = X``, and not the parallel transport."""
    W = _POINCARE_TRANSPORT(self, X, Y, V)
    if W.shape[-1] < 2:
        return W
    t = self.dist(X, Y).unsqueeze(-1)
    c, s = torch.cos(t), torch.sin(t)
    w0, w1 = W[..., :1], W[..., 1:2]
    return torch.cat([c * w0 - s * w1, s * w0 + c * w1, W[..., 2:]], dim=-1)


# The gap of AOT autograd's tracing: check_compile_maps compiles the maps with backend="eager", so
# Dynamo's graph runs as is; a custom operator is opaque to Dynamo and its registered backward runs
# in eager autograd, where a Python branch on a value is fine. AOT autograd (backend="aot_eager",
# inductor) traces that backward with fake tensors, where it cannot branch: check_compile_aot.
@torch.library.custom_op("geofunc_test::sphere_tangent", mutates_args=())
def _sphere_tangent_op(X: Tensor, G: Tensor, radius: float) -> Tensor:
    return sphere_tangent(X, G, radius)


@_sphere_tangent_op.register_fake
def _(X: Tensor, G: Tensor, radius: float) -> Tensor:
    return torch.empty(torch.broadcast_shapes(X.shape, G.shape), dtype=torch.result_type(X, G), device=X.device)


def _sphere_tangent_op_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    X, G, ctx.radius = inputs
    ctx.save_for_backward(X, G)


def _sphere_tangent_op_backward(ctx: Any, C: Tensor) -> tuple[Tensor, Tensor, None]:
    """The exact vjp of ``G − ⟨G, X⟩X/r²``, with a shortcut for a zero cotangent (a frozen
    parameter's): a Python branch on a value."""
    X, G = ctx.saved_tensors
    if not bool(C.any()):
        return torch.zeros_like(X), torch.zeros_like(G), None
    r2 = ctx.radius**2
    gX = -(_dot(C, X) * G + _dot(G, X) * C) / r2
    gG = C - _dot(C, X) * X / r2
    return gX.sum_to_size(X.shape), gG.sum_to_size(G.shape), None


_sphere_tangent_op.register_autograd(_sphere_tangent_op_backward, setup_context=_sphere_tangent_op_setup)


def _tangent_custom_op(self: Any, X: Tensor, G: Tensor) -> Tensor:
    """``Sphere.tangent`` as the fused operator above in eager mode and inside ``torch.compile`` (as
    geofunc's exponential is), the composite under ``torch.func`` transforms (the operator has no
    forward-mode or vmap rule)."""
    self._check_pair(X, G, "G")
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        return sphere_tangent(X, G, self.radius)
    return _sphere_tangent_op(X, G, self.radius)


# The same gap for the maps compiled forward only (from_manifold, rebase: a training step compiled whole
# may re-centre its charts): an operator registered without a fake kernel runs in eager mode and under
# vmap (the composite there), and no earlier property compiled rebase.
_SPHERE_REBASE = gf.Sphere.rebase


@torch.library.custom_op("geofunc_test::sphere_rebase", mutates_args=())
def _sphere_rebase_op(Z: Tensor, base: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    Z2, base2 = _SPHERE_REBASE(gf.Sphere(radius=radius), Z, base)
    return Z2.clone(), base2.clone()


def _rebase_custom_op(self: Any, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
    """``Sphere.rebase`` as the operator above (no fake kernel) in eager mode and inside ``torch.compile``,
    the composite under ``torch.func`` transforms and without a base."""
    if base is None or (not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None):
        return _SPHERE_REBASE(self, Z, base)
    return _sphere_rebase_op(Z, base, self.radius)


# A map's value-only path inside torch.compile (grad mode off: Note [Compiled maps that nothing
# differentiates] in geofunc/_fastpath.py) is a graph of its own, the one a compiled optimizer update
# under no_grad runs; a mistake there passed every earlier property (they compile with grad mode on).
_SPHERE_RETRACT = gf.Sphere.retract


def _retract_wrong_compiled_without_grad(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """``Sphere.retract`` that inside ``torch.compile`` under ``no_grad`` forgets to normalize."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return X + V
    return _SPHERE_RETRACT(self, X, V)


def _with_perturb(case_id: str, perturb: Callable[..., Any]) -> Callable[[], SpaceCase]:
    return lambda: dataclasses.replace(_CASES[case_id], perturb=perturb)


# Maps of the right value whose gradient is 1.1× the true one (Note [Gradients of every map] in
# geofunc/testing/_properties.py): gradgradcheck, the only derivative check of project, passed such a
# project, and nothing differentiated egrad_to_rgrad, transport, dist or expmap.
def _steep(T: Tensor) -> Tensor:
    return T + 0.1 * (T - T.detach())


_POINCARE_EXPMAP = gf.PoincareBall.expmap
_POINCARE_INNER = gf.PoincareBall.inner


def _project_steep(self: Any, Y: Tensor) -> Tensor:
    return _steep(_SPHERE_PROJECT(self, Y))


def _rgrad_steep(self: Any, X: Tensor, G: Tensor) -> Tensor:
    return _steep(_POINCARE_EGRAD(self, X, G))


def _transport_steep(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    return _steep(_POINCARE_TRANSPORT(self, X, Y, V))


def _dist_steep(self: Any, X: Tensor, Y: Tensor) -> Tensor:
    return _steep(_POINCARE_DIST(self, X, Y))


def _expmap_steep(self: Any, X: Tensor, V: Tensor) -> Tensor:
    return _steep(_POINCARE_EXPMAP(self, X, V))


def _inner_steep(self: Any, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    return _steep(_POINCARE_INNER(self, X, U, V))


# Maps of the right value and first derivative whose second derivative in the base point is not theirs
# (Note [Second derivatives in the base] in geofunc/testing/_base_derivatives.py): gradcheck reads first
# derivatives, gradgradcheck runs tangent/retract/project only, nested_forward compares modes.
def _transport_curved(self: Any, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
    """``PoincareBall.transport`` plus ``0.1‖X − X₀‖² T₀``: zero in value and first derivative."""
    T = _POINCARE_TRANSPORT(self, X, Y, V)
    return T + 0.1 * ((X - X.detach()) ** 2).sum(-1, keepdim=True) * T.detach()


class _OnceDifferentiable(torch.autograd.Function):
    """``fn(X, V)`` with a backward computed from detached inputs: right first derivatives, a double
    backward that silently reads them as constants (what ``once_differentiable`` without the error does)."""

    @staticmethod
    def forward(ctx: Any, fn: Any, X: Tensor, V: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(X, V)
        return fn(X, V)

    @staticmethod
    def backward(ctx: Any, C: Tensor) -> tuple[None, Tensor, Tensor]:
        X, V = ctx.saved_tensors
        with torch.enable_grad():
            x, v = X.detach().requires_grad_(True), V.detach().requires_grad_(True)
            gx, gv = torch.autograd.grad(ctx.fn(x, v), (x, v), C.detach())
        return None, gx, gv


def _expmap_once_differentiable(self: Any, X: Tensor, V: Tensor) -> Tensor:
    """``PoincareBall.expmap`` as that Function in plain autograd (the op chain under torch.func, as an
    eager fast path)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return _POINCARE_EXPMAP(self, X, V)
    return _OnceDifferentiable.apply(lambda x, v: _POINCARE_EXPMAP(self, x, v), X, V)


def _sphere(name: str, **kw: Any) -> Callable[[], SpaceCase]:
    return lambda: _sphere_case(name, **kw)


def _builtin(case_id: str) -> Callable[[], SpaceCase]:
    return lambda: _CASES[case_id]


_LAMBDA_METRIC = [(gf.PoincareBall, "inner", _inner_conformal_lambda),
                  (gf.PoincareBall, "egrad_to_rgrad", _rgrad_conformal_lambda)]

# (id, [(class, method, replacement)], case, dtype, property that catches it, message match,
#  old properties of that map that pass with the mutant)
GAPS: list[tuple[str, list[tuple[Any, str, Any]], Callable[[], SpaceCase], torch.dtype, str, str, tuple[str, ...]]] = [
    ("Sphere.egrad_to_rgrad-unprojected", [(gf.Sphere, "egrad_to_rgrad", _rgrad_unprojected)], _sphere("m"), f64,
     "metric", r"egrad_to_rgrad\(X, G\) is not tangent", ("tangent", "vmap")),
    ("PoincareBall.egrad_to_rgrad-embedded", [(gf.PoincareBall, "egrad_to_rgrad", _rgrad_embedded)],
     _builtin("PoincareBall"), f64, "metric", "egrad_to_rgrad is not the gradient for inner", ("tangent",)),
    ("PoincareBall.inner-Euclidean", [(gf.PoincareBall, "inner", _inner_euclidean)], _builtin("PoincareBall"), f64,
     "metric", "egrad_to_rgrad is not the gradient for inner", ("tangent",)),
    ("Lorentz.inner-Euclidean", [(gf.Lorentz, "inner", _inner_euclidean)], _builtin("Lorentz"), f64,
     "metric", "egrad_to_rgrad is not the gradient for inner", ("tangent",)),
    ("Lorentz.transport-unmoved", [(gf.Lorentz, "transport", _transport_unmoved)], _builtin("Lorentz"), f64,
     "metric", r"transport\(X, Y, V\) is not tangent at Y", ("tangent",)),
    ("Sphere.transport-doubled", [(gf.Sphere, "transport", _transport_doubled)], _sphere("m"), f64,
     "metric", r"transport\(X, X, V\) != V", ("tangent",)),
    ("Sphere.inner-negative", [(gf.Sphere, "inner", _inner_negative), (gf.Sphere, "egrad_to_rgrad", _rgrad_negative)],
     _sphere("m"), f64, "metric", "inner is not positive on tangent vectors", ("tangent",)),
    ("Sphere.inner-not-symmetric", [(gf.Sphere, "inner", _inner_not_symmetric)], _sphere("m"), f64,
     "metric", "inner is not symmetric", ("tangent",)),
    ("Sphere.inner-not-bilinear", [(gf.Sphere, "inner", _inner_not_bilinear)], _sphere("m"), f64,
     "metric", "inner is not bilinear", ("tangent",)),
    ("Sphere.tangent-in-place", [(gf.Sphere, "tangent", _tangent_in_place)], _sphere("m"), f64,
     "pure", r"tangent\(X, G\) modified its input tensor #1 .* in place .*values changed",
     ("tangent", "tangent_space", "nan", "gradcheck")),
    ("Sphere.check-in-place", [(gf.Sphere, "check", _check_sanitizes_in_place)], _sphere("m"), f64,
     "pure", r"(from_manifold|check)\(X\) modified its input tensor #0 .* in place \(version 0 -> 1; values equal\)",
     ("check", "contains")),
    ("Sphere.project-in-place", [(gf.Sphere, "project", _project_in_place)], _sphere("m"), f64,
     "pure", r"project\(Y\) modified its input tensor #0 .*values changed", ("project", "project_nearest", "nan", "vmap")),
    ("Sphere.retract-dead-zone", [(gf.Sphere, "retract", _retract_dead_zone)], _sphere("m"), f64,
     "retract_small_steps", r"is not O\(t²\)", ("retract", "jvp_fd", "gradcheck", "project_nearest")),
    ("Sphere.retract-first-order-off", [(gf.Sphere, "retract", _retract_first_order_off)], _sphere("m"), f64,
     "retract_small_steps", r"is not O\(t²\)", ("retract", "jvp_fd", "gradcheck", "project_nearest")),
    ("GLp.logabsdet-branches-on-a-value", [(gf.GLp, "logabsdet", _logabsdet_nan_guard)], _builtin("GLp"), f64,
     "vmap", r"vmap of logabsdet\(Z, base\) failed", ("logabsdet", "compile")),
    ("GLp.logabsdet-branches-on-a-value-compile", [(gf.GLp, "logabsdet", _logabsdet_nan_guard)], _builtin("GLp"), f64,
     "compile_maps", r"torch.compile\(fullgraph=True\) of logabsdet failed", ("logabsdet", "compile")),
    ("Sphere.retract-graph-break", [(gf.Sphere, "retract", _retract_graph_break)], _sphere("m"), f64,
     "compile_maps", r"torch.compile\(fullgraph=True\) of retract failed", ("retract", "vmap", "compile")),
    ("Sphere.project-clamps-inf", [(gf.Sphere, "project", _project_clamps)], _sphere("m"), f64,
     "nonfinite", r"contains is True on project\(inf\)", ("project", "nan")),
    ("Sphere.retract-clips-inf", [(gf.Sphere, "retract", _retract_clamps)], _sphere("m"), f64,
     "nonfinite", r"contains is True on retract\(X, inf\)", ("retract", "nan")),
    ("PoincareBall.egrad_to_rgrad-zeroes-NaN", [(gf.PoincareBall, "egrad_to_rgrad", _rgrad_zeroes_nan)],
     _builtin("PoincareBall"), f64, "nonfinite", r"egrad_to_rgrad\(X, NaN\) has finite points", ("nan",)),
    ("Sphere.egrad_to_rgrad-float32", [(gf.Sphere, "egrad_to_rgrad", _rgrad_float32)], _sphere("m"), f64,
     "dtypes", r"egrad_to_rgrad\(X, G\) returned its result in torch.float32 .* for torch.float64 input", ("tangent",)),
    ("Sphere.tangent-default-dtype-weights", [(gf.Sphere, "tangent", _tangent_default_dtype_weights)],
     _sphere("m", dtypes=(torch.float32,)), torch.float32, "dtypes",
     r"tangent\(X, G\) returned its result in torch.float64 .* for torch.float32 input", ("tangent", "retract", "vmap")),
    # the second fuzz pass
    ("Sphere.retract-unnormalized-large-steps", [(gf.Sphere, "retract", _retract_unnormalized_large)], _sphere("m"),
     f64, "retract", r"retract\(X, 10 V\), a large step, is a finite point off the space",
     ("retract_small_steps", "jvp_fd", "gradcheck", "project_nearest")),
    ("Sphere.transport-quadratic", [(gf.Sphere, "transport", _transport_quadratic)], _sphere("m"), f64,
     "metric", "transport is not linear in V", ("tangent", "vmap")),
    ("Sphere.contains-whole-batch", [(gf.Sphere, "contains", _contains_whole_batch)], _builtin("Sphere"), f64,
     "contains_batch", "contains refuses points of a batch that are on the space", ("contains", "membership", "nan")),
    ("Sphere.check-whole-batch", [(gf.Sphere, "check", _check_whole_batch)], _builtin("Sphere"), f64,
     "contains_batch", "check passes a batch whose first point is off", ("check", "membership")),
    ("Sym.violations-relative-unclamped", [(gf.Sym, "_violations", _sym_violations_unclamped)], _builtin("Sym"), f64,
     "contains_batch", r"contains is False on to_manifold\(0", ("contains", "check", "membership")),
    ("Sphere.tangent-rank-deficient-float32", [(gf.Sphere, "tangent", _tangent_rank_deficient_float32)],
     _builtin("Sphere"), torch.float32, "float32_maps", r"float32 tangent\(X, G\) != float64 tangent\(X, G\)",
     ("tangent", "tangent_space", "metric", "grad_float32")),
    ("Sphere.sample-pairs-repeated", [(gf.Sphere, "sample", _sample_pairs_repeated)], _builtin("Sphere"), f64,
     "sample_independent", "of one sample call are (correlated|not independent)", ("sample", "sample_distribution")),
    ("Sphere.sample-box-float32", [(gf.Sphere, "sample", _sample_box_float32)], _builtin("Sphere"), torch.float32,
     "sample_distribution_f32", "float32 sample statistic .*not the documented distribution",
     ("sample", "sample_distribution")),
    ("Sphere.atol-size-blind", [(gf.Sphere, "_atol", _atol_size_blind)], _builtin("Sphere"), f64,
     "membership_large", "contains refuses a point perturbed by 0.5× the documented atol", ("membership", "contains")),
    ("PSD.project-eigenvalue-floor", [(gf.PSD, "project", _psd_project_floored)], _builtin("PSD"), f64,
     "project_nearest_chart", "project is not the nearest point", ("project", "project_nearest")),
    ("Stiefel.violations-norms-only", [(gf.Stiefel, "_violations", _stiefel_violations_norms_only)],
     _with_perturb("Stiefel", ref.perturb_orthogonality), f64, "membership", "contains accepts a point perturbed by 2×",
     ("contains", "check")),
    ("Oblique.violations-mean-over-columns", [(gf.Oblique, "_violations", _oblique_violations_mean)],
     _with_perturb("Oblique", ref.perturb_one_column), f64, "membership", "contains accepts a point perturbed by 2×",
     ("contains", "check")),
    # the closed-form maps
    ("PoincareBall.metric-conformal-lambda", _LAMBDA_METRIC, _builtin("PoincareBall"), f64, "dist",
     "dist does not agree with the metric", ("metric", "tangent", "vmap", "dtypes", "nonfinite")),
    ("PoincareBall.metric-conformal-lambda-logmap", _LAMBDA_METRIC, _builtin("PoincareBall-c0.5"), f64, "logmap_dist",
     r"inner\(X, L, L\) != dist\(X, Y\)²", ("metric", "tangent", "vmap", "dtypes", "nonfinite")),
    ("Lorentz.expmap-doubled", [(gf.Lorentz, "expmap", _expmap_doubled)], _builtin("Lorentz"), f64, "expmap",
     r"expmap\(X, tV\) − \(X \+ tV\) is not O\(t²\)", ("retract", "retract_small_steps", "to_manifold")),
    ("Lorentz.expmap-doubled-geodesic", [(gf.Lorentz, "expmap", _expmap_doubled)], _builtin("Lorentz-k2"), f64,
     "expmap_geodesic", "is not a geodesic at unit speed", ("retract", "retract_small_steps", "to_manifold")),
    ("Lorentz.logmap-chord", [(gf.Lorentz, "logmap", _logmap_chord)], _builtin("Lorentz"), f64, "logmap",
     "logmap is not the inverse of expmap", ()),
    ("PoincareBall.dist-doubled", [(gf.PoincareBall, "dist", _dist_doubled)], _builtin("PoincareBall"), f64, "dist",
     "dist does not agree with the metric", ()),
    # the documented transports
    ("Lorentz.transport-projected", [(gf.Lorentz, "transport", _transport_projected)], _builtin("Lorentz"), f64,
     "transport_isometry", "transport is not an isometry", ("metric", "vmap", "dtypes", "nonfinite", "pure")),
    ("PoincareBall.transport-rotating", [(gf.PoincareBall, "transport", _transport_rotating)],
     _builtin("PoincareBall-c0.5"), f64, "transport_parallel", "not the parallel transport",
     ("metric", "transport_isometry", "vmap", "dtypes", "nonfinite", "pure")),
    # non-contiguous inputs
    ("Sphere.to_manifold-reads-memory-as-contiguous", [(gf.Sphere, "to_manifold", _contiguous_read_chart)],
     _builtin("Sphere"), f64, "layouts", r"to_manifold\(Z(, base)?\) with argument #0 (stored transposed|every other entry of a wider tensor): off by",
     ("to_manifold", "from_manifold", "rebase", "pure", "dtypes", "nan")),
    ("Sphere.to_manifold-NaN-when-not-contiguous", [(gf.Sphere, "to_manifold", _nan_when_not_contiguous_chart)],
     _builtin("Sphere"), f64, "layouts", r"to_manifold\(Z(, base)?\) with argument #0 (stored transposed|every other entry of a wider tensor): off by inf",
     ("to_manifold", "from_manifold", "rebase", "pure", "dtypes", "nan")),
    ("Sphere.to_manifold-expanded-shortcut", [(gf.Sphere, "to_manifold", _expanded_shortcut_chart)],
     _builtin("Sphere"), f64, "layouts", r"to_manifold\(Z, base\) with argument #0 one entry expanded over the batch",
     ("to_manifold", "from_manifold", "rebase", "pure", "dtypes", "nan", "vmap")),
    # gradients of every map
    ("Sphere.project-steep-gradient", [(gf.Sphere, "project", _project_steep)], _builtin("Sphere"), f64, "gradcheck",
     "gradcheck of project near a point failed", ("project", "project_nearest", "gradgradcheck", "linearize")),
    ("PoincareBall.egrad_to_rgrad-steep-gradient", [(gf.PoincareBall, "egrad_to_rgrad", _rgrad_steep)],
     _builtin("PoincareBall"), f64, "gradcheck", "gradcheck of egrad_to_rgrad failed", ("metric", "tangent")),
    ("PoincareBall.transport-steep-gradient", [(gf.PoincareBall, "transport", _transport_steep)],
     _builtin("PoincareBall"), f64, "gradcheck", "gradcheck of transport failed",
     ("metric", "transport_isometry", "transport_parallel")),
    ("PoincareBall.dist-steep-gradient", [(gf.PoincareBall, "dist", _dist_steep)], _builtin("PoincareBall"), f64,
     "gradcheck", "gradcheck of dist failed", ("dist", "expmap_geodesic", "logmap_dist")),
    ("PoincareBall.expmap-steep-gradient", [(gf.PoincareBall, "expmap", _expmap_steep)], _builtin("PoincareBall"),
     f64, "gradcheck", "gradcheck of expmap failed", ("expmap", "expmap_geodesic", "logmap")),
    ("PoincareBall.inner-steep-gradient", [(gf.PoincareBall, "inner", _inner_steep)], _builtin("PoincareBall"),
     f64, "gradcheck", "gradcheck of inner failed", ("metric", "dist", "transport_isometry")),
    # second derivatives in the base point
    ("PoincareBall.transport-curved-in-the-base", [(gf.PoincareBall, "transport", _transport_curved)],
     _builtin("PoincareBall"), f64, "base_hessian", r"of transport\(X, Y, U\(X\)\): Hessian-vector product in the base",
     ("metric", "transport_isometry", "transport_parallel", "gradcheck", "nested_forward")),
    ("PoincareBall.expmap-once-differentiable", [(gf.PoincareBall, "expmap", _expmap_once_differentiable)],
     _builtin("PoincareBall"), f64, "base_hessian", r"double backward of expmap\(X, V\(X\)\): Hessian-vector product",
     ("expmap", "expmap_geodesic", "logmap", "gradcheck")),
    # AOT autograd's tracing
    ("Sphere.tangent-backward-branches-on-a-value", [(gf.Sphere, "tangent", _tangent_custom_op)], _builtin("Sphere"),
     f64, "compile_aot", r'torch.compile\(fullgraph=True, backend="aot_eager"\) of tangent failed',
     ("tangent", "tangent_space", "metric", "gradcheck", "vmap", "pure", "compile", "compile_maps")),
    ("Sphere.rebase-operator-without-fake-kernel", [(gf.Sphere, "rebase", _rebase_custom_op)], _builtin("Sphere"),
     f64, "compile_aot", r'torch.compile\(fullgraph=True, backend="aot_eager"\) of rebase failed',
     ("rebase", "vmap", "pure", "dtypes", "nonfinite", "compile", "compile_maps")),
    ("Sphere.retract-wrong-compiled-under-no-grad", [(gf.Sphere, "retract", _retract_wrong_compiled_without_grad)],
     _builtin("Sphere"), f64, "compile_aot", r"retract under torch.no_grad\(\) compiled by AOT autograd != eager",
     ("retract", "retract_small_steps", "vmap", "pure", "compile", "compile_maps")),
]


@pytest.mark.parametrize(("patches", "make_case", "dtype", "prop", "match", "passes"), [g[1:] for g in GAPS],
                         ids=[g[0] for g in GAPS])
def test_fuzz_gap_is_caught(patches, make_case, dtype, prop, match, passes) -> None:
    case = make_case()
    gen = lambda: torch.Generator().manual_seed(SEED)  # noqa: E731
    with _patch(*patches)():
        for old in passes:  # the old harness's checks of the broken map pass with the mutant
            _PROPS[old].fn(case, dtype if dtype in _PROPS[old].dtypes(case) else f64, generator=gen())
        with pytest.raises(AssertionError, match=match) as info:
            _PROPS[prop].fn(case, dtype, generator=gen())
    assert case.id in str(info.value)  # the message names the case
    _PROPS[prop].fn(case, dtype, generator=gen())  # the control: the property passes without the mutant


def _sl1_rounding_pairs(self: Any, shape: Any, *, generator=None, dtype=None, device=None) -> Tensor:
    """``SL(1)``'s one point, [[1]], rounded down by one ulp on both points of a random half of the
    pairs: what a sampler's ``det^(-1/n)`` leaves (torch 2.11 on an H200 box failed the harness so)."""
    X = torch.ones(tuple(shape), dtype=dtype, device=device)
    low = torch.rand(shape[0], generator=generator, dtype=torch.float64) < 0.5
    return torch.where(low.reshape((-1,) + (1,) * (len(shape) - 1)), X.nextafter(torch.zeros_like(X)), X)


def test_sample_independence_reads_rounding_of_one_point_as_one_point() -> None:
    """A space with one point (``SL`` of 1×1) samples it up to rounding; after centring, what is left is
    the rounding, whose products need not average to 0 (z = 6.5 on torch 2.11): the independence test
    reads products within ``1e-12 ‖A‖²`` as a one-point space, not as correlated points. Its other
    checks stand: the repeated-pairs mutant of ``GAPS`` fails it still."""
    case = _CASES["SL"]
    assert (1, 1) in [tuple(ps) for ps in case.point_shapes]
    with _patch((gf.SL, "sample", _sl1_rounding_pairs))():
        _PROPS["sample_independent"].fn(case, f64, generator=torch.Generator().manual_seed(SEED))


# (nested_forward and broadcast, added later, call expmap and logmap among other maps where a space has them;
# gradcheck, since Note [Gradients of every map], differentiates dist, expmap and logmap too)
_NEW_CLOSED_FORM_PROPERTIES = ("dist", "expmap", "expmap_geodesic", "logmap", "logmap_dist", "sqdist", "transport_parallel",
                               "nested_forward", "broadcast", "gradcheck", "base_hessian")


@pytest.mark.parametrize("case_id", ["PoincareBall-c0.5", "Lorentz-k2"])
def test_earlier_harness_never_calls_the_closed_forms(case_id: str) -> None:
    """The harness before the properties of the closed forms (every other property, in float64; the
    compile properties compile a fixed list of maps without them) runs with ``dist``, ``expmap`` and
    ``logmap`` raising: it never called them, so the closed-form mutants of ``GAPS`` passed it in full
    (the metric mutant is checked there with the old properties of the metric)."""
    calls: list[tuple[str, str]] = []

    def trap(name: str) -> Callable[..., Tensor]:
        def method(self: Any, *args: Any) -> Tensor:
            calls.append((current, name))
            raise AssertionError(f"the earlier harness called {name}")

        return method

    case = _CASES[case_id]
    cls = type(case.space)
    skip = {"compile", "compile_maps", "compile_aot", *_NEW_CLOSED_FORM_PROPERTIES}
    with _patch(*((cls, name, trap(name)) for name in ("dist", "expmap", "logmap")))():
        for prop in PROPERTIES:
            if prop.name not in skip and f64 in prop.dtypes(case):
                current = prop.name
                prop.fn(case, f64, generator=torch.Generator().manual_seed(SEED))
    assert not calls  # (also where a property would have caught the error)


def test_an_unexpected_exception_names_where_it_was_raised() -> None:
    """A space that raises something other than an assertion (here a RuntimeError from ``tangent`` on
    a batch) fails the property with an AssertionError naming the property, case, shape and dtype,
    chained to the original; a property asked for what it cannot run stays a ValueError."""

    def tangent_raises_on_a_batch(self: Any, X: Tensor, G: Tensor) -> Tensor:
        if X.ndim > 1:
            raise RuntimeError("boom")
        return _SPHERE_TANGENT(self, X, G)

    case = _sphere_case("raises")
    with mock.patch.object(gf.Sphere, "tangent", tangent_raises_on_a_batch), \
            pytest.raises(AssertionError, match=r"\[raises = Sphere\(radius=1\.0\), shape \(2, 4\), torch\.float64\] "
                          r"property 'tangent' raised RuntimeError .*: boom") as info:
        check_tangent(case, f64)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="runs in float64 only"):
        check_gradcheck(case, torch.float32)


def test_check_space_reports_what_did_not_run() -> None:
    """A case without ``dim``, ``perturb`` and ``moments`` leaves geometry unchecked: ``check_space``
    warns naming the three properties, and its report lists them; listed in ``case.skip`` with a
    reason, they are reported as skipped and there is no warning."""
    props = ("sample", "tangent_space", "membership", "sample_distribution", "hessian")
    bare = _sphere_case("bare")
    with pytest.warns(IncompleteCaseWarning, match=r"tangent_space ran without its rank check.*needs case\.dim.*"
                      r"membership did not run.*needs case\.perturb.*sample_distribution did not run.*needs case\.moments"):
        report = check_space(bare, properties=props)
    assert set(report.incomplete) == {"tangent_space", "membership", "sample_distribution"}
    assert report.skipped["membership"] == "needs case.perturb"
    assert ("tangent_space", f64) in report.ran and ("hessian", f64) in report.ran
    assert "incomplete: membership" in str(report)

    reasons = {"tangent_space": "a test of the report", "membership": "a test of the report",
               "sample_distribution": "a test of the report"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = check_space(dataclasses.replace(bare, skip=reasons, smooth=False), properties=props)
    assert not report.incomplete
    assert report.skipped == {**{k: f"case.skip: {v}" for k, v in reasons.items()}, "hessian": "needs case.smooth"}
    assert report.ran == (("sample", f64),)


def test_gap_mutants_leave_the_classes_as_they_were() -> None:
    before = {(cls, name): cls.__dict__.get(name) for _, patches, *_ in GAPS for cls, name, _ in patches}
    for _, patches, *_ in GAPS:
        with _patch(*patches)():
            pass
    assert {k: k[0].__dict__.get(k[1]) for k in before} == before


def test_readme_states_how_many_gaps_the_harness_now_catches() -> None:
    """The README counts the broken spaces of ``GAPS``; the count had drifted twice (44, then 47,
    while the list grew): it is read from the list."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.search(r"The (\d+) broken spaces of `tests/test_testing\.py` \(`GAPS`\)", readme)
    assert stated is not None, "README no longer states the count of GAPS"
    assert int(stated.group(1)) == len(GAPS), f"README says {stated.group(1)} broken spaces, GAPS holds {len(GAPS)}"

def test_ci_runs_every_version_gated_test():
    """The torch that CI installs (``.ci/run``'s pin) is new enough for every ``needs_torch`` gate in the
    suite: the gates skip only on the older torch a user runs the suite on, never in CI."""
    root = pathlib.Path(__file__).resolve().parent
    pin = re.search(r"torch==(\d+)\.(\d+)", (root.parent / ".ci" / "run").read_text())
    assert pin is not None, ".ci/run no longer pins torch"
    ci = (int(pin.group(1)), int(pin.group(2)))
    gates = set()
    for path in root.glob("test_*.py"):
        text = path.read_text()
        gates |= {(int(a), int(b)) for a, b in re.findall(r"needs_torch\(\((\d+), (\d+)\)", text)}
    gates |= {helpers.COMPILE_PYTREES, helpers.FSDP2_ON_CPU}
    assert len(gates) >= 2 and all(g <= ci for g in gates), (sorted(gates), ci)


def test_check_space_names_the_property_and_refuses_bad_arguments() -> None:
    """A failure names the property (for ``case.skip`` or ``properties=``: "contains accepts a point
    perturbed by 2× ..." did not say ``membership``); a single name for ``properties`` is one name (it
    was iterated letter by letter); a bad ``generator`` is check_space's error, not the space's; a
    case's ``shapes``/``tol``/``dtypes`` of the wrong kind are named (a bare TypeError, or a report
    that said "runs in None only"; complex dtypes, whose properties failed a correct Sphere)."""
    case = _CASES["Sphere"]
    with _loose_tolerance(), pytest.raises(AssertionError, match=r"^property 'membership' failed: \[Sphere"):
        check_space(case, properties=("membership",))
    assert [name for name, _ in check_space(case, properties="metric").ran] == ["metric"] * len(case.dtypes)
    with pytest.raises(TypeError, match="`generator` must be None or a torch.Generator, got 0"):
        check_space(case, properties=("sample",), generator=0)
    for bad, match in ((dict(shapes=(4,)), "`shapes` must be a tuple of shapes"), (dict(tol=1e-6), "`tol` must be a dict"),
                       (dict(dtypes=()), "`dtypes` is empty"),
                       # a complex dtype: the properties' real inner products failed a correct space
                       (dict(dtypes=(torch.complex128,), tol={torch.complex128: 1e-9, f64: 1e-9}),
                        "`dtypes` must be real floating dtypes")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(case, **bad)


def test_bad_input_on_a_scalar_smoke_shape() -> None:
    """A space of scalar points (``point_ndim = 0``) whose first shape, the default smoke shape, is ``()``:
    ``check_bad_input`` read ``shape[-1]`` for ``sample(n)`` and raised IndexError, failing a correct space."""
    case = dataclasses.replace(_CASES["Rn"], smoke_shape=())
    _PROPS["bad_input"].fn(case, f64, generator=torch.Generator().manual_seed(SEED))


def test_documented_tolerance_of_complex_dtypes_and_the_hermitian_predicate() -> None:
    """``documented_atol`` of a complex dtype is that of the real dtype of its parts (it raised
    ``KeyError: torch.complex128``, so ``reference.member`` failed on every complex point without an
    explicit ``atol``), and the reference has a predicate for ``Hermitian`` (``Xᴴ``, not ``Xᵀ``)."""
    from geofunc.testing import documented_atol

    for c, r in ((torch.complex64, torch.float32), (torch.complex128, torch.float64)):
        for shape in ((4, 4), (200, 3)):
            assert documented_atol(c, shape) == documented_atol(r, shape)
    g = torch.Generator().manual_seed(SEED)
    U = gf.Unitary().sample((3, 4, 4), generator=g, dtype=torch.complex128)
    assert ref.member(gf.Unitary(), U) and not ref.member(gf.Unitary(), 1.001 * U)
    H = gf.Hermitian().sample((3, 4, 4), generator=g, dtype=torch.complex64)
    assert ref.member(gf.Hermitian(), H)
    assert not ref.member(gf.Hermitian(), H + 1j * H.real)  # complex symmetric is not Hermitian
    assert ref.member(gf.Hermitian(), H.real.to(torch.float32) + 0j * H)  # real symmetric is
