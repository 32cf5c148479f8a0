"""GeoTorch's ``geotorch.sl`` under its own name, ``geofunc.nn.sl``: ``SL``.

``from geotorch.sl import ...`` becomes ``from geofunc.nn.sl import ...``; the objects are geofunc.nn's (GeoTorch's
helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import SL as SL

__all__ = ["SL"]
