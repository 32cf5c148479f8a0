"""GeoTorch's ``geotorch.hurwitz`` under its own name, ``geofunc.nn.hurwitz``: ``Hurwitz``, ``get_lyap_exp``.

``from geotorch.hurwitz import ...`` becomes ``from geofunc.nn.hurwitz import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._helpers import get_lyap_exp as get_lyap_exp
from ._manifolds import Hurwitz as Hurwitz

__all__ = ["Hurwitz", "get_lyap_exp"]
