"""GeoTorch's ``geotorch.sl`` under its own name: ``geofunc.nn.sl`` (``SL``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.sl import ...`` becomes ``from geofunc.nn.sl import ...``.
"""

from __future__ import annotations

from ._manifolds import SL as SL

__all__ = ["SL"]
