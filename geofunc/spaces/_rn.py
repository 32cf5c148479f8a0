"""The whole Euclidean space: every finite tensor is a point."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, final

import torch

from ._base import AbstractSpace

__all__ = ["Rn"]

Tensor = torch.Tensor


@final
@dataclasses.dataclass(frozen=True, kw_only=True)
class Rn(AbstractSpace):
    r"""Unconstrained tensors of any shape (the identity constraint).

    .. math::

        \mathbb{R}^{d_1 \times \dots \times d_m}

    Every entry is its own point (``point_ndim = 0``), so :meth:`contains` returns a
    boolean tensor of the input's shape: True where the entry is finite.

    * ``to_manifold(Z) = Z`` (the same tensor, no copy); ``from_manifold(X) = (X, None)``;
      ``rebase(Z, None) = (Z, None)``.
    * ``tangent(X, G) = G``; ``retract(X, V) = X + V``; ``project(Y) = Y``.
    * ``sample``: a standard Gaussian.

    Any floating tensor is accepted, complex ones too (Cⁿ as R²ⁿ, metric ``Re tr(UᴴV)``),
    0-d included; NaN and inf pass through unchanged
    (identity maps) and are reported by :meth:`contains` (False) and :meth:`check`.
    A non-floating tensor, or a ``base`` that is not None, raises
    :class:`~geofunc.ManifoldError`. Useful as a factor of :class:`Product` and as the
    "no constraint" entry of a pytree of constraints.

    Example:
        >>> import torch, geofunc as gf
        >>> Z = torch.tensor([1.0, float("nan")])
        >>> gf.Rn().to_manifold(Z) is Z, gf.Rn().contains(Z)
        (True, tensor([ True, False]))
    """

    point_ndim: ClassVar[int] = 0
    accepts_complex: ClassVar[bool] = True
    _one_node: ClassVar[bool] = False  # the identity: nothing to fuse under torch.func.grad

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_float(X, what)

    def _size(self, X: Tensor) -> int:
        return 1

    def to_manifold(self, Z: Tensor, base: None = None) -> Tensor:
        """``Z`` itself."""
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return Z

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, None]:
        return X, None

    def rebase(self, Z: Tensor, base: None) -> tuple[Tensor, None]:
        """``(Z, None)``: there is no chart to re-centre."""
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return Z, None

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """``G``."""
        self._check_pair(X, G, "G")
        return self._over_batch(G, X, G)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """``X + V``."""
        self._check_pair(X, V, "V")
        return X + V

    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """``X + V`` (the space is flat)."""
        self._check_pair(X, V, "V")
        return X + V

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """``Y − X``."""
        self._check_pair(X, Y, "Y")
        return Y - X

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``|Y − X|`` per entry (every entry is its own point)."""
        self._check_pair(X, Y, "Y")
        return (Y - X).abs()

    def project(self, Y: Tensor) -> Tensor:
        """``Y``."""
        self._check_shape(Y, "Y")
        return Y

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        R = X.real  # X itself when real; the real dtype of a complex X
        bad = torch.full_like(R, float("inf"))
        return {"non-finite entries": torch.where(torch.isfinite(X), torch.zeros_like(R), bad)}
