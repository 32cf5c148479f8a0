"""The one exception of geofunc and the helpers that word its messages."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["ManifoldError"]


class ManifoldError(ValueError):
    """A point off its space, a shape a space cannot take, or a bad hyperparameter.

    Every message names the space, what it expected and what it got, e.g.
    ``SO(triv='expm'): expected square matrices (..., n, n), got shape (3, 5).``
    Tensors are described by shape and dtype, never printed whole.
    """


def real_value(x: Any) -> float:
    """The value of a real number of any type (a Python or NumPy number, a ``Fraction``) as a Python float;
    NaN for anything else (a bool, a tensor, a string, an int too large for a float), so that one range
    test such as ``0 < real_value(x) < inf`` refuses them all."""
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor)):
        try:
            return float(x)
        except (OverflowError, TypeError, ValueError):  # an int too large for a float
            pass
    return math.nan


def real_dtype(x: torch.Tensor) -> bool:
    """Whether ``x`` holds real numbers (its dtype neither bool nor complex): metadata only, no value read,
    so the same under vmap, torch.compile and on any device."""
    return x.dtype != torch.bool and not x.is_complex()


def not_dense(x: torch.Tensor) -> bool:
    """Whether ``x`` is sparse (any layout but torch.strided) or nested (Note [Dense tensors only] in
    ``geofunc/spaces/_base.py``)."""
    return x.layout is not torch.strided or x.is_nested


def describe(x: Any) -> str:
    """A short description of ``x`` for an error message (shape, not values); a tensor of another layout
    than dense (sparse, nested) says which (Note [Dense tensors only] in ``geofunc/spaces/_base.py``)."""
    if isinstance(x, torch.Tensor):
        if not_dense(x):
            return describe_layout(x)
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list, dict)):
        return f"a {type(x).__name__} of {len(x)} entries"
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if isinstance(shape, tuple) and shape and dtype is not None and not isinstance(x, type):  # a NumPy (or other) array
        return f"a {type(x).__module__}.{type(x).__name__} of shape {shape} and dtype {dtype}"
    return repr(x)


def describe_layout(x: torch.Tensor) -> str:
    """``x``, a sparse or nested tensor, for a message: its layout first (a nested tensor of torch's
    strided layout has no shape to print: its component count instead)."""
    if x.is_nested:
        try:
            count = f", {x.size(0)} components"
        except RuntimeError:
            count = ""
        return f"a nested tensor (layout {x.layout}{count}) of dtype {x.dtype}"
    return f"a {x.layout} tensor of shape {tuple(x.shape)} and dtype {x.dtype}"


def error(space: Any, expected: str, got: str) -> ManifoldError:
    """Build the standard message ``<space>: expected <expected>, got <got>.``"""
    return ManifoldError(f"{space!r}: expected {expected}, got {got}.")


def first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The batch index of the first True entry of ``mask`` (``()`` for a 0-d one), for a message."""
    return tuple(int(i) for i in torch.nonzero(mask)[0])
