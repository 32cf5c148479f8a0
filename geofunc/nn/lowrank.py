"""GeoTorch's ``geotorch.lowrank`` under its own name, ``geofunc.nn.lowrank``: ``LowRank``.

``from geotorch.lowrank import ...`` becomes ``from geofunc.nn.lowrank import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import LowRank as LowRank

__all__ = ["LowRank"]
