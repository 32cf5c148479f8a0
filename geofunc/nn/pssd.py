"""GeoTorch's ``geotorch.pssd`` under its own name: ``geofunc.nn.pssd`` (``PSSD``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.pssd import ...`` becomes ``from geofunc.nn.pssd import ...``.
"""

from __future__ import annotations

from ._manifolds import PSSD as PSSD

__all__ = ["PSSD"]
