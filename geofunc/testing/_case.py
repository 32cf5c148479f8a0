"""`SpaceCase`: one space, the shapes to test it on, and what the conformance suite may expect."""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Mapping, Optional

import torch

from ..spaces._base import AbstractSpace

__all__ = ["SpaceCase", "DEFAULT_TOL", "MEMBERSHIP_ATOL", "documented_atol"]

Tensor = torch.Tensor

#: Default per-dtype tolerance of a case: used as ``atol`` and ``rtol`` of every comparison
#: and as the ``atol`` handed to the case's ``member`` predicate.
DEFAULT_TOL: Mapping[torch.dtype, float] = types.MappingProxyType({torch.float32: 1e-4, torch.float64: 1e-9})


#: The default ``atol`` of ``contains``/``check`` that geofunc documents (README, "Tolerances"):
#: ``1e-4`` in float32 and ``1e-9`` in float64 for a point of size ≤ 64, growing like
#: ``√(size/64)`` above (size: the largest point dimension). Written here independently of the
#: library's own table, so that a loosened default is caught (``check_membership``).
MEMBERSHIP_ATOL: Mapping[torch.dtype, float] = types.MappingProxyType({torch.float32: 1e-4, torch.float64: 1e-9})


def documented_atol(dtype: torch.dtype, point_shape: tuple[int, ...]) -> float:
    """The documented default membership tolerance for a point of shape ``point_shape``; a complex
    dtype has that of the real dtype of its parts (complex64: float32's), as the spaces' defaults."""
    size = max(point_shape) if point_shape else 1
    real = dtype.to_real() if dtype.is_complex else dtype
    return MEMBERSHIP_ATOL[real] * max(1.0, math.sqrt(size / 64.0))


def _default_tol() -> Mapping[torch.dtype, float]:
    return DEFAULT_TOL


#: The values of ``SpaceCase.transport``, weakest first.
_TRANSPORTS = ("vector", "isometric", "parallel")


