r"""Hyperbolic geometry in the Poincaré ball, as pure functions of tensors.

The Poincaré ball of curvature :math:`-c` (``c > 0``) is the open ball

.. math::

    \mathbb{D}^n_c = \{x \in \mathbb{R}^n : c\|x\|^2 < 1\}, \qquad
    g_x = \lambda_x^2\, g^E, \quad \lambda_x = \frac{2}{1 - c\|x\|^2}

on the **last** dimension of a tensor (leading dimensions are a batch). Every function takes
the curvature as the keyword ``c`` (a positive Python number, or a 0-d tensor for a learnable
curvature) and composes with ``torch.func`` (``vmap``, ``grad``, ``jvp``, ``jacfwd``,
``jacrev``, ``hessian``) and ``torch.compile``: no Python branching on tensor values, and
every map is smooth where its formula is (``expmap``, ``logmap``, the Möbius operations at
0 included).

**Numerics near the boundary** (Note [stable gyrovector formulas]). The textbook formulas
subtract numbers of size 1 to get quantities of size ``1 − c‖x‖²``, which float32 cannot
resolve near the boundary (geoopt therefore keeps float32 points at ``√c‖x‖ ≤ 1 − 4·10⁻³``).
Here every formula is rewritten in terms of the *gaps* ``g_x = 1 − c‖x‖²`` and differences
``y − x``, so that no such cancellation occurs; e.g.

.. math::

    u \oplus_c y = \frac{g_u (u + y) + c\|u + y\|^2 u}{g_u g_y + c\|u + y\|^2}, \qquad
    1 - c\|u \oplus_c y\|^2 = \frac{g_u g_y}{g_u g_y + c\|u + y\|^2}

(a sum of non-negative terms in the denominator). Values and gradients stay finite and
accurate in float32 for points with ``c‖x‖² = 1 − 10⁻⁵`` and beyond.

**Stated clamps** (the only places where a value is changed):

* the gap ``1 − c‖x‖²`` of an *input* is clamped at ``≥ ε`` (machine epsilon of the dtype),
  which only touches inputs on or beyond the float boundary of the ball;
* every map that *returns a point* (``mobius_add``, ``mobius_scalar_mul``,
  ``mobius_matvec``, ``expmap``, ``expmap0``, ``weighted_midpoint``, ``project``,
  ``lorentz_to_poincare``) clamps it into ``√c‖x‖ ≤ 1 − δ`` with the margin
  ``δ = ball_margin(dtype) = 8ε`` (``9.5·10⁻⁷`` in float32, ``1.8·10⁻¹⁵`` in float64), i.e.
  hyperbolic distance ≤ ``log(2/δ)/√c`` from the origin (14.6 and 34.7 for ``c = 1``); where
  the point is inside the margin nothing changes;
* hyperbolic arguments (``tanh``, ``cosh``) are capped at 40 (``tanh(40) = 1`` in every
  float dtype), so that no ``inf`` reaches a gradient; a longer tangent vector is rescaled along
  itself to that length, so ``expmap`` gives the boundary point of its geodesic (Note [long
  tangent vectors]).

**Limits of the representation** (the problem's conditioning, not a formula's; measured against
60-digit mpmath on the same float inputs, tests/test_hyperbolic.py):

* float64 has no wider type to accumulate ``‖x‖²`` in, so the gap ``g = 1 − c‖x‖²`` of a float64
  point is read from its coordinates to about ``ε`` absolute, ``ε/g`` relative: ``dist`` to a point
  at gap ``g`` is off by up to about ``ε/g`` absolute (``10⁻⁴`` at ``g = 2·10⁻¹²``, ``0.05`` at
  ``2·10⁻¹⁵``, distances ≈ 30), ``logmap`` and the gradients of ``dist`` by about ``ε/g`` relative
  (up to ``10⁻⁴`` and ``6·10⁻²`` there). float32 points, whose gap is computed in float64, stay
  at ``~10⁻⁷`` relative up to their float boundary.
* A point reached along a geodesic of length ``d`` through a tangent vector (``expmap``, and the round
  trip ``expmap(x, logmap(x, y))``) inherits the rounding ``ε`` of the vector's direction times
  ``sinh(√c d)``: it is within about ``(1–8)·ε·sinh(√c d)/√c`` of the exact point. The round trip
  loses every digit from ``√c d ≈ 37`` in float64 (two points at ``1 − 10⁻⁸`` on opposite sides) and
  ``≈ 16`` in float32 (``0.9999``), whatever the formula.
* float16: the gradient of ``dist`` with respect to a point has norm about ``λ_x = 2/g``, which
  overflows float16 (65504) to ``inf`` at stored float16 points with ``g < 3·10⁻⁵`` (points of the
  ball for ``n ≥ 2``; no map returns one, their margin keeps ``g ≳ 1.6·10⁻²``): keep float16 models'
  weights in float32 (autocast). bfloat16's range has no such overflow; its margin (``0.0625``) keeps
  every returned point at ``√c‖x‖ ≤ 0.9375`` (distance 3.47 from the origin), so a map of stored
  bfloat16 points beyond it (up to ``0.996``) comes back clamped there.

A huge finite vector to be mapped to a point (``project``'s, ``expmap``'s and ``expmap0``'s,
``r`` of ``r ⊗ x``, ``Mx`` of ``M ⊗ x``) gives the boundary point in its direction, never the
origin (``project([1e20, 1e20])`` in float32: Note [norms without overflow]); NaN or inf input
gives NaN output, never a plausible point.

Example:
    >>> import torch
    >>> from geofunc import hyperbolic as hyp
    >>> x, y = torch.tensor([0.3, 0.1]), torch.tensor([-0.2, 0.5])
    >>> z = hyp.expmap(x, hyp.logmap(x, y))            # the exponential inverts the logarithm
    >>> bool(torch.allclose(z, y, atol=1e-6))
    True
    >>> float(hyp.dist(x, y)) > 0
    True

References:
    A. A. Ungar, *A Gyrovector Space Approach to Hyperbolic Geometry*, 2008.
    O.-E. Ganea, G. Bécigneul, T. Hofmann, *Hyperbolic Neural Networks*, NeurIPS 2018.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch

from ._dtensor import DTensor
from ._errors import ManifoldError, describe, not_dense, real_value
from ._linalg import poison

__all__ = [
    "ball_margin",
    "conformal_factor",
    "dist",
    "dist2plane",
    "expmap",
    "expmap0",
    "gyration",
    "logmap",
    "logmap0",
    "lorentz_to_poincare",
    "mobius_add",
    "mobius_matvec",
    "mobius_scalar_mul",
    "parallel_transport",
    "poincare_to_lorentz",
    "project",
    "weighted_midpoint",
]

Tensor = torch.Tensor
Curvature = Union[float, Tensor]
_F = TypeVar("_F", bound=Callable[..., Any])

# ----------------------------------------------------------------------------- smooth series
# Note [sqrt-free hyperbolic functions]
# The maps need tanh(r)/r, artanh(r)/r, cosh(r), sinh(r)/r and arcosh(1+u)/sqrt(u(u+2)) at
# r = sqrt(t). As functions of t (or u) these are analytic at 0, so they are evaluated as
# truncated power series below _T_SMALL (no sqrt there: every derivative, hessians included,
# is finite and exact at t = 0) and with the closed form above it. Both branches run on a
# masked copy of t ("double where"), so neither leaks inf/NaN into the other's gradient.
# With t < 0.01 the first omitted term is below 1e-17 relative for every series (the tanh
# series' ratio tends to -4/π², the arcosh one's to -1/2).
_T_SMALL = 0.01
_TANHC = (1.0, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075, -929569 / 638512875)
_ARTANHC = tuple(1.0 / (2 * k + 1) for k in range(9))
_COSH = tuple(1.0 / math.factorial(2 * k) for k in range(8))
_SINHC = tuple(1.0 / math.factorial(2 * k + 1) for k in range(8))
# arcosh(1 + u) / sqrt(u (u + 2)) = θ / sinh θ with u = cosh θ − 1: (−1)^k (k!)² 2^k / (2k + 1)!.
_ARCOSHC = tuple((-1) ** k * math.factorial(k) ** 2 * 2**k / math.factorial(2 * k + 1) for k in range(9))
# arsinh(√u) / √u: (−1)^k (2k)! / (4^k (k!)² (2k + 1)) (ratio → −1: 1e-18 at u < 0.01 after 9 terms).
_ARSINHC = tuple((-1) ** k * math.factorial(2 * k) / (4**k * math.factorial(k) ** 2 * (2 * k + 1)) for k in range(9))
# Largest argument of tanh/cosh/sinh: tanh(40) == 1 in float64, and cosh(40)² ≈ 5.5e33 is finite in float32.
_ARG_MAX = 40.0


def _horner(t: Tensor, coefs: tuple[float, ...]) -> Tensor:
    out = torch.full_like(t, coefs[-1])
    for a in reversed(coefs[:-1]):
        out = out * t + a
    return out


def _series_or(t: Tensor, coefs: tuple[float, ...], direct: Callable[[Tensor], Tensor]) -> Tensor:
    """``Σ coefs[k] t^k`` for ``t < _T_SMALL``, ``direct(t)`` elsewhere (Note [sqrt-free hyperbolic functions])."""
    small = t < _T_SMALL  # False for NaN: NaN takes the direct branch and stays NaN
    series = _horner(torch.where(small, t, torch.zeros_like(t)), coefs)
    return torch.where(small, series, direct(torch.where(small, torch.ones_like(t), t)))


def _tanhc(t: Tensor) -> Tensor:
    """``tanh(√t)/√t`` for ``t ≥ 0``, smooth at 0; the argument is capped at ``_ARG_MAX``."""

    def direct(t: Tensor) -> Tensor:
        r = torch.sqrt(t)
        return torch.tanh(r.clamp(max=_ARG_MAX)) / r

    return _series_or(t, _TANHC, direct)


def _artanhc(t: Tensor, gap: Tensor) -> Tensor:
    """``artanh(√t)/√t`` for ``0 ≤ t < 1``, with ``gap = 1 − t`` supplied accurately.

    ``artanh r = ½ log1p(2r(1 + r)/(1 − r²))`` is accurate for every ``r < 1`` given the gap
    ``1 − r²`` (computed by the caller without cancellation), unlike ``atanh(r)`` near 1.
    """
    small = t < _T_SMALL
    series = _horner(torch.where(small, t, torch.zeros_like(t)), _ARTANHC)
    tb = torch.where(small, torch.ones_like(t), t)
    gb = torch.where(small, torch.ones_like(gap), gap)
    r = torch.sqrt(tb)
    return torch.where(small, series, 0.5 * torch.log1p(2.0 * r * (1.0 + r) / gb) / r)


def _cosh(t: Tensor) -> Tensor:
    """``cosh √t`` for ``t ≥ 0``, smooth at 0; the argument is capped at ``_ARG_MAX``."""
    return _series_or(t, _COSH, lambda t: torch.cosh(torch.sqrt(t).clamp(max=_ARG_MAX)))


def _sinhc(t: Tensor) -> Tensor:
    """``sinh √t / √t`` for ``t ≥ 0``, smooth at 0; the argument is capped at ``_ARG_MAX``."""

    def direct(t: Tensor) -> Tensor:
        r = torch.sqrt(t)
        return torch.sinh(r.clamp(max=_ARG_MAX)) / r

    return _series_or(t, _SINHC, direct)


def _arcoshc(u: Tensor) -> Tensor:
    """``arcosh(1 + u) / √(u(u + 2))`` for ``u ≥ 0`` (= θ / sinh θ), smooth at 0."""

    def direct(u: Tensor) -> Tensor:
        w = torch.sqrt(u) * torch.sqrt(u + 2.0)  # (u(u + 2) overflows from u ~ 1e154: d ~ 355)
        return torch.log1p(u + w) / w

    return _series_or(u, _ARCOSHC, direct)


# ------------------------------------------------------------------------------ helpers
def _sq(x: Tensor) -> Tensor:
    return (x * x).sum(-1, keepdim=True)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1, keepdim=True)


def _check_c(c: Any, fn: str, x: Any = None, xname: str = "x") -> Curvature:
    """A Python number must be finite and > 0 (else ManifoldError); a tensor must be a real floating 0-d
    one (checked by shape, no data read), and is NaN where it is not > 0: a curvature ≤ 0 gave plausible
    values (dist 0, a finite Möbius sum) where a number ≤ 0 is refused. A tensor must be on the device
    of the points ``x`` (named ``xname``), or on the CPU: torch takes a CPU 0-d tensor as a scalar with
    tensors of any device, but a CUDA (meta, ...) one with CPU points was torch's internal device error."""
    if isinstance(c, torch.Tensor):
        if c.ndim != 0 or not c.dtype.is_floating_point:
            raise ManifoldError(f"geofunc.hyperbolic.{fn}: expected a curvature `c` > 0 (a Python number or a 0-d "
                                f"floating tensor), got {describe(c)}.")
        _check_mixed(fn, (x, xname), (c, "c"))  # Note [plain tensors beside DTensors]
        if isinstance(x, torch.Tensor) and c.device != x.device and c.device.type != "cpu":
            raise ManifoldError(f"geofunc.hyperbolic.{fn}: expected a curvature `c` on the device of `{xname}` ({x.device}) "
                                f"or a CPU 0-d tensor, got {describe(c)} on {c.device}.")
        return torch.where(c > 0, c, torch.full_like(c, math.nan))
    value = real_value(c)
    if not 0.0 < value < math.inf:
        raise ManifoldError(
            f"geofunc.hyperbolic.{fn}: expected a curvature `c` > 0 (a finite Python number or a tensor), got {describe(c)}."
        )
    return value


