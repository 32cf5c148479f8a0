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


def test_cases_skip_only_known_properties_with_a_reason() -> None:
    names = {p.name for p in PROPERTIES}
    for case in CASES:
        assert set(case.skip) <= names, (case.id, sorted(set(case.skip) - names))
        assert all(isinstance(r, str) and r.strip() for r in case.skip.values()), case.id


def test_builtin_cases_pin_their_geometry() -> None:
    """Every case of the built-in spaces gives its dimension and sample moments, and a boundary
    perturbation unless membership has no tolerance (then a reason): no property is left out
    silently for them (``check_space`` would report none as incomplete, and not warn)."""
    from cases_complex import COMPLEX_CASES
    from cases_geometry import GEOMETRY_CASES
    from cases_orthogonal import ORTHOGONAL_CASES
    from cases_rank import RANK_CASES
    from cases_vector import VECTOR_CASES

    for case in (*VECTOR_CASES, *ORTHOGONAL_CASES, *RANK_CASES, *GEOMETRY_CASES, *COMPLEX_CASES):
        assert case.dim is not None and case.moments is not None, case.id
        assert case.perturb is not None or "membership" in case.skip, case.id
        incomplete = {p.name: why for p in PROPERTIES if p.name not in case.skip and (why := p.missing(case))}
        assert not incomplete, (case.id, incomplete)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "case_id, shape", [("Sphere", (3, 1024)), ("Stiefel", (300, 4)), ("Oblique", (2, 256, 3)), ("LowRank-2", (260, 6))]
)
def test_membership_tolerance_grows_with_the_size(case_id: str, shape: tuple, dtype: torch.dtype, generator) -> None:
    """The documented tolerance grows like √(size/64) above 64 (README, "Tolerances"): at these sizes
    (factors 2 to 4) ``check_membership`` flips at the grown tolerance, not at the base one."""
    import dataclasses

    from cases import CASES
    from geofunc.testing import check_membership

    case = next(c for c in CASES if c.id == case_id)
    check_membership(dataclasses.replace(case, shapes=(shape,)), dtype, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "case_id, perturb",
    [("Oblique", "perturb_one_column"), ("Stiefel", "perturb_orthogonality"), ("Stiefel-cayley", "perturb_orthogonality"),
     ("Grassmannian", "perturb_orthogonality"), ("SO", "perturb_orthogonality"), ("SO-cayley", "perturb_orthogonality")],
)
def test_membership_flips_on_every_part_of_the_constraint(case_id: str, perturb: str, dtype: torch.dtype,
                                                          generator) -> None:
    """A case's ``perturb`` violates one part of the constraint (every column's norm at once, the
    Gram matrix scaled): ``check_membership`` also flips at the documented tolerance with only one
    column off (Oblique) and with unit columns that are not orthogonal (the orthogonal family; not
    AlmostOrthogonal, whose constraint is a band on the singular values)."""
    import dataclasses

    import reference as ref

    from geofunc.testing import check_membership

    case = next(c for c in CASES if c.id == case_id)
    check_membership(dataclasses.replace(case, perturb=getattr(ref, perturb)), dtype, generator=generator)
