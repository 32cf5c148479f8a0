"""The sphere of radius ``r`` through GeoTorch's projection chart ``r Z/‖Z‖``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from ._sphere import RadiusSphere

__all__ = ["SphereEmbedded"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True)
class SphereEmbedded(RadiusSphere):
    r"""Vectors (last dimension) of norm ``radius``, :math:`\{x : \|x\| = r\}`, through the projection
    chart ``X = r Z/‖Z‖``: GeoTorch's ``SphereEmbedded`` (``geotorch.sphere(..., embedded=True)``) as a pure space: no
    base, ``from_manifold(X) = (X / r, None)``. The chart is singular at ``Z = 0`` (the chart of
    :class:`Sphere`, the exponential map at a base, is not); prefer ``Sphere`` unless you want
    GeoTorch's exact chart. ``tangent``, ``retract``, ``project``, ``sample`` and membership are
    :class:`Sphere`'s: ``G − ⟨G, X⟩X/r²``, ``r(X + V)/‖X + V‖``, ``rY/‖Y‖``, uniform.

    Example::

        >>> X = SphereEmbedded(radius=2.0).to_manifold(torch.tensor([3.0, 4.0]))
        >>> X
        tensor([1.2000, 1.6000])
    """

    _one_node: ClassVar[bool] = False  # a normalization: cheaper as its few ops under torch.func.grad

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return self.radius * Z / torch.linalg.vector_norm(Z, dim=-1, keepdim=True)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return X / self.radius, None
