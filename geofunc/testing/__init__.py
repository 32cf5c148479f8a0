"""Conformance suite for spaces: check that a space (yours too) keeps the geofunc contract.

Describe the space with a :class:`SpaceCase` and run :func:`check_space`, or call one
property function at a time; each raises ``AssertionError`` with a message naming the
case, shape, dtype and the failed property::

    import torch, geofunc as gf
    from geofunc.testing import SpaceCase, check_space

    def on_sphere(X, atol):  # independent of Sphere.contains
        return (torch.linalg.vector_norm(X, dim=-1) - 1).abs() <= atol

    check_space(SpaceCase("sphere", gf.Sphere(), shapes=((5,), (2, 3, 4)), member=on_sphere,
                          rebase_zeroes=True))

Every property function has the signature ``fn(case, dtype=torch.float64, *, generator=None)``
(``generator=None`` means a fresh generator seeded with 0). :data:`PROPERTIES` lists them
with the dtypes each runs in; ``tests/test_conformance.py`` parametrizes over it.

Beyond the plumbing (round trips, ``vmap``, ``compile``, NaN policy, ...), the properties pin the
geometry: ``tangent`` projects onto the whole tangent space (``check_tangent_space``, through the
chart's Jacobian and ``case.dim``), ``project`` is the nearest point (``check_project_normal``,
``check_project_nearest``), ``contains`` flips between 0.1× and 10× the documented tolerance
(``check_membership``, from ``case.perturb``), and ``sample`` follows its documented
distribution (``check_sample_distribution``, a z-test of ``case.moments`` with a false-alarm
rate below :data:`FALSE_ALARM` per check). A property that does not apply to a space is listed
in ``case.skip`` with the reason.
"""

from ._case import (
    DEFAULT_TOL as DEFAULT_TOL,
    MEMBERSHIP_ATOL as MEMBERSHIP_ATOL,
    SpaceCase as SpaceCase,
    documented_atol as documented_atol,
)
from ._geometry import (
    FALSE_ALARM as FALSE_ALARM,
    check_grad_float32 as check_grad_float32,
    check_membership as check_membership,
    check_project_nearest as check_project_nearest,
    check_project_normal as check_project_normal,
    check_sample_distribution as check_sample_distribution,
    check_tangent_space as check_tangent_space,
)
from ._properties import (
    check_bad_input as check_bad_input,
    check_check as check_check,
    check_compile as check_compile,
    check_contains as check_contains,
    check_from_manifold as check_from_manifold,
    check_gradcheck as check_gradcheck,
    check_hessian as check_hessian,
    check_jacobians as check_jacobians,
    check_jvp_fd as check_jvp_fd,
    check_logabsdet as check_logabsdet,
    check_nan as check_nan,
    check_project as check_project,
    check_rebase as check_rebase,
    check_retract as check_retract,
    check_sample as check_sample,
    check_tangent as check_tangent,
    check_to_manifold as check_to_manifold,
    check_vmap as check_vmap,
    check_vmap_grad as check_vmap_grad,
    no_vmap_fallback as no_vmap_fallback,
)
from ._registry import PROPERTIES as PROPERTIES, Property as Property, check_space as check_space

__all__ = [
    "DEFAULT_TOL",
    "FALSE_ALARM",
    "MEMBERSHIP_ATOL",
    "PROPERTIES",
    "Property",
    "SpaceCase",
    "check_bad_input",
    "check_check",
    "check_compile",
    "check_contains",
    "check_from_manifold",
    "check_grad_float32",
    "check_gradcheck",
    "check_hessian",
    "check_jacobians",
    "check_jvp_fd",
    "check_logabsdet",
    "check_membership",
    "check_nan",
    "check_project",
    "check_project_nearest",
    "check_project_normal",
    "check_rebase",
    "check_retract",
    "check_sample",
    "check_sample_distribution",
    "check_space",
    "check_tangent",
    "check_tangent_space",
    "check_to_manifold",
    "check_vmap",
    "check_vmap_grad",
    "documented_atol",
    "no_vmap_fallback",
]
