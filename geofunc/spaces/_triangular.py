"""Shared machinery of the linear matrix subspaces parametrized by a triangle (Sym, Skew)."""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import torch

from .._errors import error
from .._linalg import transpose
from ._base import AbstractSpace

__all__ = ["TriangleSpace"]

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class TriangleSpace(AbstractSpace):
    """Abstract: ``{X : X = s·Xᵀ}`` (``s = +1`` symmetric, ``−1`` skew), square ``(*batch, n, n)``.

    A linear subspace: the chart copies a triangle of ``Z`` (``_frame``), ``from_manifold``
    reads it back (``_coords``), ``tangent``/``project`` are the orthogonal projection
    ``(G + s·Gᵀ)/2`` and ``retract(X, V) = X + (V + s·Vᵀ)/2``. There is no base.
    Subclasses set ``_sign`` and implement ``_frame`` (and ``_coords`` if not the closed triangle).
    """

    lower: bool = True

    _sign: ClassVar[float] = 1.0
    _one_node: ClassVar[bool] = False  # a copy of a triangle: cheaper as its few ops under torch.func.grad

    def __post_init__(self) -> None:
        if not isinstance(self.lower, bool):
            raise error(self, "`lower` to be a bool", repr(self.lower))

    @abc.abstractmethod
    def _frame(self, Z: Tensor) -> Tensor:
        """The point of the triangle of ``Z``."""

    def _coords(self, X: Tensor) -> Tensor:
        """The triangle of the point ``X`` (right inverse of :meth:`_frame`): the closed triangle
        (``Skew``, whose diagonal is zero, keeps the strict one)."""
        return torch.tril(X) if self.lower else torch.triu(X)

    def _part(self, G: Tensor) -> Tensor:
        return 0.5 * (G + self._sign * transpose(G))

    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        self._require_matrix(X, what, square=True)

    def to_manifold(self, Z: Tensor, base: None = None) -> Tensor:
        """The triangle of ``Z`` completed to a point (see the class docstring)."""
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return self._frame(Z)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, None]:
        return self._coords(X), None

    def rebase(self, Z: Tensor, base: None) -> tuple[Tensor, None]:
        """``(triangle of Z, None)``: the coordinates the map reads."""
        self._check_shape(Z, "Z")
        self._require_no_base(base)
        return self._coords(Z), None

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """The orthogonal projection of ``G`` onto the subspace (the space is its own tangent space)."""
        self._check_pair(X, G, "G")
        return self._over_batch(self._part(G), X, G)

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """The projection of ``X + V`` (``X`` plus the projection of ``V`` for a point ``X``; a point off
        the subspace is not carried along: Note [Retractions that multiply] in ``geofunc/_linalg.py``)."""
        self._check_pair(X, V, "V")
        return self._part(X + V)

    # A linear space is flat: its geodesics are straight lines.
    def expmap(self, X: Tensor, V: Tensor) -> Tensor:
        """The projection of ``X + V`` (a straight line: the space is flat; :meth:`retract`)."""
        self._check_pair(X, V, "V")
        return self._part(X + V)

    def logmap(self, X: Tensor, Y: Tensor) -> Tensor:
        """The projection of ``Y − X`` (``Y − X`` for points)."""
        self._check_pair(X, Y, "Y")
        return self._part(Y - X)

    def dist(self, X: Tensor, Y: Tensor) -> Tensor:
        """``‖Y − X‖_F``, batch-shaped."""
        self._check_pair(X, Y, "Y")
        return torch.linalg.vector_norm(Y - X, dim=(-2, -1))

    def project(self, Y: Tensor) -> Tensor:
        """The nearest point: the orthogonal projection of ``Y``."""
        self._check_shape(Y, "Y")
        return self._part(Y)

    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        scale = X.abs().amax((-2, -1)).clamp(min=1.0)
        t = "ᴴ" if X.is_complex() else "ᵀ"  # the measure's name says which transpose it measured
        name = f"max|X − X{t}| / max(1, max|X|)" if self._sign > 0 else f"max|X + X{t}| / max(1, max|X|)"
        return {name: (X - self._sign * transpose(X)).abs().amax((-2, -1)) / scale}