def _check_mixed(fn: str, *args: tuple[Any, str]) -> None:
    """Each ``(tensor, name)`` a DTensor if any of them is, or none is: a plain tensor beside a
    DTensor is refused with a ManifoldError (Note [plain tensors beside DTensors]). A plain 0-d
    tensor (a curvature, a coefficient, a margin) is a scalar to DTensor, as a number is: accepted."""
    dts = [what for t, what in args if type(t) is not Tensor and isinstance(t, DTensor)]  # (plain: no isinstance)
    if not dts:
        return
    for t, what in args:
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.ndim > 0:
            raise ManifoldError(
                f"geofunc.hyperbolic.{fn}: expected `{what}` to be a DTensor like `{dts[0]}` (every tensor argument "
                f"a DTensor on one mesh, or none), got {describe(t)} that is not a DTensor. Distribute it "
                f"(torch.distributed.tensor.distribute_tensor) or pass `{dts[0]}` as a plain tensor (.full_tensor())."
            )


# Note [plain tensors beside DTensors]
# Every map here is a composition of torch ops, which DTensor runs on any placement, as long as every
# tensor argument is a DTensor (Note [Hyperbolic functions in low precision]: nothing is routed). One
# plain tensor beside a DTensor (dist(x, y) with y a DTensor and x not, or the other way round; a
# DTensor curvature with plain points) raised torch's "aten.sub.Tensor got mixed torch.Tensor and
# DTensor" from deep inside the formula, naming an aten op instead of the argument. _check_mixed
# refuses that up front with a ManifoldError naming the function and the argument; it runs in every
# function's checks (_check_vecs for two or more points/vectors, and each function's own for `c`,
# `r`, `M`, `weights` and `margin`). A plain 0-d tensor with DTensor points stays accepted: DTensor
# takes it as a scalar, as it does a Python number.


def _check_vec(x: Any, fn: str, what: str) -> None:
    if isinstance(x, torch.Tensor) and not_dense(x):  # Note [Dense tensors only]
        raise ManifoldError(  # (in geofunc/spaces/_base.py)
            f"geofunc.hyperbolic.{fn}: expected `{what}` to be a dense (strided) tensor, got {describe(x)}."
        )
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 1 or x.shape[-1] == 0:
        raise ManifoldError(
            f"geofunc.hyperbolic.{fn}: expected `{what}` to be a real floating tensor of vectors (..., n), got {describe(x)}."
        )


