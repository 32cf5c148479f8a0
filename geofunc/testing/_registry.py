"""The registry of conformance properties and ``check_space``, which runs them on a case."""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Callable, Mapping, Optional

import torch

from ._base_derivatives import check_base_hessian
from ._case import SpaceCase
from ._geometry import (
    check_contains_batch,
    check_float32_maps,
    check_grad_float32,
    check_membership,
    check_membership_large,
    check_metric,
    check_project_nearest,
    check_project_nearest_chart,
    check_project_normal,
    check_retract_refines,
    check_retract_small_steps,
    check_sample_distribution,
    check_sample_distribution_f32,
    check_sample_independent,
    check_tangent_space,
)
from ._geodesic import (
    check_dist,
    check_expmap,
    check_expmap_geodesic,
    check_logmap,
    check_logmap_dist,
    check_sqdist,
    check_transport_isometry,
    check_transport_parallel,
    implements,
)
from ._properties import (
    check_bad_input,
    check_batch_isolation,
    check_broadcast,
    check_check,
    check_compile,
    check_compile_aot,
    check_compile_maps,
    check_contains,
    check_dtypes,
    check_from_manifold,
    check_gradcheck,
    check_gradgradcheck,
    check_hessian,
    check_nested_forward,
    check_jacobians,
    check_jvp_fd,
    check_linearize,
    check_layouts,
    check_logabsdet,
    check_nan,
    check_nonfinite,
    check_project,
    check_pure,
    check_rebase,
    check_retract,
    check_sample,
    check_tangent,
    check_to_manifold,
    check_vmap,
    check_vmap_grad,
)
from ._properties import _gen

__all__ = ["IncompleteCaseWarning", "PROPERTIES", "Property", "SpaceReport", "check_space"]

f64 = torch.float64
f32 = torch.float32


def _always(case: SpaceCase) -> bool:
    return True


def _nothing_missing(case: SpaceCase) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class Property:
    """A conformance property: ``fn(case, dtype, *, generator=None)`` raising AssertionError.

    ``float64_only`` properties run once per case, in float64 (on ``case.smoke`` and its
    transpose, or on every shape where the docstring says so); ``only`` pins another single
    dtype (run if the case has it). ``applies(case)`` says whether the case gives what the
    property needs; a case lists the properties that do not apply to its space, with the
    reason, in ``case.skip``.
    """

    name: str
    fn: Callable[..., None]
    float64_only: bool = False
    applies: Callable[[SpaceCase], bool] = _always
    only: Optional[torch.dtype] = None
    #: What ``applies`` asks of a case, for the report of :func:`check_space` (e.g. ``"case.smooth"``).
    requires: str = ""
    #: ``missing(case)``: what the case lacks for the property to pin the geometry in full (a
    #: sentence naming the field), or None. :func:`check_space` reports it and warns
    #: (:class:`IncompleteCaseWarning`) unless the case lists the property in ``case.skip``.
    missing: Callable[[SpaceCase], Optional[str]] = _nothing_missing

    def dtypes(self, case: SpaceCase) -> tuple[torch.dtype, ...]:
        """The dtypes this property runs in for ``case`` (empty if it does not apply)."""
        if self.name in case.skip or not self.applies(case):
            return ()
        if self.float64_only:
            return (f64,)
        if self.only is not None:
            return (self.only,) if self.only in case.dtypes else ()
        return tuple(case.dtypes)


def _needs_dim(case: SpaceCase) -> Optional[str]:
    return None if case.dim is not None else ("ran without its rank check (that `tangent` projects onto the whole "
                                              "tangent space and nothing more): needs case.dim")


def _needs_perturb(case: SpaceCase) -> Optional[str]:
    return None if case.perturb is not None else ("did not run (that contains/check flip at the documented "
                                                  "tolerance): needs case.perturb")


def _needs_retract_perturb(case: SpaceCase) -> Optional[str]:
    return None if case.perturb is not None else ("did not run (that retract does not carry its base point's "
                                                  "error): needs case.perturb")


def _needs_moments(case: SpaceCase) -> Optional[str]:
    return None if case.moments is not None else ("did not run (that sample follows its documented "
                                                  "distribution): needs case.moments")


def _implementing(*maps: str) -> Callable[[SpaceCase], bool]:
    """``applies`` of a property of the closed-form maps: the space implements all of ``maps``
    (Note [Which spaces have the closed forms] in ``_geodesic.py``)."""
    return lambda case: all(implements(case.space, m) for m in maps)


def _requires_maps(*maps: str) -> str:
    return "the space to implement " + " and ".join(maps)


def _with(name: str, missing: Callable[[SpaceCase], Optional[str]]) -> Callable[[SpaceCase], Optional[str]]:
    """``missing`` of a property that runs another one's check further (``membership_large``):
    nothing is missing when the case skips that one (with its reason)."""
    return lambda case: None if name in case.skip else missing(case)


