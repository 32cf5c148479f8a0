"""GeoTorch's ``geotorch.product`` under its own name: ``geofunc.nn.product`` (``ProductManifold``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.product import ...`` becomes ``from geofunc.nn.product import ...``.
"""

from __future__ import annotations

from ._manifolds import ProductManifold as ProductManifold

__all__ = ["ProductManifold"]
