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
"""

from ._case import DEFAULT_TOL as DEFAULT_TOL, SpaceCase as SpaceCase
from ._properties import (
    PROPERTIES as PROPERTIES,
    Property as Property,
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
    check_space as check_space,
    check_tangent as check_tangent,
    check_to_manifold as check_to_manifold,
    check_vmap as check_vmap,
    check_vmap_grad as check_vmap_grad,
    no_vmap_fallback as no_vmap_fallback,
)

__all__ = [
    "DEFAULT_TOL",
    "PROPERTIES",
    "Property",
    "SpaceCase",
    "check_bad_input",
    "check_check",
    "check_compile",
    "check_contains",
    "check_from_manifold",
    "check_gradcheck",
    "check_hessian",
    "check_jacobians",
    "check_jvp_fd",
    "check_logabsdet",
    "check_nan",
    "check_project",
    "check_rebase",
    "check_retract",
    "check_sample",
    "check_space",
    "check_tangent",
    "check_to_manifold",
    "check_vmap",
    "check_vmap_grad",
    "no_vmap_fallback",
]
