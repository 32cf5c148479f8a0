"""``geofunc.nn``: GeoTorch 0.4.0's public API for ``nn.Module`` users, on geofunc's spaces.

``import geofunc.nn as geotorch`` serves code written against every name of GeoTorch 0.4.0's
``__all__``:

* the 15 constraint one-liners (``orthogonal``, ``low_rank``, ..., ``sln``, ``alpha_stable``),
  with GeoTorch's argument names and defaults, which register GeoTorch's class for the tensor
  through ``torch.nn.utils.parametrize`` and start it at GeoTorch's ``sample()``;
* the 19 classes (``SO(size, triv, lower)``, ``Stiefel``, ..., ``Hurwitz(size, alpha, triv)``,
  ``ProductManifold``) as parametrization modules with ``forward``, ``right_inverse``,
  ``sample(...)``, ``in_manifold(X, eps)`` and ``update_base``: each an adapter over a pure
  geofunc space (``M.space``), so the maths lives once;
* ``update_base(layer, tensor_name)``, ``torus_init_``, ``uniform_init_``, ``parametrize.cached()`` and the
  exception classes ``VectorError``, ``NonSquareError``, ``RankError``, ``InManifoldError``,
  ``InverseError`` (each a :class:`geofunc.ManifoldError`), also under GeoTorch's module name
  ``geofunc.nn.exceptions`` (``except geotorch.exceptions.InManifoldError`` keeps working);
* GeoTorch's module layout: each of its 21 modules under the same name (``from geofunc.nn.so import
  torus_init_`` for ``from geotorch.so import torus_init_``), with the helpers GeoTorch keeps there
  (``scaled_sigmoid``, ``softplus_epsilon``, ``cayley_map``, ``get_lyap_exp``, ``project``,
  ``uniform_init_sphere_``, ``SymF``, ``transpose``).

Assigning ``module.weight = X`` goes through ``right_inverse`` and raises
:class:`InManifoldError` (leaving the module unchanged) for a point off the space.
``state_dict``, ``.to()``, ``torch.save``, ``DistributedDataParallel`` and ``torch.compile``
work as for any module.

Beyond GeoTorch: :func:`constrain` puts any geofunc space on a tensor (one
:class:`Parametrization` adapter), and the bridge to the functional API: :func:`functional`
returns ``(constraints, raw, bases)`` keyed by the plain parameter names, :func:`plain` an
unparametrized copy for ``torch.func.functional_call``, :func:`stack` stacks K constrained
modules for ``vmap``; :func:`average_` averages constrained modules as points (an EMA, a model
soup), where an average of raw tensors and bases is not one.
"""

from . import exceptions as exceptions, parametrize as parametrize

# Note [GeoTorch's module layout]
# GeoTorch's classes and helpers also live in its submodules (geotorch.so, geotorch.sphere, ...; 21 of them), and
# its own examples import from there (`from geotorch.so import torus_init_`), so a port that renames the package
# (`geotorch` -> `geofunc.nn`) needs the same module names: geofunc.nn.so, ..., each a re-export of the objects
# geofunc.nn holds, plus what GeoTorch defines only there (scaled_sigmoid, softplus_epsilon, cayley_map,
# get_lyap_exp, project, uniform_init_sphere_, SymF, transpose). Seventeen are files. Four of GeoTorch's module
# names are also constraint functions (skew, symmetric, sphere, grassmannian), and in GeoTorch the attribute is the
# function: those four are modules made here and entered in sys.modules only (_layout_module), so that
# `geofunc.nn.sphere` stays the function while `from geofunc.nn.sphere import project` finds the module (a file
# would be imported over the attribute by its first import, and the docs' reference, which reads the package's
# files, rendered the module in the function's place). (As in GeoTorch, `import geofunc.nn.sphere as m` binds the
# attribute, the function.) None is in __all__: the names they hold are (SymF included), GeoTorch's helpers stay
# in their modules.
from . import (  # noqa: E402 (Note [GeoTorch's module layout])
    almostorthogonal as almostorthogonal,
    constraints as constraints,
    fixedrank as fixedrank,
    glp as glp,
    hurwitz as hurwitz,
    lowrank as lowrank,
    product as product,
    psd as psd,
    pssd as pssd,
    pssdfixedrank as pssdfixedrank,
    pssdlowrank as pssdlowrank,
    reals as reals,
    sl as sl,
    so as so,
    stiefel as stiefel,
    utils as utils,
)

