"""GeoTorch's ``geotorch.psd`` under its own name, ``geofunc.nn.psd``: ``PSD``.

``from geotorch.psd import ...`` becomes ``from geofunc.nn.psd import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import PSD as PSD

__all__ = ["PSD"]
