"""GeoTorch's ``geotorch.exceptions`` under its own name: ``geofunc.nn.exceptions``.

GeoTorch exports its exception classes only from this submodule, so GeoTorch code catches them as
``geotorch.exceptions.InManifoldError`` (or ``from geotorch.exceptions import InManifoldError``);
after ``import geofunc.nn as geotorch`` both spellings name geofunc's classes, the same objects as
``geofunc.nn.InManifoldError``, ..., each a :class:`geofunc.ManifoldError` (so a ``ValueError``).

Example::

    >>> import geofunc.nn as geotorch
    >>> try:
    ...     geotorch.SO((3,))
    ... except geotorch.exceptions.VectorError:
    ...     print("caught")
    caught
"""

from ._exceptions import (
    InManifoldError as InManifoldError,
    InverseError as InverseError,
    NonSquareError as NonSquareError,
    RankError as RankError,
    VectorError as VectorError,
)

__all__ = ["VectorError", "NonSquareError", "RankError", "InverseError", "InManifoldError"]
