"""GeoTorch's ``geotorch.utils`` under its own name: ``geofunc.nn.utils`` (``update_base``, ``transpose``).

The same objects as ``geofunc.nn``'s (Note [GeoTorch's module layout] in ``geofunc/nn/__init__.py``):
``from geotorch.utils import ...`` becomes ``from geofunc.nn.utils import ...``.
"""

from __future__ import annotations

from ._adapter import update_base as update_base
from ._helpers import transpose as transpose

__all__ = ["update_base", "transpose"]
