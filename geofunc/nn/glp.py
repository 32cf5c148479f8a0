"""GeoTorch's ``geotorch.glp`` under its own name, ``geofunc.nn.glp``: ``GLp``.

``from geotorch.glp import ...`` becomes ``from geofunc.nn.glp import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import GLp as GLp

__all__ = ["GLp"]
