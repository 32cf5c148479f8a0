"""The sphere of radius ``r`` in the exponential-map chart centred at a movable base point."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import torch

from .._errors import describe, error
from .._linalg import _randn
from ._base import AbstractSpace

__all__ = ["Sphere"]

Tensor = torch.Tensor

# Note [sqrt-free cos and sinc]
# The chart needs cos(t) and sinc(t) = sin(t)/t at t = ‖v‖. Written as functions of
# s = t² = ‖v‖² they are entire power series, C(s) = Σ (-s)^j/(2j)!, S(s) = Σ (-s)^j/(2j+1)!,
# so no sqrt appears where s is small and every derivative (grad, jacfwd, hessian) is finite
# at v = 0. Below _S_SMALL the truncated series is used (the first omitted term is
# 0.1^8/16! < 1e-21, below float64 rounding); above it sqrt/cos/sin, whose derivatives lose
# only ~eps/s relative accuracy there. Both branches are evaluated on a masked copy of s
# ("double where") so that neither produces inf/NaN that would leak into the gradient.
_S_SMALL = 0.1
_N_TERMS = 8
_COS_COEFS = tuple((-1.0) ** j / math.factorial(2 * j) for j in range(_N_TERMS))
_SINC_COEFS = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(_N_TERMS))


def _series(s: Tensor, coefs: tuple[float, ...]) -> Tensor:
    out = torch.full_like(s, coefs[-1])
    for c in reversed(coefs[:-1]):
        out = out * s + c
    return out


def _cos_sinc_sqrt(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos √s, sin √s / √s)`` for ``s >= 0``, smooth at ``s = 0`` (Note [sqrt-free cos and sinc])."""
    small = s < _S_SMALL  # False for NaN: NaN goes through the exact branch and stays NaN
    s_series = torch.where(small, s, torch.zeros_like(s))
    s_exact = torch.where(small, torch.ones_like(s), s)
    t = torch.sqrt(s_exact)
    cos = torch.where(small, _series(s_series, _COS_COEFS), torch.cos(t))
    sinc = torch.where(small, _series(s_series, _SINC_COEFS), torch.sin(t) / t)
    return cos, sinc


def _e1(like: Tensor) -> Tensor:
    """The first canonical basis vector of the size of the last dim of ``like`` (O(n), no eye)."""
    return (torch.arange(like.shape[-1], device=like.device) == 0).to(like.dtype)


def _dot(A: Tensor, B: Tensor) -> Tensor:
    return (A * B).sum(-1, keepdim=True)


def _exp_chart(Z: Tensor, U: Tensor, r: float) -> Tensor:
    """``r (cos‖v‖ U + sinc‖v‖ v)``, ``v = Z − ⟨Z, U⟩ U``: the chart at the unit vectors ``U`` (last dim)."""
    V = Z - _dot(Z, U) * U
    cos, sinc = _cos_sinc_sqrt(_dot(V, V))
    return r * (cos * U + sinc * V)


def _normalize(Y: Tensor, r: float) -> Tensor:
    """``r Y / ‖Y‖`` along the last dim; ``r e_1`` where ``Y = 0`` (finite value and gradient there).

    ``Y`` is first divided by its largest entry (detached): ``‖Y‖`` itself underflows to 0 for
    float32 vectors of size ~1e-23 (which then became ``e_1``) and overflows for ~1e19 (which
    became 0). The map is scale-invariant, so dividing by a constant changes no derivative.
    An inf entry gives ``inf/inf`` = NaN: still never a plausible point.
    """
    m = Y.detach().abs().amax(dim=-1, keepdim=True)
    zero = m == 0
    Y = torch.where(zero, _e1(Y), Y / torch.where(zero, torch.ones_like(m), m))
    return r * Y / torch.linalg.vector_norm(Y, dim=-1, keepdim=True)


def _unit_base(base: Tensor) -> Tensor:
    # base / ‖base‖ equals base / r for a valid base; normalising (rather than dividing by r)
    # keeps the rounding error of long runs of `rebase` from accumulating in the norm.
    return base / torch.linalg.vector_norm(base, dim=-1, keepdim=True)


def _tangent(X: Tensor, G: Tensor, r: float) -> Tensor:
    """``G − ⟨G, X⟩ X / r²`` along the last dim."""
    return G - _dot(G, X) * X / (r * r)


