"""GeoTorch's ``geotorch.so`` under its own name, ``geofunc.nn.so``: ``SO``, ``cayley_map``, ``torus_init_``,
``uniform_init_``.

``from geotorch.so import ...`` becomes ``from geofunc.nn.so import ...``; the objects are geofunc.nn's (GeoTorch's
helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._helpers import cayley_map as cayley_map
from ._manifolds import (
    SO as SO,
    torus_init_ as torus_init_,
    uniform_init_ as uniform_init_,
)

__all__ = ["SO", "cayley_map", "torus_init_", "uniform_init_"]
