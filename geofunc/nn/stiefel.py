"""GeoTorch's ``geotorch.stiefel`` under its own name, ``geofunc.nn.stiefel``: ``Stiefel``.

``from geotorch.stiefel import ...`` becomes ``from geofunc.nn.stiefel import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import Stiefel as Stiefel

__all__ = ["Stiefel"]
