"""The registry of conformance properties and ``check_space``, which runs them on a case."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ._case import SpaceCase
from ._geometry import (
    check_grad_float32,
    check_membership,
    check_project_nearest,
    check_project_normal,
    check_sample_distribution,
    check_tangent_space,
)
from ._properties import (
    check_bad_input,
    check_check,
    check_compile,
    check_contains,
    check_from_manifold,
    check_gradcheck,
    check_hessian,
    check_jacobians,
    check_jvp_fd,
    check_logabsdet,
    check_nan,
    check_project,
    check_rebase,
    check_retract,
    check_sample,
    check_tangent,
    check_to_manifold,
    check_vmap,
    check_vmap_grad,
)
from ._properties import _gen

__all__ = ["PROPERTIES", "Property", "check_space"]

f64 = torch.float64
f32 = torch.float32


def _always(case: SpaceCase) -> bool:
    return True


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

    def dtypes(self, case: SpaceCase) -> tuple[torch.dtype, ...]:
        """The dtypes this property runs in for ``case`` (empty if it does not apply)."""
        if self.name in case.skip or not self.applies(case):
            return ()
        if self.float64_only:
            return (f64,)
        if self.only is not None:
            return (self.only,) if self.only in case.dtypes else ()
        return tuple(case.dtypes)


PROPERTIES: tuple[Property, ...] = (
    Property("sample", check_sample),
    Property("to_manifold", check_to_manifold),
    Property("from_manifold", check_from_manifold),
    Property("rebase", check_rebase),
    Property("tangent", check_tangent),
    Property("tangent_space", check_tangent_space, float64_only=True),
    Property("retract", check_retract),
    Property("project", check_project),
    Property("project_normal", check_project_normal, float64_only=True),
    Property("project_nearest", check_project_nearest, float64_only=True),
    Property("contains", check_contains),
    Property("membership", check_membership, applies=lambda case: case.perturb is not None),
    Property("check", check_check),
    Property("nan", check_nan),
    Property("vmap", check_vmap),
    Property("sample_distribution", check_sample_distribution, float64_only=True,
             applies=lambda case: case.moments is not None),
    Property("gradcheck", check_gradcheck, float64_only=True),
    Property("grad_float32", check_grad_float32, only=f32),
    Property("jvp_fd", check_jvp_fd, float64_only=True),
    Property("jacobians", check_jacobians, float64_only=True, applies=lambda case: case.smooth),
    Property("hessian", check_hessian, float64_only=True, applies=lambda case: case.smooth),
    Property("vmap_grad", check_vmap_grad, float64_only=True),
    Property("compile", check_compile),
    Property("logabsdet", check_logabsdet, float64_only=True, applies=lambda case: case.has_logabsdet),
    Property("bad_input", check_bad_input, float64_only=True),
)


def check_space(
    case: SpaceCase,
    *,
    properties: Optional[tuple[str, ...]] = None,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Run every property that applies to ``case`` (or those named in ``properties``).

    Raises AssertionError at the first failure. Example::

        from geofunc.testing import SpaceCase, check_space
        check_space(SpaceCase("mine", MySpace(), shapes=((4, 4), (2, 5, 3)), member=my_member))
    """
    names = {p.name for p in PROPERTIES}
    unknown_skips = set(case.skip) - names
    if unknown_skips:
        raise ValueError(f"{case.id}: `skip` names unknown properties {sorted(unknown_skips)}; known: {sorted(names)}")
    if properties is not None:
        unknown = set(properties) - names
        if unknown:
            raise ValueError(f"unknown properties {sorted(unknown)}; known: {sorted(names)}")
    for prop in PROPERTIES:
        if properties is not None and prop.name not in properties:
            continue
        for dtype in prop.dtypes(case):
            prop.fn(case, dtype, generator=_gen(generator))
