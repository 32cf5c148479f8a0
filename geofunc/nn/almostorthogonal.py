"""GeoTorch's ``geotorch.almostorthogonal`` under its own name, ``geofunc.nn.almostorthogonal``: ``AlmostOrthogonal``,
``scaled_sigmoid``, ``inv_scaled_sigmoid``.

``from geotorch.almostorthogonal import ...`` becomes ``from geofunc.nn.almostorthogonal import ...``; the objects
are geofunc.nn's (GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in
``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import (
    AlmostOrthogonal as AlmostOrthogonal,
    inv_scaled_sigmoid as inv_scaled_sigmoid,
    scaled_sigmoid as scaled_sigmoid,
)

__all__ = ["AlmostOrthogonal", "scaled_sigmoid", "inv_scaled_sigmoid"]
