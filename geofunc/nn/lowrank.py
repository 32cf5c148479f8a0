"""GeoTorch's ``geotorch.lowrank`` under its own name: ``geofunc.nn.lowrank`` (``LowRank``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.lowrank import ...`` becomes ``from geofunc.nn.lowrank import ...``.
"""

from __future__ import annotations

from ._manifolds import LowRank as LowRank

__all__ = ["LowRank"]
