"""GeoTorch's ``geotorch.utils`` under its own name, ``geofunc.nn.utils``: ``update_base``, ``transpose``.

``from geotorch.utils import ...`` becomes ``from geofunc.nn.utils import ...``; the objects are geofunc.nn's
(GeoTorch's helpers: ``geofunc/nn/_helpers.py``). Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``.
"""

from __future__ import annotations

from ._adapter import update_base as update_base
from ._helpers import transpose as transpose

__all__ = ["update_base", "transpose"]