# A property that extends another (a larger shape, float32, other candidates) does not apply where
# the case skips that one: the case's reason covers both.
PROPERTIES: tuple[Property, ...] = (
    Property("sample", check_sample),
    Property("to_manifold", check_to_manifold),
    Property("from_manifold", check_from_manifold),
    Property("rebase", check_rebase),
    Property("tangent", check_tangent),
    Property("tangent_space", check_tangent_space, float64_only=True, missing=_needs_dim),
    Property("retract", check_retract),
    Property("retract_small_steps", check_retract_small_steps, float64_only=True),
    Property("retract_refines", check_retract_refines, float64_only=True, applies=lambda case: case.perturb is not None,
             requires="case.perturb", missing=_with("membership", _needs_retract_perturb)),
    Property("project", check_project),
    Property("project_normal", check_project_normal, float64_only=True),
    Property("project_nearest", check_project_nearest, float64_only=True),
    Property("project_nearest_chart", check_project_nearest_chart, float64_only=True,
             applies=lambda case: "project_nearest" not in case.skip, requires="project_nearest not in case.skip"),
    Property("metric", check_metric),
    Property("dist", check_dist, float64_only=True, applies=_implementing("dist"), requires=_requires_maps("dist")),
    Property("expmap", check_expmap, float64_only=True, applies=_implementing("expmap"),
             requires=_requires_maps("expmap")),
    Property("expmap_geodesic", check_expmap_geodesic, float64_only=True, applies=_implementing("expmap", "dist"),
             requires=_requires_maps("expmap", "dist")),
    Property("logmap", check_logmap, float64_only=True, applies=_implementing("logmap", "expmap"),
             requires=_requires_maps("logmap", "expmap")),
    Property("logmap_dist", check_logmap_dist, float64_only=True, applies=_implementing("logmap", "dist"),
             requires=_requires_maps("logmap", "dist")),
    Property("sqdist", check_sqdist, float64_only=True, applies=_implementing("logmap", "dist"),
             requires=_requires_maps("logmap", "dist")),
    Property("transport_isometry", check_transport_isometry, float64_only=True,
             applies=lambda case: case.transport in ("isometric", "parallel"),
             requires="case.transport = 'isometric' or 'parallel'"),
    Property("transport_parallel", check_transport_parallel, float64_only=True,
             applies=lambda case: case.transport == "parallel" and all(implements(case.space, m) for m in ("expmap", "logmap")),
             requires="case.transport = 'parallel' and the space to implement expmap and logmap"),
    Property("contains", check_contains),
    Property("membership", check_membership, applies=lambda case: case.perturb is not None, requires="case.perturb",
             missing=_needs_perturb),
    Property("membership_large", check_membership_large,
             applies=lambda case: case.perturb is not None and "membership" not in case.skip,
             requires="case.perturb, and membership not in case.skip", missing=_with("membership", _needs_perturb)),
    Property("contains_batch", check_contains_batch),
    Property("check", check_check),
    Property("nan", check_nan),
    Property("nonfinite", check_nonfinite),
    Property("batch_isolation", check_batch_isolation, float64_only=True),
    Property("broadcast", check_broadcast, float64_only=True),
    Property("pure", check_pure),
    Property("layouts", check_layouts),
    Property("dtypes", check_dtypes),
    Property("vmap", check_vmap),
    Property("sample_distribution", check_sample_distribution, float64_only=True,
             applies=lambda case: case.moments is not None, requires="case.moments", missing=_needs_moments),
    Property("sample_distribution_f32", check_sample_distribution_f32, only=f32,
             applies=lambda case: case.moments is not None and "sample_distribution" not in case.skip,
             requires="case.moments, and sample_distribution not in case.skip",
             missing=_with("sample_distribution", _needs_moments)),
    Property("sample_independent", check_sample_independent, float64_only=True),
    Property("gradcheck", check_gradcheck, float64_only=True),
    Property("gradgradcheck", check_gradgradcheck, float64_only=True),
    Property("grad_float32", check_grad_float32, only=f32),
    Property("float32_maps", check_float32_maps, only=f32),
    Property("jvp_fd", check_jvp_fd, float64_only=True),
    Property("jacobians", check_jacobians, float64_only=True, applies=lambda case: case.smooth,
             requires="case.smooth"),
    Property("hessian", check_hessian, float64_only=True, applies=lambda case: case.smooth, requires="case.smooth"),
    Property("nested_forward", check_nested_forward, float64_only=True),
    Property("base_hessian", check_base_hessian, float64_only=True),
    Property("linearize", check_linearize, float64_only=True),
    Property("vmap_grad", check_vmap_grad, float64_only=True),
    Property("compile", check_compile),
    # compile_aot compiles the maps of compile_maps through Dynamo, then AOT autograd: a graph break
    # fails both; compile_maps (Dynamo's graph only, half the cost) runs where a case skips compile_aot.
    Property("compile_maps", check_compile_maps, float64_only=True, applies=lambda case: "compile_aot" in case.skip,
             requires="compile_aot in case.skip (compile_aot traces the same maps, through Dynamo and then AOT autograd)"),
    Property("compile_aot", check_compile_aot, float64_only=True),
    Property("logabsdet", check_logabsdet, float64_only=True, applies=lambda case: case.has_logabsdet,
             requires="case.has_logabsdet"),
    Property("bad_input", check_bad_input, float64_only=True),
)


