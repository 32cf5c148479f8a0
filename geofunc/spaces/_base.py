"""The space protocol: a frozen bag of hyperparameters whose methods are pure tensor functions.

Every concrete space is a final, frozen dataclass subclass of :class:`AbstractSpace`.
Constructor arguments are hyperparameters only (keyword arguments); sizes are read
from the tensors the methods receive. Instances are immutable, hashable and
comparable, so ``torch.compile`` treats them as constants and ``vmap`` never sees them.

Conventions shared by every space (see DESIGN.md section 2):

* a matrix space acts on the last two dimensions ``(*batch, n, k)``, a vector space
  on the last one; leading dimensions are a batch of independent points;
* ``Z`` is a raw (unconstrained) tensor, ``X`` a point, ``G`` an ambient tensor,
  ``V`` a tangent vector, ``base`` the point (or pytree of points) a chart is centred
  at, ``None`` for the canonical one;
* no method mutates an input, draws from the global RNG, branches in Python on tensor
  values or calls ``.item()``, except :meth:`check` and the eager-mode validation in
  :meth:`from_manifold`, which are skipped under ``torch.func`` transforms and
  ``torch.compile`` (where no data-dependent error can be raised).

A subclass implements ``_check_shape``, ``to_manifold``, ``_from_manifold``, ``tangent``,
``retract``, ``project``, ``sample`` and ``_violations``; it may override ``rebase`` (the
default re-centres through ``_from_manifold``) and ``logabsdet``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, ClassVar, Sequence

import optree
import torch

from .._errors import ManifoldError, describe, error
from .._linalg import _randn

__all__ = ["AbstractSpace", "default_atol", "can_check"]

Tensor = torch.Tensor

# Base tolerances of membership tests, per dtype, for a point of size ~64; they grow
# like sqrt(size / 64) above that (rounding errors of orthogonal maps grow like sqrt(n)).
_ATOL = {
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
}


def default_atol(dtype: torch.dtype, size: int = 1) -> float:
    """The default membership tolerance for ``dtype`` and a point of typical size ``size``."""
    return _ATOL.get(dtype, 1e-4) * max(1.0, math.sqrt(size / 64.0))


def can_check(tree: Any) -> bool:
    """Whether the tensors of ``tree`` are concrete, so that a data-dependent check may run.

    False inside ``torch.compile``, for ``torch.func`` wrapped tensors (``vmap``, ``grad``,
    ``jvp``, ...) and for ``meta`` tensors, where reading a value would fail or break the trace.
    """
    if torch.compiler.is_compiling():
        return False
    for leaf in optree.tree_leaves(tree, none_is_leaf=False):
        if isinstance(leaf, torch.Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(leaf):
                return False
            if type(leaf) is not torch.Tensor and not isinstance(leaf, torch.nn.Parameter):
                # FakeTensor, FunctionalTensor and other subclasses used by tracers.
                return False
            if leaf.is_meta:  # shapes only (deferred initialization): nothing to read
                return False
    return True


def _broadcastable(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two shapes broadcast (``torch.broadcast_shapes`` without its ~15 µs of Python)."""
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