def _broadcastable(a: Any, b: Any) -> bool:
    """Whether two batch shapes broadcast (as ``torch.broadcast_shapes``, without its Python)."""
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def _check_vecs(fn: str, *args: tuple[Any, str]) -> None:
    """Each ``(tensor, name)`` a tensor of vectors (:func:`_check_vec`), all of one vector length,
    dtype and device, with batch dims that broadcast: a mismatch would otherwise be torch's unnamed
    size error inside a product, or a silent promotion of float32 to float64."""
    for t, what in args:
        _check_vec(t, fn, what)
    _check_mixed(fn, *args)
    (x, xname), rest = args[0], args[1:]
    for t, what in rest:
        if t.shape[-1] != x.shape[-1]:
            expected = f"`{what}` of the vector length of `{xname}` ({x.shape[-1]})"
        elif t.dtype != x.dtype or t.device != x.device:
            expected = f"`{what}` of the dtype and device of `{xname}` ({dtype_for_message(x)}; {x.device})"
        elif not _broadcastable(x.shape[:-1], t.shape[:-1]):
            expected = f"`{what}` with batch dims broadcastable with those of `{xname}` {tuple(x.shape[:-1])}"
        else:
            continue
        raise ManifoldError(f"geofunc.hyperbolic.{fn}: expected {expected}, got {describe(t)} on {t.device}.")


def _sqrt_c(c: Curvature) -> Curvature:
    return c**0.5


def ball_margin(dtype: torch.dtype) -> float:
    """The margin ``δ = 8ε`` of the dtype: points are kept at ``√c‖x‖ ≤ 1 − δ`` (module docstring)."""
    return 8.0 * torch.finfo(dtype).eps


def _gap(x: Tensor, c: Curvature) -> Tensor:
    """``1 − c‖x‖²`` clamped at ``≥ ε`` (a stated clamp: touches only points on or beyond the float boundary).

    For float32 (and lower) input the squared norm is accumulated in float64 (Note [the gap in
    double precision]).
    """
    return (1.0 - _r2(x, c)).to(x.dtype).clamp(min=torch.finfo(x.dtype).eps)


def _r2(x: Tensor, c: Curvature) -> Tensor:
    """``c‖x‖²`` (last dim, kept), in float64 for lower precisions (Note [the gap in double precision])."""
    if x.dtype != torch.float64 and x.device.type != "mps":  # MPS has no float64
        return c * _sq(x.double())
    return c * _sq(x)


def _onto(x: Tensor, c: Curvature) -> tuple[Tensor, Tensor]:
    """``(x, gap)`` of an input point: ``x`` pulled radially onto the float boundary where its gap is
    below ε, and the gap clamped at ``≥ ε`` (Note [points on or outside the boundary]). Inside, ``x``
    times exactly 1 (value and derivatives) and :func:`_gap`'s gap."""
    r2 = _r2(x, c)
    eps = torch.finfo(x.dtype).eps
    # √((1 − ε)/r2) where r2 > 1 − ε (onto √c‖x‖ = √(1 − ε), whose gap is the clamped one), exactly 1
    # elsewhere; r2 − r2 is NaN where r2 overflowed (‖x‖ ≳ 1e154 in float64): NaN, not the origin
    scale = torch.rsqrt(torch.clamp(r2 * (1.0 / (1.0 - eps)), min=1.0)) + (r2 - r2)
    return x * scale.to(x.dtype), (1.0 - r2).to(x.dtype).clamp(min=eps)


# Note [points on or outside the boundary]
# The gap of an input is clamped at ε, but the formulas also read the point itself (u + y, y − x,
# ⟨x, a⟩): a point far outside the ball with its gap clamped was read as another point. For
# y = [100, 0], 0 ⊕ y came out as y/(ε + ‖y‖²) ≈ [0.01, 0]: dist(0, y) was 0.02 in float32 and
# float64, non-monotone in ‖y‖ (17.3 at [1, 0], 18.0 at [3, 0], 0.02 at [100, 0]), where the
# stated rule is that such a point reads as the point at the float boundary in its direction.
# _onto pulls every input point whose gap is below ε radially onto √c‖x‖ = √(1 − ε), so the
# point and its clamped gap agree, in every map that reads both. A point inside the ball (every
# point a map returns, every point of the space) is untouched: a where on a mask, no arithmetic
# on x. Maps that read only the gap (conformal_factor, egrad_to_rgrad, inner) keep _gap.


# Note [the gap in double precision]
# Near the boundary everything hinges on g = 1 − c‖x‖². A float32 point with g = 1e-5 has a
# well-defined gap, but computing it in float32 rounds ‖x‖² (≈ 1) to ~n·6e-8 absolute: ~2% of
# g (20% at g = 1e-6), i.e. distances off by up to ~0.01–0.05 at d ≈ 10–20. Accumulating ‖x‖²
# in float64 (n multiply-adds per point, negligible next to the rest) gives the gap of the
# stored point to float32 precision, and every formula downstream is cancellation-free, so
# float32 distances near the boundary are accurate to ~1e-6 relative
# (tests/test_hyperbolic.py). Gradients flow through the cast unchanged.