@dataclasses.dataclass(frozen=True)
class Sphere(AbstractSpace):
    r"""Vectors (last dimension) of norm ``radius``.

    .. math::

        S^{n-1}_r = \{x \in \mathbb{R}^n : \|x\| = r\}

    The last dimension is the vector; leading dimensions are a batch of independent
    points, so a ``(*batch, k, n)`` tensor is a product of ``k`` spheres (rows of norm
    ``r``; for unit *columns* use :class:`Oblique`).

    * ``to_manifold(Z, base)``: the exponential chart centred at ``base`` (a point of norm
      ``r``; ``None`` means ``r e_1``). With ``u = base / ‖base‖`` and
      ``v = Z − ⟨Z, u⟩ u`` (the tangent part of ``Z``),
      ``X = r (cos‖v‖ u + sinc‖v‖ v)``, i.e. ``X = r Exp_u(v)``. It is smooth everywhere,
      at ``Z = 0`` included: cos and sinc are evaluated as power series in ``‖v‖²``
      near 0, so ``grad``, ``jacfwd``, ``hessian`` and ``vmap`` of them are finite there.
    * ``from_manifold(X) = (zeros, X)``; ``rebase(Z, base) = (zeros, to_manifold(Z, base))``.
    * ``tangent(X, G) = G − ⟨G, X⟩ X / r²``.
    * ``retract(X, V) = r (X + V) / ‖X + V‖``.
    * ``project(Y) = r Y / ‖Y‖``, the nearest point. ``Y = 0`` has no nearest point (all
      are at distance ``r``): ``project`` then returns the canonical point ``r e_1`` with
      a zero gradient, never NaN; so does ``retract`` where ``X + V = 0``.
    * ``sample``: uniform (a normalized standard Gaussian).

    Riemannian gradient descent: one SGD step of size ``η`` on ``Z`` at ``Z = 0`` followed
    by :meth:`rebase` moves the point ``x = r u`` to ``x⁺ = r Exp_u(−η r P_u g)``,
    ``P_u = I − u uᵀ``, ``g`` the Euclidean gradient in ``x`` (the chart's differential at 0
    is ``r P_u``; a step of ``η`` on ``Z`` is a Riemannian step of ``η r²`` on ``x``).

    NaN or inf raw input (``Z``, ``Y``, ``V``) gives NaN in the affected points, never a
    plausible point; :meth:`contains` is False on them. Errors: ``radius <= 0`` (or not a
    finite real number) raises :class:`~geofunc.ManifoldError` at construction, a 0-d or
    empty tensor at the first call.

    Example:
        >>> import torch, geofunc as gf
        >>> S = gf.Sphere(radius=2.0)
        >>> X = S.to_manifold(torch.zeros(3, 4))          # three copies of 2 e_1
        >>> X[0]
        tensor([2., 0., 0., 0.])
        >>> Z, base = S.from_manifold(X)
        >>> bool(torch.equal(Z, torch.zeros(3, 4))), bool(S.contains(base).all())
        (True, True)

    Reference: M. Lezcano-Casado, "Trivializations for gradient-based optimization on
    manifolds", NeurIPS 2019 (dynamic trivializations).
    """

    radius: float = 1.0

    point_ndim: ClassVar[int] = 1

    def __post_init__(self) -> None:
        r = self.radius
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r <= 0:
            raise error(self, "`radius` to be a finite real number > 0 (a Python number)", describe(r))
        object.__setattr__(self, "radius", float(r))

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_vector(X, what)

    def to_manifold(self, Z: Tensor, base: Tensor | None = None) -> Tensor:
        """``r Exp_u(Z − ⟨Z, u⟩ u)``, ``u = base / ‖base‖`` (``e_1`` if ``base`` is None)."""
        self._check_shape(Z, "Z")
        if base is None:
            U = _e1(Z)
        else:
            self._require_base(Z, base)
            U = _unit_base(base)
        return _exp_chart(Z, U, self.radius)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G − ⟨G, X⟩ X / r²``."""
        self._check_pair(X, G, "G")
        return _tangent(X, G, self.radius)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``r (X + V) / ‖X + V‖`` (``r e_1`` where ``X + V = 0``)."""
        self._check_pair(X, V, "V")
        return _normalize(X + V, self.radius)

    def project(self, Y: Tensor) -> Tensor:
        """``r Y / ‖Y‖``; the canonical point ``r e_1`` where ``Y = 0``."""
        self._check_shape(Y, "Y")
        return _normalize(Y, self.radius)

    def sample(
        self,
        shape: Any,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> Tensor:
        """Uniform points: standard Gaussians of shape ``shape`` normalized to norm ``r``."""
        shape = self._sample_shape(shape, dtype)
        return _normalize(_randn(shape, generator, dtype, device), self.radius)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        r = self.radius
        return {"|‖x‖ − r| / r": (torch.linalg.vector_norm(X, dim=-1) - r).abs() / r}
