"""Value maps: what a space of the rank/PSD family does with its singular values or eigenvalues.

Such a space is its rank plus a value map (derived from its hyperparameters): ``f`` and its
inverse, the projection of values used by ``project``, their violations, the floor, the values
of ``sample`` and ``Σ log|f|``. :class:`Identity` (LowRank), :class:`Abs` (PSSD, PSSDLowRank),
:class:`Positive` (FixedRank, GLp, PSD, PSSDFixedRank), :class:`Unit` (AlmostOrthogonal).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable, Optional, final

import torch
import torch.nn.functional as F

from .._errors import ManifoldError, error
from ._base import rounding_dtype

Tensor = torch.Tensor
Fn = Callable[[Tensor], Tensor]

__all__ = ["ValueMap", "Identity", "Abs", "Positive", "Unit", "normalize_f", "POSITIVE_MAPS", "UNIT_MAPS"]


# ------------------------------------------------------------------------- the named maps f
def floor_eps(dtype: torch.dtype) -> float:
    """The floor of ``"softplus"``: √ε of the dtype (float32 3.5e-4, float64 1.5e-8).

    A singular value at the floor is still resolved to ~√ε relative accuracy for unit-scale
    matrices, so that rank and determinant sign stay numerically certain, also in float32.
    """
    dtype = rounding_dtype(dtype)  # a bf16 result keeps √ε of bf16 (Note [Low precision])
    out = _FLOOR_EPS.get(dtype)
    if out is None:
        out = _FLOOR_EPS[dtype] = math.sqrt(torch.finfo(dtype).eps)
    return out


# torch.finfo costs microseconds per call. Filled at import for every dtype a point can have: a memo
# first filled inside torch.compile is a global that Dynamo guards on ("not ___dict_contains(
# torch.float64, ..._FLOOR_EPS)"), so every function compiled before the fill recompiled once after it.
_FLOOR_EPS: dict[torch.dtype, float] = {
    d: math.sqrt(torch.finfo(d).eps)
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)}


def softplus_eps(t: Tensor) -> Tensor:
    """``softplus(t) + ε`` with ``ε = floor_eps(dtype)``; linear above 20 (no overflow)."""
    return F.softplus(t) + floor_eps(t.dtype)


def softplus_inverse(y: Tensor) -> Tensor:
    """Inverse of ``F.softplus`` for ``y > 0``: ``y + log(−expm1(−y))`` (stable for small and large
    ``y``), and ``y`` itself above 20, where ``F.softplus`` is the identity."""
    # F.softplus(t) is t past its threshold of 20, not t + log1p(e^{−t}): the exact inverse there was
    # off by e^{−y} ≤ 2e-9, so in float64 a value just above 20 came back 1e-10 relative off (GLp of
    # a matrix with σ₁ = 20.1, and every SL from_manifold whose lifted values pass 20)
    return torch.where(y > 20.0, y, y + torch.log(-torch.expm1(-y)))


def softplus_eps_inverse(y: Tensor) -> Tensor:
    """Inverse of :func:`softplus_eps`: ``softplus_inverse(y − ε)``, ``y − ε`` clamped up to the smallest
    normal number (so values at or below the floor give a finite, very negative coordinate)."""
    return softplus_inverse((y - floor_eps(y.dtype)).clamp(min=torch.finfo(y.dtype).tiny))


def _asin(y: Tensor) -> Tensor:
    return torch.asin(y.clamp(-1.0, 1.0))


def _atanh(y: Tensor) -> Tensor:
    b = 1.0 - torch.finfo(y.dtype).eps
    return torch.atanh(y.clamp(-b, b))


def _scaled_sigmoid(t: Tensor) -> Tensor:
    """``2σ(t) − 1 = tanh(t/2)``, accurate near 0."""
    return torch.tanh(0.5 * t)


def _scaled_sigmoid_inverse(y: Tensor) -> Tensor:
    return 2.0 * _atanh(y)


POSITIVE_MAPS: dict[str, tuple[Fn, Fn]] = {"softplus": (softplus_eps, softplus_eps_inverse)}
UNIT_MAPS: dict[str, tuple[Fn, Fn]] = {
    "sin": (torch.sin, _asin),
    "tanh": (torch.tanh, _atanh),
    "sigmoid": (_scaled_sigmoid, _scaled_sigmoid_inverse),
    "scaled_sigmoid": (_scaled_sigmoid, _scaled_sigmoid_inverse),
}


def normalize_f(space: Any, f: Any, table: dict) -> Any:
    """Validate ``f`` (a name of ``table``, a callable or a pair ``(f, f_inverse)``); lists become tuples."""
    if isinstance(f, str):
        if f in table:
            return f
    elif callable(f):
        return f
    elif isinstance(f, (tuple, list)) and len(f) == 2 and callable(f[0]) and callable(f[1]):
        return tuple(f)
    names = ", ".join(repr(k) for k in table)
    raise error(space, f"`f` to be one of {names}, a callable or a pair (f, f_inverse) of callables", repr(f))


def _resolve(f: Any, table: dict) -> tuple[Fn, Optional[Fn]]:
    """``(f, f_inverse)`` of a normalized ``f``; ``f_inverse`` is None for a single callable. A user's
    callables are checked to return a tensor of their argument's shape and dtype (Note [A callable f's result])."""
    if isinstance(f, str):
        return table[f]
    if callable(f):
        return functools.partial(_checked_map, "f", f), None
    return functools.partial(_checked_map, "f", f[0]), functools.partial(_checked_map, "f_inverse", f[1])


# Note [A callable f's result]
# A user's value map ``f`` (applied to each raw coordinate of the singular or eigenvalues) was used as it
# returned: one with an extra trailing dim gave GLp a (4, 4, 4) point for a (4, 4) raw tensor and FixedRank
# (2, 5, 4) for (5, 4), a reduction (``f(s).sum()``) made every value the same, a float64 result raised torch's
# "expected m1 and m2 to have the same dtype", a shorter one torch's size error; all but the last two without
# an error. The result's shape and dtype are metadata (static under vmap and torch.compile): checked at each
# call, no value read. (As for a callable triv: Note [A callable triv's result] in geofunc/_linalg.py.)
def _checked_map(what: str, fn: Fn, t: Tensor) -> Tensor:
    v = fn(t)
    if not isinstance(v, torch.Tensor) or v.shape != t.shape or v.dtype != t.dtype:
        got = f"a tensor of shape {tuple(v.shape)} and dtype {v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
        raise ManifoldError(f"`{what}` {fn!r}: expected a map of each value that returns a tensor of its argument's shape "
                            f"{tuple(t.shape)} and dtype {t.dtype}, got {got}.")
    return v


# ----------------------------------------------------------------------------- violations
def floor_violation(v_min: Tensor, v_max: Tensor, floor: float, n: int, k: int) -> dict[str, Tensor]:
    """The smallest kept value must be clearly positive: ``max(0, c − v_min)/c``, ``c = max(0.999·floor − δ, δ₀)``.

    ``δ = ε √max(n, k) · v_max`` is the rounding error of a computed singular value: a point built
    with its smallest value at the floor (of the value map; 0 for a user map) has a computed
    ``v_min`` off by up to ``δ`` (a third of the floor at ``σ₁ ~ 100`` in float32), so the floor is
    lowered by it; ``v_min > δ₀`` still makes the rank numerically certain.

    ``ε`` is that of the dtype the point is stored in, ``δ₀`` the same bound with the ``ε`` of the
    dtype ``v_min`` was computed in. They differ for a bf16/fp16 point (Note [Low precision]): its
    values are computed in float32 from the stored matrix (to δ₀), but the stored matrix is the
    rounding of a float32 point, which moves its values by up to ``δ`` (bf16: ``δ`` exceeds the
    floor √ε from n ~ 64 at σ₁ ~ 2). Where it does, a low-precision point is required to be
    numerically certainly of full rank as stored, no more: its values are only known to that
    rounding.
    """
    sqrt_n = math.sqrt(max(n, k))
    delta = torch.finfo(rounding_dtype(v_min.dtype)).eps * sqrt_n * v_max
    delta0 = torch.finfo(v_min.dtype).eps * sqrt_n * v_max
    c = torch.maximum(0.999 * floor - delta, delta0).clamp(min=torch.finfo(v_min.dtype).tiny)
    return {"(c − σ_rank)/c, c = max(floor of f − δ, δ₀), δ = ε√n·σ₁": (c - v_min).clamp(min=0.0) / c}


# ----------------------------------------------------------------------------- value maps
@dataclasses.dataclass(frozen=True)
class ValueMap(abc.ABC):
    """Abstract. ``keep``: the mask of the values a point of rank r keeps (the r largest); ``d``:
    None, or the sign ``det U · det V`` of a square SVD whose ``project`` must fix it (GLp)."""

    @abc.abstractmethod
    def __call__(self, t: Tensor) -> Tensor:
        """The values ``f(t)`` of raw coordinates ``t``."""

    @abc.abstractmethod
    def inverse(self, space: Any, v: Tensor) -> Tensor:
        """Raw coordinates of the values ``v`` (``ManifoldError`` naming ``space`` if ``f`` has no inverse)."""

    @abc.abstractmethod
    def project(self, s: Tensor, keep: Tensor, d: Optional[Tensor], size: int = 1) -> tuple[Tensor, Tensor]:
        """``(g, g')``: the projected values of ``s`` and their derivative (for the spectral maps);
        ``size`` the larger dimension of the matrix (max(n, k))."""

    def violations(self, kept: Tensor, v_max: Tensor, n: int, k: int) -> dict[str, Tensor]:
        """Named violations of the kept values (``v_max`` the largest |value|)."""
        return {}

    def pinned(self) -> bool:
        """Whether the values are fixed (AlmostOrthogonal at λ = 0): the tangent space of a
        full-rank point is then the frames' only."""
        return False

    def dtype_dependent(self) -> bool:
        """Whether ``f`` depends on the dtype (``"softplus"``: its floor is √ε of the dtype), so that
        the same raw values mean other values in another dtype."""
        return False

    def sample(self, t: Tensor) -> Tensor:
        """``sample``'s values from separated ``t`` in (0, 1]: in (0.5, 1.5]."""
        return 0.5 + t

    def log_abs(self, t: Tensor) -> Tensor:
        """``Σ log|f(tᵢ)|`` (for ``logabsdet``)."""
        return torch.log(self(t).abs()).sum(-1)

    def derivative(self, t: Tensor) -> Optional[Tensor]:
        """``f′(t)`` where it has a closed form here, else None (the caller differentiates ``f``)."""
        return None


def _missing_inverse(space: Any, f: Any) -> Exception:
    return error(space, "`f` given as a pair (f, f_inverse) (or a name) so that from_manifold can invert it",
                 f"the single callable {f!r}: no inverse was given")


@final
@dataclasses.dataclass(frozen=True)
class Identity(ValueMap):
    """``f(s) = s`` (any sign); ``project`` keeps the r largest and zeroes the others (truncated SVD)."""

    def __call__(self, t: Tensor) -> Tensor:
        return t

    def inverse(self, space: Any, v: Tensor) -> Tensor:
        return v

    def project(self, s: Tensor, keep: Tensor, d: Optional[Tensor], size: int = 1) -> tuple[Tensor, Tensor]:
        k = keep.to(s.dtype)
        return s * k, k.expand_as(s)


@final
@dataclasses.dataclass(frozen=True)
class Abs(ValueMap):
    """``f(λ) = |λ|``; ``project`` clips the kept values at 0 and zeroes the others (the nearest point)."""

    def __call__(self, t: Tensor) -> Tensor:
        return t.abs()

    def inverse(self, space: Any, v: Tensor) -> Tensor:
        return v.abs()

    def project(self, s: Tensor, keep: Tensor, d: Optional[Tensor], size: int = 1) -> tuple[Tensor, Tensor]:
        return torch.where(keep, s.clamp(min=0.0), torch.zeros_like(s)), (keep & (s > 0)).to(s.dtype)


@final
@dataclasses.dataclass(frozen=True)
class Positive(ValueMap):
    """``f(t) > 0``: ``f`` a name of :data:`POSITIVE_MAPS` (``"softplus"`` = ``softplus + √ε``), a
    callable or a pair ``(f, f_inverse)``. The floor is √ε for ``"softplus"``, 0 for a user map.

    ``project`` clamps the kept values up to ``max(floor, min(√ε, 4ε√size) · max(1, σ₁))`` (four
    times the rounding of a computed singular value, so that the result is certainly of full rank,
    and a member's values are kept: Note [Members are fixed points of project]) and zeroes the
    others; with ``d``, the smallest kept value becomes ``−max(floor, √ε · max(1, σ₁))`` where
    ``d < 0``: the nearest point of the closure of the det > 0 component, pushed inside. The
    nearest point for a member (itself), a canonical point of the open set otherwise.
    """

    f: Any

    def __call__(self, t: Tensor) -> Tensor:
        return _resolve(self.f, POSITIVE_MAPS)[0](t)

    def inverse(self, space: Any, v: Tensor) -> Tensor:
        inv = _resolve(self.f, POSITIVE_MAPS)[1]
        if inv is None:
            raise _missing_inverse(space, self.f)
        return inv(v)

    def floor(self, dtype: torch.dtype) -> float:
        return floor_eps(dtype) if isinstance(self.f, str) else 0.0

    def derivative(self, t: Tensor) -> Optional[Tensor]:
        # softplus + ε: σ(t), and 1 past F.softplus's threshold of 20, where it is the identity
        return torch.where(t > 20.0, torch.ones_like(t), torch.sigmoid(t)) if self.f == "softplus" else None

    def dtype_dependent(self) -> bool:
        return isinstance(self.f, str)

    def project(self, s: Tensor, keep: Tensor, d: Optional[Tensor], size: float = 1) -> tuple[Tensor, Tensor]:
        # Note [Members are fixed points of project]
        # The lift was to √ε·max(1, σ₁), far above membership's bound (the floor of f, or the rounding
        # ε√size·σ₁ of a computed value): a float32 GLp/FixedRank/PSD point with cond > 1/√ε ≈ 3e3
        # (σ = 1e4, 1, 0.5) was a member that project moved (3.8e-4 relative), and retract(X, V) =
        # project(X + V) was no retraction there: retract(X, 0) ≠ X, and a step V of 1e-3 moved X by
        # 1.3e3·|V|. The lift is now four times that rounding (the result's recomputed values keep
        # a margin of three over membership's bound), never above √ε as before (bf16: ε√size ≫ √ε).
        smax = s.abs().amax(-1, keepdim=True).clamp(min=1.0)
        eps = torch.finfo(rounding_dtype(s.dtype)).eps
        floor = self.floor(s.dtype)
        c = (min(math.sqrt(eps), 4.0 * eps * math.sqrt(size)) * smax).clamp(min=floor)
        g = torch.where(keep, torch.maximum(s, c), torch.zeros_like(s))
        dg = (keep & (s > c)).to(s.dtype)
        if d is not None:  # the smallest kept value (the last kept index) takes the sign
            last = keep & (torch.arange(s.shape[-1], device=s.device) == keep.sum(-1, keepdim=True) - 1)
            neg = (d < 0).unsqueeze(-1) & last
            g = torch.where(neg, -(math.sqrt(eps) * smax).clamp(min=floor).expand_as(s), g)
            dg = torch.where(neg, torch.zeros_like(dg), dg)
        return g, dg

    def violations(self, kept: Tensor, v_max: Tensor, n: int, k: int) -> dict[str, Tensor]:
        return floor_violation(kept.amin(-1), v_max, self.floor(kept.dtype), n, k)

    def log_abs(self, t: Tensor) -> Tensor:
        v = self(t)  # a named map is positive by construction: no abs, one autograd node less
        return torch.log(v if isinstance(self.f, str) else v.abs()).sum(-1)


@final
@dataclasses.dataclass(frozen=True)
class Unit(ValueMap):
    """``1 + λ f(t)`` with ``f`` into ``[−1, 1]`` (a name of :data:`UNIT_MAPS`, a callable or a pair);
    ``project`` clamps to ``[1 − λ, 1 + λ]`` (the nearest point); at ``λ = 0`` the values are pinned at 1."""

    lam: float
    f: Any

    def __post_init__(self) -> None:
        # Note [Hyperparameters formatted outside a trace]
        # `torch.compile(dynamic=True)` traces a float attribute of an object it closes over (a
        # space's `lam`) as a symbolic float, and Dynamo cannot format one into a string: an f-string
        # of `self.lam` inside `contains` broke the graph (fullgraph=True refused it). Made here, from
        # the float, it still broke a space built inside a compiled function from a float argument,
        # symbolic from its second value on (tests/test_protocol.py). The name formats nothing: the
        # messages of check name the space, whose repr holds `lam`.
        object.__setattr__(self, "_violation_name", "max(0, max|σ − 1| − lam)")

    def pinned(self) -> bool:
        return self.lam == 0

    def __call__(self, t: Tensor) -> Tensor:
        return 1.0 + self.lam * _resolve(self.f, UNIT_MAPS)[0](t)

    def inverse(self, space: Any, v: Tensor) -> Tensor:
        inv = _resolve(self.f, UNIT_MAPS)[1]
        if inv is None:
            raise _missing_inverse(space, self.f)
        if self.lam == 0:
            return 0.0 * v
        return inv((v - 1.0) / self.lam)

    def project(self, s: Tensor, keep: Tensor, d: Optional[Tensor], size: int = 1) -> tuple[Tensor, Tensor]:
        lo, hi = 1.0 - self.lam, 1.0 + self.lam
        return s.clamp(lo, hi), ((s > lo) & (s < hi)).to(s.dtype)

    def violations(self, kept: Tensor, v_max: Tensor, n: int, k: int) -> dict[str, Tensor]:
        return {self._violation_name: ((kept - 1.0).abs() - self.lam).clamp(min=0.0).amax(-1)}

    def sample(self, t: Tensor) -> Tensor:
        """Spread over ``[1 − 0.9λ, 1 + 0.9λ]``: ``1 + 0.9λ(2t − 1)``."""
        return 1.0 + 0.9 * self.lam * (2.0 * t - 1.0)
