"""The oblique manifold: matrices with unit-norm columns (a product of unit spheres)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from ._base import AbstractSpace
from ._sphere import _e1, _exp_chart, _unit_base, normalize, sphere_dist, sphere_expmap, sphere_logmap, sphere_sqdist, sphere_tangent

__all__ = ["Oblique"]

Tensor = torch.Tensor


def _columns(X: Tensor) -> Tensor:
    """The columns as the last dim (a plain transpose, no conjugation: complex columns stay as they are)."""
    return X.mT


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Oblique(AbstractSpace):
    r"""``n×k`` matrices whose columns have unit norm.

    .. math::

        \mathrm{OB}(n, k) = \{X \in \mathbb{R}^{n \times k} : \|X_{:, j}\| = 1,\ j = 1..k\}
        = (S^{n-1})^k

    Acts on the last two dimensions ``(*batch, n, k)``, every shape (wide ones too: there
    is no transposition; each of the ``k`` columns is a point of the unit sphere
    ``S^{n-1}``; for ``n = 1`` the entries are ±1). The maps are those of
    :class:`Sphere` (radius 1) applied to every column:

    * ``to_manifold(Z, base)``: column ``j`` is ``Exp_{u_j}(z_j − ⟨z_j, u_j⟩ u_j)``, with
      ``u_j`` the normalized column ``j`` of ``base`` (``None``: every column ``e_1``); smooth
      at ``Z = 0``.
    * ``from_manifold(X) = (zeros, X)``; ``rebase(Z, base) = (zeros, to_manifold(Z, base))``.
    * ``tangent(X, G) = G − X diag(XᵀG)`` (each column projected to its sphere's tangent
      space).
    * ``retract(X, V)``: columns of ``X + V`` normalized.
    * ``project(Y)``: columns of ``Y`` normalized (the nearest point); a zero column becomes
      ``e_1`` (a canonical point, zero gradient, never NaN).
    * ``sample``: uniform (normalized standard Gaussian columns).

    Complex matrices (unit columns in Cⁿ) are accepted, with ``⟨a, b⟩ = Re(aᴴb)``:
    ``tangent(X, G) = G − X diag(Re(XᴴG))`` (Note [Complex]).

    NaN or inf raw input gives NaN in the affected columns, never a plausible point;
    :meth:`contains` is False on them; finite raw input of any scale gives a point (as for
    :class:`Sphere`). A vector (``ndim < 2``) or an empty matrix raises
    :class:`~geofunc.ManifoldError`.

    Example:
        >>> import torch, geofunc as gf
        >>> X = gf.Oblique().to_manifold(torch.zeros(3, 2))     # every column e_1
        >>> X
        tensor([[1., 1.],
                [0., 0.],
                [0., 0.]])
        >>> Y = gf.Oblique().project(torch.tensor([[3.0, 0.0], [4.0, 0.0]]))  # a zero column
        >>> Y
        tensor([[0.6000, 1.0000],
                [0.8000, 0.0000]])
    """

    _base_kind: ClassVar[str | None] = "point"  # what its base is (AbstractSpace._refine_base)

    accepts_complex: ClassVar[bool] = True

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what)

    def to_manifold(self, Z: Tensor, base: Tensor | None = None) -> Tensor:
        """Each column of ``Z`` mapped by the exponential chart of its sphere at ``base``'s column."""
        self._check_shape(Z, "Z")
        Zt = _columns(Z)
        if base is None:
            U = _e1(Zt)
        else:
            self._require_base(Z, base)
            U = _unit_base(_columns(base))
        return _columns(_exp_chart(Zt, U, 1.0))

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(X), X

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G − X diag(XᵀG)``."""
        self._check_pair(X, G, "G")
        return _columns(sphere_tangent(_columns(X), _columns(G), 1.0))

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """The columns of ``X + V`` normalized."""
        self._check_pair(X, V, "V")
        return _columns(normalize(_columns(X + V), 1.0))

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """Each column along its great circle (:meth:`Sphere.expmap <geofunc.Sphere.expmap>`): the
        product manifold's exponential map."""
        self._check_pair(X, V, "V")
        return _columns(sphere_expmap(_columns(X), _columns(V), 1.0))

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """Each column's logarithm (:meth:`Sphere.logmap <geofunc.Sphere.logmap>`; NaN in a column
        where ``Y``'s is ``−X``'s)."""
        self._check_pair(X, Y, "Y")
        return _columns(sphere_logmap(_columns(X), _columns(Y), 1.0))

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``√(Σ_j θ_j²)`` over the columns' great-circle distances ``θ_j`` (the product metric), batch-shaped."""
        self._check_pair(X, Y, "Y")
        return torch.linalg.vector_norm(sphere_dist(_columns(X), _columns(Y), 1.0), dim=-1)

    def sqdist(self, X: Tensor, Y: Tensor) -> Tensor:
        """The sum of the columns' squared great-circle distances (:meth:`Sphere.sqdist
        <geofunc.Sphere.sqdist>`: π² for a column where ``Y``'s is ``−X``'s, where ``logmap`` is NaN)."""
        self._check_pair(X, Y, "Y")
        return sphere_sqdist(_columns(X), _columns(Y), 1.0).sum(-1)

    def project(self, Y: Tensor) -> Tensor:
        """The columns of ``Y`` normalized (``e_1`` for a zero column)."""
        self._check_shape(Y, "Y")
        return _columns(normalize(_columns(Y), 1.0))

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        err = (torch.linalg.vector_norm(X, dim=-2) - 1.0).abs()
        return {"max_j |‖X[:, j]‖ − 1|": err.amax(-1)}
