"""The conformance suite: every property of ``geofunc.testing.PROPERTIES`` on every case of
``tests/cases.py``, per dtype (float64-only properties such as gradcheck run once).

Test ids read ``<case>-<property>-<dtype>``, e.g. ``Sphere-vmap-float32``; select with
``-k``, e.g. ``pytest tests/test_conformance.py -k "Oblique and not compile"``.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES

from geofunc.testing import PROPERTIES, Property, SpaceCase

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def _params():
    for case in CASES:
        for prop in PROPERTIES:
            for dtype in prop.dtypes(case):
                yield pytest.param(case, prop, dtype, id=f"{case.id}-{prop.name}-{_DTYPE_NAMES.get(dtype, str(dtype))}")


@pytest.mark.parametrize(("case", "prop", "dtype"), list(_params()))
def test_conformance(case: SpaceCase, prop: Property, dtype: torch.dtype, generator: torch.Generator) -> None:
    prop.fn(case, dtype, generator=generator)
