"""GeoTorch's constraint one-liners (0.4.0 names, argument names and defaults) on geofunc spaces.

``import geofunc.nn as geotorch`` is a drop-in: each function registers the matching geofunc
space on ``module.<tensor_name>`` through :func:`geofunc.nn.constrain`, initializes the tensor
with a sample of the space on the tensor's own dtype and device, and returns the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from .. import spaces as S
from .._errors import ManifoldError
from ..spaces._base import AbstractSpace
from ._adapter import _owner_name, _resolve_tensor, constrain

__all__ = [
    "SphereEmbedded",
    "almost_orthogonal",
    "fixed_rank",
    "grassmannian",
    "invertible",
    "low_rank",
    "orthogonal",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_fixed_rank",
    "positive_semidefinite_low_rank",
    "skew",
    "sphere",
    "symmetric",
]

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class SphereEmbedded(S.Sphere):
    r"""Vectors (last dimension) of norm ``radius`` through the projection chart ``X = r Z/‖Z‖``.

    The static chart of ``geotorch.sphere(..., embedded=True)``: no base, ``from_manifold(X) =
    (X / r, None)``. It is singular at ``Z = 0`` (the chart of :class:`geofunc.Sphere`, the
    exponential map at a base, is not); prefer ``Sphere`` unless you want GeoTorch's exact chart.
    Everything but the chart (``tangent``, ``retract``, ``project``, ``sample``, membership,
    the ``radius`` check) is :class:`geofunc.Sphere`'s.
    """

    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        """``r Z / ‖Z‖`` (the chart has no base: ``base`` must be None)."""
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return self.radius * Z / torch.linalg.vector_norm(Z, dim=-1, keepdim=True)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        return X / self.radius, None


def _register(
    module: nn.Module,
    tensor_name: str,
    make: Callable[[], AbstractSpace],
    init: Callable[[AbstractSpace], Any] | None = None,
) -> nn.Module:
    # Unknown names first (as GeoTorch, which reads the size before building the space), then
    # hyperparameter errors, prefixed with the tensor they were meant for.
    _resolve_tensor(module, tensor_name, "a geofunc space")
    try:
        space = make()
    except ManifoldError as e:
        raise ManifoldError(f"cannot constrain {_owner_name(module, tensor_name)}: {e}") from None
    return constrain(module, tensor_name, space, init=None if init is None else init(space))


def orthogonal(module: nn.Module, tensor_name: str = "weight", triv: Any = "expm") -> nn.Module:
    """Orthonormal columns (rows if wide): :class:`geofunc.Stiefel`, Haar-uniform initialization.

    As in GeoTorch, a square weight gets ``Stiefel`` (the whole orthogonal group O(n), det ±1,
    so that ``module.weight = Q`` accepts every orthogonal ``Q``, e.g. from
    ``nn.init.orthogonal_``), not ``SO``; the chart ``base · φ(A)`` stays in the connected
    component of its base. Use ``constrain(module, name, geofunc.SO())`` for det +1.
    """
    return _register(module, tensor_name, lambda: S.Stiefel(triv=triv))


def grassmannian(module: nn.Module, tensor_name: str = "weight", triv: Any = "expm") -> nn.Module:
    """An orthonormal frame of a subspace (:class:`geofunc.Grassmannian`)."""
    return _register(module, tensor_name, lambda: S.Grassmannian(triv=triv))


def almost_orthogonal(
    module: nn.Module, tensor_name: str = "weight", lam: float = 0.1, f: Any = "sin", triv: Any = "expm"
) -> nn.Module:
    """Singular values in ``[1 - lam, 1 + lam]`` (:class:`geofunc.AlmostOrthogonal`)."""
    return _register(module, tensor_name, lambda: S.AlmostOrthogonal(lam=lam, f=f, triv=triv))


def low_rank(module: nn.Module, tensor_name: str, rank: int, triv: Any = "expm") -> nn.Module:
    """Rank at most ``rank`` (:class:`geofunc.LowRank`); on a Conv2d weight, every kernel."""
    return _register(module, tensor_name, lambda: S.LowRank(rank=rank, triv=triv))


def fixed_rank(module: nn.Module, tensor_name: str, rank: int, f: Any = "softplus", triv: Any = "expm") -> nn.Module:
    """Rank exactly ``rank`` (:class:`geofunc.FixedRank`)."""
    return _register(module, tensor_name, lambda: S.FixedRank(rank=rank, f=f, triv=triv))


def invertible(module: nn.Module, tensor_name: str = "weight", f: Any = "softplus", triv: Any = "expm") -> nn.Module:
    """Invertible with positive determinant (:class:`geofunc.GLp`)."""
    return _register(module, tensor_name, lambda: S.GLp(f=f, triv=triv))


def positive_definite(
    module: nn.Module, tensor_name: str = "weight", f: Any = "softplus", triv: Any = "expm"
) -> nn.Module:
    """Symmetric positive definite (:class:`geofunc.PSD`)."""
    return _register(module, tensor_name, lambda: S.PSD(f=f, triv=triv))


def positive_semidefinite(module: nn.Module, tensor_name: str = "weight", triv: Any = "expm") -> nn.Module:
    """Symmetric positive semidefinite (:class:`geofunc.PSSD`)."""
    return _register(module, tensor_name, lambda: S.PSSD(triv=triv))


def positive_semidefinite_low_rank(module: nn.Module, tensor_name: str, rank: int, triv: Any = "expm") -> nn.Module:
    """Positive semidefinite of rank at most ``rank`` (:class:`geofunc.PSSDLowRank`)."""
    return _register(module, tensor_name, lambda: S.PSSDLowRank(rank=rank, triv=triv))


def positive_semidefinite_fixed_rank(
    module: nn.Module, tensor_name: str, rank: int, f: Any = "softplus", triv: Any = "expm"
) -> nn.Module:
    """Positive semidefinite of rank exactly ``rank`` (:class:`geofunc.PSSDFixedRank`)."""
    return _register(module, tensor_name, lambda: S.PSSDFixedRank(rank=rank, f=f, triv=triv))


def sphere(module: nn.Module, tensor_name: str = "weight", radius: float = 1.0, embedded: bool = False) -> nn.Module:
    """Every vector along the last dimension (each row of a Linear weight) of norm ``radius``.

    ``embedded=False``: :class:`geofunc.Sphere` (exponential map at a base, dynamic);
    ``embedded=True``: :class:`SphereEmbedded` (``X = r Z/‖Z‖``, static), as GeoTorch.
    """
    return _register(
        module, tensor_name, (lambda: SphereEmbedded(radius=radius)) if embedded else (lambda: S.Sphere(radius=radius))
    )


def skew(module: nn.Module, tensor_name: str = "weight", lower: bool = True) -> nn.Module:
    """Skew-symmetric (:class:`geofunc.Skew`), initialized with a sample of the space."""
    return _register(module, tensor_name, lambda: S.Skew(lower=lower))


def symmetric(module: nn.Module, tensor_name: str = "weight", lower: bool = True) -> nn.Module:
    """Symmetric (:class:`geofunc.Sym`); keeps the layer's own values, symmetrized as GeoTorch does.

    The new value is ``Sym(lower).to_manifold(W)`` of the current value ``W``: its lower (upper)
    triangle mirrored, exactly GeoTorch's value.
    """
    return _register(module, tensor_name, lambda: S.Sym(lower=lower), init=lambda space: space.to_manifold)
