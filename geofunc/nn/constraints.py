"""GeoTorch's ``geotorch.constraints`` under its own name, ``geofunc.nn.constraints``: the 15 constraint functions.

``from geotorch.constraints import ...`` becomes ``from geofunc.nn.constraints import ...``; the objects are
geofunc.nn's (GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in
``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._constraints import (
    almost_orthogonal as almost_orthogonal,
    alpha_stable as alpha_stable,
    fixed_rank as fixed_rank,
    grassmannian as grassmannian,
    invertible as invertible,
    low_rank as low_rank,
    orthogonal as orthogonal,
    positive_definite as positive_definite,
    positive_semidefinite as positive_semidefinite,
    positive_semidefinite_fixed_rank as positive_semidefinite_fixed_rank,
    positive_semidefinite_low_rank as positive_semidefinite_low_rank,
    skew as skew,
    sln as sln,
    sphere as sphere,
    symmetric as symmetric,
)

__all__ = [
    "symmetric",
    "skew",
    "sphere",
    "orthogonal",
    "almost_orthogonal",
    "grassmannian",
    "low_rank",
    "fixed_rank",
    "invertible",
    "sln",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_low_rank",
    "positive_semidefinite_fixed_rank",
    "alpha_stable",
]
