"""`SpaceCase`: one space, the shapes to test it on, and what the conformance suite may expect."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, Optional

import torch

from ..spaces._base import AbstractSpace

__all__ = ["SpaceCase", "DEFAULT_TOL"]

Tensor = torch.Tensor

#: Default per-dtype tolerance of a case: used as ``atol`` and ``rtol`` of every comparison
#: and as the ``atol`` handed to the case's ``member`` predicate.
DEFAULT_TOL: Mapping[torch.dtype, float] = types.MappingProxyType({torch.float32: 1e-4, torch.float64: 1e-9})


def _default_tol() -> Mapping[torch.dtype, float]:
    return DEFAULT_TOL


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

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError(f"SpaceCase {self.id!r}: `shapes` is empty")
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        for dtype in (*self.dtypes, torch.float64):
            if dtype not in self.tol:
                raise ValueError(f"SpaceCase {self.id!r}: `tol` has no entry for {dtype}")

    @property
    def smoke(self) -> tuple[int, ...]:
        """The shape of the expensive properties."""
        return tuple(self.smoke_shape) if self.smoke_shape is not None else self.shapes[0]

    def __str__(self) -> str:
        return self.id
