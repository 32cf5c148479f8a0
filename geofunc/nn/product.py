"""GeoTorch's ``geotorch.product`` under its own name, ``geofunc.nn.product``: ``ProductManifold``.

``from geotorch.product import ...`` becomes ``from geofunc.nn.product import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import ProductManifold as ProductManifold

__all__ = ["ProductManifold"]
