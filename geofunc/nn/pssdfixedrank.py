"""GeoTorch's ``geotorch.pssdfixedrank`` under its own name: ``geofunc.nn.pssdfixedrank`` (``PSSDFixedRank``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.pssdfixedrank import ...`` becomes ``from geofunc.nn.pssdfixedrank import ...``.
"""

from __future__ import annotations

from ._manifolds import PSSDFixedRank as PSSDFixedRank

__all__ = ["PSSDFixedRank"]
