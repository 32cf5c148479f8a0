"""GeoTorch's ``geotorch.pssdlowrank`` under its own name: ``geofunc.nn.pssdlowrank`` (``PSSDLowRank``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.pssdlowrank import ...`` becomes ``from geofunc.nn.pssdlowrank import ...``.
"""

from __future__ import annotations

from ._manifolds import PSSDLowRank as PSSDLowRank

__all__ = ["PSSDLowRank"]
