"""``geofunc.nn``: GeoTorch's constraint one-liners for ``nn.Module`` users.

A drop-in for GeoTorch 0.4.0: ``import geofunc.nn as geotorch`` and every ``geotorch.orthogonal(
module, "weight")``-style call registers the matching geofunc space on the tensor through
``torch.nn.utils.parametrize`` (one :class:`Parametrization` adapter around any space; the chart's
base is a buffer of the adapter). Assigning ``module.weight = X`` goes through
``space.from_manifold`` and raises :class:`geofunc.ManifoldError` (leaving the module unchanged)
for a point off the space. ``state_dict``, ``.to()``, ``torch.save``, ``DistributedDataParallel``
and ``torch.compile`` work as for any module.

The bridge to the functional API: :func:`functional` returns ``(constraints, raw, bases)`` keyed
by the plain parameter names, :func:`plain` an unparametrized copy for
``torch.func.functional_call``, :func:`stack` stacks K constrained modules for ``vmap``.
"""

from ._adapter import (
    Parametrization as Parametrization,
    cached as cached,
    constrain as constrain,
    is_constrained as is_constrained,
    parametrization_of as parametrization_of,
    update_base as update_base,
)
from ._constraints import (
    SphereEmbedded as SphereEmbedded,
    almost_orthogonal as almost_orthogonal,
    fixed_rank as fixed_rank,
    grassmannian as grassmannian,
    invertible as invertible,
    low_rank as low_rank,
    orthogonal as orthogonal,
    positive_definite as positive_definite,
    positive_semidefinite as positive_semidefinite,
    positive_semidefinite_fixed_rank as positive_semidefinite_fixed_rank,
    positive_semidefinite_low_rank as positive_semidefinite_low_rank,
    skew as skew,
    sphere as sphere,
    symmetric as symmetric,
)
from ._functional import (
    functional as functional,
    load_functional as load_functional,
    module_state as module_state,
    plain as plain,
    stack as stack,
)

__all__ = [
    "Parametrization",
    "SphereEmbedded",
    "almost_orthogonal",
    "cached",
    "constrain",
    "fixed_rank",
    "functional",
    "grassmannian",
    "invertible",
    "is_constrained",
    "load_functional",
    "low_rank",
    "module_state",
    "orthogonal",
    "parametrization_of",
    "plain",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_fixed_rank",
    "positive_semidefinite_low_rank",
    "skew",
    "sphere",
    "stack",
    "symmetric",
    "update_base",
]