class IncompleteCaseWarning(UserWarning):
    """:func:`check_space` ran a case that lacks what a geometry property needs (``dim``,
    ``perturb``, ``moments``), so that property did not run, or ran only in part, and the case does
    not list it in ``skip`` with a reason."""


@dataclasses.dataclass(frozen=True)
class SpaceReport:
    """What :func:`check_space` ran on a case (every run passed: a failure raises).

    Attributes:
        case_id: the case's ``id``.
        ran: ``(property name, dtype)`` of every property run.
        skipped: ``{property name: reason}`` of the properties that did not run: listed in
            ``case.skip`` (its reason), not applicable by a field of the case (``smooth=False``,
            ``has_logabsdet=False``, no float32 in ``dtypes``), or missing a field.
        incomplete: ``{property name: what is missing}``: the geometry properties that did not
            run, or ran only in part, because the case lacks ``dim``, ``perturb`` or ``moments``
            and does not list them in ``case.skip``. Non-empty: ``check_space`` warned
            (:class:`IncompleteCaseWarning`).
    """

    case_id: str
    ran: tuple[tuple[str, torch.dtype], ...]
    skipped: Mapping[str, str]
    incomplete: Mapping[str, str]

    def __str__(self) -> str:
        lines = [f"{self.case_id}: {len(self.ran)} property runs passed"]
        lines += [f"  incomplete: {name} {why}" for name, why in self.incomplete.items()]
        lines += [f"  skipped: {name}: {why}" for name, why in self.skipped.items() if name not in self.incomplete]
        return "\n".join(lines)


def _not_run_reason(prop: Property, case: SpaceCase) -> str:
    if prop.name in case.skip:
        return f"case.skip: {case.skip[prop.name]}"
    if not prop.applies(case):
        return f"needs {prop.requires}" if prop.requires else "does not apply to the case"
    return f"runs in {prop.only} only, which is not in case.dtypes"


def check_space(
    case: SpaceCase,
    *,
    properties: Optional[tuple[str, ...]] = None,
    generator: Optional[torch.Generator] = None,
) -> SpaceReport:
    """Run every property that applies to ``case`` (or those named in ``properties``).

    Raises AssertionError at the first failure. Returns a :class:`SpaceReport`: what ran and
    what did not, with the reason. A case without ``dim``, ``perturb`` or ``moments`` leaves part
    of the geometry unchecked (``tangent_space``'s rank check, ``membership``,
    ``sample_distribution``): unless it lists those properties in ``case.skip`` with a reason,
    ``check_space`` warns (:class:`IncompleteCaseWarning`, naming them) and the report's
    ``incomplete`` lists them. Example::

        from geofunc.testing import SpaceCase, check_space
        report = check_space(SpaceCase("mine", MySpace(), shapes=((4, 4), (2, 5, 3)), member=my_member,
                                       dim=my_dim, perturb=my_perturb, moments=my_moments))
        print(report)
    """
    names = {p.name for p in PROPERTIES}
    unknown_skips = set(case.skip) - names
    if unknown_skips:
        raise ValueError(f"{case.id}: `skip` names unknown properties {sorted(unknown_skips)}; known: {sorted(names)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"check_space: `generator` must be None or a torch.Generator, got {generator!r}")
    if isinstance(properties, str):  # one name: iterated, it was its letters
        properties = (properties,)
    if properties is not None:
        unknown = set(properties) - names
        if unknown:
            raise ValueError(f"unknown properties {sorted(unknown)}; known: {sorted(names)}")
    selected = [p for p in PROPERTIES if properties is None or p.name in properties]
    incomplete = {p.name: why for p in selected if p.name not in case.skip and (why := p.missing(case)) is not None}
    if incomplete:
        warnings.warn(IncompleteCaseWarning(
            f"check_space({case.id!r}): the case leaves geometry unchecked: "
            + "; ".join(f"{name} {why}" for name, why in incomplete.items())
            + ". Give the case those fields, or list the properties in case.skip with the reason they do not apply."),
            stacklevel=2)
    ran: list[tuple[str, torch.dtype]] = []
    skipped: dict[str, str] = {}
    for prop in selected:
        dtypes = prop.dtypes(case)
        if not dtypes:
            skipped[prop.name] = _not_run_reason(prop, case)
        for dtype in dtypes:
            try:
                prop.fn(case, dtype, generator=_gen(generator))
            except AssertionError as e:  # named, for case.skip or properties=(...)
                if f"property {prop.name!r}" in str(e):  # (an unexpected exception's message names it already)
                    raise
                raise AssertionError(f"property {prop.name!r} failed: {e}") from e
            ran.append((prop.name, dtype))
    return SpaceReport(case.id, tuple(ran), types.MappingProxyType(skipped), types.MappingProxyType(incomplete))
