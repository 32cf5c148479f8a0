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
with the dtypes each runs in; ``tests/test_conformance.py`` parametrizes over it. An exception
other than an AssertionError raised inside a property (a space's RuntimeError, a ManifoldError on
valid input) is re-raised as an AssertionError naming the property, case, shape and dtype,
chained to the original.

Beyond the plumbing (round trips, ``vmap`` and ``compile`` of every map, the NaN/inf policy,
purity, dtypes, ...), the properties pin the geometry: ``tangent`` projects onto the whole
tangent space (``check_tangent_space``, through the chart's Jacobian and ``case.dim``),
``retract`` is first-order at every step size and lands on the space at large ones
(``check_retract_small_steps``, ``check_retract``), the metric is a metric and
``egrad_to_rgrad``/``transport`` agree with it, ``transport`` linear (``check_metric``), the
float32 maps are the float64 ones rounded (``check_float32_maps``), ``project`` is the nearest point
(``check_project_normal``, ``check_project_nearest``, ``check_project_nearest_chart``),
``contains`` flips between 0.1× and 10× the documented tolerance, and at an explicit ``atol``
(``check_membership``, from ``case.perturb``; ``check_membership_large`` at a large point shape)
and judges each point of a batch on its own (``check_contains_batch``), and ``sample`` follows its
documented distribution (``check_sample_distribution``, ``check_sample_distribution_f32``: a z-test of
``case.moments`` with a false-alarm rate below :data:`FALSE_ALARM` per check) with independent points
(``check_sample_independent``). Where a space implements the closed forms (its class overrides
``dist``, ``expmap``, ``logmap`` of ``AbstractSpace``, which raise ``ManifoldError``: :func:`implements`),
``dist`` is a distance and the metric's to first order (``check_dist``: ``dist(X, retract(X, tV))/t →
√inner(X, V, V)``, which pins ``inner`` itself), ``expmap`` is a retraction onto the space
(``check_expmap``) that walks geodesics at unit speed (``check_expmap_geodesic``), and ``logmap``
inverts it in the tangent space (``check_logmap``) with length ``dist`` (``check_logmap_dist``), all in
float64 within ``case.geodesic_radius``; elsewhere they are reported skipped. A case whose
``transport`` is documented as isometric or as the parallel transport says so
(``case.transport``), and ``check_transport_isometry`` / ``check_transport_parallel`` hold it to
that (the velocity of the geodesic carried to its velocity, composition along it).
``check_base_hessian`` holds the maps' second derivatives in the base point (Hessian-vector products
by double backward and ``jvp`` of ``grad``) to finite differences of their gradient. A property that
does not apply to a space is listed in ``case.skip`` with the reason; :func:`check_space` returns
a :class:`SpaceReport` of what ran and what did not, and warns (:class:`IncompleteCaseWarning`)
when a case without ``dim``, ``perturb`` or ``moments`` leaves part of the geometry unchecked.
"""

from ._base_derivatives import check_base_hessian as check_base_hessian
from ._case import (
    DEFAULT_TOL as DEFAULT_TOL,
    MEMBERSHIP_ATOL as MEMBERSHIP_ATOL,
    SpaceCase as SpaceCase,
    documented_atol as documented_atol,
)
from ._geometry import (
    FALSE_ALARM as FALSE_ALARM,
    check_contains_batch as check_contains_batch,
    check_float32_maps as check_float32_maps,
    check_grad_float32 as check_grad_float32,
    check_membership as check_membership,
    check_membership_large as check_membership_large,
    check_metric as check_metric,
    check_project_nearest as check_project_nearest,
    check_project_nearest_chart as check_project_nearest_chart,
    check_project_normal as check_project_normal,
    check_retract_refines as check_retract_refines,
    check_retract_small_steps as check_retract_small_steps,
    check_sample_distribution as check_sample_distribution,
    check_sample_distribution_f32 as check_sample_distribution_f32,
    check_sample_independent as check_sample_independent,
    check_tangent_space as check_tangent_space,
)
from ._geodesic import (
    check_dist as check_dist,
    check_expmap as check_expmap,
    check_expmap_geodesic as check_expmap_geodesic,
    check_logmap as check_logmap,
    check_logmap_dist as check_logmap_dist,
    check_sqdist as check_sqdist,
    check_transport_isometry as check_transport_isometry,
    check_transport_parallel as check_transport_parallel,
    implements as implements,
)
from ._properties import (
    check_bad_input as check_bad_input,
    check_check as check_check,
    check_compile as check_compile,
    check_compile_aot as check_compile_aot,
    check_compile_maps as check_compile_maps,
    check_contains as check_contains,
    check_dtypes as check_dtypes,
    check_from_manifold as check_from_manifold,
    check_gradcheck as check_gradcheck,
    check_gradgradcheck as check_gradgradcheck,
    check_hessian as check_hessian,
    check_nested_forward as check_nested_forward,
    check_jacobians as check_jacobians,
    check_jvp_fd as check_jvp_fd,
    check_linearize as check_linearize,
    check_layouts as check_layouts,
    check_logabsdet as check_logabsdet,
    check_nan as check_nan,
    check_nonfinite as check_nonfinite,
    check_batch_isolation as check_batch_isolation,
    check_broadcast as check_broadcast,
    check_project as check_project,
    check_pure as check_pure,
    check_rebase as check_rebase,
    check_retract as check_retract,
    check_sample as check_sample,
    check_tangent as check_tangent,
    check_to_manifold as check_to_manifold,
    check_vmap as check_vmap,
    check_vmap_grad as check_vmap_grad,
    no_vmap_fallback as no_vmap_fallback,
)
from ._registry import (
    PROPERTIES as PROPERTIES,
    IncompleteCaseWarning as IncompleteCaseWarning,
    Property as Property,
    SpaceReport as SpaceReport,
    check_space as check_space,
)

__all__ = [
    "DEFAULT_TOL",
    "FALSE_ALARM",
    "IncompleteCaseWarning",
    "MEMBERSHIP_ATOL",
    "PROPERTIES",
    "Property",
    "SpaceCase",
    "SpaceReport",
    "check_bad_input",
    "check_check",
    "check_compile",
    "check_compile_aot",
    "check_compile_maps",
    "check_contains",
    "check_contains_batch",
    "check_dist",
    "check_dtypes",
    "check_expmap",
    "check_expmap_geodesic",
    "check_float32_maps",
    "check_from_manifold",
    "check_grad_float32",
    "check_gradcheck",
    "check_gradgradcheck",
    "check_hessian",
    "check_nested_forward",
    "check_base_hessian",
    "check_jacobians",
    "check_jvp_fd",
    "check_linearize",
    "check_layouts",
    "check_logabsdet",
    "check_logmap",
    "check_logmap_dist",
    "check_sqdist",
    "check_membership",
    "check_membership_large",
    "check_metric",
    "check_nan",
    "check_nonfinite",
    "check_batch_isolation",
    "check_broadcast",
    "check_project",
    "check_project_nearest",
    "check_project_nearest_chart",
    "check_project_normal",
    "check_pure",
    "check_rebase",
    "check_retract",
    "check_retract_refines",
    "check_retract_small_steps",
    "check_sample",
    "check_sample_distribution",
    "check_sample_distribution_f32",
    "check_sample_independent",
    "check_space",
    "check_tangent",
    "check_tangent_space",
    "check_to_manifold",
    "check_transport_isometry",
    "check_transport_parallel",
    "check_vmap",
    "check_vmap_grad",
    "documented_atol",
    "implements",
    "no_vmap_fallback",
]
