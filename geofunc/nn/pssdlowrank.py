"""GeoTorch's ``geotorch.pssdlowrank`` under its own name, ``geofunc.nn.pssdlowrank``: ``PSSDLowRank``.

``from geotorch.pssdlowrank import ...`` becomes ``from geofunc.nn.pssdlowrank import ...``; the objects are
geofunc.nn's (GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in
``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import PSSDLowRank as PSSDLowRank

__all__ = ["PSSDLowRank"]
