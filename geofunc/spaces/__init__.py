"""Every space of geofunc, one final class per private module."""

from ._almost_orthogonal import AlmostOrthogonal as AlmostOrthogonal
from ._base import AbstractSpace as AbstractSpace
from ._fixed_rank import FixedRank as FixedRank
from ._glp import GLp as GLp
from ._grassmannian import Grassmannian as Grassmannian
from ._hurwitz import Hurwitz as Hurwitz
from ._low_rank import LowRank as LowRank
from ._oblique import Oblique as Oblique
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
from ._stiefel import Stiefel as Stiefel
from ._sym import Sym as Sym

__all__ = [
    "PSD",
    "PSSD",
    "SL",
    "SO",
    "AbstractSpace",
    "AlmostOrthogonal",
    "FixedRank",
    "GLp",
    "Grassmannian",
    "Hurwitz",
    "LowRank",
    "Oblique",
    "PSSDFixedRank",
    "PSSDLowRank",
    "Product",
    "Rn",
    "Skew",
    "Sphere",
    "Stiefel",
    "Sym",
]
