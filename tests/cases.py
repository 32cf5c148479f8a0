"""The registry of conformance cases: every space of geofunc, one ``SpaceCase`` per variant.

A new space = one new case in the owner's file; ``tests/test_conformance.py`` runs every
property of ``geofunc.testing.PROPERTIES`` on every case.
"""

from __future__ import annotations

from cases_complex import COMPLEX_CASES
from cases_geometry import GEOMETRY_CASES
from cases_geotorch import GEOTORCH_CASES
from cases_orthogonal import ORTHOGONAL_CASES
from cases_rank import RANK_CASES
from cases_vector import VECTOR_CASES

CASES = [*VECTOR_CASES, *ORTHOGONAL_CASES, *RANK_CASES, *GEOTORCH_CASES, *GEOMETRY_CASES, *COMPLEX_CASES]

_ids = [case.id for case in CASES]
assert len(_ids) == len(set(_ids)), f"duplicate case ids: {sorted(i for i in _ids if _ids.count(i) > 1)}"
