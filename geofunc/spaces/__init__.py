"""Every space of geofunc, one final class per private module."""

from ._almost_orthogonal import AlmostOrthogonal as AlmostOrthogonal
from ._base import AbstractSpace as AbstractSpace
from ._birkhoff import Birkhoff as Birkhoff
from ._fixed_rank import FixedRank as FixedRank
from ._glp import GLp as GLp
from ._grassmannian import Grassmannian as Grassmannian
from ._hermitian import Hermitian as Hermitian
from ._hurwitz import Hurwitz as Hurwitz
from ._lorentz import Lorentz as Lorentz
from ._low_rank import LowRank as LowRank
from ._oblique import Oblique as Oblique
from ._poincare import PoincareBall as PoincareBall
from ._product import Product as Product
from ._psd import PSD as PSD
from ._pssd import PSSD as PSSD
from ._pssd_fixed_rank import PSSDFixedRank as PSSDFixedRank
from ._pssd_low_rank import PSSDLowRank as PSSDLowRank
from ._rn import Rn as Rn
from ._sl import SL as SL
from ._skew import Skew as Skew
from ._so import SO as SO
from ._sphere import Sphere as Sphere
from ._sphere_embedded import SphereEmbedded as SphereEmbedded
from ._stiefel import Stiefel as Stiefel
from ._sym import Sym as Sym
from ._unitary import Unitary as Unitary

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
]
