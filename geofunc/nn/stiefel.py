"""GeoTorch's ``geotorch.stiefel`` under its own name: ``geofunc.nn.stiefel`` (``Stiefel``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.stiefel import ...`` becomes ``from geofunc.nn.stiefel import ...``.
"""

from __future__ import annotations

from ._manifolds import Stiefel as Stiefel

__all__ = ["Stiefel"]
