"""geofunc: constrained optimization and optimization on manifolds for PyTorch, as pure functions.

Spaces are small immutable objects holding hyperparameters only; everything they do is a
pure function of tensors, so every constraint composes with ``torch.func`` (``vmap``,
``grad``, ``jvp``, ``jacfwd``, ``jacrev``, ``hessian``, ``functional_call``) and with
``torch.compile``.
"""

from . import hyperbolic as hyperbolic
from . import nn as nn
from . import optim as optim
from . import testing as testing
from ._errors import ManifoldError as ManifoldError
from ._pytree import (
    contains as contains,
    egrad_to_rgrad as egrad_to_rgrad,
    from_manifold as from_manifold,
    rebase as rebase,
    retract as retract,
    sample as sample,
    tangent as tangent,
    to_manifold as to_manifold,
    transport as transport,
)
from .spaces import (
    PSD as PSD,
    PSSD as PSSD,
    SL as SL,
    SO as SO,
    AbstractSpace as AbstractSpace,
    AlmostOrthogonal as AlmostOrthogonal,
    Birkhoff as Birkhoff,
    FixedRank as FixedRank,
    GLp as GLp,
    Grassmannian as Grassmannian,
    Hermitian as Hermitian,
    Hurwitz as Hurwitz,
    Lorentz as Lorentz,
    LowRank as LowRank,
    Oblique as Oblique,
    PSSDFixedRank as PSSDFixedRank,
    PSSDLowRank as PSSDLowRank,
    PoincareBall as PoincareBall,
    Product as Product,
    Rn as Rn,
    Skew as Skew,
    Sphere as Sphere,
    SphereEmbedded as SphereEmbedded,
    Stiefel as Stiefel,
    Sym as Sym,
    Unitary as Unitary,
)

__version__ = "0.1.0"

__all__ = [
    "PSD",
    "PSSD",
    "SL",
    "SO",
    "AbstractSpace",
    "AlmostOrthogonal",
    "Birkhoff",
    "FixedRank",
    "GLp",
    "Grassmannian",
    "Hermitian",
    "Hurwitz",
    "Lorentz",
    "LowRank",
    "ManifoldError",
    "Oblique",
    "PSSDFixedRank",
    "PSSDLowRank",
    "PoincareBall",
    "Product",
    "Rn",
    "Skew",
    "Sphere",
    "SphereEmbedded",
    "Stiefel",
    "Sym",
    "Unitary",
    "contains",
    "egrad_to_rgrad",
    "from_manifold",
    "hyperbolic",
    "nn",
    "optim",
    "rebase",
    "retract",
    "sample",
    "tangent",
    "testing",
    "to_manifold",
    "transport",
]