# the file modules of the layout (the other four: _layout below)
_LAYOUT_FILES = (almostorthogonal, constraints, exceptions, fixedrank, glp, hurwitz, lowrank, product, psd, pssd,
                 pssdfixedrank, pssdlowrank, reals, sl, so, stiefel, utils)
from ._adapter import (
    Parametrization as Parametrization,
    cached as cached,
    constrain as constrain,
    is_constrained as is_constrained,
    parametrization_of as parametrization_of,
    update_base as update_base,
)
from ._constraints import (
    almost_orthogonal as almost_orthogonal,
    alpha_stable as alpha_stable,
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
    sln as sln,
    sphere as sphere,
    symmetric as symmetric,
)
from ._exceptions import (
    InManifoldError as InManifoldError,
    InverseError as InverseError,
    NonSquareError as NonSquareError,
    RankError as RankError,
    VectorError as VectorError,
)
from ._functional import (
    average_ as average_,
    functional as functional,
    load_functional as load_functional,
    module_state as module_state,
    plain as plain,
    stack as stack,
)
from ._manifolds import (
    PSD as PSD,
    PSSD as PSSD,
    SL as SL,
    SO as SO,
    AlmostOrthogonal as AlmostOrthogonal,
    FixedRank as FixedRank,
    GLp as GLp,
    Grassmannian as Grassmannian,
    Hurwitz as Hurwitz,
    LowRank as LowRank,
    ProductManifold as ProductManifold,
    PSSDFixedRank as PSSDFixedRank,
    PSSDLowRank as PSSDLowRank,
    Rn as Rn,
    Skew as Skew,
    Sphere as Sphere,
    SphereEmbedded as SphereEmbedded,
    Stiefel as Stiefel,
    SymF as SymF,
    Symmetric as Symmetric,
    torus_init_ as torus_init_,
    uniform_init_ as uniform_init_,
)
from ..spaces import SphereEmbedded as SphereEmbeddedSpace  # the earlier name of gf.SphereEmbedded

__all__ = [
    "PSD",
    "PSSD",
    "SL",
    "SO",
    "AlmostOrthogonal",
    "FixedRank",
    "GLp",
    "Grassmannian",
    "Hurwitz",
    "InManifoldError",
    "InverseError",
    "LowRank",
    "NonSquareError",
    "PSSDFixedRank",
    "PSSDLowRank",
    "Parametrization",
    "ProductManifold",
    "RankError",
    "Rn",
    "Skew",
    "Sphere",
    "SphereEmbedded",
    "SphereEmbeddedSpace",
    "Stiefel",
    "SymF",
    "Symmetric",
    "VectorError",
    "almost_orthogonal",
    "alpha_stable",
    "average_",
    "cached",
    "constrain",
    "exceptions",
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
    "parametrize",
    "plain",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_fixed_rank",
    "positive_semidefinite_low_rank",
    "skew",
    "sln",
    "sphere",
    "stack",
    "symmetric",
    "torus_init_",
    "uniform_init_",
    "update_base",
]


def _layout_module(name: str, **objects: object) -> None:
    """Enter GeoTorch's module ``geotorch.<name>`` as ``geofunc.nn.<name>`` in ``sys.modules`` only (Note [GeoTorch's
    module layout]): ``from geofunc.nn.<name> import X`` works, the attribute ``geofunc.nn.<name>`` stays the
    constraint function."""
    import sys
    import types

    full = f"{__name__}.{name}"
    module = types.ModuleType(full, f"GeoTorch's ``geotorch.{name}`` under its own name (Note [GeoTorch's module "
                                    f"layout] in ``geofunc/nn/__init__.py``): {', '.join(objects)}.")
    module.__dict__.update(objects)
    module.__all__ = list(objects)  # type: ignore[attr-defined]
    sys.modules[full] = module


def _layout() -> None:
    from ._helpers import project, uniform_init_sphere_
    from ._manifolds import SymF

    _layout_module("grassmannian", Grassmannian=Grassmannian)
    _layout_module("skew", Skew=Skew)
    _layout_module("sphere", Sphere=Sphere, SphereEmbedded=SphereEmbedded, project=project,
                   uniform_init_sphere_=uniform_init_sphere_)
    _layout_module("symmetric", Symmetric=Symmetric, SymF=SymF)


_layout()
del _layout
