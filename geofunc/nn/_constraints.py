"""GeoTorch's 15 constraint one-liners (0.4.0 names, argument names and defaults).

``import geofunc.nn as geotorch`` is a drop-in: each function builds GeoTorch's class for the
tensor's size (``geofunc.nn.SO``, ``Stiefel``, ...: adapters over geofunc's spaces), moves it to
the tensor's dtype and device, draws its ``sample()`` (GeoTorch's distribution), assigns it
through the parametrization and returns the module, as GeoTorch 0.4.0 does. After the call,
``module.parametrizations.<tensor_name>[0]`` is that class.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from .._errors import ManifoldError
from ._adapter import ModuleT, _owner_name, _resolve_tensor, attach
from ._manifolds import (
    PSD,
    PSSD,
    SL,
    AlmostOrthogonal,
    FixedRank,
    GLp,
    Grassmannian,
    Hurwitz,
    LowRank,
    PSSDFixedRank,
    PSSDLowRank,
    Skew,
    Sphere,
    SphereEmbedded,
    Stiefel,
    Symmetric,
)

__all__ = [
    "almost_orthogonal",
    "alpha_stable",
    "fixed_rank",
    "grassmannian",
    "invertible",
    "low_rank",
    "orthogonal",
    "positive_definite",
    "positive_semidefinite",
    "positive_semidefinite_fixed_rank",
    "positive_semidefinite_low_rank",
    "skew",
    "sln",
    "sphere",
    "symmetric",
]


def _register_manifold(module: ModuleT, tensor_name: str, cls: type, *args: Any, sample: bool = True,
                       **kwargs: Any) -> ModuleT:
    """GeoTorch's registration: ``M = cls(size, *args, **kwargs)`` on the tensor's dtype and device,
    the tensor set to ``M.sample()`` (or kept, ``sample=False``), ``M`` registered."""
    T = _resolve_tensor(module, tensor_name, cls.__name__)
    where = _owner_name(module, tensor_name)
    what = f"{where} (a tensor of shape {tuple(T.shape)} and dtype {T.dtype})"
    # The class is built on the default device, as GeoTorch's, then moved to the tensor's. A meta default
    # (`with torch.device("meta")` or set_default_device("meta") around a tensor that is not on meta) left
    # its buffers without values to move: nn.Module.to raised "Cannot copy out of meta tensor". It is
    # built on the CPU there, where it is built under the usual default.
    home = torch.device("cpu") if torch.get_default_device().type == "meta" and not T.is_meta else contextlib.nullcontext()
    try:
        with home:
            M = cls(lower=args[0], size=tuple(T.shape)) if cls is Symmetric else cls(tuple(T.shape), *args, **kwargs)
    except ManifoldError as e:
        # Keep GeoTorch's class (VectorError, RankError, ...), say which tensor it was for.
        e.args = (f"cannot constrain {what}: {e}",)
        raise
    if not (T.is_floating_point() or T.is_complex()):  # (it was nn.Module.to's TypeError, naming neither)
        raise ManifoldError(f"cannot constrain {what}: {cls.__name__}: expected a floating tensor (float32, float64, "
                            f"bfloat16, float16; complex where the space takes it), got dtype {T.dtype}.")
    with warnings.catch_warnings():  # the parametrization's own buffers follow the weight's dtype: torch's
        warnings.filterwarnings("ignore", "Complex modules are a new feature")  # notice is not the user's concern
        M = M.to(device=T.device, dtype=T.dtype)
    M.where = where
    with torch.no_grad():
        if not sample:
            X = T.detach()
        elif T.is_meta:  # deferred initialization: no values to draw
            X = torch.empty_like(T)
        else:
            X = M.sample()
    return attach(module, tensor_name, M, None, X, keep=not sample)


def symmetric(module: ModuleT, tensor_name: str = "weight", lower: bool = True) -> ModuleT:
    """Symmetric (:class:`Symmetric`); keeps the layer's own values, symmetrized as GeoTorch does.

    The new value is the lower (``lower=True``) or upper triangle of the current value mirrored,
    exactly GeoTorch's value; the raw tensor is the current value.

    Example::

        >>> layer = symmetric(torch.nn.Linear(3, 3))
        >>> torch.equal(layer.weight, layer.weight.T)
        True
    """
    return _register_manifold(module, tensor_name, Symmetric, lower, sample=False)


def skew(module: ModuleT, tensor_name: str = "weight", lower: bool = True) -> ModuleT:
    """Skew-symmetric (:class:`Skew`), initialized with ``W − Wᵀ``, ``W`` Xavier normal (GeoTorch's sample).

    Example::

        >>> layer = skew(torch.nn.Linear(3, 3))
        >>> torch.equal(layer.weight, -layer.weight.T)
        True
    """
    return _register_manifold(module, tensor_name, Skew, lower=lower)


def sphere(module: ModuleT, tensor_name: str = "weight", radius: float = 1.0, embedded: bool = False) -> ModuleT:
    """Every vector along the last dimension (each row of a Linear weight) of norm ``radius``.

    ``embedded=False``: :class:`Sphere` (exponential map at a base, dynamic);
    ``embedded=True``: :class:`SphereEmbedded` (``X = r Z/‖Z‖``, static), as GeoTorch. Uniform start.

    Example::

        >>> layer = sphere(torch.nn.Linear(4, 3), radius=2.0)
        >>> torch.allclose(layer.weight.norm(dim=-1), torch.full((3,), 2.0))
        True
    """
    return _register_manifold(module, tensor_name, SphereEmbedded if embedded else Sphere, radius=radius)


def orthogonal(module: ModuleT, tensor_name: str = "weight", triv: Any = "expm") -> ModuleT:
    """Orthonormal columns (rows if wide): :class:`Stiefel`, Haar-uniform start.

    As in GeoTorch, a square weight gets ``Stiefel`` (the whole orthogonal group O(n), det ±1,
    so that ``module.weight = Q`` accepts every orthogonal ``Q``, e.g. from
    ``nn.init.orthogonal_``), not ``SO``; the random start has det +1 (as GeoTorch's) and the
    chart ``base · φ(A)`` stays in the connected component of its base.

    Example::

        >>> layer = orthogonal(torch.nn.Linear(3, 5))
        >>> torch.allclose(layer.weight.T @ layer.weight, torch.eye(3), atol=1e-6)
        True
    """
    return _register_manifold(module, tensor_name, Stiefel, triv=triv)


def grassmannian(module: ModuleT, tensor_name: str = "weight", triv: Any = "expm") -> ModuleT:
    """An orthonormal frame of a subspace (:class:`Grassmannian`), Haar-uniform start.

    Example::

        >>> layer = grassmannian(torch.nn.Linear(2, 5))
        >>> torch.allclose(layer.weight.T @ layer.weight, torch.eye(2), atol=1e-6)
        True
    """
    return _register_manifold(module, tensor_name, Grassmannian, triv=triv)


def almost_orthogonal(
    module: ModuleT, tensor_name: str = "weight", lam: float = 0.1, f: Any = "sin", triv: Any = "expm"
) -> ModuleT:
    """Singular values in ``[1 - lam, 1 + lam]`` (:class:`AlmostOrthogonal`); starts at an
    orthogonal matrix (singular values exactly 1), as GeoTorch.

    Example::

        >>> layer = almost_orthogonal(torch.nn.Linear(4, 4), lam=0.5)
        >>> bool(((torch.linalg.svdvals(layer.weight) - 1).abs() <= 0.5).all())
        True
    """
    return _register_manifold(module, tensor_name, AlmostOrthogonal, lam, f, triv)


def low_rank(module: ModuleT, tensor_name: str, rank: int, triv: Any = "expm") -> ModuleT:
    """Rank at most ``rank`` (:class:`LowRank`); on a Conv2d weight, every kernel. Starts at the
    truncated SVD of a Xavier-normal matrix, as GeoTorch.

    Example::

        >>> layer = low_rank(torch.nn.Linear(5, 4), "weight", rank=2)
        >>> int((torch.linalg.svdvals(layer.weight) > 1e-5).sum())
        2
    """
    return _register_manifold(module, tensor_name, LowRank, rank, triv)


def fixed_rank(module: ModuleT, tensor_name: str, rank: int, f: Any = "softplus", triv: Any = "expm") -> ModuleT:
    """Rank exactly ``rank`` (:class:`FixedRank`); starts at a truncated SVD of a Xavier-normal matrix.

    Example::

        >>> layer = fixed_rank(torch.nn.Linear(5, 4), "weight", rank=2)
        >>> int((torch.linalg.svdvals(layer.weight) > 1e-5).sum())
        2
    """
    return _register_manifold(module, tensor_name, FixedRank, rank, f, triv)


def invertible(module: ModuleT, tensor_name: str = "weight", f: Any = "softplus", triv: Any = "expm") -> ModuleT:
    """Invertible with positive determinant (:class:`GLp`); starts at a Xavier-normal matrix's SVD.

    Example::

        >>> layer = invertible(torch.nn.Linear(4, 4))
        >>> bool(torch.linalg.det(layer.weight) > 0)
        True
    """
    return _register_manifold(module, tensor_name, GLp, f, triv)


def sln(module: ModuleT, tensor_name: str = "weight", f: Any = "softplus", triv: Any = "expm") -> ModuleT:
    """Determinant one (:class:`SL`); starts at GeoTorch's SL sample.

    Example::

        >>> layer = sln(torch.nn.Linear(4, 4))
        >>> round(float(torch.linalg.det(layer.weight.detach())), 4)
        1.0
    """
    return _register_manifold(module, tensor_name, SL, f, triv)


def positive_definite(
    module: ModuleT, tensor_name: str = "weight", f: Any = "softplus", triv: Any = "expm"
) -> ModuleT:
    """Symmetric positive definite (:class:`PSD`); starts at a Wishart matrix ``WWᵀ``, ``W`` Xavier normal.

    Example::

        >>> layer = positive_definite(torch.nn.Linear(3, 3))
        >>> bool((torch.linalg.eigvalsh(layer.weight) > 0).all())
        True
    """
    return _register_manifold(module, tensor_name, PSD, f, triv)


def positive_semidefinite(module: ModuleT, tensor_name: str = "weight", triv: Any = "expm") -> ModuleT:
    """Symmetric positive semidefinite (:class:`PSSD`); starts at a Wishart matrix.

    Example::

        >>> layer = positive_semidefinite(torch.nn.Linear(3, 3))
        >>> bool((torch.linalg.eigvalsh(layer.weight) > -1e-6).all())
        True
    """
    return _register_manifold(module, tensor_name, PSSD, triv)


def positive_semidefinite_low_rank(module: ModuleT, tensor_name: str, rank: int, triv: Any = "expm") -> ModuleT:
    """Positive semidefinite of rank at most ``rank`` (:class:`PSSDLowRank`); starts at a Wishart's top ``rank``.

    Example::

        >>> layer = positive_semidefinite_low_rank(torch.nn.Linear(4, 4), "weight", 2)
        >>> int((torch.linalg.eigvalsh(layer.weight) > 1e-5).sum())
        2
    """
    return _register_manifold(module, tensor_name, PSSDLowRank, rank, triv)


def positive_semidefinite_fixed_rank(
    module: ModuleT, tensor_name: str, rank: int, f: Any = "softplus", triv: Any = "expm"
) -> ModuleT:
    """Positive semidefinite of rank exactly ``rank`` (:class:`PSSDFixedRank`); starts at a Wishart's top ``rank``.

    Example::

        >>> layer = positive_semidefinite_fixed_rank(torch.nn.Linear(4, 4), "weight", 2)
        >>> int((torch.linalg.eigvalsh(layer.weight) > 1e-5).sum())
        2
    """
    return _register_manifold(module, tensor_name, PSSDFixedRank, rank, f, triv)


def alpha_stable(module: ModuleT, tensor_name: str = "weight", alpha: float = 1e-3) -> ModuleT:
    """Every eigenvalue with real part at most ``-alpha`` (:class:`Hurwitz`); starts at GeoTorch's sample.

    Example::

        >>> layer = alpha_stable(torch.nn.Linear(4, 4), alpha=0.5)
        >>> bool(torch.linalg.eigvals(layer.weight).real.max() <= -0.5)
        True
    """
    return _register_manifold(module, tensor_name, Hurwitz, alpha=alpha)
