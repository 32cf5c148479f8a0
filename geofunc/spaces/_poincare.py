"""The Poincaré ball: hyperbolic space of curvature −c as the open ball c‖x‖² < 1."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, final

import torch

from .. import hyperbolic as hyp
from .._linalg import _randn, poison
from ._base import AbstractSpace, real_hyperparameter, rounding_dtype

__all__ = ["PoincareBall"]

Tensor = torch.Tensor


def _gaussian(shape: tuple[int, ...], generator: Optional[torch.Generator], dtype: Optional[torch.dtype], device) -> Tensor:
    """A standard Gaussian of ``shape`` from ``generator`` (on its device unless ``device`` is given)."""
    return _randn(shape, generator, dtype, device)  # Note [No generator=None]


def _margin(X: Tensor) -> float:
    # The margin of the dtype the result is finally stored in (Note [Low precision]): a bf16
    # point must still be strictly inside the ball after rounding.
    return hyp.ball_margin(rounding_dtype(X.dtype))


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class PoincareBall(AbstractSpace):
    r"""The Poincaré ball of curvature :math:`-c`: hyperbolic space as an open ball (last dimension).

    .. math::

        \mathbb{D}^n_c = \{x \in \mathbb{R}^n : c\|x\|^2 < 1\}, \qquad
        \langle u, v\rangle_x = \lambda_x^2 \langle u, v\rangle, \quad \lambda_x = \frac{2}{1 - c\|x\|^2}

    Leading dimensions are a batch of independent points. The maps are those of
    :mod:`geofunc.hyperbolic` (cancellation-free near the boundary, stated clamps):

    * ``to_manifold(Z, base) = expmap(base, Z)`` (``base=None``: the origin, where it is
      ``tanh(√c‖Z‖) Z/(√c‖Z‖)``): every raw vector is a tangent vector (the tangent space is
      all of ``ℝⁿ``); smooth in ``Z``, at ``Z = 0`` included.
    * ``from_manifold(X) = (0, X)`` (the chart centred at the point itself, ``Z = logmap(X, X) = 0``);
      ``rebase(Z, base) = (0, to_manifold(Z, base))``. One SGD step of size ``η`` on ``Z = 0`` plus
      ``rebase`` moves ``x`` to ``expmap(x, −η g)`` for the Euclidean gradient ``g``: a Riemannian
      step of size ``η λ_x²`` (the chart is not an isometry at its centre: ``λ_x ≠ 1``).
    * ``tangent(X, G) = G`` (an open subset of ``ℝⁿ``: every vector is tangent; Euclidean
      orthogonal projection); ``egrad_to_rgrad(X, G) = G / λ_x² = ((1 − c‖x‖²)²/4) G``;
      ``inner(X, U, V) = λ_x² ⟨U, V⟩`` (the gap clamped at ``≥ ε``, as in every map: a finite
      ``X`` on or outside the boundary reads as a point at the float boundary; NaN at a
      non-finite ``X``: Note [the metric off the ball]).
    * ``retract = expmap`` (exact); ``transport`` = parallel transport
      ``(λ_x/λ_y) gyr[y, −x] v``; ``dist``, ``expmap``, ``logmap`` in closed form.
    * ``project(Y)``: ``Y`` rescaled into ``√c‖x‖ ≤ 1 − δ``, ``δ = 8ε`` of the stored dtype
      (``9.5·10⁻⁷`` in float32, ``1.8·10⁻¹⁵`` in float64, ``0.0625`` in bfloat16): the nearest
      point of that closed ball, ``Y`` itself inside it. Every map that returns a point clamps
      it the same way, so points stay at hyperbolic distance ≤ ``log(2/δ)/√c`` from the origin.
    * ``sample``: the wrapped normal at the origin, ``x = expmap0(v/2)`` with ``v ~ N(0, I/n)``
      in Riemannian units (``v/2`` is the ambient tangent vector, since ``λ_0 = 2``), so that
      ``d(0, x) = ‖v‖`` and ``E d(0, x)² = 1``; the law is invariant under rotations.

    Membership: finite entries and ``c‖x‖² < 1`` (the ball is open: a point of the ball is
    strictly inside, and ``atol`` plays no role). NaN or inf raw input gives NaN.

    Example:
        >>> import torch, geofunc as gf
        >>> B = gf.PoincareBall(c=1.0)
        >>> x = B.to_manifold(torch.tensor([[0.3, -0.2], [5.0, 0.0]]))
        >>> bool(B.contains(x).all()), bool((x.norm(dim=-1) < 1).all())
        (True, True)
        >>> bool(torch.allclose(B.dist(x, x), torch.zeros(2)))
        True

    Reference: M. Nickel, D. Kiela, *Poincaré Embeddings for Learning Hierarchical
    Representations*, NeurIPS 2017; O.-E. Ganea et al., *Hyperbolic Neural Networks*, 2018.
    """

    _base_kind: ClassVar[str | None] = "point"  # what its base is (AbstractSpace._refine_base)

    c: float = 1.0

    point_ndim: ClassVar[int] = 1

    def __post_init__(self) -> None:
        real_hyperparameter(self, "c", "a curvature `c` > 0 (a finite Python number)", strict=True)

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_vector(X, what)

    def to_manifold(self, Z: Tensor, base: Optional[Tensor] = None) -> Tensor:
        """``expmap(base, Z)``; ``expmap0(Z)`` if ``base`` is None."""
        self._check_shape(Z, "Z")
        if base is None:
            return hyp._expmap0(Z, self.c, _margin(Z))
        self._require_base(Z, base)
        return hyp._expmap(base, Z, self.c, _margin(Z))

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X

    # Note [the metric off the ball]
    # egrad_to_rgrad and inner read X only through its gap 1 − c‖x‖², clamped at ≥ ε like in every
    # map of geofunc.hyperbolic: a finite X on or outside the boundary reads as a point at the float
    # boundary (as dist, logmap and transport read it). A NaN/inf entry made the clamped gap ε
    # too, and so a plausible finite gradient (3.6e-15·G at X = [0.1, inf]): the point's poison
    # (Note [NaN policy] in geofunc/_linalg.py) makes it NaN, as it does tangent's G.
    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G`` (every vector is tangent to an open subset of ℝⁿ); NaN where ``X`` is not finite."""
        self._check_pair(X, G, "G")
        return G + poison(X, ndim=1)

    def egrad_to_rgrad(self, X: Tensor, G: Tensor) -> Tensor:
        """``G / λ_x² = ((1 − c‖x‖²)² / 4) G`` (the gap clamped at ``≥ ε``; NaN where ``X`` is not finite)."""
        self._check_pair(X, G, "G")
        g = hyp._gap(X, self.c) + poison(X, ndim=1)
        return 0.25 * (g * g) * G

    def inner(self, X: Tensor, U: Tensor, V: Tensor) -> Tensor:
        """``λ_x² ⟨U, V⟩``, batch-shaped (the gap clamped at ``≥ ε``; NaN where ``X`` is not finite)."""
        self._check_pair(X, U, "U")
        self._check_pair(X, V, "V")
        g = hyp._gap(X, self.c) + poison(X, ndim=1)
        return (4.0 * (U * V).sum(-1, keepdim=True) / (g * g)).squeeze(-1)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``expmap(X, V)`` (the exponential map is cheap and exact here)."""
        self._check_pair(X, V, "V")
        return hyp._expmap(X, V, self.c, _margin(X))

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``X ⊕ tanh(√c λ_X ‖V‖/2) V/(√c‖V‖)`` (:func:`geofunc.hyperbolic.expmap`)."""
        self._check_pair(X, V, "V")
        return hyp._expmap(X, V, self.c, _margin(X))

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """The inverse of :meth:`expmap` (:func:`geofunc.hyperbolic.logmap`)."""
        self._check_pair(X, Y, "Y")
        return hyp._logmap(X, Y, self.c)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``(2/√c) artanh(√c ‖(−X) ⊕ Y‖)``, batch-shaped (:func:`geofunc.hyperbolic.dist`)."""
        self._check_pair(X, Y, "Y")
        return hyp._dist(X, Y, self.c).squeeze(-1)

    def transport(self, X: Tensor, Y: Tensor, V: Tensor) -> Tensor:
        """Parallel transport along the geodesic: ``(λ_X/λ_Y) gyr[Y, −X] V``."""
        self._check_pair(X, Y, "Y")
        self._check_pair(X, V, "V")
        return hyp._transport(X, Y, V, self.c)

    def project(self, Y: Tensor) -> Tensor:
        """``Y`` rescaled into ``√c‖x‖ ≤ 1 − δ`` (``Y`` itself inside that ball)."""
        self._check_shape(Y, "Y")
        return hyp._project(Y, self.c, _margin(Y))

    def sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        """The wrapped normal at the origin: ``expmap0(v/2)``, ``v ~ N(0, I/n)`` (``E d(0, x)² = 1``)."""
        shape = self._sample_shape(shape, dtype)
        v = _gaussian(shape, generator, dtype, device)
        v = v / (2.0 * math.sqrt(max(shape[-1], 1)))
        return hyp._expmap0(v, self.c, _margin(v))

    def _atol(self, X: Tensor, atol: Optional[float]) -> float:
        """0 whatever ``atol`` (checked as for every space): the ball is open, membership is ``c‖x‖² < 1``
        with no tolerance (the class docstring). The violation is ``c‖x‖² ≥ 1`` itself, so an ``atol`` of
        1 or more accepted points on and outside the boundary, ``[100, 0]`` with ``atol=1e4``."""
        super()._atol(X, atol)
        return 0.0

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        r2 = self.c * (X * X).sum(-1)
        # 0 strictly inside the open ball, c‖x‖² (≥ 1) on or outside it, NaN for NaN input.
        return {"c‖x‖² where ≥ 1 (on or outside the open ball)": torch.where(r2 < 1.0, torch.zeros_like(r2), r2)}
