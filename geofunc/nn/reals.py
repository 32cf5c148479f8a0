"""GeoTorch's ``geotorch.reals`` under its own name: ``geofunc.nn.reals`` (``Rn``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.reals import ...`` becomes ``from geofunc.nn.reals import ...``.
"""

from __future__ import annotations

from ._manifolds import Rn as Rn

__all__ = ["Rn"]
