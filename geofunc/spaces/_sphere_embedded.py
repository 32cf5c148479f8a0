"""The sphere of radius ``r`` through GeoTorch's projection chart ``r Z/‖Z‖``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, final

import torch

from ._sphere import RadiusSphere, _vector_norm

__all__ = ["SphereEmbedded"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class SphereEmbedded(RadiusSphere):
    r"""Vectors (last dimension) of norm ``radius``, :math:`\{x : \|x\| = r\}`, through the projection
    chart ``X = r Z/‖Z‖``: GeoTorch's ``SphereEmbedded`` (``geotorch.sphere(..., embedded=True)``) as a pure space: no
    base, ``from_manifold(X) = (X / r, None)``. The chart is singular at ``Z = 0`` (NaN there; the
    chart of :class:`Sphere`, the exponential map at a base, is not); every other finite ``Z``, of
    any scale (1e-300 to 1e300 in float64), gives a point, and NaN or inf entries give NaN. Prefer
    ``Sphere`` unless you want GeoTorch's exact chart. ``tangent``, ``retract``, ``project``, ``sample`` and membership are
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
        # ‖Z‖ overflows (1e20 in float32 became 0) and underflows (1e-25 became inf): Z is first
        # divided by its largest entry, detached, which the map is invariant to (so every derivative
        # is the exact one). Z = 0 stays singular (0/0: NaN); NaN/inf entries give NaN.
        Y = Z / Z.detach().abs().amax(-1, keepdim=True)  # (2× faster than vector_norm(ord=inf))
        X = Y / _vector_norm(Y)  # Note [Norms of long float32 vectors]
        return X if self.radius == 1.0 else self.radius * X  # (one node fewer at the default radius)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return X / self.radius, None
