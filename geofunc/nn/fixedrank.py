"""GeoTorch's ``geotorch.fixedrank`` under its own name, ``geofunc.nn.fixedrank``: ``FixedRank``, ``softplus_epsilon``,
``inv_softplus_epsilon``.

``from geotorch.fixedrank import ...`` becomes ``from geofunc.nn.fixedrank import ...``; the objects are
geofunc.nn's (GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in
``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._helpers import (
    inv_softplus_epsilon as inv_softplus_epsilon,
    softplus_epsilon as softplus_epsilon,
)
from ._manifolds import FixedRank as FixedRank

__all__ = ["FixedRank", "softplus_epsilon", "inv_softplus_epsilon"]
