"""Shared checks of the orthogonal family (SO, Stiefel, Grassmannian): pure helpers, no classes."""

from __future__ import annotations

from typing import Any

import torch

from .._errors import describe, error
from .._linalg import eye_like, transpose

Tensor = torch.Tensor


def validate_triv(space: Any, triv: Any) -> None:
    """``triv`` must be ``"expm"``, ``"cayley"`` or a callable (checked lazily, as GeoTorch does)."""
    if callable(triv):
        return
    if not isinstance(triv, str) or triv not in ("expm", "cayley"):
        raise error(space, '`triv` to be "expm", "cayley" or a callable mapping skew to orthogonal matrices', repr(triv))


def check_base(space: Any, Z: Tensor, base: Any) -> None:
    """A base must be a tensor with the trailing shape of ``Z`` whose batch dims broadcast."""
    if base is None:
        return
    if not isinstance(base, torch.Tensor):
        raise error(space, "`base` to be a tensor (a point of the space) or None", describe(base))
    if base.shape[-2:] != Z.shape[-2:]:
        raise error(space, f"`base` of point shape {tuple(Z.shape[-2:])} like `Z`", f"shape {tuple(base.shape)}")
    try:
        torch.broadcast_shapes(base.shape[:-2], Z.shape[:-2])
    except RuntimeError:
        raise error(
            space, f"`base` batch dims broadcastable with those of `Z` {tuple(Z.shape[:-2])}", f"shape {tuple(base.shape)}"
        ) from None


def orthonormality_error(X: Tensor) -> Tensor:
    """``max |XᵀX − I|`` per matrix of a tall (n ≥ k) batch."""
    k = X.shape[-1]
    return (transpose(X) @ X - eye_like(X, k)).abs().amax(dim=(-2, -1))


def tall(X: Tensor) -> tuple[Tensor, bool]:
    """The tall form of a matrix batch and whether it was transposed (a static shape branch)."""
    if X.shape[-2] < X.shape[-1]:
        return transpose(X), True
    return X, False


def untall(X: Tensor, transposed: bool) -> Tensor:
    return transpose(X) if transposed else X
