"""GeoTorch's ``geotorch.hurwitz`` under its own name: ``geofunc.nn.hurwitz`` (``Hurwitz``, ``get_lyap_exp``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.hurwitz import ...`` becomes ``from geofunc.nn.hurwitz import ...``.
"""

from __future__ import annotations

from ._helpers import get_lyap_exp as get_lyap_exp
from ._manifolds import Hurwitz as Hurwitz

__all__ = ["Hurwitz", "get_lyap_exp"]