@dataclasses.dataclass(frozen=True)
class AbstractSpace:
    """A manifold (or constraint set) as pure functions of tensors. Abstract."""

    #: Number of trailing dimensions a point occupies (2 for matrices, 1 for vectors).
    point_ndim: ClassVar[int] = 2

    # ------------------------------------------------------------------ shapes
    def _check_shape(self, X: Tensor, what: str = "X") -> None:
        """Raise ``ManifoldError`` if the trailing dimensions of ``X`` are not a point's."""
        raise NotImplementedError

    def _require_float(self, X: Any, what: str) -> None:
        if not isinstance(X, torch.Tensor):
            raise error(self, f"`{what}` to be a tensor", describe(X))
        if not X.dtype.is_floating_point:
            raise error(self, f"`{what}` of a floating dtype (float32 or float64)", describe(X))

    def _require_matrix(self, X: Any, what: str = "X", square: bool = False) -> tuple[int, int]:
        """Check ``X`` is a (batch of) floating matrices, square if asked; return ``(n, k)``."""
        self._require_float(X, what)
        if X.ndim < 2:
            shape = "square matrices (..., n, n)" if square else "matrices (..., n, k)"
            raise error(self, f"`{what}` to be {shape}", f"a tensor of shape {tuple(X.shape)}")
        n, k = X.shape[-2], X.shape[-1]
        if square and n != k:
            raise error(self, f"`{what}` to be square matrices (..., n, n)", f"shape {tuple(X.shape)}")
        if n == 0 or k == 0:
            raise error(self, f"`{what}` with non-empty matrix dimensions", f"shape {tuple(X.shape)}")
        return n, k

    def _require_vector(self, X: Any, what: str = "X") -> int:
        self._require_float(X, what)
        if X.ndim < 1 or X.shape[-1] == 0:
            raise error(self, f"`{what}` to be non-empty vectors (..., n)", f"shape {tuple(X.shape)}")
        return X.shape[-1]

    def _sample_shape(self, shape: Any, dtype: torch.dtype | None = None) -> tuple[int, ...]:
        """``shape`` of :meth:`sample` as a tuple, checked as a point shape of the space.

        An int ``n`` is ``(n,)`` (as ``torch.randn(n)``); anything but non-negative integers, or
        a shape the space cannot take, raises ``ManifoldError`` (not a TypeError).
        """
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        try:
            out = tuple(operator.index(d) for d in shape)
        except TypeError:
            out = None
        if out is None or any(d < 0 for d in out) or any(isinstance(d, bool) for d in shape):
            raise error(self, "`shape` to be a tuple (or torch.Size, or int) of non-negative integers", repr(shape))
        self._check_shape(torch.empty(out, dtype=dtype or torch.get_default_dtype(), device="meta"), "shape")
        return out

    def _check_pair(self, X: Tensor, Y: Tensor, what_y: str) -> None:
        """Shape checks of ``tangent(X, G)`` / ``retract(X, V)``: both points' shapes, ``Y``
        with ``X``'s point shape and batch dims that broadcast."""
        self._check_shape(X, "X")
        self._check_shape(Y, what_y)
        self._require_same_shape(X, Y, "X", what_y)

    def _require_base(self, Z: Tensor, base: Any) -> None:
        """A ``base`` is None or a tensor of ``Z``'s point shape whose batch dims broadcast."""
        if base is None:
            return
        if not isinstance(base, torch.Tensor):
            raise error(self, "`base` to be None or a tensor (a point of the space)", describe(base))
        self._check_shape(base, "base")
        self._require_same_shape(Z, base, "Z", "base")

    def _require_no_base(self, base: Any) -> None:
        """A space whose chart has no centre takes ``base=None`` only."""
        if base is not None:
            raise error(self, "`base` to be None (the space has no chart centre)", describe(base))

    def _require_same_shape(self, X: Tensor, Y: Tensor, what_x: str, what_y: str) -> None:
        """``Y`` must have ``X``'s point shape and batch dims that broadcast with ``X``'s."""
        d = self.point_ndim
        if tuple(X.shape[-d:]) != tuple(Y.shape[-d:]):  # tuples: torch.Size == goes through sym_eq
            raise error(
                self,
                f"`{what_y}` with the point shape of `{what_x}` {tuple(X.shape[-d:])}",
                f"shape {tuple(Y.shape)}",
            )
        if d and not _broadcastable(X.shape[:-d], Y.shape[:-d]):
            raise error(
                self,
                f"`{what_y}` with batch dims broadcastable with those of `{what_x}` {tuple(X.shape[:-d])}",
                f"shape {tuple(Y.shape)}",
            )

    # --------------------------------------------------------------- the maps
    def to_manifold(self, Z: Tensor, base: Any = None) -> Tensor:
        """The trivialization: a raw tensor ``Z`` (the point's shape) to a point on the space."""
        raise NotImplementedError

    def from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        """Right inverse of :meth:`to_manifold`: ``to_manifold(*from_manifold(X)) == X``.

        Raises ``ManifoldError`` if ``X`` is off the space (in eager mode; under
        ``torch.func`` transforms and ``torch.compile`` the value check is skipped).
        """
        self._check_shape(X, "X")
        if can_check(X):
            self.check(X)
        return self._from_manifold(X)

    def _from_manifold(self, X: Tensor) -> tuple[Tensor, Any]:
        """:meth:`from_manifold` without the membership check (pure, traceable)."""
        raise NotImplementedError

    def rebase(self, Z: Tensor, base: Any) -> tuple[Tensor, Any]:
        """The same point re-centred: ``to_manifold(*rebase(Z, base)) == to_manifold(Z, base)``."""
        return self._from_manifold(self.to_manifold(Z, base))

    def tangent(self, X: Tensor, G: Tensor) -> Tensor:
        """Orthogonal projection of the ambient ``G`` onto the tangent space at ``X``."""
        raise NotImplementedError

    def retract(self, X: Tensor, V: Tensor) -> Tensor:
        """A retraction: a point near ``X + V``, equal to it to first order."""
        raise NotImplementedError

    def project(self, Y: Tensor) -> Tensor:
        """The nearest point to ``Y`` on the space (a canonical point for open spaces)."""
        raise NotImplementedError

    def sample(
        self,
        shape: Any,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> Tensor:
        """A random point of full tensor shape ``shape`` (batch included), from ``generator``.

        Default: :meth:`project` of a standard Gaussian (uniform for ``Sphere`` and ``Oblique``;
        the Gaussian itself for ``Rn``); spaces with a Haar measure or a factorization override it.
        """
        return self.project(_randn(self._sample_shape(shape, dtype), generator, dtype, device))

    def logabsdet(self, Z: Tensor, base: Any = None) -> Tensor:
        """``log|det to_manifold(Z, base)|`` from the factorization (square spaces only)."""
        raise ManifoldError(f"{self!r}: logabsdet is only defined for square spaces with a factorized determinant.")

    # ------------------------------------------------------------- membership
    def _violations(self, X: Tensor) -> dict[str, Tensor]:
        """Named, batch-shaped, non-negative measures of how far ``X`` is off the space."""
        raise NotImplementedError

    def _size(self, X: Tensor) -> int:
        """Typical size used to scale the default tolerance."""
        return max(X.shape[-self.point_ndim :]) if X.ndim else 1

    def _atol(self, X: Tensor, atol: float | None) -> float:
        return default_atol(X.dtype, self._size(X)) if atol is None else float(atol)

    def contains(self, X: Tensor, atol: float | None = None) -> Tensor:
        """Per-point membership test: a boolean tensor of the batch shape (vmap-able)."""
        self._check_shape(X, "X")
        tol = self._atol(X, atol)
        out = None
        for v in self._violations(X).values():
            ok = v <= tol  # NaN compares False: a NaN point is never on the space
            out = ok if out is None else out & ok
        assert out is not None
        return out

    def check(self, X: Tensor, atol: float | None = None) -> None:
        """Eager validation: raise ``ManifoldError`` naming the measured violation, else return."""
        self._check_shape(X, "X")
        tol = self._atol(X, atol)
        for name, v in self._violations(X).items():
            bad = ~(v <= tol)
            if bool(bad.any()):
                vd = v.detach()
                worst = torch.where(torch.isnan(vd), torch.full_like(vd, float("inf")), vd).max()
                where = ""
                if v.ndim:
                    idx = tuple(int(i) for i in torch.nonzero(bad)[0])
                    where = f" (first at batch index {idx})"
                raise error(
                    self,
                    "a point on the space",
                    f"{describe(X)} with {name} = {float(worst):.3g} > atol = {tol:.3g}{where}",
                )
