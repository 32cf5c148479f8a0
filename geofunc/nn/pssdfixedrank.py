"""GeoTorch's ``geotorch.pssdfixedrank`` under its own name, ``geofunc.nn.pssdfixedrank``: ``PSSDFixedRank``.

``from geotorch.pssdfixedrank import ...`` becomes ``from geofunc.nn.pssdfixedrank import ...``; the objects are
geofunc.nn's (GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in
``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._manifolds import PSSDFixedRank as PSSDFixedRank

__all__ = ["PSSDFixedRank"]