# Note [norms without overflow]
# ‖y‖² overflows for ‖y‖ ≳ 1.8e19 in float32 (1.3e154 in float64), and m/√inf = 0 rescaled a huge
# finite vector to the origin: project([1e20, 1e20, 0]), expmap0([1e30, 0, 0]), 1e30 ⊗ x and
# (1e25·I) ⊗ x were all [0, 0, 0] in float32. So a norm that decides a cap is taken as s‖y/s‖ with
# s = ‖y‖₁ clamped into [1, largest float] (_scaled; one reduction, 2.4× faster than max_i |y_i|
# on 16-vectors): |y_i/s| ≤ 1, so ‖y/s‖² ≤ n cannot overflow, ‖y/s‖² ≥ 1/n² where s > 1 (only
# entries below ~1e-38 of the largest, float32, are lost), and for ‖y‖₁ ≤ 1 (s = 1) the
# arithmetic is the unscaled one. s is detached: ‖y‖ = s‖y/s‖ for every constant s, so every
# derivative is the exact one. A capped vector is rebuilt as (y/s)·b/‖y/s‖, never as y times a
# factor b/‖y‖ that could underflow; quantities that hold s² are computed only where the vector is
# inside its cap (s is replaced by 1 elsewhere, so that no inf reaches a derivative). NaN or inf
# entries give NaN (inf/inf), never a plausible point. The final clamp of a map's result, a point
# of the ball up to rounding, needs none of it (_clamp_into_ball).
def _scaled(Y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Y/s, s, ‖Y/s‖²)`` with ``s = ‖Y‖₁`` clamped into ``[1, max]``, detached (Note [norms without overflow])."""
    s = Y.detach().abs().sum(-1, keepdim=True).clamp(min=1.0, max=torch.finfo(Y.dtype).max)  # NaN stays NaN
    Ys = Y / s
    return Ys, s, _sq(Ys)


def _cap(Y: Tensor, bound: Union[float, Tensor]) -> Tensor:
    """``Y`` rescaled to Euclidean norm ``≤ bound`` (last dim), without overflow in the norm.

    ``bound`` (> 0) is a number or a tensor that broadcasts against ``(*batch, 1)``. Where ``Y`` is
    within the bound nothing changes, value and derivatives (Note [norms without overflow]);
    beyond it the result is ``bound·Y/‖Y‖`` for every finite ``Y``. NaN or inf entries give NaN.
    """
    Ys, s, q = _scaled(Y)
    b = bound / s
    inside = q <= b * b  # False for NaN
    one = torch.ones_like(q)
    # the square root is taken of 1 inside: √q has an infinite derivative at Y = 0 (the chart centre)
    return torch.where(inside, Y, Ys * (bound / torch.sqrt(torch.where(inside, one, q))))


def _project(x: Tensor, c: Curvature, margin: Optional[float] = None) -> Tensor:
    """``x`` rescaled into ``√c‖x‖ ≤ 1 − δ``, for every finite ``x`` (huge ones included); unchanged inside."""
    return _cap(x, (1.0 - (ball_margin(rounding_dtype(x.dtype)) if margin is None else margin)) / _sqrt_c(c))


def _clamp_into_ball(x: Tensor, c: Curvature, margin: Optional[float] = None) -> Tensor:
    """``x`` rescaled into ``√c‖x‖ ≤ 1 − δ``; unchanged (value and derivatives) where it is inside.

    For a computed point of the ball (a map's result, within rounding of it): ``c‖x‖²`` must not
    overflow. Raw input goes through :func:`_project` (Note [norms without overflow]).
    """
    m = 1.0 - (ball_margin(rounding_dtype(x.dtype)) if margin is None else margin)
    r2 = c * _sq(x)
    inside = r2 <= m * m  # False for NaN: NaN goes through the division and stays NaN
    scale = torch.where(inside, torch.ones_like(r2), m / torch.sqrt(torch.where(inside, torch.ones_like(r2), r2)))
    return x * scale


def _add(u: Tensor, y: Tensor, gu: Tensor, gy: Tensor, c: Curvature) -> Tensor:
    """``u ⊕ y`` from the gaps ``gu``, ``gy`` (Note [stable gyrovector formulas]; its gap is ``gu gy / den``)."""
    s = u + y
    cs2 = c * _sq(s)
    return (gu * s + cs2 * u) / (gu * gy + cs2)


def _neg_add(x: Tensor, y: Tensor, gx: Tensor, gy: Tensor, c: Curvature) -> tuple[Tensor, Tensor, Tensor]:
    """``(N, D, gap)`` with ``(−x) ⊕ y = N / D``, written with ``y − x`` so that nearby points lose nothing."""
    d = y - x
    cd2 = c * _sq(d)
    den = gx * gy + cd2
    return gx * d - cd2 * x, den, gx * gy / den


def _gyr(x: Tensor, d: Tensor, gx: Tensor, gy: Tensor, z: Tensor, c: Curvature) -> Tensor:
    """``gyr[x + d, −x] z`` from the gaps of ``x`` and ``x + d`` (Note [stable gyrovector formulas])."""
    d2, xd, xz, dz = _sq(d), _dot(x, d), _dot(x, z), _dot(d, z)
    num = (c * gx * dz - c * c * d2 * xz) * x + (-c * gx * xz - c * c * _sq(x) * dz + 2 * c * c * xd * xz) * d
    return z + 2.0 * num / (gx * gy + c * d2)


# Note [stable gyrovector formulas]
# With gaps g = 1 − c‖·‖², Möbius addition is
#   u ⊕ y = (g_u (u + y) + c‖u + y‖² u) / (g_u g_y + c‖u + y‖²),
# algebraically equal to Ungar's ((1 + 2c⟨u,y⟩ + c‖y‖²) u + g_u y) / (1 + 2c⟨u,y⟩ + c²‖u‖²‖y‖²)
# but with a denominator that is a sum of non-negative terms: for u ≈ −y near the boundary
# the textbook denominator 1 + 2c⟨u,y⟩ + c²‖u‖²‖y‖² is a difference of O(1) numbers equal to
# O(g²) (≈ 1e-10 at c‖x‖² = 1 − 1e-5, below float32 resolution), which is what makes
# distances between nearby boundary points NaN or garbage in float32 elsewhere. The gap of a
# sum is exact from the gaps: 1 − c‖u ⊕ y‖² = g_u g_y / (g_u g_y + c‖u + y‖²), so chained maps
# never recompute a gap from a point near the boundary. The same rewriting gives
#   gyr[y, −x] z = z + 2((c g_x ⟨d, z⟩ − c²‖d‖²⟨x, z⟩) x
#                        + (−c g_x ⟨x, z⟩ − c²‖x‖²⟨d, z⟩ + 2c²⟨x, d⟩⟨x, z⟩) d) / (g_x g_y + c‖d‖²)
# with d = y − x: every term of the numerator is O(‖d‖), and each of them over the denominator
# is at most a few times ‖z‖ (no large numbers cancel), so parallel transport between nearby
# points near the boundary is accurate too. The public gyration is the same function (_gyr):
# gyr[u, v] = gyr[y, −x] with x = −v, y = u, d = u + v. In Ungar's form its A and B are
# differences of O(c) numbers whose sum is O(‖u + v‖): at √c‖u‖ = 1 − 1e-5 in float32,
# gyr[u, −u] w (the identity) had norm 147.8 for ‖w‖ = 0.79 (float64 at 1 − 1e-9: error 79‖w‖).


# ------------------------------------------------------------------------ the public maps
# Note [Hyperbolic functions in low precision]
# The public functions below follow the spaces' low-precision policy (Note [Low precision] in
# geofunc/spaces/_base.py): given a bfloat16/float16 tensor they compute in float32 with autocast
# off (float32 input under autocast too) and round the result back, with the margin of a returned point that of the stored dtype
# (rounding_dtype), so that the rounded point stays inside the ball. Computed in float16 itself,
# dist and logmap overflowed to inf/NaN for points inside the ball at c‖x‖² ≳ 0.99 (the gap's
# reciprocal squared exceeds 65504), where PoincareBall.dist, which takes the policy, was finite.
# Not the spaces' wrapper (spaces/_base.py's _in_float32): that one takes the dtype of the first
# tensor argument and routes DTensors; here the point ``x`` sets it where the function has one
# (mobius_scalar_mul's r and mobius_matvec's M come first), else the first tensor, and DTensors are
# not routed. Any low-precision argument used to set it: a float32 x beside a bf16 r, M or y came back
# bf16 (mobius_add(x, y) of a float32 x and a bf16 y, a bf16 point, where a float64 x refused a float32
# y). Which other arguments are computed in float32 is the spaces' rule (Note [Arguments of another
# dtype]). The lead is found by a loop, not next(generator, None): torch 2.6's Dynamo cannot trace
# next's default argument (torch.compile(fullgraph=True) of any public function raised Unsupported there).
def _lead_tensor(args: tuple[Any, ...], point: int | None) -> torch.Tensor | None:
    if point is not None and point < len(args) and isinstance(args[point], torch.Tensor):
        return args[point]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _in_float32(fn: _F) -> _F:
    # typed as the identity on fn's type: the public functions keep their signatures for type checkers
    # Note [Tensors given by keyword] in spaces/_base.py: dist(x=x, y=y) of fp16 points near the rim was inf
    names = tuple(n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD)
    point = names.index("x") if "x" in names else None

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        lead = _lead_tensor(_in_order(args, kwargs, names) if kwargs else args, point)
        low = lead.dtype if lead is not None and lead.dtype in LOW_PRECISION else None
        if low is None:
            if _any_autocast is not None and not _any_autocast():
                return fn(*args, **kwargs)
            cast = () if lead is None else _cast_dtypes(lead.dtype, False, _autocast_on(lead.device.type))
            # float32 input under autocast: M ⊗ x's product not in bf16 (the other tensors are on the lead's
            # device, the checks say so; Note [Autocast off in one graph] in geofunc/_fastpath.py)
            with autocast_off(*(() if lead is None else (lead.device.type,))):
                return fn(*_upcast(args, cast), **_upcast(kwargs, cast)) if cast else fn(*args, **kwargs)
        cast = _cast_dtypes(low, True, _autocast_on(lead.device.type))
        _ROUNDING.dtypes.append(low)
        try:
            with autocast_off(lead.device.type):
                out = fn(*_upcast(args, cast), **_upcast(kwargs, cast))
        finally:
            _ROUNDING.dtypes.pop()
        return _downcast(out, low)

    return cast(_F, wrapped)


@_in_float32
def conformal_factor(x: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The conformal factor :math:`\lambda_x = 2 / (1 - c\|x\|^2)`, shape ``(*batch, 1)``.

    The metric at ``x`` is :math:`\lambda_x^2` times the Euclidean one. The gap is clamped at ``≥ ε``
    (a finite point on or outside the boundary reads as one at the float boundary, as in every
    map); NaN where ``x`` has a NaN or inf entry.
    """
    c = _check_c(c, "conformal_factor", x, "x")
    _check_vec(x, "conformal_factor", "x")
    return 2.0 / _gap(x, c) + poison(x, ndim=1)


@_in_float32
def mobius_add(x: Tensor, y: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""Möbius addition :math:`x \oplus_c y` (last dimension; batch dimensions broadcast).

    .. math::

        x \oplus_c y = \frac{(1 + 2c\langle x, y\rangle + c\|y\|^2)\,x + (1 - c\|x\|^2)\,y}
                            {1 + 2c\langle x, y\rangle + c^2\|x\|^2\|y\|^2}

    evaluated in the cancellation-free form of Note [stable gyrovector formulas]; the result
    is clamped into the ball's margin. Not commutative: :math:`x \oplus y = \mathrm{gyr}[x, y](y \oplus x)`.
    """
    c = _check_c(c, "mobius_add", x, "x")
    _check_vecs("mobius_add", (x, "x"), (y, "y"))
    (x, gx), (y, gy) = _onto(x, c), _onto(y, c)  # Note [points on or outside the boundary]
    return _clamp_into_ball(_add(x, y, gx, gy, c), c)


@_in_float32
def mobius_scalar_mul(r: Union[float, Tensor], x: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""Möbius scalar multiplication :math:`r \otimes_c x = \tanh(r\,\operatorname{artanh}(\sqrt c\|x\|))\,\frac{x}{\sqrt c\|x\|}`.

    ``r`` is a number or a tensor of the batch shape ``(*batch)`` (or one that broadcasts with it; not
    geoopt's ``(*batch, 1)``, which is refused: read as a batch shape it would broadcast). Written as
    :math:`\exp_0(r \log_0 x) = T(c\|v\|^2)\,v`, :math:`v = r A x`, with
    :math:`A = \operatorname{artanh}(\rho)/\rho`, :math:`T(t) = \tanh(\sqrt t)/\sqrt t`, so it is
    smooth at ``x = 0``; every finite ``r`` and ``x`` give a point (a huge ``r`` the boundary point
    in the direction of ``r x``). ``1 ⊗ x = x``, ``(r + s) ⊗ x = (r ⊗ x) ⊕ (s ⊗ x)``.
    """
    c = _check_c(c, "mobius_scalar_mul", x, "x")
    _check_vec(x, "mobius_scalar_mul", "x")
    # (not a bool: True read as r = 1, a bool tensor as 0/1 coefficients)
    if (isinstance(r, bool) or isinstance(r, torch.Tensor) and r.dtype == torch.bool
            or not (isinstance(r, numbers.Real) or isinstance(r, torch.Tensor) and _broadcastable(r.shape, x.shape[:-1]))):
        raise ManifoldError(f"geofunc.hyperbolic.mobius_scalar_mul: expected `r` to be a real number or a tensor of "
                            f"the batch shape {tuple(x.shape[:-1])}, got {describe(r)}.")
    if isinstance(r, torch.Tensor):
        _check_mixed("mobius_scalar_mul", (x, "x"), (r, "r"))  # Note [plain tensors beside DTensors]
        # a coefficient, not a point: taken in x's dtype (a float64 or integer r gave a float64 result, a
        # complex one torch's "clamp is not supported for complex types", one on another device torch's error)
        if r.is_complex() or r.device != x.device:
            raise ManifoldError(f"geofunc.hyperbolic.mobius_scalar_mul: expected `r` to be a real tensor on the device "
                                f"of `x` ({x.device}), got {describe(r)} on {r.device}.")
        if r.ndim == x.ndim and r.shape[-1] == 1:
            # geoopt's coefficient shape (*batch, 1): read as a batch shape it broadcasts against the batch
            # (r of (B, 1) and x of (B, n) gave a (B, B, n) result); the two readings differ, so refused
            raise ManifoldError(f"geofunc.hyperbolic.mobius_scalar_mul: expected `r` of the batch shape "
                                f"{tuple(x.shape[:-1])} (not geoopt's (*batch, 1): pass r.squeeze(-1)), got a tensor "
                                f"of shape {tuple(r.shape)}.")
        # (a 0-d r stays 0-d: it broadcasts the same, and DTensor takes a plain 0-d tensor as a scalar, where
        # one of shape (1,) beside DTensor points was replicated with torch's UserWarning)
        r = r.to(x.dtype) if r.ndim == 0 else r.to(x.dtype).unsqueeze(-1)
    else:
        # as a float: a Fraction (a Real, as a curvature may be) raised a TypeError in r·a, an int too large for a
        # float an OverflowError; it is r = ±inf, whose result is the boundary point in the direction of r·x
        try:
            r = float(r)
        except OverflowError:
            r = math.inf if r > 0 else -math.inf
    x, gx = _onto(x, c)  # Note [points on or outside the boundary]
    a = _artanhc(c * _sq(x), gx)  # log_0(x) = a x, 1 ≤ a ≤ 20 (the gap is ≥ ε)
    # r ⊗ x = exp_0(r a x), r a x scaled inside exp_0 (Note [norms without overflow]; not from ‖x‖²,
    # which underflows: 1e25 ⊗ [1e-25, 0] is tanh(1) e₁ in float32). r is clipped where |r|·a‖x‖₁
    # could overflow: there the result is the boundary point in the direction of r·x whatever r
    # is. A number r that cannot overflow against a point (|r|·20/√c ≤ max/4) is used as it is.
    top = torch.finfo(x.dtype).max / 4.0
    if isinstance(r, torch.Tensor) or isinstance(c, torch.Tensor) or abs(r) * 20.0 / math.sqrt(c) > top:
        big = top / (a.detach() * x.detach().abs().sum(-1, keepdim=True)).clamp(min=1.0)
        r = torch.clamp(r if isinstance(r, torch.Tensor) else torch.full_like(big, float(r)), -big, big)
    return _expmap0((r * a) * x, c)


@_in_float32
def mobius_matvec(M: Tensor, x: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""Möbius matrix-vector product :math:`M \otimes_c x`.

    .. math::

        M \otimes_c x = \tanh\!\Big(\frac{\|Mx\|}{\|x\|}\operatorname{artanh}(\sqrt c\|x\|)\Big)\frac{Mx}{\sqrt c\|Mx\|}

    ``M`` has shape ``(*batch, m, n)``, ``x`` ``(*batch, n)``; the result ``(*batch, m)``
    lies in the m-dimensional ball. Written as :math:`\exp_0(A\,Mx)` with
    :math:`A = \operatorname{artanh}(\rho)/\rho`, :math:`\rho = \sqrt c\|x\|`: smooth, ``0``
    where ``Mx = 0``,
    and the boundary point in the direction of ``Mx`` however large ``Mx`` is (as long as ``M x``
    itself is finite).
    """
    c = _check_c(c, "mobius_matvec", x, "x")
    _check_vec(x, "mobius_matvec", "x")
    if not isinstance(M, torch.Tensor) or M.ndim < 2 or M.shape[-1] != x.shape[-1]:
        raise ManifoldError(f"geofunc.hyperbolic.mobius_matvec: expected `M` of shape (..., m, {x.shape[-1]}), got {describe(M)}.")
    if M.dtype != x.dtype or M.device != x.device:
        raise ManifoldError(f"geofunc.hyperbolic.mobius_matvec: expected `M` of the dtype and device of `x` ({dtype_for_message(x)}; "
                            f"{x.device}), got {describe(M)} on {M.device}.")
    _check_mixed("mobius_matvec", (x, "x"), (M, "M"))  # Note [plain tensors beside DTensors]
    if not _broadcastable(M.shape[:-2], x.shape[:-1]):
        raise ManifoldError(f"geofunc.hyperbolic.mobius_matvec: expected `M` with batch dims broadcastable with those "
                            f"of `x` {tuple(x.shape[:-1])}, got {describe(M)}.")
    x, gx = _onto(x, c)  # Note [points on or outside the boundary]
    Mx = (M @ x.unsqueeze(-1)).squeeze(-1)
    return _expmap0(_artanhc(c * _sq(x), gx) * Mx, c)  # exp_0 of A·Mx


@_in_float32
def gyration(u: Tensor, v: Tensor, w: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The gyration :math:`\mathrm{gyr}[u, v]\,w = \ominus(u \oplus v) \oplus (u \oplus (v \oplus w))`.

    A rotation of ``w`` in the plane of ``u`` and ``v``, in closed form (Ungar 2008):

    .. math::

        \mathrm{gyr}[u, v]\,w = w + \frac{2(A u + B v)}{D}, \qquad D = (1 - c\|u\|^2)(1 - c\|v\|^2) + c\|u + v\|^2,

    .. math::

        A = -c^2\langle u,w\rangle\|v\|^2 + c\langle v,w\rangle + 2c^2\langle u,v\rangle\langle v,w\rangle, \qquad
        B = -c^2\langle v,w\rangle\|u\|^2 - c\langle u,w\rangle ,

    evaluated in the form of Note [stable gyrovector formulas] with ``d = u + v`` (``A`` and ``B``
    are differences of O(c) numbers whose sum is O(‖u + v‖)): accurate for ``u ≈ −v`` near the
    boundary, and ``gyr[u, −u] w = w`` exactly. An isometry: ``‖gyr[u, v] w‖ = ‖w‖``.
    """
    c = _check_c(c, "gyration", u, "u")
    _check_vecs("gyration", (u, "u"), (v, "v"), (w, "w"))
    # gyr[u, v] = gyr[y, −x] with x = −v, y = u, written with d = u + v: no cancellation for
    # u ≈ −v near the boundary (Note [stable gyrovector formulas]); gyr[u, −u] w = w exactly.
    (u, gu), (v, gv) = _onto(u, c), _onto(v, c)  # Note [points on or outside the boundary]
    return _gyr(-v, u + v, gv, gu, w, c)


@_in_float32
def dist(x: Tensor, y: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The geodesic distance :math:`d_c(x, y) = \frac{2}{\sqrt c}\operatorname{artanh}(\sqrt c\,\|(-x) \oplus_c y\|)`, shape ``(*batch)``.

    Computed from ``y − x`` and the gaps (Note [stable gyrovector formulas]): accurate for
    nearby points near the boundary in float32. Its gradient at ``x = y`` (where ``d`` is not
    differentiable) is 0.
    """
    c = _check_c(c, "dist", x, "x")
    _check_vecs("dist", (x, "x"), (y, "y"))
    return _dist(x, y, c).squeeze(-1)


def _dist(x: Tensor, y: Tensor, c: Curvature) -> Tensor:
    # d = (2/√c) artanh ρ, ρ = √c‖N‖/D, 1 − ρ² = gap (exact), written as 2 (‖N‖/D) artanhc(ρ²) (Note
    # [sqrt-free hyperbolic functions]): no 1/√c, whose two terms of ∂d/∂c (each ~ d/c) cancelled, so a
    # learnable curvature's gradient was 0.32 for 0.16 at c = 1e-6 in float32 (−1023 at 1e-10); as c → 0
    # this tends to the Euclidean limit 2‖y − x‖, smoothly.
    # Only the series branch (ρ² < _T_SMALL, where a small c lands) needs that form: the closed form
    # keeps the textbook's fewer roundings above it (3.3e-7 relative near the boundary in float32 the
    # other way, 1.8e-7 this way).
    (x, gx), (y, gy) = _onto(x, c), _onto(y, c)  # Note [points on or outside the boundary]
    N, D, gap = _neg_add(x, y, gx, gy, c)
    n2 = _sq(N)
    pos = n2 > 0  # d is not differentiable at x = y: the double where gives it gradient 0 there
    n = torch.sqrt(torch.where(pos, n2, torch.ones_like(n2)))
    rho2 = c * n2 / (D * D)
    small = rho2 < _T_SMALL  # both branches on masked copies ("double where")
    series = 2.0 * (n / D) * _horner(torch.where(small, rho2, torch.zeros_like(rho2)), _ARTANHC)
    rho = torch.sqrt(torch.where(small, torch.ones_like(rho2), rho2))
    direct = torch.log1p(2.0 * rho * (1.0 + rho) / torch.where(small, torch.ones_like(gap), gap)) / _sqrt_c(c)
    d = torch.where(small, series, direct)
    return torch.where(pos | torch.isnan(n2), d, torch.zeros_like(d))


@_in_float32
def expmap(x: Tensor, v: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The exponential map at ``x``.

    .. math::

        \exp_x(v) = x \oplus_c \Big(\tanh\!\big(\tfrac{\sqrt c\,\lambda_x\|v\|}{2}\big)\frac{v}{\sqrt c\|v\|}\Big)

    ``v`` is a tangent vector at ``x`` in ambient coordinates (its Riemannian norm is
    :math:`\lambda_x\|v\|`). Smooth in ``v``, at ``v = 0`` included; the gap of the second
    summand is :math:`1/\cosh^2(\cdot)` (exact), and the result is clamped into the margin.
    Beyond :math:`\theta = \sqrt c\,\lambda_x\|v\|/2 = 40` (where :math:`\tanh\theta = 1` in
    every dtype) ``v`` is rescaled to :math:`\theta = 40`: the result is the boundary point of the
    geodesic from ``x`` in the direction of ``v``, for every finite ``v`` (Note [long tangent vectors]).
    """
    c = _check_c(c, "expmap", x, "x")
    _check_vecs("expmap", (x, "x"), (v, "v"))
    return _expmap(x, v, c)


# Note [long tangent vectors]
# tanh θ = 1 in every float dtype from θ = 20 on, so expmap caps θ = √c λ_x‖v‖/2 at _ARG_MAX = 40
# (a stated clamp) to keep cosh θ and every derivative finite. The cap must rescale v itself
# (without overflow: Note [norms without overflow]), not only θ inside tanh(θ)/θ: capping
# t = θ² alone made the second summand tanh(40)/40 · v/g_x, of norm θ/40 > 1/√c, which left the
# ball before x ⊕ (·) ran. exp_0([50, 0, 0]) and exp_x with θ = 50 were then points at distance
# 2.2 instead of the boundary (34.7), in the wrong direction for x ≠ 0, and the map was not
# monotone in ‖v‖. With v rescaled, exp_x(v) for θ ≥ 40 is x ⊕ (the ideal point in the direction
# of v), the exact map to within e^(−80), then clamped into the ball's margin like every point.
# expmap0 (and so r ⊗ x and M ⊗ x) needs no cosh: its cap is the margin's own, θ = artanh(1 − δ),
# beyond which the clamped exact value (1 − δ) v/(√c‖v‖) is written directly.
def _expmap(x: Tensor, v: Tensor, c: Curvature, margin: Optional[float] = None) -> Tensor:
    x, gx = _onto(x, c)  # Note [points on or outside the boundary]
    # v rescaled to θ = √c‖v‖/g_x ≤ 40 (Note [long tangent vectors]), without overflow (Note [norms
    # without overflow]): v = s·vs, and where capped v = vs·f with ‖vs·f‖ = 40 g_x/√c.
    vs, s, q = _scaled(v)
    g2 = gx * gx
    inside = q <= (_ARG_MAX * _ARG_MAX / c) * g2 / (s * s)
    s = torch.where(inside, s, 1.0)
    t = torch.where(inside, c * (s * s) * q / g2, _ARG_MAX * _ARG_MAX)  # θ²
    f = torch.where(inside, s, (_ARG_MAX / _sqrt_c(c)) * gx / torch.sqrt(torch.where(inside, 1.0, q)))
    y = vs * (_tanhc(t) * f / gx)  # tanh(θ) v/(√c‖v‖)
    cosh = _cosh(t)
    gy = 1.0 / (cosh * cosh)
    return _clamp_into_ball(_add(x, y, gx, gy, c), c, margin)


@_in_float32
def expmap0(v: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r""":math:`\exp_0(v) = \tanh(\sqrt c\|v\|)\,\frac{v}{\sqrt c\|v\|}` (the exponential map at the origin, where :math:`\lambda_0 = 2`)."""
    c = _check_c(c, "expmap0", v, "v")
    _check_vec(v, "expmap0", "v")
    return _expmap0(v, c)


def _expmap0(v: Tensor, c: Curvature, margin: Optional[float] = None) -> Tensor:
    return _exp0(*_scaled(v), c, margin)


def _exp0(vs: Tensor, s: Tensor, q: Tensor, c: Curvature, margin: Optional[float] = None) -> Tensor:
    """``exp_0(v)`` clamped into the margin, from ``v = s·vs`` (``s`` detached) and ``q = ‖vs‖²``."""
    # tanh(θ) v/(√c‖v‖), θ = √c‖v‖, clamped into the margin: beyond θ = artanh(1 − δ) the result is
    # (1 − δ) v/(√c‖v‖), the clamp of the exact value, written without overflow for every finite v
    # (Note [norms without overflow]).
    m = 1.0 - (ball_margin(rounding_dtype(vs.dtype)) if margin is None else margin)
    th = 0.5 * math.log((1.0 + m) / (1.0 - m))  # artanh(1 − δ) < 40
    inside = q <= (th * th / c) / (s * s)
    s = torch.where(inside, s, 1.0)
    f = torch.where(inside, _tanhc(c * (s * s) * q) * s, (m / _sqrt_c(c)) / torch.sqrt(torch.where(inside, 1.0, q)))
    return vs * f


@_in_float32
def logmap(x: Tensor, y: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The logarithm at ``x``: the inverse of :func:`expmap`.

    .. math::

        \log_x(y) = \frac{2}{\sqrt c\,\lambda_x}\operatorname{artanh}(\sqrt c\|w\|)\frac{w}{\|w\|}, \qquad w = (-x) \oplus_c y

    A tangent vector at ``x`` in ambient coordinates, of Riemannian norm :math:`d_c(x, y)`;
    smooth in ``y``, at ``y = x`` included.
    """
    c = _check_c(c, "logmap", x, "x")
    _check_vecs("logmap", (x, "x"), (y, "y"))
    return _logmap(x, y, c)


def _logmap(x: Tensor, y: Tensor, c: Curvature) -> Tensor:
    (x, gx), (y, gy) = _onto(x, c), _onto(y, c)  # Note [points on or outside the boundary]
    N, D, gap = _neg_add(x, y, gx, gy, c)
    w = N / D
    return gx * _artanhc(c * _sq(w), gap) * w


@_in_float32
def logmap0(y: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r""":math:`\log_0(y) = \operatorname{artanh}(\sqrt c\|y\|)\,\frac{y}{\sqrt c\|y\|}` (the inverse of :func:`expmap0`)."""
    c = _check_c(c, "logmap0", y, "y")
    _check_vec(y, "logmap0", "y")
    y, gy = _onto(y, c)  # Note [points on or outside the boundary]
    return _artanhc(c * _sq(y), gy) * y


@_in_float32
def parallel_transport(x: Tensor, y: Tensor, v: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""Parallel transport of ``v ∈ T_x`` to ``T_y`` along the geodesic: :math:`\frac{\lambda_x}{\lambda_y}\mathrm{gyr}[y, -x]\,v`.

    An isometry :math:`T_x \to T_y` (it preserves :math:`\lambda^2\langle\cdot,\cdot\rangle`); the
    gyration is written with ``y − x`` (Note [stable gyrovector formulas]).
    """
    c = _check_c(c, "parallel_transport", x, "x")
    _check_vecs("parallel_transport", (x, "x"), (y, "y"), (v, "v"))
    return _transport(x, y, v, c)


def _transport(x: Tensor, y: Tensor, v: Tensor, c: Curvature) -> Tensor:
    (x, gx), (y, gy) = _onto(x, c), _onto(y, c)  # Note [points on or outside the boundary]
    return (gy / gx) * _gyr(x, y - x, gx, gy, v, c)


@_in_float32
def project(x: Tensor, *, c: Curvature = 1.0, margin: Optional[float] = None) -> Tensor:
    r"""``x`` rescaled into the closed ball :math:`\sqrt c\|x\| \le 1 - \delta` (``δ = margin``, default :func:`ball_margin`).

    The nearest point of that ball; points inside are returned unchanged. ``margin`` is a number in
    ``[0, 1)`` or a 0-d floating tensor (NaN where it is not in ``[0, 1)``, as a tensor ``c``).
    """
    c = _check_c(c, "project", x, "x")
    _check_vec(x, "project", "x")
    _check_mixed("project", (x, "x"), (margin, "margin"))  # Note [plain tensors beside DTensors]
    return _project(x, c, _check_margin(margin, "project"))


def _check_margin(margin: Any, fn: str) -> Any:
    """``None``, a number in ``[0, 1)`` (else ManifoldError), or a real floating 0-d tensor, NaN where not in
    ``[0, 1)`` (no data read). An unchecked margin gave points off the ball without a word: a negative one
    points outside it (``margin=-0.5``: norm 1.5), one above 1 the boundary point opposite to ``x``, and
    ``True`` read as 1 the origin."""
    if margin is None:
        return None
    if isinstance(margin, torch.Tensor):
        if margin.ndim != 0 or not margin.dtype.is_floating_point or not_dense(margin):
            raise ManifoldError(f"geofunc.hyperbolic.{fn}: expected `margin` None, a number in [0, 1) or a 0-d floating "
                                f"tensor, got {describe(margin)}.")
        return torch.where((margin >= 0) & (margin < 1), margin, torch.full_like(margin, math.nan))
    value = real_value(margin)
    if not 0.0 <= value < 1.0:
        raise ManifoldError(f"geofunc.hyperbolic.{fn}: expected `margin` None, a number in [0, 1) or a 0-d floating "
                            f"tensor, got {describe(margin)}.")
    return value


@_in_float32
def dist2plane(x: Tensor, p: Tensor, a: Tensor, *, c: Curvature = 1.0, signed: bool = False) -> Tensor:
    r"""Distance from ``x`` to the gyroplane through ``p`` with normal ``a ∈ T_p`` (Ganea et al. 2018).

    .. math::

        d_c(x, H_{a,p}) = \frac{1}{\sqrt c}\operatorname{arsinh}\!\Big(
            \frac{2\sqrt c\,|\langle z, a\rangle|}{(1 - c\|z\|^2)\,\|a\|}\Big), \qquad z = (-p) \oplus_c x,

    evaluated as :math:`\langle z, a\rangle / (1 - c\|z\|^2) = \langle N, a\rangle / (g_p g_x)` with
    ``N`` the numerator of ``z`` (no cancellation). ``signed=True`` keeps the sign of
    :math:`\langle z, a\rangle` (the side of the plane), as hyperbolic multinomial logistic
    regression uses it. ``a`` must be non-zero. Shape ``(*batch)``.
    """
    c = _check_c(c, "dist2plane", x, "x")
    _check_vecs("dist2plane", (x, "x"), (p, "p"), (a, "a"))
    (x, gx), (p, gp) = _onto(x, c), _onto(p, c)  # Note [points on or outside the boundary]
    N, _, _ = _neg_add(p, x, gp, gx, c)
    # arsinh(√c q)/√c = q arsinhc(c q²) (q = s/√c): no 1/√c where c q² is small (the series), as in _dist
    q = 2.0 * _dot(N, a) / (gp * gx * torch.linalg.vector_norm(a, dim=-1, keepdim=True))
    if not signed:
        q = q.abs()
    u = c * q * q
    small = u < _T_SMALL
    series = q * _horner(torch.where(small, u, torch.zeros_like(u)), _ARSINHC)
    sc = _sqrt_c(c)
    direct = torch.asinh(sc * torch.where(small, torch.ones_like(q), q)) / sc
    return torch.where(small, series, direct).squeeze(-1)


@_in_float32
def weighted_midpoint(x: Tensor, weights: Optional[Tensor] = None, *, c: Curvature = 1.0) -> Tensor:
    r"""The weighted gyromidpoint (Einstein midpoint) of the points ``x[..., i, :]``.

    .. math::

        m = \tfrac12 \otimes_c \frac{\sum_i w_i \lambda_{x_i} x_i}{\sum_i w_i (\lambda_{x_i} - 1)}

    (Ungar 2008, eq. 6.91; the Einstein midpoint of the Klein model, mapped to the ball),
    evaluated without the Klein point, whose gap is the square of the ball's (Note [the Einstein
    midpoint at the boundary]): accurate near the boundary, and the midpoint of one point is
    that point. ``x`` has shape ``(*batch, m, n)``, ``weights`` ``(*batch, m)`` (non-negative, not
    all zero; default equal), the result ``(*batch, n)``. For two points it is the midpoint of the
    geodesic; it commutes with the ball's isometries (Möbius gyrotranslations and rotations).
    """
    c = _check_c(c, "weighted_midpoint", x, "x")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.ndim < 2:
        raise ManifoldError(f"geofunc.hyperbolic.weighted_midpoint: expected `x` of shape (..., m, n), got {describe(x)}.")
    w = torch.ones_like(x[..., 0]) if weights is None else weights
    if (not isinstance(w, torch.Tensor) or tuple(w.shape[-1:]) != tuple(x.shape[-2:-1]) or w.dtype != x.dtype
            or w.device != x.device or not _broadcastable(w.shape[:-1], x.shape[:-2])):
        on = f" on {w.device}" if isinstance(w, torch.Tensor) else ""
        raise ManifoldError(
            f"geofunc.hyperbolic.weighted_midpoint: expected `weights` of shape (..., {x.shape[-2]}) with batch dims "
            f"broadcastable with those of `x` {tuple(x.shape[:-2])}, and the dtype and device of `x` ({x.dtype}, "
            f"{x.device}), got {describe(w)}{on}."
        )
    _check_mixed("weighted_midpoint", (x, "x"), (w, "weights"))  # Note [plain tensors beside DTensors]
    # Note [weights of any scale]: the midpoint is the same for w and s·w (s > 0), but W² and the products in Q
    # overflowed or underflowed: equal weights of 1e20 (float32; 1e160 in float64) gave the origin, of 1e-30 a
    # point 0.62 away from the midpoint, without a word. Divided by their largest |w| (detached: the map is
    # homogeneous of degree 0 in w, so its derivatives are unchanged); NaN or inf weights still give NaN.
    s = w.detach().abs().amax(-1, keepdim=True)
    w = (w / torch.where(s > 0, s, torch.ones_like(s))).unsqueeze(-1)
    x, gx = _onto(x, c)  # Note [points on or outside the boundary]
    a = w / gx  # w_i λ_i / 2
    A, W = a.sum(-2), w.sum(-2)
    mu = (a * x).sum(-2) / A
    Q = W * W + 4.0 * c * A * (a * _sq(x - mu.unsqueeze(-2))).sum(-2)  # Note [the Einstein midpoint at the boundary]
    den = 2.0 * A - W
    # the sign of den only (detached: copysign's derivative in its sign argument is 0, and the backward of a
    # DTensor den mixed a plain zero tensor into the DTensor graph: Note [the sign of the Einstein midpoint])
    return _project(2.0 * A * mu / (den + torch.copysign(torch.sqrt(Q), den.detach())), c)


# Note [the sign of the Einstein midpoint]
# √Q takes the sign of D = 2A − W by copysign(√Q, D). PyTorch's derivative of copysign in its second
# (sign) argument is a zero tensor made without regard to the argument's type: on DTensor points
# (an embedding table sharded by FSDP2 or by hand, on any placement) the values were right but every
# backward through weighted_midpoint raised torch's "aten.add.Tensor got mixed torch.Tensor and
# DTensor" on every rank. That derivative is 0 wherever it exists, so the sign is taken from D
# detached: the same values and derivatives (first, second, forward mode) on plain tensors.


# Note [the Einstein midpoint at the boundary]
# The textbook midpoint ½ ⊗ (N/D), N = Σ w_i λ_i x_i, D = Σ w_i (λ_i − 1), goes through the Klein
# point k = N/D, whose gap 1 − c‖k‖² is the *square* of the Poincaré gap: lost to rounding once
# it is below ε (a float32 point at radius 0.9999, alone, came back 1.24 away, float64 at
# 1 − 1e-12 9.61 away). But ½ ⊗ k = k/(1 + √(1 − c‖k‖²)) = N/(D + √Q) with Q = D² − c‖N‖², and Q
# is −c⟨S, S⟩_L of the Lorentz sum S = Σ w_i X_i of the points (X_i = poincare_to_lorentz(x_i)):
#   Q = Σ_ij w_i w_j cosh(√c d_ij) = W² + 2c Σ_ij α_i α_j ‖x_i − x_j‖² = W² + 4cA Σ_i α_i ‖x_i − μ‖²
# with W = Σ w_i, α_i = w_i/g_i, A = Σ α_i, μ = Σ α_i x_i / A (cosh(√c d) = 1 + 2c‖x − y‖²/(g_x g_y)),
# and N = 2Aμ, D = 2A − W. For non-negative weights every sum has terms of one sign, so each
# quantity is accurate to rounding and the midpoint is as accurate as the points (of one point it
# is the point itself, to rounding). √Q takes the sign of D, so the map keeps the textbook form's
# invariance w → −w; weights for which Q < 0 (the Klein point outside the ball) give NaN.


@_in_float32
def poincare_to_lorentz(x: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The isometry from the Poincaré ball of curvature ``−c`` to the hyperboloid :class:`~geofunc.Lorentz` ``(k = 1/c)``.

    :math:`x \mapsto \Big(\frac{\sqrt k\,(1 + c\|x\|^2)}{1 - c\|x\|^2},\ \frac{2x}{1 - c\|x\|^2}\Big)`,
    shape ``(*batch, n)`` to ``(*batch, n + 1)``. The result is a point of :class:`~geofunc.Lorentz`
    under that space's stated clamp: within distance ``T√k`` of the origin (``T`` = 8.66 in
    float32, 18.7 in float64, 3.12 in bfloat16, 4.16 in float16), beyond which the hyperboloid's
    rounding exceeds what it measures (Note [the hyperboloid's precision] in
    ``geofunc/spaces/_lorentz.py``). Unclamped, a float32
    point at ball radius 0.99999 (distance 12.2) was accepted by ``Lorentz.contains`` and at
    ``Lorentz.dist`` 0 from one at 0.999 (4.6 in the ball). Farther points: the ball, or float64.
    """
    from .spaces._lorentz import _max_distance  # (that module imports this one)

    c = _check_c(c, "poincare_to_lorentz", x, "x")
    _check_vec(x, "poincare_to_lorentz", "x")
    x, g = _onto(x, c)  # Note [points on or outside the boundary]
    xb = _cap(2.0 * x / g, math.sinh(_max_distance(x.dtype)) / _sqrt_c(c))
    x0 = torch.sqrt(1.0 / c + _sq(xb))  # = √k (1 + c‖x‖²)/(1 − c‖x‖²) where not capped
    return torch.cat([x0, xb], dim=-1)


@_in_float32
def lorentz_to_poincare(x: Tensor, *, c: Curvature = 1.0) -> Tensor:
    r"""The inverse of :func:`poincare_to_lorentz`: :math:`(x_0, \bar x) \mapsto \bar x / (1 + \sqrt c\,x_0)`.

    ``x`` on the hyperboloid :math:`-x_0^2 + \|\bar x\|^2 = -1/c`, ``x_0 > 0``; the result is
    clamped into the ball's margin (NaN where ``x`` has a NaN or inf entry).
    """
    c = _check_c(c, "lorentz_to_poincare", x, "x")
    _check_vec(x, "lorentz_to_poincare", "x")
    if x.shape[-1] < 2:
        raise ManifoldError(f"geofunc.hyperbolic.lorentz_to_poincare: expected vectors (..., n + 1) with n ≥ 1, got {describe(x)}.")
    # (an inf x₀ would give the plausible point 0: poisoned, Note [NaN policy])
    return _project(x[..., 1:] / (1.0 + _sqrt_c(c) * x[..., :1]), c) + poison(x, ndim=1)


# At the end: geofunc.spaces imports this module (its Lorentz and PoincareBall), so the policy's helpers
# are bound once every name here exists (Note [Hyperbolic functions in low precision]).
from .spaces._base import (  # noqa: E402
    LOW_PRECISION, _ROUNDING, _any_autocast, _autocast_on, _cast_dtypes, _downcast, _in_order, _upcast, autocast_off,
    dtype_for_message, rounding_dtype)
