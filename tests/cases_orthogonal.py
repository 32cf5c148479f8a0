"""Conformance cases of the orthogonal family (SO, Stiefel, Grassmannian).

Owner: lead. Add one ``geofunc.testing.SpaceCase`` per space variant (see
``tests/cases_vector.py`` for examples and ``tests/helpers.py`` for shapes/tolerances).
"""

from __future__ import annotations

from geofunc.testing import SpaceCase

ORTHOGONAL_CASES: list[SpaceCase] = []
