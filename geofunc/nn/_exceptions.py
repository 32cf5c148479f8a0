"""GeoTorch 0.4.0's exception classes, each a :class:`geofunc.ManifoldError` (so a ``ValueError``).

Same names and constructor arguments as ``geotorch.exceptions``, raised at GeoTorch's places
(a ``size`` that cannot work at construction, an off-space point at assignment); the messages
follow geofunc's rule: the space, what was expected, what came (shapes and dtypes, never a
tensor dump).
"""

from __future__ import annotations

from typing import Any, Optional

from .._errors import ManifoldError, describe

__all__ = ["VectorError", "NonSquareError", "RankError", "InverseError", "InManifoldError"]


def _size(size: Any) -> str:
    try:
        return str(tuple(size))
    except TypeError:
        return repr(size)


def _name(M: Any) -> str:
    """``<where>: <space>`` for a geofunc.nn parametrization, else its ``str``."""
    space = getattr(M, "space", None)
    where = getattr(M, "where", None)
    if space is not None:
        return f"{where} constrained to {space!r}" if where and where != type(M).__name__ else f"{type(M).__name__}({space!r})"
    return str(M)


class VectorError(ManifoldError):
    """A matrix space built on (or given) a tensor of fewer than 2 dimensions."""

    def __init__(self, name: str, size: Any) -> None:
        super().__init__(
            f"{name}: expected a tensor of at least 2 dimensions (matrices (..., n, k), leading dimensions "
            f"a batch), got a tensor of size {_size(size)}."
        )


class NonSquareError(ManifoldError):
    """A space of square matrices (SO, GLp, SL, the PSD family, Skew, Symmetric, Hurwitz) on a non-square size."""

    def __init__(self, name: str, size: Any) -> None:
        super().__init__(f"{name}: expected square matrices (..., n, n), got a tensor of size {_size(size)}.")


class RankError(ManifoldError):
    """A ``rank`` outside ``[1, min(n, k)]``."""

    def __init__(self, n: int, k: int, rank: Any, name: Optional[str] = None) -> None:
        head = f"{name}: " if name else ""
        super().__init__(f"{head}expected a rank with 1 <= rank <= min({n}, {k}) = {min(n, k)}, got rank {rank!r}.")


class InverseError(ManifoldError):
    """Assigning a point to a space whose ``f`` was given as a single callable (no inverse)."""

    def __init__(self, M: Any) -> None:
        f = getattr(getattr(M, "space", None), "f", None)
        fname = getattr(f, "__name__", repr(f))
        super().__init__(
            f"{_name(M)}: expected `f` given as a pair (f, f_inverse) (or a name) so that a point can be "
            f"assigned, got the single callable {fname}: no inverse was specified."
        )


class InManifoldError(ManifoldError):
    """Assigning (``right_inverse``) a point that is not on the space."""

    def __init__(self, X: Any, M: Any, reason: Optional[str] = None) -> None:
        detail = f" ({reason})" if reason else ""
        super().__init__(f"{_name(M)}: expected a point on the space, got {describe(X)}{detail}.")
