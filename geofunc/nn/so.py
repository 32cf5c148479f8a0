"""GeoTorch's ``geotorch.so`` under its own name: ``geofunc.nn.so`` (``SO``, ``cayley_map``, ``torus_init_``, ``uniform_init_``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.so import ...`` becomes ``from geofunc.nn.so import ...``.
"""

from __future__ import annotations

from ._helpers import cayley_map as cayley_map
from ._manifolds import (
    SO as SO,
    torus_init_ as torus_init_,
    uniform_init_ as uniform_init_,
)

__all__ = ["SO", "cayley_map", "torus_init_", "uniform_init_"]
