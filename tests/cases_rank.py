"""Conformance cases of the rank family (LowRank, FixedRank, GLp, AlmostOrthogonal, PSD, PSSD,
PSSDLowRank, PSSDFixedRank, Product).

Owner: rank engineer. Add one ``geofunc.testing.SpaceCase`` per space variant (see
``tests/cases_vector.py`` for examples and ``tests/helpers.py`` for shapes/tolerances).
"""

from __future__ import annotations

from geofunc.testing import SpaceCase

RANK_CASES: list[SpaceCase] = []
