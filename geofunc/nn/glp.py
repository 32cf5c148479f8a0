"""GeoTorch's ``geotorch.glp`` under its own name: ``geofunc.nn.glp`` (``GLp``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.glp import ...`` becomes ``from geofunc.nn.glp import ...``.
"""

from __future__ import annotations

from ._manifolds import GLp as GLp

__all__ = ["GLp"]
