"""GeoTorch's ``geotorch.psd`` under its own name: ``geofunc.nn.psd`` (``PSD``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.psd import ...`` becomes ``from geofunc.nn.psd import ...``.
"""

from __future__ import annotations

from ._manifolds import PSD as PSD

__all__ = ["PSD"]
