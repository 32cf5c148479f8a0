"""GeoTorch 0.4.0's module-level helpers, re-derived. Private: they are public under GeoTorch's module names.

``geofunc.nn.fixedrank.softplus_epsilon``/``inv_softplus_epsilon`` (GeoTorch's value map with its 1e-6, not
geofunc's √ε), ``geofunc.nn.so.cayley_map``, ``geofunc.nn.sphere.project``/``uniform_init_sphere_``,
``geofunc.nn.hurwitz.get_lyap_exp`` and ``geofunc.nn.utils.transpose``: the same maths and signatures as
GeoTorch's, so code that imports them from ``geotorch.<module>`` runs after the import line names
``geofunc.nn.<module>``; inputs GeoTorch would fail on deep inside torch (a vector where a matrix is
needed, a non-square matrix, a radius that is not a positive number) raise :class:`~geofunc.ManifoldError`s
saying what was expected.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import spaces as S
from .._errors import ManifoldError, describe
from .._linalg import cayley
from ..spaces._base import LOW_PRECISION
from ..spaces._values import softplus_inverse
from ._exceptions import NonSquareError, VectorError

__all__ = ["cayley_map", "get_lyap_exp", "inv_softplus_epsilon", "project", "softplus_epsilon", "transpose",
           "uniform_init_sphere_"]

Tensor = torch.Tensor


def softplus_epsilon(x: Tensor, epsilon: float = 1e-6) -> Tensor:
    """GeoTorch's ``"softplus"`` value map: ``softplus(x) + epsilon`` (> 0 for every ``x``).

    geofunc's own ``"softplus"`` (``FixedRank.fs["softplus"]``) adds √ε of the dtype instead (Known
    limitations in the README); pass ``f=(softplus_epsilon, inv_softplus_epsilon)`` for GeoTorch's floor.

    Example::

        >>> softplus_epsilon(torch.tensor(-100.0, dtype=torch.float64)).item()
        1e-06
    """
    return F.softplus(x) + epsilon


def inv_softplus_epsilon(x: Tensor, epsilon: float = 1e-6) -> Tensor:
    """The inverse of :func:`softplus_epsilon` on ``x > epsilon`` (``−inf`` at ``epsilon``, NaN below, as
    ``torch.log``): ``softplus⁻¹(x − epsilon)``, stable for small and large values.

    Example::

        >>> x = torch.tensor([1e-3, 1.0, 30.0], dtype=torch.float64)
        >>> torch.allclose(softplus_epsilon(inv_softplus_epsilon(x)), x)
        True
    """
    return softplus_inverse(x - epsilon)


def _square(name: str, X: Any) -> None:
    if not isinstance(X, Tensor):
        raise ManifoldError(f"{name}: expected a tensor of shape (*, n, n), got {describe(X)}.")
    if X.ndim < 2:
        raise VectorError(name, tuple(X.shape))
    if X.shape[-1] != X.shape[-2]:
        raise NonSquareError(name, tuple(X.shape))
    if not (X.is_floating_point() or X.is_complex()):
        raise ManifoldError(f"{name}: expected a floating point or complex tensor, got {describe(X)}.")


def cayley_map(X: Tensor) -> Tensor:
    """GeoTorch's ``cayley_map``: ``(I − X/2)⁻¹(I + X/2)`` of a square matrix (or batch), orthogonal for skew
    ``X``; geofunc's Cayley map (``SO.trivializations["cayley"]``, the trivialization of ``gf.SO(triv="cayley")``).

    A bf16/fp16 ``X`` is mapped in float32 and the result rounded back (no low-precision inverse in torch;
    GeoTorch's raises there). Raises :class:`VectorError` / :class:`NonSquareError` for fewer than two dimensions
    or a non-square ``X``.

    Example::

        >>> A = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
        >>> Q = cayley_map(A)
        >>> torch.allclose(Q.T @ Q, torch.eye(2), atol=1e-6)
        True
    """
    _square("cayley_map", X)
    if X.dtype in LOW_PRECISION:
        return cayley(X.float()).to(X.dtype)
    return cayley(X)


def get_lyap_exp(A: Tensor) -> Tensor:
    """GeoTorch's ``get_lyap_exp``: ``−max Re λ`` over the eigenvalues of ``A`` (every matrix of a batch: one
    0-dim tensor), the stability margin of ``ẋ = Ax`` (> 0 iff every matrix is Hurwitz). A bf16/fp16 ``A``
    is read in float32 (no eigenvalue routine in half precision) and the margin returned in ``A``'s dtype.

    Raises :class:`VectorError` / :class:`NonSquareError` for fewer than two dimensions or a non-square ``A``,
    and :class:`~geofunc.ManifoldError` for an empty batch or non-finite entries (eigenvalues undefined).

    Example::

        >>> float(get_lyap_exp(torch.tensor([[-2.0, 1.0], [0.0, -3.0]])))
        2.0
    """
    _square("get_lyap_exp", A)
    if A.numel() == 0:
        raise ManifoldError(f"get_lyap_exp: expected at least one matrix of size at least 1×1, got shape {tuple(A.shape)}.")
    if not bool(torch.isfinite(A).all()):
        raise ManifoldError("get_lyap_exp: expected finite entries (the eigenvalues of a matrix with inf/NaN "
                            f"are undefined), got {describe(A)} with non-finite entries.")
    work = A.float() if A.dtype in LOW_PRECISION else A
    margin = -torch.linalg.eigvals(work).real.max()
    return margin.to(A.real.dtype if A.is_complex() else A.dtype)


def project(x: Tensor) -> Tensor:
    """GeoTorch's ``geotorch.sphere.project``: ``x / ‖x‖`` along the last dimension (each row onto the unit
    sphere); geofunc's :meth:`geofunc.Sphere.project`, which sends a zero row to ``e₁`` where GeoTorch's
    divides by zero (a NaN row).

    Example::

        >>> project(torch.tensor([3.0, 4.0]))
        tensor([0.6000, 0.8000])
    """
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ManifoldError(f"project: expected a tensor of shape (*, n), n ≥ 1, got {describe(x)}.")
    return S.Sphere().project(x)


def _radius(name: str, r: Any) -> float:
    if isinstance(r, Tensor) and r.numel() == 1 and not r.is_complex():
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise ManifoldError(f"{name}: expected `r` to be a finite real number > 0, got {describe(r)}.")
    return float(r)


def uniform_init_sphere_(x: Tensor, r: float = 1.0) -> Tensor:
    """GeoTorch's ``uniform_init_sphere_``: fill ``x`` (``(*, n)``) in place with points uniform on the sphere of
    radius ``r``, one per row (the leading dimensions are a batch), from the global RNG: a standard normal
    draw, normalized. From the same RNG state, GeoTorch's numbers (float32, float64). Returns ``x``.

    Example::

        >>> x = uniform_init_sphere_(torch.empty(4, 3), r=2.0)
        >>> torch.allclose(torch.linalg.vector_norm(x, dim=-1), torch.full((4,), 2.0))
        True
    """
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ManifoldError(f"uniform_init_sphere_: expected a tensor of shape (*, n), n ≥ 1, got {describe(x)}.")
    r = _radius("uniform_init_sphere_", r)
    with torch.no_grad():
        x.normal_()
        work = x.float() if x.dtype in LOW_PRECISION else x
        x.copy_(r * S.Sphere().project(work))
    return x


def transpose(fun: Callable[..., Any]) -> Callable[..., Any]:
    """GeoTorch's ``geotorch.utils.transpose``: decorate a method ``fun(self, X, *args, **kwargs)`` so that, when
    ``self.transposed`` is true, it sees ``Xᵀ`` (the last two dimensions swapped) and its result is transposed
    back (GeoTorch's classes work on tall matrices and read a wide one through it).

    Example::

        >>> class Doubled:
        ...     transposed = True
        ...     @transpose
        ...     def forward(self, X):  # appends the tall view's columns
        ...         return torch.cat([X, X], dim=-1)
        >>> Doubled().forward(torch.zeros(2, 5)).shape
        torch.Size([4, 5])
    """

    @functools.wraps(fun)
    def wrapped(self: Any, X: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.transposed:
            X = X.transpose(-2, -1)
        X = fun(self, X, *args, **kwargs)
        if self.transposed:
            X = X.transpose(-2, -1)
        return X

    return wrapped