def _no_skip() -> Mapping[str, str]:
    return types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class SpaceCase:
    """A space under test and what the conformance properties may assume about it.

    Attributes:
        id: readable test id, e.g. ``"Stiefel-cayley"``.
        space: the space instance.
        shapes: full tensor shapes (batch dimensions included) the per-dtype properties
            run on, e.g. ``((1, 1), (1, 5), (5, 1), (4, 4), (6, 3), (3, 6), (2, 3, 5, 2))``.
        member: an *independent* membership predicate ``member(X, atol) -> Tensor[bool]``
            written with ``torch.linalg`` (not with ``space.contains``); any shape whose
            ``.all()`` is the verdict. ``atol`` is ``tol[dtype]``.
        tol: per-dtype tolerance ``{torch.float32: ..., torch.float64: ...}`` of comparisons
            (``atol = rtol = tol``) and of ``member``.
        rebase_zeroes: ``rebase`` must return an all-zero raw tensor (base-carrying charts:
            SO, Stiefel, Grassmannian, Sphere, Oblique).
        has_logabsdet: ``logabsdet`` is implemented and must equal ``slogdet``.
        smooth: the maps are smooth at the chart centre (``Z = 0``) and at random raw input,
            so ``jacfwd == jacrev``, ``hessian`` and the gradchecks at ``Z = 0`` apply.
        defined_at_zero: the chart is defined at ``Z = 0``. False only for a projection chart
            such as ``r Z/‖Z‖`` (``geofunc.nn.SphereEmbedded``, GeoTorch's embedded sphere),
            which is singular there: the checks *at* ``Z = 0`` are skipped, all others run.
        raw_scales: scales of the Gaussian raw input ``Z`` (and ambient ``Y``) that
            ``to_manifold``/``project`` must map onto the space.
        off_manifold: ``off_manifold(X) -> Y`` turns points into inputs that are *not* on the
            space (every point of the batch off); may return ``None`` for a shape that has
            no such input (e.g. 1×1 for ``Sym``). ``None``: those tests only use NaN input.
        linearized: optional ``linearized(X, V) -> residual``: the linearized constraint at
            ``X`` applied to ``V``, which must vanish for tangent ``V``. ``None``: the suite
            checks ``‖project(X + tV) − (X + tV)‖ = O(t²)`` in float64 instead.
        project_fixes_points: ``project(X) == X`` for ``X`` on the space (so ``project`` is
            idempotent). False for open spaces whose ``project`` returns another canonical
            point.
        dtypes: the dtypes of the per-dtype properties (float64-only properties such as
            ``gradcheck`` always run in float64).
        smoke_shape: the one shape of the expensive properties (gradcheck, jacobians,
            hessian, compile, vmap of grad, finite differences); default ``shapes[0]``.
            Gradcheck, hessian and compile also run on its transpose (a wide shape for a tall
            one) where the space takes it.
        dim: ``dim(point_shape) -> int``, the dimension of the manifold at a generic point,
            computed independently of the space (e.g. ``n(n − 1)/2`` for ``SO(n)``):
            ``check_tangent_space`` asserts that the tangent projection has this rank and that
            the projected differential of the chart has it at random raw points. ``None``: only the image of the
            chart's differential is checked to be fixed by the projection.
        quotient: points are representatives of equivalence classes (the Grassmannian's frames
            of a subspace): ``tangent`` is the horizontal projection, and away from its centre
            the chart's differential has a vertical part that it removes.
        perturb: ``perturb(X, amount) -> Y``: ``Y`` violates the constraint by exactly ``amount``
            in the space's documented measure (e.g. ``X·(1 + amount)`` for the unit sphere's
            ``|‖x‖ − 1|``), for points ``X`` (``None`` for a shape with no such violation, e.g.
            rank ≤ r at full rank). ``check_membership`` asserts that ``contains``/``check``
            accept ``amount ∈ {0.1, 0.5}·atol`` and refuse ``{2, 10}·atol`` (``atol`` the
            documented default, per dtype). ``None``: that property does not apply.
        project_slack: ``project(Y)`` is the nearest point of the space (of its closure, for an
            open space whose ``project`` pushes points inside by a documented margin) up to
            ``project_slack·max(1, ‖Y‖)``: no point of the space is closer to ``Y`` by more.
        moments: ``moments(X) -> {name: (values, expected)}`` for ``N`` samples ``X`` of shape
            ``(N, *point_shape)``: per-sample statistics ``values`` (leading dim ``N``) whose
            exact expectation under the documented distribution of ``sample`` is ``expected``
            (broadcastable to ``values[0]``). ``check_sample_distribution`` z-tests every one.
            ``None``: that property does not apply.
        float32_shift: how far the float32 maps are from the float64 ones *by design*, not by
            rounding (relative), e.g. ``2e-3`` where a value floor depends on the dtype (the
            softplus floor ``√ε``: 3.5e-4 in float32, 1.5e-8 in float64); added to
            ``tol[float32]`` when float32 derivatives are compared with float64 ones.
        logabsdet_shapes: the shapes ``check_logabsdet`` runs on (default: ``shapes`` and the
            square sizes 1, 2, 3, 5, 8 that the space takes).
        skip: ``{property name: reason}``: properties that do not apply to this space, each with
            the reason (e.g. ``{"project_normal": "a set with boundary: ..."}``).
        geodesic_radius: the Riemannian length (in the space's own metric, ``inner``) of the
            largest step of the closed-form geodesic properties (``expmap_geodesic``, ``logmap``,
            ``logmap_dist``): they hold within the injectivity radius at the sampled points, so it
            must be below it (the unit sphere's is π, hyperbolic space's infinite). Default 0.5.
        transport: what ``transport`` is documented to be: ``"vector"`` (a vector transport: linear,
            into the tangent space at the target, ``check_metric``), ``"isometric"`` (also
            preserves ``inner``: ``check_transport_isometry``) or ``"parallel"`` (the parallel
            transport along the geodesic: also ``check_transport_parallel``, which needs ``expmap`` and
            ``logmap``). Default ``"vector"``.
    """

    id: str
    space: AbstractSpace
    shapes: tuple[tuple[int, ...], ...]
    member: Callable[[Tensor, float], Any]
    tol: Mapping[torch.dtype, float] = dataclasses.field(default_factory=_default_tol)
    rebase_zeroes: bool = False
    has_logabsdet: bool = False
    smooth: bool = True
    defined_at_zero: bool = True
    raw_scales: tuple[float, ...] = (1.0, 100.0)
    off_manifold: Optional[Callable[[Tensor], Optional[Tensor]]] = None
    linearized: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    project_fixes_points: bool = True
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    smoke_shape: Optional[tuple[int, ...]] = None
    dim: Optional[Callable[[tuple[int, ...]], int]] = None
    quotient: bool = False
    perturb: Optional[Callable[[Tensor, float], Optional[Tensor]]] = None
    project_slack: float = 0.0
    moments: Optional[Callable[[Tensor], Mapping[str, tuple[Tensor, Any]]]] = None
    float32_shift: float = 0.0
    logabsdet_shapes: Optional[tuple[tuple[int, ...], ...]] = None
    skip: Mapping[str, str] = dataclasses.field(default_factory=_no_skip)
    geodesic_radius: float = 0.5
    transport: str = "vector"

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError(f"SpaceCase {self.id!r}: `shapes` is empty")
        r = self.geodesic_radius
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
            raise ValueError(f"SpaceCase {self.id!r}: `geodesic_radius` must be a finite number > 0, "
                             f"got {self.geodesic_radius!r}")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"SpaceCase {self.id!r}: `transport` must be one of {', '.join(map(repr, _TRANSPORTS))}, "
                             f"got {self.transport!r}")
        try:
            shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        except TypeError:
            raise ValueError(f"SpaceCase {self.id!r}: `shapes` must be a tuple of shapes (tuples of ints), e.g. "
                             f"((4,), (2, 3)), got {self.shapes!r}") from None
        object.__setattr__(self, "shapes", shapes)
        if not isinstance(self.tol, Mapping):
            raise ValueError(f"SpaceCase {self.id!r}: `tol` must be a dict {{dtype: tolerance}}, got {self.tol!r}")
        if not self.dtypes:
            raise ValueError(f"SpaceCase {self.id!r}: `dtypes` is empty (no per-dtype property would run)")
        if any(not (isinstance(d, torch.dtype) and d.is_floating_point) for d in self.dtypes):
            # The properties draw real Gaussians and compare with real inner products (⟨A, B⟩ = Σ A·B, no
            # conjugate): a correct complex space failed them ("tangent is not self-adjoint" for Sphere).
            raise ValueError(f"SpaceCase {self.id!r}: `dtypes` must be real floating dtypes (float32, float64), got "
                             f"{self.dtypes!r}. Test a complex space as the real manifold of its (re, im) parts: a "
                             f"space on real (..., 2) tensors that calls yours on torch.view_as_complex of them "
                             f"(tests/cases_complex.py's _Realified)")
        for dtype in (*self.dtypes, torch.float64):
            if dtype not in self.tol:
                raise ValueError(f"SpaceCase {self.id!r}: `tol` has no entry for {dtype}")
        for name, reason in self.skip.items():
            if not (isinstance(reason, str) and reason.strip()):
                raise ValueError(f"SpaceCase {self.id!r}: skipping {name!r} needs a reason, got {reason!r}")

    @property
    def smoke(self) -> tuple[int, ...]:
        """The shape of the expensive properties."""
        return tuple(self.smoke_shape) if self.smoke_shape is not None else self.shapes[0]

    @property
    def point_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The distinct point shapes (trailing ``space.point_ndim`` dims) of ``shapes``, in order."""
        p = self.space.point_ndim
        out: list[tuple[int, ...]] = []
        for s in self.shapes:
            ps = s[len(s) - p :] if p else ()
            if ps not in out:
                out.append(ps)
        return tuple(out)

    def __str__(self) -> str:
        return self.id
