"""GeoTorch's ``geotorch.reals`` under its own name, ``geofunc.nn.reals``: ``Rn``.

``from geotorch.reals import ...`` becomes ``from geofunc.nn.reals import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import Rn as Rn

__all__ = ["Rn"]
