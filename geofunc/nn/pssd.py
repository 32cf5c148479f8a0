"""GeoTorch's ``geotorch.pssd`` under its own name, ``geofunc.nn.pssd``: ``PSSD``.

``from geotorch.pssd import ...`` becomes ``from geofunc.nn.pssd import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import PSSD as PSSD

__all__ = ["PSSD"]
